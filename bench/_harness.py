"""What every scenario shares: figures and targets, child processes and their /proc counters, the database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
from sqlalchemy.engine import make_url

from storage import migrate
from storage.db import make_engine

ROOT = Path(__file__).resolve().parent.parent
#: where --profile writes its py-spy recordings and summaries
PROFILE_DIR = ROOT / "bench"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
#: how long a child process may take to print its address
START_TIMEOUT_S = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Target:
    """A goal for a figure: `value` (or `value / baseline`, for ratios) compared with `bound`."""

    kind: Literal["min", "max", "ratio_min", "ratio_max"]
    bound: float

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """Whether the figure reaches the goal (None when it could not be measured)."""
        subject = ratio if self.kind.startswith("ratio") else value
        if subject is None or math.isnan(subject):
            return None
        return subject >= self.bound if self.kind.endswith("min") else subject <= self.bound

    def describe(self, unit: str) -> str:
        """The target as the table shows it."""
        sign = "≥" if self.kind.endswith("min") else "≤"
        if self.kind.startswith("ratio"):
            return f"{sign} {self.bound:g}x baseline"
        return f"{sign} {self.bound:g} {unit}".rstrip()


@dataclass(frozen=True)
class Figure:
    """One measured number, with the baseline measured beside it in the same run and the target it serves."""

    scenario: str
    name: str
    value: float | None
    unit: str = ""
    baseline: float | None = None
    target: Target | None = None
    #: what the baseline is, when there is one
    baseline_label: str = ""

    @property
    def ratio(self) -> float | None:
        """value / baseline."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: no target, or not measurable)."""
        return None if self.target is None else self.target.met(self.value, self.ratio)

    def to_json(self) -> dict[str, Any]:
        """The figure as results.json holds it."""
        return {
            "scenario": self.scenario,
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_label": self.baseline_label or None,
            "ratio": self.ratio,
            "target": self.target.describe(self.unit) if self.target else None,
            "met": self.met,
        }


@dataclass
class ScenarioResult:
    """What a scenario hands back: its figures, and details for results.json."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (q in 0..1) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded for the table."""
    return round(seconds * 1000, 3)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 with fewer than two)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# ---------------------------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def database_cpu_seconds() -> float:
    """User + system CPU time so far of every PostgreSQL process on this machine (NaN if there is none).

    The database shares the machine's cores with client and server, so its cost per call counts too. A
    backend that exits between two readings loses its share; the service's pooled connections live on.
    """
    total, found = 0.0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            total += cpu_seconds(int(entry.name))
            found = True
        except (OSError, ValueError):  # it exited meanwhile
            continue
    return total if found else math.nan


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Child:
    """A process this run started: its first stdout line (JSON) told where it serves."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """Resident memory now, in bytes."""
        return rss_bytes(self.pid)

    async def stop(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        """SIGTERM (or SIGKILL) this process and wait for it; SIGKILL if it does not end in time."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's stderr."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def start_child(
    name: str,
    module: str,
    args: Sequence[str],
    *,
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    stdin: bool = False,
) -> Child:
    """Start `python -m module args…` and wait for the one JSON line it prints once it serves."""
    log = run_dir / f"{name}.log"
    with open(log, "wb") as stderr:  # the child keeps its own descriptor
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            limit=64 * 1024 * 1024,
        )
    child = Child(name, process, log, {})
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await process.stdout.readline()
        child.info = json.loads(line) if line else {}
    except (TimeoutError, ValueError):
        await child.stop(kill=True)
        raise RuntimeError(f"{name} did not start:\n{child.log_tail()}") from None
    if not child.info:
        await child.stop(kill=True)
        raise RuntimeError(f"{name} exited at start:\n{child.log_tail()}")
    return child


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """A list to put started children in; every one is stopped when the block exits, however it exits."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                await child.stop()


def server_env(database_url: str, data_dir: Path, **settings: str | int | float) -> dict[str, str]:
    """The environment of a `bench._server` process: this one's, less any IMAGEGEN_, OTEL_ or vendor variable
    (a scenario that wants tracing passes its OTEL_ variables in `settings`)."""
    vendor_keys = ("BFL_API_KEY", "OPENAI_API_KEY", "ARK_API_KEY", "GEMINI_API_KEY")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMAGEGEN_", "OTEL_")) and k not in vendor_keys
    }
    env.update(
        {
            "IMAGEGEN_DATABASE_URL": database_url,
            "IMAGEGEN_GRPC_ADDRESS": "127.0.0.1:0",
            "IMAGEGEN_HTTP_ADDRESS": "127.0.0.1:0",
            "IMAGEGEN_DATA_DIR": str(data_dir),
            "IMAGEGEN_LOG_LEVEL": "WARNING",
            "IMAGEGEN_LOG_FORMAT": "json",
            # Admission control answers RESOURCE_EXHAUSTED past its caps; a benchmark measures the rest.
            "IMAGEGEN_MAX_PENDING_JOBS_PER_ACCOUNT": "0",
            "IMAGEGEN_MAX_PENDING_JOBS": "0",
            # the watch scenario opens 10,000 streams as one caller
            "IMAGEGEN_MAX_WATCH_STREAMS_PER_CALLER": "0",
            "IMAGEGEN_SHUTDOWN_GRACE_S": "1",
        }
    )
    for key, value in settings.items():
        if key.isupper():
            env[key] = str(value)  # BFL_API_KEY and friends
        else:
            env[f"IMAGEGEN_{key.upper()}"] = str(value)
    return env


async def start_server(name: str, ctx: RunContext, **settings: str | int | float) -> Child:
    """The service under test in its own process (`bench._server`), on the run's database."""
    data_dir = ctx.run_dir / f"{name}-data"
    return await start_child(
        name, "bench._server", [], run_dir=ctx.run_dir, env=server_env(ctx.database_url, data_dir, **settings)
    )


async def start_sandbox(name: str, ctx: RunContext, *, latency_s: float) -> Child:
    """The vendor sandbox in its own process, with no cap on BFL's active tasks."""
    return await start_child(name, "bench._sandbox", ["--latency", str(latency_s)], run_dir=ctx.run_dir)


# ---------------------------------------------------------------------------------------------- profiles


@contextlib.asynccontextmanager
async def record_profile(pid: int, label: str, run_dir: Path) -> AsyncIterator[None]:
    """py-spy samples the process while the block runs; writes bench/profile-<label>.txt (collapsed stacks)
    and bench/profile-<label>-top.txt (the frames with the most samples, self and inclusive)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = PROFILE_DIR / f"profile-{label}.txt"
    with open(run_dir / f"py-spy-{label}.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--rate",
            "100",
            "--nonblocking",
            "--gil",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        async with asyncio.timeout(60):
            await process.wait()
        if raw.exists():
            (PROFILE_DIR / f"profile-{label}-top.txt").write_text(summarise_profile(raw.read_text()))


#: where a sample's stack passes through, by the path fragments of its frames
_LIBRARIES = {
    "sqlalchemy": "sqlalchemy/",
    "asyncpg": "asyncpg/",
    "aiohttp": "aiohttp/",
    "protobuf": "protobuf/",
    "prometheus_client": "prometheus_client/",
    "grpc (Python part)": "grpc/",
    "PIL": "PIL/",
    "json": "json/",
    "server/": "(server/",
    "storage/": "(storage/",
    "providers/": "(providers/",
    "logging": "logging/",
}


def summarise_profile(collapsed: str, top: int = 25) -> str:
    """Where the samples of py-spy's collapsed stacks went: by library, then by frame (self, inclusive)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        for library, marker in _LIBRARIES.items():
            if marker in stack:
                libraries[library] += count
    lines = [
        f"{total} samples at 100 Hz of the thread holding the GIL (py-spy --gil): the service's Python work.",
        "Frames of C extensions (grpc's Cython core, asyncpg's protocol) count as their Python caller, often",
        "Handle._run; SQLAlchemy's greenlets start stacks of their own.",
        "",
        "share of samples whose stack passes through:",
    ]
    if total:
        lines += [f"{100 * n / total:6.1f}%  {library}" for library, n in libraries.most_common()]
    lines += ["", "self:"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(top)] if total else []
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in inclusive.most_common(top)] if total else []
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- database


@dataclass
class RunContext:
    """One benchmark run: its scratch directory and its own fresh, migrated database."""

    run_dir: Path
    admin_dsn: str
    database_url: str
    quick: bool
    #: record a py-spy profile of the server under test in each scenario
    profile: bool = False
    #: the submit scenario also measures the service with tracing on
    tracing: bool = True
    extra_databases: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def profiling(self, child: Child, label: str) -> AsyncIterator[None]:
        """With --profile, sample `child` with py-spy for the duration of the block (else do nothing)."""
        if not self.profile:
            yield
            return
        async with record_profile(child.pid, label, self.run_dir):
            yield

    async def sql(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement on the run's database."""
        connection = await asyncpg.connect(self.database_url, timeout=10)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(statement, *args)
            return rows
        finally:
            await connection.close()

    async def reset(self) -> None:
        """Empty the job tables between scenarios."""
        await self.sql("TRUNCATE jobs, job_events")

    async def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status now."""
        return {
            row["status"]: row["count"]
            for row in await self.sql("SELECT status, count(*) AS count FROM jobs GROUP BY status")
        }

    async def create_database(self, suffix: str) -> str:
        """A further empty database for this run (dropped with the run); returns its URL."""
        name = f"{make_url(self.database_url).database}_{suffix}"
        await _admin(self.admin_dsn, f'CREATE DATABASE "{name}"')
        self.extra_databases.append(name)
        return make_url(self.admin_dsn).set(database=name).render_as_string(hide_password=False)


async def _admin(admin_dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[tuple[str, str]]:
    """Create and migrate a database of its own for this run; drop it (and its siblings) afterwards."""
    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"imagegen_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await _admin(admin, f'CREATE DATABASE "{name}"')
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        yield admin, url
    finally:
        await _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def drop_databases(ctx: RunContext) -> None:
    """Drop the further databases a run made."""
    for name in ctx.extra_databases:
        await _admin(ctx.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def postgres_version(admin_dsn: str) -> str:
    """The PostgreSQL server's version string."""
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


# ---------------------------------------------------------------------------------------------- windows


class Sampler:
    """Samples a child's CPU and RSS between two marks."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self._cpu0 = child.cpu()
        self._t0 = time.monotonic()

    def restart(self) -> None:
        """Start the window now."""
        self._cpu0 = self.child.cpu()
        self._t0 = time.monotonic()

    def cpu(self) -> float:
        """CPU seconds since the window started."""
        return self.child.cpu() - self._cpu0

    def elapsed(self) -> float:
        """Wall seconds since the window started."""
        return time.monotonic() - self._t0

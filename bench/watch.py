"""watch: fan-out of committed transitions to WatchJob streams, beside a bare grpc.aio broadcast server.

(a) N streams (1,000 and 10,000) on one job. Transitions are made by this process through the service's
own `SqlJobStore` (claim → retry_later → claim → complete), so the commit time is known exactly: it is
stamped (wall clock) the moment the committing call returns, and the service learns of it the way it
learns of any other process's commit, by NOTIFY. (JobEvent.event_time is stamped before the transaction
runs, so it would add the commit's own duration to every figure.) Each watcher stamps the wall clock when
its stream yields the event; latency = receipt - commit. The service runs with `IMAGEGEN_ROLE=api`, so
no worker of its own competes for the job. The baseline's "commit" is the moment its broadcast starts.
"Time to reach all" is the latency of the last watcher of a transition (median over the transitions).

(b) 1,000 streams on 1,000 jobs; this process claims and then completes every job at a steady rate,
and each transition's commit-to-receipt latency is matched to its commit. Lost streams: streams that did
not end OK after their job's terminal event, or that missed one of its transitions.

Memory per stream: the server's RSS with every stream open (each got its first event) minus its RSS just
before they were opened, over the number of streams.

Client topology: watcher processes (`bench._watchers`) of at most 2,500 streams each, 100 streams per
channel, each channel its own TCP connection; 10,000 streams are 4 processes x 25 connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench._harness import (
    Child,
    Figure,
    RunContext,
    ScenarioResult,
    Target,
    children,
    ms,
    percentile,
    start_child,
    start_server,
)
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from storage.db import make_engine
from storage.jobs import Claim, Fence, SqlJobStore
from storage.models import JobError, utcnow

NAME = "watch"
STREAMS_PER_PROCESS = 2_500
STREAMS_PER_CHANNEL = 100
_OWNER = "bench-driver"
#: the (b) target: transitions slower than this are listed in the details
_SLOW_S = 0.025


@dataclass(frozen=True)
class Sizes:
    """How many streams, transitions and how fast."""

    one_job_streams: tuple[int, ...] = (1_000, 10_000)
    #: transitions per one-job run (even: claim/retry pairs, ending with claim → complete)
    one_job_transitions: int = 4
    many_jobs: int = 1_000
    #: transitions per second in (b)
    many_jobs_rate: float = 200.0
    round_timeout_s: float = 60.0


FULL = Sizes()
QUICK = Sizes(
    one_job_streams=(40,), one_job_transitions=2, many_jobs=20, many_jobs_rate=100.0, round_timeout_s=20.0
)


# ---------------------------------------------------------------------------------------------- clients


@dataclass
class _Client:
    """One watcher process and the messages it has printed."""

    child: Child
    streams: int
    #: the job ids this client's streams watch (stream i: job i mod len)
    job_ids: list[str]
    messages: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    result: dict[str, Any] | None = None
    reader: asyncio.Task[None] | None = None

    def start_reading(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stdout = self.child.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            message = json.loads(line)
            if "result" in message:
                self.result = message["result"]
            await self.messages.put(message)

    async def got(self, version: int, timeout: float) -> bool:
        """Wait until every stream of this client received `version`; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.messages.get()
                    if message.get("got", 0) >= version:
                        return True
        except TimeoutError:
            return False

    async def finish(self, timeout: float) -> dict[str, Any]:
        """The client's result: after its streams ended, or after it was told to close at `timeout`."""
        assert self.reader is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.reader)
        if self.result is None:
            stdin = self.child.process.stdin
            assert stdin is not None
            stdin.write(b"close\n")
            await stdin.drain()
            async with asyncio.timeout(30):
                await self.reader
        assert self.result is not None, self.child.log_tail()
        return self.result


async def _start_clients(
    ctx: RunContext, name: str, target: str, job_ids: Sequence[str], streams: int, started: list[Child]
) -> list[_Client]:
    """Watcher processes for `streams` streams over `job_ids` (each process gets its share of the jobs)."""
    processes = max(1, math.ceil(streams / STREAMS_PER_PROCESS))
    launches = []
    shares: list[list[str]] = []
    for n in range(processes):
        share = streams // processes + (1 if n < streams % processes else 0)
        jobs = list(job_ids) if len(job_ids) == 1 else list(job_ids[n::processes])
        jobs_file = ctx.run_dir / f"{name}-jobs-{n}.json"
        jobs_file.write_text(json.dumps(jobs))
        shares.append(jobs)
        args = [
            "--target",
            target,
            "--jobs",
            str(jobs_file),
            "--streams",
            str(share),
            "--channels",
            str(max(1, math.ceil(share / STREAMS_PER_CHANNEL))),
            "--timeout",
            "300",
        ]
        launches.append(
            start_child(f"{name}-watchers-{n}", "bench._watchers", args, run_dir=ctx.run_dir, stdin=True)
        )
    results = await asyncio.gather(*launches, return_exceptions=True)
    clients = []
    for result in results:
        if not isinstance(result, BaseException):
            started.append(result)
    for result, jobs in zip(results, shares, strict=True):
        if isinstance(result, BaseException):
            raise result
        client = _Client(result, int(result.info["ready"]) + int(result.info["failed"]), jobs)
        client.start_reading()
        clients.append(client)
    return clients


# ---------------------------------------------------------------------------------------------- transitions


class _Driver:
    """Transitions through the service's own store in this process, each stamped when its commit returns."""

    def __init__(self, database_url: str) -> None:
        self._engine = make_engine(database_url, pool_size=8)
        self.store = SqlJobStore(self._engine)

    async def claim(self) -> tuple[Fence, str, int, float]:
        """Claim one pending job (→ PROCESSING): (fence, job id, version, commit time)."""
        claims: Sequence[Claim] = await self.store.claim(owner=_OWNER, limit=1, lease_s=3600)
        committed = time.time()
        job = claims[0].job
        return Fence(job_id=job.id, attempt=job.attempt, owner=_OWNER), str(job.id), job.version, committed

    async def retry(self, fence: Fence) -> tuple[str, int, float]:
        """PROCESSING → PENDING."""
        job = await self.store.retry_later(
            fence,
            error=JobError(code="PROVIDER_UNAVAILABLE", message="bench", retryable=True),
            at=utcnow(),
            message="bench: back to the queue",
        )
        return str(job.id), job.version, time.time()

    async def complete(self, fence: Fence) -> tuple[str, int, float]:
        """PROCESSING → COMPLETED (the streams end)."""
        job = await self.store.complete(fence, images=[], cost_usd_micros=0)
        return str(job.id), job.version, time.time()

    async def close(self) -> None:
        await self.store.close()
        await self._engine.dispose()


async def _create_jobs(target: str, count: int) -> list[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        semaphore = asyncio.Semaphore(32)

        async def one(n: int) -> str:
            async with semaphore:
                job = await stub.GenerateImage(pb.GenerateImageRequest(prompt=f"bench watch {n}"), timeout=30)
                return str(job.id)

        return list(await asyncio.gather(*(one(n) for n in range(count))))


# ---------------------------------------------------------------------------------------------- (a)


@dataclass
class _OneJob:
    latencies: list[float]
    time_to_all: list[float]
    rss_per_stream: float
    missing: int
    open_failures: int


async def _one_job_bare(ctx: RunContext, streams: int, sizes: Sizes) -> _OneJob:
    async with children() as started:
        bare = await start_child(
            f"broadcast-{streams}", "bench._baselines", ["broadcast"], run_dir=ctx.run_dir
        )
        started.append(bare)
        job_id = str(uuid.uuid4())
        rss0 = bare.rss()
        clients = await _start_clients(
            ctx, f"bare-{streams}", bare.info["grpc_target"], [job_id], streams, started
        )
        rss1 = bare.rss()
        commits: dict[int, float] = {}
        async with grpc.aio.insecure_channel(bare.info["grpc_target"]) as channel:
            stub = pb_grpc.ImageGenerationStub(channel)
            for n in range(sizes.one_job_transitions):
                last = n == sizes.one_job_transitions - 1
                trigger = (
                    stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
                    if last
                    else stub.GetJob(pb.GetJobRequest(job_id=job_id))
                )
                job = await trigger
                commits[job.version] = job.update_time.ToNanoseconds() / 1e9
                if not last:
                    await asyncio.gather(*(c.got(job.version, sizes.round_timeout_s) for c in clients))
        results = await asyncio.gather(*(c.finish(sizes.round_timeout_s) for c in clients))
    return _one_job_figures(results, commits, streams, (rss1 - rss0) / streams)


async def _one_job_real(ctx: RunContext, streams: int, sizes: Sizes) -> _OneJob:
    await ctx.reset()
    async with children() as started:
        server = await start_server(f"watch-server-{streams}", ctx, role="api")
        started.append(server)
        target = server.info["grpc_target"]
        (job_id,) = await _create_jobs(target, 1)
        driver = _Driver(ctx.database_url)
        try:
            rss0 = server.rss()
            clients = await _start_clients(ctx, f"real-{streams}", target, [job_id], streams, started)
            rss1 = server.rss()
            async with ctx.profiling(server, f"watch-a-{streams}"):
                commits = await _one_job_transitions(driver, clients, sizes)
            results = await asyncio.gather(*(c.finish(sizes.round_timeout_s) for c in clients))
        finally:
            await driver.close()
    return _one_job_figures(results, commits, streams, (rss1 - rss0) / streams)


async def _one_job_transitions(driver: _Driver, clients: Sequence[_Client], sizes: Sizes) -> dict[int, float]:
    """claim, retry, claim, …, complete; each waits until every watcher got the previous one."""
    commits: dict[int, float] = {}
    fence: Fence | None = None
    for n in range(sizes.one_job_transitions):
        if n == sizes.one_job_transitions - 1:
            assert fence is not None
            _, version, committed = await driver.complete(fence)
        elif n % 2 == 0:
            fence, _, version, committed = await driver.claim()
        else:
            assert fence is not None
            _, version, committed = await driver.retry(fence)
        commits[version] = committed
        if n < sizes.one_job_transitions - 1:
            await asyncio.gather(*(c.got(version, sizes.round_timeout_s) for c in clients))
    return commits


def _one_job_figures(
    results: Sequence[dict[str, Any]], commits: dict[int, float], streams: int, rss_per_stream: float
) -> _OneJob:
    by_version: dict[int, list[float]] = {version: [] for version in commits}
    for result in results:
        for _, version, received in result["receipts"]:
            if version in by_version:
                by_version[version].append(received - commits[version])
    latencies = [latency for values in by_version.values() for latency in values]
    time_to_all = [max(values) if len(values) == streams else math.inf for values in by_version.values()]
    missing = sum(streams - len(values) for values in by_version.values())
    return _OneJob(
        latencies, time_to_all, rss_per_stream, missing, sum(int(r["open_failures"]) for r in results)
    )


# ---------------------------------------------------------------------------------------------- (b)


@dataclass
class _ManyJobs:
    latencies: list[float]
    #: latencies by job version: 2 is each job's claim (the first phase), 3 its completion (the second)
    by_version: dict[int, list[float]]
    #: (seconds since the first commit, latency) of the transitions slower than the (b) target
    slow: list[tuple[float, float]]
    lost: int
    rss_per_stream: float
    errors: dict[str, int]


async def _paced(rate: float, count: int, action: Any) -> list[Any]:
    """Start `action(n)` for n in range(count) at a steady `rate`; the results, in order."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for n in range(count):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not waiting for state
        tasks.append(asyncio.create_task(action(n)))
    return list(await asyncio.gather(*tasks))


async def _many_jobs_bare(ctx: RunContext, sizes: Sizes) -> _ManyJobs:
    async with children() as started:
        bare = await start_child("broadcast-many", "bench._baselines", ["broadcast"], run_dir=ctx.run_dir)
        started.append(bare)
        job_ids = [str(uuid.uuid4()) for _ in range(sizes.many_jobs)]
        rss0 = bare.rss()
        clients = await _start_clients(
            ctx, "bare-many", bare.info["grpc_target"], job_ids, len(job_ids), started
        )
        rss1 = bare.rss()
        async with grpc.aio.insecure_channel(bare.info["grpc_target"]) as channel:
            stub = pb_grpc.ImageGenerationStub(channel)

            async def transition(n: int) -> tuple[str, int, float]:
                job_id = job_ids[n % len(job_ids)]
                if n < len(job_ids):
                    job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
                else:
                    job = await stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
                return job_id, job.version, job.update_time.ToNanoseconds() / 1e9

            commits = await _paced(sizes.many_jobs_rate, 2 * len(job_ids), transition)
        results = await asyncio.gather(*(c.finish(sizes.round_timeout_s) for c in clients))
    return _many_jobs_figures(clients, results, commits, (rss1 - rss0) / len(job_ids))


async def _many_jobs_real(ctx: RunContext, sizes: Sizes) -> _ManyJobs:
    await ctx.reset()
    async with children() as started:
        server = await start_server("watch-server-many", ctx, role="api")
        started.append(server)
        target = server.info["grpc_target"]
        job_ids = await _create_jobs(target, sizes.many_jobs)
        driver = _Driver(ctx.database_url)
        try:
            rss0 = server.rss()
            clients = await _start_clients(ctx, "real-many", target, job_ids, len(job_ids), started)
            rss1 = server.rss()
            fences: list[Fence] = []

            async def transition(n: int) -> tuple[str, int, float]:
                if n < len(job_ids):
                    fence, job_id, version, committed = await driver.claim()
                    fences.append(fence)
                    return job_id, version, committed
                return await driver.complete(fences[n - len(job_ids)])

            async with ctx.profiling(server, "watch-b"):
                claims = await _paced(sizes.many_jobs_rate, len(job_ids), transition)
                completes = await _paced(
                    sizes.many_jobs_rate, len(job_ids), lambda n: transition(n + len(job_ids))
                )
            results = await asyncio.gather(*(c.finish(sizes.round_timeout_s) for c in clients))
        finally:
            await driver.close()
    return _many_jobs_figures(clients, results, claims + completes, (rss1 - rss0) / len(job_ids))


def _many_jobs_figures(
    clients: Sequence[_Client],
    results: Sequence[dict[str, Any]],
    commits: Sequence[tuple[str, int, float]],
    rss_per_stream: float,
) -> _ManyJobs:
    committed = {(job_id, version): at for job_id, version, at in commits}
    latencies: list[float] = []
    received: set[tuple[str, int]] = set()
    receipts: dict[tuple[str, int], float] = {}
    by_version: dict[int, list[float]] = {}
    errors: dict[str, int] = {}
    # one stream per job here: a stream is lost if it missed a transition or did not end OK
    lost_jobs: set[str] = set()
    for client, result in zip(clients, results, strict=True):
        for job_index, version, at in result["receipts"]:
            key = (client.job_ids[job_index], version)
            if key in committed:
                received.add(key)
                receipts[key] = at
                latencies.append(at - committed[key])
                by_version.setdefault(version, []).append(at - committed[key])
        lost_jobs.update(client.job_ids[index] for index in result["not_ended"])
        for code, count in result["errors"].items():
            errors[code] = errors.get(code, 0) + count
    lost_jobs.update(job_id for job_id, version in committed if (job_id, version) not in received)
    first = min(committed.values(), default=0.0)
    slow = sorted(
        (round(committed[key] - first, 3), round(at - committed[key], 4))
        for key, at in receipts.items()
        if at - committed[key] > _SLOW_S
    )
    return _ManyJobs(latencies, by_version, slow, len(lost_jobs), rss_per_stream, errors)


# ---------------------------------------------------------------------------------------------- run


async def run(ctx: RunContext) -> ScenarioResult:
    """(a) for each stream count, then (b); the bare baseline first each time."""
    sizes = QUICK if ctx.quick else FULL
    figures: list[Figure] = []
    details: dict[str, Any] = {"transitions_per_one_job_run": sizes.one_job_transitions}
    label = "bare grpc.aio broadcast"
    for streams in sizes.one_job_streams:
        bare = await _one_job_bare(ctx, streams, sizes)
        real = await _one_job_real(ctx, streams, sizes)
        what = f"(a) {streams:,} streams on 1 job"
        figures += [
            Figure(
                NAME,
                f"{what}: p50 commit→receipt",
                ms(percentile(real.latencies, 0.5)),
                "ms",
                baseline=ms(percentile(bare.latencies, 0.5)),
                baseline_label=label,
            ),
            Figure(
                NAME,
                f"{what}: p99 commit→receipt",
                ms(percentile(real.latencies, 0.99)),
                "ms",
                baseline=ms(percentile(bare.latencies, 0.99)),
                baseline_label=label,
            ),
            Figure(
                NAME,
                f"{what}: time to reach all",
                ms(statistics.median(real.time_to_all)),
                "ms",
                baseline=ms(statistics.median(bare.time_to_all)),
                baseline_label=label,
                target=Target("ratio_max", 1.5),
            ),
            Figure(
                NAME,
                f"{what}: RSS per open stream",
                round(real.rss_per_stream / 1024, 1),
                "KiB",
                baseline=round(bare.rss_per_stream / 1024, 1),
                baseline_label=label,
                target=Target("ratio_max", 1.5) if streams >= 10_000 else None,
            ),
        ]
        details[f"one_job_{streams}"] = {
            "service": _one_job_details(real),
            "bare": _one_job_details(bare),
        }
    bare_many = await _many_jobs_bare(ctx, sizes)
    real_many = await _many_jobs_real(ctx, sizes)
    what = f"(b) {sizes.many_jobs:,} streams on {sizes.many_jobs:,} jobs"
    figures += [
        Figure(
            NAME,
            f"{what}: p50 commit→receipt",
            ms(percentile(real_many.latencies, 0.5)),
            "ms",
            baseline=ms(percentile(bare_many.latencies, 0.5)),
            baseline_label=label,
        ),
        Figure(
            NAME,
            f"{what}: p99 commit→receipt",
            ms(percentile(real_many.latencies, 0.99)),
            "ms",
            baseline=ms(percentile(bare_many.latencies, 0.99)),
            baseline_label=label,
            target=Target("max", 25.0),
        ),
        Figure(
            NAME,
            f"{what}: streams lost",
            real_many.lost,
            "",
            baseline=bare_many.lost,
            baseline_label=label,
            target=Target("max", 0),
        ),
        Figure(
            NAME,
            f"{what}: RSS per open stream",
            round(real_many.rss_per_stream / 1024, 1),
            "KiB",
            baseline=round(bare_many.rss_per_stream / 1024, 1),
            baseline_label=label,
        ),
    ]
    details["many_jobs"] = {
        "jobs": sizes.many_jobs,
        "transitions_per_s": sizes.many_jobs_rate,
        "service": _many_jobs_details(real_many),
        "bare": _many_jobs_details(bare_many),
    }
    return ScenarioResult(figures, details)


def _one_job_details(run: _OneJob) -> dict[str, Any]:
    return {
        "p50_ms": ms(percentile(run.latencies, 0.5)),
        "p99_ms": ms(percentile(run.latencies, 0.99)),
        "max_ms": ms(max(run.latencies, default=math.nan)),
        "time_to_all_ms_per_transition": [ms(t) if math.isfinite(t) else None for t in run.time_to_all],
        "rss_per_stream_kib": round(run.rss_per_stream / 1024, 1),
        "receipts_missing": run.missing,
        "open_failures": run.open_failures,
    }


def _many_jobs_details(run: _ManyJobs) -> dict[str, Any]:
    return {
        "p50_ms": ms(percentile(run.latencies, 0.5)),
        "p99_ms": ms(percentile(run.latencies, 0.99)),
        "max_ms": ms(max(run.latencies, default=math.nan)),
        "receipts": len(run.latencies),
        "p99_ms_claims_phase": ms(percentile(run.by_version.get(2, []), 0.99)),
        "p99_ms_completions_phase": ms(percentile(run.by_version.get(3, []), 0.99)),
        "slower_than_25ms": len(run.slow),
        "slow_transitions_at_s_latency_s": run.slow[:200],
        "lost": run.lost,
        "errors": run.errors,
        "rss_per_stream_kib": round(run.rss_per_stream / 1024, 1),
    }

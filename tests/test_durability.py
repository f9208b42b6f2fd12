"""Nothing accepted is lost: replicas killed and restarted, database connections cut, idempotent retries,
and property-based inputs. Every process and address here is local (loopback) and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import running_app
from tests.conftest import test_settings
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled")


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Process:
    """A child process whose stderr goes to a file we can read while it runs."""

    process: asyncio.subprocess.Process
    log: Path

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 15.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        async with asyncio.timeout(timeout):
            return await self.process.wait()


@dataclass
class Replica(Process):
    """A `python -m server serve` process."""

    grpc_target: str = ""
    channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> pb_grpc.ImageGenerationStub:
        assert self.channel is not None
        return pb_grpc.ImageGenerationStub(self.channel)


async def _start_sandbox(tmp: Path, *, latency_s: float) -> tuple[Process, str]:
    log = tmp / "sandbox.log"
    with open(log, "wb") as stderr:  # the child keeps its own descriptor
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--latency",
            str(latency_s),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        base_url = (await process.stdout.readline()).decode().strip()
    assert base_url.startswith("http://127.0.0.1:"), base_url
    return Process(process, log), base_url


async def _start_replica(name: str, tmp: Path, env: dict[str, str]) -> Replica:
    log = tmp / f"{name}.log"
    with open(log, "wb") as stderr:  # the child keeps its own descriptor
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "serve",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    replica = Replica(process, log)

    def serving() -> bool:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and (entry := json.loads(line)).get("grpc_target"):
                replica.grpc_target = entry["grpc_target"]
                return True
        assert process.returncode is None, log.read_text()
        return False

    await eventually(serving, timeout=30, interval=0.05)
    replica.channel = grpc.aio.insecure_channel(replica.grpc_target)
    return replica


def _replica_env(database_url: str, data_dir: Path, sandbox_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEGEN_")}
    env.update(
        {
            "IMAGEGEN_DATABASE_URL": database_url,
            "IMAGEGEN_GRPC_ADDRESS": "127.0.0.1:0",
            "IMAGEGEN_HTTP_ADDRESS": "127.0.0.1:0",
            "IMAGEGEN_DATA_DIR": str(data_dir),  # shared: one blob directory and URL-signing key
            "IMAGEGEN_LOG_FORMAT": "json",
            "IMAGEGEN_LEASE_S": "3",
            "IMAGEGEN_POLL_INTERVAL_S": "0.3",
            "IMAGEGEN_RETRY_BASE_S": "0.1",
            "IMAGEGEN_RETRY_MAX_S": "0.5",
            "IMAGEGEN_MAX_ATTEMPTS": "6",
            "IMAGEGEN_SHUTDOWN_GRACE_S": "1",
            "IMAGEGEN_WORKER_CONCURRENCY": "16",
            "BFL_API_KEY": "sandbox-key",
            "IMAGEGEN_BFL_BASE_URL": sandbox_url,
        }
    )
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- watching


@dataclass
class ResumingWatcher:
    """WatchJob with the resume a client does: on a broken stream, carry on at another replica."""

    job_id: str
    replicas: list[Replica]
    versions: list[int] = field(default_factory=list)
    final_status: int = 0
    resumes: int = 0

    async def run(self) -> None:
        while True:
            live = [r for r in self.replicas if r.process.returncode is None and r.channel is not None]
            replica = random.choice(live)
            after = self.versions[-1] if self.versions else 0
            try:
                async for event in replica.stub.WatchJob(
                    pb.WatchJobRequest(job_id=self.job_id, after_version=after)
                ):
                    if event.kind == pb.JOB_EVENT_KIND_HEARTBEAT:
                        continue
                    self.versions.append(event.version)
                    self.final_status = event.job.status
                return
            except grpc.aio.AioRpcError as error:
                # a replica that is killed mid-stream may reset it (INTERNAL) rather than close it
                assert error.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL,
                ), error
                self.resumes += 1
                await asyncio.sleep(0.05)  # a client's backoff before resuming elsewhere


async def _db(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url, timeout=10)


async def _status_counts(database_url: str) -> dict[str, int]:
    connection = await _db(database_url)
    try:
        return dict(await connection.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
    finally:
        await connection.close()


# ---------------------------------------------------------------------------------------------- tests


async def test_replicas_survive_a_kill_and_a_restart_with_no_job_lost_or_paid_twice(
    database_url: str, tmp_path: Path
) -> None:
    jobs_total = 300
    sandbox, sandbox_url = await _start_sandbox(tmp_path, latency_s=0.5)
    env = _replica_env(database_url, tmp_path / "data", sandbox_url)
    replicas = [await _start_replica(f"replica{n}", tmp_path, env) for n in range(3)]
    started = time.monotonic()
    try:

        async def submit(index: int) -> str:
            replica = replicas[index % 3]
            job = await replica.stub.GenerateImage(
                pb.GenerateImageRequest(
                    prompt=f"durable job {index}", width=256, height=256, request_id=f"durable-{index}"
                ),
                timeout=30,
            )
            return job.id

        job_ids = []
        for start in range(0, jobs_total, 50):
            job_ids += await asyncio.gather(*(submit(i) for i in range(start, min(start + 50, jobs_total))))
        assert len(set(job_ids)) == jobs_total

        watchers = [ResumingWatcher(job_id, replicas) for job_id in random.sample(job_ids, 60)]
        watching = [asyncio.create_task(w.run()) for w in watchers]

        # SIGKILL one replica while it holds jobs mid-flight, once a third of the work is done
        await eventually(lambda: _completed_at_least(database_url, jobs_total // 3), timeout=60, interval=0.1)
        await replicas[0].stop(signal.SIGKILL)
        # restart another gracefully (SIGTERM hands its jobs back), then bring it back
        await eventually(lambda: _completed_at_least(database_url, jobs_total // 2), timeout=60, interval=0.1)
        await replicas[1].stop(signal.SIGTERM)
        replicas[1] = await _start_replica("replica1-again", tmp_path, env)

        await eventually(lambda: _all_terminal(database_url, jobs_total), timeout=120, interval=0.2)
        async with asyncio.timeout(30):
            await asyncio.gather(*watching)
        elapsed = time.monotonic() - started

        connection = await _db(database_url)
        try:
            counts = dict(await connection.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
            completions = await connection.fetch(
                "SELECT job_id, count(*) AS n FROM job_events WHERE status = 'completed' GROUP BY job_id"
            )
            gaps = await connection.fetch(
                "SELECT job_id FROM job_events GROUP BY job_id "
                "HAVING count(*) != max(version) OR min(version) != 1"
            )
            takeovers = await connection.fetchval(
                "SELECT count(*) FROM job_events WHERE message LIKE '%expired%'"
            )
            handed_back = await connection.fetchval(
                "SELECT count(*) FROM job_events WHERE message LIKE 'handed back%'"
            )
        finally:
            await connection.close()
        async with aiohttp.ClientSession() as http, http.get(f"{sandbox_url}/_sandbox/counters") as response:
            counters = await response.json()

        figures = {
            "jobs": jobs_total,
            "replicas": 3,
            "kills": 1,
            "restarts": 1,
            "lost": jobs_total - counts.get("completed", 0),
            "duplicate_vendor_submissions": counters.get("bfl.submit", 0) - jobs_total,
            "jobs_taken_over": takeovers,
            "jobs_handed_back": handed_back,
            "watch_resumes": sum(w.resumes for w in watchers),
            "seconds": round(elapsed, 1),
        }
        context = f"{figures} statuses={counts} sandbox={counters}"
        assert counts == {"completed": jobs_total}, context  # every job, exactly one terminal status
        assert len(completions) == jobs_total and {row["n"] for row in completions} == {1}, context
        assert gaps == [], context  # every job's history is versions 1..n without a hole
        # One paid vendor task per variant, but for the window README names: a SIGKILL between BFL
        # accepting a task and the commit of its id (a millisecond or so) makes the taker-over pay again,
        # for every task in it. Jobs claimed together submit together, so one kill has caught two (1 run
        # in 7 when checkpoints lingered for company). Takeovers that did not resume their saved tasks
        # would pay again for nearly every job taken over.
        duplicates = counters["bfl.submit"] - jobs_total
        assert 0 <= duplicates <= max(1, takeovers // 2), context
        assert takeovers > 0, context  # the kill really left jobs mid-flight for others to take over
        for watcher in watchers:
            assert watcher.final_status == pb.JOB_STATUS_COMPLETED, (watcher, context)
            assert watcher.versions == list(range(watcher.versions[0], watcher.versions[-1] + 1)), watcher
        print("durability figures:", json.dumps(figures))
    finally:
        for replica in replicas:
            if replica.channel is not None:
                await replica.channel.close()
            if replica.process.returncode is None:
                await replica.stop(signal.SIGKILL)
        await sandbox.stop()


async def _completed_at_least(database_url: str, count: int) -> bool:
    return (await _status_counts(database_url)).get("completed", 0) >= count


async def _all_terminal(database_url: str, count: int) -> bool:
    counts = await _status_counts(database_url)
    return sum(counts.get(status, 0) for status in TERMINAL) >= count


async def test_cut_database_connections_lose_no_acknowledged_job(database_url: str, tmp_path: Path) -> None:
    settings = test_settings(tmp_path, database_url, sandbox_latency_s=0.2, lease_s=2.0, db_timeout_s=3.0)
    acknowledged: list[str] = []
    refused = 0
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)

        async def submitter(worker: int) -> None:
            nonlocal refused
            for index in range(25):
                try:
                    job = await stub.GenerateImage(
                        pb.GenerateImageRequest(
                            prompt=f"cut {worker}-{index}",
                            width=256,
                            height=256,
                            request_id=f"cut-{worker}-{index}",
                        ),
                        timeout=10,
                    )
                    acknowledged.append(job.id)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # never UNKNOWN or a hang
                    refused += 1

        async def cutter() -> int:
            cuts = 0
            admin = await _db(database_url)
            try:
                for _ in range(4):
                    await asyncio.sleep(0.3)  # spread the cuts over the run
                    cuts += await admin.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = 'imagegen'"
                    )
            finally:
                await admin.close()
            return cuts

        results = await asyncio.gather(*(submitter(n) for n in range(4)), cutter())
        cuts = results[-1]
        assert cuts > 0
        await eventually(lambda: _all_terminal_of(database_url, acknowledged), timeout=60, interval=0.2)
        connection = await _db(database_url)
        try:
            rows = await connection.fetch("SELECT id::text, status FROM jobs")
        finally:
            await connection.close()
        statuses = {row["id"]: row["status"] for row in rows}
        assert set(acknowledged) <= set(statuses)  # nothing acknowledged is missing
        assert {statuses[job_id] for job_id in acknowledged} == {"completed"}
        print(
            "database cuts:",
            json.dumps(
                {
                    "backends_terminated": cuts,
                    "acknowledged": len(acknowledged),
                    "refused_unavailable": refused,
                    "lost": 0,
                }
            ),
        )
        await eventually(lambda: app.readiness.ready, timeout=10)


async def _all_terminal_of(database_url: str, job_ids: list[str]) -> bool:
    connection = await _db(database_url)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])",
            job_ids,
            list(TERMINAL),
        )
    finally:
        await connection.close()
    return count == len(job_ids)


@pytest.fixture
async def api_only(
    tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[pb_grpc.ImageGenerationStub, str]]:
    """An API server without workers: jobs stay as GenerateImage wrote them."""
    async with (
        running_app(test_settings(tmp_path, database_url, role="api", max_pending_jobs_per_account=0)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        yield pb_grpc.ImageGenerationStub(channel), database_url


async def test_concurrent_retries_across_replicas_create_one_job(tmp_path: Path, database_url: str) -> None:
    async with (
        running_app(test_settings(tmp_path / "a", database_url, role="api")) as first,
        running_app(test_settings(tmp_path / "b", database_url, role="api")) as second,
        grpc.aio.insecure_channel(first.grpc_target) as one,
        grpc.aio.insecure_channel(second.grpc_target) as two,
    ):
        stubs = [pb_grpc.ImageGenerationStub(one), pb_grpc.ImageGenerationStub(two)]
        request = pb.GenerateImageRequest(prompt="retried submit", request_id=str(uuid.uuid4()))
        jobs = await asyncio.gather(*(stubs[n % 2].GenerateImage(request) for n in range(40)))
        assert len({job.id for job in jobs}) == 1
        assert (await _status_counts(database_url)) == {"pending": 1}


_PROVIDERS = st.sampled_from(
    ["", "flux_2_pro", "gpt_image_1_5", "seedream_4", "nano_banana", "bogus", "FLUX_2_PRO"]
)
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateImageRequest:
    """GenerateImage requests, valid and not, near and across every limit."""
    request = pb.GenerateImageRequest(
        prompt=draw(st.one_of(_TEXT, st.just(""), st.just(" " * 5), st.text(min_size=1990, max_size=2010))),
        provider=draw(_PROVIDERS),
        width=draw(st.one_of(st.integers(-5, 3000), st.sampled_from([0, 255, 256, 1080, 2048, 2049]))),
        height=draw(st.one_of(st.integers(-5, 3000), st.sampled_from([0, 255, 256, 1920, 2048, 2049]))),
        num_variants=draw(st.integers(-1, 6)),
        folder_id=draw(
            st.one_of(
                st.just(""), st.just("root"), st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True), _TEXT
            )
        ),
        negative_prompt=draw(st.one_of(st.just(""), _TEXT)),
        output_format=draw(st.integers(0, 5)),
        reference_image_urls=draw(
            st.lists(st.one_of(st.just("https://img.example/a.png"), _TEXT), max_size=3)
        ),
        request_id=draw(st.one_of(st.just(""), st.from_regex(r"[!-~]{1,20}", fullmatch=True), _TEXT)),
        labels=draw(
            st.dictionaries(
                st.one_of(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), _TEXT), _TEXT, max_size=3
            )
        ),
    )
    if draw(st.booleans()):
        request.seed = draw(st.integers(-(2**40), 2**40))
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=generate_requests())
async def test_every_request_makes_one_valid_job_or_a_precise_error_and_nothing_else(
    api_only: tuple[pb_grpc.ImageGenerationStub, str], request: pb.GenerateImageRequest
) -> None:
    stub, database_url = api_only
    before = await _row_counts(database_url)
    try:
        job = await stub.GenerateImage(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.ALREADY_EXISTS,
        ), error
        assert "Traceback" not in (error.details() or "")
        assert await _row_counts(database_url) == before  # nothing half-written
        return
    after = await _row_counts(database_url)
    reused = request.request_id and after == before  # a request_id drawn twice returns the first job
    assert reused or after == (before[0] + 1, before[1] + 1)
    assert job.status == pb.JOB_STATUS_PENDING and uuid.UUID(job.id)
    assert 1 <= len(job.prompt) <= 2000 and job.prompt == job.prompt.strip()
    assert 256 <= job.width <= 2048 and 256 <= job.height <= 2048 and 1 <= job.num_variants <= 4
    assert job.provider == (request.provider or "flux_2_pro")
    assert job.estimated_cost_usd_micros > 0


async def _row_counts(database_url: str) -> tuple[int, int]:
    connection = await _db(database_url)
    try:
        return (
            await connection.fetchval("SELECT count(*) FROM jobs"),
            await connection.fetchval("SELECT count(*) FROM job_events"),
        )
    finally:
        await connection.close()

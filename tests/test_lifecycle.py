"""Jobs through their whole lifecycle on the BFL sandbox: watch order, resume, cancel, failures, restarts."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from server.metrics import ServiceMetrics
from server.worker import Worker, WorkerPolicy
from storage.blobs import LocalBlobStore
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobSpec, JobStatus, NewJob
from tests.conftest import authed_channel, test_settings
from tests.helpers import events_until_end, eventually, finished, first_event_with_status, next_event

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = (
    pb.JOB_STATUS_PENDING,
    pb.JOB_STATUS_PROCESSING,
    pb.JOB_STATUS_COMPLETED,
    pb.JOB_STATUS_FAILED,
    pb.JOB_STATUS_CANCELLED,
)


async def test_job_completes_with_images_of_exactly_the_requested_size(stub, app: App) -> None:
    job = await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="a product shot of headphones",
            width=1080,
            height=1920,
            num_variants=2,
            folder_id="reels",
            output_format=pb.OUTPUT_FORMAT_JPEG,
            seed=40,
        )
    )
    events = await events_until_end(stub, job.id)

    assert [e.kind for e in events] == [pb.JOB_EVENT_KIND_SNAPSHOT] + [pb.JOB_EVENT_KIND_TRANSITION] * (
        len(events) - 1
    )
    statuses = [e.job.status for e in events]
    assert statuses[-1] == COMPLETED
    assert PROCESSING in statuses or events[0].job.status != PENDING
    versions = [e.version for e in events]
    assert versions == list(range(versions[0], versions[0] + len(versions)))  # no gaps, no duplicates

    done = events[-1].job
    assert len(done.images) == 2 and list(done.result_urls) == [image.url for image in done.images]
    assert done.cost_usd_micros == 2 * 45_000  # the sandbox's BFL `cost`: 1088x1920 is 2 MP, 4.5 credits
    assert done.cost_cents == 9
    assert done.HasField("start_time") and done.HasField("end_time")
    async with aiohttp.ClientSession() as http:
        for index, image in enumerate(done.images):
            assert (image.width, image.height) == (1080, 1920)
            assert (image.native_width, image.native_height) == (1088, 1920)
            assert image.seed == 40 + index
            assert f"/default/reels/{done.id}/1/{index}.jpg" in image.url  # attempt 1
            async with http.get(image.url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/jpeg"
                body = await response.read()
            assert len(body) == image.size_bytes
            decoded = Image.open(io.BytesIO(body))
            assert decoded.format == "JPEG" and decoded.size == (1080, 1920)
            # the stored file sits where DESIGN.md says, under the account and folder (and the attempt)
            assert (
                app.settings.data_dir / "blobs" / "default" / "reels" / done.id / "1" / f"{index}.jpg"
            ).is_file()

    fetched = await stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert fetched.status == COMPLETED and fetched.version == done.version


async def test_watch_resumes_after_a_version_without_gaps_or_repeats(stub) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a harbour at dawn", width=256, height=256))
    full = await events_until_end(stub, job.id)
    history = [(e.version, e.job.status) for e in full[1:]]

    resumed = await events_until_end(stub, job.id, after_version=1)
    assert [e.kind for e in resumed] == [pb.JOB_EVENT_KIND_TRANSITION] * len(resumed)
    assert [e.version for e in resumed] == list(range(2, full[-1].version + 1))
    assert resumed[0].previous_status == PENDING and resumed[0].job.status == PROCESSING
    assert resumed[-1].job.status == COMPLETED
    # each replayed event carries the job as it was at that version
    assert [(e.version, e.job.status) for e in resumed if e.version > full[0].version] == history

    caught_up = await events_until_end(stub, job.id, after_version=full[-1].version)
    assert caught_up == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events_until_end(stub, job.id, after_version=full[-1].version + 5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_of_unknown_or_foreign_job_is_not_found(secured_stub) -> None:
    job = await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="x", width=256, height=256))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events_until_end(secured_stub, job.id, metadata=(("x-account-id", "someone-else"),))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_idle_watch_gets_heartbeats_and_leaves_nothing_behind(
    tmp_path: Path, database_url: str
) -> None:
    settings = test_settings(tmp_path, database_url, watch_heartbeat_s=0.1)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="slow [sandbox:slow=30]", width=256, height=256)
        )
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
        await first_event_with_status(stream, PROCESSING)
        async with asyncio.timeout(5):
            heartbeat = await next_event(stream)
        assert heartbeat.kind == pb.JOB_EVENT_KIND_HEARTBEAT
        assert heartbeat.job.status == PROCESSING and heartbeat.version == heartbeat.job.version
        assert app.hub.open_subscriptions == 1

        stream.cancel()  # the client goes away
        await eventually(lambda: app.hub.open_subscriptions == 0)
        assert app.registry.get_sample_value("imagegen_watch_streams", {"method": "WatchJob"}) == 0
        await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))


async def test_cancel_pending_is_immediate_and_idempotent(tmp_path: Path, database_url: str) -> None:
    # an API-only server has no worker, so the job stays pending
    async with (
        running_app(test_settings(tmp_path, database_url, role="api", secured=True)) as app,
        authed_channel(app.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat"))
        cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        assert cancelled.status == CANCELLED and cancelled.cost_cents == 0 and cancelled.HasField("end_time")
        again = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        assert again.status == CANCELLED and again.version == cancelled.version

        events = await events_until_end(stub, job.id, after_version=1)
        assert [(e.previous_status, e.job.status) for e in events] == [(PENDING, CANCELLED)]
        assert events[0].message == "cancelled by the caller"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=(("x-account-id", "other"),))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_processing_discards_the_result(stub, app: App) -> None:
    job = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="big scene [sandbox:slow=30]", width=256, height=256)
    )
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
    await first_event_with_status(stream, PROCESSING)

    cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert cancelled.status == CANCELLED
    last = await first_event_with_status(stream, CANCELLED)
    assert last.previous_status == PROCESSING
    async with asyncio.timeout(5):
        assert await stream.read() is grpc.aio.EOF

    worker = app.worker
    assert worker is not None
    await eventually(lambda: worker.in_flight == 0)  # the worker noticed and let go
    final = await stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.status == CANCELLED and list(final.images) == [] and final.cost_usd_micros == 0
    stored = app.settings.data_dir / "blobs" / "default" / "root" / job.id
    assert not [path for path in stored.rglob("*") if path.is_file()]


async def test_cancel_finished_job_is_a_failed_precondition(stub) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", width=256, height=256))
    assert (await finished(stub, job.id)).status == COMPLETED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "completed" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("tag", "code", "retryable"),
    [
        ("[sandbox:moderated]", "CONTENT_MODERATED", False),
        ("[sandbox:moderated-output]", "CONTENT_MODERATED", False),
        ("[sandbox:no-image]", "INVALID_PROVIDER_RESPONSE", False),
        ("[sandbox:down]", "PROVIDER_UNAVAILABLE", True),
    ],
)
async def test_provider_failures_end_the_job_failed_and_free(stub, tag, code, retryable) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt=f"a scene {tag}", width=256, height=256))
    events = await events_until_end(stub, job.id)
    failed = events[-1].job
    assert failed.status == FAILED
    assert failed.error.code == code and failed.error.retryable is retryable and failed.error.message
    assert failed.cost_cents == 0 and failed.cost_usd_micros == 0 and list(failed.images) == []
    attempts = failed.attempt
    if code == "CONTENT_MODERATED":
        assert attempts == 1  # never retried
        assert "moderat" in failed.error.message.lower()
    if code == "PROVIDER_UNAVAILABLE":
        assert attempts == 4  # max_attempts
        retries = [e for e in events if e.job.status == PENDING and e.previous_status == PROCESSING]
        assert len(retries) == 3
        assert "attempt 2 of 4" in retries[0].message


@pytest.mark.parametrize("tag", ["[sandbox:rate-limited]", "[sandbox:server-error]", "[sandbox:disconnect]"])
async def test_transient_failures_are_retried_to_completion(stub, tag) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt=f"poster {tag}", width=256, height=256))
    events = await events_until_end(stub, job.id)
    assert events[-1].job.status == COMPLETED
    assert events[-1].job.attempt == 2
    retry = next(e for e in events if e.job.status == PENDING and e.previous_status == PROCESSING)
    assert retry.message.startswith("retrying in") and "(attempt 2 of 4)" in retry.message
    assert retry.job.error.code == "PROVIDER_UNAVAILABLE"


async def test_job_deadline_fails_the_job_at_no_cost(tmp_path: Path, database_url: str) -> None:
    async with (
        running_app(test_settings(tmp_path, database_url, job_deadline_s=1.0)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="slow [sandbox:slow=30]", width=256, height=256)
        )
        failed = await finished(stub, job.id, timeout=10)
        assert failed.status == FAILED and failed.error.code == "DEADLINE_EXCEEDED" and failed.cost_cents == 0


async def test_pending_job_survives_a_restart(tmp_path: Path, database_url: str) -> None:
    async with (
        running_app(test_settings(tmp_path, database_url, role="api")) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        job = await pb_grpc.ImageGenerationStub(channel).GenerateImage(
            pb.GenerateImageRequest(prompt="kept across restarts", width=256, height=256)
        )
        assert job.status == PENDING

    async with (
        running_app(test_settings(tmp_path, database_url)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        done = await finished(pb_grpc.ImageGenerationStub(channel), job.id)
        assert done.status == COMPLETED and len(done.images) == 1


async def test_shutdown_ends_watch_streams_unavailable_and_hands_jobs_back(
    tmp_path: Path, database_url: str
) -> None:
    settings = test_settings(tmp_path, database_url, shutdown_grace_s=0.2)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="long [sandbox:slow=60]", width=256, height=256)
        )
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
        await first_event_with_status(stream, PROCESSING)
        stopping = asyncio.create_task(app_stop(app))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):
                while await stream.read() is not grpc.aio.EOF:
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping

    # The job went back to the queue (not lost, not stuck in PROCESSING), and the vendor task id was
    # kept, so the next worker resumes polling the same task.
    async with (
        running_app(test_settings(tmp_path, database_url, role="api")) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        job = await pb_grpc.ImageGenerationStub(channel).GetJob(pb.GetJobRequest(job_id=job.id))
        assert job.status == PENDING
        stored = await app.store.get("default", uuid.UUID(job.id))
        assert stored.provider_state and stored.provider_state["tasks"][0]["id"]


class _JobsLock(threading.Thread):
    """Holds `LOCK TABLE jobs` in a transaction of its own, on its own thread and event loop; once told
    to let go, commits and waits until `job_id` is PROCESSING (a claim blocked on the lock committed)."""

    def __init__(self, database_url: str, job_id: uuid.UUID) -> None:
        super().__init__(daemon=True)
        self._url, self._job_id = database_url, job_id
        self.locked, self.release = threading.Event(), threading.Event()
        self.claimed = False

    def run(self) -> None:
        asyncio.run(self._hold())

    async def _hold(self) -> None:
        connection = await asyncpg.connect(self._url, timeout=10)
        try:
            transaction = connection.transaction()
            await transaction.start()
            await connection.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")  # a claim's FOR UPDATE waits
            self.locked.set()
            await asyncio.to_thread(self.release.wait, 10)
            await transaction.commit()
            async with asyncio.timeout(10):
                while not self.claimed:
                    status = await connection.fetchval("SELECT status FROM jobs WHERE id = $1", self._job_id)
                    self.claimed = status == JobStatus.PROCESSING.value
        finally:
            await connection.close()


async def test_stop_hands_back_what_a_claim_in_flight_took(tmp_path: Path, database_url: str) -> None:
    """A stop that begins after a claim committed in the database, before its answer reached the worker."""
    engine, worker_engine = make_engine(database_url), make_engine(database_url, pool_size=1)
    store, worker_store = SqlJobStore(engine), SqlJobStore(worker_engine)
    worker = Worker(
        worker_store,
        LocalBlobStore(tmp_path / "blobs"),
        {},  # nothing may run: a claim that lands once the worker is stopping is handed back unrun
        ServiceMetrics(CollectorRegistry()),
        policy=WorkerPolicy(poll_interval_s=60.0),
        owner="stopping-worker",
    )
    watcher = await asyncpg.connect(database_url, timeout=10)

    async def worker_connection(state: str, waiting_on: str | None = None) -> bool:
        return bool(
            await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query LIKE '%SKIP LOCKED%' AND state = $1"
                " AND ($2::text IS NULL OR wait_event_type = $2)",
                state,
                waiting_on,
            )
        )

    lock: _JobsLock | None = None
    try:
        # The first claim (of an empty queue) leaves the claim statement prepared on the worker's only
        # connection, so the next one is sent whole and waits on the lock inside the database.
        worker.start()
        await eventually(lambda: worker_connection("idle"))
        spec = JobSpec(
            prompt="claimed as the worker stops", provider="flux_2_pro", width=256, height=256, num_variants=1
        )
        job, _ = await store.create(
            NewJob(account_id="default", spec=spec, estimated_cost_usd_micros=1, deadline_s=300)
        )
        lock = _JobsLock(database_url, job.id)
        lock.start()
        assert await asyncio.to_thread(lock.locked.wait, 10)
        worker.wake()
        await eventually(lambda: worker_connection("active", "Lock"))
        # Blocking this loop, not awaiting, is the point: the claim commits in the database while its
        # answer waits unread in the worker's socket, and the stop below begins before it is read.
        lock.release.set()
        lock.join(timeout=15)
        assert lock.claimed
        async with asyncio.timeout(10):
            await worker.stop(grace_s=0.0)

        stored = await store.get("default", job.id)
        assert stored.status is JobStatus.PENDING and stored.lease_owner is None
        assert stored.attempt == 1  # claimed once, never run, never claimed again
        events = await store.events(job.id, after_version=0)
        assert [(e.job.status, e.message) for e in events[-2:]] == [
            (JobStatus.PROCESSING, "started (attempt 1)"),
            (JobStatus.PENDING, "handed back: worker shutting down"),
        ]
        assert worker.in_flight == 0
    finally:
        if lock is not None:
            lock.release.set()
        await watcher.close()
        for closing in (worker_store, store):
            await closing.close()
        for disposing in (worker_engine, engine):
            await disposing.dispose()


async def app_stop(app: App) -> None:
    """What SIGTERM does: the shutdown sequence of running_app, triggered from outside."""
    await app.readiness.shutting_down()
    await app.hub.close()

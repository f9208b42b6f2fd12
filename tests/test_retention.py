"""Deletion and retention: DeleteJob, per-request ttl, the server's retention, and the sweeper shared by
replicas through the database, on both blob stores."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app, s3_options
from server.settings import Settings
from storage.blobs import BlobStore, LocalBlobStore, attempt_prefix, image_key, open_blob_store
from storage.db import make_engine
from storage.errors import BlobNotFound, InvalidTransition, JobNotFound
from storage.jobs import SqlJobStore
from storage.models import JobSpec, JobStatus, NewJob, utcnow
from storage.retention import JobDeleter
from tests.conftest import test_settings
from tests.helpers import bad_fields, eventually, finished
from tests.s3_server import SeaweedS3


def _store_settings(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "file":
        return {}
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return server.settings(f"retention-{uuid.uuid4().hex[:8]}")


def _engine(app: App) -> AsyncEngine:
    assert isinstance(app.store, SqlJobStore)
    return app.store.engine


def _blobs(settings: Settings) -> BlobStore:
    return open_blob_store(settings.blob_url, s3=s3_options(settings))


@pytest.fixture(params=["file", "s3"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[App, pb_grpc.ImageGenerationAsyncStub]]:
    """The service on each blob store."""
    settings = test_settings(tmp_path, database_url, **_store_settings(request.param, request))
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield app, pb_grpc.ImageGenerationStub(channel)


async def test_delete_job_removes_its_images_row_and_events(
    served: tuple[App, pb_grpc.ImageGenerationAsyncStub],
) -> None:
    app, stub = served
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="to be deleted", num_variants=2))
    done = await finished(stub, job.id)
    assert done.status == pb.JOB_STATUS_COMPLETED and not done.HasField("expire_time")
    blobs = _blobs(app.settings)
    keys = [image_key("default", "", uuid.UUID(job.id), 1, n, "image/png") for n in range(2)]
    assert [len(await blobs.get(key)) for key in keys] == [image.size_bytes for image in done.images]

    await stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id))

    for call in (
        stub.GetJob(pb.GetJobRequest(job_id=job.id)),
        stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await call
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        async for _event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
            pass
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    for key in keys:
        with pytest.raises(BlobNotFound):
            await blobs.get(key)
    async with aiohttp.ClientSession() as http, http.get(done.images[0].url) as response:
        assert response.status == 404
    assert app.registry.get_sample_value("imagegen_jobs_deleted_total", {"reason": "requested"}) == 1


async def test_a_running_job_cannot_be_deleted_until_it_is_cancelled(
    tmp_path: Path, database_url: str
) -> None:
    settings = test_settings(tmp_path, database_url, sandbox_latency_s=30.0)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="still drawing"))
        await eventually(lambda: _status(stub, job.id, pb.JOB_STATUS_PROCESSING), timeout=10, interval=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel it first" in (refused.value.details() or "")
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job.id))).status == pb.JOB_STATUS_PROCESSING

        await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        await stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetJob(pb.GetJobRequest(job_id=job.id))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert app.registry.get_sample_value("imagegen_jobs_deleted_total", {"reason": "requested"}) == 1


async def _status(stub: pb_grpc.ImageGenerationAsyncStub, job_id: str, status: int) -> bool:
    return bool((await stub.GetJob(pb.GetJobRequest(job_id=job_id))).status == status)


async def test_ttl_sets_expire_time_and_the_sweeper_deletes_the_job_once_it_has_passed(
    served: tuple[App, pb_grpc.ImageGenerationAsyncStub],
) -> None:
    app, stub = served
    kept = await stub.GenerateImage(pb.GenerateImageRequest(prompt="kept"))
    job = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="short-lived", ttl=duration_pb2.Duration(seconds=600))
    )
    assert job.expire_time.ToDatetime() - job.create_time.ToDatetime() == timedelta(seconds=600)
    done = await finished(stub, job.id)
    assert done.expire_time == job.expire_time
    await finished(stub, kept.id)
    blobs = _blobs(app.settings)
    deleter = JobDeleter(_engine(app), blobs)

    assert await deleter.sweep() == []  # not yet expired
    assert await deleter.sweep(now=utcnow() + timedelta(seconds=601)) == [uuid.UUID(job.id)]
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(BlobNotFound):
        await blobs.get(image_key("default", "", uuid.UUID(job.id), 1, 0, "image/png"))
    # the job without a ttl, on a server keeping jobs forever, stays
    assert (await stub.GetJob(pb.GetJobRequest(job_id=kept.id))).status == pb.JOB_STATUS_COMPLETED
    assert await deleter.sweep(now=utcnow() + timedelta(days=3650)) == []


@pytest.mark.parametrize(
    ("ttl", "problem"),
    [
        (duration_pb2.Duration(seconds=0), "positive"),
        (duration_pb2.Duration(seconds=-5), "positive"),
        (duration_pb2.Duration(seconds=3651 * 86_400), "at most 3650 days"),
        (duration_pb2.Duration(seconds=1, nanos=-5), "valid"),
    ],
)
async def test_a_bad_ttl_is_refused_naming_the_field(stub, ttl: duration_pb2.Duration, problem: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", ttl=ttl))
    assert problem in bad_fields(refused.value)["ttl"]
    assert (await stub.ListJobs(pb.ListJobsRequest())).jobs == []  # nothing written


async def test_the_servers_retention_applies_to_requests_without_a_ttl(
    tmp_path: Path, database_url: str
) -> None:
    settings = test_settings(tmp_path, database_url, retention_days=2.0)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        default = await stub.GenerateImage(pb.GenerateImageRequest(prompt="default retention"))
        own = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="own ttl", ttl=duration_pb2.Duration(seconds=3600))
        )
        quote = await stub.GenerateImage(pb.GenerateImageRequest(prompt="quote", validate_only=True))
        for job, ttl in ((default, timedelta(days=2)), (own, timedelta(hours=1))):
            assert job.expire_time.ToDatetime() - job.create_time.ToDatetime() == ttl
        assert quote.HasField("expire_time")
        assert app.registry.get_sample_value("imagegen_jobs_deleted_total", {"reason": "expired"}) == 0


async def test_the_sweeper_never_deletes_a_running_jobs_images(tmp_path: Path, database_url: str) -> None:
    settings = test_settings(tmp_path, database_url, sandbox_latency_s=30.0)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="slow and short-lived", ttl=duration_pb2.Duration(seconds=1))
        )
        await eventually(lambda: _status(stub, job.id, pb.JOB_STATUS_PROCESSING), timeout=10, interval=0.05)
        blobs = LocalBlobStore(app.settings.data_dir / "blobs")
        # what an attempt would have written so far
        written = image_key("default", "", uuid.UUID(job.id), 1, 0, "image/png")
        await blobs.put(written, b"half-way")
        deleter = JobDeleter(_engine(app), blobs)

        assert await deleter.sweep(now=utcnow() + timedelta(hours=1)) == []
        assert await blobs.get(written) == b"half-way"
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job.id))).status == pb.JOB_STATUS_PROCESSING

        await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        assert await deleter.sweep(now=utcnow() + timedelta(hours=1)) == [uuid.UUID(job.id)]
        with pytest.raises(BlobNotFound):
            await blobs.get(written)


class _CountingBlobs(LocalBlobStore):
    """A file store that counts each prefix deleted (and is slow at it, so sweepers overlap)."""

    def __init__(self, root: Path, deleted: Counter[str]) -> None:
        super().__init__(root)
        self._deleted = deleted

    async def delete_prefix(self, prefix: str) -> None:
        self._deleted[prefix] += 1
        await asyncio.sleep(0.01)  # stands for a store round trip, so the sweeps interleave
        await super().delete_prefix(prefix)


async def test_replicas_sweeping_together_delete_each_expired_job_once(
    tmp_path: Path, database_url: str
) -> None:
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    try:
        spec = JobSpec(prompt="expired", provider="flux_2_pro", width=256, height=256, num_variants=1)
        created = [
            (
                await store.create(
                    NewJob(account_id="acme", spec=spec, estimated_cost_usd_micros=0, expire_after_s=60)
                )
            )[0]
            for _ in range(40)
        ]
        for job in created[:36]:
            await store.cancel("acme", job.id)
        running = created[36:]  # still pending: never swept
        deleted: Counter[str] = Counter()
        blobs = _CountingBlobs(tmp_path / "blobs", deleted)
        for job in created:
            await blobs.put(image_key("acme", "", job.id, 1, 0, "image/png"), b"x")
        later = utcnow() + timedelta(hours=1)
        engines = [make_engine(database_url) for _ in range(3)]  # three replicas
        sweepers = [JobDeleter(replica, blobs, batch=5) for replica in engines]

        async def sweep_all(deleter: JobDeleter) -> list[uuid.UUID]:
            swept: list[uuid.UUID] = []
            while batch := await deleter.sweep(now=later):
                swept += batch
            return swept

        results = await asyncio.gather(*(sweep_all(deleter) for deleter in sweepers))
        everything = [job_id for result in results for job_id in result]
        assert sorted(everything) == sorted(job.id for job in created[:36])  # each once, by one sweeper
        assert sum(1 for result in results if result) >= 2  # the work really was shared
        assert set(deleted.values()) == {1}
        assert all(f"acme/root/{job.id}" not in deleted for job in running)
        for job in running:
            assert (await store.get("acme", job.id)).status is JobStatus.PENDING
            assert await blobs.get(attempt_prefix("acme", "", job.id, 1) + "/0.png") == b"x"
        for replica in engines:
            await replica.dispose()
    finally:
        await store.close()
        await engine.dispose()


async def test_the_background_sweeper_deletes_expired_jobs(tmp_path: Path, database_url: str) -> None:
    settings = test_settings(tmp_path, database_url, sweep_interval_s=0.2)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a second", ttl=duration_pb2.Duration(seconds=1))
        )
        assert (await finished(stub, job.id)).status == pb.JOB_STATUS_COMPLETED

        async def gone() -> bool:
            try:
                await stub.GetJob(pb.GetJobRequest(job_id=job.id))
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.NOT_FOUND
            return False

        await eventually(gone, timeout=10, interval=0.1)  # expiry is a time: there is no event to await
        assert not (app.settings.data_dir / "blobs" / "default" / "root" / job.id).exists()
        assert app.registry.get_sample_value("imagegen_jobs_deleted_total", {"reason": "expired"}) == 1


@pytest.fixture
def job_store(store_on_each_database: SqlJobStore) -> SqlJobStore:
    return store_on_each_database


async def test_deleting_and_sweeping_on_each_database(job_store: SqlJobStore, tmp_path: Path) -> None:
    spec = JobSpec(prompt="kept a while", provider="flux_2_pro", width=256, height=256, num_variants=1)
    expiring, _ = await job_store.create(
        NewJob(account_id="acme", spec=spec, estimated_cost_usd_micros=0, expire_after_s=60)
    )
    forever, _ = await job_store.create(NewJob(account_id="acme", spec=spec, estimated_cost_usd_micros=0))
    assert expiring.expire_time == expiring.create_time + timedelta(seconds=60)
    assert forever.expire_time is None
    assert (await job_store.get("acme", expiring.id)).expire_time == expiring.expire_time
    events = await job_store.events(expiring.id, after_version=0)
    assert events[0].job.expire_time == expiring.expire_time  # the snapshot a watcher replays
    blobs = LocalBlobStore(tmp_path / "blobs")
    deleter = JobDeleter(job_store.engine, blobs)
    later = utcnow() + timedelta(hours=1)

    with pytest.raises(InvalidTransition):  # pending: not deleted, by request or by expiry
        await deleter.delete("acme", expiring.id)
    assert await deleter.sweep(now=later) == []
    with pytest.raises(JobNotFound):  # another account's job
        await deleter.delete("globex", forever.id)

    for job in (expiring, forever):
        await job_store.cancel("acme", job.id)
        await blobs.put(image_key("acme", "", job.id, 1, 0, "image/png"), b"x")
    assert await deleter.sweep(now=later) == [expiring.id]
    await deleter.delete("acme", forever.id)
    for job in (expiring, forever):
        with pytest.raises(JobNotFound):
            await job_store.get("acme", job.id)
        assert await job_store.events(job.id, after_version=0) == []
        assert not (tmp_path / "blobs" / "acme" / "root" / str(job.id)).exists()

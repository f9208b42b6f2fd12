"""The service on an S3 store (SeaweedFS): presigned URLs, an outage the worker rides out without paying
the vendor again, a store down past the deadline, and readiness."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import running_app
from storage.blobs import S3BlobStore
from tests.conftest import test_settings
from tests.helpers import eventually, finished
from tests.s3_server import BUCKET, SeaweedS3


@pytest.fixture
def own_s3_server() -> Iterator[SeaweedS3]:
    """An S3 server of this test's own, which it may kill and restart."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def test_images_land_in_s3_and_urls_are_presigned_for_the_public_endpoint(
    tmp_path: Path, database_url: str, s3_server: SeaweedS3
) -> None:
    prefix = f"svc-{uuid.uuid4().hex[:8]}"
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")
    settings = test_settings(
        tmp_path, database_url, **s3_server.settings(prefix), s3_public_endpoint=public, url_ttl_s=120.0
    )
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a lighthouse", num_variants=2))
        done = await finished(stub, job.id)
        assert done.status == pb.JOB_STATUS_COMPLETED, done.error

        fetched = await stub.GetJob(pb.GetJobRequest(job_id=job.id))
        store = S3BlobStore(BUCKET, prefix, s3_server.options())
        async with aiohttp.ClientSession() as http:
            for index, image in enumerate(fetched.images):
                key = f"default/root/{job.id}/1/{index}.png"
                assert image.url.startswith(f"{public}/{BUCKET}/{prefix}/{key}?")
                assert "X-Amz-Expires=120" in image.url
                async with http.get(image.url) as response:
                    assert response.status == 200
                    body = await response.read()
                assert hashlib.sha256(body).hexdigest() == image.sha256
                assert await store.get(key) == body
        # the file store's route is not served: the images are not on this machine
        async with aiohttp.ClientSession() as http, http.get(f"{app.http_url}/files/x") as response:
            assert response.status == 404
        assert not (tmp_path / "blobs").exists()
        assert app.registry.get_sample_value(
            "imagegen_blob_bytes_total", {"store": "s3", "op": "put"}
        ) == sum(image.size_bytes for image in fetched.images)
        assert app.registry.get_sample_value("imagegen_blob_store_up") == 1


async def test_an_s3_outage_mid_run_loses_no_job_and_pays_no_vendor_twice(
    tmp_path: Path, database_url: str, own_s3_server: SeaweedS3
) -> None:
    jobs_total = 12
    settings = test_settings(
        tmp_path, database_url, **own_s3_server.settings("outage"), sandbox_latency_s=0.3, s3_timeout_s=1.0
    )
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        jobs = [
            await stub.GenerateImage(pb.GenerateImageRequest(prompt=f"outage {n}", num_variants=1))
            for n in range(jobs_total)
        ]
        own_s3_server.stop()  # the vendor calls are under way; their images will have nowhere to go

        assert app.sandbox is not None
        counters = app.sandbox.counters

        def images_held_in_memory() -> bool:
            # every job's images were downloaded from the vendor, and writes have been failing since
            errors = app.registry.get_sample_value("imagegen_blob_errors_total", {"store": "s3", "op": "put"})
            return counters["bfl.download"] == jobs_total and (errors or 0) >= jobs_total

        await eventually(images_held_in_memory, timeout=30)
        statuses = [(await stub.GetJob(pb.GetJobRequest(job_id=job.id))).status for job in jobs]
        assert statuses == [pb.JOB_STATUS_PROCESSING] * jobs_total  # none completed without its images
        own_s3_server.start()

        done = await asyncio.gather(*(finished(stub, job.id, timeout=60) for job in jobs))
        assert [job.status for job in done] == [pb.JOB_STATUS_COMPLETED] * jobs_total, [
            job.error for job in done if job.error.code
        ]
        assert [job.attempt for job in done] == [1] * jobs_total
        assert counters["bfl.submit"] == jobs_total  # no vendor call was made again
        assert counters["bfl.download"] == jobs_total
        async with aiohttp.ClientSession() as http:
            for job in done:
                async with http.get(job.images[0].url) as response:
                    assert response.status == 200
                    assert hashlib.sha256(await response.read()).hexdigest() == job.images[0].sha256


async def test_a_store_down_past_the_deadline_fails_the_job_storage_unavailable_and_free(
    tmp_path: Path, database_url: str, s3_server: SeaweedS3
) -> None:
    settings = test_settings(
        tmp_path,
        database_url,
        **{**s3_server.settings("down"), "s3_endpoint": "http://127.0.0.1:9"},  # nothing listens there
        s3_timeout_s=0.5,
        job_deadline_s=3.0,
        lease_s=1.5,
    )
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="nowhere to put it"))
        done = await finished(stub, job.id, timeout=20)
        assert done.status == pb.JOB_STATUS_FAILED
        assert done.error.code == "STORAGE_UNAVAILABLE" and done.error.retryable
        assert done.cost_usd_micros == 0 and done.cost_cents == 0
        assert app.sandbox is not None and app.sandbox.counters["bfl.submit"] == 1

        # deleting needs the store: the job stays whole until the images can go
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job.id))).status == pb.JOB_STATUS_FAILED

        assert not await app.readiness.check()
        assert "blob store" in app.readiness.reason
        assert app.registry.get_sample_value("imagegen_blob_store_up") == 0
        async with aiohttp.ClientSession() as http, http.get(f"{app.http_url}/readyz") as response:
            assert response.status == 503

"""Two machines, simulated: an API-only and a worker-only process with separate data directories (no shared
disk), one PostgreSQL and one S3 server. A job submitted to one is completed by the other, and its images
download through the URL the first one hands out."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from pathlib import Path

import aiohttp

from imagegen.v1 import imagegen_pb2 as pb
from storage.blobs import S3BlobStore
from tests.helpers import finished
from tests.s3_server import BUCKET, SeaweedS3
from tests.test_durability import _replica_env, _start_replica, _start_sandbox


async def test_a_job_submitted_to_one_machine_and_run_on_another_downloads_byte_for_byte(
    database_url: str, tmp_path: Path, s3_server: SeaweedS3
) -> None:
    prefix = f"machines-{uuid.uuid4().hex[:8]}"
    sandbox, sandbox_url = await _start_sandbox(tmp_path, latency_s=0.2)
    api_dir, worker_dir = tmp_path / "api-machine", tmp_path / "worker-machine"
    api = worker = None
    try:
        api, worker = await asyncio.gather(
            _start_replica(
                "api",
                tmp_path,
                _replica_env(
                    database_url, api_dir, sandbox_url, IMAGEGEN_ROLE="api", **s3_server.env(prefix)
                ),
            ),
            _start_replica(
                "worker",
                tmp_path,
                _replica_env(
                    database_url, worker_dir, sandbox_url, IMAGEGEN_ROLE="worker", **s3_server.env(prefix)
                ),
            ),
        )
        job = await api.stub.GenerateImage(
            pb.GenerateImageRequest(prompt="two machines", width=512, height=768, num_variants=2), timeout=10
        )
        done = await finished(api.stub, job.id, timeout=30)
        assert done.status == pb.JOB_STATUS_COMPLETED, done.error

        fetched = await api.stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10)
        store = S3BlobStore(BUCKET, prefix, s3_server.options())
        async with aiohttp.ClientSession() as http:
            for index, image in enumerate(fetched.images):
                assert image.url.startswith(f"{s3_server.endpoint}/{BUCKET}/{prefix}/default/root/{job.id}/")
                async with http.get(image.url) as response:
                    assert response.status == 200
                    body = await response.read()
                assert hashlib.sha256(body).hexdigest() == image.sha256
                assert body == await store.get(f"default/root/{job.id}/1/{index}.png")
        # neither machine kept an image on its own disk
        for directory in (api_dir, worker_dir):
            assert not (directory / "blobs").exists() or not any((directory / "blobs").rglob("*.png"))
        assert "job completed" in worker.log.read_text() and "job completed" not in api.log.read_text()
    finally:
        for replica in (api, worker):
            if replica is not None:
                if replica.channel is not None:
                    await replica.channel.close()
                if replica.process.returncode is None:
                    await replica.stop(signal.SIGTERM)
        await sandbox.stop()

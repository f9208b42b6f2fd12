"""The blob stores' shared contract, run on both: the local directory and a real S3 server (SeaweedFS).

Where images land, that writes are create-only (a fenced-out attempt can never overwrite a job's
images), that discarding an attempt leaves the others alone, which keys are refused, and what a store
that is down answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from storage.blobs import (
    BlobKeyError,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    attempt_prefix,
    image_key,
    job_prefix,
    open_blob_store,
)
from storage.errors import BlobExists, BlobNotFound, BlobStoreUnavailable
from tests.s3_server import BUCKET, SeaweedS3


@pytest.fixture(params=["file", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """Each store in turn; the S3 one under a prefix of its own in the session's server."""
    if request.param == "file":
        store: BlobStore = LocalBlobStore(tmp_path / "blobs")
    else:
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        store = S3BlobStore(BUCKET, f"contract-{uuid.uuid4().hex[:12]}", server.options())
    yield store
    await store.close()


async def test_variants_land_under_their_attempt_and_read_back(blobs: BlobStore) -> None:
    job_id = uuid.uuid4()
    keys = [image_key("acct", "", job_id, 1, index, "image/png") for index in range(4)]
    # the variants of one job arrive together, into a prefix none of them found
    await asyncio.gather(*(blobs.put(key, f"v{index}".encode()) for index, key in enumerate(keys)))

    assert keys[0] == f"acct/root/{job_id}/1/0.png"
    assert [await blobs.get(key) for key in keys] == [b"v0", b"v1", b"v2", b"v3"]
    assert await blobs.size(keys[3]) == 2

    await blobs.delete_prefix(attempt_prefix("acct", "", job_id, 1))
    for key in keys:
        with pytest.raises(BlobNotFound):
            await blobs.get(key)


@pytest.mark.parametrize("size", [5, 7 * 1024 * 1024])  # and past S3 clients' multipart threshold
async def test_writes_are_create_only(blobs: BlobStore, size: int) -> None:
    key = image_key("acct", "f1", uuid.uuid4(), 1, 0, "image/jpeg")
    first = os.urandom(size)
    await blobs.put(key, first, content_type="image/jpeg")
    with pytest.raises(BlobExists):
        await blobs.put(key, os.urandom(size), content_type="image/jpeg")
    assert await blobs.get(key) == first


async def test_an_attempt_discarding_its_images_leaves_another_attempts_alone(blobs: BlobStore) -> None:
    # attempt 1 stalled and was taken over; attempt 2 completed the job; attempt 1 then finds its lease
    # gone and discards what it wrote: the job's images must survive, unchanged
    job_id = uuid.uuid4()
    winner = image_key("acct", "f1", job_id, 2, 0, "image/jpeg")
    await blobs.put(winner, b"attempt 2")
    await blobs.put(image_key("acct", "f1", job_id, 1, 0, "image/jpeg"), b"attempt 1")
    # attempt 1 is not a prefix of attempt 10's keys
    tenth = image_key("acct", "f1", job_id, 10, 0, "image/jpeg")
    await blobs.put(tenth, b"attempt 10")
    await blobs.delete_prefix(attempt_prefix("acct", "f1", job_id, 1))
    assert await blobs.get(winner) == b"attempt 2"
    assert await blobs.get(tenth) == b"attempt 10"
    with pytest.raises(BlobNotFound):
        await blobs.get(image_key("acct", "f1", job_id, 1, 0, "image/jpeg"))

    await blobs.delete_prefix(job_prefix("acct", "f1", job_id))  # deleting the job: every attempt
    for key in (winner, tenth):
        with pytest.raises(BlobNotFound):
            await blobs.get(key)
    await blobs.delete_prefix(job_prefix("acct", "f1", job_id))  # nothing left: still fine


@pytest.mark.parametrize("key", ["../outside.png", "acct/../../x", "/etc/passwd", "acct//x.png", ""])
async def test_keys_outside_the_store_are_refused(blobs: BlobStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(BlobKeyError):
        await blobs.put(key, b"x")
    with pytest.raises(BlobKeyError):
        await blobs.delete_prefix(key)
    assert not (tmp_path / "outside.png").exists()


async def test_the_store_answers_ping(blobs: BlobStore) -> None:
    await blobs.ping()


async def test_a_store_that_is_down_says_so(tmp_path: Path, s3_server: SeaweedS3) -> None:
    unreachable = S3BlobStore(BUCKET, "x", s3_server.options(endpoint="http://127.0.0.1:9", timeout_s=1.0))
    with pytest.raises(BlobStoreUnavailable):
        await unreachable.ping()
    with pytest.raises(BlobStoreUnavailable):
        await unreachable.put("acct/root/x/1/0.png", b"x")
    wrong_secret = S3BlobStore(BUCKET, "x", s3_server.options(secret_access_key="not-the-secret"))
    with pytest.raises(BlobStoreUnavailable):
        await wrong_secret.put("acct/root/x/1/0.png", b"x")

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's directory should be")
    with pytest.raises(BlobStoreUnavailable):
        await LocalBlobStore(blocked).put("acct/root/x/1/0.png", b"x")


async def test_presigned_urls_work_for_their_host_only(s3_server: SeaweedS3) -> None:
    # the same server under another name: a URL signed for one host fails on the other (SigV4 signs Host)
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")
    store = S3BlobStore(BUCKET, f"presign-{uuid.uuid4().hex[:8]}", s3_server.options(public_endpoint=public))
    key = image_key("acct", "", uuid.uuid4(), 1, 0, "image/png")
    await store.put(key, b"\x89PNG fake", content_type="image/png")
    url = store.presign(key, 60)
    assert url.startswith(f"{public}/{BUCKET}/")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == b"\x89PNG fake"
            assert response.headers["Content-Type"] == "image/png"
        async with http.get(url.replace("localhost", "127.0.0.1")) as response:
            assert response.status == 403
        async with http.get(url.split("?")[0]) as response:  # unsigned
            assert response.status == 403


def test_blob_urls_choose_the_store(tmp_path: Path) -> None:
    local = open_blob_store(f"file://{tmp_path}/images")
    assert isinstance(local, LocalBlobStore) and local.root == (tmp_path / "images").resolve()
    s3 = open_blob_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    for bad in ("http://x/y", "file://host/path", "s3:///nobucket", "s3://b/../x"):
        with pytest.raises(ValueError):
            open_blob_store(bad)


async def test_temporary_files_a_crash_left_are_removed(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    key = image_key("acct", "", uuid.uuid4(), 1, 0, "image/png")
    await blobs.put(key, b"kept")
    stale = blobs.path(key).with_name(f".0.png.{uuid.uuid4().hex}.tmp")
    stale.write_bytes(b"half")
    fresh = blobs.path(key).with_name(f".1.png.{uuid.uuid4().hex}.tmp")
    fresh.write_bytes(b"being written")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))

    assert await blobs.remove_temporaries(older_than_s=600) == 1
    assert not stale.exists() and fresh.exists() and blobs.path(key).read_bytes() == b"kept"


def test_the_s3_server_listens_on_loopback_only(s3_server: SeaweedS3) -> None:
    listening = _listening_addresses(s3_server.pid)
    assert len(listening) >= 5, listening  # master, volume, filer, S3, admin (and their gRPC ports)
    assert all(ipaddress.ip_address(host).is_loopback for host, _port in listening), listening


def _listening_addresses(pid: int | None) -> list[tuple[str, int]]:
    """The TCP addresses process `pid` listens on, from its socket descriptors and /proc/net/tcp{,6}."""
    assert pid is not None
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
            found.append((str(ipaddress.ip_address(packed)), int(port, 16)))
    return found

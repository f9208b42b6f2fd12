"""The local blob store: where images land, atomically, and which keys it refuses."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from storage.blobs import BlobKeyError, LocalBlobStore, attempt_prefix, image_key


async def test_put_creates_the_job_directory_and_replaces_atomically(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    job_id = uuid.uuid4()
    keys = [image_key("acct", "", job_id, 1, index, "image/png") for index in range(4)]

    # the variants of one job arrive together, into a directory none of them found
    await asyncio.gather(*(blobs.put(key, f"v{index}".encode()) for index, key in enumerate(keys)))
    await blobs.put(keys[0], b"replaced")

    directory = tmp_path / "acct" / "root" / str(job_id) / "1"
    assert sorted(path.name for path in directory.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert [blobs.path(key).read_bytes() for key in keys] == [b"replaced", b"v1", b"v2", b"v3"]

    await blobs.delete_prefix(attempt_prefix("acct", "", job_id, 1))
    assert not directory.exists()


async def test_an_attempt_discarding_its_images_leaves_another_attempts_alone(tmp_path: Path) -> None:
    # attempt 1 stalled and was taken over; attempt 2 completed the job; attempt 1 then finds its lease
    # gone and discards what it wrote: the job's images must survive, unchanged
    blobs = LocalBlobStore(tmp_path)
    job_id = uuid.uuid4()
    winner = image_key("acct", "f1", job_id, 2, 0, "image/jpeg")
    await blobs.put(winner, b"attempt 2")
    await blobs.put(image_key("acct", "f1", job_id, 1, 0, "image/jpeg"), b"attempt 1")
    await blobs.delete_prefix(attempt_prefix("acct", "f1", job_id, 1))
    assert blobs.path(winner).read_bytes() == b"attempt 2"
    assert winner == f"acct/f1/{job_id}/2/0.jpg"


@pytest.mark.parametrize("key", ["../outside.png", "acct/../../x", "/etc/passwd", "acct//x.png", ""])
async def test_keys_outside_the_store_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(BlobKeyError):
        await LocalBlobStore(tmp_path / "blobs").put(key, b"x")
    assert not (tmp_path / "outside.png").exists()

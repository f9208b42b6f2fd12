"""Result images on the local file system: `{account}/{folder or root}/{job_id}/{attempt}/{n}.{ext}`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from pathlib import Path

from storage.models import ROOT_FOLDER

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class BlobKeyError(ValueError):
    """A blob key that could name a file outside the store."""


def image_key(
    account_id: str, folder_id: str, job_id: uuid.UUID, attempt: int, index: int, content_type: str
) -> str:
    """The key of variant `index` of a job's attempt `attempt`."""
    extension = _EXTENSIONS.get(content_type, "bin")
    return f"{attempt_prefix(account_id, folder_id, job_id, attempt)}/{index}.{extension}"


def attempt_prefix(account_id: str, folder_id: str, job_id: uuid.UUID, attempt: int) -> str:
    """The key prefix under which one attempt of a job keeps its images.

    Each attempt has its own: an attempt fenced out after another took the job over must neither
    overwrite the images the job completed with nor, when it discards its own, delete them.
    """
    return "/".join((account_id, folder_id or ROOT_FOLDER, str(job_id), str(attempt)))


class LocalBlobStore:
    """Blobs as files below one directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def path(self, key: str) -> Path:
        """The file of `key`; BlobKeyError for keys that are not plain relative segment paths."""
        segments = key.split("/")
        if not segments or not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
            raise BlobKeyError(f"invalid blob key {key!r}")
        return self._root.joinpath(*segments)

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing what was there."""
        await asyncio.to_thread(self._put, self.path(key), data)

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every blob under `prefix` (a job's images whose result was discarded)."""
        await asyncio.to_thread(shutil.rmtree, self.path(prefix), True)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        created = _make_directories(path.parent)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        # The job is marked completed once this returns: after a power cut the file must still be there,
        # and a rename or a new directory is durable only once the directory holding it is synced.
        for directory in dict.fromkeys([path.parent, *(made.parent for made in created)]):
            _sync_directory(directory)


def _make_directories(directory: Path) -> list[Path]:
    """Create `directory` and any missing parents; the ones this call created, outermost first."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)  # a concurrent put may make it first
    return missing[::-1]


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

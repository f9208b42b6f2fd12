"""Saving a job's images: download each signed URL, check its size and SHA-256, write it atomically."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import aiohttp
import grpc

from client._errors import ImagegenError
from imagegen.v1 import imagegen_pb2 as pb

EXTENSIONS: Final[Mapping[str, str]] = MappingProxyType(
    {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
)
#: HTTP statuses of an image URL that a freshly signed URL (GetJob) can cure
_STALE_URL: Final = frozenset({401, 403})


class DownloadError(ImagegenError):
    """An image could not be fetched or does not match its record; `.code` is UNAVAILABLE if unreachable."""

    default_code = grpc.StatusCode.DATA_LOSS


def image_path(out_dir: Path, job_id: str, number: int, content_type: str) -> Path:
    """Where variant `number` (from 1) of a job is saved: `<out_dir>/<job_id>-<number>.<ext>`.

    The job id comes from the server: it names a file only as the UUID it must be, so no answer can
    lead a download outside `out_dir` (DownloadError otherwise).
    """
    try:
        name = str(uuid.UUID(job_id))
    except ValueError:
        raise DownloadError(f"the server sent a job id that is not a UUID: {job_id[:80]!r}") from None
    ext = EXTENSIONS.get(content_type) or (mimetypes.guess_extension(content_type) or ".bin").lstrip(".")
    return out_dir / f"{name}-{int(number)}.{ext}"


async def save_images(
    job: pb.Job,
    out_dir: Path,
    *,
    session: aiohttp.ClientSession,
    refresh: Callable[[], Awaitable[pb.Job]] | None = None,
    timeout_s: float = 60.0,
) -> list[Path]:
    """Download every image of a completed job into `out_dir`, verified; `refresh` re-signs expired URLs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh: pb.Job | None = None

    async def one(index: int) -> Path:
        nonlocal fresh
        image = job.images[index]
        try:
            body, content_type = await _fetch(session, image.url, timeout_s)
        except _StaleUrl:
            if refresh is None:
                raise DownloadError(f"image {index + 1} of job {job.id}: the URL has expired") from None
            if fresh is None:
                fresh = await refresh()
            body, content_type = await _fetch(session, fresh.images[index].url, timeout_s)
        _verify(job.id, index, image, body)
        # The job's record names the encoding it stored (and the digest just matched that record); the
        # HTTP side's header is only a guess from the file name, e.g. octet-stream for .webp on some hosts.
        path = image_path(out_dir, job.id, index + 1, image.content_type or content_type)
        await asyncio.to_thread(_write_atomically, path, body)
        return path

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(index)) for index in range(len(job.images))]
    return [task.result() for task in tasks]


class _StaleUrl(Exception):
    pass


async def _fetch(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[bytes, str]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status in _STALE_URL:
                raise _StaleUrl
            if response.status != 200:
                raise DownloadError(f"GET {_without_query(url)} answered HTTP {response.status}")
            return await response.read(), response.content_type
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise DownloadError(
            f"cannot download {_without_query(url)}: {exc or type(exc).__name__}",
            code=grpc.StatusCode.UNAVAILABLE,
        ) from exc


def _verify(job_id: str, index: int, image: pb.Image, body: bytes) -> None:
    if image.size_bytes and len(body) != image.size_bytes:
        raise DownloadError(
            f"image {index + 1} of job {job_id}: got {len(body)} bytes, expected {image.size_bytes}"
        )
    if image.sha256 and hashlib.sha256(body).hexdigest() != image.sha256.lower():
        raise DownloadError(f"image {index + 1} of job {job_id}: SHA-256 does not match the job's record")


def _write_atomically(path: Path, body: bytes) -> None:
    # Never leave a truncated picture under the final name if the process dies mid-write.
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(body)
    partial.replace(path)


def _without_query(url: str) -> str:
    """URLs without their signature, for messages and logs."""
    return url.split("?", 1)[0]

"""Result images in a blob store: `{account}/{folder or root}/{job_id}/{attempt}/{n}.{ext}`.

Two stores behind one Protocol, chosen by `IMAGEGEN_BLOB_URL`: `file:///path` (a local directory, the
embedded default) and `s3://bucket/prefix` (any S3-compatible store, shared by every replica).
Both write create-only: an attempt's keys are its own, and a write never replaces what is stored, so an
attempt that was fenced out can never overwrite the images a job completed with.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store

from storage.errors import BlobExists, BlobNotFound, BlobStoreUnavailable
from storage.models import ROOT_FOLDER

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
#: what a crashed put leaves behind in a file store: `.{name}.{hex}.tmp`
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


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
    return f"{job_prefix(account_id, folder_id, job_id)}/{attempt}"


def job_prefix(account_id: str, folder_id: str, job_id: uuid.UUID) -> str:
    """The key prefix of every attempt of a job (what deleting the job removes)."""
    return "/".join((account_id, folder_id or ROOT_FOLDER, str(job_id)))


def check_key(key: str) -> list[str]:
    """The segments of `key`; BlobKeyError for keys that are not plain relative segment paths."""
    segments = key.split("/")
    if not segments or not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise BlobKeyError(f"invalid blob key {key!r}")
    return segments


class BlobStore(Protocol):
    """Where result images are kept. Every method raises BlobStoreUnavailable when the store is down."""

    #: "file" or "s3", for metrics and logs
    kind: str

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key` once it is durable; BlobExists if the key already holds a blob."""

    async def get(self, key: str) -> bytes:
        """The blob under `key`; BlobNotFound if there is none."""

    async def size(self, key: str) -> int:
        """The size of the blob under `key`; BlobNotFound if there is none."""

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every blob under `prefix` (a discarded attempt's, or a deleted job's)."""

    async def ping(self) -> None:
        """Return when the store answers; BlobStoreUnavailable otherwise."""

    async def remove_temporaries(self, older_than_s: float) -> int:
        """Remove partial writes a crash left behind, older than `older_than_s`; how many."""

    async def close(self) -> None:
        """Release connections."""


class LocalBlobStore:
    """Blobs as files below one directory; a put is atomic (temp file, then a create-only link)."""

    kind = "file"

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        """The directory holding the blobs."""
        return self._root

    def path(self, key: str) -> Path:
        """The file of `key`; BlobKeyError for keys that are not plain relative segment paths."""
        return self._root.joinpath(*check_key(key))

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key`; BlobExists if a file is already there (it is left as it was)."""
        await self._io(self._put, self.path(key), data)

    async def get(self, key: str) -> bytes:
        """The bytes of `key`."""
        data: bytes = await self._io(self.path(key).read_bytes, missing=key)
        return data

    async def size(self, key: str) -> int:
        """The size of `key`'s file."""
        stat: os.stat_result = await self._io(self.path(key).stat, missing=key)
        return stat.st_size

    async def delete_prefix(self, prefix: str) -> None:
        """Remove the directory of `prefix` and everything below it."""
        await self._io(shutil.rmtree, self.path(prefix), True)

    async def ping(self) -> None:
        """The directory exists (or can be made) and is writable."""
        await self._io(self._ping)

    async def remove_temporaries(self, older_than_s: float) -> int:
        """Delete `.name.hex.tmp` files older than `older_than_s` (a put that crashed mid-write)."""
        removed: int = await self._io(self._remove_temporaries, time.time() - older_than_s)
        return removed

    async def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    async def _io(function: Any, *args: Any, missing: str | None = None) -> Any:
        try:
            return await asyncio.to_thread(function, *args)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if missing is not None:
                raise BlobNotFound(missing) from None
            raise BlobStoreUnavailable(f"file store: {exc}") from exc
        except OSError as exc:
            # a full or read-only disk, a vanished mount: the store, not the key, is the problem
            raise BlobStoreUnavailable(f"file store: {exc}") from exc

    def _ping(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        if not os.access(self._root, os.W_OK):
            raise PermissionError(f"{self._root} is not writable")

    def _put(self, path: Path, data: bytes) -> None:
        created = _make_directories(path.parent)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            # link, unlike rename, refuses an existing name: the file store's If-None-Match: *
            os.link(temporary, path)
        except FileExistsError:
            raise BlobExists(str(path.relative_to(self._root))) from None
        finally:
            temporary.unlink(missing_ok=True)
        # The job is marked completed once this returns: after a power cut the file must still be there,
        # and a new name or directory is durable only once the directory holding it is synced.
        for directory in dict.fromkeys([path.parent, *(made.parent for made in created)]):
            _sync_directory(directory)

    def _remove_temporaries(self, before: float) -> int:
        removed = 0
        for directory, _dirs, files in os.walk(self._root):
            for name in files:
                if not _TEMPORARY.fullmatch(name):
                    continue
                path = Path(directory, name)
                try:
                    if path.stat().st_mtime < before:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass  # a put finishing now, or another sweeper
        return removed


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


@dataclass(frozen=True, kw_only=True)
class S3Options:
    """How to reach an S3-compatible store; empty credentials fall back to the standard AWS chain."""

    #: the API endpoint, for stores other than AWS (e.g. http://minio:9000); empty: AWS's own
    endpoint: str = ""
    #: the endpoint callers download from; presigned URLs are signed for this host
    public_endpoint: str = ""
    region: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    #: seconds one request may take
    timeout_s: float = 10.0


class S3BlobStore:
    """Blobs as objects in one S3 bucket under a key prefix, through obstore.

    obstore (Rust's object_store) is async without threads, retries idempotent requests, supports
    conditional puts (`If-None-Match: *`) and presigns, and pulls no botocore in.
    """

    kind = "s3"

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._options = options
        # few, quick retries: the worker retries a whole write with its own backoff, up to the job deadline
        retry = {
            "max_retries": 2,
            "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1)},
            "retry_timeout": timedelta(seconds=options.timeout_s),
        }
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=self._config(options.endpoint),
            client_options=self._client(options.endpoint, options.timeout_s),
            retry_config=retry,  # type: ignore[arg-type]
        )
        public = options.public_endpoint or options.endpoint
        # Signing is local computation, but the host is part of a SigV4 signature: sign with a store
        # configured for the endpoint callers will use.
        self._signer = (
            self._store
            if public == options.endpoint
            else S3Store(
                bucket,
                prefix=self.prefix or None,
                config=self._config(public),
                client_options=self._client(public, options.timeout_s),
            )
        )

    def _config(self, endpoint: str) -> S3Config:
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint.rstrip("/")
            # path-style: S3-compatible stores rarely have a wildcard DNS name per bucket
            config["virtual_hosted_style_request"] = False
        for key, value in (
            ("region", self._options.region),
            ("access_key_id", self._options.access_key_id),
            ("secret_access_key", self._options.secret_access_key),
            ("session_token", self._options.session_token),
        ):
            if value:
                config[key] = value
        return cast("S3Config", config)

    @staticmethod
    def _client(endpoint: str, timeout_s: float) -> ClientConfig:
        return {
            "allow_http": endpoint.startswith("http://"),
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=min(timeout_s, 5.0)),
        }

    def presign(self, key: str, ttl_s: float) -> str:
        """A GET URL for `key`, signed for the public endpoint, valid for `ttl_s`."""
        check_key(key)
        return obstore.sign(self._signer, "GET", key, timedelta(seconds=ttl_s))

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """PUT with If-None-Match: *; BlobExists when the key is taken."""
        check_key(key)
        async with self._errors(key):
            # one PUT, however large the image: it is atomic, and every S3 store honours If-None-Match on
            # it (on a multipart upload only some check it, at completion)
            await obstore.put_async(
                self._store,
                key,
                data,
                mode="create",
                attributes={"Content-Type": content_type},
                use_multipart=False,
            )

    async def get(self, key: str) -> bytes:
        """GET the object."""
        check_key(key)
        async with self._errors(key):
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())

    async def size(self, key: str) -> int:
        """HEAD the object."""
        check_key(key)
        async with self._errors(key):
            meta = await obstore.head_async(self._store, key)
            return int(meta["size"])

    async def delete_prefix(self, prefix: str) -> None:
        """List the objects under `prefix/` and delete them (in batches, as the store allows)."""
        check_key(prefix)
        async with self._errors(prefix):
            listed = await obstore.list(self._store, f"{prefix}/").collect_async()
            paths = [item["path"] for item in listed]
            if paths:
                await obstore.delete_async(self._store, paths)

    async def ping(self) -> None:
        """List at most one object: answers (even for an empty bucket) only when the store is up."""
        async with self._errors(""):
            stream = obstore.list(self._store, None, chunk_size=1)
            await anext(aiter(stream), None)

    async def remove_temporaries(self, older_than_s: float) -> int:
        """Nothing: a single PUT is atomic, a failed one leaves no object behind."""
        return 0

    async def close(self) -> None:
        """obstore closes its pool when the store is collected."""

    @staticmethod
    def _errors(key: str) -> _ObstoreErrors:
        return _ObstoreErrors(key)


class _ObstoreErrors:
    """Translates obstore's exceptions into the storage layer's, once, at this boundary."""

    def __init__(self, key: str) -> None:
        self._key = key

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        if isinstance(exc, BlobKeyError):
            return
        if isinstance(exc, AlreadyExistsError | PreconditionError | FileExistsError):
            raise BlobExists(self._key) from exc
        if isinstance(exc, NotFoundError | FileNotFoundError):
            raise BlobNotFound(self._key) from exc
        raise BlobStoreUnavailable(f"S3: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]


def open_blob_store(url: str, *, s3: S3Options | None = None) -> LocalBlobStore | S3BlobStore:
    """The store named by `url`: `file:///absolute/path` or `s3://bucket[/prefix]`."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file blob URLs name a local path (file:///path), not {url!r}")
        return LocalBlobStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"s3 blob URLs name a bucket (s3://bucket/prefix), not {url!r}")
        prefix = parts.path.strip("/")
        if prefix:
            check_key(prefix)
        return S3BlobStore(parts.netloc, prefix, s3 or S3Options())
    raise ValueError(f"blob URL must start with file:// or s3://, not {url!r}")

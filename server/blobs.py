"""The blob store as the service uses it: measured, and the image URLs it hands out.

With the file store, images are served by this service's own HTTP side under HMAC-signed `/files/…`
URLs; with S3, callers download straight from the store with presigned GET URLs, so any replica can
answer for any job's images.
"""

from __future__ import annotations

import time

from server.files import ImageUrls, UrlSigner
from server.metrics import ServiceMetrics
from storage.blobs import BlobStore, LocalBlobStore, S3BlobStore
from storage.errors import BlobStoreUnavailable


class PresignedUrls:
    """S3 presigned GET URLs, signed for the public endpoint, valid `ttl_s`."""

    def __init__(self, store: S3BlobStore, *, ttl_s: float) -> None:
        self._store, self._ttl_s = store, ttl_s

    def sign(self, blob_key: str) -> str:
        """A presigned GET of `blob_key`."""
        return self._store.presign(blob_key, self._ttl_s)


def image_urls(store: BlobStore, signer: UrlSigner, ttl_s: float) -> ImageUrls:
    """Presigned URLs for an S3 store, the service's own signed /files/ URLs for a file store."""
    inner = store.inner if isinstance(store, MeasuredBlobStore) else store
    if isinstance(inner, S3BlobStore):
        return PresignedUrls(inner, ttl_s=ttl_s)
    return signer


class MeasuredBlobStore:
    """A BlobStore that records latency, bytes and errors of every operation."""

    def __init__(self, inner: BlobStore, metrics: ServiceMetrics) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._metrics = metrics
        for op in ("put", "get", "delete_prefix", "ping"):
            metrics.blob_errors.labels(self.kind, op)
            metrics.blob_latency.labels(self.kind, op)
        for op in ("put", "get"):
            metrics.blob_bytes.labels(self.kind, op)

    @property
    def local(self) -> LocalBlobStore | None:
        """The file store underneath, when it is one (its files are served by the HTTP side)."""
        return self.inner if isinstance(self.inner, LocalBlobStore) else None

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key`, create-only."""
        started = time.perf_counter()
        try:
            await self.inner.put(key, data, content_type=content_type)
        except BlobStoreUnavailable:
            self._metrics.blob_errors.labels(self.kind, "put").inc()
            raise
        finally:
            self._metrics.blob_latency.labels(self.kind, "put").observe(time.perf_counter() - started)
        self._metrics.blob_bytes.labels(self.kind, "put").inc(len(data))

    async def get(self, key: str) -> bytes:
        """The blob under `key`."""
        started = time.perf_counter()
        try:
            data = await self.inner.get(key)
        except BlobStoreUnavailable:
            self._metrics.blob_errors.labels(self.kind, "get").inc()
            raise
        finally:
            self._metrics.blob_latency.labels(self.kind, "get").observe(time.perf_counter() - started)
        self._metrics.blob_bytes.labels(self.kind, "get").inc(len(data))
        return data

    async def size(self, key: str) -> int:
        """The size of the blob under `key`."""
        return await self.inner.size(key)

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every blob under `prefix`."""
        started = time.perf_counter()
        try:
            await self.inner.delete_prefix(prefix)
        except BlobStoreUnavailable:
            self._metrics.blob_errors.labels(self.kind, "delete_prefix").inc()
            raise
        finally:
            self._metrics.blob_latency.labels(self.kind, "delete_prefix").observe(
                time.perf_counter() - started
            )

    async def ping(self) -> None:
        """Whether the store answers."""
        started = time.perf_counter()
        try:
            await self.inner.ping()
        except BlobStoreUnavailable:
            self._metrics.blob_errors.labels(self.kind, "ping").inc()
            raise
        finally:
            self._metrics.blob_latency.labels(self.kind, "ping").observe(time.perf_counter() - started)

    async def remove_temporaries(self, older_than_s: float) -> int:
        """Remove partial writes a crash left behind."""
        return await self.inner.remove_temporaries(older_than_s)

    async def close(self) -> None:
        """Release the store's connections."""
        await self.inner.close()

"""Signed, expiring URLs for result images, and the HTTP handler that serves them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from aiohttp import web

from storage.blobs import BlobKeyError, LocalBlobStore

_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


class ImageUrls(Protocol):
    """Turns a blob key into a URL a caller can download the image from, for a while."""

    def sign(self, blob_key: str) -> str:
        """A fresh URL for `blob_key`."""


class UrlSigner:
    """HMAC-SHA256 signatures over (blob key, expiry): a URL is good for `ttl_s` and for that key only."""

    def __init__(self, key: bytes, *, base_url: str, ttl_s: float) -> None:
        self._key = key
        self._base_url = base_url.rstrip("/")
        self._ttl_s = ttl_s

    def sign(self, blob_key: str, *, now: float | None = None) -> str:
        """A URL for `blob_key` that expires `ttl_s` from now."""
        expires = int((time.time() if now is None else now) + self._ttl_s)
        signature = self._signature(blob_key, expires)
        return f"{self._base_url}/files/{quote(blob_key)}?expires={expires}&sig={signature}"

    def verify(self, blob_key: str, expires: str, signature: str, *, now: float | None = None) -> bool:
        """Whether the signature is ours for this key and expiry, and the expiry has not passed."""
        # ASCII digits only (str.isdigit accepts "²", which int() refuses) and a sane length
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 20):
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._signature(blob_key, int(expires)), signature)

    def _signature(self, blob_key: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{blob_key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signing_key(configured: str, data_dir: Path) -> bytes:
    """The configured key, or one generated once and kept in the data directory (single-node default)."""
    if configured:
        return configured.encode()
    path = data_dir / "url-signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip().encode()


def file_routes(blobs: LocalBlobStore, signer: UrlSigner) -> list[web.RouteDef]:
    """GET /files/{key}?expires=&sig=: 403 for a bad or expired signature, 404 for a missing file."""

    async def serve(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if not signer.verify(key, request.query.get("expires", ""), request.query.get("sig", "")):
            raise web.HTTPForbidden(text="invalid or expired signature\n")
        try:
            path = blobs.path(key)
        except BlobKeyError:
            raise web.HTTPNotFound() from None
        if not path.is_file():
            raise web.HTTPNotFound()
        # the type we stored, not a guess from the file name (mimetypes may not know .webp)
        content_type = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return web.FileResponse(
            path, headers={"Cache-Control": "private, max-age=300", "Content-Type": content_type}
        )

    return [web.get("/files/{key:.+}", serve)]

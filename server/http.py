"""The HTTP side: /healthz, /readyz, /metrics and the signed image files."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.files import UrlSigner, file_routes
from server.health import Readiness
from storage.blobs import LocalBlobStore


def http_routes(
    registry: CollectorRegistry, readiness: Readiness, blobs: LocalBlobStore | None, signer: UrlSigner
) -> list[web.RouteDef]:
    """Every route of the HTTP side (the image files only with a file store: S3 serves its own)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready = await readiness.check()
        return web.json_response({"ready": ready, "reason": readiness.reason}, status=200 if ready else 503)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        *(file_routes(blobs, signer) if blobs is not None else []),
    ]

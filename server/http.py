"""The HTTP side: /healthz, /readyz, /metrics and the signed image files."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from server.files import UrlSigner, file_routes
from server.health import Readiness
from storage.blobs import LocalBlobStore

#: the text format generate_latest writes; scrapers pick their parser by this version
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        return web.Response(body=generate_latest(registry), headers={"Content-Type": METRICS_CONTENT_TYPE})

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        *(file_routes(blobs, signer) if blobs is not None else []),
    ]

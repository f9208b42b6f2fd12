"""Readiness: whether the database answers with a schema this build serves and the blob store answers,
for gRPC health and /readyz."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from imagegen.v1 import imagegen_pb2 as pb
from storage import migrate
from storage.blobs import BlobStore
from storage.errors import BlobStoreUnavailable, StoreUnavailable
from storage.port import StoreHealth

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
#: how often readiness (gRPC health and /readyz) re-checks the database
HEALTH_CHECK_INTERVAL_S = 2.0


class Readiness:
    """Whether the database answers and has the newest schema; drives gRPC health and /readyz."""

    def __init__(
        self,
        store: StoreHealth,
        health_servicer: health.aio.HealthServicer,
        *,
        on_change: Callable[[bool], None] | None = None,
        blobs: BlobStore | None = None,
        on_blob_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._blobs = blobs
        self._on_blob_change = on_blob_change
        self._health = health_servicer
        self.ready = False
        self.reason = "not checked yet"
        self._shutting_down = False

    async def check(self) -> bool:
        """Check once and publish the outcome."""
        try:
            await self._store.ping()
            current = await self._store.schema_revision()
            head = migrate.head_revision()
            ready = migrate.serves_revision(current)
            reason = "ok" if ready else f"schema at {current}, needs {head}"
        except (StoreUnavailable, OSError, TimeoutError) as exc:
            ready, reason = False, f"database unreachable: {exc}"
        except Exception as exc:  # e.g. a driver error while the database restarts
            ready, reason = False, f"database check failed: {exc.__class__.__name__}"
        if self._on_change is not None:
            self._on_change(ready)
        if self._blobs is not None:
            blobs_up, blob_reason = await self._check_blobs()
            if self._on_blob_change is not None:
                self._on_blob_change(blobs_up)
            if ready and not blobs_up:
                ready, reason = False, blob_reason
        if ready != self.ready:
            log.log(logging.INFO if ready else logging.WARNING, "readiness: %s", reason)
        self.ready, self.reason = ready, reason
        await self._publish()
        return ready

    async def _check_blobs(self) -> tuple[bool, str]:
        assert self._blobs is not None
        try:
            async with asyncio.timeout(HEALTH_CHECK_INTERVAL_S * 2):
                await self._blobs.ping()
            return True, "ok"
        except (BlobStoreUnavailable, TimeoutError) as exc:
            return False, f"blob store unreachable: {exc or 'timed out'}"

    async def shutting_down(self) -> None:
        """From now on, NOT_SERVING whatever the database says."""
        self._shutting_down = True
        await self._health.enter_graceful_shutdown()

    async def run(self) -> None:
        """Re-check forever."""
        while True:
            await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)
            await self.check()

    async def _publish(self) -> None:
        if self._shutting_down:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

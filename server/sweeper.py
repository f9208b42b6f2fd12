"""The retention sweeper: in every process, deletes expired jobs and what crashed writes left behind."""

from __future__ import annotations

import asyncio
import logging

from server.metrics import ServiceMetrics
from storage.blobs import BlobStore
from storage.errors import SchemaBehind, StorageError
from storage.retention import JobDeleter

log = logging.getLogger(__name__)

#: a temporary file of the file store older than this is a put that crashed (a put takes milliseconds)
TEMPORARY_MAX_AGE_S = 3600.0


class Sweeper:
    """Runs `JobDeleter.sweep` until no expired job is left, every `interval_s`; safe in any number of
    replicas (they share the rows through the database, SKIP LOCKED)."""

    def __init__(
        self, deleter: JobDeleter, blobs: BlobStore, metrics: ServiceMetrics, *, interval_s: float
    ) -> None:
        self._deleter, self._blobs, self._metrics = deleter, blobs, metrics
        self._interval_s = interval_s

    async def sweep_once(self) -> int:
        """One pass; returns how many jobs it deleted."""
        total = 0
        try:
            while deleted := await self._deleter.sweep():
                total += len(deleted)
                self._metrics.jobs_deleted.labels("expired").inc(len(deleted))
                log.info("expired jobs deleted", extra={"jobs": len(deleted), "outcome": "expired"})
            removed = await self._blobs.remove_temporaries(TEMPORARY_MAX_AGE_S)
            if removed:
                log.info("stale temporary files removed", extra={"files": removed})
        except StorageError as exc:
            if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                log.warning("retention sweep could not finish (%s); it tries again next interval", exc)
        except Exception:
            log.exception("retention sweep failed unexpectedly; it tries again next interval")
        return total

    async def run(self) -> None:
        """Sweep forever."""
        while True:
            await self.sweep_once()
            await asyncio.sleep(self._interval_s)

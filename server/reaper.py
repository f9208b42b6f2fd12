"""The reaper: in every process, tidies jobs no worker is tending (expired leases, passed deadlines)."""

from __future__ import annotations

import asyncio
import logging

from server.metrics import ServiceMetrics
from server.outputs import remove_other_attempts
from storage.blobs import BlobStore
from storage.errors import SchemaBehind, StorageError
from storage.models import JobStatus
from storage.port import JobQueue

log = logging.getLogger(__name__)


class Reaper:
    """Runs `JobQueue.reap` periodically; safe in any number of replicas (rows are taken SKIP LOCKED)."""

    def __init__(
        self,
        store: JobQueue,
        metrics: ServiceMetrics,
        *,
        interval_s: float,
        blobs: BlobStore | None = None,
    ) -> None:
        self._store, self._metrics, self._interval_s = store, metrics, interval_s
        self._blobs = blobs

    async def reap_once(self) -> int:
        """One pass; returns how many jobs it changed."""
        try:
            changed = await self._store.reap()
        except StorageError as exc:
            if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                log.warning("reaper could not reach the database: %s", exc)
            return 0
        except Exception:
            log.exception("reaper failed unexpectedly; it tries again next interval")
            return 0
        for job in changed:
            if job.status is JobStatus.FAILED:
                self._metrics.observe_finished(job)
                if self._blobs is not None:
                    await remove_other_attempts(self._blobs, job)
            log.info(
                "job reaped",
                extra={
                    "job_id": str(job.id),
                    "account": job.account_id,
                    "provider": job.spec.provider,
                    "attempt": job.attempt,
                    "outcome": job.status.value,
                },
            )
        return len(changed)

    async def run(self) -> None:
        """Reap forever."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.reap_once()

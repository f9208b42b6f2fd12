"""Writes recording what a vendor was paid for, retried through database blips while the lease lasts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from server import tracing
from storage.errors import StoreUnavailable
from storage.models import Job
from storage.port import Fence, JobQueue

log = logging.getLogger(__name__)


class Checkpoint:
    """providers.base.Checkpoint backed by the job row, fenced like every other write of the attempt.

    A save is retried through a database blip for as long as the lease lasts, as the final write is
    (`DurableWrites.write`): what it records was paid for (BFL bills at submit), and an attempt that ended
    without it would make the next one pay again. The adapter holds the state in memory meanwhile.
    """

    def __init__(self, store: JobQueue, fence: Fence, *, lease_s: float) -> None:
        self._store, self._fence, self._lease_s = store, fence, lease_s

    async def save(self, state: Mapping[str, Any]) -> None:
        if tracing.enabled:  # the shared statement has no span of its own: the wait for it is the job's
            with tracing.child_span("job checkpoint", {"imagegen.job.id": str(self._fence.job_id)}):
                await self._save(state)
        else:
            await self._save(state)

    async def _save(self, state: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._lease_s
        delay = 0.1
        while True:
            try:
                # No shield: the statement runs in the store's group-commit writer, so cancelling the
                # attempt leaves it to finish there rather than abandoning a connection mid-statement.
                await self._store.save_provider_state(self._fence, state)
                return
            except StoreUnavailable as exc:
                if loop.time() + delay > give_up:
                    raise
                log.warning(
                    "job %s attempt %s: checkpoint not saved (%s); retrying in %.1f s",
                    self._fence.job_id,
                    self._fence.attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class DurableWrites:
    """The final writes of a worker's attempts, and which jobs are making one right now."""

    def __init__(self, *, lease_s: float) -> None:
        self._lease_s = lease_s
        #: jobs whose attempt is making its final write: that write's fence decides, not a cancel
        self._finishing: set[uuid.UUID] = set()

    def finishing(self, job_id: uuid.UUID) -> bool:
        """Whether the job's attempt is making its final write (then it must not be cancelled)."""
        return job_id in self._finishing

    async def write(self, fence: Fence, write: Callable[[], Awaitable[Job]]) -> Job:
        """Retry an attempt's final write through a database blip, for as long as the lease would last.

        Giving up sooner would throw away a result the vendor was paid for; past the lease, another
        worker may own the job and the write would be refused anyway (LeaseLost). While it runs the
        attempt is not cancelled from outside: the write's fence settles whether the attempt still
        owns the job.
        """
        give_up = asyncio.get_running_loop().time() + self._lease_s
        delay = 0.1
        self._finishing.add(fence.job_id)
        try:
            while True:
                try:
                    # shielded: a cancelled attempt must not abandon a connection mid-statement
                    return await asyncio.shield(write())
                except StoreUnavailable:
                    if asyncio.get_running_loop().time() + delay > give_up:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self._finishing.discard(fence.job_id)

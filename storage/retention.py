"""Deleting jobs: one on request (DeleteJob), or every expired one (the retention sweeper).

A job is deleted images first, then its row (its events go with it, ON DELETE CASCADE), in one
transaction that holds the row locked: if the blob store refuses, the row stays and the deletion is
tried again later, so no row ever points at images that are gone without the job being gone too.
Only terminal jobs are deleted; a running job's attempt may still be writing images.

Replicas share the sweep through the database: each takes expired rows `FOR UPDATE SKIP LOCKED`, so two
sweepers never delete the same job, and a DeleteJob on a row a sweeper holds waits for it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.blobs import BlobStore, job_prefix
from storage.connections import Connections
from storage.errors import InvalidTransition, JobNotFound, StorageError
from storage.models import TERMINAL, utcnow
from storage.schema import jobs

_TERMINAL = tuple(status.value for status in TERMINAL)


class JobDeleter:
    """Deletes jobs with their images; `sweep` takes the expired ones, a batch at a time."""

    def __init__(self, engine: AsyncEngine, blobs: BlobStore, *, batch: int = 100, parallel: int = 8) -> None:
        self._db = Connections(engine)
        self._blobs = blobs
        self._batch = batch
        self._parallel = asyncio.Semaphore(parallel)
        self._postgres = engine.dialect.name == "postgresql"

    async def delete(self, account_id: str, job_id: uuid.UUID) -> None:
        """Delete a terminal job of `account_id`: JobNotFound, or InvalidTransition if it is running.

        BlobStoreUnavailable leaves the job as it was.
        """
        async with self._db.transaction() as conn:
            query = select(jobs.c.status, jobs.c.folder_id).where(
                jobs.c.id == job_id, jobs.c.account_id == account_id
            )
            row = (await conn.execute(query.with_for_update() if self._postgres else query)).first()
            if row is None:
                raise JobNotFound(job_id)
            if row.status not in _TERMINAL:
                raise InvalidTransition(job_id, row.status, "delete it (cancel it first)")
            await self._blobs.delete_prefix(job_prefix(account_id, row.folder_id, job_id))
            await conn.execute(delete(jobs).where(jobs.c.id == job_id))

    async def sweep(self, *, now: datetime | None = None) -> list[uuid.UUID]:
        """Delete up to one batch of terminal jobs whose expire_time has passed; the ids deleted.

        A job whose images the store would not delete is left for a later sweep.
        """
        query = (
            select(jobs.c.id, jobs.c.account_id, jobs.c.folder_id)
            .where(jobs.c.expire_time <= (now or utcnow()), jobs.c.status.in_(_TERMINAL))
            .order_by(jobs.c.expire_time)
            .limit(self._batch)
        )
        if self._postgres:
            # rows another replica is sweeping (or a DeleteJob holds) are skipped, not waited for
            query = query.with_for_update(skip_locked=True)
        async with self._db.transaction() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            outcomes = await asyncio.gather(
                *(self._delete_images(row.account_id, row.folder_id, row.id) for row in rows),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, StorageError):
                    raise outcome
            deleted = [row.id for row, outcome in zip(rows, outcomes, strict=True) if outcome is None]
            if deleted:
                await conn.execute(delete(jobs).where(jobs.c.id.in_(deleted)))
            return deleted

    async def _delete_images(self, account_id: str, folder_id: str, job_id: uuid.UUID) -> None:
        async with self._parallel:
            await self._blobs.delete_prefix(job_prefix(account_id, folder_id, job_id))

"""Reading jobs: one job, an account's pages, the events watchers catch up from, and queue figures."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, tuple_

from storage import migrate
from storage.codec import event_from_row, job_from_row, notice_from_row
from storage.connections import Connections
from storage.errors import JobNotFound
from storage.models import Job, JobEvent, JobNotice, JobStatus, utcnow
from storage.port import JobFilter, PageCursor, QueueStats
from storage.schema import job_events, jobs


class JobReads:
    """The store's reads (a part of `SqlJobStore`); none takes a lock or writes."""

    _db: Connections

    async def get(self, account_id: str, job_id: uuid.UUID) -> Job:
        """The job, if it belongs to the account; JobNotFound otherwise."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.account_id == account_id))
            ).first()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    async def list(
        self,
        account_id: str,
        *,
        page_size: int,
        after: PageCursor | None = None,
        where: JobFilter = JobFilter(),
    ) -> tuple[list[Job], PageCursor | None]:
        """One page of the account's jobs, newest first, and the cursor of the next page (None at the end)."""
        query = select(jobs).where(jobs.c.account_id == account_id, *filter_clauses(where))
        if after is not None:
            query = query.where(
                tuple_(jobs.c.create_time, jobs.c.id) < tuple_(after.create_time, after.job_id)
            )
        query = query.order_by(jobs.c.create_time.desc(), jobs.c.id.desc()).limit(page_size + 1)
        async with self._db.connection() as conn:
            rows = (await conn.execute(query)).all()
        page = [job_from_row(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        cursor = PageCursor(create_time=page[-1].create_time, job_id=page[-1].id) if more and page else None
        return page, cursor

    async def submitted_since(
        self, account_id: str, since: datetime, *, up_to: int
    ) -> tuple[int, datetime | None]:
        """How many jobs the account created since `since` (counted up to `up_to`), and the oldest of them."""
        async with self._db.connection() as conn:
            inner = (
                select(jobs.c.create_time)
                .where(jobs.c.account_id == account_id, jobs.c.create_time >= since)
                .order_by(jobs.c.create_time.desc())
                .limit(up_to)
                .subquery()
            )
            count, oldest = (await conn.execute(select(func.count(), func.min(inner.c.create_time)))).one()
        if isinstance(oldest, str):  # SQLite's min() of a timestamp comes back as text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=since.tzinfo)
        return int(count), oldest

    async def count_pending(self, account_id: str, *, up_to: int) -> int:
        """The account's pending jobs, counted up to `up_to` (the cost is bounded by the cap)."""
        async with self._db.connection() as conn:
            inner = (
                select(jobs.c.id)
                .where(jobs.c.account_id == account_id, jobs.c.status == JobStatus.PENDING.value)
                .limit(up_to)
                .subquery()
            )
            return int((await conn.execute(select(func.count()).select_from(inner))).scalar_one())

    async def events(
        self, job_id: uuid.UUID, *, after_version: int, up_to: int | None = None
    ) -> list[JobEvent]:
        """The job's events with version > after_version (and ≤ up_to), oldest first."""
        query = select(job_events).where(job_events.c.job_id == job_id, job_events.c.version > after_version)
        if up_to is not None:
            query = query.where(job_events.c.version <= up_to)
        async with self._db.connection() as conn:
            rows = (await conn.execute(query.order_by(job_events.c.version))).all()
        return [event_from_row(row) for row in rows]

    async def events_after(self, bases: Mapping[uuid.UUID, int]) -> dict[uuid.UUID, list[JobEvent]]:
        """For many jobs at once: each job's events with version > its base, oldest first."""
        found: dict[uuid.UUID, list[JobEvent]] = {}
        job_ids = list(bases)
        async with self._db.connection() as conn:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                floor = min(bases[job_id] for job_id in chunk)
                rows = await conn.execute(
                    select(job_events)
                    .where(job_events.c.job_id.in_(chunk), job_events.c.version > floor)
                    .order_by(job_events.c.job_id, job_events.c.version)
                )
                for row in rows:
                    if row.version > bases[row.job_id]:
                        found.setdefault(row.job_id, []).append(event_from_row(row))
        return found

    async def versions(self, job_ids: Sequence[uuid.UUID]) -> list[JobNotice]:
        """The current version of each of these jobs (for the event hub's periodic catch-up)."""
        notices: list[JobNotice] = []
        async with self._db.connection() as conn:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                rows = await conn.execute(
                    select(jobs.c.id, jobs.c.version, jobs.c.status, jobs.c.account_id).where(
                        jobs.c.id.in_(chunk)
                    )
                )
                notices.extend(notice_from_row(row) for row in rows)
        return notices

    async def changed_since(self, account_ids: Sequence[str], since: datetime) -> list[JobNotice]:
        """Jobs of these accounts that changed at or after `since` (for the event hub's catch-up)."""
        if not account_ids:
            return []
        async with self._db.connection() as conn:
            rows = await conn.execute(
                select(jobs.c.id, jobs.c.version, jobs.c.status, jobs.c.account_id).where(
                    jobs.c.update_time >= since, jobs.c.account_id.in_(list(account_ids))
                )
            )
            return [notice_from_row(row) for row in rows]

    async def queue_stats(self) -> QueueStats:
        """How many jobs wait and run, and how long the oldest due job has waited."""
        now = utcnow()
        async with self._db.connection() as conn:
            counts = dict(
                (
                    await conn.execute(
                        select(jobs.c.status, func.count())
                        .where(jobs.c.status.in_([JobStatus.PENDING.value, JobStatus.PROCESSING.value]))
                        .group_by(jobs.c.status)
                    )
                ).all()
            )
            oldest = (
                await conn.execute(
                    select(func.min(jobs.c.next_attempt_at)).where(
                        jobs.c.status == JobStatus.PENDING.value, jobs.c.next_attempt_at <= now
                    )
                )
            ).scalar_one_or_none()
        if oldest is not None and oldest.tzinfo is None:  # SQLite hands aggregates back as naive or text
            oldest = oldest.replace(tzinfo=now.tzinfo)
        elif isinstance(oldest, str):
            oldest = datetime.fromisoformat(oldest).replace(tzinfo=now.tzinfo)
        return QueueStats(
            pending=int(counts.get(JobStatus.PENDING.value, 0)),
            processing=int(counts.get(JobStatus.PROCESSING.value, 0)),
            oldest_due_pending_age_s=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
        )

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        async with self._db.connection() as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_revision(self) -> str | None:
        """The database's schema revision (None before the first migration)."""
        return await migrate.current_revision(self._db.engine)


def filter_clauses(where: JobFilter) -> list[Any]:
    """The WHERE clauses of a JobFilter."""
    clauses: list[Any] = []
    if where.statuses:
        clauses.append(jobs.c.status.in_(sorted(status.value for status in where.statuses)))
    if where.provider:
        clauses.append(jobs.c.provider == where.provider)
    if where.folder_id is not None:
        clauses.append(jobs.c.folder_id == where.folder_id)
    return clauses

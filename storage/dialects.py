"""What differs between PostgreSQL and SQLite, chosen once per store: a strategy object per database.

`Dialect` does each operation in portable SQLAlchemy Core, in a transaction; that is SQLite's way, whose
engine has one connection and so one writer. `PostgresDialect` does the operations every job goes
through (create, claim, checkpoint, lease extension, the end of an attempt) in single statements on
asyncpg, each its own transaction, rows skipped when other workers hold them (`FOR UPDATE SKIP LOCKED`),
and NOTIFYs the event hub of every process in the transaction that writes the events.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Insert

from storage import postgres_sql as sql
from storage.codec import (
    CREATED_ALIKE,
    JSON_COLUMNS,
    created_row,
    job_fields,
    job_from_row,
    job_to_json,
    job_values,
    json_text,
    notice,
)
from storage.connections import Connections, HeldConnection
from storage.db import is_postgres
from storage.models import NOTICES_PER_NOTIFY, Job, JobStatus
from storage.port import Claim, ConcurrencyCap, Fence
from storage.schema import job_events, jobs

#: the smallest pool a writer keeps a connection from: two writers then hold at most half of it
HOLD_MIN_POOL_SIZE = 4


@dataclass(kw_only=True)
class Submit:
    """One GenerateImage waiting for its commit."""

    job: Job
    request_hash: str


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One adapter checkpoint waiting for its commit."""

    fence: Fence
    state: Mapping[str, Any]


def dialect_for(engine: AsyncEngine) -> Dialect:
    """The strategy for this engine's database."""
    db = Connections(engine)
    return PostgresDialect(db) if is_postgres(engine) else SqliteDialect(db)


class Dialect:
    """The portable way: SQLAlchemy Core statements in one transaction per operation."""

    #: the connections the create and checkpoint writers keep between batches (None: they keep none)
    create_conn: HeldConnection | None = None
    checkpoint_conn: HeldConnection | None = None

    def __init__(self, db: Connections) -> None:
        self._db = db

    @property
    def connections(self) -> Connections:
        """The connections this dialect's statements run on (the store's too)."""
        return self._db

    def insert(self) -> Insert:
        """An insert of jobs that skips any whose (account, request_id) exists, returning the ids."""
        raise NotImplementedError

    async def create_batch(self, batch: Sequence[Submit]) -> set[uuid.UUID] | None:
        """Create the batch in one statement if this database can and no account in it has a budget;
        the ids inserted. None: nothing written, the caller creates them in a transaction."""
        return None

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        lease_s: float,
        caps: Sequence[ConcurrencyCap],
        per_account: int,
        now: datetime,
    ) -> list[Claim]:
        """`SqlJobStore.claim` in steps: pick the rows, update them, write their events."""
        async with self._db.transaction() as conn:
            rows = await claimable(conn, now=now, limit=limit, caps=caps, per_account=per_account)
            if not rows:
                return []
            claimed: list[Job] = []
            taken_over: list[bool] = []
            transitions: list[tuple[Job, JobStatus | None]] = []
            for row in rows:
                before = job_from_row(row)
                attempt = before.attempt + 1
                if before.status is JobStatus.PROCESSING:
                    message = f"lease of {before.lease_owner} expired; taken over (attempt {attempt})"
                else:
                    message = f"started (attempt {attempt})"
                job = before.evolve(
                    status=JobStatus.PROCESSING,
                    attempt=attempt,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    start_time=before.start_time or now,
                    version=before.version + 1,
                    update_time=now,
                    message=message,
                )
                claimed.append(job)
                taken_over.append(before.status is JobStatus.PROCESSING)
                transitions.append((job, before.status))
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == bindparam("b_id"))
                .values(
                    status=JobStatus.PROCESSING.value,
                    attempt=bindparam("b_attempt"),
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    start_time=func.coalesce(
                        jobs.c.start_time, bindparam("b_now", type_=jobs.c.start_time.type)
                    ),
                    version=bindparam("b_version"),
                    update_time=now,
                    message=bindparam("b_message"),
                ),
                [
                    {
                        "b_id": j.id,
                        "b_attempt": j.attempt,
                        "b_now": now,
                        "b_version": j.version,
                        "b_message": j.message,
                    }
                    for j in claimed
                ],
            )
            await self.record_events(conn, transitions)
        return [Claim(job=job, taken_over=over) for job, over in zip(claimed, taken_over, strict=True)]

    async def extend_leases(
        self, owner: str, job_ids: Sequence[uuid.UUID], until: datetime
    ) -> set[tuple[uuid.UUID, int]]:
        """Set the leases `owner` still holds on these jobs to end at `until`; the (id, attempt) pairs."""
        held: set[tuple[uuid.UUID, int]] = set()
        async with self._db.transaction() as conn:
            for start in range(0, len(job_ids), 1000):
                rows = await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(job_ids[start : start + 1000]),
                        jobs.c.status == JobStatus.PROCESSING.value,
                        jobs.c.lease_owner == owner,
                    )
                    .values(lease_expires_at=until)
                    .returning(jobs.c.id, jobs.c.attempt)
                )
                held.update((row.id, row.attempt) for row in rows)
        return held

    async def save_checkpoints(self, batch: Sequence[Checkpoint]) -> list[bool]:
        """Write checkpoints; for each, whether its fence still held."""
        outcomes = []
        async with self._db.transaction() as conn:  # in order: a job's later checkpoint wins
            for item in batch:
                result = await conn.execute(
                    update(jobs).where(*fenced(item.fence)).values(provider_state=dict(item.state))
                )
                outcomes.append(result.rowcount == 1)
        return outcomes

    async def claimed_transition(
        self,
        fence: Fence,
        claimed: Job,
        status: JobStatus,
        message: str,
        values: dict[str, Any],
        now: datetime,
    ) -> Job | None:
        """A fenced transition written from the claimed job without reading the row, if this database
        can; None when not written (the caller takes the general path)."""
        return None

    async def record_events(
        self, conn: AsyncConnection, transitions: Sequence[tuple[Job, JobStatus | None]]
    ) -> None:
        """Write each (job, previous status)'s event in the caller's transaction, and notify of them."""
        await conn.execute(
            insert(job_events),
            [
                {
                    "job_id": job.id,
                    "account_id": job.account_id,
                    "version": job.version,
                    "status": job.status.value,
                    "previous_status": previous.value if previous else None,
                    "message": job.message,
                    "event_time": job.update_time,
                    "snapshot": job_to_json(job),
                }
                for job, previous in transitions
            ],
        )
        await self.notify(conn, [job for job, _ in transitions])

    async def notify(self, conn: AsyncConnection, changed: Sequence[Job]) -> None:
        """Tell other processes of these jobs' new versions when the transaction commits (no one to tell
        on an embedded database: its process is told by the store's commit callback)."""


class SqliteDialect(Dialect):
    """SQLite: the portable way throughout."""

    def insert(self) -> Insert:
        # executemany form: compiled once and cached (a multi-row VALUES statement differs per batch size)
        return (
            sqlite.insert(jobs)
            .on_conflict_do_nothing(index_elements=[jobs.c.account_id, jobs.c.request_id])
            .returning(jobs.c.id)
        )


class PostgresDialect(Dialect):
    """PostgreSQL: single statements where every job pays, NOTIFY with every event, SKIP LOCKED claims."""

    def __init__(self, db: Connections) -> None:
        super().__init__(db)
        # Each writer keeps its connection between batches where the pool can spare two.
        pool_size = getattr(db.engine.sync_engine.pool, "size", lambda: 0)()
        if pool_size >= HOLD_MIN_POOL_SIZE:
            self.create_conn = HeldConnection(db.engine)
            self.checkpoint_conn = HeldConnection(db.engine)

    def insert(self) -> Insert:
        return (
            postgresql.insert(jobs)
            .on_conflict_do_nothing(index_elements=[jobs.c.account_id, jobs.c.request_id])
            .returning(jobs.c.id)
        )

    async def create_batch(self, batch: Sequence[Submit]) -> set[uuid.UUID] | None:
        """In one round trip: insert the jobs, their events and NOTIFYs; the ids inserted.

        One statement is its own transaction, so the batch costs one round trip instead of six (BEGIN,
        insert jobs, insert events, NOTIFY, COMMIT and the budget lock). It applies only when no account
        in the batch has a budget: then it writes nothing and returns None, and the caller reserves credit
        in a transaction of its own. (A budget set while this runs is not seen by it; its jobs are then as
        if submitted just before. A batch with a budgeted account pays for this statement's read of
        `accounts` before the fallback.)
        """
        rows = [created_row(item.job, item.request_hash) for item in batch]
        first = job_values(batch[0].job, batch[0].request_hash)
        alike = {name: first[name] for name in CREATED_ALIKE}
        budgeted = sorted({item.job.account_id for item in batch if item.job.estimated_cost_usd_micros > 0})
        statement = sql.create_statement(tuple(rows[0]))
        async with self._db.writer(self.create_conn) as pg:
            row = await pg.fetchrow(
                statement, budgeted, sql.NOTIFY_CHANNEL, json_text(rows), json_text(alike)
            )
        assert row is not None
        if row["budgeted"]:
            return None
        return set(row["created"])

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        lease_s: float,
        caps: Sequence[ConcurrencyCap],
        per_account: int,
        now: datetime,
    ) -> list[Claim]:
        """In one statement (`postgres_sql.claim_statement`); with caps, after picking the rows under a
        lock that serialises capped claims across replicas."""
        arguments = (owner, now + timedelta(seconds=lease_s), sql.NOTIFY_CHANNEL)
        if caps or per_account:
            async with self._db.transaction() as conn:
                # Counting what runs and claiming within a cap must not interleave across replicas, or
                # two could each see room for the last slot.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": sql.CLAIM_LOCK_KEY})
                rows = await claimable(conn, now=now, limit=limit, caps=caps, per_account=per_account)
                if not rows:
                    return []
                result = await conn.exec_driver_sql(
                    sql.claim_statement(sql.CLAIM_PICKED), (now, [row.id for row in rows], *arguments)
                )
                records: Sequence[Any] = [row._mapping for row in result]
        else:
            async with self._db.driver() as pg:
                records = await pg.fetch(sql.claim_statement(sql.CLAIM_DUE), now, limit, *arguments)
        return [
            Claim(
                job=job_from_row(record), taken_over=record["previous_status"] == JobStatus.PROCESSING.value
            )
            for record in records
        ]

    async def extend_leases(
        self, owner: str, job_ids: Sequence[uuid.UUID], until: datetime
    ) -> set[tuple[uuid.UUID, int]]:
        async with self._db.driver() as pg:
            rows = await pg.fetch(sql.EXTEND_LEASES, until, list(job_ids), owner)
        return {(row["id"], row["attempt"]) for row in rows}

    async def save_checkpoints(self, batch: Sequence[Checkpoint]) -> list[bool]:
        if len({item.fence.job_id for item in batch}) != len(batch):
            return await super().save_checkpoints(batch)  # a job twice: written in order
        # one asyncpg statement, its own transaction, rather than BEGIN, UPDATE, COMMIT per job
        async with self._db.writer(self.checkpoint_conn) as pg:
            rows = await pg.fetch(
                sql.SAVE_PROVIDER_STATES,
                [item.fence.job_id for item in batch],
                [item.fence.attempt for item in batch],
                [item.fence.owner for item in batch],
                [json_text(dict(item.state)) for item in batch],
            )
        saved = {row["id"] for row in rows}
        return [item.fence.job_id in saved for item in batch]

    async def claimed_transition(
        self,
        fence: Fence,
        claimed: Job,
        status: JobStatus,
        message: str,
        values: dict[str, Any],
        now: datetime,
    ) -> Job | None:
        """In one round trip: the fenced update, its event and its NOTIFY; None if not written.

        Every job ends with one of these, so it is one statement (its own transaction) rather than the
        general path's several round trips. The new state is the claimed job with `values` applied,
        which is what the row holds as long as its version is the claimed one; the statement checks
        that, and writes nothing otherwise. Jobs holding a credit reservation take the general path,
        which settles it in the same transaction.
        """
        if claimed.reserved_usd_micros != 0:
            return None
        changes = job_fields(values)
        job = claimed.evolve(
            status=status, version=claimed.version + 1, update_time=now, message=message, **changes
        )
        columns = tuple(values)
        async with self._db.driver() as pg:
            row = await pg.fetchrow(
                sql.transition_statement(columns),
                status.value,
                message,
                now,
                fence.job_id,
                fence.attempt,
                fence.owner,
                claimed.version,
                sql.NOTIFY_CHANNEL,
                json_text(job_to_json(job)),
                notice(job).encode(),
                *(json_text(values[name]) if name in JSON_COLUMNS else values[name] for name in columns),
            )
        if row is None:
            return None
        # the one column a processing job changes without a new version (the adapter's checkpoint)
        return job.evolve(provider_state=row["provider_state"])

    async def notify(self, conn: AsyncConnection, changed: Sequence[Job]) -> None:
        # Delivered to every LISTENing process when (and only if) this transaction commits.
        lines = [notice(job).encode() for job in changed]
        payloads = [
            "\n".join(lines[start : start + NOTICES_PER_NOTIFY])
            for start in range(0, len(lines), NOTICES_PER_NOTIFY)
        ]
        await conn.execute(text(sql.NOTIFY_PAYLOADS), {"channel": sql.NOTIFY_CHANNEL, "payloads": payloads})


def fenced(fence: Fence) -> list[Any]:
    """The WHERE clauses of a fenced write: the job is processing under this attempt and owner."""
    return [
        jobs.c.id == fence.job_id,
        jobs.c.status == JobStatus.PROCESSING.value,
        jobs.c.attempt == fence.attempt,
        jobs.c.lease_owner == fence.owner,
    ]


async def claimable(
    conn: AsyncConnection,
    *,
    now: datetime,
    limit: int,
    caps: Sequence[ConcurrencyCap],
    per_account: int,
) -> list[Row[Any]]:
    """The runnable rows a claim takes, oldest due first: due pending jobs and expired leases, within the
    vendors' caps (first come, first served) and `per_account`, locked (`SKIP LOCKED`) in `conn`'s
    transaction."""
    runnable = select(jobs).where(
        or_(
            and_(jobs.c.status == JobStatus.PENDING.value, jobs.c.next_attempt_at <= now),
            and_(jobs.c.status == JobStatus.PROCESSING.value, jobs.c.lease_expires_at < now),
        )
    )

    def first(query: Any, count: int) -> Any:
        return query.order_by(jobs.c.next_attempt_at).limit(count).with_for_update(skip_locked=True)

    capped = {provider for cap in caps for provider in cap.providers}
    running_by_account: dict[str, int] = {}
    if per_account:
        running_by_account = dict(
            (
                await conn.execute(
                    select(jobs.c.account_id, func.count())
                    .where(jobs.c.status == JobStatus.PROCESSING.value)
                    .group_by(jobs.c.account_id)
                )
            ).all()
        )
        full = sorted(account for account, running in running_by_account.items() if running >= per_account)
        if full:
            # a full account's expired leases are still taken over: those jobs already count
            runnable = runnable.where(
                or_(jobs.c.status == JobStatus.PROCESSING.value, jobs.c.account_id.not_in(full))
            )
    query = runnable.where(jobs.c.provider.not_in(sorted(capped))) if capped else runnable
    rows = list((await conn.execute(first(query, limit))).all())
    for cap in caps:
        in_use = (
            await conn.execute(
                select(func.coalesce(func.sum(jobs.c.num_variants), 0)).where(
                    jobs.c.status == JobStatus.PROCESSING.value,
                    jobs.c.provider.in_(sorted(cap.providers)),
                )
            )
        ).scalar_one()
        room = cap.max_tasks - int(in_use)
        if room <= 0:
            continue
        for row in (
            await conn.execute(
                first(runnable.where(jobs.c.provider.in_(sorted(cap.providers))), min(limit, room))
            )
        ).all():
            # a taken-over job's tasks are already counted (it is still PROCESSING)
            needs = 0 if row.status == JobStatus.PROCESSING.value else row.num_variants
            if needs > room and not (in_use == 0 and not rows):
                break  # first come, first served: a big job is not overtaken by smaller ones behind it
            rows.append(row)
            room -= needs
            in_use += needs
    rows.sort(key=lambda row: row.next_attempt_at)
    if per_account:
        kept = []
        for row in rows:
            # a taken-over job is already counted among its account's processing jobs
            if row.status == JobStatus.PROCESSING.value:
                kept.append(row)
            elif running_by_account.get(row.account_id, 0) < per_account:
                running_by_account[row.account_id] = running_by_account.get(row.account_id, 0) + 1
                kept.append(row)
        rows = kept
    return rows[:limit]

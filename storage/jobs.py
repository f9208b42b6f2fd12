"""The job store: the jobs table is the queue, and every transition writes its event in the same transaction.

`SqlJobStore` serves PostgreSQL and SQLite. What differs between them is one strategy object chosen at
construction (`storage.dialects`); what is the same lives here and in the modules it is made of:
`storage.reads` (reads), `storage.credits` (budgets and reservations), `storage.group_commit` (shared
commits), `storage.codec` (rows and JSON). `server` types against `storage.port.JobStore`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.codec import job_from_json, job_from_row, job_to_json, job_values, notice, spec_hash
from storage.connections import Connections
from storage.credits import Budgets, Reservations, settle
from storage.dialects import Checkpoint, Submit, dialect_for, fenced
from storage.errors import (
    IdempotencyConflict,
    InsufficientCredit,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    StorageError,
    StoreUnavailable,
)
from storage.group_commit import (
    GROUP_COMMIT_HOLD_S,
    GROUP_COMMIT_LINGER_S,
    SATURATED_SHARE,
    GroupCommit,
    ThreadLoad,
    thread_runnable_time,
)
from storage.models import (
    ALLOWED_TRANSITIONS,
    Job,
    JobError,
    JobNotice,
    JobStatus,
    NewJob,
    StoredImage,
    utcnow,
)
from storage.port import Claim, ConcurrencyCap, Fence, JobFilter, PageCursor, QueueStats
from storage.postgres_sql import NOTIFY_CHANNEL
from storage.reads import JobReads
from storage.schema import jobs

# What server, bench and tests import from here, wherever it now lives.
__all__ = [
    "GROUP_COMMIT_HOLD_S",
    "GROUP_COMMIT_LINGER_S",
    "NOTIFY_CHANNEL",
    "SATURATED_SHARE",
    "Claim",
    "ConcurrencyCap",
    "Fence",
    "JobFilter",
    "PageCursor",
    "QueueStats",
    "SqlJobStore",
    "ThreadLoad",
    "job_from_json",
    "job_to_json",
    "spec_hash",
    "thread_runnable_time",
]


class SqlJobStore(JobReads, Budgets):
    """Jobs and their events in PostgreSQL or SQLite (`storage.port.JobStore`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_commit: Callable[[Sequence[JobNotice]], None] | None = None,
        hold_s: float = GROUP_COMMIT_HOLD_S,
        linger_s: float = GROUP_COMMIT_LINGER_S,
        saturated_share: float = SATURATED_SHARE,
    ):
        self._dialect = dialect_for(engine)
        self._db: Connections = self._dialect.connections
        self._on_commit = on_commit
        self._creates = GroupCommit[Submit, tuple[Job, bool]](
            self._create_batch,
            name="create-commit",
            linger_s=linger_s,
            saturated=ThreadLoad(saturated_share=saturated_share).saturated,
            held=self._dialect.create_conn,
            hold_s=hold_s,
        )
        # No linger for checkpoints: from a vendor accepting a task to the commit of its id, a crash pays
        # for the task twice, so that window stays as short as a commit (one per job; not the hot path).
        self._checkpoints = GroupCommit[Checkpoint, bool](
            self._dialect.save_checkpoints,
            name="checkpoint-commit",
            linger_s=0.0,
            held=self._dialect.checkpoint_conn,
            hold_s=hold_s,
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine (for the event listener and tests)."""
        return self._db.engine

    async def close(self) -> None:
        """Finish the writes under way and give back the connections their writers keep; before the
        engine is disposed of. The store still works afterwards, without keeping connections."""
        await self._creates.close()
        await self._checkpoints.close()

    def set_on_commit(self, callback: Callable[[Sequence[JobNotice]], None] | None) -> None:
        """Who is told, in this process, about each committed transition."""
        self._on_commit = callback

    # ---------------------------------------------------------------- API side

    async def create(self, new: NewJob) -> tuple[Job, bool]:
        """Persist a job in PENDING with its first event; returns (job, created) once it is durable.

        With a request_id, a second call with the same body returns the first job (created=False);
        a different body raises IdempotencyConflict. A budget that cannot cover the quote raises
        InsufficientCredit. Concurrent calls share commits (see `GroupCommit`).
        """
        now = utcnow()
        job = Job(
            id=uuid.uuid4(),
            account_id=new.account_id,
            status=JobStatus.PENDING,
            spec=new.spec,
            request_id=new.request_id,
            estimated_cost_usd_micros=new.estimated_cost_usd_micros,
            version=1,
            create_time=now,
            update_time=now,
            deadline_at=now + timedelta(seconds=new.deadline_s),
            next_attempt_at=now,
            message=f"accepted; {new.notice}" if new.notice else "accepted",
            served_model=new.served_model,
            expire_time=now + timedelta(seconds=new.expire_after_s) if new.expire_after_s else None,
            active_provider=new.spec.provider,
            trace_context=new.trace_context,
        )
        return await self._creates.submit(Submit(job=job, request_hash=spec_hash(new.spec)))

    async def _create_batch(self, batch: Sequence[Submit]) -> list[tuple[Job, bool] | Exception]:
        """Create many jobs in one transaction; each submit gets its own outcome."""
        outcomes: list[tuple[Job, bool] | Exception | None] = [None] * len(batch)
        created: list[Job] = []
        conflicted: list[int] = []
        inserted = await self._dialect.create_batch(batch)
        if inserted is None:
            async with self._db.transaction() as conn:
                reservations = await Reservations.lock(conn, [item.job for item in batch])
                # a retry must get its job back, not be refused for the credit that job already reserved
                retried = await _taken_request_ids(conn, batch)
                rows: list[dict[str, Any]] = []
                planned: list[int] = []
                for index, item in enumerate(batch):
                    taken = (item.job.account_id, item.job.request_id)
                    if item.job.request_id and taken in retried:
                        conflicted.append(index)  # answered after the commit with the job holding the id
                        continue
                    try:
                        item.job = reservations.reserve(item.job)
                    except InsufficientCredit as exc:
                        outcomes[index] = exc
                        continue
                    if item.job.request_id:
                        retried.add(taken)  # a duplicate later in this batch
                    rows.append(job_values(item.job, item.request_hash))
                    planned.append(index)
                inserted = (
                    {row.id for row in await conn.execute(self._dialect.insert(), rows)} if rows else set()
                )
                for index in planned:
                    job = batch[index].job
                    reservations.created(job, job.id in inserted)
                await reservations.write(conn)
                fresh = [batch[index].job for index in planned if batch[index].job.id in inserted]
                if fresh:
                    await self._dialect.record_events(conn, [(job, None) for job in fresh])
            candidates = planned
        else:
            candidates = list(range(len(batch)))
        for index in candidates:
            job = batch[index].job
            if job.id in inserted:
                created.append(job)
                outcomes[index] = (job, True)
            else:  # its request_id was taken: answered after the commit
                conflicted.append(index)
        self._committed(created)
        return await self._answer_conflicts(batch, outcomes, conflicted)

    async def _answer_conflicts(
        self,
        batch: Sequence[Submit],
        outcomes: list[tuple[Job, bool] | Exception | None],
        conflicted: Sequence[int],
    ) -> list[tuple[Job, bool] | Exception]:
        """After the commit: the submits whose request_id was taken get the job that took it."""
        for index in conflicted:
            item = batch[index]
            try:
                existing = await self._by_request_id(item.job.account_id, item.job.request_id)
                if existing is None:  # it vanished between our insert and this read: a retry will do
                    raise StoreUnavailable("a concurrent submit with this request_id did not settle; retry")
                outcomes[index] = (self._idempotent(existing, item.job.request_id, item.request_hash), False)
            except StorageError as exc:
                outcomes[index] = exc
        return [outcome if outcome is not None else StoreUnavailable("not processed") for outcome in outcomes]

    async def cancel(
        self, account_id: str, job_id: uuid.UUID, *, message: str = "cancelled by the caller"
    ) -> tuple[Job, bool]:
        """Cancel a pending or processing job; returns (job, whether this call cancelled it).

        A cancelled job is returned as it is (idempotent).

        A processing job's worker finds its lease gone at its next fenced write and discards the result.
        Completed and failed jobs raise InvalidTransition.
        """
        async with self._db.transaction() as conn:
            row = (
                await conn.execute(
                    select(jobs).where(jobs.c.id == job_id, jobs.c.account_id == account_id).with_for_update()
                )
            ).first()
            if row is None:
                raise JobNotFound(job_id)
            current = job_from_row(row)
            if current.status is JobStatus.CANCELLED:
                return current, False
            if current.status.terminal:
                raise InvalidTransition(job_id, current.status.value, "cancel")
            now = utcnow()
            job = await self._update(
                conn,
                current,
                JobStatus.CANCELLED,
                message,
                values={
                    "end_time": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "next_attempt_at": None,
                    "cost_usd_micros": 0,
                },
                now=now,
            )
        self._committed([job])
        return job, True

    # ---------------------------------------------------------------- worker side

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        lease_s: float,
        caps: Sequence[ConcurrencyCap] = (),
        per_account: int = 0,
    ) -> list[Claim]:
        """Take up to `limit` runnable jobs: due pending ones, and processing ones whose lease expired.

        Each claimed job becomes PROCESSING under a lease held by `owner`, with `attempt` incremented
        (the fencing token for every later write of this attempt). Jobs of a capped vendor are taken only
        while its active tasks stay within the cap; the rest wait in PENDING, in order, and jobs of other
        vendors are not held up by them. With `per_account`, no account has more jobs processing than that;
        its other jobs wait, so one busy account cannot take every worker.
        """
        claims = await self._dialect.claim(
            owner=owner, limit=limit, lease_s=lease_s, caps=caps, per_account=per_account, now=utcnow()
        )
        self._committed([claim.job for claim in claims])
        return claims

    async def reap(self, *, limit: int = 100) -> list[Job]:
        """Tidy what no worker is tending: expired leases back to the queue, overdue jobs failed (free).

        Workers also take expired leases over when they claim; the reaper makes sure a job is never
        shown as PROCESSING without a live lease, and that no job outlives its deadline, even while no
        worker runs.
        """
        now = utcnow()
        changed: list[Job] = []
        async with self._db.transaction() as conn:
            rows = (
                await conn.execute(
                    select(jobs)
                    .where(
                        or_(
                            and_(jobs.c.status == JobStatus.PROCESSING.value, jobs.c.lease_expires_at < now),
                            and_(jobs.c.status == JobStatus.PENDING.value, jobs.c.deadline_at <= now),
                        )
                    )
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in rows:
                current = job_from_row(row)
                if current.deadline_at <= now:
                    job = await self._update(
                        conn,
                        current,
                        JobStatus.FAILED,
                        "failed: DEADLINE_EXCEEDED: the job deadline passed before it could finish",
                        values={
                            "error_code": "DEADLINE_EXCEEDED",
                            "error_message": "the job deadline passed before it could finish",
                            "error_retryable": True,
                            "cost_usd_micros": 0,
                            "end_time": now,
                            "lease_owner": None,
                            "lease_expires_at": None,
                            "next_attempt_at": None,
                        },
                        now=now,
                    )
                else:
                    job = await self._update(
                        conn,
                        current,
                        JobStatus.PENDING,
                        f"lease of {current.lease_owner} expired; returned to the queue",
                        values={"lease_owner": None, "lease_expires_at": None, "next_attempt_at": now},
                        now=now,
                    )
                changed.append(job)
        self._committed(changed)
        return changed

    async def extend_leases(
        self, owner: str, job_ids: Sequence[uuid.UUID], *, lease_s: float
    ) -> set[tuple[uuid.UUID, int]]:
        """Extend `owner`'s leases on these jobs; returns the (job id, attempt) pairs it still holds.

        Only the jobs a worker is actually running: a job whose attempt ended without a final write
        (the database was unreachable) must see its lease run out, so that another attempt takes it.
        """
        return await self._dialect.extend_leases(owner, job_ids, utcnow() + timedelta(seconds=lease_s))

    async def save_provider_state(self, fence: Fence, state: Mapping[str, Any]) -> None:
        """Keep an adapter's checkpoint (vendor task ids) with the job; LeaseLost if no longer held.

        Every job writes one right after its vendor submit, so concurrent ones share commits.
        """
        if not await self._checkpoints.submit(Checkpoint(fence=fence, state=state)):
            raise LeaseLost(fence.job_id, fence.attempt)

    async def complete(
        self, fence: Fence, *, images: Sequence[StoredImage], cost_usd_micros: int, message: str = "completed"
    ) -> Job:
        """PROCESSING → COMPLETED with the stored images and the actual cost."""
        now = utcnow()
        return await self._fenced_transition(
            fence,
            JobStatus.COMPLETED,
            message,
            {
                "images": [image.to_json() for image in images],
                "cost_usd_micros": cost_usd_micros,
                "end_time": now,
                "lease_owner": None,
                "lease_expires_at": None,
                "next_attempt_at": None,
                "error_code": None,
                "error_message": None,
                "error_retryable": False,
            },
            now,
        )

    async def fail(self, fence: Fence, error: JobError) -> Job:
        """PROCESSING → FAILED; failed jobs cost nothing."""
        now = utcnow()
        return await self._fenced_transition(
            fence,
            JobStatus.FAILED,
            f"failed: {error.code}: {error.message}",
            {
                "error_code": error.code,
                "error_message": error.message,
                "error_retryable": error.retryable,
                "cost_usd_micros": 0,
                "end_time": now,
                "lease_owner": None,
                "lease_expires_at": None,
                "next_attempt_at": None,
            },
            now,
        )

    async def retry_later(self, fence: Fence, *, error: JobError, at: datetime, message: str) -> Job:
        """PROCESSING → PENDING until `at`, keeping the attempt's error for watchers to see."""
        return await self._fenced_transition(
            fence,
            JobStatus.PENDING,
            message,
            {
                "error_code": error.code,
                "error_message": error.message,
                "error_retryable": error.retryable,
                "next_attempt_at": at,
                "lease_owner": None,
                "lease_expires_at": None,
            },
            utcnow(),
        )

    async def switch_model(
        self, fence: Fence, *, provider: str, served_model: str, error: JobError | None, message: str
    ) -> Job:
        """PROCESSING → PENDING at once on the next model of the chain, with a fresh count of attempts.

        The previous vendor's checkpoint is dropped: its task ids mean nothing to the next vendor.
        """
        now = utcnow()
        values: dict[str, Any] = {
            "active_provider": provider,
            "served_model": served_model,
            "attempt_base": fence.attempt,
            "provider_state": None,
            "next_attempt_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if error is not None:
            values.update(error_code=error.code, error_message=error.message, error_retryable=error.retryable)
        # the general path: a switch is rare, and it writes a column the one-statement path does not map
        unclaimed = Fence(job_id=fence.job_id, attempt=fence.attempt, owner=fence.owner)
        return await self._fenced_transition(unclaimed, JobStatus.PENDING, message, values, now)

    async def wait_for_vendor(
        self, fence: Fence, *, at: datetime, error: JobError, message: str, attempt_base: int
    ) -> Job:
        """PROCESSING → PENDING until `at` without spending an attempt (the vendor's breaker is open):
        `attempt_base` is the job's, plus one for the claim that did not run."""
        return await self._fenced_transition(
            fence,
            JobStatus.PENDING,
            message,
            {
                "error_code": error.code,
                "error_message": error.message,
                "error_retryable": error.retryable,
                "next_attempt_at": at,
                "lease_owner": None,
                "lease_expires_at": None,
                "attempt_base": attempt_base,
            },
            utcnow(),
        )

    async def release(self, fence: Fence, *, message: str) -> Job:
        """PROCESSING → PENDING at once: a worker shutting down hands its job back."""
        now = utcnow()
        return await self._fenced_transition(
            fence,
            JobStatus.PENDING,
            message,
            {"next_attempt_at": now, "lease_owner": None, "lease_expires_at": None},
            now,
        )

    # ---------------------------------------------------------------- internals

    async def _by_request_id(self, account_id: str, request_id: str) -> Row[Any] | None:
        async with self._db.connection() as conn:
            return (
                await conn.execute(
                    select(jobs).where(jobs.c.account_id == account_id, jobs.c.request_id == request_id)
                )
            ).first()

    @staticmethod
    def _idempotent(row: Row[Any], request_id: str, request_hash: str) -> Job:
        job = job_from_row(row)
        if row.request_hash != request_hash:
            raise IdempotencyConflict(request_id, job.id)
        return job

    async def _fenced_transition(
        self, fence: Fence, status: JobStatus, message: str, values: dict[str, Any], now: datetime
    ) -> Job:
        assert status in ALLOWED_TRANSITIONS[JobStatus.PROCESSING]
        if fence.claimed is not None:
            job = await self._dialect.claimed_transition(fence, fence.claimed, status, message, values, now)
            if job is not None:
                self._committed([job])
                return job
            # the row changed since the claim, or is no longer this attempt's: the general path decides
        async with self._db.transaction() as conn:
            row = (
                await conn.execute(
                    update(jobs)
                    .where(*fenced(fence))
                    .values(
                        status=status.value,
                        version=jobs.c.version + 1,
                        update_time=now,
                        message=message,
                        **values,
                    )
                    .returning(*jobs.c)
                )
            ).first()
            if row is None:
                raise LeaseLost(fence.job_id, fence.attempt)
            job = job_from_row(row)
            await self._dialect.record_events(conn, [(job, JobStatus.PROCESSING)])
            await settle(conn, job, now)
        self._committed([job])
        return job

    async def _update(
        self,
        conn: AsyncConnection,
        current: Job,
        status: JobStatus,
        message: str,
        *,
        values: dict[str, Any],
        now: datetime,
    ) -> Job:
        if status not in ALLOWED_TRANSITIONS[current.status]:
            raise InvalidTransition(current.id, current.status.value, f"become {status.value}")
        row = (
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == current.id)
                .values(
                    status=status.value,
                    version=jobs.c.version + 1,
                    update_time=now,
                    message=message,
                    **values,
                )
                .returning(*jobs.c)
            )
        ).one()
        job = job_from_row(row)
        await self._dialect.record_events(conn, [(job, current.status)])
        await settle(conn, job, now)
        return job

    def _committed(self, changed: Sequence[Job]) -> None:
        if self._on_commit is not None and changed:
            self._on_commit([notice(job) for job in changed])


async def _taken_request_ids(conn: AsyncConnection, batch: Sequence[Submit]) -> set[tuple[str, str]]:
    """(account, request_id) of this batch's submits whose request_id a job already holds.

    Read under the budget rows' locks, which every create of a budgeted account takes first; only that
    path asks (an account without a budget gets its job back from the insert's conflict).
    """
    keys = {(item.job.account_id, item.job.request_id) for item in batch if item.job.request_id}
    if not keys:
        return set()
    rows = await conn.execute(
        select(jobs.c.account_id, jobs.c.request_id).where(
            jobs.c.account_id.in_({account for account, _ in keys}),
            jobs.c.request_id.in_({request_id for _, request_id in keys}),
        )
    )
    return {(row.account_id, row.request_id) for row in rows} & keys

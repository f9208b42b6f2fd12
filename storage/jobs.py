"""The job store: the jobs table is the queue, and every transition writes its event in the same transaction.

One implementation serves PostgreSQL and SQLite. On PostgreSQL, claims skip rows other workers hold
(`FOR UPDATE SKIP LOCKED`) and each transaction NOTIFYs the event hub of every process; on SQLite the
engine has one connection, which makes the same statements single-writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy import Row, and_, bindparam, func, insert, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.db import is_postgres
from storage.errors import (
    IdempotencyConflict,
    InsufficientCredit,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    NoBudget,
    StorageError,
    StoreUnavailable,
)
from storage.models import (
    ALLOWED_TRANSITIONS,
    NOTICES_PER_NOTIFY,
    Job,
    JobError,
    JobEvent,
    JobNotice,
    JobSpec,
    JobStatus,
    LedgerEntry,
    NewJob,
    StoredImage,
    utcnow,
)
from storage.schema import accounts, job_events, jobs, ledger

log = logging.getLogger(__name__)

#: the NOTIFY channel every process LISTENs on
NOTIFY_CHANNEL = "imagegen_events"
#: the advisory lock that serialises capped claims across replicas ("imagegen" in ASCII, as a number)
_CLAIM_LOCK_KEY = 0x696D61676567656E

_T = TypeVar("_T")
_R = TypeVar("_R")

#: JSON text for the driver's statements, from one shared encoder: `json.dumps` with arguments builds an
#: encoder per call, and a submit encodes six values. No circular check: these are plain data.
_json_text = json.JSONEncoder(check_circular=False).encode
#: the canonical text of a spec, whose digest is stored with each job: it must never change
_canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=False
).encode


@dataclass(frozen=True, kw_only=True)
class Fence:
    """Who may write a processing job: the worker that claimed it, for that attempt only."""

    job_id: uuid.UUID
    attempt: int
    owner: str
    #: the job as this attempt claimed it, if the writer has it: a transition then writes the new state
    #: and its event without reading the row first (on PostgreSQL in one statement), on condition that
    #: the row's version is still the claimed one; otherwise it takes the general path
    claimed: Job | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A job a worker just took."""

    job: Job
    #: whether the job was taken over from a worker whose lease expired (rather than taken from the queue)
    taken_over: bool


@dataclass(frozen=True, kw_only=True)
class ConcurrencyCap:
    """At most `max_tasks` vendor tasks (variants) of these models may run at once, across all replicas."""

    name: str
    providers: frozenset[str]
    max_tasks: int


@dataclass(frozen=True, kw_only=True)
class QueueStats:
    """The queue at a glance, for metrics and alerts."""

    pending: int
    processing: int
    #: seconds since the oldest due pending job became due (0 when none is due)
    oldest_due_pending_age_s: float


@dataclass(frozen=True, kw_only=True)
class PageCursor:
    """Where a ListJobs page ends: the last job's (create_time, id)."""

    create_time: datetime
    job_id: uuid.UUID


@dataclass(frozen=True, kw_only=True)
class JobFilter:
    """ListJobs / catch-up filters; empty fields match everything."""

    statuses: frozenset[JobStatus] = frozenset()
    provider: str = ""
    #: "" matches every folder; "root" is stored as ""
    folder_id: str | None = None


@dataclass(kw_only=True)
class _Submit:
    """One GenerateImage waiting for its commit."""

    job: Job
    request_hash: str


@dataclass(frozen=True, kw_only=True)
class _Checkpoint:
    """One adapter checkpoint waiting for its commit."""

    fence: Fence
    state: Mapping[str, Any]


#: how long a group commit waits for more writes before it writes, while its event loop is saturated
GROUP_COMMIT_LINGER_S = 0.003
#: how long a group commit's writer keeps its pooled connection with nothing to write (`_HeldConnection`)
GROUP_COMMIT_HOLD_S = 0.05
#: the smallest pool a writer keeps a connection from: two writers then hold at most half of it
HOLD_MIN_POOL_SIZE = 4
#: the share of wall time the event loop's thread must lately have been runnable to count as saturated
SATURATED_SHARE = 0.8


#: Linux's scheduler times of the calling thread (absent without the scheduler's statistics)
_SCHEDSTAT = "/proc/thread-self/schedstat"
_HAS_SCHEDSTAT = os.path.exists(_SCHEDSTAT)


def thread_runnable_time() -> float:
    """Seconds the calling thread has been runnable: on a core, or waiting in the run queue for one.

    Its CPU time where the scheduler's times cannot be read (not Linux).
    """
    if _HAS_SCHEDSTAT:
        try:
            with open(_SCHEDSTAT, "rb") as stat:
                on_cpu_ns, waiting_ns, _ = stat.read().split()
            return (int(on_cpu_ns) + int(waiting_ns)) / 1e9
        except (OSError, ValueError):  # never seen; a writer must not fail for want of a load figure
            pass
    return time.thread_time()


class ThreadLoad:
    """How busy the calling thread has lately been: the share of wall time it was runnable (on a core or
    waiting for one), sampled again at most every `period_s`. Asked from the event loop's thread, it tells
    a saturated loop from an idle one.

    Runnable rather than CPU time, because a saturated loop whose process competes for cores runs less
    than it would. On this project's 2-core machine, with the client and PostgreSQL beside the server, the
    loop's thread used 0.70-0.81 of a core at the submit benchmark's saturation and 0.63-0.67 at half that
    rate, so CPU time rarely reached `SATURATED_SHARE`: batches there held 4.7-6.8 submits, where they
    hold 14.5-17.3 now. The thread was runnable 0.89-1.0 of the time at saturation and 0.78-0.89 at half
    rate. A sample reads a small file (5 µs), at most once a period.
    """

    def __init__(
        self,
        *,
        period_s: float = 0.05,
        wall_clock: Callable[[], float] = time.monotonic,
        busy_clock: Callable[[], float] = thread_runnable_time,
    ) -> None:
        self._period_s = period_s
        self._wall_clock, self._busy_clock = wall_clock, busy_clock
        self._since: tuple[float, float] | None = None  # (wall, busy), taken by the thread that asks
        self._share = 0.0

    def share(self) -> float:
        """Runnable seconds per second over the last full period (0.0 until one has passed)."""
        wall = self._wall_clock()
        if self._since is None:
            self._since = (wall, self._busy_clock())
        elif wall - self._since[0] >= self._period_s:
            busy = self._busy_clock()
            self._share = (busy - self._since[1]) / (wall - self._since[0])
            self._since = (wall, busy)
        return self._share

    def saturated(self) -> bool:
        """Whether the thread has lately been runnable `SATURATED_SHARE` of the time or more."""
        return self.share() >= SATURATED_SHARE


class _HeldConnection:
    """A pooled connection that one writer keeps between its batches, for asyncpg statements.

    Checking a connection out of SQLAlchemy's pool and back in (its AsyncConnection, the greenlet hops,
    the check-in's shielded task) was a quarter of a batch's cost on the client side: counted with
    callgrind over sequential creates, 1.22M instructions each with a checkout per batch and 0.91M with
    one connection kept. At moderate load batches hold one to three submits, so that was paid for nearly
    every submit. A group commit's writer therefore checks one out at its first batch and keeps it while
    writes keep coming, giving it back once it has had nothing to write for `GROUP_COMMIT_HOLD_S`.

    Only asyncpg statements run on it, each its own transaction, never SQLAlchemy's (which would
    autobegin one that stayed open). A lost connection is invalidated and the next batch checks out
    another; one whose socket closed meanwhile (a database restart) is given back unused.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._in_use = False

    @contextlib.asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """The kept asyncpg connection, checked out first if there is none (or it has closed)."""
        assert not self._in_use, "a held connection serves one writer, one statement at a time"
        if self._driver is not None and self._driver.is_closed():
            await self.release(invalidate=True)
        if self._driver is None:
            async with _unavailable_on_connection_errors():
                conn = await self._engine.connect()
                try:
                    self._driver = (await conn.get_raw_connection()).driver_connection
                except BaseException:
                    await conn.close()
                    raise
            self._conn = conn
        self._in_use = True
        try:
            yield self._driver
        except Exception as exc:
            if not _is_lost_connection(exc):
                raise
            await self.release(invalidate=True)
            raise StoreUnavailable(f"database unreachable: {exc!s}") from exc
        finally:
            self._in_use = False

    async def release(self, *, invalidate: bool = False) -> None:
        """Give the connection back to the pool (or discard it); the next statement checks one out."""
        conn, self._conn, self._driver = self._conn, None, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # a connection that cannot be returned is the pool's to drop
            if invalidate:
                await conn.invalidate()
            await conn.close()


class _GroupCommit(Generic[_T, _R]):
    """Shares commits between concurrent writes of one kind: one writer takes whatever arrived while it
    last wrote.

    A lone write is made at once; under load, writes that arrive during a commit form the next batch, so
    the cost of a round trip, a transaction and a pooled connection is shared. Each caller is answered
    only when the transaction holding its write has committed.

    While the event loop is saturated the writer first lingers `linger_s` for more writes. Without that,
    batches stay small however busy the process is: grpc.aio admits one RPC per few loop iterations, so
    submits reach the store one at a time, and a batch held 1.2 to 1.5 submits at 1,700 RPC/s. Measured
    alone, a batch of one cost 0.9 ms of CPU per job (client and PostgreSQL together), a batch of 16
    0.15 ms, and CPU is what a saturated process lacks. The linger is small beside the queueing such a
    process has anyway; a process with CPU to spare does not linger.

    With `held` (the connection its writes run on), the writer stays for `hold_s` after its last batch
    in case more writes come, and gives the connection back when it leaves (`_HeldConnection`).
    """

    def __init__(
        self,
        write: Callable[[Sequence[_T]], Awaitable[Sequence[_R | Exception]]],
        *,
        name: str,
        max_batch: int = 128,
        writers: int = 1,
        linger_s: float = GROUP_COMMIT_LINGER_S,
        saturated: Callable[[], bool] | None = None,
        held: _HeldConnection | None = None,
        hold_s: float = GROUP_COMMIT_HOLD_S,
    ) -> None:
        assert held is None or writers == 1, "one held connection serves one writer"
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._writers_allowed = writers
        self._linger_s = linger_s
        self._saturated = saturated or ThreadLoad().saturated
        self._held = held
        self._hold_s = hold_s if held is not None else 0.0
        self._waiting: list[tuple[_T, asyncio.Future[_R]]] = []
        self._writers: set[asyncio.Task[None]] = set()
        #: set while a writer waits for more writes with its connection held; a submit wakes it
        self._idle: asyncio.Future[None] | None = None

    async def submit(self, item: _T) -> _R:
        """Queue `item` for the next commit and wait for its outcome."""
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._idle is not None:
            _settle(self._idle)
        elif len(self._writers) < self._writers_allowed:
            # One writer: a second (one batch built while the other waits on the database) measured
            # worse for submits on 2 cores, 1,120 against 1,527 RPC/s, since smaller batches cost more.
            self._writers.add(asyncio.create_task(self._drain(), name=self._name))
        # A caller that goes away cancels only its own future: the commit is the writer's task, shared
        # with others, and goes on (no shield needed, and none paid for: a future and a loop hop per write).
        return await future

    async def close(self) -> None:
        """Stop keeping connections: wake a writer that waits for more, and wait for every writer."""
        self._hold_s = 0.0
        if self._idle is not None:
            _settle(self._idle)
        while self._writers:
            await asyncio.wait(list(self._writers))

    async def _drain(self) -> None:
        try:
            while self._waiting:
                try:
                    while await self._more():
                        await self._write_batch()
                finally:
                    if self._held is not None:
                        await self._held.release()
                # A submit that came while the connection went back is in `_waiting`: write it too.
        finally:
            # Leave in the step that found nothing waiting. A done callback would run steps later, and a
            # submit in between would count this writer as running and wait for the next submit's.
            self._writers.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _more(self) -> bool:
        """Whether there is a write to make, waiting up to `hold_s` for one when the connection is held."""
        if not self._waiting and self._hold_s:
            loop = asyncio.get_running_loop()
            self._idle = loop.create_future()
            timer = loop.call_later(self._hold_s, _settle, self._idle)
            try:
                await self._idle
            finally:
                timer.cancel()
                self._idle = None
        return bool(self._waiting)

    async def _write_batch(self) -> None:
        if self._linger_s and len(self._waiting) < self._max_batch and self._saturated():
            await asyncio.sleep(self._linger_s)
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        try:
            outcomes: Sequence[_R | Exception] = await self._write([item for item, _ in batch])
        except Exception as exc:  # the whole transaction failed: every write in it did
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SqlJobStore:
    """Jobs and their events in PostgreSQL or SQLite."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_commit: Callable[[Sequence[JobNotice]], None] | None = None,
        hold_s: float = GROUP_COMMIT_HOLD_S,
    ):
        self._engine = engine
        self._postgres = is_postgres(engine)
        self._on_commit = on_commit
        # Each writer keeps its connection between batches where the pool can spare two (PostgreSQL).
        pool_size = getattr(engine.sync_engine.pool, "size", lambda: 0)()
        holds = self._postgres and pool_size >= HOLD_MIN_POOL_SIZE
        self._create_conn = _HeldConnection(engine) if holds else None
        self._checkpoint_conn = _HeldConnection(engine) if holds else None
        self._creates = _GroupCommit[_Submit, tuple[Job, bool]](
            self._create_batch, name="create-commit", held=self._create_conn, hold_s=hold_s
        )
        # No linger for checkpoints: from a vendor accepting a task to the commit of its id, a crash pays
        # for the task twice, so that window stays as short as a commit (one per job; not the hot path).
        self._checkpoints = _GroupCommit[_Checkpoint, bool](
            self._save_provider_states,
            name="checkpoint-commit",
            linger_s=0.0,
            held=self._checkpoint_conn,
            hold_s=hold_s,
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine (for health checks and the event listener)."""
        return self._engine

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
        InsufficientCredit. Concurrent calls share commits (see `_GroupCommit`).
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
            message="accepted",
            expire_time=now + timedelta(seconds=new.expire_after_s) if new.expire_after_s else None,
        )
        return await self._creates.submit(_Submit(job=job, request_hash=spec_hash(new.spec)))

    async def _create_batch(self, batch: Sequence[_Submit]) -> list[tuple[Job, bool] | Exception]:
        """Create many jobs in one transaction; each submit gets its own outcome."""
        outcomes: list[tuple[Job, bool] | Exception | None] = [None] * len(batch)
        created: list[Job] = []
        conflicted: list[int] = []
        if self._postgres:
            inserted = await self._create_batch_unbudgeted(batch)
            if inserted is not None:
                for index, item in enumerate(batch):
                    if item.job.id in inserted:
                        created.append(item.job)
                        outcomes[index] = (item.job, True)
                    else:
                        conflicted.append(index)
                self._committed(created)
                return await self._answer_conflicts(batch, outcomes, conflicted)
        async with self._transaction() as conn:
            budgets = await self._lock_budgets(conn, [item.job for item in batch])
            spent: dict[str, int] = {}
            rows: list[dict[str, Any]] = []
            planned: list[int] = []
            for index, item in enumerate(batch):
                job, quote = item.job, item.job.estimated_cost_usd_micros
                balance = budgets.get(job.account_id)
                if balance is not None and quote > 0:
                    left = balance - spent.get(job.account_id, 0)
                    if left < quote:
                        outcomes[index] = InsufficientCredit(job.account_id, left, quote)
                        continue
                    spent[job.account_id] = spent.get(job.account_id, 0) + quote
                    job = item.job = job.evolve(reserved_usd_micros=quote)
                rows.append(_job_values(job, item.request_hash))
                planned.append(index)
            inserted = await self._insert_jobs(conn, rows) if rows else set()
            ledger_rows: list[dict[str, Any]] = []
            for index in planned:
                job = batch[index].job
                if job.id not in inserted:  # its request_id was taken: answered after the commit
                    conflicted.append(index)
                    if job.reserved_usd_micros:  # not created, so not reserved after all
                        spent[job.account_id] -= job.reserved_usd_micros
                    continue
                created.append(job)
                outcomes[index] = (job, True)
                if job.reserved_usd_micros:
                    ledger_rows.append(
                        {
                            "account_id": job.account_id,
                            "job_id": job.id,
                            "kind": "reserve",
                            "amount_usd_micros": -job.reserved_usd_micros,
                            "time": job.create_time,
                            "note": "quoted at submit",
                        }
                    )
            await self._spend(conn, budgets, spent, ledger_rows)
            if created:
                await self._record_events(conn, [(job, None) for job in created])
        self._committed(created)
        return await self._answer_conflicts(batch, outcomes, conflicted)

    async def _create_batch_unbudgeted(self, batch: Sequence[_Submit]) -> set[uuid.UUID] | None:
        """PostgreSQL, in one round trip: insert the jobs, their events and NOTIFYs; the ids inserted.

        One statement is its own transaction, so the batch costs one round trip instead of six (BEGIN,
        insert jobs, insert events, NOTIFY, COMMIT and the budget lock), which measured as most of
        a submit's latency under load. It applies only when no account in the batch has a budget: then
        it writes nothing and returns None, and the caller reserves credit in a transaction of its own.
        (A budget set while this runs is not seen by it; its jobs are then as if submitted just before.
        A batch with a budgeted account pays for this statement's read of `accounts` before the fallback.)
        """
        rows = [_created_row(item.job, item.request_hash) for item in batch]
        first = _job_values(batch[0].job, batch[0].request_hash)
        alike = {name: first[name] for name in _CREATED_ALIKE}
        budgeted = sorted({item.job.account_id for item in batch if item.job.estimated_cost_usd_micros > 0})
        statement = _create_statement(tuple(rows[0]))
        async with self._writer_connection(self._create_conn) as pg:
            row = await pg.fetchrow(statement, budgeted, NOTIFY_CHANNEL, _json_text(rows), _json_text(alike))
        assert row is not None
        if row["budgeted"]:
            return None
        return set(row["created"])

    async def _answer_conflicts(
        self,
        batch: Sequence[_Submit],
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

    async def _lock_budgets(self, conn: AsyncConnection, new_jobs: Sequence[Job]) -> dict[str, int]:
        """The balances of the budgeted accounts among these jobs' accounts, locked (in a stable order)."""
        accounts_ids = sorted({job.account_id for job in new_jobs if job.estimated_cost_usd_micros > 0})
        if not accounts_ids:
            return {}
        rows = await conn.execute(
            select(accounts.c.account_id, accounts.c.balance_usd_micros)
            .where(accounts.c.account_id.in_(accounts_ids))
            .order_by(accounts.c.account_id)
            .with_for_update()
        )
        return {row.account_id: row.balance_usd_micros for row in rows}

    async def _insert_jobs(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
        """Insert jobs, skipping any whose (account, request_id) exists; returns the ids inserted."""
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        # executemany form: compiled once and cached (a multi-row VALUES statement differs per batch size)
        statement = (
            dialect_insert(jobs)
            .on_conflict_do_nothing(index_elements=[jobs.c.account_id, jobs.c.request_id])
            .returning(jobs.c.id)
        )
        return {row.id for row in await conn.execute(statement, rows)}

    async def _spend(
        self,
        conn: AsyncConnection,
        budgets: Mapping[str, int],
        spent: Mapping[str, int],
        ledger_rows: list[dict[str, Any]],
    ) -> None:
        """Write the reservations: new balances, and a ledger row per job with the balance after it."""
        if not ledger_rows:
            return
        running = dict(budgets)
        for row in ledger_rows:
            running[row["account_id"]] += row["amount_usd_micros"]
            row["balance_usd_micros"] = running[row["account_id"]]
        now = ledger_rows[-1]["time"]
        await conn.execute(
            update(accounts)
            .where(accounts.c.account_id == bindparam("b_account"))
            .values(balance_usd_micros=bindparam("b_balance"), update_time=now),
            [
                {"b_account": account, "b_balance": budgets[account] - amount}
                for account, amount in spent.items()
                if amount
            ],
        )
        await conn.execute(insert(ledger), ledger_rows)

    async def get(self, account_id: str, job_id: uuid.UUID) -> Job:
        """The job, if it belongs to the account; JobNotFound otherwise."""
        async with self._connection() as conn:
            row = (
                await conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.account_id == account_id))
            ).first()
        if row is None:
            raise JobNotFound(job_id)
        return _job_from_row(row)

    async def list(
        self,
        account_id: str,
        *,
        page_size: int,
        after: PageCursor | None = None,
        where: JobFilter = JobFilter(),
    ) -> tuple[list[Job], PageCursor | None]:
        """One page of the account's jobs, newest first, and the cursor of the next page (None at the end)."""
        query = select(jobs).where(jobs.c.account_id == account_id, *_filter_clauses(where))
        if after is not None:
            query = query.where(
                tuple_(jobs.c.create_time, jobs.c.id) < tuple_(after.create_time, after.job_id)
            )
        query = query.order_by(jobs.c.create_time.desc(), jobs.c.id.desc()).limit(page_size + 1)
        async with self._connection() as conn:
            rows = (await conn.execute(query)).all()
        page = [_job_from_row(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        cursor = PageCursor(create_time=page[-1].create_time, job_id=page[-1].id) if more and page else None
        return page, cursor

    async def cancel(
        self, account_id: str, job_id: uuid.UUID, *, message: str = "cancelled by the caller"
    ) -> tuple[Job, bool]:
        """Cancel a pending or processing job; returns (job, whether this call cancelled it).

        A cancelled job is returned as it is (idempotent).

        A processing job's worker finds its lease gone at its next fenced write and discards the result.
        Completed and failed jobs raise InvalidTransition.
        """
        async with self._transaction() as conn:
            row = (
                await conn.execute(
                    select(jobs).where(jobs.c.id == job_id, jobs.c.account_id == account_id).with_for_update()
                )
            ).first()
            if row is None:
                raise JobNotFound(job_id)
            current = _job_from_row(row)
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
        now = utcnow()
        if not self._postgres:
            return await self._claim_in_python(
                owner=owner, limit=limit, lease_s=lease_s, caps=caps, per_account=per_account, now=now
            )
        arguments = (owner, now + timedelta(seconds=lease_s), NOTIFY_CHANNEL)
        if caps or per_account:
            async with self._transaction() as conn:
                rows = await self._claimable(conn, now=now, limit=limit, caps=caps, per_account=per_account)
                if not rows:
                    return []
                result = await conn.exec_driver_sql(
                    _claim_statement(_CLAIM_PICKED), (now, [row.id for row in rows], *arguments)
                )
                records: Sequence[Any] = [row._mapping for row in result]
        else:
            async with self._driver_connection() as pg:
                records = await pg.fetch(_claim_statement(_CLAIM_DUE), now, limit, *arguments)
        claims = [
            Claim(
                job=_job_from_row(record), taken_over=record["previous_status"] == JobStatus.PROCESSING.value
            )
            for record in records
        ]
        self._committed([claim.job for claim in claims])
        return claims

    async def _claim_in_python(
        self,
        *,
        owner: str,
        limit: int,
        lease_s: float,
        caps: Sequence[ConcurrencyCap],
        per_account: int,
        now: datetime,
    ) -> list[Claim]:
        """`claim` in steps, for SQLite: what `_claim_statement` does on PostgreSQL."""
        async with self._transaction() as conn:
            rows = await self._claimable(conn, now=now, limit=limit, caps=caps, per_account=per_account)
            if not rows:
                return []
            claimed: list[Job] = []
            taken_over: list[bool] = []
            transitions: list[tuple[Job, JobStatus | None]] = []
            for row in rows:
                before = _job_from_row(row)
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
            await self._record_events(conn, transitions)
        self._committed(claimed)
        return [Claim(job=job, taken_over=over) for job, over in zip(claimed, taken_over, strict=True)]

    async def _claimable(
        self,
        conn: AsyncConnection,
        *,
        now: datetime,
        limit: int,
        caps: Sequence[ConcurrencyCap],
        per_account: int,
    ) -> list[Row[Any]]:
        runnable = select(jobs).where(
            or_(
                and_(jobs.c.status == JobStatus.PENDING.value, jobs.c.next_attempt_at <= now),
                and_(jobs.c.status == JobStatus.PROCESSING.value, jobs.c.lease_expires_at < now),
            )
        )

        def first(query: Any, count: int) -> Any:
            return query.order_by(jobs.c.next_attempt_at).limit(count).with_for_update(skip_locked=True)

        capped = {provider for cap in caps for provider in cap.providers}
        if (caps or per_account) and self._postgres:
            # Counting what runs and claiming within a cap must not interleave across replicas, or two
            # could each see room for the last slot.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
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
            full = sorted(
                account for account, running in running_by_account.items() if running >= per_account
            )
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

    async def reap(self, *, limit: int = 100) -> list[Job]:
        """Tidy what no worker is tending: expired leases back to the queue, overdue jobs failed (free).

        Workers also take expired leases over when they claim; the reaper makes sure a job is never
        shown as PROCESSING without a live lease, and that no job outlives its deadline, even while no
        worker runs.
        """
        now = utcnow()
        changed: list[Job] = []
        async with self._transaction() as conn:
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
                current = _job_from_row(row)
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

    async def submitted_since(
        self, account_id: str, since: datetime, *, up_to: int
    ) -> tuple[int, datetime | None]:
        """How many jobs the account created since `since` (counted up to `up_to`), and the oldest of them."""
        async with self._connection() as conn:
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
        async with self._connection() as conn:
            inner = (
                select(jobs.c.id)
                .where(jobs.c.account_id == account_id, jobs.c.status == JobStatus.PENDING.value)
                .limit(up_to)
                .subquery()
            )
            return int((await conn.execute(select(func.count()).select_from(inner))).scalar_one())

    async def extend_leases(
        self, owner: str, job_ids: Sequence[uuid.UUID], *, lease_s: float
    ) -> set[tuple[uuid.UUID, int]]:
        """Extend `owner`'s leases on these jobs; returns the (job id, attempt) pairs it still holds.

        Only the jobs a worker is actually running: a job whose attempt ended without a final write
        (the database was unreachable) must see its lease run out, so that another attempt takes it.
        """
        until = utcnow() + timedelta(seconds=lease_s)
        if self._postgres:
            # one array parameter: an IN list of thousands of ids is compiled and bound one by one
            async with self._driver_connection() as pg:
                rows = await pg.fetch(_EXTEND_LEASES, until, list(job_ids), owner)
            return {(row["id"], row["attempt"]) for row in rows}
        held: set[tuple[uuid.UUID, int]] = set()
        async with self._transaction() as conn:
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

    async def save_provider_state(self, fence: Fence, state: Mapping[str, Any]) -> None:
        """Keep an adapter's checkpoint (vendor task ids) with the job; LeaseLost if no longer held.

        Every job writes one right after its vendor submit, so concurrent ones share commits.
        """
        if not await self._checkpoints.submit(_Checkpoint(fence=fence, state=state)):
            raise LeaseLost(fence.job_id, fence.attempt)

    async def _save_provider_states(self, batch: Sequence[_Checkpoint]) -> list[bool]:
        """Write checkpoints; for each, whether its fence still held."""
        if self._postgres and len({item.fence.job_id for item in batch}) == len(batch):
            # one asyncpg statement, its own transaction, rather than BEGIN, UPDATE, COMMIT per job
            async with self._writer_connection(self._checkpoint_conn) as pg:
                rows = await pg.fetch(
                    _SAVE_PROVIDER_STATES,
                    [item.fence.job_id for item in batch],
                    [item.fence.attempt for item in batch],
                    [item.fence.owner for item in batch],
                    [_json_text(dict(item.state)) for item in batch],
                )
            saved = {row["id"] for row in rows}
            return [item.fence.job_id in saved for item in batch]
        outcomes = []
        async with self._transaction() as conn:  # in order: a job's later checkpoint wins
            for item in batch:
                result = await conn.execute(
                    update(jobs).where(*_fenced(item.fence)).values(provider_state=dict(item.state))
                )
                outcomes.append(result.rowcount == 1)
        return outcomes

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

    # ---------------------------------------------------------------- watchers

    async def events(
        self, job_id: uuid.UUID, *, after_version: int, up_to: int | None = None
    ) -> list[JobEvent]:
        """The job's events with version > after_version (and ≤ up_to), oldest first."""
        query = select(job_events).where(job_events.c.job_id == job_id, job_events.c.version > after_version)
        if up_to is not None:
            query = query.where(job_events.c.version <= up_to)
        async with self._connection() as conn:
            rows = (await conn.execute(query.order_by(job_events.c.version))).all()
        return [_event_from_row(row) for row in rows]

    async def events_after(self, bases: Mapping[uuid.UUID, int]) -> dict[uuid.UUID, list[JobEvent]]:
        """For many jobs at once: each job's events with version > its base, oldest first."""
        found: dict[uuid.UUID, list[JobEvent]] = {}
        job_ids = list(bases)
        async with self._connection() as conn:
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
                        found.setdefault(row.job_id, []).append(_event_from_row(row))
        return found

    async def versions(self, job_ids: Sequence[uuid.UUID]) -> list[JobNotice]:
        """The current version of each of these jobs (for the event hub's periodic catch-up)."""
        notices: list[JobNotice] = []
        async with self._connection() as conn:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                rows = await conn.execute(
                    select(jobs.c.id, jobs.c.version, jobs.c.status, jobs.c.account_id).where(
                        jobs.c.id.in_(chunk)
                    )
                )
                notices.extend(_notice_from_row(row) for row in rows)
        return notices

    async def changed_since(self, account_ids: Sequence[str], since: datetime) -> list[JobNotice]:
        """Jobs of these accounts that changed at or after `since` (for the event hub's catch-up)."""
        if not account_ids:
            return []
        async with self._connection() as conn:
            rows = await conn.execute(
                select(jobs.c.id, jobs.c.version, jobs.c.status, jobs.c.account_id).where(
                    jobs.c.update_time >= since, jobs.c.account_id.in_(list(account_ids))
                )
            )
            return [_notice_from_row(row) for row in rows]

    async def queue_stats(self) -> QueueStats:
        """How many jobs wait and run, and how long the oldest due job has waited."""
        now = utcnow()
        async with self._connection() as conn:
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

    # ---------------------------------------------------------------- credits

    async def set_budget(self, account_id: str, balance_usd_micros: int, *, note: str = "") -> int:
        """Give the account a budget of exactly this balance (creating it); returns the balance."""
        return await self._change_budget(account_id, "set", balance_usd_micros, note)

    async def add_credit(self, account_id: str, amount_usd_micros: int, *, note: str = "") -> int:
        """Add (or, negative, take) credit; the account must have a budget. Returns the balance."""
        return await self._change_budget(account_id, "add", amount_usd_micros, note)

    async def budget(self, account_id: str) -> int | None:
        """The account's balance, or None when it has no budget (unlimited)."""
        async with self._connection() as conn:
            return (
                await conn.execute(
                    select(accounts.c.balance_usd_micros).where(accounts.c.account_id == account_id)
                )
            ).scalar_one_or_none()

    async def remove_budget(self, account_id: str) -> bool:
        """Make the account unlimited again; False when it had no budget. Its ledger is kept."""
        async with self._transaction() as conn:
            result = await conn.execute(accounts.delete().where(accounts.c.account_id == account_id))
        return result.rowcount == 1

    async def ledger_entries(self, account_id: str, *, limit: int = 50) -> list[LedgerEntry]:
        """The account's most recent ledger entries, newest first."""
        async with self._connection() as conn:
            rows = (
                await conn.execute(
                    select(ledger)
                    .where(ledger.c.account_id == account_id)
                    .order_by(ledger.c.id.desc())
                    .limit(limit)
                )
            ).all()
        return [LedgerEntry(**row._mapping) for row in rows]

    async def _change_budget(self, account_id: str, kind: str, amount: int, note: str) -> int:
        now = utcnow()
        async with self._transaction() as conn:
            current = (
                await conn.execute(
                    select(accounts.c.balance_usd_micros)
                    .where(accounts.c.account_id == account_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if kind == "set":
                balance, delta = amount, amount - (current or 0)
            elif current is None:
                raise NoBudget(account_id)
            else:
                balance, delta = current + amount, amount
            if current is None:
                await conn.execute(
                    insert(accounts).values(
                        account_id=account_id, balance_usd_micros=balance, create_time=now, update_time=now
                    )
                )
            else:
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.account_id == account_id)
                    .values(balance_usd_micros=balance, update_time=now)
                )
            await conn.execute(
                insert(ledger).values(
                    account_id=account_id,
                    job_id=None,
                    kind=kind,
                    amount_usd_micros=delta,
                    balance_usd_micros=balance,
                    time=now,
                    note=note,
                )
            )
        return balance

    async def _settle(self, conn: AsyncConnection, job: Job, now: datetime) -> None:
        """At a terminal status: return what the job did not cost (everything, unless it completed)."""
        if not job.status.terminal or job.reserved_usd_micros <= 0:
            return
        if job.status is JobStatus.COMPLETED:
            kind, delta = "settle", job.reserved_usd_micros - job.cost_usd_micros
            note = f"cost {job.cost_usd_micros} of {job.reserved_usd_micros} reserved"
        else:
            kind, delta = "refund", job.reserved_usd_micros
            note = f"job {job.status.value}: free"
        balance = (
            await conn.execute(
                update(accounts)
                .where(accounts.c.account_id == job.account_id)
                .values(balance_usd_micros=accounts.c.balance_usd_micros + delta, update_time=now)
                .returning(accounts.c.balance_usd_micros)
            )
        ).scalar_one_or_none()
        if balance is None:
            return  # the budget was removed meanwhile: the account is unlimited now
        await conn.execute(
            insert(ledger).values(
                account_id=job.account_id,
                job_id=job.id,
                kind=kind,
                amount_usd_micros=delta,
                balance_usd_micros=balance,
                time=now,
                note=note,
            )
        )

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        async with self._connection() as conn:
            await conn.execute(text("SELECT 1"))

    # ---------------------------------------------------------------- internals

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        async with _unavailable_on_connection_errors(), self._engine.connect() as conn:
            try:
                yield conn
            except sqlalchemy.exc.DBAPIError as exc:
                await _discard_if_broken(conn, exc)
                raise

    @contextlib.asynccontextmanager
    async def _driver_connection(self) -> AsyncIterator[Any]:
        """A pooled connection's asyncpg connection, for statements SQLAlchemy would cost too much on.

        asyncpg's errors are not SQLAlchemy's: a lost connection or a timeout (`_is_lost_connection`, the
        test the SQLAlchemy path applies too) becomes StoreUnavailable, and the connection is invalidated
        rather than returned to the pool.
        """
        async with self._connection() as conn:
            raw = await conn.get_raw_connection()
            try:
                yield raw.driver_connection
            except Exception as exc:
                if not _is_lost_connection(exc):
                    raise
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise StoreUnavailable(f"database unreachable: {exc!s}") from exc

    def _writer_connection(self, held: _HeldConnection | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """A group commit writer's asyncpg connection: the one it keeps, if it keeps one."""
        return held.driver() if held is not None else self._driver_connection()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with _unavailable_on_connection_errors(), self._engine.connect() as conn:
            try:
                async with conn.begin():
                    yield conn
            except sqlalchemy.exc.DBAPIError as exc:
                await _discard_if_broken(conn, exc)
                raise

    async def _by_request_id(self, account_id: str, request_id: str) -> Row[Any] | None:
        async with self._connection() as conn:
            return (
                await conn.execute(
                    select(jobs).where(jobs.c.account_id == account_id, jobs.c.request_id == request_id)
                )
            ).first()

    @staticmethod
    def _idempotent(row: Row[Any], request_id: str, request_hash: str) -> Job:
        job = _job_from_row(row)
        if row.request_hash != request_hash:
            raise IdempotencyConflict(request_id, job.id)
        return job

    async def _fenced_transition(
        self, fence: Fence, status: JobStatus, message: str, values: dict[str, Any], now: datetime
    ) -> Job:
        assert status in ALLOWED_TRANSITIONS[JobStatus.PROCESSING]
        if self._postgres and fence.claimed is not None and fence.claimed.reserved_usd_micros == 0:
            job = await self._claimed_transition(fence, fence.claimed, status, message, values, now)
            if job is not None:
                self._committed([job])
                return job
            # the row changed since the claim, or is no longer this attempt's: the general path decides
        async with self._transaction() as conn:
            row = (
                await conn.execute(
                    update(jobs)
                    .where(*_fenced(fence))
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
            job = _job_from_row(row)
            await self._record_events(conn, [(job, JobStatus.PROCESSING)])
            await self._settle(conn, job, now)
        self._committed([job])
        return job

    async def _claimed_transition(
        self,
        fence: Fence,
        claimed: Job,
        status: JobStatus,
        message: str,
        values: dict[str, Any],
        now: datetime,
    ) -> Job | None:
        """PostgreSQL, in one round trip: the fenced update, its event and its NOTIFY; None if not written.

        Every job ends with one of these, so it is one statement (its own transaction) rather than the
        six round trips of the general path. The new state is the claimed job with `values` applied,
        which is what the row holds as long as its version is the claimed one; the statement checks
        that, and writes nothing otherwise. Jobs holding a credit reservation take the general path,
        which settles it in the same transaction.
        """
        changes = _job_fields(values)
        job = claimed.evolve(
            status=status, version=claimed.version + 1, update_time=now, message=message, **changes
        )
        columns = tuple(values)
        async with self._driver_connection() as pg:
            row = await pg.fetchrow(
                _transition_statement(columns),
                status.value,
                message,
                now,
                fence.job_id,
                fence.attempt,
                fence.owner,
                claimed.version,
                NOTIFY_CHANNEL,
                _json_text(job_to_json(job)),
                _notice(job).encode(),
                *(_json_text(values[name]) if name in _JSON_COLUMNS else values[name] for name in columns),
            )
        if row is None:
            return None
        # the one column a processing job changes without a new version (the adapter's checkpoint)
        return job.evolve(provider_state=row["provider_state"])

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
        job = _job_from_row(row)
        await self._record_events(conn, [(job, current.status)])
        await self._settle(conn, job, now)
        return job

    async def _record_events(
        self, conn: AsyncConnection, transitions: Sequence[tuple[Job, JobStatus | None]]
    ) -> None:
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
        if self._postgres:
            # Delivered to every LISTENing process when (and only if) this transaction commits.
            lines = [_notice(job).encode() for job, _ in transitions]
            payloads = [
                "\n".join(lines[start : start + NOTICES_PER_NOTIFY])
                for start in range(0, len(lines), NOTICES_PER_NOTIFY)
            ]
            await conn.execute(
                text("SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"),
                {"channel": NOTIFY_CHANNEL, "payloads": payloads},
            )

    def _committed(self, changed: Sequence[Job]) -> None:
        if self._on_commit is not None and changed:
            self._on_commit([_notice(job) for job in changed])


def spec_hash(spec: JobSpec) -> str:
    """A digest of the canonical request, to tell a retried submit from a different one."""
    return hashlib.sha256(_canonical_json(spec.to_json()).encode()).hexdigest()


@contextlib.asynccontextmanager
async def _unavailable_on_connection_errors() -> AsyncIterator[None]:
    try:
        yield
    except sqlalchemy.exc.DBAPIError as exc:
        if (
            exc.connection_invalidated
            or isinstance(exc, sqlalchemy.exc.InterfaceError)
            or _is_connection_error(exc)
        ):
            raise StoreUnavailable(f"database unreachable: {exc.orig!s}") from exc
        raise
    except (OSError, TimeoutError, sqlalchemy.exc.TimeoutError) as exc:
        raise StoreUnavailable(f"database unreachable: {exc!s}") from exc


async def _discard_if_broken(conn: AsyncConnection, exc: sqlalchemy.exc.DBAPIError) -> None:
    """A connection whose driver lost track of its state must not go back to the pool."""
    if _is_connection_error(exc) and not conn.invalidated:
        with contextlib.suppress(Exception):
            await conn.invalidate()


def _is_connection_error(exc: sqlalchemy.exc.DBAPIError) -> bool:
    cause = getattr(exc.orig, "__cause__", None)
    return _is_lost_connection(exc.orig) or (cause is not None and _is_lost_connection(cause))


def _is_lost_connection(error: BaseException) -> bool:
    """Whether a driver error means "this connection is gone; try again later" rather than a bad statement.

    PostgreSQL's SQLSTATE class 08 (connection exception) and 57P (operator intervention: admin shutdown,
    terminated backend), socket errors and timeouts, and asyncpg's client-side state errors ("another
    operation is in progress", after a query was interrupted or its server connection cut): the
    connection is unusable, the database may be fine.
    """
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(("08", "57P")):
        return True
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(error).__name__ in ("InternalClientError", "InterfaceError")


def _fenced(fence: Fence) -> list[Any]:
    return [
        jobs.c.id == fence.job_id,
        jobs.c.status == JobStatus.PROCESSING.value,
        jobs.c.attempt == fence.attempt,
        jobs.c.lease_owner == fence.owner,
    ]


def _filter_clauses(where: JobFilter) -> list[Any]:
    clauses: list[Any] = []
    if where.statuses:
        clauses.append(jobs.c.status.in_(sorted(status.value for status in where.statuses)))
    if where.provider:
        clauses.append(jobs.c.provider == where.provider)
    if where.folder_id is not None:
        clauses.append(jobs.c.folder_id == where.folder_id)
    return clauses


#: `SqlJobStore.extend_leases` on PostgreSQL
_EXTEND_LEASES = """
UPDATE jobs SET lease_expires_at = $1
WHERE id = ANY($2::uuid[]) AND status = 'processing' AND lease_owner = $3
RETURNING id, attempt
"""

#: `SqlJobStore._save_provider_states` on PostgreSQL (one row per job id), fenced as `_fenced` is
_SAVE_PROVIDER_STATES = """
UPDATE jobs SET provider_state = saved.state::jsonb
FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[]) AS saved(id, attempt, owner, state)
WHERE jobs.id = saved.id AND jobs.status = 'processing'
  AND jobs.attempt = saved.attempt AND jobs.lease_owner = saved.owner
RETURNING jobs.id
"""

#: the jobs columns a fenced transition may set that are Job fields of the same name and value
_PLAIN_TRANSITION_COLUMNS = frozenset(
    ("cost_usd_micros", "end_time", "lease_owner", "lease_expires_at", "next_attempt_at")
)


def _job_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A fenced transition's column `values` as Job fields (see `SqlJobStore._claimed_transition`)."""
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if name in _PLAIN_TRANSITION_COLUMNS:
            fields[name] = value
        elif name == "images":
            fields["images"] = tuple(StoredImage.from_json(image) for image in value)
        elif name == "error_code":
            error = JobError(
                code=value, message=values["error_message"] or "", retryable=bool(values["error_retryable"])
            )
            fields["error"] = error if value else None
        elif name not in ("error_message", "error_retryable"):
            raise TypeError(f"jobs.{name} has no Job field mapping for a fenced transition")
    return fields


#: the jobs columns kept as JSON
_JSON_COLUMNS = frozenset(column.name for column in jobs.c if isinstance(column.type, sqlalchemy.JSON))


#: the jobs columns whose values `SqlJobStore.create` gives every job alike: sent once per batch of creates
_CREATED_ALIKE = (
    "status",
    "version",
    "attempt",
    "images",
    "message",
    "cost_usd_micros",
    "reserved_usd_micros",
)


def _created_row(job: Job, request_hash: str) -> dict[str, Any]:
    """The rest of `_job_values` for a job `SqlJobStore.create` made, as JSON values.

    Ids and times go as text already, so the plain `_json_text` encodes the batch: through an encoder's
    `default` hook they cost a Python call each, and with the columns every job has alike
    (`_CREATED_ALIKE`) encoding a row took 8.8 µs, against 5.8 µs now. The job was created, updated and
    made due at the same instant.
    """
    created = job.create_time.isoformat()
    return {
        "id": str(job.id),
        "account_id": job.account_id,
        "request_id": job.request_id or None,
        "request_hash": request_hash,
        **_spec_values(job.spec),
        "deadline_at": job.deadline_at.isoformat(),
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        "create_time": created,
        "update_time": created,
        "next_attempt_at": created,
        "expire_time": job.expire_time.isoformat() if job.expire_time else None,
    }


def _iso_utc(column: str) -> str:
    """SQL for a timestamptz as ISO 8601 text in UTC, which `datetime.fromisoformat` reads."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""


#: `job_to_json` in SQL over a jobs row's columns, for the events of creates and claims. Encoding it in
#: Python was a fifth of a submit's own CPU (two thirds of it the JSON encoder), and PostgreSQL builds it
#: from values it already has. tests/test_store.py holds the two to the same keys and the same decoded job.
_SNAPSHOT = f"""jsonb_build_object(
        'id', id, 'account_id', account_id, 'status', status,
        'spec', jsonb_build_object(
            'prompt', prompt, 'provider', provider, 'width', width, 'height', height,
            'num_variants', num_variants, 'folder_id', folder_id, 'negative_prompt', negative_prompt,
            'seed', seed, 'output_format', output_format,
            'reference_image_urls', reference_image_urls,
            'provider_options', provider_options, 'labels', labels),
        'request_id', coalesce(request_id, ''), 'images', images,
        'error', CASE WHEN coalesce(error_code, '') = '' THEN NULL ELSE jsonb_build_object(
            'code', error_code, 'message', coalesce(error_message, ''),
            'retryable', coalesce(error_retryable, false)) END,
        'estimated_cost_usd_micros', estimated_cost_usd_micros, 'cost_usd_micros', cost_usd_micros,
        'attempt', attempt, 'version', version,
        'create_time', {_iso_utc("create_time")}, 'update_time', {_iso_utc("update_time")},
        'start_time', {_iso_utc("start_time")}, 'end_time', {_iso_utc("end_time")},
        'deadline_at', {_iso_utc("deadline_at")}, 'message', message,
        'expire_time', {_iso_utc("expire_time")})"""
#: `JobNotice.encode` in SQL, over the same values
_NOTICE_PAYLOAD = "id::text || ' ' || version::text || ' ' || status || ' ' || account_id"


def _notify_in_parts(channel: str, rows: str) -> str:
    """SQL selecting one pg_notify per NOTICES_PER_NOTIFY of `rows`, their notices one per line.

    Each NOTIFY is a message to every listening process and a callback in each, so a statement's
    notices share them (under PostgreSQL's 8000-byte payload limit; see NOTICES_PER_NOTIFY).
    """
    return f"""SELECT pg_notify({channel}, string_agg(line, E'\\n'))
    FROM (
        SELECT {_NOTICE_PAYLOAD} AS line, (row_number() OVER () - 1) / {NOTICES_PER_NOTIFY} AS part
        FROM {rows}
    ) AS notices
    GROUP BY part"""


@functools.cache
def _create_statement(columns: tuple[str, ...]) -> str:
    """The single statement of `SqlJobStore._create_batch_unbudgeted` for these jobs columns.

    Parameters: $1 the budget-bearing account ids, $2 the NOTIFY channel, $3 the jobs as one JSON array
    of objects keyed by column, which PostgreSQL reads as rows of the jobs table's own type, $4 one such
    object of the columns every job has alike (`_CREATED_ALIKE`), the base of each row. (Sent as an
    array per column instead, asyncpg's encoding of them was a third of a create's client-side CPU: it
    asks several `collections.abc` isinstance questions of every element.)
    Data-modifying CTEs all run, and the events and notices follow only the rows that the insert kept (a
    taken request_id inserts nothing). Each event's snapshot and notice are built from the row's own
    values (`_SNAPSHOT`, `_notify_in_parts`).
    """
    names = ", ".join(columns + _CREATED_ALIKE)
    return f"""
WITH budgeted AS (
    SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = ANY($1::text[])) AS found
),
batch AS (
    SELECT * FROM jsonb_populate_recordset(jsonb_populate_record(NULL::jobs, $4::jsonb), $3::jsonb)
),
created AS (
    INSERT INTO jobs ({names})
    SELECT {names} FROM batch WHERE NOT (SELECT found FROM budgeted)
    ON CONFLICT (account_id, request_id) DO NOTHING
    RETURNING id
),
events AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, status, NULL, message, update_time, {_SNAPSHOT}
    FROM batch JOIN created USING (id)
),
notified AS (
    {_notify_in_parts("$2", "batch JOIN created USING (id)")}
)
SELECT (SELECT found FROM budgeted) AS budgeted,
       ARRAY(SELECT id FROM created) AS created,
       (SELECT count(*) FROM notified) AS notified
"""


#: which rows `_claim_statement` takes: the due ones, or the ones a capped claim picked ($2)
_CLAIM_DUE = """SELECT id, status AS previous_status, lease_owner AS previous_owner FROM jobs
    WHERE (status = 'pending' AND next_attempt_at <= $1) OR (status = 'processing' AND lease_expires_at < $1)
    ORDER BY next_attempt_at LIMIT $2
    FOR UPDATE SKIP LOCKED"""
_CLAIM_PICKED = """SELECT id, status AS previous_status, lease_owner AS previous_owner FROM jobs
    WHERE id = ANY($2::uuid[])"""


@functools.cache
def _claim_statement(picked: str) -> str:
    """A claim on PostgreSQL in one statement: the jobs `picked` become PROCESSING, with events and NOTIFYs.

    Parameters: $1 now, $2 the limit (`_CLAIM_DUE`) or the ids chosen within the caps (`_CLAIM_PICKED`,
    locked earlier in the same transaction), $3 the owner, $4 the lease's end, $5 the NOTIFY channel.
    Answers the claimed rows, oldest due first, with each one's `previous_status`. Through SQLAlchemy a
    claim was a select, an executemany update, an insert and a NOTIFY, with the Python between them the
    largest share of the pipeline's samples in the store; the messages, snapshots and notices are built
    here from the rows' own values, as `SqlJobStore._claim_in_python` builds them on SQLite.
    """
    return f"""
WITH picked AS (
    {picked}
),
claimed AS (
    UPDATE jobs SET status = 'processing', attempt = jobs.attempt + 1, lease_owner = $3,
        lease_expires_at = $4, start_time = coalesce(jobs.start_time, $1), version = jobs.version + 1,
        update_time = $1,
        message = CASE WHEN picked.previous_status = 'processing'
            THEN format('lease of %s expired; taken over (attempt %s)',
                        picked.previous_owner, jobs.attempt + 1)
            ELSE format('started (attempt %s)', jobs.attempt + 1) END
    FROM picked WHERE jobs.id = picked.id
    RETURNING jobs.*, picked.previous_status
),
events AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, status, previous_status, message, update_time, {_SNAPSHOT}
    FROM claimed
),
notified AS (
    {_notify_in_parts("$5", "claimed")}
)
SELECT *, (SELECT count(*) FROM notified) AS notified FROM claimed ORDER BY next_attempt_at
"""


@functools.cache
def _transition_statement(columns: tuple[str, ...]) -> str:
    """The single statement of `SqlJobStore._claimed_transition` setting these columns besides the usual.

    Parameters: $1 status, $2 message, $3 update time, $4-$6 the fence (id, attempt, owner), $7 the
    claimed version, $8 the NOTIFY channel, $9 the event snapshot, $10 the NOTIFY payload, then one per
    column. The event and the NOTIFY follow only a row the update changed.
    """
    sets = ", ".join(
        f"{name} = ${index}{'::jsonb' if name in _JSON_COLUMNS else ''}"
        for index, name in enumerate(columns, start=11)
    )
    return f"""
WITH changed AS (
    UPDATE jobs SET status = $1, version = version + 1, update_time = $3, message = $2, {sets}
    WHERE id = $4 AND status = 'processing' AND attempt = $5 AND lease_owner = $6
      AND version = $7 AND reserved_usd_micros = 0
    RETURNING id, account_id, version, provider_state
),
event AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, $1, 'processing', $2, $3, $9::jsonb FROM changed
),
notified AS (
    SELECT pg_notify($8, $10) FROM changed
)
SELECT provider_state, (SELECT count(*) FROM notified) AS notified FROM changed
"""


def _notice(job: Job) -> JobNotice:
    return JobNotice(job_id=job.id, version=job.version, status=job.status, account_id=job.account_id)


def _notice_from_row(row: Row[Any]) -> JobNotice:
    return JobNotice(
        job_id=row.id, version=row.version, status=JobStatus(row.status), account_id=row.account_id
    )


def _job_values(job: Job, request_hash: str) -> dict[str, Any]:
    return {
        "id": job.id,
        "account_id": job.account_id,
        "request_id": job.request_id or None,
        "request_hash": request_hash,
        "status": job.status.value,
        "version": job.version,
        "attempt": job.attempt,
        **_spec_values(job.spec),
        "next_attempt_at": job.next_attempt_at,
        "deadline_at": job.deadline_at,
        "images": [],
        "message": job.message,
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        "cost_usd_micros": 0,
        "reserved_usd_micros": job.reserved_usd_micros,
        "create_time": job.create_time,
        "update_time": job.update_time,
        "expire_time": job.expire_time,
    }


def _spec_values(spec: JobSpec) -> dict[str, Any]:
    """A job's spec as jobs columns (`_job_values`, `_created_row`)."""
    return {
        "provider": spec.provider,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "width": spec.width,
        "height": spec.height,
        "num_variants": spec.num_variants,
        "seed": spec.seed,
        "output_format": spec.output_format,
        "folder_id": spec.folder_id,
        "reference_image_urls": list(spec.reference_image_urls),
        "provider_options": dict(spec.provider_options),
        "labels": dict(spec.labels),
    }


def _job_from_row(row: Row[Any] | Mapping[str, Any]) -> Job:
    """A job from a jobs row: SQLAlchemy's, or a mapping of its columns (an asyncpg record)."""
    m = row._mapping if isinstance(row, Row) else row
    error = (
        JobError(code=m["error_code"], message=m["error_message"] or "", retryable=bool(m["error_retryable"]))
        if m["error_code"]
        else None
    )
    return Job(
        id=m["id"],
        account_id=m["account_id"],
        status=JobStatus(m["status"]),
        spec=JobSpec(
            prompt=m["prompt"],
            provider=m["provider"],
            width=m["width"],
            height=m["height"],
            num_variants=m["num_variants"],
            folder_id=m["folder_id"],
            negative_prompt=m["negative_prompt"],
            seed=m["seed"],
            output_format=m["output_format"],
            reference_image_urls=tuple(m["reference_image_urls"]),
            provider_options=m["provider_options"],
            labels=m["labels"],
        ),
        request_id=m["request_id"] or "",
        images=tuple(StoredImage.from_json(image) for image in m["images"]),
        error=error,
        estimated_cost_usd_micros=m["estimated_cost_usd_micros"],
        cost_usd_micros=m["cost_usd_micros"],
        reserved_usd_micros=m["reserved_usd_micros"],
        attempt=m["attempt"],
        version=m["version"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        start_time=m["start_time"],
        end_time=m["end_time"],
        deadline_at=m["deadline_at"],
        next_attempt_at=m["next_attempt_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        provider_state=m["provider_state"],
        message=m["message"],
        expire_time=m.get("expire_time"),
    )


def job_to_json(job: Job) -> dict[str, Any]:
    """The job as JSON, as kept in each event row (lease fields left out: they are not history)."""
    return {
        "id": str(job.id),
        "account_id": job.account_id,
        "status": job.status.value,
        "spec": job.spec.to_json(),
        "request_id": job.request_id,
        "images": [image.to_json() for image in job.images],
        "error": None
        if job.error is None
        else {"code": job.error.code, "message": job.error.message, "retryable": job.error.retryable},
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        "cost_usd_micros": job.cost_usd_micros,
        "attempt": job.attempt,
        "version": job.version,
        "create_time": job.create_time.isoformat(),
        "update_time": job.update_time.isoformat(),
        "start_time": job.start_time.isoformat() if job.start_time else None,
        "end_time": job.end_time.isoformat() if job.end_time else None,
        "deadline_at": job.deadline_at.isoformat(),
        "message": job.message,
        "expire_time": job.expire_time.isoformat() if job.expire_time else None,
    }


def job_from_json(data: Mapping[str, Any]) -> Job:
    """Inverse of `job_to_json`."""
    spec = dict(data["spec"])
    spec["reference_image_urls"] = tuple(spec["reference_image_urls"])
    error = data["error"]

    def when(key: str) -> datetime | None:
        value = data[key]
        return datetime.fromisoformat(value) if value else None

    return Job(
        id=uuid.UUID(data["id"]),
        account_id=data["account_id"],
        status=JobStatus(data["status"]),
        spec=JobSpec(**spec),
        request_id=data["request_id"],
        images=tuple(StoredImage.from_json(image) for image in data["images"]),
        error=None if error is None else JobError(**error),
        estimated_cost_usd_micros=data["estimated_cost_usd_micros"],
        cost_usd_micros=data["cost_usd_micros"],
        attempt=data["attempt"],
        version=data["version"],
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        start_time=when("start_time"),
        end_time=when("end_time"),
        deadline_at=datetime.fromisoformat(data["deadline_at"]),
        message=data["message"],
        expire_time=when("expire_time") if "expire_time" in data else None,
    )


def _event_from_row(row: Row[Any]) -> JobEvent:
    m = row._mapping
    previous = m["previous_status"]
    return JobEvent(
        job=job_from_json(m["snapshot"]),
        version=m["version"],
        previous_status=JobStatus(previous) if previous else None,
        event_time=m["event_time"],
        message=m["message"],
    )

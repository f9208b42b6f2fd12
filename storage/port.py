"""The job store as `server` sees it: the `JobStore` protocol and the values its methods speak in.

`server` types against these protocols; `storage.jobs.SqlJobStore` is the implementation (PostgreSQL or
SQLite), chosen in the composition root. Each small protocol is one side of the store; `JobStore` is all
of them.

There is no in-memory fake: SQLite in a temporary file is already a fast embedded store, and a third
implementation of claims, caps, fencing and credits would be one more to keep in step, tested by nothing
that runs in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from storage.models import Job, JobError, JobEvent, JobNotice, JobStatus, LedgerEntry, NewJob, StoredImage


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


class JobSubmissions(Protocol):
    """The API side: create, read, list and cancel an account's jobs."""

    async def create(self, new: NewJob) -> tuple[Job, bool]:
        """Persist a job in PENDING; (job, created), the first job again for a repeated request_id."""
        ...

    async def get(self, account_id: str, job_id: uuid.UUID) -> Job:
        """The job, if it belongs to the account; JobNotFound otherwise."""
        ...

    async def list(
        self,
        account_id: str,
        *,
        page_size: int,
        after: PageCursor | None = None,
        where: JobFilter = ...,
    ) -> tuple[list[Job], PageCursor | None]:
        """One page of the account's jobs, newest first, and the next page's cursor."""
        ...

    async def cancel(self, account_id: str, job_id: uuid.UUID, *, message: str = ...) -> tuple[Job, bool]:
        """Cancel a pending or processing job; (job, whether this call cancelled it)."""
        ...

    async def submitted_since(
        self, account_id: str, since: datetime, *, up_to: int
    ) -> tuple[int, datetime | None]:
        """How many jobs the account created since `since` (up to `up_to`), and the oldest of them."""
        ...

    async def count_pending(self, account_id: str, *, up_to: int) -> int:
        """The account's pending jobs, counted up to `up_to`."""
        ...


class JobQueue(Protocol):
    """The worker side: claim jobs under a lease and write each attempt's outcome, fenced."""

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        lease_s: float,
        caps: Sequence[ConcurrencyCap] = (),
        per_account: int = 0,
    ) -> list[Claim]:
        """Take up to `limit` runnable jobs under a lease held by `owner`."""
        ...

    async def extend_leases(
        self, owner: str, job_ids: Sequence[uuid.UUID], *, lease_s: float
    ) -> set[tuple[uuid.UUID, int]]:
        """Extend `owner`'s leases; the (job id, attempt) pairs it still holds."""
        ...

    async def save_provider_state(self, fence: Fence, state: Mapping[str, Any]) -> None:
        """Keep an adapter's checkpoint with the job; LeaseLost if no longer held."""
        ...

    async def complete(
        self, fence: Fence, *, images: Sequence[StoredImage], cost_usd_micros: int, message: str = ...
    ) -> Job:
        """PROCESSING → COMPLETED with the stored images and the actual cost."""
        ...

    async def fail(self, fence: Fence, error: JobError) -> Job:
        """PROCESSING → FAILED; failed jobs cost nothing."""
        ...

    async def retry_later(self, fence: Fence, *, error: JobError, at: datetime, message: str) -> Job:
        """PROCESSING → PENDING until `at`, keeping the attempt's error."""
        ...

    async def release(self, fence: Fence, *, message: str) -> Job:
        """PROCESSING → PENDING at once: a worker shutting down hands its job back."""
        ...

    async def reap(self, *, limit: int = ...) -> list[Job]:
        """Expired leases back to the queue, overdue jobs failed."""
        ...


class JobEvents(Protocol):
    """The watcher side: events, versions and changes, and who is told about commits in this process."""

    async def events(
        self, job_id: uuid.UUID, *, after_version: int, up_to: int | None = None
    ) -> list[JobEvent]:
        """The job's events with version > after_version (and ≤ up_to), oldest first."""
        ...

    async def events_after(self, bases: Mapping[uuid.UUID, int]) -> dict[uuid.UUID, list[JobEvent]]:
        """For many jobs at once: each job's events with version > its base, oldest first."""
        ...

    async def versions(self, job_ids: Sequence[uuid.UUID]) -> list[JobNotice]:
        """The current version of each of these jobs."""
        ...

    async def changed_since(self, account_ids: Sequence[str], since: datetime) -> list[JobNotice]:
        """Jobs of these accounts that changed at or after `since`."""
        ...

    def set_on_commit(self, callback: Callable[[Sequence[JobNotice]], None] | None) -> None:
        """Who is told, in this process, about each committed transition."""
        ...


class CreditBook(Protocol):
    """Budgets and their ledger (operators' commands)."""

    async def set_budget(self, account_id: str, balance_usd_micros: int, *, note: str = ...) -> int:
        """Give the account a budget of exactly this balance; returns the balance."""
        ...

    async def add_credit(self, account_id: str, amount_usd_micros: int, *, note: str = ...) -> int:
        """Add (or, negative, take) credit; NoBudget without a budget. Returns the balance."""
        ...

    async def budget(self, account_id: str) -> int | None:
        """The account's balance, or None when it has no budget (unlimited)."""
        ...

    async def remove_budget(self, account_id: str) -> bool:
        """Make the account unlimited again; False when it had no budget."""
        ...

    async def ledger_entries(self, account_id: str, *, limit: int = ...) -> list[LedgerEntry]:
        """The account's most recent ledger entries, newest first."""
        ...


class StoreHealth(Protocol):
    """What readiness, metrics and shutdown ask of the store."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        ...

    async def schema_revision(self) -> str | None:
        """The database's schema revision (None before the first migration)."""
        ...

    async def queue_stats(self) -> QueueStats:
        """How many jobs wait and run, and how long the oldest due job has waited."""
        ...

    async def close(self) -> None:
        """Finish the writes under way and give back kept connections."""
        ...


class JobStore(JobSubmissions, JobQueue, JobEvents, CreditBook, StoreHealth, Protocol):
    """Everything the service asks of its job store."""

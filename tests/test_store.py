"""The job store itself, on both databases it supports: claims, leases, fencing, events, migrations."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from storage import migrate
from storage.codec import job_from_json, job_to_json
from storage.db import make_engine
from storage.errors import (
    IdempotencyConflict,
    InsufficientCredit,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    NoBudget,
)
from storage.group_commit import GroupCommit, ThreadLoad, thread_runnable_time
from storage.jobs import SqlJobStore
from storage.listener import PgListener
from storage.models import (
    NOTICES_PER_NOTIFY,
    Job,
    JobError,
    JobNotice,
    JobSpec,
    JobStatus,
    NewJob,
    StoredImage,
    utcnow,
)
from storage.port import ConcurrencyCap, Fence, JobFilter
from storage.postgres_sql import NOTIFY_CHANNEL
from storage.schema import job_events, jobs, metadata
from tests.helpers import eventually, full_spec


@pytest.fixture(params=["postgresql", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> AsyncIterator[SqlJobStore]:
    """A migrated, empty store on each supported database."""
    if request.param == "postgresql":
        engine = make_engine(pg_url)
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE jobs, job_events, accounts, ledger"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        await migrate.upgrade(engine)
    store = SqlJobStore(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


#: longer than any test: a writer given this hold keeps its connection until the store closes
LONG_S = 3600.0


def _new(
    prompt: str = "a cat", *, account: str = "acct", request_id: str = "", deadline_s: float = 300
) -> NewJob:
    spec = JobSpec(prompt=prompt, provider="flux_2_pro", width=512, height=512, num_variants=1)
    return NewJob(
        account_id=account,
        spec=spec,
        estimated_cost_usd_micros=30_000,
        request_id=request_id,
        deadline_s=deadline_s,
    )


_IMAGE = StoredImage(
    key="acct/root/x/0.png",
    width=512,
    height=512,
    content_type="image/png",
    size_bytes=10,
    sha256="00",
    seed=3,
    native_width=512,
    native_height=512,
)


async def test_migrations_match_the_table_definitions(store: SqlJobStore) -> None:
    async with store.engine.connect() as connection:
        differences = await connection.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), metadata
            )
        )
    assert differences == []
    assert await migrate.current_revision(store.engine) == migrate.head_revision()


async def test_create_get_and_events(store: SqlJobStore) -> None:
    seen: list[JobNotice] = []
    store.set_on_commit(seen.extend)
    job, created = await store.create(_new())
    assert created and job.status is JobStatus.PENDING and job.version == 1

    assert await store.get("acct", job.id) == job
    with pytest.raises(JobNotFound):
        await store.get("someone-else", job.id)
    [event] = await store.events(job.id, after_version=0)
    assert event.version == 1 and event.previous_status is None
    assert event.job == job.evolve(next_attempt_at=None)  # snapshots keep history, not queue internals
    assert seen == [JobNotice(job_id=job.id, version=1, status=JobStatus.PENDING, account_id="acct")]


async def test_a_created_jobs_event_snapshot_is_job_to_json(store: SqlJobStore) -> None:
    # On PostgreSQL the creation event's snapshot is built in SQL, elsewhere by job_to_json: the two must
    # agree on every key, value and time, with every spec field set.
    spec = full_spec()
    new = NewJob(account_id="acct", spec=spec, estimated_cost_usd_micros=60_000, request_id="r-full")
    job, _ = await store.create(new)
    bare, _ = await store.create(_new())  # no request_id, empty references, options and labels
    async with store.engine.connect() as connection:
        rows = (await connection.execute(select(job_events.c.job_id, job_events.c.snapshot))).all()
    snapshots = {row.job_id: row.snapshot for row in rows}
    for made in (job, bare):
        assert await store.get("acct", made.id) == made  # the row too, sent to PostgreSQL as JSON
        _assert_is_job_to_json(snapshots[made.id], made)


async def test_claims_answer_the_rows_and_write_the_events_python_would(store: SqlJobStore) -> None:
    # On PostgreSQL a claim is one statement that builds each message, snapshot and notice in SQL,
    # elsewhere Python builds them: a first start, the start of a retried job (which carries its error),
    # and a takeover, through the plain claim and the capped one.
    seen: list[JobNotice] = []
    store.set_on_commit(seen.extend)
    new = NewJob(account_id="acct", spec=full_spec(), estimated_cost_usd_micros=60_000, request_id="r-full")
    job, _ = await store.create(new)
    bfl = ConcurrencyCap(name="bfl", providers=frozenset({"flux_2_pro"}), max_tasks=10)
    error = JobError(code="PROVIDER_UNAVAILABLE", message='HTTP 503 "busy" \\ é', retryable=True)
    [first] = await store.claim(owner="w1", limit=5, lease_s=30)
    await store.retry_later(
        Fence(job_id=job.id, attempt=1, owner="w1"), error=error, at=utcnow(), message="again"
    )
    [second] = await store.claim(owner="w2", limit=5, lease_s=30, caps=[bfl])
    async with store.engine.begin() as connection:  # w2's lease ran out
        await connection.execute(update(jobs).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    [third] = await store.claim(owner="w3", limit=5, lease_s=30, per_account=1)

    assert [(claim.taken_over, claim.job.message) for claim in (first, second, third)] == [
        (False, "started (attempt 1)"),
        (False, "started (attempt 2)"),
        (True, "lease of w2 expired; taken over (attempt 3)"),
    ]
    assert third.job.error == error and third.job.start_time == first.job.start_time
    assert third.job == await store.get("acct", job.id)
    events = {event.version: event for event in await store.events(job.id, after_version=0)}
    async with store.engine.connect() as connection:
        snapshots = dict(
            (await connection.execute(select(job_events.c.version, job_events.c.snapshot))).all()
        )
    for claim, previous in (
        (first, JobStatus.PENDING),
        (second, JobStatus.PENDING),
        (third, JobStatus.PROCESSING),
    ):
        claimed = claim.job
        assert claimed.status is JobStatus.PROCESSING and claimed.lease_owner is not None
        event = events[claimed.version]
        assert (event.previous_status, event.message, event.event_time) == (
            previous,
            claimed.message,
            claimed.update_time,
        )
        _assert_is_job_to_json(snapshots[claimed.version], claimed)
    assert [notice.version for notice in seen] == [1, 2, 3, 4, 5]


def _assert_is_job_to_json(snapshot: dict[str, Any], job: Job) -> None:
    """An event snapshot PostgreSQL built is `job_to_json(job)`: the same keys, values and times."""
    expected = job_to_json(job)
    assert set(snapshot) == set(expected) and set(snapshot["spec"]) == set(expected["spec"])
    assert job_from_json(snapshot) == job_from_json(expected)
    assert job_from_json(snapshot) == job.evolve(
        next_attempt_at=None, lease_owner=None, lease_expires_at=None, provider_state=None
    )
    times = ("create_time", "update_time", "start_time", "end_time", "deadline_at")
    assert {k: v for k, v in snapshot.items() if k not in times} == {
        k: v for k, v in expected.items() if k not in times
    }


async def test_created_jobs_are_notified_to_listeners_in_other_processes(database_url: str) -> None:
    # the creation's NOTIFY payload is built in SQL: a PgListener must decode it to the job's notice
    heard: list[JobNotice] = []
    both = asyncio.Event()

    def on_notices(notices: Sequence[JobNotice]) -> None:
        heard.extend(notices)
        if len(heard) >= 2:
            both.set()

    engine = make_engine(database_url)
    listener = PgListener(database_url, on_notices=on_notices, on_reconnect=lambda: None)
    store = SqlJobStore(engine)
    await listener.start()
    try:
        assert listener.connected.is_set()
        made = await asyncio.gather(store.create(_new("one")), store.create(_new("two", account="other")))
        async with asyncio.timeout(10):
            await both.wait()
    finally:
        await listener.close()
        await store.close()
        await engine.dispose()
    assert sorted(heard, key=lambda n: n.account_id) == [
        JobNotice(job_id=job.id, version=1, status=JobStatus.PENDING, account_id=job.account_id)
        for job, _ in made
    ]


async def test_a_listener_decodes_nothing_while_no_notice_is_wanted(database_url: str) -> None:
    # An API process nobody watches is told of every replica's commits; `wanted` spares it their decoding.
    heard: list[JobNotice] = []
    asked: list[bool] = []

    def wanted() -> bool:  # no for the first payload, yes after it
        asked.append(bool(asked))
        return asked[-1]

    engine = make_engine(database_url)
    listener = PgListener(database_url, on_notices=heard.extend, on_reconnect=lambda: None, wanted=wanted)
    store = SqlJobStore(engine)
    await listener.start()
    try:
        await store.create(_new("unwanted"))  # one transaction, one payload: the first asked about
        second, _ = await store.create(_new("wanted"))
        await eventually(lambda: bool(heard))
    finally:
        await listener.close()
        await store.close()
        await engine.dispose()
    assert asked == [False, True]
    assert heard == [JobNotice(job_id=second.id, version=1, status=JobStatus.PENDING, account_id="acct")]


async def test_a_transactions_notices_share_notifies_under_postgresqls_size_limit(database_url: str) -> None:
    # One NOTIFY per job was a message to every listening process and a callback in each; now a
    # transaction's notices go NOTICES_PER_NOTIFY to a payload, one per line, the longest under 8000 bytes.
    payloads: list[str] = []
    listener = await asyncpg.connect(database_url, timeout=10)
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: payloads.append(args[3]))
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    account = "a" * 128  # the longest account id
    try:
        made = await asyncio.gather(*(store.create(_new(f"job {n}", account=account)) for n in range(100)))
        claims = await store.claim(owner="w1", limit=100, lease_s=30)  # one transaction, 100 transitions
        expected = {(job.id, 1) for job, _ in made} | {(claim.job.id, 2) for claim in claims}
        assert len(claims) == 100 and len(expected) == 200

        def heard() -> list[JobNotice]:
            return [JobNotice.decode(line) for payload in payloads for line in payload.split("\n")]

        await eventually(lambda: len(heard()) >= 200)
        assert {(notice.job_id, notice.version) for notice in heard()} == expected
        assert all(notice.account_id == account for notice in heard())
        claimed = [payload for payload in payloads if JobNotice.decode(payload.split("\n")[0]).version == 2]
        assert len(claimed) == 3 and len(payloads) < 100  # 100 claims, 40 to a NOTIFY; creates shared too
        assert max(len(payload.encode()) for payload in payloads) < 8000
        assert max(payload.count("\n") + 1 for payload in payloads) == NOTICES_PER_NOTIFY
    finally:
        await listener.close()
        await store.close()
        await engine.dispose()


async def test_idempotent_create(store: SqlJobStore) -> None:
    first, created = await store.create(_new(request_id="r1"))
    again, created_again = await store.create(_new(request_id="r1"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await store.create(_new("a dog", request_id="r1"))
    results = await asyncio.gather(*(store.create(_new("burst", request_id="r2")) for _ in range(10)))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_claim_fences_and_completes(store: SqlJobStore) -> None:
    job, _ = await store.create(_new())
    [claim] = await store.claim(owner="w1", limit=10, lease_s=30)
    claimed = claim.job
    assert not claim.taken_over
    assert claimed.status is JobStatus.PROCESSING and claimed.attempt == 1 and claimed.version == 2
    assert await store.claim(owner="w2", limit=10, lease_s=30) == []  # held

    fence = Fence(job_id=job.id, attempt=1, owner="w1")
    assert await store.extend_leases("w1", [job.id], lease_s=30) == {(job.id, 1)}
    await store.save_provider_state(fence, {"tasks": [{"id": "t1"}]})
    done = await store.complete(fence, images=[_IMAGE], cost_usd_micros=45_000)
    assert done.status is JobStatus.COMPLETED and done.images == (_IMAGE,) and done.cost_usd_micros == 45_000
    assert done.end_time is not None and done.lease_owner is None

    # a finished job cannot be written again by the same fence, nor cancelled
    with pytest.raises(LeaseLost):
        await store.fail(fence, JobError(code="X", message="late"))
    with pytest.raises(InvalidTransition):
        await store.cancel("acct", job.id)
    assert [e.version for e in await store.events(job.id, after_version=0)] == [1, 2, 3]


async def test_an_expired_lease_is_taken_over_and_the_old_worker_is_fenced_out(store: SqlJobStore) -> None:
    job, _ = await store.create(_new())
    [first_claim] = await store.claim(owner="w1", limit=1, lease_s=0.05)
    first = first_claim.job
    async with store.engine.begin() as connection:  # the lease ran out (w1 died or stalled)
        await connection.execute(update(jobs).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    [second_claim] = await store.claim(owner="w2", limit=1, lease_s=30)
    second = second_claim.job
    assert second_claim.taken_over
    assert second.id == job.id and second.attempt == 2 and second.lease_owner == "w2"
    [takeover] = await store.events(job.id, after_version=2)
    assert takeover.previous_status is JobStatus.PROCESSING and "taken over" in takeover.message

    stale = Fence(job_id=job.id, attempt=first.attempt, owner="w1")
    assert (job.id, stale.attempt) not in await store.extend_leases("w1", [job.id], lease_s=30)
    with pytest.raises(LeaseLost):
        await store.complete(stale, images=[], cost_usd_micros=1)
    with pytest.raises(LeaseLost):
        await store.save_provider_state(stale, {"tasks": []})
    current = await store.get("acct", job.id)
    assert current.status is JobStatus.PROCESSING and current.lease_owner == "w2"


async def test_retry_later_waits_for_its_time(store: SqlJobStore) -> None:
    job, _ = await store.create(_new())
    [claim] = await store.claim(owner="w1", limit=1, lease_s=30)
    fence = Fence(job_id=job.id, attempt=claim.job.attempt, owner="w1")
    error = JobError(code="PROVIDER_UNAVAILABLE", message="HTTP 503", retryable=True)
    retried = await store.retry_later(fence, error=error, at=utcnow() + timedelta(hours=1), message="later")
    assert retried.status is JobStatus.PENDING and retried.error == error
    assert await store.claim(owner="w1", limit=1, lease_s=30) == []  # not due yet


async def test_cancel_processing_fences_out_the_worker(store: SqlJobStore) -> None:
    job, _ = await store.create(_new())
    [claim] = await store.claim(owner="w1", limit=1, lease_s=30)
    cancelled, changed = await store.cancel("acct", job.id)
    assert changed and cancelled.status is JobStatus.CANCELLED
    assert await store.cancel("acct", job.id) == (cancelled, False)  # idempotent
    with pytest.raises(LeaseLost):
        await store.complete(
            Fence(job_id=job.id, attempt=claim.job.attempt, owner="w1"), images=[], cost_usd_micros=1
        )


async def test_concurrent_claims_never_share_a_job(store: SqlJobStore) -> None:
    for index in range(40):
        await store.create(_new(f"job {index}"))
    batches = await asyncio.gather(*(store.claim(owner=f"w{n}", limit=7, lease_s=30) for n in range(8)))
    claimed = [claim.job.id for batch in batches for claim in batch]
    assert len(claimed) == 40 and len(set(claimed)) == 40


async def test_list_filters_and_pages(store: SqlJobStore) -> None:
    ids = [(await store.create(_new(f"job {i}")))[0].id for i in range(5)]
    page, cursor = await store.list("acct", page_size=2)
    assert [job.id for job in page] == ids[::-1][:2] and cursor is not None
    page, cursor = await store.list("acct", page_size=10, after=cursor)
    assert [job.id for job in page] == ids[::-1][2:] and cursor is None
    pending, _ = await store.list(
        "acct", page_size=10, where=JobFilter(statuses=frozenset({JobStatus.FAILED}))
    )
    assert pending == []


async def test_queue_stats(store: SqlJobStore) -> None:
    assert (await store.queue_stats()).pending == 0
    for index in range(3):
        await store.create(_new(f"job {index}"))
    await store.claim(owner="w1", limit=1, lease_s=30)
    stats = await store.queue_stats()
    assert (stats.pending, stats.processing) == (2, 1)
    assert 0 <= stats.oldest_due_pending_age_s < 60


async def test_catch_up_queries(store: SqlJobStore) -> None:
    before = utcnow()
    job, _ = await store.create(_new())
    other, _ = await store.create(_new(account="other"))
    assert {n.job_id for n in await store.changed_since(["acct"], before)} == {job.id}
    assert await store.changed_since([], before) == []
    [notice] = await store.versions([job.id, uuid.uuid4()])
    assert notice.version == 1 and notice.account_id == "acct"
    assert other.id not in {n.job_id for n in await store.versions([job.id])}


def _variants(prompt: str, provider: str, variants: int) -> NewJob:
    spec = JobSpec(prompt=prompt, provider=provider, width=512, height=512, num_variants=variants)
    return NewJob(account_id="acct", spec=spec, estimated_cost_usd_micros=1)


async def test_vendor_caps_hold_jobs_in_order_without_blocking_other_vendors(store: SqlJobStore) -> None:
    for index in range(5):
        await store.create(_variants(f"flux {index}", "flux_2_pro", 2))
    for index in range(3):
        await store.create(_variants(f"seedream {index}", "seedream_4", 4))
    bfl = ConcurrencyCap(name="bfl", providers=frozenset({"flux_2_pro"}), max_tasks=5)

    first = await store.claim(owner="w1", limit=20, lease_s=30, caps=[bfl])
    by_provider = sorted(claim.job.spec.provider for claim in first)
    # two flux jobs use 4 of 5 tasks; the third needs 2 and waits; seedream is not capped
    assert by_provider == ["flux_2_pro"] * 2 + ["seedream_4"] * 3
    assert await store.claim(owner="w2", limit=20, lease_s=30, caps=[bfl]) == []

    flux = next(claim.job for claim in first if claim.job.spec.provider == "flux_2_pro")
    await store.complete(Fence(job_id=flux.id, attempt=1, owner="w1"), images=[], cost_usd_micros=0)
    [next_flux] = await store.claim(owner="w2", limit=20, lease_s=30, caps=[bfl])
    assert next_flux.job.spec.prompt == "flux 2"  # first come, first served


async def test_reaper_requeues_expired_leases_and_fails_overdue_jobs(store: SqlJobStore) -> None:
    running, _ = await store.create(_new("running"))
    overdue, _ = await store.create(_new("overdue", deadline_s=0.01))
    [claim] = await store.claim(owner="w1", limit=1, lease_s=30)
    assert claim.job.id == running.id
    past, later = utcnow() - timedelta(seconds=1), utcnow() + timedelta(hours=1)
    async with store.engine.begin() as connection:
        await connection.execute(
            update(jobs).where(jobs.c.id == running.id).values(lease_expires_at=past, deadline_at=later)
        )
        await connection.execute(update(jobs).where(jobs.c.id == overdue.id).values(deadline_at=past))
    reaped = {job.id: job for job in await store.reap()}
    assert reaped[running.id].status is JobStatus.PENDING and reaped[running.id].lease_owner is None
    assert "returned to the queue" in reaped[running.id].message
    assert reaped[overdue.id].status is JobStatus.FAILED and reaped[overdue.id].error is not None
    assert reaped[overdue.id].error.code == "DEADLINE_EXCEEDED" and reaped[overdue.id].cost_usd_micros == 0
    assert await store.reap() == []
    with pytest.raises(LeaseLost):  # the worker that lost the lease cannot finish the job any more
        await store.complete(Fence(job_id=running.id, attempt=1, owner="w1"), images=[], cost_usd_micros=1)


async def test_count_pending_is_bounded(store: SqlJobStore) -> None:
    for index in range(6):
        await store.create(_new(f"job {index}"))
    await store.create(_new("elsewhere", account="other"))
    assert await store.count_pending("acct", up_to=100) == 6
    assert await store.count_pending("acct", up_to=4) == 4
    assert await store.count_pending("nobody", up_to=4) == 0


async def test_budgets_reserve_atomically_and_settle_in_the_ending_transaction(store: SqlJobStore) -> None:
    assert await store.budget("acct") is None  # unlimited until given a budget
    await store.set_budget("acct", 100_000, note="trial")
    outcomes = await asyncio.gather(
        *(store.create(_new(f"burst {i}")) for i in range(10)), return_exceptions=True
    )
    created = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, InsufficientCredit)]
    assert len(created) == 3 and len(refused) == 7  # 3 x 30,000 fit in 100,000; never more
    assert await store.budget("acct") == 10_000

    first, second, third = (job for job, _ in created)
    claims = {c.job.id: c.job for c in await store.claim(owner="w", limit=3, lease_s=30)}
    await store.complete(Fence(job_id=first.id, attempt=1, owner="w"), images=[], cost_usd_micros=25_000)
    await store.fail(
        Fence(job_id=second.id, attempt=1, owner="w"), JobError(code="CONTENT_MODERATED", message="no")
    )
    await store.cancel("acct", third.id)
    assert len(claims) == 3
    # 100,000 - 25,000 actually spent; the failed and cancelled jobs are free
    assert await store.budget("acct") == 75_000
    kinds = [(entry.kind, entry.amount_usd_micros) for entry in await store.ledger_entries("acct")]
    assert kinds[::-1] == [
        ("set", 100_000),
        ("reserve", -30_000),
        ("reserve", -30_000),
        ("reserve", -30_000),
        ("settle", 5_000),
        ("refund", 30_000),
        ("refund", 30_000),
    ]
    assert await store.add_credit("acct", 5_000) == 80_000
    assert await store.remove_budget("acct")
    job, _ = await store.create(_new("now unlimited"))
    assert job.reserved_usd_micros == 0
    with pytest.raises(NoBudget):
        await store.add_credit("acct", 1)


async def test_a_shared_commit_reserves_for_budgeted_accounts_only(store: SqlJobStore) -> None:
    # Concurrent submits share commits; on PostgreSQL a batch with no budgeted account takes one statement,
    # and a batch with one falls back to the locking transaction. Either way each account gets its due.
    await store.set_budget("metered", 60_000)
    outcomes = await asyncio.gather(
        *(store.create(_new(f"m {i}", account="metered")) for i in range(4)),
        *(store.create(_new(f"f {i % 3}", account="free", request_id=f"r{i % 3}")) for i in range(6)),
        return_exceptions=True,
    )
    metered, free = outcomes[:4], outcomes[4:]
    assert sum(isinstance(o, InsufficientCredit) for o in metered) == 2
    assert all(job.reserved_usd_micros == 30_000 for job, _ in (o for o in metered if isinstance(o, tuple)))
    assert not [o for o in free if isinstance(o, BaseException)]
    assert sum(created for _, created in free) == 3  # three request ids, each created once
    assert all(job.reserved_usd_micros == 0 for job, _ in free)
    assert await store.budget("metered") == 0
    for job, _ in free:
        [event] = await store.events(job.id, after_version=0)
        assert event.job == job.evolve(next_attempt_at=None)


async def test_per_account_in_flight_cap_queues_the_rest(store: SqlJobStore) -> None:
    for index in range(6):
        await store.create(_new(f"busy {index}", account="busy"))
    await store.create(_new("quiet", account="quiet"))
    first = await store.claim(owner="w", limit=10, lease_s=30, per_account=2)
    assert sorted(c.job.account_id for c in first) == ["busy", "busy", "quiet"]
    assert await store.claim(owner="w", limit=10, lease_s=30, per_account=2) == []  # busy waits its turn
    done = next(c.job for c in first if c.job.account_id == "busy")
    await store.complete(Fence(job_id=done.id, attempt=1, owner="w"), images=[], cost_usd_micros=0)
    [next_one] = await store.claim(owner="w", limit=10, lease_s=30, per_account=2)
    assert next_one.job.account_id == "busy"
    # at its cap, the account's expired leases are still taken over (they count already), not left
    # to the reaper, and its pending jobs still wait
    stalled = next(c.job for c in first if c.job.account_id == "busy" and c.job.id != done.id)
    async with store.engine.begin() as connection:
        await connection.execute(
            update(jobs)
            .where(jobs.c.id == stalled.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    [taken_over] = await store.claim(owner="w2", limit=10, lease_s=30, per_account=2)
    assert taken_over.taken_over and taken_over.job.id == stalled.id and taken_over.job.lease_owner == "w2"


async def test_submitted_since_counts_the_window(store: SqlJobStore) -> None:
    before = utcnow()
    for index in range(4):
        await store.create(_new(f"job {index}"))
    count, oldest = await store.submitted_since("acct", before, up_to=3)
    assert count == 3 and oldest is not None and oldest >= before
    assert await store.submitted_since("acct", utcnow(), up_to=3) == (0, None)


async def test_extend_leases_answers_what_the_worker_still_holds(store: SqlJobStore) -> None:
    for index in range(3):
        await store.create(_new(f"job {index}"))
    claims = await store.claim(owner="w1", limit=3, lease_s=1)
    cancelled = claims[0].job
    await store.cancel("acct", cancelled.id)
    ids = [c.job.id for c in claims]
    held = await store.extend_leases("w1", ids, lease_s=30)
    assert held == {(c.job.id, c.job.attempt) for c in claims[1:]}
    assert await store.extend_leases("w2", ids, lease_s=30) == set()
    # a job the worker no longer runs is not extended, so its lease runs out for another attempt
    assert await store.extend_leases("w1", ids[2:], lease_s=30) == {(ids[2], claims[2].job.attempt)}
    assert all(
        j.lease_expires_at and j.lease_expires_at > utcnow() + timedelta(seconds=20)
        for j in [await store.get("acct", c.job.id) for c in claims[1:]]
    )


_TRANSITIONS = {
    "complete": lambda store, fence: store.complete(fence, images=[_IMAGE], cost_usd_micros=45_000),
    "fail": lambda store, fence: store.fail(fence, JobError(code="CONTENT_MODERATED", message="no")),
    "retry_later": lambda store, fence: store.retry_later(
        fence,
        error=JobError(code="PROVIDER_UNAVAILABLE", message="HTTP 503", retryable=True),
        at=utcnow() + timedelta(hours=1),
        message="retrying",
    ),
    "release": lambda store, fence: store.release(fence, message="handed back"),
}


def _shape(job: Job) -> Job:
    """What two jobs given the same request and transition share: all but their id and clock readings."""
    stamp = datetime(2000, 1, 1, tzinfo=UTC)
    clocks = ("create_time", "update_time", "deadline_at", "start_time", "end_time", "next_attempt_at")
    readings = {name: stamp for name in clocks if getattr(job, name) is not None}
    return job.evolve(id=uuid.UUID(int=0), **readings)


@pytest.mark.parametrize("transition", sorted(_TRANSITIONS))
async def test_a_transition_from_the_claimed_job_writes_what_the_general_path_would(
    store: SqlJobStore, transition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fence that carries the claimed job lets the transition skip reading the row (on PostgreSQL: one
    # statement). The row, the event, the returned job and the notice must be as the general path makes them.
    await store.create(_new())
    await store.create(_new())
    outcomes = []
    for claim in await store.claim(owner="w1", limit=2, lease_s=30):
        trusted = not outcomes  # the first carries the claimed job, the second takes the general path
        fence = Fence(
            job_id=claim.job.id, attempt=claim.job.attempt, owner="w1", claimed=claim.job if trusted else None
        )
        await store.save_provider_state(fence, {"tasks": [{"id": "t1"}]})  # a change without a new version
        seen: list[JobNotice] = []
        store.set_on_commit(seen.extend)
        with monkeypatch.context() as patch:
            if trusted and store.engine.dialect.name == "postgresql":
                patch.setattr(store._db, "transaction", None)  # the general path is not taken
            job = await _TRANSITIONS[transition](store, fence)
        assert job == await store.get("acct", claim.job.id)
        assert job.provider_state == {"tasks": [{"id": "t1"}]} and job.version == claim.job.version + 1
        assert seen == [JobNotice(job_id=job.id, version=job.version, status=job.status, account_id="acct")]
        [event] = await store.events(job.id, after_version=claim.job.version)
        assert event.previous_status is JobStatus.PROCESSING and event.version == job.version
        # an event keeps what watchers see: not the lease, nor the checkpoint
        hidden = ("lease_owner", "lease_expires_at", "next_attempt_at", "provider_state")
        assert event.job == job.evolve(**dict.fromkeys(hidden))
        outcomes.append(job)
    fast, general = outcomes
    assert _shape(fast) == _shape(general)


async def test_a_stale_claimed_job_is_not_trusted(store: SqlJobStore) -> None:
    await store.create(_new())
    [claim] = await store.claim(owner="w1", limit=1, lease_s=30)
    stale = claim.job.evolve(version=claim.job.version - 1, message="what the worker wrongly believes")
    fence = Fence(job_id=claim.job.id, attempt=claim.job.attempt, owner="w1", claimed=stale)
    done = await store.complete(fence, images=[_IMAGE], cost_usd_micros=45_000)
    assert done == await store.get("acct", claim.job.id)
    assert done.version == claim.job.version + 1 and done.status is JobStatus.COMPLETED
    assert [e.version for e in await store.events(done.id, after_version=0)] == [1, 2, 3]
    with pytest.raises(LeaseLost):  # and a claimed job does not let a finished attempt write again
        await store.fail(fence, JobError(code="X", message="late"))


async def test_concurrent_checkpoints_share_commits_and_each_is_fenced(store: SqlJobStore) -> None:
    for index in range(6):
        await store.create(_new(f"job {index}"))
    claims = await store.claim(owner="w1", limit=6, lease_s=30)
    fences = [Fence(job_id=c.job.id, attempt=c.job.attempt, owner="w1") for c in claims[:5]]
    stale = Fence(job_id=claims[5].job.id, attempt=claims[5].job.attempt - 1, owner="w1")
    outcomes = await asyncio.gather(  # one batch
        *(store.save_provider_state(fence, {"tasks": [{"id": f"t{i}"}]}) for i, fence in enumerate(fences)),
        store.save_provider_state(stale, {"tasks": [{"id": "stale"}]}),
        return_exceptions=True,
    )
    assert outcomes[:5] == [None] * 5 and isinstance(outcomes[5], LeaseLost)
    # the same job twice in one batch: written in order, so the later one is kept
    await asyncio.gather(*(store.save_provider_state(fences[1], {"tasks": [{"id": t}]}) for t in ("a", "b")))
    saved = [(await store.get("acct", c.job.id)).provider_state for c in claims]
    assert saved == [{"tasks": [{"id": t}]} for t in ("t0", "b", "t2", "t3", "t4")] + [None]


def _recording_checkouts(database_url: str) -> tuple[AsyncEngine, list[asyncpg.Connection]]:
    """An engine, and the asyncpg connection of every checkout from its pool, in order."""
    engine = make_engine(database_url)
    checked_out: list[asyncpg.Connection] = []
    event.listen(
        engine.sync_engine,
        "checkout",
        lambda dbapi, _record, _proxy: checked_out.append(dbapi.driver_connection),
    )
    return engine, checked_out


async def test_a_writer_keeps_its_connection_between_batches_until_the_store_closes(
    database_url: str,
) -> None:
    engine, checked_out = _recording_checkouts(database_url)
    store = SqlJobStore(engine, hold_s=LONG_S)
    try:
        for index in range(3):  # one after another, each its own batch, as at moderate load
            await store.create(_new(f"job {index}"))
        await asyncio.gather(*(store.create(_new(f"burst {index}")) for index in range(5)))
        assert len(checked_out) == 1 and engine.sync_engine.pool.checkedout() == 1  # kept by the writer
        await store.close()
        assert engine.sync_engine.pool.checkedout() == 0  # given back at once, however long the hold
        page, _ = await store.list("acct", page_size=100)
        assert len(page) == 8
    finally:
        await store.close()
        await engine.dispose()


async def test_a_writer_gives_its_connection_back_once_nothing_comes(database_url: str) -> None:
    engine = make_engine(database_url)
    store = SqlJobStore(engine, hold_s=0.05)
    try:
        await store.create(_new())
        await eventually(lambda: engine.sync_engine.pool.checkedout() == 0)
        await store.create(_new("later"))  # and checks one out again for the next
    finally:
        await store.close()
        await engine.dispose()


async def test_a_writers_kept_connection_that_died_is_replaced(database_url: str) -> None:
    engine, checked_out = _recording_checkouts(database_url)
    store = SqlJobStore(engine, hold_s=LONG_S)
    try:
        await store.create(_new("before"))
        [kept] = checked_out
        admin = await asyncpg.connect(database_url, timeout=10)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", kept.get_server_pid())
        finally:
            await admin.close()
        await eventually(kept.is_closed)  # asyncpg reads the server's goodbye

        job, created = await store.create(_new("after"))  # not on the dead connection
        assert len(checked_out) == 2 and checked_out[1].get_server_pid() != kept.get_server_pid()
        assert created and await store.get("acct", job.id) == job
    finally:
        await store.close()
        await engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql, a pool of 2"])
async def test_a_writer_keeps_no_connection_from_a_small_pool(
    database: str, tmp_path: Path, database_url: str
) -> None:
    # SQLite's engine has one connection, which every other statement needs too
    if database == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        await migrate.upgrade(engine)
    else:
        engine = make_engine(database_url, pool_size=2)
    store = SqlJobStore(engine, hold_s=LONG_S)
    try:
        await store.create(_new())
        assert engine.sync_engine.pool.checkedout() == 0
    finally:
        await store.close()
        await engine.dispose()


class _RecordedWrites:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0)  # a round trip's worth of yielding
        return [item * 10 for item in items]


@pytest.mark.parametrize("saturated, batches", [(False, [[1], [2, 3]]), (True, [[1, 2, 3]])])
async def test_a_group_commit_lingers_for_more_writes_only_while_its_loop_is_saturated(
    saturated: bool, batches: list[list[int]]
) -> None:
    writes = _RecordedWrites()
    group = GroupCommit[int, int](writes, name="test", linger_s=0.5, saturated=lambda: saturated)
    first = asyncio.create_task(group.submit(1))
    for _ in range(2):  # the writer starts: it writes [1] at once, or lingers
        await asyncio.sleep(0)
    later = [asyncio.create_task(group.submit(item)) for item in (2, 3)]
    async with asyncio.timeout(10):  # a writer that left without seeing 2 and 3 would leave them waiting
        assert await asyncio.gather(first, *later) == [10, 20, 30]
    assert writes.batches == batches


async def test_a_caller_that_goes_away_leaves_the_shared_commit_to_the_others() -> None:
    writes = _RecordedWrites()
    group = GroupCommit[int, int](writes, name="test", linger_s=0.5, saturated=lambda: True)
    gone, staying = (asyncio.create_task(group.submit(item)) for item in (1, 2))
    await asyncio.sleep(0)  # both queued; the writer lingers
    gone.cancel()
    async with asyncio.timeout(10):
        assert await staying == 20
    assert gone.cancelled()
    assert writes.batches == [[1, 2]]  # already queued, so written: a retry with its request_id finds it


class _SlowRelease:
    """Stands in for a held connection: its release waits until the test lets it finish."""

    def __init__(self) -> None:
        self.releasing, self.may_finish = asyncio.Event(), asyncio.Event()
        self.released = 0

    async def release(self) -> None:
        self.releasing.set()
        await self.may_finish.wait()
        self.released += 1


async def test_a_group_commit_writer_waits_for_more_with_its_connection_until_closed() -> None:
    writes, held = _RecordedWrites(), _SlowRelease()
    held.may_finish.set()
    group = GroupCommit[int, int](writes, name="test", linger_s=0, held=held, hold_s=LONG_S)  # type: ignore[arg-type]
    assert await group.submit(1) == 10
    assert await group.submit(2) == 20  # written by the same writer, which was waiting for more
    assert held.released == 0
    async with asyncio.timeout(10):  # not after LONG_S
        await group.close()
    assert held.released == 1 and writes.batches == [[1], [2]]


async def test_a_write_submitted_while_the_connection_goes_back_is_written() -> None:
    writes, held = _RecordedWrites(), _SlowRelease()
    group = GroupCommit[int, int](writes, name="test", linger_s=0, held=held, hold_s=0.01)  # type: ignore[arg-type]
    assert await group.submit(1) == 10
    async with asyncio.timeout(10):
        await held.releasing.wait()  # nothing came for hold_s: the writer is giving its connection back
        later = asyncio.create_task(group.submit(2))
        await asyncio.sleep(0)  # queued while the writer is still in release
        held.may_finish.set()
        assert await later == 20
        await group.close()
    assert writes.batches == [[1], [2]] and held.released == 2


def test_thread_load_is_runnable_time_over_wall_time_per_period() -> None:
    wall, busy = [100.0], [7.0]
    load = ThreadLoad(period_s=0.05, wall_clock=lambda: wall[0], busy_clock=lambda: busy[0])
    assert load.share() == 0.0  # the first question starts the first period
    wall[0] += 0.04
    busy[0] += 0.04
    assert load.share() == 0.0  # not a full period yet
    wall[0] += 0.06
    busy[0] += 0.05
    assert load.share() == pytest.approx(0.9)
    wall[0] += 1.0
    busy[0] += 0.1
    assert load.share() == pytest.approx(0.1)


def test_a_thread_counts_as_busy_while_it_waits_for_a_core_and_idle_while_it_sleeps() -> None:
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("the scheduler's per-thread times are Linux's")
    before = thread_runnable_time()
    time.sleep(0.2)
    assert thread_runnable_time() - before < 0.05

    # This thread and a spinning process share one core: each runs about half the time.
    core = min(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    spin = f"import os\nos.sched_setaffinity(0, {{{core}}})\nprint(flush=True)\nwhile True: pass"
    with subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) as spinner:
        try:
            assert spinner.stdout is not None and spinner.stdout.readline() == b"\n"  # it spins on the core
            os.sched_setaffinity(0, {core})  # this thread only
            try:
                wall0, cpu0, busy0 = time.monotonic(), time.thread_time(), thread_runnable_time()
                while time.monotonic() - wall0 < 0.5:
                    pass
                wall = time.monotonic() - wall0
                cpu, busy = time.thread_time() - cpu0, thread_runnable_time() - busy0
            finally:
                os.sched_setaffinity(0, allowed)
        finally:
            spinner.kill()
    assert cpu / wall < 0.8  # it shared the core
    assert busy / wall > 0.9  # and was runnable throughout

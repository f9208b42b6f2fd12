"""The autoscaler's backlog query counts the jobs a claim would take now, on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from storage import backlog
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobSpec, NewJob, utcnow
from storage.port import ConcurrencyCap
from storage.schema import jobs

BFL = ConcurrencyCap(name="bfl", providers=frozenset({"flux_2_pro"}), max_tasks=5)
OPENAI = ConcurrencyCap(name="openai", providers=frozenset({"gpt_image_1_5"}), max_tasks=2)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlJobStore]:
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


async def _add(store: SqlJobStore, provider: str, variants: int, *, account: str = "acct") -> None:
    spec = JobSpec(prompt="a cat", provider=provider, width=512, height=512, num_variants=variants)
    await store.create(
        NewJob(account_id=account, spec=spec, estimated_cost_usd_micros=1, request_id="", deadline_s=300)
    )


async def _claim_all(store: SqlJobStore, caps: list[ConcurrencyCap], per_account: int = 0) -> int:
    """What workers would start, claiming until nothing more can start (nothing finishes meanwhile)."""
    started = 0
    while claims := await store.claim(owner="w", limit=100, lease_s=30, caps=caps, per_account=per_account):
        started += sum(not claim.taken_over for claim in claims)
    return started


async def _pending(store: SqlJobStore) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).where(jobs.c.status == "pending"))).scalar_one()


async def test_only_jobs_a_claim_would_take_are_counted(store: SqlJobStore) -> None:
    caps = [BFL, OPENAI]
    await _add(store, "flux_2_pro", 2)
    assert [c.job.spec.num_variants for c in await store.claim(owner="w0", limit=1, lease_s=30)] == [2]
    # BFL has 3 of 5 tasks free: the first 2-variant job fits, the next does not, and the 1-variant job
    # behind it waits its turn rather than overtaking it
    for variants in (2, 2, 1):
        await _add(store, "flux_2_pro", variants)
    # nothing of OpenAI runs, so a job bigger than its cap runs alone; the one behind it waits
    await _add(store, "gpt_image_1_5", 4)
    await _add(store, "gpt_image_1_5", 1)
    for _ in range(3):  # Seedream is not capped
        await _add(store, "seedream_4", 1)
    await _add(store, "seedream_4", 1)
    async with store.engine.begin() as conn:  # retrying later: not due
        newest = select(func.max(jobs.c.create_time)).scalar_subquery()
        await conn.execute(
            update(jobs)
            .where(jobs.c.create_time == newest)
            .values(next_attempt_at=utcnow() + timedelta(hours=1))
        )

    counted = await backlog.backlog(store.engine, caps)
    assert (counted.claimable, counted.processing, counted.demand) == (5, 1, 6)
    assert await _pending(store) == 9
    async with store.engine.connect() as conn:
        sql = backlog.claimable_sql(caps, with_processing=True)
        assert (await conn.execute(text(sql))).scalar_one() == 6
    # the claim itself agrees: exactly that many start, and the rest stay pending
    assert await _claim_all(store, caps) == 5
    assert await _pending(store) == 4
    assert (await backlog.backlog(store.engine, caps)).claimable == 0


async def test_accounts_at_their_in_flight_limit_wait(store: SqlJobStore) -> None:
    accounts = (("full", 2, 2), ("busy", 1, 3), ("quiet", 0, 1))
    for account, processing, _ in accounts:
        for _ in range(processing):
            await _add(store, "seedream_4", 1, account=account)
    assert len(await store.claim(owner="w0", limit=10, lease_s=30)) == 3
    for account, _, pending in accounts:
        for _ in range(pending):
            await _add(store, "seedream_4", 1, account=account)
    # a capped vendor's room is not taken by a full account's job
    await _add(store, "flux_2_pro", 5, account="full")
    await _add(store, "flux_2_pro", 5, account="quiet")

    counted = await backlog.backlog(store.engine, [BFL], per_account=2)
    # busy: one more; quiet: its seedream and its flux job up to its limit of 2; full: none
    assert (counted.claimable, counted.processing) == (3, 3)
    assert await _claim_all(store, [BFL], per_account=2) == 3
    # without the account limit: every seedream job left, but not full's flux job while quiet's runs
    assert (await backlog.backlog(store.engine, [BFL])).claimable == 4


async def test_uncapped_and_empty(store: SqlJobStore) -> None:
    assert await backlog.backlog(store.engine) == backlog.Backlog(claimable=0, processing=0)
    await _add(store, "flux_2_pro", 4)
    await _add(store, "flux_2_pro", 4)
    assert (await backlog.backlog(store.engine)).claimable == 2


def _command(*args: str, **env: str) -> str:
    """`python -m server backlog …` as a process (it sets up logging for the whole process)."""
    run = subprocess.run(
        [sys.executable, "-m", "server", "backlog", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_the_command_prints_the_statement_for_the_settings() -> None:
    printed = _command(
        "--sql",
        "--with-processing",
        IMAGEGEN_VENDOR_CONCURRENCY="bfl=24,openai=0,gemini=8",
        IMAGEGEN_MAX_IN_FLIGHT_PER_ACCOUNT="3",
    )
    assert "WHEN active_provider IN ('flux_2_max', 'flux_2_pro') THEN 'bfl'" in printed
    assert (
        "WHEN active_provider IN ('nano_banana', 'nano_banana_2', 'nano_banana_pro') THEN 'gemini'" in printed
    )
    assert "'openai'" not in printed  # 0: uncapped
    assert "HAVING count(*) >= 3" in printed and "status = 'processing')" in printed


def test_names_that_are_not_plain_identifiers_are_refused() -> None:
    evil = ConcurrencyCap(name="bfl'; DROP TABLE jobs; --", providers=frozenset({"flux_2_pro"}), max_tasks=1)
    with pytest.raises(ValueError, match="cannot be written"):
        backlog.claimable_sql([evil])


async def test_the_command_counts_against_the_database(store: SqlJobStore, database_url: str) -> None:
    for _ in range(3):
        await _add(store, "seedream_4", 1)
    await store.claim(owner="w", limit=1, lease_s=30)
    counted = await asyncio.to_thread(_command, IMAGEGEN_DATABASE_URL=database_url)
    assert counted.strip() == "2"

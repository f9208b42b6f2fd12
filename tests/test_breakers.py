"""The shared breaker rows on each database, driven with explicit clocks: no waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import migrate
from storage.breakers import BreakerPolicy, SqlBreakers
from storage.db import make_engine

T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
POLICY = BreakerPolicy(failure_ratio=0.5, min_requests=4, window_s=60, cooldown_s=30, probes=2)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["postgresql", "sqlite"])
async def book(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> AsyncIterator[SqlBreakers]:
    if request.param == "postgresql":
        engine = make_engine(pg_url)
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE provider_breakers"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'breakers.db'}")
        await migrate.upgrade(engine)
    try:
        yield SqlBreakers(engine, POLICY)
    finally:
        await engine.dispose()


async def test_opens_only_past_both_the_ratio_and_the_minimum_within_one_window(book: SqlBreakers) -> None:
    await book.report({"bfl": (3, 3)}, at(0))  # all failed, but fewer than the minimum
    assert (await book.states())["bfl"].state == "closed"
    await book.report({"bfl": (3, 0)}, at(61))  # a new window: the old failures no longer count
    state = (await book.states())["bfl"]
    assert (state.state, state.requests, state.failures) == ("closed", 3, 0)
    await book.report({"bfl": (2, 2), "ark": (10, 1)}, at(62))  # 2 of 5 failed: under the ratio
    await book.report({"bfl": (1, 1)}, at(63))  # 3 of 6: at it
    states = await book.states()
    assert states["bfl"].state == "open" and states["bfl"].probe_at == at(93)
    assert states["ark"].state == "closed"
    # counts of requests made before it opened change nothing
    await book.report({"bfl": (5, 0)}, at(64))
    assert (await book.states())["bfl"].state == "open"


async def test_a_round_of_probes_is_shared_and_decides_when_all_have_answered(book: SqlBreakers) -> None:
    await book.report({"bfl": (4, 4)}, at(0))
    assert not await book.claim_probe("bfl", at(29))  # cooling down
    assert await book.claim_probe("bfl", at(30))
    assert await book.claim_probe("bfl", at(30.1))
    assert not await book.claim_probe("bfl", at(30.2))  # both slots taken, whoever asks
    await book.probe_result("bfl", True, at(31))
    assert (await book.states())["bfl"].state == "half_open"  # one answer of two
    await book.probe_result("bfl", False, at(32))
    state = (await book.states())["bfl"]
    assert state.state == "open" and state.probe_at == at(62)

    assert await book.claim_probe("bfl", at(62)) and await book.claim_probe("bfl", at(62))
    await book.probe_result("bfl", True, at(63))
    await book.probe_result("bfl", True, at(63))
    state = (await book.states())["bfl"]
    assert (state.state, state.requests, state.failures) == ("closed", 0, 0)
    assert await book.claim_probe("bfl", at(64))  # closed: everyone goes


async def test_unanswered_probes_are_given_out_again_after_a_cooldown(book: SqlBreakers) -> None:
    await book.report({"gemini": (4, 4)}, at(0))
    assert await book.claim_probe("gemini", at(30)) and await book.claim_probe("gemini", at(30))
    # the replicas holding them died: after another cooldown a new round starts
    assert not await book.claim_probe("gemini", at(59))
    assert await book.claim_probe("gemini", at(60))
    state = (await book.states())["gemini"]
    assert state.state == "half_open" and state.probes_claimed == 1

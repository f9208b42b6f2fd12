"""The PostgreSQL engine's pool: which checkouts pay the pre-ping's round trip, and that a dead connection
is still replaced before a caller gets it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.db import make_engine
from tests.helpers import eventually

#: longer than any test: a connection returned during the test counts as just used
LONG_S = 3600.0


@pytest.fixture
async def engines(pg_url: str) -> AsyncIterator[Callable[..., AsyncEngine]]:
    made: list[AsyncEngine] = []

    def make(**options: Any) -> AsyncEngine:
        made.append(make_engine(pg_url, **options))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


async def _asyncpg_of(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return driver


async def _driver(engine: AsyncEngine) -> asyncpg.Connection:
    """Check a connection out and back in; its asyncpg connection."""
    async with engine.connect() as connection:
        return await _asyncpg_of(connection)


def _log_queries(driver: asyncpg.Connection) -> list[str]:
    queries: list[str] = []
    driver.add_query_logger(lambda record: queries.append(record.query))
    return queries


async def _select_one(engine: AsyncEngine) -> asyncpg.Connection:
    """Run a statement on a checked-out connection; the asyncpg connection it ran on."""
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
        return await _asyncpg_of(connection)


@pytest.mark.parametrize(("idle_s", "pings"), [(LONG_S, 0), (0.0, 1)])
async def test_a_connection_just_returned_is_handed_out_again_without_a_ping(
    engines: Callable[..., AsyncEngine], idle_s: float, pings: int
) -> None:
    engine = engines(pool_size=1, ping_after_idle_s=idle_s)
    driver = await _driver(engine)
    queries = _log_queries(driver)
    assert await _select_one(engine) is driver
    assert queries.count(";") == pings


async def test_a_connection_whose_backend_was_terminated_is_replaced_at_checkout(
    engines: Callable[..., AsyncEngine], pg_url: str
) -> None:
    engine = engines(pool_size=1, ping_after_idle_s=LONG_S)
    driver = await _driver(engine)
    pid = driver.get_server_pid()
    admin = await asyncpg.connect(make_url(pg_url).render_as_string(hide_password=False), timeout=10)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await eventually(driver.is_closed)  # asyncpg reads the server's goodbye

    replacement = await _select_one(engine)  # the caller never sees the dead connection
    assert replacement is not driver
    assert replacement.get_server_pid() != pid


async def test_after_an_invalidation_every_connection_returned_before_it_is_pinged(
    engines: Callable[..., AsyncEngine],
) -> None:
    engine = engines(pool_size=2, ping_after_idle_s=LONG_S)
    async with engine.connect() as first, engine.connect() as second:
        drivers = [await _asyncpg_of(c) for c in (first, second)]
    logs = {id(driver): _log_queries(driver) for driver in drivers}

    async with engine.connect() as connection:
        invalidated = (await connection.get_raw_connection()).driver_connection
        await connection.invalidate()  # as the pool does on a disconnect error
    (other,) = [driver for driver in drivers if driver is not invalidated]

    assert await _select_one(engine) is other
    assert logs[id(other)].count(";") == 1

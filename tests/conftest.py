"""Fixtures: a fresh PostgreSQL database per test run, real servers on ephemeral loopback ports.

The PostgreSQL server comes from IMAGEGEN_TEST_DATABASE_URL (default: the local server). The run creates
its own database, migrates it once with the real Alembic migrations, empties the tables before each
test, and drops the database at the end, so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from server._gen.imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from server.settings import Settings
from storage import migrate
from storage.db import make_engine

DEFAULT_TEST_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin_dsn() -> str:
    url = make_url(os.environ.get("IMAGEGEN_TEST_DATABASE_URL", DEFAULT_TEST_SERVER))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of this run's own, migrated PostgreSQL database."""
    admin = _admin_dsn()
    name = f"imagegen_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(admin, timeout=10)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        engine = make_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    async def drop() -> None:
        connection = await asyncpg.connect(admin, timeout=10)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    asyncio.run(create())
    yield url
    asyncio.run(drop())


@pytest.fixture
async def database_url(pg_url: str) -> str:
    """The run's PostgreSQL database, emptied for this test."""
    connection = await asyncpg.connect(make_url(pg_url).render_as_string(hide_password=False), timeout=10)
    try:
        await connection.execute("TRUNCATE jobs, job_events")
    finally:
        await connection.close()
    return pg_url


def test_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a server on ephemeral ports with fast timers (no real waiting in tests)."""
    values: dict[str, Any] = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "data_dir": data_dir,
        "database_url": database_url,
        "poll_interval_s": 0.2,
        "lease_s": 5.0,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "watch_heartbeat_s": 5.0,
        "shutdown_grace_s": 2.0,
        "sandbox_latency_s": 0.0,
        "db_pool_size": 5,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
async def app(tmp_path: Path, database_url: str) -> AsyncIterator[App]:
    """A whole service (API, worker, HTTP side, sandbox vendors) on PostgreSQL."""
    async with running_app(test_settings(tmp_path, database_url)) as running:
        yield running


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.ImageGenerationStub]:
    """A client of `app`."""
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)

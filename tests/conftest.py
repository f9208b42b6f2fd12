"""Fixtures: a fresh PostgreSQL database per test run, real servers on ephemeral loopback ports.

The PostgreSQL server comes from IMAGEGEN_TEST_DATABASE_URL (default: the local server). The run creates
its own database, migrates it once with the real Alembic migrations, empties the tables before each
test, and drops the database at the end, so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from server.auth import caller_entry
from server.settings import Settings
from storage import migrate
from storage.db import make_engine
from storage.jobs import SqlJobStore
from tests.s3_server import SeaweedS3

pytest_plugins = ["tests.vendor_fixtures"]
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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole run (tests keep apart by key prefix), started on first use."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def database_url(pg_url: str) -> str:
    """The run's PostgreSQL database, emptied for this test."""
    connection = await asyncpg.connect(make_url(pg_url).render_as_string(hide_password=False), timeout=10)
    try:
        await connection.execute(
            "TRUNCATE jobs, job_events, accounts, ledger, provider_breakers,"
            " webhook_secrets, webhook_endpoints, webhook_deliveries"
        )
        # the account stream starts again too: no retention horizon left over from another test
        await connection.execute("UPDATE event_sequencer SET last_sequence = 0, pruned_through = 0")
    finally:
        await connection.close()
    return pg_url


#: a caller that may act for every account, and one limited to the account "acme"
TEST_TOKEN = "igt_test-token-for-every-account"
ACME_TOKEN = "igt_test-token-for-acme-only"


def write_tokens_file(directory: Path) -> Path:
    """A tokens file with TEST_TOKEN (every account) and ACME_TOKEN (only "acme")."""
    path = directory / "tokens.json"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "callers": [
                    caller_entry("tester", TEST_TOKEN, None),
                    caller_entry("acme-backend", ACME_TOKEN, ["acme"]),
                ]
            }
        )
    )
    return path


class _Bearer:
    """Adds `authorization: Bearer <token>` (and x-account-id, unless the call names one) to every call."""

    def __init__(self, token: str, account: str = "default") -> None:
        self._token, self._account = token, account

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {self._token}")
        if "x-account-id" not in metadata:  # type: ignore[comparison-overlap]  # `in` looks at keys
            metadata.add("x-account-id", self._account)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first kind it matches, so each kind needs its own class
class _UnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def authed_channel(target: str, token: str = TEST_TOKEN, account: str = "default") -> grpc.aio.Channel:
    """A channel whose calls carry `token` (and act for `account` unless a call says otherwise)."""
    return grpc.aio.insecure_channel(
        target, interceptors=[_UnaryBearer(token, account), _StreamBearer(token, account)]
    )


def test_settings(data_dir: Path, database_url: str, *, secured: bool = False, **overrides: Any) -> Settings:
    """Settings for a server on ephemeral ports with fast timers (no real waiting in tests).

    `secured=True` configures the test tokens (otherwise the server is in local mode).
    """
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
        "bfl_poll_interval_s": 0.05,
        "db_pool_size": 5,
        "breaker_refresh_s": 0.1,
        # tests of one fault each fail many requests on purpose: a breaker opening across them would make
        # their outcomes depend on timing (tests/test_fallbacks.py sets its own thresholds)
        "breaker_min_requests": 1000,
    }
    if secured:
        values["auth_tokens_file"] = write_tokens_file(data_dir)
    values.update(overrides)
    return Settings.from_env({}, **values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
async def app(tmp_path: Path, database_url: str) -> AsyncIterator[App]:
    """A whole service (API, worker, HTTP side, sandbox vendors) on PostgreSQL."""
    async with running_app(test_settings(tmp_path, database_url)) as running:
        yield running


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.ImageGenerationAsyncStub]:
    """A client of `app`."""
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


@pytest.fixture
async def secured_app(tmp_path: Path, database_url: str) -> AsyncIterator[App]:
    """A whole service with callers' tokens configured (accounts chosen with x-account-id)."""
    async with running_app(test_settings(tmp_path, database_url, secured=True)) as running:
        yield running


@pytest.fixture
async def secured_stub(secured_app: App) -> AsyncIterator[pb_grpc.ImageGenerationAsyncStub]:
    """A client of `secured_app` holding TEST_TOKEN (every account; "default" unless x-account-id says)."""
    async with authed_channel(secured_app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


@pytest.fixture(params=["postgresql", "sqlite"])
async def store_on_each_database(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[SqlJobStore]:
    """A migrated, empty job store on each supported database."""
    if request.param == "postgresql":
        engine = make_engine(database_url)
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        await migrate.upgrade(engine)
    store = SqlJobStore(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()

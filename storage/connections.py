"""Connections to the database, and what their failures mean.

A driver error that means "this connection is gone" becomes `StoreUnavailable` and the connection is
discarded rather than pooled; a bad statement stays the error it is. `Connections` hands out SQLAlchemy
connections and transactions, and asyncpg connections for the statements written in PostgreSQL's SQL;
`HeldConnection` is one such connection a writer keeps between its batches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.errors import SchemaBehind, StoreUnavailable

log = logging.getLogger(__name__)


class Connections:
    """Connections from one engine, each translating a lost connection into `StoreUnavailable`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection (autobegin: reads)."""
        async with unavailable_on_connection_errors(), self.engine.connect() as conn:
            try:
                yield conn
            except sqlalchemy.exc.DBAPIError as exc:
                await _discard_if_broken(conn, exc)
                raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection in a transaction, committed when the block ends without an error."""
        async with unavailable_on_connection_errors(), self.engine.connect() as conn:
            try:
                async with conn.begin():
                    yield conn
            except sqlalchemy.exc.DBAPIError as exc:
                await _discard_if_broken(conn, exc)
                raise

    @contextlib.asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """A pooled connection's asyncpg connection, for statements SQLAlchemy would cost too much on.

        asyncpg's errors are not SQLAlchemy's: a lost connection or a timeout (`is_lost_connection`, the
        test the SQLAlchemy path applies too) becomes StoreUnavailable, and the connection is invalidated
        rather than returned to the pool.
        """
        async with self.connection() as conn:
            raw = await conn.get_raw_connection()
            try:
                yield raw.driver_connection
            except Exception as exc:
                if not is_lost_connection(exc):
                    raise
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise StoreUnavailable(f"database unreachable: {exc!s}") from exc

    def writer(self, held: HeldConnection | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """A group commit writer's asyncpg connection: the one it keeps, if it keeps one."""
        return held.driver() if held is not None else self.driver()


class HeldConnection:
    """A pooled connection that one writer keeps between its batches, for asyncpg statements.

    Checking a connection out of SQLAlchemy's pool and back in (its AsyncConnection, the greenlet hops,
    the check-in's shielded task) is a large share of a small batch's client-side cost, and at moderate
    load batches hold one to three writes. A group commit's writer therefore checks one out at its first
    batch and keeps it while writes keep coming, giving it back once it has had nothing to write for its
    hold time.

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
            async with unavailable_on_connection_errors():
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
            if not is_lost_connection(exc):
                raise_if_schema_behind(exc)
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


@contextlib.asynccontextmanager
async def unavailable_on_connection_errors() -> AsyncIterator[None]:
    """Turn the errors of a lost or unreachable database into `StoreUnavailable`."""
    try:
        yield
    except sqlalchemy.exc.DBAPIError as exc:
        if (
            exc.connection_invalidated
            or isinstance(exc, sqlalchemy.exc.InterfaceError)
            or _is_connection_error(exc)
        ):
            raise StoreUnavailable(f"database unreachable: {exc.orig!s}") from exc
        raise_if_schema_behind(exc.orig)
        raise
    except (OSError, TimeoutError, sqlalchemy.exc.TimeoutError) as exc:
        raise StoreUnavailable(f"database unreachable: {exc!s}") from exc
    except Exception as exc:  # asyncpg's own errors, from statements run on the driver itself
        raise_if_schema_behind(exc)
        raise


#: SQLSTATEs of a statement naming a table or column the database does not have
_UNDEFINED = ("42P01", "42703")
#: the most often an unmigrated database is logged (every RPC and every loop meets it)
_SCHEMA_LOG_INTERVAL_S = 60.0
_schema_logged_at = -_SCHEMA_LOG_INTERVAL_S


def raise_if_schema_behind(error: BaseException) -> None:
    """SchemaBehind when `error` (a driver error, or what it wraps) says a table or column is missing."""
    global _schema_logged_at
    for candidate in (error, error.__cause__):
        if getattr(candidate, "sqlstate", None) in _UNDEFINED:
            behind = SchemaBehind(str(candidate).splitlines()[0])
            if time.monotonic() - _schema_logged_at >= _SCHEMA_LOG_INTERVAL_S:
                _schema_logged_at = time.monotonic()
                log.error("%s", behind)
            raise behind from error


async def _discard_if_broken(conn: AsyncConnection, exc: sqlalchemy.exc.DBAPIError) -> None:
    """A connection whose driver lost track of its state must not go back to the pool."""
    if _is_connection_error(exc) and not conn.invalidated:
        with contextlib.suppress(Exception):
            await conn.invalidate()


def _is_connection_error(exc: sqlalchemy.exc.DBAPIError) -> bool:
    cause = getattr(exc.orig, "__cause__", None)
    return is_lost_connection(exc.orig) or (cause is not None and is_lost_connection(cause))


def is_lost_connection(error: BaseException) -> bool:
    """Whether a driver error means "this connection is gone; try again later" rather than a bad statement.

    PostgreSQL's SQLSTATE class 08 (connection exception), 53 (insufficient resources: too many
    connections, out of memory or disk) and 57P (operator intervention: admin shutdown, terminated
    backend), socket errors and timeouts, and asyncpg's client-side state errors ("another
    operation is in progress", after a query was interrupted or its server connection cut): the
    connection is unusable, the database may be fine.
    """
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(("08", "53", "57P")):
        return True
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(error).__name__ in ("InternalClientError", "InterfaceError")

"""Engines for the two supported databases: PostgreSQL (production, replicas) and SQLite (embedded)."""

from __future__ import annotations

import math
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_


def normalise_url(url: str) -> URL:
    """Accept plain `postgresql://` and `sqlite:///` URLs and pick the async driver for them."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use postgresql:// or sqlite://")


def is_postgres(engine: AsyncEngine) -> bool:
    """Whether the engine talks to PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED) rather than SQLite."""
    return engine.dialect.name == "postgresql"


#: a pooled connection returned this recently is handed out again without a pre-ping (see `_PrePing`)
PING_AFTER_IDLE_S = 0.5


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    statement_timeout_s: float = 10.0,
    ping_after_idle_s: float = PING_AFTER_IDLE_S,
) -> AsyncEngine:
    """An engine whose every wait is bounded: an unreachable database fails calls instead of hanging them."""
    parsed = normalise_url(url)
    if parsed.drivername == "sqlite+aiosqlite":
        # One connection: SQLite has one writer, and serialising in-process turns lock contention
        # ("database is locked") into a short queue. SQLite serves one process; replicas need PostgreSQL.
        engine = create_async_engine(parsed, pool_size=1, max_overflow=0, pool_timeout=statement_timeout_s)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {
        "timeout": statement_timeout_s,  # connection establishment
        "command_timeout": statement_timeout_s,  # each statement
        "server_settings": {"application_name": "imagegen"},
    }
    engine = create_async_engine(
        parsed,
        # A fixed set of connections: an overflow connection is opened for one checkout and closed at its
        # return, and under load that churn (a PostgreSQL backend forked, asyncpg's type introspection,
        # SQLAlchemy's codec set-up, for each) stalls every submit behind it.
        # Past `pool_size`, callers queue for a connection (up to `pool_timeout`) instead.
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=statement_timeout_s,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
    )
    _discard_confused_connections(engine)
    _PrePing(ping_after_idle_s).install(engine)
    return engine


def _discard_confused_connections(engine: AsyncEngine) -> None:
    """Count asyncpg's "another operation is in progress" as a disconnect: the pool replaces the connection.

    asyncpg says it when a connection lost track of its protocol state (a statement interrupted, or its
    server backend terminated mid-way); SQLAlchemy would otherwise return the connection to the pool and
    hand it out again, failing every checkout, pre-ping included, until the process restarts.
    """
    dialect = engine.dialect
    is_disconnect = dialect.is_disconnect

    def is_disconnect_or_confused(error: Any, connection: Any, cursor: Any) -> bool:
        return is_disconnect(error, connection, cursor) or "another operation is in progress" in str(error)

    dialect.is_disconnect = is_disconnect_or_confused  # type: ignore[method-assign,assignment]


class _PrePing:
    """The pool's pre-ping: one `;` rather than BEGIN, `;`, ROLLBACK, and only for a connection that may
    have gone stale.

    SQLAlchemy's asyncpg ping opens a transaction around its probe for pgbouncer's transaction mode
    (sqlalchemy#10226), which this service does not support anyway (its event hub LISTENs). Errors go
    through the adapter's translation, so a dead connection still reads as a disconnect and the pool
    replaces it.

    A connection is handed out without a ping when it came back to the pool less than `idle_s` ago, its
    socket is still open, and no connection has been invalidated since it came back (HikariCP makes the
    same bet with its `aliveBypassWindowMs`). The ping is most of a checkout's CPU, and every submit
    batch and worker transition takes one, most of them within milliseconds of the last. A database
    restart closes the sockets, which asyncpg notices, and the first disconnect it causes makes every
    connection returned before it ping again; what the bet gives up is a connection whose backend died
    silently in the window, whose statement then fails with UNAVAILABLE as it would had the backend died
    just after a ping.
    """

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._returned_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._invalidated_at = -math.inf

    def install(self, engine: AsyncEngine) -> None:
        """Take over `engine`'s pre-ping and follow its pool's check-ins and invalidations."""
        event.listen(engine.sync_engine, "checkin", self._checked_in)
        event.listen(engine.sync_engine, "invalidate", self._invalidated)
        event.listen(engine.sync_engine, "soft_invalidate", self._invalidated)
        engine.dialect.do_ping = self.ping  # type: ignore[method-assign]

    def ping(self, dbapi_connection: Any) -> bool:
        """The dialect's `do_ping`: True if alive; a dead connection raises the disconnect error."""
        driver = dbapi_connection.driver_connection
        returned_at = self._returned_at.get(driver, -math.inf)
        if (
            time.monotonic() - returned_at < self._idle_s
            and returned_at > self._invalidated_at
            and not driver.is_closed()
        ):
            return True
        try:
            await_(driver.fetchrow(";"))
        except Exception as error:
            dbapi_connection._handle_exception(error)  # raises the DBAPI error the pool understands
        return True

    def _checked_in(self, dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None:  # None: the connection was invalidated on the way back
            self._returned_at[dbapi_connection.driver_connection] = time.monotonic()

    def _invalidated(self, _dbapi_connection: Any, _record: Any, _exception: BaseException | None) -> None:
        self._invalidated_at = time.monotonic()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()

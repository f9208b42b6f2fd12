"""One LISTEN connection per process: turns PostgreSQL NOTIFY payloads into JobNotices.

The connection is watched and re-established after a drop; `on_reconnect` is told when it comes back so
the caller can re-read whatever was notified while nobody listened. While `wanted` says no notice can
matter to the process (no watch stream open, no worker), payloads are not even decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from storage.db import normalise_url
from storage.models import JobNotice
from storage.postgres_sql import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class PgListener:
    """LISTENs on the job channel for the life of the process, reconnecting with backoff."""

    def __init__(
        self,
        database_url: str,
        *,
        on_notices: Callable[[Sequence[JobNotice]], None],
        on_reconnect: Callable[[], None],
        wanted: Callable[[], bool] = lambda: True,
        check_interval_s: float = 2.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        url = normalise_url(database_url).set(drivername="postgresql")
        self._dsn = make_url(url).render_as_string(hide_password=False)
        self._on_notices = on_notices
        self._on_reconnect = on_reconnect
        self._wanted = wanted
        self._check_interval_s = check_interval_s
        self._connect_timeout_s = connect_timeout_s
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Begin listening (returns once the first connection is up, or after one failed try)."""
        self._task = asyncio.create_task(self._run(), name="pg-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout_s):
                await self.connected.wait()

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.2
        first = True
        while True:
            connection: asyncpg.Connection[Any] | None = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
                await connection.add_listener(NOTIFY_CHANNEL, self._received)
                self.connected.set()
                if not first:
                    log.info("event listener reconnected to the database")
                    self._on_reconnect()
                first, delay = False, 0.2
                while True:  # a cheap round trip notices a dead connection that sent no FIN
                    await asyncio.sleep(self._check_interval_s)
                    await connection.execute("SELECT 1", timeout=self._connect_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: reconnect
                if self.connected.is_set() or first:
                    log.warning("event listener lost the database (%s); reconnecting", exc)
                self.connected.clear()
                first = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), timeout=1.0)

    def _received(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if not self._wanted():
            return  # every replica's commits are notified: an API process nobody watches skips them
        notices = []
        for line in payload.split("\n"):  # a transaction's notices, up to NOTICES_PER_NOTIFY per payload
            try:
                notices.append(JobNotice.decode(line))
            except ValueError:
                log.warning("ignoring a foreign notification on %s: %r", NOTIFY_CHANNEL, line[:200])
        if notices:
            self._on_notices(notices)

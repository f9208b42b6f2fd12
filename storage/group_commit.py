"""Group commit: concurrent writes of one kind share a transaction, sized by how busy the event loop is.

`ThreadLoad` tells a saturated event loop from an idle one (Linux's per-thread scheduler times);
`GroupCommit` writes whatever arrived while it last wrote, lingering for more only while saturated.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


class Releasable(Protocol):
    """The connection a writer keeps between batches (`storage.connections.HeldConnection`)."""

    async def release(self) -> None:
        """Give the connection back."""
        ...


#: how long a group commit waits for more writes before it writes, while its event loop is saturated
GROUP_COMMIT_LINGER_S = 0.003
#: how long a group commit's writer keeps its pooled connection with nothing to write
GROUP_COMMIT_HOLD_S = 0.05
#: the smallest pool a writer keeps a connection from: two writers then hold at most half of it
HOLD_MIN_POOL_SIZE = 4
#: the share of wall time the event loop's thread must lately have been runnable to count as saturated
SATURATED_SHARE = 0.8


#: Linux's scheduler times of the calling thread (absent without the scheduler's statistics)
_SCHEDSTAT = "/proc/thread-self/schedstat"
_HAS_SCHEDSTAT = os.path.exists(_SCHEDSTAT)


def thread_runnable_time() -> float:
    """Seconds the calling thread has been runnable: on a core, or waiting in the run queue for one.

    Its CPU time where the scheduler's times cannot be read (not Linux).
    """
    if _HAS_SCHEDSTAT:
        try:
            with open(_SCHEDSTAT, "rb") as stat:
                on_cpu_ns, waiting_ns, _ = stat.read().split()
            return (int(on_cpu_ns) + int(waiting_ns)) / 1e9
        except (OSError, ValueError):  # never seen; a writer must not fail for want of a load figure
            pass
    return time.thread_time()


class ThreadLoad:
    """How busy the calling thread has lately been: the share of wall time it was runnable (on a core or
    waiting for one), sampled again at most every `period_s`. Asked from the event loop's thread, it tells
    a saturated loop from an idle one.

    Runnable rather than CPU time, because a saturated loop whose process competes for cores runs less
    than it would, so its CPU time understates how busy it is. A sample reads a small file, at most once
    a period.
    """

    def __init__(
        self,
        *,
        period_s: float = 0.05,
        wall_clock: Callable[[], float] = time.monotonic,
        busy_clock: Callable[[], float] = thread_runnable_time,
    ) -> None:
        self._period_s = period_s
        self._wall_clock, self._busy_clock = wall_clock, busy_clock
        self._since: tuple[float, float] | None = None  # (wall, busy), taken by the thread that asks
        self._share = 0.0

    def share(self) -> float:
        """Runnable seconds per second over the last full period (0.0 until one has passed)."""
        wall = self._wall_clock()
        if self._since is None:
            self._since = (wall, self._busy_clock())
        elif wall - self._since[0] >= self._period_s:
            busy = self._busy_clock()
            self._share = (busy - self._since[1]) / (wall - self._since[0])
            self._since = (wall, busy)
        return self._share

    def saturated(self) -> bool:
        """Whether the thread has lately been runnable `SATURATED_SHARE` of the time or more."""
        return self.share() >= SATURATED_SHARE


class GroupCommit(Generic[_T, _R]):
    """Shares commits between concurrent writes of one kind: one writer takes whatever arrived while it
    last wrote.

    A lone write is made at once; under load, writes that arrive during a commit form the next batch, so
    the cost of a round trip, a transaction and a pooled connection is shared. Each caller is answered
    only when the transaction holding its write has committed.

    While the event loop is saturated the writer first lingers `linger_s` for more writes. Without that,
    batches stay small however busy the process is: grpc.aio admits one RPC per few loop iterations, so
    submits reach the store one at a time. A bigger batch costs much less CPU per write, and CPU is what
    a saturated process lacks; the linger is small beside the queueing such a process has anyway. A
    process with CPU to spare does not linger.

    With `held` (the connection its writes run on), the writer stays for `hold_s` after its last batch
    in case more writes come, and gives the connection back when it leaves.
    """

    def __init__(
        self,
        write: Callable[[Sequence[_T]], Awaitable[Sequence[_R | Exception]]],
        *,
        name: str,
        max_batch: int = 128,
        writers: int = 1,
        linger_s: float = GROUP_COMMIT_LINGER_S,
        saturated: Callable[[], bool] | None = None,
        held: Releasable | None = None,
        hold_s: float = GROUP_COMMIT_HOLD_S,
    ) -> None:
        assert held is None or writers == 1, "one held connection serves one writer"
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._writers_allowed = writers
        self._linger_s = linger_s
        self._saturated = saturated or ThreadLoad().saturated
        self._held = held
        self._hold_s = hold_s if held is not None else 0.0
        self._waiting: list[tuple[_T, asyncio.Future[_R]]] = []
        self._writers: set[asyncio.Task[None]] = set()
        #: set while a writer waits for more writes with its connection held; a submit wakes it
        self._idle: asyncio.Future[None] | None = None

    async def submit(self, item: _T) -> _R:
        """Queue `item` for the next commit and wait for its outcome."""
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._idle is not None:
            _settle(self._idle)
        elif len(self._writers) < self._writers_allowed:
            # One writer: a second (one batch built while the other waits on the database) makes
            # smaller batches, which cost more per write (see bench/README.md).
            self._writers.add(asyncio.create_task(self._drain(), name=self._name))
        # A caller that goes away cancels only its own future: the commit is the writer's task, shared
        # with others, and goes on (no shield needed, and none paid for: a future and a loop hop per write).
        return await future

    async def close(self) -> None:
        """Stop keeping connections: wake a writer that waits for more, and wait for every writer."""
        self._hold_s = 0.0
        if self._idle is not None:
            _settle(self._idle)
        while self._writers:
            await asyncio.wait(list(self._writers))

    async def _drain(self) -> None:
        try:
            while self._waiting:
                try:
                    while await self._more():
                        await self._write_batch()
                finally:
                    if self._held is not None:
                        await self._held.release()
                # A submit that came while the connection went back is in `_waiting`: write it too.
        finally:
            # Leave in the step that found nothing waiting. A done callback would run steps later, and a
            # submit in between would count this writer as running and wait for the next submit's.
            self._writers.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _more(self) -> bool:
        """Whether there is a write to make, waiting up to `hold_s` for one when the connection is held."""
        if not self._waiting and self._hold_s:
            loop = asyncio.get_running_loop()
            self._idle = loop.create_future()
            timer = loop.call_later(self._hold_s, _settle, self._idle)
            try:
                await self._idle
            finally:
                timer.cancel()
                self._idle = None
        return bool(self._waiting)

    async def _write_batch(self) -> None:
        if self._linger_s and len(self._waiting) < self._max_batch and self._saturated():
            await asyncio.sleep(self._linger_s)
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        try:
            outcomes: Sequence[_R | Exception] = await self._write([item for item, _ in batch])
        except Exception as exc:  # the whole transaction failed: every write in it did
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

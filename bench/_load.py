"""Load generators for unary calls: closed loop (as fast as N callers go) and open loop (a fixed rate).

Both are bounded in time and in count, and stop by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

Call = Callable[[], Awaitable[object]]


@dataclass
class LoadResult:
    """Calls completed inside the measured window and their latencies (seconds)."""

    completed: int = 0
    window_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Completed calls per second."""
        return self.completed / self.window_s if self.window_s else 0.0

    def failed(self, error: BaseException) -> None:
        """Count a failed call by its status code."""
        code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        self.errors[code] = self.errors.get(code, 0) + 1

    def add(self, other: LoadResult) -> None:
        """Count another window's calls as this one's (its rate is then over both windows)."""
        self.completed += other.completed
        self.window_s += other.window_s
        self.latencies += other.latencies
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count


async def closed_loop(call: Call, *, concurrency: int, warmup_s: float, duration_s: float) -> LoadResult:
    """`concurrency` callers, each issuing its next call when the previous one answers.

    Calls that start after the warm-up and end inside the window count.
    """
    loop = asyncio.get_running_loop()
    result = LoadResult(window_s=duration_s)
    start = loop.time() + warmup_s
    end = start + duration_s

    async def caller() -> None:
        while (began := loop.time()) < end:
            try:
                await call()
            except (grpc.aio.AioRpcError, TimeoutError) as error:
                result.failed(error)
                continue
            finished = loop.time()
            if began >= start and finished <= end:
                result.completed += 1
                result.latencies.append(finished - began)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return result


async def open_loop(
    call: Call, *, rate: float, duration_s: float, max_outstanding: int = 10_000
) -> LoadResult:
    """Calls started at a fixed `rate` for `duration_s`, whether or not earlier ones answered.

    Latency runs from each call's scheduled start, so a client that falls behind shows up in the figures
    instead of hiding (no coordinated omission). Calls past `max_outstanding` are skipped and counted as
    errors ("SKIPPED") rather than piling up without bound.
    """
    loop = asyncio.get_running_loop()
    result = LoadResult(window_s=duration_s)
    start = loop.time()
    total = int(rate * duration_s)
    outstanding: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        try:
            await call()
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            result.failed(error)
            return
        result.completed += 1
        result.latencies.append(loop.time() - scheduled)

    for n in range(total):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not waiting for state
        elif n % 16 == 0:
            await asyncio.sleep(0)  # behind schedule: still let the calls in flight make progress
        if len(outstanding) >= max_outstanding:
            result.errors["SKIPPED"] = result.errors.get("SKIPPED", 0) + 1
            continue
        task = asyncio.create_task(one(scheduled))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.wait(outstanding, timeout=30)
    return result

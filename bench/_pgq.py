"""The pipeline baseline: pgqueuer running no-op jobs, produced and consumed in one process of its own.

`python -m bench._pgq --dsn URL --warmup S --duration S --backlog N` installs pgqueuer's schema with its
own API (`Queries.install`) in the database it is given (a separate database of the run), then, like one
imagegen process that takes submissions and runs them, enqueues jobs one at a time from a few producers
over its own asyncpg pool, keeping at most `--backlog` jobs not yet run, while a `QueueManager` on its own
connection (LISTEN/NOTIFY, default batch size) runs them with a no-op entrypoint. Jobs whose entrypoint
returned inside the window are counted.

Prints `{"pid": p}` once installed and `{"result": {...}}` at the end (jobs/s, this process's CPU per job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
from typing import Any

import asyncpg
from pgqueuer import Job, Queries, QueueManager
from pgqueuer.db import AsyncpgDriver

_PRODUCERS = 4


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(args.dsn, timeout=10)
    try:
        await Queries.from_asyncpg_connection(admin).install()
    finally:
        await admin.close()
    _emit({"pid": os.getpid()})

    pool = await asyncpg.create_pool(args.dsn, min_size=_PRODUCERS, max_size=_PRODUCERS)
    consumer_connection = await asyncpg.connect(args.dsn, timeout=10)
    producer_queries = Queries.from_asyncpg_pool(pool)
    manager = QueueManager(Queries(AsyncpgDriver(consumer_connection)))
    done = 0
    room = asyncio.Event()
    room.set()
    enqueued = 0

    @manager.entrypoint("noop")  # type: ignore[untyped-decorator, unused-ignore]  # pgqueuer: `make bench` installs it
    async def noop(job: Job) -> None:
        nonlocal done
        done += 1
        room.set()

    loop = asyncio.get_running_loop()
    end = loop.time() + args.warmup + args.duration

    async def produce() -> None:
        nonlocal enqueued
        while loop.time() < end:
            if enqueued - done >= args.backlog:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await room.wait()
                continue
            enqueued += 1
            await producer_queries.enqueue("noop", None)

    async def measure() -> dict[str, Any]:
        await asyncio.sleep(args.warmup)  # pacing: the window starts after the warm-up
        done0, cpu0, t0 = done, _cpu(), loop.time()
        await asyncio.sleep(args.duration)
        jobs, cpu, elapsed = done - done0, _cpu() - cpu0, loop.time() - t0
        return {
            "jobs_per_s": jobs / elapsed,
            "jobs": jobs,
            "window_s": elapsed,
            "cpu_per_job_ms": 1000 * cpu / jobs if jobs else None,
            "cpu_share": cpu / elapsed,
        }

    consumer = asyncio.create_task(manager.run())
    try:
        producers = [asyncio.create_task(produce()) for _ in range(_PRODUCERS)]
        result = await measure()
        await asyncio.gather(*producers)
    finally:
        manager.shutdown.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await consumer
        await pool.close()
        await consumer_connection.close()
    _emit({"result": result})


def main() -> None:
    """Parse the command line and run the baseline."""
    parser = argparse.ArgumentParser(prog="python -m bench._pgq")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--backlog", type=int, default=200)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()

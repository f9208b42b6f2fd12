"""OpenTelemetry tracing: server spans, job attempts linked to their submit, vendor calls, statements.

Nothing here runs unless the settings ask for traces (the standard OTEL_* variables; see
`settings.tracing_wanted`): `enabled` is then set once, at start, and the hot paths test only that flag.
Off, no SDK is imported or set up, and no handler, session or engine is wrapped.

The SDK's provider is this module's own, not OpenTelemetry's global one: a test process starts many
servers, and the global provider can be set only once per process.

Spans:
- an RPC: a SERVER span per call named `imagegen.v1.ImageGeneration/GenerateImage`, continuing the
  caller's W3C `traceparent` / `tracestate`. A server stream (WatchJob, WatchJobs, lasting minutes) has a
  span until it is open: its first message or its initial metadata (authorisation, WatchJob's snapshot
  read and send), so that it reads as the latency a watcher waits for; later messages are not spanned;
- a job attempt: a CONSUMER span per attempt in a new trace, linked to the submit's span (messaging
  conventions: a queued message is processed in a trace of its own), with the job id, model, attempt and
  outcome; vendor HTTP requests, image writes and database statements under it.
Statement spans are made only under a recording span (a sampled trace): shared writes (group commits,
claims of many jobs) belong to no one call's trace and are not spanned.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from storage.models import utcnow

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy.ext.asyncio import AsyncEngine

    from storage.models import Job

log = logging.getLogger(__name__)

#: whether traces are being made; set once by `running`, read by the hot paths
enabled = False
_tracer: trace.Tracer = trace.NoOpTracer()
_propagator = TraceContextTextMapPropagator()
#: the metadata keys of W3C trace context (gRPC metadata keys are lower case)
_TRACE_KEYS = frozenset(("traceparent", "tracestate"))
#: gRPC codes that make a server span an error (RPC semantic conventions); the others are the caller's doing
_SERVER_ERRORS = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    )
)
#: a database statement's text is cut to this many characters in its span
_MAX_STATEMENT = 2000


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[None]:
    """Set up the SDK from the OTEL_* variables for the block; flush what is left at its end."""
    global enabled, _tracer
    # imported here: a process without tracing never loads the SDK or the exporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the SDK; "imagegen" when neither names it
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": "imagegen"})
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    exporter: Any
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = provider.get_tracer("imagegen")
    enabled = True
    log.info("tracing on: spans exported by %s", type(exporter).__name__)
    try:
        yield
    finally:
        enabled = False
        _tracer = trace.NoOpTracer()
        await _shutdown(provider)


async def _shutdown(provider: TracerProvider) -> None:
    # in a thread: the export is a blocking HTTP request, and the collector may be served by this loop
    await asyncio.to_thread(provider.shutdown)


# ---------------------------------------------------------------- gRPC server spans


def traced_handler(
    handler: grpc.RpcMethodHandler[Any, Any], service: str, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with a server span around each call (unary) or until the stream is open (streams)."""
    name = f"{service}/{method}"
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _traced_unary(handler.unary_unary, name, attributes),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _traced_stream(handler.unary_stream, name, attributes),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _traced_stream(handler.stream_stream, name, attributes),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _start_server_span(name: str, attributes: Mapping[str, Any], context: Any) -> trace.Span:
    carrier = {key: value for key, value in context.invocation_metadata() or () if key in _TRACE_KEYS}
    parent = _propagator.extract(carrier) if carrier else None
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def _end_server_span(span: trace.Span, code: Any) -> None:
    value = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    span.set_attribute("rpc.grpc.status_code", value)
    if value in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def _code_of(exc: BaseException, context: Any) -> Any:
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _traced_unary(
    behaviour: Callable[..., Any], name: str, attributes: Mapping[str, Any]
) -> Callable[..., Any]:
    async def traced(request: Any, context: Any) -> Any:
        span = _start_server_span(name, attributes, context)
        token = otel_context.attach(trace.set_span_in_context(span))
        code: Any = grpc.StatusCode.UNKNOWN
        try:
            response = await behaviour(request, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            otel_context.detach(token)
            _end_server_span(span, code)

    return traced


def _traced_stream(
    behaviour: Callable[..., Any], name: str, attributes: Mapping[str, Any]
) -> Callable[..., Any]:
    async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
        stream = _OpeningStream(context, _start_server_span(name, attributes, context))
        token = otel_context.attach(trace.set_span_in_context(stream.span))
        messages = behaviour(request, stream)
        try:
            try:
                first = await anext(messages)
            finally:
                otel_context.detach(token)  # before the first yield: the stream's later steps are not in it
        except StopAsyncIteration:
            stream.opened(context.code() or grpc.StatusCode.OK)
            return
        except BaseException as exc:
            stream.opened(_code_of(exc, context))
            raise
        stream.opened(grpc.StatusCode.OK)
        yield first
        async for message in messages:
            yield message

    return traced


class _OpeningStream:
    """A stream's servicer context, ending the stream's span once the stream is open: at its first
    message, or when the handler sends its initial metadata (WatchJobs, whose first event may come
    much later), or when it fails first."""

    def __init__(self, context: Any, span: trace.Span) -> None:
        self._context = context
        self.span = span
        self._open = False

    def opened(self, code: Any) -> None:
        if not self._open:
            self._open = True
            _end_server_span(self.span, code)

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._context.send_initial_metadata(metadata)
        self.opened(grpc.StatusCode.OK)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def tag(key: str, value: str) -> None:
    """Set an attribute on the current span (the RPC's, in a handler)."""
    trace.get_current_span().set_attribute(key, value)


def current_traceparent() -> str | None:
    """The current span's context as a W3C `traceparent`, to be stored with a job (None: no span)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


# ---------------------------------------------------------------- job attempts


def start_attempt(job: Job) -> trace.Span:
    """A job attempt's span: a new trace, linked to the span that submitted the job."""
    due = max(job.create_time, job.next_attempt_at or job.create_time)
    attributes: dict[str, Any] = {
        "messaging.system": "imagegen",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "jobs",
        "messaging.message.id": str(job.id),
        "imagegen.job.id": str(job.id),
        "imagegen.account": job.account_id,
        "imagegen.model": job.spec.provider,
        "imagegen.attempt": job.attempt,
        "imagegen.variants": job.spec.num_variants,
        "imagegen.queue_wait_s": round(max(0.0, (utcnow() - due).total_seconds()), 6),
    }
    links = []
    if job.trace_context:
        submitted = trace.get_current_span(_propagator.extract({"traceparent": job.trace_context}))
        if submitted.get_span_context().is_valid:
            links.append(Link(submitted.get_span_context()))
            # backends search attributes more readily than links: the caller's trace id finds every attempt
            attributes["imagegen.submit.trace_id"] = format(submitted.get_span_context().trace_id, "032x")
    return _tracer.start_span(
        "process jobs",
        context=otel_context.Context(),  # a root: the claim loop's context belongs to no job
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    )


def attempt_context(span: trace.Span) -> Any:
    """A contextvars context for the attempt's task with `span` current in it."""
    context = contextvars.copy_context()
    context.run(otel_context.attach, trace.set_span_in_context(span))
    return context


def attempt_outcome(outcome: str, *, error_code: str = "", error: str = "") -> None:
    """Record how the current attempt ended; a failure or a retry marks its span as an error."""
    span = trace.get_current_span()
    span.set_attribute("imagegen.outcome", outcome)
    if error_code:
        span.set_attribute("imagegen.error.code", error_code)
    if outcome in ("failed", "retry"):
        span.set_status(Status(StatusCode.ERROR, f"{error_code}: {error}" if error_code else error))


def end_attempt(span: trace.Span, outcome: str | None = None) -> None:
    """End an attempt's span; `outcome` when the attempt could not record its own (it was cancelled)."""
    if outcome is not None:
        span.set_attribute("imagegen.outcome", outcome)
    span.end()


@contextlib.contextmanager
def child_span(name: str, attributes: Mapping[str, Any]) -> Iterator[None]:
    """A span under the current one, only when that one is recording (a sampled trace)."""
    if not trace.get_current_span().is_recording():
        yield
        return
    with _tracer.start_as_current_span(name, kind=SpanKind.INTERNAL, attributes=attributes):
        yield


# ---------------------------------------------------------------- vendor HTTP


def http_trace_config(
    vendor: str, *, propagate: bool, endpoint_of: Callable[[str], str]
) -> aiohttp.TraceConfig:
    """Hooks for a vendor's aiohttp session: each request a CLIENT span under the current span.

    The vendor sees our `traceparent` only with `propagate`: a trace id tells an outsider which of its
    requests belong together, and a vendor has no use for it unless it traces with us.
    """
    config = aiohttp.TraceConfig()

    async def on_start(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
        ctx.otel_span = None
        if not enabled or not trace.get_current_span().is_recording():
            return
        url = params.url
        endpoint = endpoint_of(str(url.path))
        span = _tracer.start_span(
            f"{vendor} {endpoint}",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": params.method,
                "server.address": url.host or "",
                "server.port": url.port or 0,
                "url.full": str(url.with_query(None).with_fragment(None)),
                "imagegen.vendor": vendor,
                "imagegen.vendor.endpoint": endpoint,
            },
        )
        ctx.otel_span = span
        if propagate:
            _propagator.inject(params.headers, context=trace.set_span_in_context(span))

    async def on_end(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
        span = getattr(ctx, "otel_span", None)
        if span is None:
            return
        status = params.response.status
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    async def on_exception(_s: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
        span = getattr(ctx, "otel_span", None)
        if span is None:
            return
        span.set_attribute("error.type", type(params.exception).__qualname__)
        span.set_status(Status(StatusCode.ERROR, str(params.exception)[:200]))
        span.end()

    config.on_request_start.append(on_start)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_exception)
    return config


# ---------------------------------------------------------------- database statements


def instrument_engine(engine: AsyncEngine) -> None:
    """Statement spans for `engine`: SQLAlchemy's executions, and asyncpg's own for the store's raw SQL.

    The store runs its hottest statements on the asyncpg connection under SQLAlchemy's (no cursor events
    there); asyncpg's query loggers see those, and its executemany, while SQLAlchemy's events see the
    prepared statements asyncpg does not log. Each statement is spanned once.
    """
    from sqlalchemy import event

    sync_engine = engine.sync_engine
    system = "postgresql" if sync_engine.dialect.name == "postgresql" else sync_engine.dialect.name
    asyncpg_driver = sync_engine.dialect.driver == "asyncpg"

    def before(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, many: bool) -> None:
        if not enabled or (asyncpg_driver and many) or not trace.get_current_span().is_recording():
            return
        context._otel_span = _statement_span(statement, system)

    def after(_conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
        span = getattr(context, "_otel_span", None)
        if span is not None:
            span.end()
            context._otel_span = None

    def failed(exception_context: Any) -> None:
        span = getattr(exception_context.execution_context, "_otel_span", None)
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, type(exception_context.original_exception).__name__))
            span.end()
            exception_context.execution_context._otel_span = None

    event.listen(sync_engine, "before_cursor_execute", before)
    event.listen(sync_engine, "after_cursor_execute", after)
    event.listen(sync_engine, "handle_error", failed)
    if asyncpg_driver:

        def connected(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.driver_connection.add_query_logger(_logged_statement)

        event.listen(sync_engine, "connect", connected)


def _logged_statement(record: Any) -> None:
    """asyncpg's query logger: called soon after the statement, in its caller's context."""
    if not enabled or not trace.get_current_span().is_recording():
        return
    end = time.time_ns()
    span = _statement_span(record.query, "postgresql", start_time=end - int(record.elapsed * 1e9))
    if record.exception is not None:
        span.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
    span.end(end_time=end)


def _statement_span(statement: str, system: str, *, start_time: int | None = None) -> trace.Span:
    words = statement.split(None, 1)
    operation = words[0].upper() if words else "statement"
    return _tracer.start_span(
        operation,
        kind=SpanKind.CLIENT,
        start_time=start_time,
        attributes={
            "db.system.name": system,
            "db.operation.name": operation,
            "db.query.text": statement[:_MAX_STATEMENT],
        },
    )


# ---------------------------------------------------------------- logs


def log_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, for a log line ({} when there is none)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

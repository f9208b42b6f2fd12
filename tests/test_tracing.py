"""Tracing, end to end: spans exported over OTLP/HTTP to a receiver on loopback, decoded and checked.

The server runs with the real SDK and exporter (configured by the standard OTEL_* variables), the sandbox
vendors, and PostgreSQL; the caller sends a W3C `traceparent` as any traced backend would.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.vendors import endpoint_of
from server import tracing
from server.app import running_app
from server.logs import JsonFormatter
from server.settings import Settings, tracing_wanted
from tests.conftest import test_settings
from tests.helpers import eventually, finished

ROOT = Path(__file__).resolve().parent.parent
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded with opentelemetry-proto."""

    url: str = ""
    spans: list[trace_pb2.Span] = field(default_factory=list)
    service_names: set[str] = field(default_factory=set)

    async def export(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.service_names.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def where(self, **attributes: Any) -> list[trace_pb2.Span]:
        return [span for span in self.spans if all(attrs(span).get(k) == v for k, v in attributes.items())]

    def attempts(self, job_id: str) -> list[trace_pb2.Span]:
        return [span for span in self.where(**{"imagegen.job.id": job_id}) if span.kind == CONSUMER]


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    """A span's attributes as plain values."""
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        kind = value.WhichOneof("value")
        assert kind is not None, attribute
        values[attribute.key] = getattr(value, kind)
    return values


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def test_a_job_is_one_trace_from_the_callers_submit_to_the_vendor(
    tmp_path: Path, database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "imagegen-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    assert Settings.from_env().tracing  # what the operator's variables turn on
    log_lines = io.StringIO()
    handler = logging.StreamHandler(log_lines)
    handler.setFormatter(JsonFormatter())
    servicer_log = logging.getLogger("server.servicer")
    servicer_log.addHandler(handler)
    level = servicer_log.level
    servicer_log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the loggers' level cache
    try:
        async with (
            running_app(test_settings(tmp_path, database_url, tracing=True)) as app,
            grpc.aio.insecure_channel(app.grpc_target) as channel,
        ):
            stub = pb_grpc.ImageGenerationStub(channel)
            header, caller_trace, caller_span = _traceparent()
            job = await stub.GenerateImage(
                pb.GenerateImageRequest(prompt="a lighthouse", provider="flux_2_pro", width=256, height=256),
                metadata=(("traceparent", header), ("tracestate", "caller=1")),
            )
            flaky_header, flaky_trace, _ = _traceparent()
            flaky = await stub.GenerateImage(
                pb.GenerateImageRequest(
                    prompt="a lighthouse [sandbox:server-error]",
                    provider="flux_2_pro",
                    width=256,
                    height=256,
                ),
                metadata=(("traceparent", flaky_header),),
            )
            assert (await finished(stub, job.id)).status == pb.JOB_STATUS_COMPLETED
            assert (await finished(stub, flaky.id)).status == pb.JOB_STATUS_COMPLETED

            def attempts_exported() -> bool:
                ended = receiver.where(**{"imagegen.outcome": "completed"})
                return {attrs(span)["imagegen.job.id"] for span in ended} == {job.id, flaky.id}

            await eventually(attempts_exported)
    finally:
        servicer_log.removeHandler(handler)
        servicer_log.setLevel(level)
    assert not tracing.enabled  # the app's end shut the SDK down
    assert receiver.service_names == {"imagegen-under-test"}

    # GenerateImage continues the caller's trace, as a child of the caller's span
    (submit,) = [
        span
        for span in receiver.where(**{"rpc.method": "GenerateImage"})
        if span.trace_id.hex() == caller_trace
    ]
    assert submit.kind == SERVER
    assert submit.name == "imagegen.v1.ImageGeneration/GenerateImage"
    assert submit.parent_span_id.hex() == caller_span
    assert attrs(submit) == {
        "rpc.system": "grpc",
        "rpc.service": "imagegen.v1.ImageGeneration",
        "rpc.method": "GenerateImage",
        "rpc.grpc.status_code": 0,
        "imagegen.job.id": job.id,
    }
    assert submit.trace_state == "caller=1"

    # the attempt is a trace of its own, linked to the submit
    (attempt,) = receiver.attempts(job.id)
    assert attempt.kind == CONSUMER
    assert attempt.trace_id.hex() != caller_trace
    assert [(link.trace_id.hex(), link.span_id) for link in attempt.links] == [(caller_trace, submit.span_id)]
    assert {k: v for k, v in attrs(attempt).items() if k.startswith("imagegen.")} == {
        "imagegen.job.id": job.id,
        "imagegen.account": "default",
        "imagegen.model": "flux_2_pro",
        "imagegen.attempt": 1,
        "imagegen.variants": 1,
        "imagegen.outcome": "completed",
        "imagegen.submit.trace_id": caller_trace,
        "imagegen.queue_wait_s": attrs(attempt)["imagegen.queue_wait_s"],
    }
    assert 0 <= attrs(attempt)["imagegen.queue_wait_s"] < 10

    # under it: each BFL request, the image write and the completing statement
    children = [span for span in receiver.spans if span.parent_span_id == attempt.span_id]
    vendor = [attrs(span) for span in children if "imagegen.vendor" in attrs(span)]
    assert {(a["imagegen.vendor"], a["imagegen.vendor.endpoint"]) for a in vendor} == {
        ("bfl", "submit"),
        ("bfl", "poll"),
        ("bfl", "download"),
    }
    assert all(a["http.response.status_code"] == 200 for a in vendor)
    assert [span.name for span in children if span.name == "job checkpoint"] == ["job checkpoint"]
    (blob,) = [span for span in children if span.name == "blob put"]
    assert attrs(blob)["imagegen.blob.bytes"] > 0
    statements = [attrs(span) for span in children if "db.system.name" in attrs(span)]
    assert any("UPDATE jobs" in a["db.query.text"] for a in statements), statements
    assert all(a["db.system.name"] == "postgresql" for a in statements)

    # the vendor's 500 made the first attempt an error, retried; the second completed, both linked
    flaky_attempts = sorted(receiver.attempts(flaky.id), key=lambda span: attrs(span)["imagegen.attempt"])
    assert [attrs(span)["imagegen.outcome"] for span in flaky_attempts] == ["retry", "completed"]
    failed, succeeded = flaky_attempts
    assert failed.status.code == ERROR
    assert "PROVIDER_UNAVAILABLE" in failed.status.message
    assert succeeded.status.code != ERROR
    assert all(link.trace_id.hex() == flaky_trace for span in flaky_attempts for link in span.links)
    refused = [span for span in receiver.spans if span.parent_span_id == failed.span_id]
    assert [attrs(span)["http.response.status_code"] for span in refused if span.name == "bfl submit"] == [
        500
    ]

    # the log line of the submit carries its trace
    accepted = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (line,) = [
        entry for entry in accepted if entry["message"] == "job accepted" and entry["job_id"] == job.id
    ]
    assert line["trace_id"] == caller_trace
    assert line["span_id"] == submit.span_id.hex()


async def test_a_watch_stream_is_spanned_until_it_is_open(
    tmp_path: Path, database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    async with (
        running_app(test_settings(tmp_path, database_url, tracing=True)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        header, caller_trace, _ = _traceparent()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetJob(pb.GetJobRequest(job_id="not-a-uuid"), metadata=(("traceparent", header),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a slow lighthouse [sandbox:slow=1]", width=256, height=256)
        )
        watch = stub.WatchJob(pb.WatchJobRequest(job_id=job.id), metadata=(("traceparent", header),))
        await watch.read()  # the snapshot: the stream's span ends here, while the stream goes on
        await eventually(lambda: bool(receiver.where(**{"rpc.method": "WatchJob"})))
        assert not watch.done()
        watch.cancel()
        # WatchJobs may wait long for its first event: it is open once its initial metadata is sent
        panel = stub.WatchJobs(pb.WatchJobsRequest(folder_id="empty"), metadata=(("traceparent", header),))
        await panel.initial_metadata()
        await eventually(lambda: bool(receiver.where(**{"rpc.method": "WatchJobs"})))
        assert not panel.done()
        panel.cancel()
    (get,) = receiver.where(**{"rpc.method": "GetJob"})
    assert attrs(get)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert get.status.code != ERROR  # the caller's mistake, not the server's
    for method in ("WatchJob", "WatchJobs"):
        (stream,) = receiver.where(**{"rpc.method": method})
        assert stream.trace_id.hex() == caller_trace
        assert attrs(stream)["rpc.grpc.status_code"] == 0


def test_tracing_is_on_only_when_the_otel_variables_name_an_exporter() -> None:
    assert not tracing_wanted({})
    assert not Settings.from_env({}).tracing
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing_wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_wanted(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert not tracing_wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert Settings.from_env({"IMAGEGEN_TRACING": "true"}).tracing
    assert not tracing.enabled


async def test_without_tracing_a_job_carries_no_trace(app: Any) -> None:
    assert not app.settings.tracing and not tracing.enabled
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a lighthouse", width=256, height=256))
        stored = await app.store.get("default", uuid.UUID(job.id))
    assert stored.trace_context is None


async def test_vendors_see_our_traceparent_only_when_a_setting_says_so(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    sent: list[str | None] = []

    async def vendor(request: web.Request) -> web.Response:
        sent.append(request.headers.get("traceparent"))
        return web.json_response({"id": "task"})

    app = web.Application()
    app.router.add_post("/v1/flux-2-pro", vendor)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/flux-2-pro"  # type: ignore[union-attr]
    try:
        async with tracing.running():
            for propagate in (False, True):
                hooks = tracing.http_trace_config("bfl", propagate=propagate, endpoint_of=endpoint_of)
                async with aiohttp.ClientSession(trace_configs=[hooks]) as session:
                    with tracing._tracer.start_as_current_span("attempt"):
                        async with session.post(url, json={}) as response:
                            assert response.status == 200
    finally:
        await runner.cleanup()
    assert sent[0] is None
    assert sent[1] is not None and sent[1].startswith("00-")
    (propagated,) = [
        span for span in receiver.where(**{"imagegen.vendor": "bfl"}) if span.span_id.hex() in sent[1]
    ]
    assert attrs(propagated)["imagegen.vendor.endpoint"] == "submit"


def test_without_otel_variables_the_sdk_is_never_loaded(tmp_path: Path) -> None:
    # a process of its own: this one may have loaded the SDK for the tests above
    script = f"""
import asyncio, sys
from pathlib import Path
import grpc
from server.app import running_app
from server.settings import Settings
from imagegen.v1 import imagegen_pb2 as pb, imagegen_pb2_grpc as pb_grpc

async def main():
    settings = Settings.from_env(
        grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", sandbox="off",
        data_dir=Path({str(tmp_path)!r}),
    )
    async with running_app(settings, migrate_schema=True, providers={{}}) as app:
        async with grpc.aio.insecure_channel(app.grpc_target) as channel:
            await pb_grpc.ImageGenerationStub(channel).ListProviders(pb.ListProvidersRequest())
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry.sdk"))
    print("loaded:", loaded)
    assert not loaded

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "IMAGEGEN_"))}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "loaded: []" in run.stdout


async def test_statements_are_spanned_on_sqlite_too(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    settings = test_settings(tmp_path, "", tracing=True)  # no URL: the embedded SQLite database
    async with (
        running_app(settings, migrate_schema=True) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a lighthouse", width=256, height=256))
        await stub.GetJob(pb.GetJobRequest(job_id=job.id))
    (get,) = receiver.where(**{"rpc.method": "GetJob"})
    statements = [attrs(span) for span in receiver.spans if span.parent_span_id == get.span_id]
    assert [(a["db.system.name"], a["db.operation.name"]) for a in statements] == [("sqlite", "SELECT")]
    assert "FROM jobs" in statements[0]["db.query.text"]

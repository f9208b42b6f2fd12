"""The adversarial probes of issue 25, each a reproduction run against a real server, asserting the fix.

Every input here is one a hostile or careless caller can send: raw bytes that are not the method's
message, values too long to echo, forged page tokens, odd URL encodings, budgets hit by a retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client import CollectorRegistry

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from storage.models import JobSpec, NewJob
from tests.conftest import ACME_TOKEN, authed_channel, test_settings
from tests.helpers import bad_fields, eventually, finished, status_details

SERVICE = "/imagegen.v1.ImageGeneration/"


@pytest.fixture
async def secured(tmp_path: Path, database_url: str) -> AsyncIterator[App]:
    """A server with tokens configured, whose worker does not run (jobs stay as submitted)."""
    async with running_app(test_settings(tmp_path, database_url, secured=True, role="api")) as running:
        yield running


async def _raw_unary(target: str, method: str, data: bytes) -> grpc.aio.AioRpcError | bytes:
    async with authed_channel(target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SERVICE + method)
        try:
            return await call(data, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error


def _handled(registry: CollectorRegistry, method: str, code: str) -> float:
    labels = {"grpc_type": "unary", "grpc_service": "imagegen.v1.ImageGeneration", "grpc_method": method}
    return registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0


async def _job_rows(app: App) -> int:
    jobs, _ = await app.store.list("default", page_size=100)
    return len(jobs)


# ---------------------------------------------------------------- 3. malformed protobuf


def _nested_struct(depth: int) -> bytes:
    """A GenerateImageRequest whose provider_options Struct nests `depth` levels deep, encoded by hand."""
    value = b"\x1a\x01x"  # Value.string_value
    struct = b""
    for _ in range(depth):
        entry = b"\x0a\x01k\x12" + _varint(len(value)) + value  # map entry {key: "k", value}
        struct = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields
        value = b"\x2a" + _varint(len(struct)) + struct  # Value.struct_value
    options = pb.GenerateImageRequest.DESCRIPTOR.fields_by_name["provider_options"].number
    return b"\x0a\x01p" + _varint(options << 3 | 2) + _varint(len(struct)) + struct


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(bytes.fromhex("0a0561626366fffe"), id="truncated-garbage"),
        pytest.param(b"\x0a\x03\xff\xfe\xfd", id="invalid-utf8-prompt"),
        pytest.param(b"\x0a\x10abc", id="truncated-length"),
        pytest.param(_nested_struct(120), id="struct-nested-past-100"),
    ],
)
async def test_undecodable_requests_are_invalid_argument_and_counted(secured: App, data: bytes) -> None:
    before = _handled(secured.registry, "GenerateImage", "InvalidArgument")
    outcome = await _raw_unary(secured.grpc_target, "GenerateImage", data)
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert outcome.details() == (
        "the request is not a valid imagegen.v1.GenerateImageRequest (its protobuf encoding does not parse)"
    )
    # the server counts a call once its handler has returned, which may be after the client has the status
    await eventually(lambda: _handled(secured.registry, "GenerateImage", "InvalidArgument") == before + 1)
    assert _handled(secured.registry, "GenerateImage", "Unknown") == 0
    assert await _job_rows(secured) == 0


async def test_undecodable_stream_requests_are_invalid_argument(secured: App) -> None:
    async with authed_channel(secured.grpc_target) as channel:
        watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(SERVICE + "WatchJobs")
        call = watch(b"\x0a\x05ab", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- 4. echoed values


async def test_invalid_values_are_not_echoed_whole(secured: App) -> None:
    async with authed_channel(secured.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        for request in (
            pb.GenerateImageRequest(prompt="a", provider="p" * 10_000),
            pb.GenerateImageRequest(prompt="a", labels={f"BAD{i}" + "k" * 3000: "v" for i in range(300)}),
            pb.GenerateImageRequest(prompt="a", provider="夕" * 100_000),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GenerateImage(request)
            error = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata() or ())
            assert trailers < 8_000
            assert len(error.details() or "") <= 1_000
            fields = bad_fields(error)
            assert fields and all(len(f) <= 200 and len(d) <= 400 for f, d in fields.items())


# ---------------------------------------------------------------- 5. forged page token


@pytest.mark.parametrize(
    "when", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-12-06T00:00:00"]
)
async def test_forged_page_token_out_of_range_is_invalid_argument(secured: App, when: str) -> None:
    # a token of the unfiltered listing: the filter digest is what the server would compute
    from server.servicer import _filter_digest
    from storage.port import JobFilter

    data = {"t": when, "id": "00000000-0000-0000-0000-000000000001", "f": _filter_digest(JobFilter())}
    token = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    async with authed_channel(secured.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.ImageGenerationStub(channel).ListJobs(pb.ListJobsRequest(page_token=token))
    assert "page_token" in bad_fields(caught.value)


# ---------------------------------------------------------------- 6. signed URL expiry digits


async def test_files_expiry_that_is_not_ascii_digits_is_refused(secured: App) -> None:
    async with aiohttp.ClientSession() as http:
        for expires in ("%C2%B2", "%D9%A3", "12%C2%B2"):
            url = f"{secured.http_url}/files/default/root/x/1/1.png?expires={expires}&sig=00"
            async with http.get(url) as response:
                assert 400 <= response.status < 500, (expires, response.status)


# ---------------------------------------------------------------- 9. ListProviders needs a token


async def test_list_providers_requires_a_token(secured: App) -> None:
    async with grpc.aio.insecure_channel(secured.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.ImageGenerationStub(channel).ListProviders(pb.ListProvidersRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with authed_channel(secured.grpc_target, token=ACME_TOKEN, account="acme") as channel:
        answer = await pb_grpc.ImageGenerationStub(channel).ListProviders(pb.ListProvidersRequest())
    assert answer.providers


# ---------------------------------------------------------------- 1. budgets and idempotent retries


async def test_a_retry_of_a_charged_job_returns_it_even_when_the_budget_is_spent(secured: App) -> None:
    await secured.store.set_budget("acme", 30_000)  # exactly one 1024x1024 FLUX.2 image
    async with authed_channel(secured.grpc_target, token=ACME_TOKEN, account="acme") as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        first = await stub.GenerateImage(pb.GenerateImageRequest(prompt="p", request_id="R"))
        again = await stub.GenerateImage(pb.GenerateImageRequest(prompt="p", request_id="R"))
        assert again.id == first.id
        # retries of the same request at once, in one batch, all get the job
        retries = await asyncio.gather(
            *(stub.GenerateImage(pb.GenerateImageRequest(prompt="p", request_id="R")) for _ in range(8))
        )
        assert {job.id for job in retries} == {first.id}
        # a different body under the same id is still a conflict, and a new request is still refused
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="other", request_id="R"))
        assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="p", request_id="S"))
        assert spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status_details(spent.value).details
    assert await secured.store.budget("acme") == 0
    assert len(await secured.store.ledger_entries("acme")) == 2  # the budget and one reservation


# ---------------------------------------------------------------- 2, 8. the address guard

#: IPv6 forms that carry an inward IPv4 address, and spellings a resolver reads as an inward host
INWARD_HOSTS = [
    "[64:ff9b::a9fe:a9fe]",  # NAT64: 169.254.169.254
    "[64:ff9b::a00:1]",
    "[64:ff9b:1::a00:1]",  # local-use NAT64
    "[2002:a9fe:a9fe::]",  # 6to4
    "[::127.0.0.1]",  # IPv4-compatible
    "[::ffff:0:7f00:1]",  # IPv4-translated
    "[::ffff:10.0.0.1]",  # IPv4-mapped
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",  # Teredo
    "localhost.",
    "127。0。0。1",
    "①②⑦.0.0.1",
    "%31%32%37.0.0.1",
    "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # full-width "localhost"
    "127.1",
    "0x7f.0.0.1",
    "intranet",
    "ex ample.com",
    "exa%mple.com",
]


@pytest.mark.parametrize("host", INWARD_HOSTS)
async def test_inward_and_impossible_hosts_are_refused_at_submit(secured: App, host: str) -> None:
    async with authed_channel(secured.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.ImageGenerationStub(channel).GenerateImage(
                pb.GenerateImageRequest(
                    prompt="p", provider="nano_banana_pro", reference_image_urls=[f"http://{host}/x.png"]
                )
            )
    assert "reference_image_urls[0]" in bad_fields(caught.value)
    assert await _job_rows(secured) == 0


@pytest.mark.parametrize(
    "address", ["64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "::127.0.0.1", "::ffff:0:a00:1"]
)
async def test_the_connector_refuses_ipv6_forms_of_inward_ipv4(address: str) -> None:
    from providers.references import ForbiddenAddress, PublicOnlyConnector

    connector = PublicOnlyConnector()
    assert not connector.permitted(address)
    async with aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(ForbiddenAddress):
            async with http.get(f"http://[{address}]/latest/meta-data"):
                pass


def test_public_addresses_and_names_pass_the_guard() -> None:
    from providers.references import host_problem

    for host in (
        "example.com",
        "bücher.de",
        "8.8.8.8",
        "2001:4860:4860::8888",
        "64:ff9b::808:808",
        "a_b.cdn.net",
    ):
        assert host_problem(host) is None, host


@pytest.mark.parametrize("url", ["http://ex ample.com/x.png", "http://%31%32%37.0.0.1:9/x.png"])
async def test_an_unfetchable_reference_fails_the_job_at_once(app: App, url: str) -> None:
    # written past the submit-time check (as by an older release): the fetcher refuses it, at once
    spec = JobSpec(
        prompt="p",
        provider="nano_banana",
        width=1024,
        height=1024,
        num_variants=1,
        reference_image_urls=(url,),
    )
    job, _ = await app.store.create(
        NewJob(account_id="default", spec=spec, estimated_cost_usd_micros=0, request_id="", deadline_s=60)
    )
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        done = await finished(pb_grpc.ImageGenerationStub(channel), str(job.id))
    assert done.status == pb.JOB_STATUS_FAILED
    assert done.error.code == "PROVIDER_REJECTED", done.error
    assert done.attempt == 1


# ---------------------------------------------------------------- 10. the CLI and server-supplied names


@pytest.mark.parametrize("job_id", ["../../../tmp/evil", "/etc/passwd", "a/b", "..", ""])
def test_the_client_never_builds_a_path_from_a_job_id_that_is_not_a_uuid(job_id: str) -> None:
    from client._download import DownloadError, image_path

    with pytest.raises(DownloadError):
        image_path(Path("out"), job_id, 1, "image/png")
    good = image_path(Path("out"), "0E0B6B4C-3D0A-4F7A-9E3B-2A4B6C8D0E1F", 1, "image/png")
    assert good == Path("out/0e0b6b4c-3d0a-4f7a-9e3b-2a4b6c8d0e1f-1.png")


# ---------------------------------------------------------------- 11. smaller ones


async def test_metrics_say_their_text_format_version(secured: App) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{secured.http_url}/metrics") as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
    assert content_type.replace(" ", "") == "text/plain;version=0.0.4;charset=utf-8"


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_reflection_is_served_as_v1_and_v1alpha(secured: App, package: str) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    async with grpc.aio.insecure_channel(secured.grpc_target) as channel:
        info = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = [
            answer
            async for answer in info(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol=f"{package}.ServerReflection"
                        ),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="imagegen.v1.ImageGeneration"
                        ),
                    ]
                ),
                timeout=10,
            )
        ]
    listed = {service.name for service in answers[0].list_services_response.service}
    assert {"imagegen.v1.ImageGeneration", "grpc.reflection.v1.ServerReflection"} <= listed
    for answer in answers[1:]:
        assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    own = descriptor_pb2.FileDescriptorProto.FromString(
        answers[1].file_descriptor_response.file_descriptor_proto[0]
    )
    assert own.package == package


async def test_one_caller_may_hold_only_so_many_watch_streams(tmp_path: Path, database_url: str) -> None:
    settings = test_settings(tmp_path, database_url, secured=True, role="api", max_watch_streams_per_caller=3)
    async with (
        running_app(settings) as app,
        authed_channel(app.grpc_target, token=ACME_TOKEN, account="acme") as channel,
        authed_channel(app.grpc_target) as other,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        streams = [stub.WatchJobs(pb.WatchJobsRequest()) for _ in range(3)]
        for stream in streams:
            await stream.initial_metadata()  # sent once the stream is live
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="p"))
        for too_many in (
            stub.WatchJobs(pb.WatchJobsRequest()),
            stub.WatchJob(pb.WatchJobRequest(job_id=job.id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await too_many.read()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # another caller is not affected, and a closed stream frees its slot
        extra = pb_grpc.ImageGenerationStub(other).WatchJobs(pb.WatchJobsRequest())
        await extra.initial_metadata()
        extra.cancel()
        streams.pop().cancel()

        async def reopened() -> bool:
            again = stub.WatchJobs(pb.WatchJobsRequest())
            try:
                await asyncio.wait_for(again.initial_metadata(), 5)
                return again.done() is False
            finally:
                again.cancel()

        await eventually(reopened)
        for stream in streams:
            stream.cancel()


# ---------------------------------------------------------------- 7. an unmigrated database


@pytest.fixture
async def unmigrated_url(pg_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database that exists but was never migrated."""
    import uuid

    import asyncpg
    from sqlalchemy.engine import make_url

    admin = make_url(pg_url).set(database="postgres").render_as_string(hide_password=False)
    name = f"imagegen_unmigrated_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(admin, timeout=10)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    connection = await asyncpg.connect(admin, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def test_an_unmigrated_database_answers_unavailable_saying_to_migrate(
    tmp_path: Path, unmigrated_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = test_settings(tmp_path, unmigrated_url)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        calls: list[Awaitable[object]] = [
            stub.GenerateImage(pb.GenerateImageRequest(prompt="p")),
            stub.GetJob(pb.GetJobRequest(job_id="00000000-0000-0000-0000-000000000001")),
            stub.ListJobs(pb.ListJobsRequest()),
            stub.CancelJob(pb.CancelJobRequest(job_id="00000000-0000-0000-0000-000000000001")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
            assert "migrate" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchJob(pb.WatchJobRequest(job_id="00000000-0000-0000-0000-000000000001")):
                pass
        assert "migrate" in (caught.value.details() or "")
        # the background loops keep polling meanwhile: a few of their intervals pass
        await asyncio.sleep(4 * settings.poll_interval_s)
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert not tracebacks, [record.getMessage() for record in tracebacks]
    behind = [record for record in caplog.records if "migrate" in record.getMessage()]
    assert 1 <= len(behind) <= 3, [record.getMessage() for record in behind]


# ---------------------------------------------------------------- 12. a database blip after a BFL submit


class _CuttableRelay:
    """A TCP relay on loopback in front of PostgreSQL, cut on demand the way a restart cuts the
    database: every open connection drops and new ones are refused until it is restored."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_database_outage_between_bfl_submit_and_checkpoint_pays_once(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.engine import make_url

    from providers.bfl import BflProvider
    from sandbox import Sandbox

    url = make_url(database_url)
    relay = _CuttableRelay(url.host or "127.0.0.1", url.port or 5432)
    await relay.start()
    outage: list[asyncio.Task[None]] = []

    async def restore_once_a_save_failed() -> None:
        # without the retry nothing says so; the database comes back all the same
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: "checkpoint not saved" in caplog.text, timeout=3)
        await relay.start()

    async def on_response(
        _s: aiohttp.ClientSession, _ctx: object, params: aiohttp.TraceRequestEndParams
    ) -> None:
        # BFL has accepted (and billed) a task; the database goes away before the adapter saves it
        if params.method == "POST" and params.url.path.endswith("/v1/flux-2-pro") and not outage:
            relay.cut()
            outage.append(asyncio.create_task(restore_once_a_save_failed()))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_response)
    async with Sandbox.running() as sandbox, aiohttp.ClientSession(trace_configs=[trace]) as session:
        bfl = BflProvider(session, base_url=sandbox.base_url, api_key="sandbox", poll_interval_s=0.05)
        relayed = url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        async with (
            running_app(test_settings(tmp_path, relayed), providers={"flux_2_pro": bfl}) as app,
            grpc.aio.insecure_channel(app.grpc_target) as channel,
        ):
            stub = pb_grpc.ImageGenerationStub(channel)
            job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="p", num_variants=2))
            done = await finished(stub, job.id, timeout=30)
            assert outage, "the outage never happened"
            await outage[0]
        assert done.status == pb.JOB_STATUS_COMPLETED, done.error
        assert done.attempt == 1
        assert sandbox.counters["bfl.submit"] == 2  # each task paid for once
    relay.cut()


# ---------------------------------------------------------------- 13. images of abandoned attempts


@pytest.mark.parametrize(("prompt", "status"), [("p", "completed"), ("p [sandbox:moderated]", "failed")])
async def test_ending_a_job_removes_the_images_of_its_other_attempts(
    tmp_path: Path, database_url: str, prompt: str, status: str
) -> None:
    from storage.blobs import LocalBlobStore, image_key

    # a replica claims the job, writes one image of its attempt and is killed before it completes
    async with running_app(test_settings(tmp_path, database_url, role="api")) as api:
        async with grpc.aio.insecure_channel(api.grpc_target) as channel:
            job = await pb_grpc.ImageGenerationStub(channel).GenerateImage(
                pb.GenerateImageRequest(prompt=prompt)
            )
        [claim] = await api.store.claim(owner="killed-replica", limit=1, lease_s=0.2)
        assert claim.job.attempt == 1
        blobs = LocalBlobStore(_blob_dir(api))
        await blobs.put(image_key("default", "", claim.job.id, 1, 0, "image/png"), b"half of a result")
    job_dir = blobs.path(f"default/root/{job.id}")
    assert [p.name for p in job_dir.iterdir()] == ["1"]

    # a live worker takes the job over (attempt 2) and ends it
    async with (
        running_app(test_settings(tmp_path, database_url)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        done = await finished(pb_grpc.ImageGenerationStub(channel), job.id)
    assert pb.JobStatus.Name(done.status) == f"JOB_STATUS_{status.upper()}"
    assert done.attempt == 2
    left = sorted(p.name for p in job_dir.iterdir()) if job_dir.exists() else []
    assert left == (["2"] if status == "completed" else [])


async def test_cancelling_a_job_removes_the_images_of_its_attempts(tmp_path: Path, database_url: str) -> None:
    from storage.blobs import LocalBlobStore, image_key

    async with (
        running_app(test_settings(tmp_path, database_url, role="api")) as api,
        grpc.aio.insecure_channel(api.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="p"))
        [claim] = await api.store.claim(owner="killed-replica", limit=1, lease_s=60)
        blobs = LocalBlobStore(_blob_dir(api))
        await blobs.put(image_key("default", "", claim.job.id, 1, 0, "image/png"), b"half of a result")
        cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert cancelled.status == pb.JOB_STATUS_CANCELLED
    job_dir = blobs.path(f"default/root/{job.id}")
    assert not job_dir.exists() or not any(job_dir.iterdir())


# ---------------------------------------------------------------- 7b. a database that turns connections away


@pytest.fixture
async def refused_url(pg_url: str) -> AsyncIterator[str]:
    """A login role PostgreSQL turns away with "too many connections" (SQLSTATE 53300)."""
    import uuid

    import asyncpg
    from sqlalchemy.engine import make_url

    admin = make_url(pg_url).render_as_string(hide_password=False)
    role = f"imagegen_full_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(admin, timeout=10)
    try:
        await connection.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        yield make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    finally:
        await connection.execute(f'DROP ROLE IF EXISTS "{role}"')
        await connection.close()


async def test_a_database_turning_connections_away_answers_unavailable(
    tmp_path: Path, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = test_settings(tmp_path, refused_url)
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        for call in (
            stub.GenerateImage(pb.GenerateImageRequest(prompt="p")),
            stub.ListJobs(pb.ListJobsRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    tracebacks = [
        record for record in caplog.records if record.exc_info and "53300" in str(record.exc_info[1])
    ]
    assert not tracebacks, [record.getMessage() for record in tracebacks]


def _blob_dir(app: App) -> Path:
    """Where the app keeps its images (settings fill the default in)."""
    assert app.settings.blob_dir is not None
    return app.settings.blob_dir

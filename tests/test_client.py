"""The typed asyncio client against a real server on PostgreSQL with the sandbox vendors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from client import (
    AlreadyExists,
    FailedPrecondition,
    ImagegenClient,
    ImagegenError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from sandbox import Sandbox
from server.app import App, running_app
from server.settings import VendorSettings
from tests.conftest import ACME_TOKEN, TEST_TOKEN, test_settings

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = (
    pb.JOB_STATUS_PENDING,
    pb.JOB_STATUS_PROCESSING,
    pb.JOB_STATUS_COMPLETED,
    pb.JOB_STATUS_FAILED,
    pb.JOB_STATUS_CANCELLED,
)
#: retries and reconnects in tens of milliseconds, so tests never wait on real-world backoff
FAST = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2, reconnect_for_s=15.0)


@pytest.fixture
async def client(app: App) -> AsyncIterator[ImagegenClient]:
    async with ImagegenClient.connect(app.grpc_target, timeout_s=10.0, retry=FAST) as connected:
        yield connected


async def test_generate_wait_and_save_three_story_variants(client: ImagegenClient, tmp_path: Path) -> None:
    job = await client.generate(
        "a lighthouse at dusk",
        width=1080,
        height=1920,
        num_variants=3,
        folder_id="reels",
        output_format="webp",
        labels={"team": "growth"},
    )
    assert job.status == PENDING and job.id
    assert uuid.UUID(job.request_id).version == 4  # generated, so the client's own retries are idempotent

    done = await client.wait(job.id, timeout=20)
    assert done.status == COMPLETED and len(done.images) == 3 and done.labels["team"] == "growth"

    paths = await client.save_images(done, tmp_path / "out")
    assert [path.name for path in paths] == [f"{job.id}-{n}.webp" for n in (1, 2, 3)]
    for path, image in zip(paths, done.images, strict=True):
        body = path.read_bytes()
        assert hashlib.sha256(body).hexdigest() == image.sha256
        decoded = Image.open(io.BytesIO(body))
        assert decoded.format == "WEBP" and decoded.size == (1080, 1920)
    assert not list((tmp_path / "out").glob(".*.part"))


async def test_same_request_id_returns_the_same_job_and_a_different_body_is_already_exists(
    client: ImagegenClient,
) -> None:
    first = await client.generate("a teapot", width=256, height=256, request_id="order-42")
    again = await client.generate("a teapot", width=256, height=256, request_id="order-42")
    assert again.id == first.id
    with pytest.raises(AlreadyExists) as caught:
        await client.generate("a different teapot", width=256, height=256, request_id="order-42")
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS and caught.value.message


async def test_errors_carry_the_code_and_every_field_violation(client: ImagegenClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.generate("", width=100, num_variants=9)
    error = caught.value
    assert isinstance(error, ImagegenError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.field_violations) == {"prompt", "width", "num_variants"}
    assert "256-2048" in error.field_violations["width"]

    with pytest.raises(NotFound) as missing:
        await client.get(str(uuid.uuid4()))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND

    done = await client.wait((await client.generate("x", width=256, height=256)).id, timeout=20)
    with pytest.raises(FailedPrecondition) as finished:
        await client.cancel(done.id)
    assert "completed" in finished.value.message


async def test_watch_yields_a_snapshot_then_transitions_in_order_and_resumes(client: ImagegenClient) -> None:
    job = await client.generate("a harbour", width=256, height=256)
    async with asyncio.timeout(20):
        events = [event async for event in client.watch(job.id)]
    assert events[0].kind == pb.JOB_EVENT_KIND_SNAPSHOT
    assert all(event.kind == pb.JOB_EVENT_KIND_TRANSITION for event in events[1:])
    versions = [event.version for event in events]
    assert versions == list(range(versions[0], versions[0] + len(versions)))
    assert events[-1].job.status == COMPLETED

    async with asyncio.timeout(20):
        resumed = [event async for event in client.watch(job.id, after_version=1)]
    assert [event.version for event in resumed] == list(range(2, events[-1].version + 1))


async def test_watch_skips_heartbeats_unless_asked(tmp_path: Path, database_url: str) -> None:
    settings = test_settings(tmp_path, database_url, watch_heartbeat_s=0.05)
    async with running_app(settings) as app, ImagegenClient.connect(app.grpc_target, retry=FAST) as client:
        job = await client.generate("a long one [sandbox:slow=30]", width=256, height=256)
        kinds: list[int] = []
        async with (
            asyncio.timeout(10),
            contextlib.aclosing(client.watch(job.id, include_heartbeats=True)) as events,
        ):
            async for event in events:
                kinds.append(event.kind)
                if kinds.count(pb.JOB_EVENT_KIND_HEARTBEAT) == 2:
                    break
        assert kinds[0] == pb.JOB_EVENT_KIND_SNAPSHOT

        cancelled = await client.cancel(job.id)
        assert cancelled.status == CANCELLED
        async with asyncio.timeout(10):
            plain = [event async for event in client.watch(job.id)]
        # the stream was idle long enough for heartbeats, but none reached the caller
        assert [event.kind for event in plain] == [pb.JOB_EVENT_KIND_SNAPSHOT]
        assert plain[0].job.status == CANCELLED


async def test_wait_times_out_and_the_job_can_still_be_cancelled(client: ImagegenClient) -> None:
    job = await client.generate("forever [sandbox:slow=30]", width=256, height=256)
    with pytest.raises(TimeoutError):
        await client.wait(job.id, timeout=0.3)
    assert (await client.cancel(job.id)).status == CANCELLED
    assert (await client.wait(job.id, timeout=10)).status == CANCELLED


async def test_list_walks_pages_newest_first_with_filters(tmp_path: Path, database_url: str) -> None:
    # an API-only server: the jobs stay pending, so the listing is stable
    async with (
        running_app(test_settings(tmp_path, database_url, role="api")) as app,
        ImagegenClient.connect(app.grpc_target, retry=FAST) as client,
    ):
        made = [
            await client.generate(f"job {n}", width=256, height=256, folder_id="a" if n % 2 else "")
            for n in range(5)
        ]
        await client.cancel(made[0].id)

        pages = [page async for page in client.pages(page_size=2)]
        assert [len(page.jobs) for page in pages] == [2, 2, 1]
        listed = [job.id for page in pages for job in page.jobs]
        assert listed == [job.id for job in reversed(made)]
        assert [job.id async for job in client.list(page_size=2)] == listed
        assert [job.id async for job in client.list(page_size=2, limit=3)] == listed[:3]
        assert [job.id async for job in client.list(folder_id="a")] == [made[3].id, made[1].id]
        assert [job.id async for job in client.list(statuses=["cancelled"])] == [made[0].id]
        assert [job.id async for job in client.list(statuses=[PENDING], folder_id="root")] == [
            made[4].id,
            made[2].id,
        ]


async def test_providers_and_accounts(
    client: ImagegenClient, app: App, tmp_path: Path, database_url: str
) -> None:
    catalog = {provider.id: provider for provider in await client.providers()}
    assert catalog["flux_2_pro"].configured and catalog["flux_2_pro"].max_variants >= 3

    # a server in local mode serves only its default account
    async with ImagegenClient.connect(app.grpc_target, account="acme", retry=FAST) as acme:
        with pytest.raises(PermissionDenied):
            await acme.generate("acme's", width=256, height=256)

    settings = test_settings(tmp_path / "secured", database_url, secured=True, role="api")
    async with (
        running_app(settings) as secured,
        ImagegenClient.connect(secured.grpc_target, account="acme", token=ACME_TOKEN, retry=FAST) as acme,
        ImagegenClient.connect(secured.grpc_target, account="default", token=TEST_TOKEN, retry=FAST) as other,
    ):
        theirs = await acme.generate("acme's", width=256, height=256)
        assert theirs.account_id == "acme"
        with pytest.raises(NotFound):
            await other.get(theirs.id)  # another account cannot see it
        async with ImagegenClient.connect(
            secured.grpc_target, account="default", token=ACME_TOKEN, retry=FAST
        ) as trespasser:
            with pytest.raises(PermissionDenied):
                await trespasser.get(theirs.id)
        async with ImagegenClient.connect(secured.grpc_target, account="acme", retry=FAST) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.get(theirs.id)


async def test_unreachable_server_raises_unavailable_after_its_retries() -> None:
    # a server that existed and stopped: its port is closed, with no port guessing
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(None)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    async with ImagegenClient.connect(f"127.0.0.1:{port}", retry=policy, timeout_s=5) as client:
        with pytest.raises(Unavailable) as caught:
            async with asyncio.timeout(5):
                await client.providers()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            async with asyncio.timeout(5):
                await client.wait(str(uuid.uuid4()))


class _FlakyServicer(pb_grpc.ImageGenerationServicer):
    """Answers UNAVAILABLE (with RetryInfo) to the first submits, then accepts; records what it was sent."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[pb.GenerateImageRequest] = []
        self.metadata: list[dict[str, str]] = []

    async def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:  # type: ignore[type-arg]
        self.requests.append(request)
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata() or ()})
        if len(self.requests) <= self.failures:
            await _abort(context, code_pb2.UNAVAILABLE, "database down", retry_s=0.01)
        return pb.Job(id=str(uuid.uuid4()), status=PENDING, request_id=request.request_id)

    async def ListProviders(
        self,
        request: pb.ListProvidersRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> pb.ListProvidersResponse:
        await _abort(context, code_pb2.RESOURCE_EXHAUSTED, "queue full", retry_s=7.5)
        raise AssertionError("unreachable")


async def _abort(
    context: grpc.aio.ServicerContext,
    code: int,
    message: str,
    *,  # type: ignore[type-arg]
    retry_s: float,
) -> None:
    detail = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_s * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))
    await context.abort(status.code, status.details, status.trailing_metadata)


async def test_unavailable_submits_are_retried_with_one_request_id_and_the_metadata() -> None:
    servicer = _FlakyServicer(failures=2)
    server = grpc.aio.server()
    pb_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with ImagegenClient.connect(
            f"127.0.0.1:{port}", token="s3cret", account="acme", retry=FAST
        ) as client:
            job = await client.generate("retry me")
            assert len(servicer.requests) == 3
            assert {request.request_id for request in servicer.requests} == {job.request_id}
            assert all(
                sent["authorization"] == "Bearer s3cret" and sent["x-account-id"] == "acme"
                for sent in servicer.metadata
            )

            # RESOURCE_EXHAUSTED is not retried, and its RetryInfo reaches the caller
            with pytest.raises(ResourceExhausted) as caught:
                await client.providers()
            assert caught.value.retry_after == pytest.approx(7.5)

        servicer.requests.clear()
        servicer.failures = 10
        async with ImagegenClient.connect(
            f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
        ) as client:
            with pytest.raises(Unavailable) as gave_up:
                await client.generate("still down")
        assert len(servicer.requests) == 3 and gave_up.value.retry_after == pytest.approx(0.01)
    finally:
        await server.stop(None)


async def test_watch_survives_the_server_being_restarted_mid_job(tmp_path: Path, database_url: str) -> None:
    events: list[pb.JobEvent] = []
    processing = asyncio.Event()

    async def follow(client: ImagegenClient, job_id: str) -> None:
        async for event in client.watch(job_id):
            events.append(event)
            if event.job.status == PROCESSING:
                processing.set()

    # The vendor outlives our server, as BFL does: the restarted worker resumes polling the same task.
    async with Sandbox.running() as vendor, contextlib.AsyncExitStack() as stack:
        overrides = {
            "bfl": VendorSettings(api_key="test-key", base_url=vendor.base_url),
            "shutdown_grace_s": 0.2,
        }
        async with running_app(test_settings(tmp_path, database_url, **overrides)) as app:
            port = app.grpc_port
            client = await stack.enter_async_context(ImagegenClient.connect(f"127.0.0.1:{port}", retry=FAST))
            job = await client.generate("kept across a restart [sandbox:slow=3]", width=256, height=256)
            watcher = asyncio.create_task(follow(client, job.id))
            stack.callback(watcher.cancel)
            async with asyncio.timeout(10):
                await processing.wait()
        # Leaving the block shut the server down: watch streams ended UNAVAILABLE, the job went back to
        # the queue, and the port is closed. The watch keeps redialling it.
        assert not watcher.done(), "the watch must outlive the server"

        again = test_settings(tmp_path, database_url, grpc_address=f"127.0.0.1:{port}", **overrides)
        async with running_app(again):
            async with asyncio.timeout(20):
                await watcher

    versions = [event.version for event in events]
    assert versions == list(range(versions[0], versions[0] + len(versions)))  # no gap, no repeat
    assert events[-1].job.status == COMPLETED and len(events[-1].job.images) == 1
    handed_back = [e for e in events if e.previous_status == PROCESSING and e.job.status == PENDING]
    assert handed_back, "the job went back to the queue at the restart, and the resumed watch replayed it"
    assert events[-1].job.attempt == 2
    assert vendor.counters["bfl.submit"] == 1  # resumed the vendor's task, not paid for twice

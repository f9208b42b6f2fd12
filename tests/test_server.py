"""The process around the API: health, reflection, the HTTP side, signed file URLs, WatchJobs, settings."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from imagegen.v1 import imagegen_pb2 as pb
from server.app import App
from server.files import UrlSigner
from server.hub import Closed, EventHub, Subscription
from server.settings import Settings, SettingsError
from storage import migrate
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobNotice, JobSpec, JobStatus, NewJob
from tests.helpers import events_until_end, eventually, finished


async def test_grpc_health_and_readyz_agree(app: App) -> None:
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "imagegen.v1.ImageGeneration"):
            # the health and reflection stubs are typed for sync channels only
            response = await health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service)
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{app.http_url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{app.http_url}/readyz") as response:
            assert response.status == 200 and (await response.json())["ready"] is True


@pytest.mark.parametrize(
    ("revision", "ready"),
    [("0003", False), ("9999_from_a_newer_release", True)],
    ids=["older schema: not ready", "newer release migrated first: still ready"],
)
async def test_readiness_follows_the_schema_through_a_rollout(
    app: App, database_url: str, revision: str, ready: bool
) -> None:
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        head = await connection.fetchval("SELECT version_num FROM alembic_version")
        assert head == migrate.head_revision()
        await connection.execute("UPDATE alembic_version SET version_num = $1", revision)
        try:
            assert await app.readiness.check() is ready
            async with aiohttp.ClientSession() as http, http.get(f"{app.http_url}/readyz") as response:
                assert response.status == (200 if ready else 503)
        finally:
            await connection.execute("UPDATE alembic_version SET version_num = $1", head)
        assert await app.readiness.check() is True
    finally:
        await connection.close()


async def test_reflection_lists_the_service(app: App) -> None:
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        responses = stub.ServerReflectionInfo(  # type: ignore[operator]
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in responses:
            names = {service.name for service in response.list_services_response.service}
            break
    assert {"imagegen.v1.ImageGeneration", "grpc.health.v1.Health"} <= names


async def test_metrics_parse_and_count_jobs(stub, app: App) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", width=256, height=256))
    await finished(stub, job.id)
    async with aiohttp.ClientSession() as http, http.get(f"{app.http_url}/metrics") as response:
        assert response.status == 200
        exposition = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert samples[("imagegen_jobs_submitted_total", (("provider", "flux_2_pro"),))] == 1
    assert (
        samples[
            (
                "imagegen_jobs_finished_total",
                (("code", ""), ("provider", "flux_2_pro"), ("status", "completed")),
            )
        ]
        == 1
    )


async def test_file_urls_are_signed_and_expire(stub, app: App) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", width=256, height=256))
    done = await finished(stub, job.id)
    url = done.images[0].url
    base, query = url.split("?")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200 and len(await response.read()) == done.images[0].size_bytes
        for tampered in (
            f"{base}?{query[:-2]}xx",
            base,
            base.replace(f"/{job.id}/", f"/{job.id}/../") + "?" + query,
            base.replace("/0.png", "/1.png") + "?" + query,
        ):
            async with http.get(tampered) as response:
                assert response.status in (403, 404), tampered
                assert response.status != 200

    signer = UrlSigner(b"k", base_url="http://h", ttl_s=60)
    signed = signer.sign("a/root/j/0.png", now=1_000)
    expires, signature = signed.split("expires=")[1].split("&sig=")
    assert signer.verify("a/root/j/0.png", expires, signature, now=1_050)
    assert not signer.verify("a/root/j/0.png", expires, signature, now=1_061)
    assert not signer.verify("a/root/j/1.png", expires, signature, now=1_050)
    assert not UrlSigner(b"other", base_url="http://h", ttl_s=60).verify(
        "a/root/j/0.png", expires, signature, now=1_050
    )
    assert not signer.verify("a/root/j/0.png", str(int(time.time()) + 10**6), signature)


async def test_watch_jobs_streams_the_accounts_events(secured_stub, secured_app: App) -> None:
    everything = secured_stub.WatchJobs(pb.WatchJobsRequest())
    in_folder = secured_stub.WatchJobs(
        pb.WatchJobsRequest(folder_id="posters", statuses=[pb.JOB_STATUS_COMPLETED])
    )
    foreign = secured_stub.WatchJobs(pb.WatchJobsRequest(), metadata=(("x-account-id", "other"),))
    for stream in (everything, in_folder, foreign):
        await stream.initial_metadata()  # subscribed
    assert secured_app.hub.open_subscriptions == 3

    first = await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="a", width=256, height=256))
    second = await secured_stub.GenerateImage(
        pb.GenerateImageRequest(prompt="b", width=256, height=256, folder_id="posters")
    )
    await finished(secured_stub, first.id)
    await finished(secured_stub, second.id)

    async def read(stream, count: int) -> list[pb.JobEvent]:
        """The next `count` events, past any heartbeat (sent after 5 s of silence, as on a slow run)."""
        events: list[pb.JobEvent] = []
        async with asyncio.timeout(10):
            while len(events) < count:
                event = await stream.read()
                if event.kind != pb.JOB_EVENT_KIND_HEARTBEAT:
                    events.append(event)
        return events

    events = await read(everything, 6)  # pending, processing, completed for each
    by_job: dict[str, list[int]] = {}
    for event in events:
        by_job.setdefault(event.job.id, []).append(event.version)
    assert by_job == {first.id: [1, 2, 3], second.id: [1, 2, 3]}

    [completed] = await read(in_folder, 1)
    assert completed.job.id == second.id and completed.job.status == pb.JOB_STATUS_COMPLETED

    for stream in (everything, in_folder, foreign):
        stream.cancel()
    await eventually(lambda: not secured_app.hub.open_subscriptions, timeout=5)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in secured_stub.WatchJobs(pb.WatchJobsRequest(folder_id="../x")):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_many_watchers_of_one_job_all_see_every_transition(stub) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="crowd", width=256, height=256))
    streams = await asyncio.gather(*(events_until_end(stub, job.id) for _ in range(50)))
    finals = {events[-1].version for events in streams}
    assert len(finals) == 1
    for events in streams:
        versions = [e.version for e in events]
        assert versions == list(range(versions[0], versions[-1] + 1))
        assert events[-1].job.status == pb.JOB_STATUS_COMPLETED


def test_settings_from_environment(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "IMAGEGEN_GRPC_ADDRESS": "0.0.0.0:6000",
            "IMAGEGEN_AUTH_TOKENS_FILE": str(tmp_path / "tokens.json"),
            "IMAGEGEN_DATA_DIR": str(tmp_path),
            "IMAGEGEN_WORKER_CONCURRENCY": "8",
            "IMAGEGEN_JOB_DEADLINE_S": "60",
            "BFL_API_KEY": "k",
            "IMAGEGEN_BFL_BASE_URL": "https://api.eu.bfl.ai",
        }
    )
    assert settings.grpc_address == "0.0.0.0:6000" and settings.worker_concurrency == 8
    assert settings.job_deadline_s == 60.0
    assert settings.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'imagegen.db').resolve()}"
    assert (
        settings.vendor("bfl").api_key == "k" and settings.vendor("bfl").base_url == "https://api.eu.bfl.ai"
    )
    with pytest.raises(SettingsError, match="IMAGEGEN_WORKER_CONCURRENCY"):
        Settings.from_env({"IMAGEGEN_WORKER_CONCURRENCY": "many"})
    with pytest.raises(SettingsError, match="IMAGEGEN_ROLE"):
        Settings.from_env({"IMAGEGEN_ROLE": "boss"})
    with pytest.raises(SettingsError, match="IMAGEGEN_BFL_MAX_POLLS_PER_S must be positive"):
        Settings.from_env({"IMAGEGEN_BFL_MAX_POLLS_PER_S": "0"})
    # local mode (no tokens) refuses to listen beyond loopback, on either port
    for variable in ("IMAGEGEN_GRPC_ADDRESS", "IMAGEGEN_HTTP_ADDRESS"):
        with pytest.raises(SettingsError, match="without authentication"):
            Settings.from_env({variable: "0.0.0.0:7000"})
    assert Settings.from_env({"IMAGEGEN_GRPC_ADDRESS": "[::1]:7000"}).grpc_address == "[::1]:7000"
    with pytest.raises(SettingsError, match="TLS_KEY_FILE"):
        Settings.from_env({"IMAGEGEN_TLS_CERT_FILE": "/x.pem"})


def test_blob_store_and_retention_settings(tmp_path: Path) -> None:
    default = Settings.from_env({"IMAGEGEN_DATA_DIR": str(tmp_path)})
    assert default.blob_url == f"file://{(tmp_path / 'blobs').resolve()}" and default.retention_days == 0
    s3 = Settings.from_env(
        {
            "IMAGEGEN_BLOB_URL": "s3://images/prod",
            "IMAGEGEN_S3_ENDPOINT": "http://minio:9000",
            "IMAGEGEN_S3_PUBLIC_ENDPOINT": "https://images.example.com",
            "IMAGEGEN_RETENTION_DAYS": "30",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "AKIA-test",
            "AWS_SECRET_ACCESS_KEY": "secret-test",
        }
    )
    assert (s3.blob_url, s3.s3_endpoint, s3.s3_public_endpoint) == (
        "s3://images/prod",
        "http://minio:9000",
        "https://images.example.com",
    )
    assert (s3.aws_region, s3.aws_access_key_id, s3.retention_days) == ("eu-west-1", "AKIA-test", 30.0)
    assert "secret-test" not in repr(s3)
    with pytest.raises(SettingsError, match="IMAGEGEN_BLOB_URL"):
        Settings.from_env({"IMAGEGEN_BLOB_URL": "ftp://host/images"})
    with pytest.raises(SettingsError, match="IMAGEGEN_RETENTION_DAYS"):
        Settings.from_env({"IMAGEGEN_RETENTION_DAYS": "-1"})
    with pytest.raises(SettingsError, match="7 days"):
        Settings.from_env({"IMAGEGEN_BLOB_URL": "s3://b", "IMAGEGEN_URL_TTL_S": "700000"})


async def test_the_hub_wants_notices_while_a_stream_is_open_or_a_worker_listens(database_url: str) -> None:
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    try:
        hub = EventHub(store, poll_interval_s=3600)
        assert not hub.wants_notices()
        with hub.subscribe(Subscription(account_id="acct", job_id=uuid.uuid4())):
            assert hub.wants_notices()
        assert not hub.wants_notices()
        with hub.subscribe(Subscription(account_id="acct")):
            assert hub.wants_notices()
        assert not hub.wants_notices()
        assert EventHub(store, poll_interval_s=3600, on_notices=lambda notices: None).wants_notices()
    finally:
        await store.close()
        await engine.dispose()


def test_a_subscription_gets_a_heartbeat_once_quiet_and_never_two_queued() -> None:
    subscription = Subscription(account_id="acct", job_id=uuid.uuid4())
    made = time.monotonic()
    subscription.heartbeat_if_quiet(quiet_since=made - 1.0)  # made after that: not quiet for long enough
    assert subscription.queue.empty()
    subscription.heartbeat_if_quiet(quiet_since=time.monotonic())
    assert subscription.queue.get_nowait() is None  # a heartbeat
    subscription.heartbeat_if_quiet(quiet_since=made)  # the heartbeat counts as something sent
    assert subscription.queue.empty()
    for _ in range(3):  # a stream that is not read gets one, not one per sweep
        subscription.heartbeat_if_quiet(quiet_since=time.monotonic())
    assert subscription.queue.qsize() == 1
    subscription.queue.get_nowait()
    subscription.offer(Closed("server shutting down"))
    assert isinstance(subscription.queue.get_nowait(), Closed)
    subscription.heartbeat_if_quiet(quiet_since=time.monotonic())  # an ended stream gets nothing more
    assert subscription.queue.empty()


@pytest.mark.parametrize("told", ["both, with no dispatch between", "only the second"])
async def test_watch_jobs_gets_a_jobs_versions_from_the_first(database_url: str, told: str) -> None:
    # The hub may first hear of a job at its second version: the two notices coalesced in its inbox (a
    # job created and moved on before the dispatcher ran), or the first NOTIFY was lost. An account's
    # stream, which does not repair gaps as a WatchJob stream does, must still get both events.
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    hub = EventHub(store, poll_interval_s=3600)  # no catch-up: delivery rests on the notices alone
    hub.start()
    try:
        with hub.subscribe(Subscription(account_id="acct")) as subscription:
            spec = JobSpec(prompt="a", provider="flux_2_pro", width=256, height=256, num_variants=1)
            job, _ = await store.create(NewJob(account_id="acct", spec=spec, estimated_cost_usd_micros=0))
            cancelled, _ = await store.cancel("acct", job.id)
            for moved in (job, cancelled) if told.startswith("both") else (cancelled,):
                hub.notify(  # one at a time, with no chance for the dispatcher to run between
                    [
                        JobNotice(
                            job_id=moved.id, version=moved.version, status=moved.status, account_id="acct"
                        )
                    ]
                )
            async with asyncio.timeout(10):
                events = [await subscription.queue.get() for _ in range(2)]
    finally:
        await hub.close()
        await store.close()
        await engine.dispose()
    assert [(event.version, event.job.status) for event in events] == [  # type: ignore[union-attr]
        (1, JobStatus.PENDING),
        (2, JobStatus.CANCELLED),
    ]

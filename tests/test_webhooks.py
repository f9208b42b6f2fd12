"""Webhooks: signed as Standard Webhooks has it (checked by the `standardwebhooks` package, an independent
implementation), delivered at least once from the outbox through receiver outages, rotations, redirects
and a replica killed mid-delivery; none written for accounts that use none."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.references import parse_networks
from server.app import App, running_app
from server.webhooks import backoff_s, retry_after_s, target_violation
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobSpec, NewJob
from tests.conftest import test_settings
from tests.helpers import bad_fields, eventually
from tests.test_durability import _replica_env, _start_replica, _start_sandbox

LOOPBACK = "127.0.0.0/8"
SPEC = JobSpec(prompt="a lighthouse", provider="flux_2_pro", width=256, height=256, num_variants=1)
FAST_WEBHOOKS: dict[str, Any] = {
    "webhook_allow_networks": LOOPBACK,
    "webhook_retry_base_s": 0.05,
    "sandbox_latency_s": 0.05,
}


@dataclass
class Receiver:
    """A webhook receiver on loopback that verifies every request with `standardwebhooks`.

    `answers` is consumed one status per request (then 200); a status of 0 holds the request open until
    the connection goes away (a sender killed mid-delivery)."""

    secrets: list[str]
    answers: list[int] = field(default_factory=list)
    retry_after: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    verified_by: list[list[int]] = field(default_factory=list)
    redirected_hits: int = 0
    held: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {key.lower(): value for key, value in request.headers.items()}
        # every request verifies under some secret (during a rotation, under each of them)
        matched = []
        for index, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(body, headers)
                matched.append(index)
            except WebhookVerificationError:
                pass
        assert matched, f"a delivery failed verification: {headers}"
        answer = self.answers.pop(0) if self.answers else 200
        if answer == 0:
            self.held.set()
            await self.released.wait()
        if 200 <= answer < 300:
            self.received.append({"id": headers["webhook-id"], "body": json.loads(body), "headers": headers})
            self.verified_by.append(matched)
        response_headers = {"Retry-After": self.retry_after} if self.retry_after and answer >= 400 else {}
        if answer in (301, 302, 307, 308):
            response_headers["Location"] = self.url + "/elsewhere"
        return web.Response(status=answer, headers=response_headers)

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected_hits += 1
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/hook/elsewhere", self.elsewhere)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        self.released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def ids(self) -> Counter[str]:
        return Counter(item["id"] for item in self.received)


@pytest.fixture
async def hooked_app(tmp_path: Path, database_url: str) -> AsyncIterator[App]:
    async with running_app(test_settings(tmp_path, database_url, **FAST_WEBHOOKS)) as running:
        yield running


@pytest.fixture
async def hooked_stub(hooked_app: App) -> AsyncIterator[pb_grpc.ImageGenerationAsyncStub]:
    async with grpc.aio.insecure_channel(hooked_app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[SqlJobStore]:
    """The store as the `python -m server webhook` commands use it."""
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


async def _rows(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


def _request(prompt: str, **fields: Any) -> pb.GenerateImageRequest:
    return pb.GenerateImageRequest(prompt=prompt, width=256, height=256, **fields)


async def _terminal(stub: pb_grpc.ImageGenerationAsyncStub, job_id: str, **kwargs: Any) -> pb.Job:
    found: list[pb.Job] = []

    async def done() -> bool:
        job = await stub.GetJob(pb.GetJobRequest(job_id=job_id), **kwargs)
        found.append(job)
        return job.status in (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)

    await eventually(done, timeout=30)
    return found[-1]


async def test_deliveries_verify_with_standardwebhooks_before_during_and_after_a_rotation(
    hooked_stub: pb_grpc.ImageGenerationAsyncStub, admin: SqlJobStore, database_url: str
) -> None:
    receiver = Receiver(secrets=[])
    await receiver.start()
    try:
        endpoint, first_secret = await admin.add_endpoint("default", receiver.url)
        assert first_secret is not None and first_secret.startswith("whsec_")
        receiver.secrets.append(first_secret)
        job = await hooked_stub.GenerateImage(_request("before"))
        await _terminal(hooked_stub, job.id)
        await eventually(lambda: len(receiver.received) == 1, timeout=20)
        delivered = receiver.received[0]
        assert delivered["body"]["type"] == "job.completed"
        data = delivered["body"]["data"]
        assert data["job_id"] == job.id and data["status"] == "completed" and data["account_id"] == "default"
        assert data["sequence"] > 0 and data["version"] >= 3 and data["provider"] == "flux_2_pro"
        assert data["served_model"] == "flux-2-pro"
        assert len(json.dumps(delivered["body"])) < 20_000
        assert delivered["headers"]["webhook-signature"].count("v1,") == 1

        second_secret = await admin.rotate_secret("default", overlap=timedelta(hours=1))
        receiver.secrets.append(second_secret)
        job = await hooked_stub.GenerateImage(_request("during"))
        await _terminal(hooked_stub, job.id)
        await eventually(lambda: len(receiver.received) == 2, timeout=20)
        during = receiver.received[1]
        assert during["body"]["type"] == "job.completed"
        assert during["headers"]["webhook-signature"].count("v1,") == 2  # both secrets sign
        assert receiver.verified_by[1] == [0, 1]  # a receiver holding either one accepts it

        # the overlap over: only the new secret signs, and the old one no longer verifies
        await _rows(database_url, "UPDATE webhook_secrets SET previous_expires_at = now() - interval '1 s'")
        job = await hooked_stub.GenerateImage(_request("after"))
        await _terminal(hooked_stub, job.id)
        await eventually(lambda: len(receiver.received) == 3, timeout=20)
        assert receiver.verified_by[2] == [1]

        # the operator's view, and a redelivery under the same webhook-id
        async def all_recorded() -> bool:  # the receiver answers before the sender records it
            return {d.status for d in await admin.deliveries("default")} == {"delivered"}

        await eventually(all_recorded, timeout=20)
        deliveries = await admin.deliveries("default")
        assert len(deliveries) == 3
        assert all(d.endpoint_id == endpoint.id for d in deliveries)
        assert await admin.redeliver(deliveries[-1].id)
        await eventually(lambda: len(receiver.received) == 4, timeout=20)
        assert receiver.received[3]["id"] == deliveries[-1].id
        assert receiver.received[3]["body"] == next(
            r["body"] for r in receiver.received[:3] if r["id"] == deliveries[-1].id
        )
    finally:
        await receiver.stop()


async def test_no_endpoint_and_no_callback_url_write_no_outbox_rows(
    hooked_stub: pb_grpc.ImageGenerationAsyncStub, admin: SqlJobStore, database_url: str
) -> None:
    receiver = Receiver(secrets=[])
    await receiver.start()
    try:
        _, secret = await admin.add_endpoint("default", receiver.url, ("completed",))
        assert secret is not None
        receiver.secrets.append(secret)
        # an account with no endpoint: created and cancelled through the store (the server serves one)
        quiet, _ = await admin.create(NewJob(account_id="quiet", spec=SPEC, estimated_cost_usd_micros=0))
        await admin.cancel("quiet", quiet.id)
        hooked = await hooked_stub.GenerateImage(_request("hooked"))
        await _terminal(hooked_stub, hooked.id)
        await eventually(lambda: len(receiver.received) == 1, timeout=20)
        rows = await _rows(database_url, "SELECT account_id, event_type FROM webhook_deliveries")
        # the completion only: not the pending and processing events, nothing of "quiet"
        assert [tuple(row) for row in rows] == [("default", "job.completed")]
    finally:
        await receiver.stop()


async def test_a_callback_url_gets_the_terminal_event_and_is_checked_first(
    hooked_stub: pb_grpc.ImageGenerationAsyncStub, admin: SqlJobStore
) -> None:
    receiver = Receiver(secrets=[])
    await receiver.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # no secret to sign with yet
            await hooked_stub.GenerateImage(_request("x", callback_url=receiver.url))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "webhook rotate-secret" in (caught.value.details() or "")
        receiver.secrets.append(await admin.rotate_secret("default", overlap=timedelta(hours=1)))
        for bad in ("http://169.254.169.254/latest/meta-data", "ftp://example.com/x", "http://10.0.0.1/x"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await hooked_stub.GenerateImage(_request("x", callback_url=bad))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "callback_url" in bad_fields(caught.value)
        job = await hooked_stub.GenerateImage(_request("called back", callback_url=receiver.url))
        final = await _terminal(hooked_stub, job.id)
        await eventually(lambda: len(receiver.received) == 1, timeout=20)
        body = receiver.received[0]["body"]
        assert body["data"]["job_id"] == job.id and body["data"]["version"] == final.version
    finally:
        await receiver.stop()


async def test_a_receiver_that_is_down_then_up_gets_every_delivery_and_redirects_are_not_followed(
    hooked_app: App, hooked_stub: pb_grpc.ImageGenerationAsyncStub, admin: SqlJobStore, database_url: str
) -> None:
    # down for a while (503s, a refused redirect, Retry-After honoured), then up
    receiver = Receiver(secrets=[], answers=[503, 307, 500, 503, 502, 503, 429], retry_after="0")
    await receiver.start()
    try:
        _, secret = await admin.add_endpoint("default", receiver.url)
        assert secret is not None
        receiver.secrets.append(secret)
        ids = [(await hooked_stub.GenerateImage(_request(f"job {n}"))).id for n in range(4)]
        ids.append((await hooked_stub.GenerateImage(_request("cancelled [sandbox:slow=5]"))).id)
        await hooked_stub.CancelJob(pb.CancelJobRequest(job_id=ids[-1]))
        for job_id in ids:
            await _terminal(hooked_stub, job_id)
        await eventually(
            lambda: {r["body"]["data"]["job_id"] for r in receiver.received} == set(ids), timeout=30
        )
        assert receiver.redirected_hits == 0  # the 307 was a failure to retry, not a place to go
        rows = await _rows(database_url, "SELECT id, status, attempts FROM webhook_deliveries")
        assert len(rows) == 5 and {row["status"] for row in rows} == {"delivered"}
        assert sum(row["attempts"] for row in rows) == 5 + 7  # each refusal cost exactly one retry
        assert set(receiver.ids()) == {row["id"] for row in rows}
        async with aiohttp.ClientSession() as session, session.get(f"{hooked_app.http_url}/metrics") as page:
            metrics = await page.text()
        assert 'imagegen_webhook_deliveries_total{outcome="retry"} 7.0' in metrics
        assert 'imagegen_webhook_deliveries_total{outcome="delivered"} 5.0' in metrics
        assert "imagegen_webhook_oldest_undelivered_age_seconds" in metrics
    finally:
        await receiver.stop()


async def test_410_gone_disables_the_endpoint(
    hooked_stub: pb_grpc.ImageGenerationAsyncStub, admin: SqlJobStore, database_url: str
) -> None:
    receiver = Receiver(secrets=[], answers=[410])
    await receiver.start()
    try:
        endpoint, secret = await admin.add_endpoint("default", receiver.url)
        assert secret is not None
        receiver.secrets.append(secret)
        job = await hooked_stub.GenerateImage(_request("gone"))
        await _terminal(hooked_stub, job.id)

        async def disabled() -> bool:
            return not (await admin.endpoints("default"))[0].enabled

        await eventually(disabled, timeout=20)
        assert "410" in (await admin.endpoints("default"))[0].disabled_reason
        rows = await _rows(database_url, "SELECT status, last_status_code FROM webhook_deliveries")
        assert [tuple(row) for row in rows] == [("failed", 410)]
        # a disabled endpoint gets no new deliveries
        job = await hooked_stub.GenerateImage(_request("after"))
        await _terminal(hooked_stub, job.id)
        assert len(await _rows(database_url, "SELECT id FROM webhook_deliveries")) == 1
        assert endpoint.id
    finally:
        await receiver.stop()


def test_targets_pass_the_address_guard_and_retry_delays_are_bounded() -> None:
    assert target_violation("https://hooks.example.com/x", ()) is None
    assert target_violation("http://hooks.example.com/x", ()) == "must be an https URL"
    for inside in ("https://127.0.0.1/x", "https://169.254.169.254/", "https://[::1]/x", "https://10.1.2.3/"):
        assert target_violation(inside, ()) is not None, inside
    assert target_violation("http://127.0.0.1:9/x", parse_networks(LOOPBACK)) is None
    assert retry_after_s("7") == 7.0 and retry_after_s("nonsense") is None and retry_after_s(None) is None
    for attempt in range(1, 40):
        delay = backoff_s(attempt, 5.0)
        assert 0 < delay <= 3600


async def test_a_replica_killed_mid_delivery_loses_no_webhook(database_url: str, tmp_path: Path) -> None:
    receiver = Receiver(secrets=[], answers=[0])  # the first request is held until its sender dies
    await receiver.start()
    sandbox, sandbox_url = await _start_sandbox(tmp_path, latency_s=0.05)
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    replicas = []
    try:
        _, secret = await store.add_endpoint("default", receiver.url)
        assert secret is not None
        receiver.secrets.append(secret)
        env = _replica_env(
            database_url,
            tmp_path / "data",
            sandbox_url,
            IMAGEGEN_WEBHOOK_ALLOW_NETWORKS=LOOPBACK,
            IMAGEGEN_WEBHOOK_TIMEOUT_S="2",
            IMAGEGEN_WEBHOOK_RETRY_BASE_S="0.05",
        )
        first = await _start_replica("first", tmp_path, env)
        replicas.append(first)
        ids = [(await first.stub.GenerateImage(_request(f"job {n}"))).id for n in range(6)]
        async with asyncio.timeout(30):
            await receiver.held.wait()  # the first replica is mid-delivery
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        second = await _start_replica("second", tmp_path, env)
        replicas.append(second)
        for job_id in ids:
            await _terminal(second.stub, job_id)

        rows: list[asyncpg.Record] = []

        async def all_delivered() -> bool:
            rows[:] = await _rows(database_url, "SELECT id, job_id, status, attempts FROM webhook_deliveries")
            return len(rows) == len(ids) and all(row["status"] == "delivered" for row in rows)

        await eventually(all_delivered, timeout=40)
        assert {str(row["job_id"]) for row in rows} == set(ids)  # every terminal event, none lost
        assert set(receiver.ids()) == {row["id"] for row in rows}  # each webhook-id at least once
        assert any(row["attempts"] >= 2 for row in rows)  # the held one, sent again by the survivor
    finally:
        for replica in replicas:
            await replica.stop(signal.SIGKILL)
            if replica.channel is not None:
                await replica.channel.close()
        await sandbox.stop()
        await store.close()
        await engine.dispose()
        await receiver.stop()


@pytest.fixture
def store(store_on_each_database: SqlJobStore) -> SqlJobStore:
    return store_on_each_database


async def test_the_outbox_trigger_claims_and_leases_on_each_database(store: SqlJobStore) -> None:
    endpoint, secret = await store.add_endpoint("acct", "https://hooks.example.com/x", ("cancelled",))
    assert secret is not None and await store.signing_secrets("acct") == [secret]
    _, again = await store.add_endpoint("acct", "https://hooks.example.com/y", ("completed",))
    assert again is None  # one secret per account, shown once
    job, _ = await store.create(NewJob(account_id="acct", spec=SPEC, estimated_cost_usd_micros=0))
    other, _ = await store.create(NewJob(account_id="other", spec=SPEC, estimated_cost_usd_micros=0))
    await store.cancel("acct", job.id)
    await store.cancel("other", other.id)
    assert [(d.event_type, d.endpoint_id, d.status) for d in await store.deliveries("acct")] == [
        ("job.cancelled", endpoint.id, "pending")
    ]
    assert await store.deliveries("other") == []

    claimed = await store.claim_deliveries(owner="r1", limit=10, lease_s=30)
    assert [(d.job_id, e.id if e else None) for d, e in claimed] == [(job.id, endpoint.id)]
    assert await store.claim_deliveries(owner="r2", limit=10, lease_s=30) == []  # leased
    delivery = claimed[0][0]
    event = await store.delivery_event(delivery)
    assert event is not None and event.version == 2
    assert not await store.finish_delivery(delivery, owner="r2", status="delivered", payload="{}")  # fenced
    assert await store.finish_delivery(
        delivery, owner="r1", status="delivered", payload="{}", status_code=204
    )
    assert (await store.deliveries("acct"))[0].status == "delivered"
    assert await store.oldest_undelivered() is None


async def test_the_admin_commands(database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "IMAGEGEN_DATABASE_URL": database_url, "IMAGEGEN_DATA_DIR": str(tmp_path)}

    async def server(*argv: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "webhook", *argv, env=env, cwd=Path(__file__).parents[1],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, _ = await server("add", "acme", "https://hooks.example.com/in", "--events", "completed,failed")
    assert code == 0 and "whsec_" in out and "events completed,failed" in out
    endpoint_id = out.split()[0]
    code, out, _ = await server("list", "acme")
    assert code == 0 and endpoint_id in out and "enabled" in out
    code, out, _ = await server("rotate-secret", "acme", "--overlap-hours", "2")
    assert code == 0 and "whsec_" in out and "2 h" in out
    code, _, err = await server("add", "acme", "https://169.254.169.254/latest")
    assert code == 2 and "metadata" in err
    code, _, err = await server("add", "acme", "https://hooks.example.com/in", "--events", "pending")
    assert code == 2 and "--events" in err
    code, out, _ = await server("deliveries", "acme")
    assert code == 0 and out == ""
    code, out, _ = await server("redeliver", "msg_unknown")
    assert code == 1 and "no such delivery" in out
    code, out, _ = await server("remove", endpoint_id)
    assert code == 0 and "removed" in out

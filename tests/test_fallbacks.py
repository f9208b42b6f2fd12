"""Fallback models and vendor circuit breakers, against a sandbox whose vendors go down and come back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from sandbox import Sandbox
from server.app import App, running_app
from server.settings import VendorSettings
from storage.breakers import BreakerPolicy, SqlBreakers
from tests.conftest import authed_channel, test_settings
from tests.helpers import bad_fields, events_until_end, eventually, finished

VENDORS = ("bfl", "openai", "ark", "gemini")


def _settings(data_dir: Path, database_url: str, vendor: Sandbox, **overrides: Any) -> Any:
    """Every vendor at the shared sandbox (so that several replicas call one), breakers quick to act."""
    values: dict[str, Any] = {
        **{name: VendorSettings(api_key="test-key", base_url=vendor.base_url) for name in VENDORS},
        "max_attempts": 2,
        "breaker_min_requests": 3,
        "breaker_failure_ratio": 0.5,
        "breaker_cooldown_s": 5.0,
        "breaker_probes": 1,
        "breaker_refresh_s": 0.05,
    }
    values.update(overrides)
    return test_settings(data_dir, database_url, **values)


@pytest.fixture
async def vendor() -> AsyncIterator[Sandbox]:
    async with Sandbox.running() as sandbox:
        yield sandbox


@contextlib.asynccontextmanager
async def _client(app: App) -> AsyncIterator[pb_grpc.ImageGenerationAsyncStub]:
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


def _request(prompt: str, provider: str = "flux_2_pro", **fields: Any) -> pb.GenerateImageRequest:
    return pb.GenerateImageRequest(prompt=prompt, provider=provider, width=1024, height=1024, **fields)


async def _health(stub: pb_grpc.ImageGenerationAsyncStub, provider: str) -> pb.Provider:
    listed = await stub.ListProviders(pb.ListProvidersRequest())
    [entry] = [p for p in listed.providers if p.id == provider]
    return entry


def _breaker_gauge(app: App, vendor: str) -> float | None:
    return app.registry.get_sample_value("imagegen_provider_breaker_state", {"vendor": vendor})


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_staged_bfl_outage_falls_back_opens_the_breaker_waits_and_recovers(
    tmp_path: Path, database_url: str, vendor: Sandbox, store: str
) -> None:
    if store == "sqlite":  # one process: the same breaker, in the embedded store
        database_url = f"sqlite:///{tmp_path / 'imagegen.db'}"
    settings = _settings(tmp_path, database_url, vendor)
    async with running_app(settings, migrate_schema=True) as app, _client(app) as stub:
        assert (await _health(stub, "flux_2_pro")).breaker_state == "closed"
        assert _breaker_gauge(app, "bfl") == 0
        vendor.set_down("bfl")

        # Attempts on bfl spent on 503s, then on to the fallback; billed at the model that served it.
        first = await stub.GenerateImage(_request("a lighthouse", fallback_providers=["seedream_4_5"]))
        assert first.estimated_cost_usd_micros == 40_000  # the chain's most expensive quote (Seedream 4.5)
        events = await events_until_end(stub, first.id)
        done = events[-1].job
        assert done.status == pb.JOB_STATUS_COMPLETED, events[-1]
        assert done.provider == "flux_2_pro" and done.served_provider == "seedream_4_5"
        assert done.served_model == "seedream-4-5-251128" and done.cost_usd_micros == 40_000
        assert list(done.fallback_providers) == ["seedream_4_5"]
        switch = [e for e in events if "continuing on seedream_4_5" in e.message]
        assert len(switch) == 1 and switch[0].message.startswith("flux_2_pro failed after 2 attempts")
        assert switch[0].job.status == pb.JOB_STATUS_PENDING

        # More failures pass the threshold (3 requests, half failed): the breaker opens.
        second = await stub.GenerateImage(_request("a harbour", fallback_providers=["seedream_4_5"]))
        assert (await finished(stub, second.id)).served_provider == "seedream_4_5"
        await eventually(lambda: app.breakers is not None and app.breakers.is_open("bfl"))
        health = await _health(stub, "flux_2_pro")
        assert health.breaker_state == "open" and health.failure_ratio == 1.0
        assert health.HasField("breaker_probe_time")
        assert _breaker_gauge(app, "bfl") == 2

        # While open, a job with a fallback moves on at once: bfl sees no request of it.
        before = vendor.requests_to("bfl")
        third = await stub.GenerateImage(_request("a pier", fallback_providers=["seedream_4_5"]))
        events = await events_until_end(stub, third.id)
        assert events[-1].job.status == pb.JOB_STATUS_COMPLETED
        assert events[-1].job.served_provider == "seedream_4_5"
        assert any(e.message == "bfl unavailable (breaker open); continuing on seedream_4_5" for e in events)
        assert vendor.requests_to("bfl") == before

        # A job without a fallback waits in PENDING without spending attempts ...
        waiting = await stub.GenerateImage(_request("a buoy"))
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=waiting.id))
        seen: list[pb.JobEvent] = []
        async with asyncio.timeout(10):
            async for event in stream:
                seen.append(event)
                if event.message.startswith("waiting: bfl unavailable (breaker open)"):
                    break
        assert seen[-1].job.status == pb.JOB_STATUS_PENDING
        assert seen[-1].job.error.code == "BREAKER_OPEN"
        stream.cancel()

        # ... and completes on bfl once it is back: the probe succeeds and the breaker closes.
        vendor.set_down("bfl", down=False)
        recovered = await finished(stub, waiting.id, timeout=20)
        assert recovered.status == pb.JOB_STATUS_COMPLETED, recovered.error
        assert recovered.served_provider == "flux_2_pro" and recovered.served_model == "flux-2-pro"
        await eventually(lambda: not app.breakers.is_open("bfl"))  # type: ignore[union-attr]
        assert (await _health(stub, "flux_2_pro")).breaker_state == "closed"
        assert _breaker_gauge(app, "bfl") == 0
        fallbacks = app.registry.get_sample_value(
            "imagegen_fallbacks_total",
            {"provider": "flux_2_pro", "fallback": "seedream_4_5", "reason": "breaker_open"},
        )
        assert fallbacks is not None and fallbacks >= 1


async def test_three_replicas_send_the_dead_vendor_only_the_probes(
    tmp_path: Path, database_url: str, vendor: Sandbox
) -> None:
    probes = 2
    overrides = {
        "max_attempts": 50,
        "breaker_min_requests": 2,
        # long enough that the test sees the breaker open again before another round of probes
        "breaker_cooldown_s": 3.0,
        "breaker_probes": probes,
    }
    async with contextlib.AsyncExitStack() as stack:
        apps = [
            await stack.enter_async_context(
                running_app(_settings(tmp_path / f"replica{n}", database_url, vendor, **overrides))
            )
            for n in range(3)
        ]
        stubs = [await stack.enter_async_context(_client(app)) for app in apps]
        vendor.set_down("bfl")
        jobs = [
            await stubs[n % 3].GenerateImage(_request(f"job {n} of an outage", request_id=f"outage-{n}"))
            for n in range(12)
        ]
        book = SqlBreakers(apps[0].store.engine, BreakerPolicy())  # type: ignore[attr-defined]

        async def quiet_and_open() -> bool:
            # every replica has seen the breaker open, and no job is calling the vendor
            if not all(app.breakers is not None and app.breakers.is_open("bfl") for app in apps):
                return False
            state = (await book.states())["bfl"]
            stats = await apps[0].store.queue_stats()
            return state.state == "open" and stats.processing == 0

        await eventually(quiet_and_open, timeout=20, interval=0.01)
        opened = (await book.states())["bfl"]
        baseline = vendor.requests_to("bfl")
        # nothing half-opened between the read of the row and of the counter
        assert (await book.states())["bfl"] == opened

        async def reopened() -> bool:
            state = (await book.states())["bfl"]
            return state.state == "open" and state.opened_at != opened.opened_at

        await eventually(reopened, timeout=20, interval=0.01)
        # one round of probes across all three replicas, not one per replica
        assert vendor.requests_to("bfl") - baseline == probes

        vendor.set_down("bfl", down=False)
        for n, job in enumerate(jobs):
            done = await finished(stubs[n % 3], job.id, timeout=30)
            assert done.status == pb.JOB_STATUS_COMPLETED, done.error
        await eventually(lambda: all(not app.breakers.is_open("bfl") for app in apps))  # type: ignore[union-attr]


async def test_a_fallback_that_cannot_take_the_request_is_refused_by_name(
    tmp_path: Path, database_url: str, vendor: Sandbox
) -> None:
    async with running_app(_settings(tmp_path, database_url, vendor)) as app, _client(app) as stub:
        # seed: Seedream takes none
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(_request("seeded", seed=7, fallback_providers=["seedream_4_5"]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        problem = bad_fields(caught.value)["fallback_providers[0]"]
        assert problem.startswith("seedream_4_5 cannot take this request's seed")

        # references: FLUX.2 takes 8, GPT Image 16
        references = [f"https://example.com/{n}.png" for n in range(10)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(
                _request(
                    "collage",
                    provider="gpt_image_2_6",
                    reference_image_urls=references,
                    fallback_providers=["seedream_4_5", "flux_2_pro"],
                )
            )
        fields = bad_fields(caught.value)
        assert list(fields) == ["fallback_providers[1]"]
        assert "flux_2_pro takes at most 8 reference images, got 10" in fields["fallback_providers[1]"]

        # size: GPT Image draws 3072 wide, FLUX.2 at most 4 MP
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(
                pb.GenerateImageRequest(
                    prompt="banner",
                    provider="gpt_image_2_6",
                    width=3072,
                    height=1536,
                    fallback_providers=["flux_2_pro"],
                )
            )
        assert "flux_2_pro cannot take this request's" in bad_fields(caught.value)["fallback_providers[0]"]

        # options meant for the primary are not dropped on the way: the fallback needs its own
        options = struct_pb2.Struct()
        options.update({"quality": "low"})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(
                _request(
                    "poster",
                    provider="gpt_image_2_6",
                    provider_options=options,
                    fallback_providers=["seedream_4_5"],
                )
            )
        problem = bad_fields(caught.value)["fallback_providers[0]"]
        assert "provider_options.quality" in problem and "provider_options.seedream_4_5" in problem

        # unknown, repeated and retired fallbacks
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(_request("x", fallback_providers=["nope", "flux_2_pro"]))
        fields = bad_fields(caught.value)
        assert "unknown provider 'nope'" in fields["fallback_providers[0]"]
        assert "already in the chain" in fields["fallback_providers[1]"]

        # with its own options the same request is accepted, and the job shows them
        options.update({"seedream_4_5": {"watermark": False}})
        job = await stub.GenerateImage(
            _request(
                "poster",
                provider="gpt_image_2_6",
                provider_options=options,
                fallback_providers=["seedream_4_5"],
                validate_only=True,
            )
        )
        assert dict(job.provider_options) == {"quality": "low"}
        assert dict(job.fallback_provider_options["seedream_4_5"]) == {"watermark": False}
        assert list(job.fallback_providers) == ["seedream_4_5"]


@pytest.mark.parametrize("opted_in", [False, True])
async def test_moderation_falls_back_only_when_asked(
    tmp_path: Path, database_url: str, vendor: Sandbox, opted_in: bool
) -> None:
    async with running_app(_settings(tmp_path, database_url, vendor)) as app, _client(app) as stub:
        job = await stub.GenerateImage(
            _request(
                "a duel [sandbox:moderated@bfl]",
                fallback_providers=["seedream_4_5"],
                fallback_on_moderation=opted_in,
            )
        )
        events = await events_until_end(stub, job.id)
        done = events[-1].job
        if opted_in:
            assert done.status == pb.JOB_STATUS_COMPLETED and done.served_provider == "seedream_4_5"
            assert any("(CONTENT_MODERATED); continuing on seedream_4_5" in e.message for e in events)
        else:
            assert done.status == pb.JOB_STATUS_FAILED and done.error.code == "CONTENT_MODERATED"
            assert done.served_provider == "flux_2_pro"
            assert not any("continuing on" in e.message for e in events)
        assert not (app.breakers and app.breakers.is_open("bfl"))  # moderation says nothing of health


async def test_budget_reserves_the_chains_most_and_settles_on_the_model_that_ran(
    tmp_path: Path, database_url: str, vendor: Sandbox
) -> None:
    settings = test_settings(tmp_path, database_url, secured=True, **_vendor_overrides(vendor))
    async with running_app(settings) as app:
        await app.store.set_budget("acme", 1_000_000)
        async with authed_channel(app.grpc_target, account="acme") as channel:
            stub = pb_grpc.ImageGenerationStub(channel)
            # no credit at BFL (PROVIDER_AUTH): no retry cures it, so on to the fallback at once
            job = await stub.GenerateImage(
                _request(
                    "a kite [sandbox:no-credits@bfl]",
                    provider="flux_2_max",
                    fallback_providers=["seedream_4_5"],
                )
            )
            assert job.estimated_cost_usd_micros == 70_000  # FLUX.2 [max], the dearer of the two
            assert await app.store.budget("acme") == 1_000_000 - 70_000
            events = await events_until_end(stub, job.id)
            done = events[-1].job
            assert done.status == pb.JOB_STATUS_COMPLETED and done.served_provider == "seedream_4_5"
            assert done.attempt == 2  # one on bfl, one on ark
            assert any(
                e.message.startswith("flux_2_max failed")
                and "(PROVIDER_AUTH); continuing on seedream_4_5" in e.message
                for e in events
            )
            assert done.cost_usd_micros == 40_000
            assert await app.store.budget("acme") == 1_000_000 - 40_000


def _vendor_overrides(vendor: Sandbox) -> dict[str, Any]:
    return {name: VendorSettings(api_key="test-key", base_url=vendor.base_url) for name in VENDORS}


async def test_sandbox_takes_a_vendor_down_and_up_and_counts_its_requests(vendor: Sandbox) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{vendor.base_url}/_sandbox/vendors/bfl/down") as response:
            assert response.status == 200 and (await response.json())["down"] is True
        async with session.post(f"{vendor.base_url}/v1/flux-2-pro", json={"prompt": "x"}) as response:
            assert response.status == 503
        # another vendor is unaffected
        async with session.post(f"{vendor.base_url}/api/v3/images/generations", json={}) as response:
            assert response.status != 503
        async with session.post(f"{vendor.base_url}/_sandbox/vendors/bfl/up") as response:
            assert (await response.json())["down"] is False
        async with session.get(f"{vendor.base_url}/_sandbox/vendors") as response:
            state = await response.json()
        assert state["bfl"] == {"down": False, "requests": 1} and state["ark"]["requests"] == 1
        async with session.post(f"{vendor.base_url}/_sandbox/vendors/acme/down") as response:
            assert response.status == 404

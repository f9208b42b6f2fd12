"""Model lifecycle through the gRPC API: retired vendor models, operator catalogs, the vendor's own dates.

Servers run on the sandbox, which plays each vendor as it is today: a model the vendor no longer serves
is refused the way that vendor refuses it, and OpenAI's GET /v1/models carries `shutdown_date`.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.catalog import SHIPPED_CATALOG_FILE, CatalogError, load_catalog
from server.app import App, running_app
from storage.models import utcnow
from tests.conftest import test_settings
from tests.helpers import events_until_end, eventually

SHIPPED = SHIPPED_CATALOG_FILE.read_text()

#: an operator's catalog that still names models their vendors have shut down (as the seed's did)
STALE_CATALOG = """
version = "stale"
default = "stale_flux"

[sources]
OLD = "https://example.test/an-old-copy"

[[model]]
id = "stale_flux"
display_name = "FLUX.1 [pro]"
vendor = "bfl"
vendor_model = "flux-pro"
size = { rule = "multiple", step = 16, min_side = 64, max_pixels = 4194304 }
price = { rule = "per_megapixel", first_megapixel_usd = 0.05, summary = "$0.05" }
lifecycle = { state = "active", source = "OLD" }

[[model]]
id = "stale_gpt"
display_name = "GPT Image 1.5"
vendor = "openai"
vendor_model = "gpt-image-1.5"
size = { rule = "multiple", step = 16, min_pixels = 655360, max_pixels = 8294400, max_ratio = 3 }
lifecycle = { state = "active", source = "OLD" }
[model.price]
rule = "per_token"
image_output = 32.0
default_key = "high"
output_tokens = { high = 4160 }
summary = "tokens"

[[model]]
id = "stale_gemini"
display_name = "Nano Banana Pro (preview)"
vendor = "gemini"
vendor_model = "gemini-3-pro-image-preview"
size = { rule = "aspect_ratios", tiers = { 1K = 1, 2K = 2 }, ratios = { "1:1" = [1024, 1024] } }
lifecycle = { state = "active", source = "OLD" }
[model.price]
rule = "per_token"
image_output = 120.0
estimate_by = "tier"
default_key = "1K"
output_tokens = { 1K = 1120, 2K = 1120 }
summary = "tokens"

[[model]]
id = "stale_seedream"
display_name = "Seedream 4.0 (Volcengine id)"
vendor = "ark"
vendor_model = "doubao-seedream-4-0-250828"
size = { rule = "multiple", step = 8, min_pixels = 921600, max_pixels = 16777216, max_ratio = 16 }
price = { rule = "per_image", usd = 0.03, summary = "$0.03" }
lifecycle = { state = "active", source = "OLD" }
"""

#: each stale id, the vendor model it names, and the sandbox counter its refusal lands in
STALE = [
    ("stale_flux", "flux-pro", "bfl.submit_refused"),
    ("stale_gpt", "gpt-image-1.5", "openai.refused"),
    ("stale_gemini", "gemini-3-pro-image-preview", "gemini.generate_refused"),
    ("stale_seedream", "doubao-seedream-4-0-250828", "ark.generate_refused"),
]


async def _first_message(app: App, job_id: str) -> str:
    """The message of the job's first event (version 1, its creation), as stored and replayed to watchers."""
    events = await app.store.events(uuid.UUID(job_id), after_version=0)
    assert events[0].version == 1
    return events[0].message


def _write(directory: Path, text: str) -> Path:
    path = directory / "catalog.toml"
    path.write_text(text)
    return path


def _entry(text: str, product_id: str) -> tuple[int, int]:
    """Where the [[model]] table of `product_id` starts and ends in a catalog's text."""
    start = text.index(f'[[model]]\nid = "{product_id}"')
    end = text.find("\n[[model]]", start + 1)
    return start, len(text) if end < 0 else end + 1


def _replace_entry(text: str, product_id: str, new: str) -> str:
    start, end = _entry(text, product_id)
    return text[:start] + new.strip() + "\n\n" + text[end:]


@pytest.mark.parametrize(("provider", "vendor_model", "refused"), STALE)
async def test_a_model_its_vendor_retired_fails_at_once_free_and_counted(
    tmp_path: Path, database_url: str, provider: str, vendor_model: str, refused: str
) -> None:
    settings = test_settings(tmp_path, database_url, catalog_file=_write(tmp_path, STALE_CATALOG))
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a lighthouse", provider=provider))
        assert job.served_model == vendor_model
        done = (await events_until_end(stub, job.id))[-1].job
        assert done.status == pb.JOB_STATUS_FAILED
        assert done.error.code == "MODEL_UNAVAILABLE" and not done.error.retryable
        assert vendor_model in done.error.message
        assert done.attempt == 1  # not retried: another attempt gets the same answer
        assert done.cost_usd_micros == 0 and done.cost_cents == 0
        assert app.sandbox is not None and app.sandbox.counters[refused] == 1
        # counted by the worker once its write committed, which watchers may see first
        labels = {"provider": provider, "served_model": vendor_model}
        await eventually(
            lambda: app.registry.get_sample_value("imagegen_model_unavailable_total", labels) == 1
        )
        finished = {"provider": provider, "status": "failed", "code": "MODEL_UNAVAILABLE"}
        assert app.registry.get_sample_value("imagegen_jobs_finished_total", finished) == 1


async def test_an_operator_catalog_retires_one_id_and_aliases_another(
    tmp_path: Path, database_url: str
) -> None:
    # No code change: seedream_4 is marked retired; nano_banana_pro is served by nano_banana_2.
    text = SHIPPED.replace(
        'lifecycle = { state = "active", source = "ARK" }',
        'lifecycle = { state = "retired", shutdown_date = 2026-11-24, replacement = "seedream_5", '
        'source = "ARK" }',
        1,
    )
    text = _replace_entry(
        text,
        "nano_banana_pro",
        """
[[model]]
id = "nano_banana_pro"
alias_of = "nano_banana_2"
display_name = "Nano Banana Pro (served by Nano Banana 2)"
[model.lifecycle]
state = "retired"
vendor_model = "gemini-3-pro-image"
shutdown_date = 2026-12-01
replacement = "nano_banana_2"
source = "GEMINI_DEPRECATIONS"
""",
    )
    settings = test_settings(tmp_path, database_url, catalog_file=_write(tmp_path, text))
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="a kite", provider="seedream_4"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "seedream_4 is retired" in (caught.value.details() or "")
        assert "use seedream_5 instead" in (caught.value.details() or "")
        assert await app.store.list("default", page_size=10) == ([], None)  # nothing half-written

        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a kite", provider="nano_banana_pro"))
        assert (job.provider, job.served_model) == ("nano_banana_pro", "gemini-3.1-flash-image")
        last = (await events_until_end(stub, job.id, after_version=1))[-1].job
        first = await _first_message(app, job.id)
        assert first.startswith(
            "accepted; nano_banana_pro is served by nano_banana_2 (gemini-3.1-flash-image)"
        )
        assert last.status == pb.JOB_STATUS_COMPLETED and last.served_model == "gemini-3.1-flash-image"
        assert app.sandbox is not None
        assert [call.model for call in app.sandbox.gemini.calls] == ["gemini-3.1-flash-image"]

        listed = {p.id: p for p in (await stub.ListProviders(pb.ListProvidersRequest())).providers}
        assert (listed["seedream_4"].lifecycle_state, listed["seedream_4"].shutdown_date) == (
            "retired",
            "2026-11-24",
        )
        assert listed["nano_banana_pro"].alias_of == "nano_banana_2"
        assert listed["nano_banana_pro"].served_model == "gemini-3.1-flash-image"


async def test_the_shipped_aliases_are_served_with_a_notice(app, stub) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="SALE 50%", provider="gpt_image_1_5"))
    assert job.served_model == "gpt-image-2.6-sunburst"
    events = await events_until_end(stub, job.id, after_version=1)
    assert "OpenAI retired gpt-image-1.5 on 2026-12-01" in await _first_message(app, job.id)
    assert events[-1].job.status == pb.JOB_STATUS_COMPLETED
    # the fast tier is an option of the same id
    fast = await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="SALE",
            provider="gpt_image_2_6",
            provider_options={"tier": "flare"},  # type: ignore[arg-type]  # protobuf makes the Struct
        )
    )
    assert fast.served_model == "gpt-image-2.6-flare"
    plain = await stub.GenerateImage(pb.GenerateImageRequest(prompt="SALE", provider="gpt_image_2_6"))
    assert await _first_message(app, plain.id) == "accepted"


async def test_a_deprecated_model_is_served_with_a_notice_and_its_date_exported(
    tmp_path: Path, database_url: str
) -> None:
    text = SHIPPED.replace(
        'lifecycle = { state = "active", source = "BFL_SDK" }',
        'lifecycle = { state = "deprecated", shutdown_date = 2099-01-01, replacement = "flux_2_max", '
        'source = "BFL_SDK" }',
        1,
    )
    settings = test_settings(tmp_path, database_url, catalog_file=_write(tmp_path, text))
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a pier", provider="flux_2_pro"))
        events = await events_until_end(stub, job.id, after_version=1)
        notice = "flux_2_pro is deprecated: BFL shuts down flux-2-pro on 2099-01-01; move to flux_2_max"
        assert notice in await _first_message(app, job.id)
        assert events[-1].job.status == pb.JOB_STATUS_COMPLETED
        shutdown = datetime(2099, 1, 1, tzinfo=UTC).timestamp()
        gauge = "imagegen_model_shutdown_timestamp_seconds"
        assert app.registry.get_sample_value(gauge, {"provider": "flux_2_pro"}) == shutdown
        assert app.registry.get_sample_value(gauge, {"provider": "flux_2_max"}) is None


async def test_openais_shutdown_dates_win_over_the_catalogs(
    app, stub, caplog: pytest.LogCaptureFixture
) -> None:
    assert app.sandbox is not None and app.lifecycle is not None
    assert app.sandbox.counters["openai.models"] == 1  # read at start
    gauge = "imagegen_model_shutdown_timestamp_seconds"
    assert app.registry.get_sample_value(gauge, {"provider": "gpt_image_2_6"}) is None

    # OpenAI announces a date: the id is served with a notice, and the alert's gauge appears
    soon = utcnow().date() + timedelta(days=20)
    app.sandbox.openai.shutdown_dates["gpt-image-2.6-sunburst"] = soon.isoformat()
    with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
        assert await app.lifecycle.refresh() == ["gpt_image_2_6"]
    assert "the vendor's date is used for gpt_image_2_6" in caplog.text
    moment = datetime(soon.year, soon.month, soon.day, tzinfo=UTC).timestamp()
    for provider in ("gpt_image_2_6", "gpt_image_1_5"):  # the alias follows the model serving it
        assert app.registry.get_sample_value(gauge, {"provider": provider}) == moment
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="SALE", provider="gpt_image_2_6"))
    assert f"shuts down gpt-image-2.6-sunburst on {soon.isoformat()}" in await _first_message(app, job.id)
    listed = {p.id: p for p in (await stub.ListProviders(pb.ListProvidersRequest())).providers}
    assert (listed["gpt_image_2_6"].lifecycle_state, listed["gpt_image_2_6"].shutdown_date) == (
        "deprecated",
        soon.isoformat(),
    )

    # The date passes: the id, and the alias it serves, are refused before anything is paid for
    app.sandbox.openai.shutdown_dates["gpt-image-2.6-sunburst"] = date(2026, 1, 1).isoformat()
    assert await app.lifecycle.refresh() == ["gpt_image_2_6"]
    listed = {p.id: p for p in (await stub.ListProviders(pb.ListProvidersRequest())).providers}
    assert listed["gpt_image_2_6"].lifecycle_state == "retired"
    for provider in ("gpt_image_2_6", "gpt_image_1_5"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="SALE", provider=provider))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "shut down gpt-image-2.6-sunburst on 2026-01-01" in (caught.value.details() or "")

    # OpenAI withdraws the date: the vendor's word still wins
    app.sandbox.openai.shutdown_dates["gpt-image-2.6-sunburst"] = None
    assert await app.lifecycle.refresh() == ["gpt_image_2_6"]
    assert app.registry.get_sample_value(gauge, {"provider": "gpt_image_2_6"}) is None
    assert (await stub.GenerateImage(pb.GenerateImageRequest(prompt="SALE", provider="gpt_image_2_6"))).id


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("step = 16, min_side = 64", 'step = "16", min_side = 64', ["entry 'flux_2_pro'", "'step'"]),
        ('vendor = "openai"', 'vendor = "acme"', ["entry 'gpt_image_2_6'", "'vendor'"]),
        ('alias_of = "nano_banana_2"', 'alias_of = "nano_banana_9"', ["entry 'nano_banana'", "'alias_of'"]),
        ('replacement = "gpt_image_2_6"', 'replacement = "nope"', ["entry 'gpt_image_1_5'", "replacement"]),
        (
            'strengths = "Photoreal to stylised looks."',
            'strenghts = "typo"',
            ["entry 'seedream_4'", "'strenghts'"],
        ),
    ],
)
async def test_a_bad_catalog_entry_stops_the_server_naming_entry_and_field(
    tmp_path: Path, database_url: str, old: str, new: str, named: list[str]
) -> None:
    assert old in SHIPPED
    path = _write(tmp_path, SHIPPED.replace(old, new, 1))
    with pytest.raises(CatalogError) as caught:
        async with running_app(test_settings(tmp_path, database_url, catalog_file=path)):
            pytest.fail("the server started with a bad catalog")
    for words in named:
        assert words in str(caught.value)
    assert str(path) in str(caught.value)


def test_the_shipped_catalog_serves_every_seed_id_with_a_live_model() -> None:
    catalog = load_catalog()
    retired = {
        "gpt-image-1.5",
        "gpt-image-1-mini",
        "chatgpt-image-latest",
        "gemini-3-pro-image-preview",
        "gemini-2.5-flash-image",
    }
    today = date(2026, 12, 6)
    for product_id in (
        "flux_2_pro",
        "gpt_image_1_5",
        "seedream_4",
        "seedream_4_5",
        "nano_banana",
        "nano_banana_pro",
    ):
        resolution = catalog.resolve(product_id, today)
        assert resolution.refusal is None
        assert resolution.model.vendor_model not in retired
    for new in ("gpt_image_2_6", "nano_banana_2", "flux_2_max", "seedream_5"):
        assert catalog.resolve(new, today).notice == ""
    assert catalog.serving("gpt_image_1_5").vendor_model == "gpt-image-2.6-sunburst"
    assert catalog.serving("nano_banana").vendor_model == "gemini-3.1-flash-image"
    assert catalog.serving("nano_banana_pro").vendor_model == "gemini-3-pro-image"

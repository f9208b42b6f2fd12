"""The real ModelArk (Seedream) adapter against the real ModelArk sandbox, on ephemeral loopback ports."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from PIL import ImageChops, ImageStat
from yarl import URL

from providers.ark import MAX_PIXELS, MIN_PIXELS, SIDE_STEP, ArkProvider, native_size
from providers.base import (
    ContentModerated,
    GenerationRequest,
    GenerationResult,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.catalog import CATALOG
from sandbox import Sandbox
from sandbox.ark import render_image
from tests import vendor_fixtures
from tests.vendor_fixtures import RecordingCheckpoint, decode, request_maker

API_KEY = "test-key"
GENERATIONS = "/api/v3/images/generations"
SEEDREAM_4 = "seedream-4-0-250828"
SEEDREAM_4_5 = "seedream-4-5-251128"
INVALID = "InvalidParameter"


class SentRequests:
    """Every request the client session sends: (method, URL, headers)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, URL, Mapping[str, str]]] = []

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_request_start(
            session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
        ) -> None:
            self.sent.append((params.method, params.url, dict(params.headers)))

        config.on_request_start.append(on_request_start)
        return config


@pytest.fixture
def sent() -> SentRequests:
    return SentRequests()


@pytest.fixture
async def session(sent: SentRequests) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trace_configs=[sent.trace_config()]) as session:
        yield session


@pytest.fixture
def provider(sandbox: Sandbox, session: aiohttp.ClientSession) -> ArkProvider:
    return ArkProvider(session, base_url=sandbox.base_url, api_key=API_KEY)


make_request = request_maker(model="seedream_4", prompt="a red fox in the snow")


async def generate(
    provider: ArkProvider, request: GenerationRequest, checkpoint: RecordingCheckpoint
) -> GenerationResult:
    result = await vendor_fixtures.generate(provider, request, checkpoint)
    assert checkpoint.saves == []
    return result


async def generate_error(
    provider: ArkProvider, request: GenerationRequest, checkpoint: RecordingCheckpoint
) -> ProviderError:
    error = await vendor_fixtures.generate_error(provider, request, checkpoint)
    assert checkpoint.saves == []
    return error


# --- the native size policy ------------------------------------------------------------------------

NATIVE_SIZES = [
    ("seedream_4", (1024, 1024), (1024, 1024)),
    ("seedream_4", (1080, 1920), (1080, 1920)),
    ("seedream_4", (1920, 1080), (1920, 1080)),
    ("seedream_4", (256, 256), (960, 960)),
    ("seedream_4", (2048, 2048), (2048, 2048)),
    ("seedream_4", (1600, 900), (1600, 904)),  # 900 is not a multiple of 8
    ("seedream_4", (720, 1280), (720, 1280)),
    ("seedream_4_5", (1024, 1024), (1920, 1920)),
    ("seedream_4_5", (1080, 1920), (1440, 2560)),
    ("seedream_4_5", (1920, 1080), (2560, 1440)),
    ("seedream_4_5", (256, 256), (1920, 1920)),
    ("seedream_4_5", (2048, 2048), (2048, 2048)),
    ("seedream_4_5", (1600, 900), (2560, 1440)),
    ("seedream_4_5", (720, 1280), (1440, 2560)),
]


@pytest.mark.parametrize(("model", "requested", "expected"), NATIVE_SIZES)
def test_native_size_table(model: str, requested: tuple[int, int], expected: tuple[int, int]) -> None:
    assert native_size(model, *requested) == expected


@pytest.mark.parametrize("model", sorted(MIN_PIXELS))
def test_native_size_is_the_smallest_accepted_scale_of_the_request(model: str) -> None:
    minimum = MIN_PIXELS[model]
    sides = range(256, 2049, 37)
    for width in sides:
        for height in sides:
            native_width, native_height = native_size(model, width, height)
            assert native_width % SIDE_STEP == 0 and native_height % SIDE_STEP == 0
            assert native_width >= width and native_height >= height
            assert minimum <= native_width * native_height <= MAX_PIXELS
            scale = max(1.0, math.sqrt(minimum / (width * height)))
            # Just enough: each side is its exact scaled length plus at most the rounding step.
            assert native_width < width * scale + SIDE_STEP + 1
            assert native_height < height * scale + SIDE_STEP + 1
            assert native_width / native_height == pytest.approx(width / height, rel=0.02)


def test_native_size_refuses_what_seedream_cannot_make() -> None:
    with pytest.raises(ValueError, match="not a Seedream model"):
        native_size("flux_2_pro", 1024, 1024)
    with pytest.raises(ValueError, match="aspect ratio"):
        native_size("seedream_4", 4000, 200)


# --- success ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_variants", [1, 4])
@pytest.mark.parametrize("size", [(1024, 1024), (1080, 1920), (1920, 1080)])
@pytest.mark.parametrize("model", ["seedream_4", "seedream_4_5"])
async def test_variants_at_the_native_size(
    provider: ArkProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    model: str,
    size: tuple[int, int],
    num_variants: int,
) -> None:
    request = make_request(model=model, width=size[0], height=size[1], num_variants=num_variants)

    result = await generate(provider, request, checkpoint)

    native = native_size(model, *size)
    assert len(result.images) == num_variants
    for image in result.images:
        decoded = decode(image.data)
        assert decoded.size == native
        assert decoded.format == "JPEG"
        assert image.content_type == "image/jpeg"
        assert image.seed is None
    assert len({image.data for image in result.images}) == num_variants
    assert [body["size"] for body in sandbox.ark.requests] == [f"{native[0]}x{native[1]}"] * num_variants
    assert result.vendor_refs["ark_sizes"] == [f"{native[0]}x{native[1]}"] * num_variants
    assert len(set(result.vendor_refs["ark_request_ids"])) == num_variants
    # usage.generated_images (1 per call) x the catalog's price: $0.03 (4.0) or $0.04 (4.5) per image
    assert result.cost_usd_micros == num_variants * CATALOG[model].price_per_image_usd_micros
    assert sandbox.counters["ark.generate"] == num_variants
    assert sandbox.counters["ark.download"] == num_variants


async def test_request_body_is_what_ark_expects(
    provider: ArkProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    await generate(provider, make_request(model="seedream_4_5", width=1080, height=1920), checkpoint)

    assert list(sandbox.ark.requests) == [
        {
            "model": "seedream-4-5-251128",
            "prompt": "a red fox in the snow",
            "size": "1440x2560",
            "response_format": "url",
            "watermark": False,
            "sequential_image_generation": "disabled",
        }
    ]


async def test_key_goes_to_ark_and_not_to_the_image_host(
    provider: ArkProvider, sandbox: Sandbox, sent: SentRequests, checkpoint: RecordingCheckpoint
) -> None:
    await generate(provider, make_request(), checkpoint)

    (post, download) = sent.sent
    assert (post[0], post[1].path) == ("POST", GENERATIONS)
    assert post[2]["Authorization"] == f"Bearer {API_KEY}"
    assert download[0] == "GET"
    assert str(download[1]).startswith(f"{sandbox.cluster_url}/delivery/ark/")
    assert "Authorization" not in download[2]


async def test_link_is_valid_for_24_hours(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, _ = await call(session, sandbox, {"model": SEEDREAM_4, "prompt": "x", "size": "1K"})

    assert status == 200
    expiry = int(URL(answer["data"][0]["url"]).query["se"])
    assert expiry - time.time() == pytest.approx(24 * 3600, abs=5)


@pytest.mark.parametrize(
    ("references", "sent_image"),
    [
        (("https://example.com/a.png",), "https://example.com/a.png"),
        (
            ("https://example.com/a.png", "https://example.com/b.png", "https://example.com/c.png"),
            ["https://example.com/a.png", "https://example.com/b.png", "https://example.com/c.png"],
        ),
    ],
)
async def test_references_are_sent_as_urls(
    provider: ArkProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    references: tuple[str, ...],
    sent_image: object,
) -> None:
    result = await generate(provider, make_request(reference_image_urls=references), checkpoint)

    assert len(result.images) == 1
    (body,) = sandbox.ark.requests
    assert body["image"] == sent_image


async def test_options_watermark_and_prompt_optimisation(
    provider: ArkProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    options = {"watermark": True, "optimize_prompt": "fast"}

    await generate(provider, make_request(options=options), checkpoint)

    (body,) = sandbox.ark.requests
    assert body["watermark"] is True
    assert body["optimize_prompt_options"] == {"mode": "fast"}
    (image,) = sandbox.ark.images.values()
    assert image.watermark


async def test_seedream_4_5_refuses_fast_prompt_optimisation(
    provider: ArkProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request(model="seedream_4_5", options={"optimize_prompt": "fast"})

    error = await generate_error(provider, request, checkpoint)

    assert type(error) is ProviderRejected
    assert "HTTP 400 (bad request, InvalidParameter)" in error.message
    assert "optimize_prompt_options.mode" in error.message
    standard = make_request(model="seedream_4_5", options={"optimize_prompt": "standard"})
    result = await generate(provider, standard, checkpoint)
    assert len(result.images) == 1


async def test_variants_run_concurrently(
    provider: ArkProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request("a slow fox [sandbox:slow=0.3]", num_variants=4)

    result = await generate(provider, request, checkpoint)

    assert len(result.images) == 4
    assert sandbox.ark.peak_in_flight == 4


async def test_model_of_another_vendor_is_rejected(
    provider: ArkProvider, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request(model="flux_2_pro"), checkpoint)

    assert type(error) is ProviderRejected


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "error_class", "fragment"),
    [
        ("moderated", ContentModerated, "the prompt (input moderation) (InputTextSensitiveContentDetected)"),
        ("moderated-output", ContentModerated, "output moderation) (OutputImageSensitiveContentDetected)"),
        ("rate-limited", ProviderUnavailable, "HTTP 429 (rate limited, RateLimitExceeded.EndpointIPM"),
        ("server-error", ProviderUnavailable, "HTTP 500 (server error, InternalServiceError)"),
        ("down", ProviderUnavailable, "HTTP 503 (service unavailable, ServiceUnavailable)"),
        ("malformed", ProviderUnavailable, "not valid JSON"),
        ("no-image", InvalidProviderResponse, "returned no image"),
        ("disconnect", ProviderUnavailable, "dropped mid-response"),
        ("expired-url", ProviderUnavailable, "expired or is invalid (HTTP 403 on download)"),
        ("error", ProviderUnavailable, "failed to generate the image (InternalServiceError)"),
        ("no-credits", ProviderAuthError, "HTTP 403 (forbidden, AccountOverdueError)"),
    ],
)
async def test_fault_maps_to_error(
    provider: ArkProvider,
    checkpoint: RecordingCheckpoint,
    tag: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    error = await generate_error(provider, make_request(f"a fox [sandbox:{tag}]"), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert error.retryable is error_class.retryable
    assert error.retry_after_s is None


@pytest.mark.parametrize("tag", ["rate-limited", "server-error", "disconnect"])
async def test_first_call_fails_and_the_retry_succeeds(
    provider: ArkProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, tag: str
) -> None:
    request = make_request(f"a fox [sandbox:{tag}]", num_variants=4)

    error = await generate_error(provider, request, checkpoint)
    assert type(error) is ProviderUnavailable

    result = await generate(provider, request, checkpoint)
    assert len(result.images) == 4
    assert result.cost_usd_micros == 4 * 30_000


async def test_rate_limit_with_retry_after(provider: ArkProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited=7]"), checkpoint)

    assert type(error) is ProviderUnavailable
    assert error.retry_after_s == 7.0


async def test_moderation_beats_a_transient_failure(
    provider: ArkProvider, checkpoint: RecordingCheckpoint
) -> None:
    # The first call is throttled, the second is moderated: the job must fail for good, not be retried.
    request = make_request("a fox [sandbox:rate-limited=5] [sandbox:moderated-output]", num_variants=2)

    error = await generate_error(provider, request, checkpoint)

    assert type(error) is ContentModerated
    assert not error.retryable


async def test_missing_key_is_an_auth_error(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    provider = ArkProvider(session, base_url=sandbox.base_url, api_key="")

    error = await generate_error(provider, make_request(), RecordingCheckpoint())

    assert type(error) is ProviderAuthError
    assert not error.retryable
    assert "HTTP 401 (unauthorised, AuthenticationError)" in error.message
    assert sandbox.counters["ark.generate_refused"] == 1


async def test_wrong_key_is_an_auth_error(session: aiohttp.ClientSession) -> None:
    async with Sandbox.running(port=0, api_key="the-right-key") as sandbox:
        wrong = ArkProvider(session, base_url=sandbox.base_url, api_key="a-wrong-key")
        error = await generate_error(wrong, make_request(), RecordingCheckpoint())

        assert type(error) is ProviderAuthError
        assert "HTTP 401" in error.message
        assert sandbox.counters["ark.generate"] == 0

        right = ArkProvider(session, base_url=sandbox.base_url, api_key="the-right-key")
        result = await generate(right, make_request(), RecordingCheckpoint())
        assert len(result.images) == 1


# --- the sandbox's wire protocol, spoken directly -------------------------------------------------


async def call(
    session: aiohttp.ClientSession, sandbox: Sandbox, body: object, headers: Mapping[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    sent_headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    async with session.post(f"{sandbox.base_url}{GENERATIONS}", json=body, headers=sent_headers) as response:
        return response.status, await response.json(), response.headers


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": SEEDREAM_4_5, "prompt": "x", "size": "1024x1024"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4_5, "prompt": "x", "size": "1K"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4, "prompt": "x", "size": "800x800"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4, "prompt": "x", "size": "8000x400"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4, "prompt": "x", "size": "4097x4096"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4, "prompt": "x", "size": "2048X2048"}, 400, INVALID, "size"),
        ({"model": SEEDREAM_4}, 400, "MissingParameter", "prompt"),
        ({"prompt": "x"}, 400, "MissingParameter", "model"),
        ({"model": "seedream-9", "prompt": "x"}, 404, "InvalidEndpointOrModel.NotFound", ""),
        (
            {"model": SEEDREAM_4_5, "prompt": "x", "optimize_prompt_options": {"mode": "fast"}},
            400,
            "InvalidParameter",
            "optimize_prompt_options.mode",
        ),
        ({"model": SEEDREAM_4, "prompt": "x", "image": "data:image/PNG;base64,AA"}, 400, INVALID, "image"),
        ({"model": SEEDREAM_4, "prompt": "x", "image": ["https://e.com/a.png"] * 15}, 400, INVALID, "image"),
        ({"model": SEEDREAM_4, "prompt": "x", "response_format": "png"}, 400, INVALID, "response_format"),
        ({"model": SEEDREAM_4, "prompt": "x", "watermark": "no"}, 400, "InvalidParameter", "watermark"),
    ],
)
async def test_invalid_body_gets_arks_error_envelope(
    session: aiohttp.ClientSession, sandbox: Sandbox, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    answer_status, answer, headers = await call(session, sandbox, body)

    assert answer_status == status
    assert set(answer) == {"error"}
    error = answer["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == ("NotFound" if status == 404 else "BadRequest")
    assert error["message"].endswith(f"Request id: {headers['X-Request-Id']}")
    assert sandbox.counters["ark.generate"] == 0


@pytest.mark.parametrize(
    ("model", "size", "produced"),
    [
        (SEEDREAM_4, "1K", "1024x1024"),
        (SEEDREAM_4, "1280x720", "1280x720"),
        (SEEDREAM_4, "4096x256", "4096x256"),
        (SEEDREAM_4_5, "2560x1440", "2560x1440"),
        (SEEDREAM_4_5, None, "2048x2048"),
    ],
)
async def test_accepted_sizes_and_response_shape(
    session: aiohttp.ClientSession, sandbox: Sandbox, model: str, size: str | None, produced: str
) -> None:
    body: dict[str, Any] = {"model": model, "prompt": "x"}
    if size is not None:
        body["size"] = size

    status, answer, _ = await call(session, sandbox, body)

    assert status == 200
    assert set(answer) == {"model", "created", "data", "usage"}
    assert answer["model"] == model
    (item,) = answer["data"]
    assert set(item) == {"url", "size"}
    assert item["size"] == produced
    width, height = map(int, produced.split("x"))
    tokens = round(width * height / 256)
    assert answer["usage"] == {"generated_images": 1, "output_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {API_KEY}"}],
    ids=["none", "empty", "basic"],
)
async def test_missing_key_is_401(
    session: aiohttp.ClientSession, sandbox: Sandbox, headers: dict[str, str]
) -> None:
    status, answer, _ = await call(session, sandbox, {"model": SEEDREAM_4, "prompt": "x"}, headers=headers)

    assert status == 401
    assert answer["error"]["code"] == "AuthenticationError"
    assert answer["error"]["type"] == "Unauthorized"
    assert list(sandbox.ark.requests) == []


async def test_body_that_is_not_json_is_400(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    async with session.post(
        f"{sandbox.base_url}{GENERATIONS}", data=b"{not json", headers={"Authorization": f"Bearer {API_KEY}"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "InvalidParameter"


async def test_watermark_is_on_unless_turned_off(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    body = {"model": SEEDREAM_4, "prompt": "x", "size": "1280x720", "response_format": "b64_json"}

    status, answer, _ = await call(session, sandbox, body)

    assert status == 200
    (item,) = answer["data"]
    marked = decode(base64.b64decode(item["b64_json"])).convert("RGB")
    (image,) = sandbox.ark.images.values()
    assert image.watermark
    plain = decode(render_image(dataclasses.replace(image, watermark=False))).convert("RGB")
    difference = ImageChops.difference(marked, plain)
    corner = ImageStat.Stat(difference.crop((1280 - 400, 720 - 60, 1280, 720))).mean
    elsewhere = ImageStat.Stat(difference.crop((400, 200, 800, 500))).mean
    assert max(corner) > 5 * max(max(elsewhere), 1.0)


async def test_sequential_generation_makes_a_batch(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    body = {
        "model": SEEDREAM_4,
        "prompt": "three foxes",
        "size": "1K",
        "image": ["https://example.com/a.png"],
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 3},
    }
    status, answer, _ = await call(session, sandbox, body)
    assert status == 200
    assert len(answer["data"]) == 3
    assert answer["usage"]["generated_images"] == 3

    # References plus outputs are at most 15.
    body["image"] = [f"https://example.com/{n}.png" for n in range(14)]
    body["sequential_image_generation_options"] = {"max_images": 15}
    status, answer, _ = await call(session, sandbox, body)
    assert (status, len(answer["data"])) == (200, 1)


async def test_output_moderation_is_a_per_image_error_inside_a_200(
    session: aiohttp.ClientSession, sandbox: Sandbox
) -> None:
    status, answer, _ = await call(
        session, sandbox, {"model": SEEDREAM_4, "prompt": "x [sandbox:moderated-output]", "size": "1K"}
    )

    assert status == 200
    (item,) = answer["data"]
    assert item["error"]["code"] == "OutputImageSensitiveContentDetected"
    assert answer["usage"] == {"generated_images": 0, "output_tokens": 0, "total_tokens": 0}


async def test_streaming_sends_one_event_per_image(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    body = {
        "model": SEEDREAM_4,
        "prompt": "two foxes",
        "size": "1K",
        "stream": True,
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 2},
    }
    async with session.post(
        f"{sandbox.base_url}{GENERATIONS}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        text = await response.text()

    events = [block for block in text.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    parsed = [json.loads(block.split("data: ", 1)[1]) for block in events[:-1]]
    assert [event["type"] for event in parsed] == [
        "image_generation.partial_succeeded",
        "image_generation.partial_succeeded",
        "image_generation.completed",
    ]
    assert [event["image_index"] for event in parsed[:2]] == [0, 1]
    assert events[0].startswith("event: image_generation.partial_succeeded\n")
    assert parsed[-1]["usage"]["generated_images"] == 2

"""The real OpenAI adapter against the real OpenAI sandbox, on ephemeral loopback ports."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from providers.base import (
    ContentModerated,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.catalog import CATALOG, CostQuery
from providers.openai import TOKEN_PRICES, OpenAIProvider, TokenPrices, native_size, usage_cost_usd_micros
from sandbox import Sandbox
from sandbox.drawing import draw_placeholder
from sandbox.openai import output_tokens_per_image, placeholder_seed
from tests.vendor_fixtures import (
    RecordingCheckpoint,
    decode,
    generate,
    generate_error,
    request_maker,
    serving,
)

API_KEY = "sk-test-key-0123456789"
OPENAI_MODELS = [spec.id for spec in CATALOG.values() if spec.vendor == "openai"]
PRICES = TOKEN_PRICES["gpt-image-1.5"]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    # Not the shared fixture: this sandbox knows OpenAI's key, so that a wrong one is refused as OpenAI does.
    async with Sandbox.running(port=0, api_key=API_KEY) as sandbox:
        yield sandbox


@pytest.fixture
def provider(sandbox: Sandbox, session: aiohttp.ClientSession) -> OpenAIProvider:
    return OpenAIProvider(session, base_url=sandbox.base_url, api_key=API_KEY)


make_request = request_maker(model="gpt_image_1_5", prompt="a poster that says SALE")


def expected_cost(usage: Mapping[str, Any]) -> int:
    """Cost of a sandbox usage object, by hand: tokens x USD per million tokens = USD micros."""
    details = usage["input_tokens_details"]
    return int(5 * details["text_tokens"] + 8 * details["image_tokens"] + 32 * usage["output_tokens"])


# --- the native size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "native"),
    [
        (1024, 1024, (1024, 1024)),
        (1080, 1920, (1024, 1536)),
        (1920, 1080, (1536, 1024)),
        (256, 256, (1024, 1024)),
        (2048, 2048, (1024, 1024)),  # gpt-image-1.5 draws nothing larger; the worker upscales
        (1600, 900, (1536, 1024)),
        (720, 1280, (1024, 1536)),
        (1224, 1000, (1024, 1024)),  # 1.224 < sqrt(1.5): closer to 1:1 than to 3:2
        (1225, 1000, (1536, 1024)),  # 1.225 > sqrt(1.5)
        (1000, 1225, (1024, 1536)),
        (256, 2048, (1024, 1536)),
    ],
)
def test_native_size_has_the_closest_aspect_ratio(width: int, height: int, native: tuple[int, int]) -> None:
    assert native_size("gpt_image_1_5", width, height) == native


def test_native_size_is_only_for_openai_models() -> None:
    with pytest.raises(ValueError, match="not an OpenAI model"):
        native_size("flux_2_pro", 1024, 1024)
    with pytest.raises(ValueError, match="positive"):
        native_size("gpt_image_1_5", 0, 1024)


# --- success -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", OPENAI_MODELS)
@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1080, 1920), (1920, 1080)])
@pytest.mark.parametrize("num_variants", [1, 4])
async def test_variants_at_the_native_size(
    provider: OpenAIProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    model: str,
    width: int,
    height: int,
    num_variants: int,
) -> None:
    request = make_request(model=model, width=width, height=height, num_variants=num_variants)

    result = await generate(provider, request, checkpoint)

    assert len(result.images) == num_variants
    native = native_size(model, width, height)
    for image in result.images:
        decoded = decode(image.data)
        assert decoded.size == native
        assert decoded.format == "PNG"
        assert image.content_type == "image/png"
        assert image.seed is None
    assert len({image.data for image in result.images}) == num_variants
    (call,) = sandbox.openai.requests
    assert call.endpoint == "generations"
    assert call.fields is not None and call.fields["n"] == num_variants  # one call, variants through n
    assert call.fields["size"] == f"{native[0]}x{native[1]}"
    assert call.usage is not None
    assert result.cost_usd_micros == expected_cost(call.usage)
    assert checkpoint.saves == []


async def test_request_body_is_what_openai_expects(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request(
        width=1600,
        height=900,
        num_variants=2,
        output_format="jpeg",
        options={"quality": "low", "background": "opaque", "moderation": "low"},
    )

    await generate(provider, request, checkpoint)

    (call,) = sandbox.openai.requests
    assert call.authorization == f"Bearer {API_KEY}"
    assert call.content_type == "application/json"
    assert call.fields == {
        "model": "gpt-image-1.5",
        "prompt": "a poster that says SALE",
        "n": 2,
        "size": "1536x1024",
        "output_format": "jpeg",
        "quality": "low",
        "background": "opaque",
        "moderation": "low",
    }


async def test_bytes_are_delivered_as_drawn(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(num_variants=2), checkpoint)

    prompt = "a poster that says SALE"
    for variant, image in enumerate(result.images):
        drawn = draw_placeholder(
            prompt=prompt,
            seed=placeholder_seed(prompt),
            width=1024,
            height=1024,
            variant=variant,
            image_format="png",
        )
        assert image.data == drawn
    assert result.vendor_refs["openai_request_id"].startswith("req_")
    assert result.vendor_refs["openai_usage"] == sandbox.openai.requests[0].usage


@pytest.mark.parametrize(("output_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_output_format_is_asked_for(
    provider: OpenAIProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    output_format: str,
    pillow_format: str,
) -> None:
    result = await generate(provider, make_request(output_format=output_format), checkpoint)

    (image,) = result.images
    assert image.content_type == f"image/{output_format}"
    assert decode(image.data).format == pillow_format


async def test_transparent_jpeg_is_asked_as_png(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request(output_format="jpeg", options={"background": "transparent"})

    result = await generate(provider, request, checkpoint)

    (image,) = result.images
    assert image.content_type == "image/png"
    decoded = decode(image.data)
    assert decoded.mode == "RGBA"
    assert decoded.getchannel("A").getpixel((0, 0)) == 0  # the sandbox leaves a transparent margin
    assert sandbox.openai.requests[0].fields == {
        "model": "gpt-image-1.5",
        "prompt": "a poster that says SALE",
        "n": 1,
        "size": "1024x1024",
        "output_format": "png",
        "background": "transparent",
    }


@pytest.mark.parametrize(
    ("quality", "size", "output_tokens", "image_out_micros"),
    [
        ("low", (1024, 1024), 272, 8_704),
        ("medium", (1024, 1024), 1056, 33_792),
        ("high", (1024, 1024), 4160, 133_120),
        ("auto", (1024, 1024), 4160, 133_120),
        ("low", (1920, 1080), 408, 13_056),
        ("medium", (1080, 1920), 1584, 50_688),
        ("high", (1920, 1080), 6240, 199_680),
    ],
)
def test_token_table_matches_the_catalog_price(
    quality: str, size: tuple[int, int], output_tokens: int, image_out_micros: int
) -> None:
    native = native_size("gpt_image_1_5", *size)
    assert output_tokens_per_image(native, quality) == output_tokens
    assert output_tokens * PRICES.image_output == image_out_micros
    # Within a cent of the catalog's per-image price, the estimate the usage figure replaces.
    query = CostQuery(width=size[0], height=size[1], num_variants=1, options={"quality": quality})
    assert abs(image_out_micros - CATALOG["gpt_image_1_5"].estimate_usd_micros(query)) < 1_000


@pytest.mark.parametrize(
    ("quality", "size", "num_variants", "output_tokens"),
    [("auto", (1024, 1024), 1, 4160), ("medium", (1080, 1920), 2, 2 * 1584)],
)
async def test_cost_comes_from_usage(
    provider: OpenAIProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    quality: str,
    size: tuple[int, int],
    num_variants: int,
    output_tokens: int,
) -> None:
    prompt = "abcd" * 10  # 40 bytes: 10 text tokens in the sandbox's count
    request = make_request(
        prompt, width=size[0], height=size[1], num_variants=num_variants, options={"quality": quality}
    )

    result = await generate(provider, request, checkpoint)

    usage = sandbox.openai.requests[0].usage
    assert usage is not None
    assert usage["output_tokens"] == output_tokens
    assert usage["input_tokens_details"] == {"image_tokens": 0, "text_tokens": 10}
    assert result.cost_usd_micros == output_tokens * 32 + 10 * 5


@pytest.mark.parametrize(
    ("usage", "input_is_images", "cost"),
    [
        ({"input_tokens": 10, "output_tokens": 4160}, False, 50 + 133_120),
        ({"input_tokens": 10, "output_tokens": 4160}, True, 80 + 133_120),
        (
            {
                "input_tokens": 800,
                "input_tokens_details": {"text_tokens": 35, "image_tokens": 765},
                "output_tokens": 1100,
                "output_tokens_details": {"text_tokens": 44, "image_tokens": 1056},
            },
            True,
            35 * 5 + 765 * 8 + 44 * 10 + 1056 * 32,
        ),
        # A breakdown that misses tokens: the rest is priced as the total's usual kind, not dropped.
        ({"input_tokens": 20, "input_tokens_details": {"text_tokens": 5}, "output_tokens": 0}, False, 100),
        ({"input_tokens": 10}, False, None),
        ({"input_tokens": -1, "output_tokens": 5}, False, None),
        (
            {"input_tokens": 1, "output_tokens": 5, "output_tokens_details": {"image_tokens": "5"}},
            False,
            None,
        ),
        (None, False, None),
    ],
)
def test_usage_cost(usage: object, input_is_images: bool, cost: int | None) -> None:
    assert usage_cost_usd_micros(usage, PRICES, input_is_images=input_is_images) == cost


def test_usage_cost_rounds_up_to_a_micro() -> None:
    cheap = TokenPrices(
        text_input=Decimal("1.25"), image_input=Decimal(0), image_output=Decimal(0), text_output=Decimal(0)
    )
    assert usage_cost_usd_micros({"input_tokens": 3, "output_tokens": 0}, cheap) == 4  # 3.75 → 4


async def test_slow_call_waits_for_the_answer(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    started = time.monotonic()
    result = await generate(provider, make_request("a slow poster [sandbox:slow=0.15]"), checkpoint)

    assert time.monotonic() - started >= 0.15
    assert len(result.images) == 1


async def test_the_sessions_timeout_applies(sandbox: Sandbox, checkpoint: RecordingCheckpoint) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.05)) as short:
        provider = OpenAIProvider(short, base_url=sandbox.base_url, api_key=API_KEY)
        error = await generate_error(provider, make_request("[sandbox:slow=0.2]"), checkpoint)

    assert type(error) is ProviderUnavailable
    assert "timed out" in error.message


# --- reference images (edits) ------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    return draw_placeholder(prompt="ref", seed=1, width=width, height=height, image_format="png")


REFERENCE_PNG = png(300, 200)
REFERENCE_JPEG = draw_placeholder(prompt="ref", seed=2, width=200, height=300, image_format="jpeg")
IMAGES: dict[str, tuple[bytes, str]] = {
    "a.png": (REFERENCE_PNG, "image/png"),
    "b.jpg": (REFERENCE_JPEG, "image/jpeg"),
    "big.png": (png(600, 600), "image/png"),
    "page.html": (b"<html></html>", "text/html"),
    "anim.gif": (b"GIF89a" + bytes(32), "image/gif"),
}
SMALL_B64 = base64.b64encode(png(64, 64)).decode()


def canned_answer(case: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of an upstream answer the sandbox never gives."""
    rate_limited = _envelope("slow down", "rate_limit_exceeded")
    in_two_minutes = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    answers: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
        "retry-after": (429, rate_limited, {"retry-after": "3"}),
        "retry-date": (429, rate_limited, {"retry-after": in_two_minutes}),
        "try-again-in": (
            429,
            _envelope("Rate limit reached ... Please try again in 850ms. Visit ...", "rate_limit_exceeded"),
            {},
        ),
        "dalle-moderation": (
            400,
            _envelope(
                "Your request was rejected as a result of our safety system.", "content_policy_violation"
            ),
            {},
        ),
        "forbidden": (403, _envelope("Your organization must be verified to use gpt-image-1.5.", None), {}),
        "no-usage": (200, {"created": 1, "data": [{"b64_json": SMALL_B64}]}, {}),
        "url-only": (200, {"created": 1, "data": [{"url": "https://example.com/x.png"}]}, {}),
        "bad-base64": (200, {"created": 1, "data": [{"b64_json": "not base64!"}]}, {}),
    }
    return answers.get(case, (302, {"created": 1, "data": [{"b64_json": SMALL_B64}]}, {}))


@pytest.fixture
async def elsewhere() -> AsyncIterator[str]:
    """Another host: serves reference images, and canned upstream answers the sandbox never gives."""

    async def image(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "busy.png":
            return web.Response(status=503, text="busy")
        if name not in IMAGES:
            return web.Response(status=404, text="Not Found")
        body, content_type = IMAGES[name]
        return web.Response(body=body, content_type=content_type)

    async def canned(request: web.Request) -> web.Response:
        status, body, headers = canned_answer(request.match_info["case"])
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.add_routes([web.get("/img/{name}", image), web.post("/canned/{case}/v1/images/generations", canned)])
    async with serving(app) as base_url:
        yield base_url


def _envelope(message: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


async def test_references_are_sent_as_image_parts(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, elsewhere: str
) -> None:
    request = make_request(
        width=1080,
        height=1920,
        num_variants=2,
        output_format="jpeg",
        reference_image_urls=(f"{elsewhere}/img/a.png?sig=abc", f"{elsewhere}/img/b.jpg"),
        options={"quality": "medium", "input_fidelity": "high", "moderation": "low"},
    )

    result = await generate(provider, request, checkpoint)

    assert [decode(image.data).size for image in result.images] == [(1024, 1536)] * 2
    assert [image.content_type for image in result.images] == ["image/jpeg"] * 2
    (call,) = sandbox.openai.requests
    assert call.endpoint == "edits"
    assert call.content_type == "multipart/form-data"
    # Multipart fields are text; edits have no `moderation` parameter, so it is not sent there.
    assert call.fields == {
        "model": "gpt-image-1.5",
        "prompt": "a poster that says SALE",
        "n": "2",
        "size": "1024x1536",
        "output_format": "jpeg",
        "quality": "medium",
        "input_fidelity": "high",
    }
    assert [(i.field_name, i.filename, i.content_type) for i in call.images] == [
        ("image[]", "reference-1.png", "image/png"),
        ("image[]", "reference-2.jpg", "image/jpeg"),
    ]
    assert [i.sha256 for i in call.images] == [
        hashlib.sha256(REFERENCE_PNG).hexdigest(),
        hashlib.sha256(REFERENCE_JPEG).hexdigest(),
    ]
    assert call.usage is not None
    assert call.usage["input_tokens_details"]["image_tokens"] > 2 * 6240  # two high-fidelity images
    assert result.cost_usd_micros == expected_cost(call.usage)
    assert sandbox.counters["openai.edits"] == 1


@pytest.mark.parametrize(
    ("name", "error_class", "fragment"),
    [
        ("missing.png", ProviderRejected, "HTTP 404"),
        ("page.html", ProviderRejected, "is not an image (Content-Type text/html)"),
        ("anim.gif", ProviderRejected, "not a PNG, JPEG or WebP"),
        ("big.png", ProviderRejected, "over the 20000-byte limit"),
        ("busy.png", ProviderUnavailable, "HTTP 503"),
    ],
)
async def test_reference_that_cannot_be_used(
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    checkpoint: RecordingCheckpoint,
    elsewhere: str,
    name: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    provider = OpenAIProvider(session, base_url=sandbox.base_url, api_key=API_KEY, max_reference_bytes=20_000)
    urls = (f"{elsewhere}/img/{name}", f"{elsewhere}/img/busy.png")

    error = await generate_error(provider, make_request(reference_image_urls=urls), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert f"reference image 1 ({elsewhere}/img/{name})" in error.message or name == "busy.png"
    assert sandbox.openai.requests == []


async def test_unreachable_reference_is_transient(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    closed = f"{sandbox.base_url.rsplit(':', 1)[0]}:9/a.png"  # the discard port: nothing listens

    error = await generate_error(provider, make_request(reference_image_urls=(closed,)), checkpoint)

    assert type(error) is ProviderUnavailable
    assert "could not fetch reference image 1" in error.message


async def test_too_many_references(provider: OpenAIProvider, checkpoint: RecordingCheckpoint) -> None:
    urls = tuple(f"https://example.com/{n}.png" for n in range(17))

    error = await generate_error(provider, make_request(reference_image_urls=urls), checkpoint)

    assert type(error) is ProviderRejected
    assert "at most 16" in error.message


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "error_class", "fragment"),
    [
        ("moderated", ContentModerated, "refused the request (OpenAI did not say at which stage)"),
        ("moderated-output", ContentModerated, "the generated image (output moderation)"),
        (
            "rate-limited",
            ProviderUnavailable,
            "OpenAI answered HTTP 429 to the generations call (rate limited)",
        ),
        ("server-error", ProviderUnavailable, "HTTP 500"),
        ("error", ProviderUnavailable, "HTTP 500"),
        ("down", ProviderUnavailable, "HTTP 503"),
        ("malformed", ProviderUnavailable, "not valid JSON"),
        ("no-image", InvalidProviderResponse, "no images (`data` is empty)"),
        ("disconnect", ProviderUnavailable, "dropped mid-response"),
        ("no-credits", ProviderAuthError, "insufficient_quota"),
    ],
)
async def test_fault_maps_to_error(
    provider: OpenAIProvider,
    checkpoint: RecordingCheckpoint,
    tag: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    error = await generate_error(provider, make_request(f"a poster [sandbox:{tag}]"), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert error.retryable is error_class.retryable
    assert checkpoint.saves == []


async def test_moderation_names_the_vendors_reason(
    provider: OpenAIProvider, checkpoint: RecordingCheckpoint
) -> None:
    before = await generate_error(provider, make_request("[sandbox:moderated]"), checkpoint)
    after = await generate_error(provider, make_request("[sandbox:moderated-output]"), checkpoint)

    assert "safety_violations=[violence]" in before.message
    assert "safety_violations=[sexual]" in after.message
    assert "[request req_" in after.message


@pytest.mark.parametrize("tag", ["rate-limited", "server-error", "disconnect"])
async def test_first_call_fails_and_the_retry_succeeds(
    provider: OpenAIProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, tag: str
) -> None:
    request = make_request(f"a poster [sandbox:{tag}]")

    error = await generate_error(provider, request, checkpoint)
    assert error.retryable

    result = await generate(provider, request, checkpoint)
    assert len(result.images) == 1
    assert len(sandbox.openai.requests) == 2


async def test_rate_limit_without_a_hint(provider: OpenAIProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited]"), checkpoint)

    assert error.retry_after_s is None


async def test_rate_limit_with_retry_after_ms(
    provider: OpenAIProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    session: aiohttp.ClientSession,
) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited=2.5]"), checkpoint)

    assert type(error) is ProviderUnavailable
    assert error.retry_after_s == 2.5  # from retry-after-ms, finer than Retry-After's whole seconds
    direct = {"prompt": "spoken directly [sandbox:rate-limited=2.5]"}
    status, answer, headers = await call_sandbox(session, sandbox, direct)
    assert status == 429
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    assert answer["error"]["code"] == "rate_limit_exceeded"
    assert "Please try again in 2.5s." in answer["error"]["message"]


@pytest.mark.parametrize(
    ("case", "error_class", "retry_after_s", "fragment"),
    [
        ("retry-after", ProviderUnavailable, 3.0, "rate limited"),
        ("try-again-in", ProviderUnavailable, 0.85, "rate limited"),
        ("dalle-moderation", ContentModerated, None, "(content_policy_violation)"),
        ("forbidden", ProviderAuthError, None, "HTTP 403"),
        ("url-only", InvalidProviderResponse, None, "no b64_json"),
        ("bad-base64", InvalidProviderResponse, None, "not valid base64"),
        ("redirect", InvalidProviderResponse, None, "unexpected status"),
    ],
)
async def test_answers_the_sandbox_does_not_give(
    session: aiohttp.ClientSession,
    checkpoint: RecordingCheckpoint,
    elsewhere: str,
    case: str,
    error_class: type[ProviderError],
    retry_after_s: float | None,
    fragment: str,
) -> None:
    provider = OpenAIProvider(session, base_url=f"{elsewhere}/canned/{case}", api_key=API_KEY)

    error = await generate_error(provider, make_request(), checkpoint)

    assert type(error) is error_class
    assert error.retry_after_s == retry_after_s
    assert fragment in error.message


async def test_retry_after_as_an_http_date(
    session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint, elsewhere: str
) -> None:
    provider = OpenAIProvider(session, base_url=f"{elsewhere}/canned/retry-date", api_key=API_KEY)

    error = await generate_error(provider, make_request(), checkpoint)

    assert error.retry_after_s is not None and 100 < error.retry_after_s <= 120


async def test_answer_without_usage_has_no_cost(
    session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint, elsewhere: str
) -> None:
    provider = OpenAIProvider(session, base_url=f"{elsewhere}/canned/no-usage", api_key=API_KEY)

    result = await generate(provider, make_request(), checkpoint)
    too_few = await generate_error(
        OpenAIProvider(session, base_url=f"{elsewhere}/canned/no-usage", api_key=API_KEY),
        make_request(num_variants=2),
        checkpoint,
    )

    assert result.cost_usd_micros is None  # the worker keeps the catalog's estimate
    assert decode(result.images[0].data).size == (64, 64)
    assert type(too_few) is InvalidProviderResponse
    assert "returned 1 of the 2 images" in too_few.message


async def test_invalid_option_is_rejected_by_openai(
    provider: OpenAIProvider, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request(options={"quality": "ultra"}), checkpoint)

    assert type(error) is ProviderRejected
    assert "HTTP 400" in error.message
    assert (
        "Invalid value: 'ultra'. Supported values are: 'low', 'medium', 'high', and 'auto'." in error.message
    )


async def test_missing_key(
    sandbox: Sandbox, session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint
) -> None:
    provider = OpenAIProvider(session, base_url=sandbox.base_url, api_key="")

    error = await generate_error(provider, make_request(), checkpoint)

    assert type(error) is ProviderAuthError
    assert not error.retryable
    assert "HTTP 401" in error.message
    assert "You didn't provide an API key" in error.message
    assert sandbox.openai.requests == []


async def test_wrong_key(
    sandbox: Sandbox, session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint
) -> None:
    provider = OpenAIProvider(session, base_url=sandbox.base_url, api_key="sk-wrong-key-9999")

    error = await generate_error(provider, make_request(), checkpoint)

    assert type(error) is ProviderAuthError
    assert "(invalid_api_key)" in error.message
    assert "Incorrect API key provided: sk-**********9999." in error.message
    assert sandbox.counters["openai.generations"] == 0
    assert sandbox.counters["openai.refused"] == 1


# --- the sandbox's wire protocol, spoken directly -------------------------------------------------


async def call_sandbox(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    body: object,
    *,
    headers: Mapping[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    url = f"{sandbox.base_url}/v1/images/generations"
    sent = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    if raw is not None:
        kwargs: dict[str, Any] = {"data": raw}
    else:
        kwargs = {"json": {"model": "gpt-image-1.5", **body} if isinstance(body, dict) else body}
    async with session.post(url, headers=sent, **kwargs) as response:
        return response.status, await response.json(), response.headers


def envelope(message: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        (
            {"prompt": "x", "size": "1254x836"},
            "Invalid value: '1254x836'. Supported values are: '1024x1024', '1024x1536', '1536x1024', "
            "and 'auto'.",
            "size",
            "invalid_value",
        ),
        (
            {"prompt": "x", "response_format": "b64_json"},
            "Unknown parameter: 'response_format'.",
            "response_format",
            "unknown_parameter",
        ),
        ({"prompt": "x", "style": "vivid"}, "Unknown parameter: 'style'.", "style", "unknown_parameter"),
        ({"n": 1}, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"),
        (
            {"prompt": "x", "n": 11},
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
            "n",
            "integer_above_max_value",
        ),
        (
            {"prompt": "x", "n": "2"},
            "Invalid type for 'n': expected an integer, but got a string instead.",
            "n",
            "invalid_type",
        ),
        (
            {"prompt": "x" * 32_001},
            "Invalid 'prompt': string too long. Expected a string with maximum length 32000, "
            "but got a string with length 32001 instead.",
            "prompt",
            "string_above_max_length",
        ),
        (
            {"prompt": "x", "background": "transparent", "output_format": "jpeg"},
            "Transparent background is not supported for the 'jpeg' output format. Use 'png' or 'webp'.",
            "background",
            "invalid_value",
        ),
    ],
)
async def test_invalid_body_gets_openais_error(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    body: dict[str, Any],
    message: str,
    param: str,
    code: str,
) -> None:
    status, answer, headers = await call_sandbox(session, sandbox, body)

    assert (status, answer) == (400, envelope(message, param, code))
    assert headers["x-request-id"].startswith("req_")
    assert sandbox.counters["openai.generations"] == 0


async def test_generations_without_model_is_dall_e(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, _ = await call_sandbox(session, sandbox, {"prompt": "x", "model": None})

    assert status == 400
    assert answer["error"]["param"] == "model"
    assert "dall-e-2" in answer["error"]["message"]


async def test_body_that_is_not_json(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, _ = await call_sandbox(session, sandbox, None, raw=b"prompt=x")

    assert status == 400
    assert answer["error"]["message"].startswith("We could not parse the JSON body of your request.")
    assert answer["error"]["code"] is None


async def test_missing_key_is_openais_401(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}):
        status, answer, _ = await call_sandbox(session, sandbox, {"prompt": "x"}, headers=headers)

        assert status == 401
        assert answer["error"]["message"].startswith(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)"
        )
        assert (answer["error"]["type"], answer["error"]["code"]) == ("invalid_request_error", None)


async def test_answer_shape(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, headers = await call_sandbox(
        session, sandbox, {"prompt": "a shop sign", "n": 2, "size": "1536x1024"}
    )

    assert status == 200
    assert set(answer) == {"created", "background", "data", "output_format", "quality", "size", "usage"}
    assert (answer["background"], answer["output_format"], answer["quality"], answer["size"]) == (
        "opaque",
        "png",
        "high",  # quality "auto" is answered as what it was drawn at
        "1536x1024",
    )
    assert [set(item) for item in answer["data"]] == [{"b64_json", "revised_prompt"}] * 2
    assert all(len(item["b64_json"]) > 100_000 for item in answer["data"])
    assert answer["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 3},
        "output_tokens": 2 * 6240,
        "output_tokens_details": {"image_tokens": 2 * 6240, "text_tokens": 0},
        "total_tokens": 3 + 2 * 6240,
    }
    assert int(headers["openai-processing-ms"]) >= 0


async def test_output_moderation_details(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, headers = await call_sandbox(session, sandbox, {"prompt": "[sandbox:moderated-output]"})

    assert status == 400
    error = answer["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "image_generation_user_error",
        "moderation_blocked",
        None,
    )
    assert error["message"].startswith("Your request was rejected by the safety system.")
    assert headers["x-request-id"] in error["message"]
    assert error["moderation_details"] == {"moderation_stage": "output", "categories": ["sexual"]}


async def test_no_credits_is_insufficient_quota(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer, _ = await call_sandbox(session, sandbox, {"prompt": "[sandbox:no-credits]"})

    assert status == 429
    assert (answer["error"]["type"], answer["error"]["code"]) == ("insufficient_quota", "insufficient_quota")


async def test_streaming(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    body = {"model": "gpt-image-1.5", "prompt": "x", "stream": True, "partial_images": 2, "quality": "low"}
    async with session.post(
        f"{sandbox.base_url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as response:
        assert response.content_type == "text/event-stream"
        text = (await response.read()).decode()

    events = [block.split("\n") for block in text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    payloads = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [p["partial_image_index"] for p in payloads[:2]] == [0, 1]
    assert payloads[-1]["usage"]["output_tokens"] == 272
    assert decode(base64.b64decode(payloads[-1]["b64_json"])).size == (1024, 1024)


async def test_edits_validation(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    url = f"{sandbox.base_url}/v1/images/edits"
    auth = {"Authorization": f"Bearer {API_KEY}"}

    async def post(form: aiohttp.FormData) -> tuple[int, Any]:
        async with session.post(url, data=form, headers=auth) as response:
            return response.status, await response.json()

    no_image = aiohttp.FormData({"prompt": "x", "model": "gpt-image-1.5"})
    no_image.add_field("mask", b"", filename="mask.png", content_type="image/png")
    text_file = aiohttp.FormData({"prompt": "x"})
    text_file.add_field("image", b"hello", filename="a.txt", content_type="text/plain")
    moderation = aiohttp.FormData({"prompt": "x", "moderation": "low"})
    moderation.add_field("image", REFERENCE_PNG, filename="a.png", content_type="image/png")
    auto_size = aiohttp.FormData({"prompt": "x", "quality": "low"})
    auto_size.add_field("image", png(900, 300), filename="wide.png", content_type="image/png")

    assert (await post(no_image))[1]["error"]["code"] == "missing_required_parameter"
    status, answer = await post(text_file)
    assert (status, answer["error"]["param"]) == (400, "image")
    assert "unsupported mimetype ('text/plain')" in answer["error"]["message"]
    assert (await post(moderation))[1]["error"]["code"] == "unknown_parameter"
    status, answer = await post(auto_size)  # edits default to gpt-image-1.5; size auto follows the image
    assert (status, answer["size"]) == (200, "1536x1024")
    assert answer["usage"]["input_tokens_details"]["image_tokens"] == 85 + 170 * 2 * 1
    async with session.post(url, json={"prompt": "x", "images": []}, headers=auth) as response:
        assert response.status == 400
        assert "expected multipart/form-data" in (await response.json())["error"]["message"]

"""The real Gemini adapter against the real Gemini sandbox, on ephemeral loopback ports."""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from providers.base import (
    ContentModerated,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.gemini import GeminiProvider, NativeSize, closest_aspect_ratio, native_size
from sandbox import Sandbox
from sandbox.drawing import draw_placeholder
from tests.vendor_fixtures import (
    RecordingCheckpoint,
    decode,
    generate,
    generate_error,
    request_maker,
    serving,
)

API_KEY = "test-key"
FLASH, PRO = "nano_banana", "nano_banana_pro"
FLASH_URL, PRO_URL = (
    "/v1beta/models/gemini-2.5-flash-image:generateContent",
    "/v1beta/models/gemini-3-pro-image-preview:generateContent",
)
# "a red fox in the snow" is 21 characters: 6 prompt tokens at the sandbox's 4 characters per token.
PROMPT = "a red fox in the snow"
REFERENCE_PNG = draw_placeholder(prompt="reference", seed=1, width=96, height=64, image_format="png")
REFERENCE_JPEG = draw_placeholder(prompt="reference", seed=2, width=64, height=96, image_format="jpeg")
# USD micros per million tokens: (input, image output, text and thinking output)
RATES = {FLASH: (300_000, 30_000_000, 2_500_000), PRO: (2_000_000, 120_000_000, 12_000_000)}


class ReferenceHost:
    """A real HTTP server on port 0 that serves reference images (and a few bad ones) and records requests."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.requests: list[Mapping[str, str]] = []

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"


@pytest.fixture
def provider(sandbox: Sandbox, session: aiohttp.ClientSession) -> GeminiProvider:
    return make_provider(sandbox, session)


@pytest.fixture
async def references() -> AsyncIterator[ReferenceHost]:
    bodies: dict[str, tuple[bytes, str, int]] = {
        "ref.png": (REFERENCE_PNG, "image/png", 200),
        "ref.jpg": (REFERENCE_JPEG, "image/jpg", 200),  # a common mislabel of JPEG
        "page.html": (b"<html></html>", "text/html", 200),
        "anim.gif": (b"GIF89a" + bytes(64), "image/gif", 200),
        "big.png": (REFERENCE_PNG * 4, "image/png", 200),
        "gone.png": (b"", "text/plain", 404),
        "busy.png": (b"", "text/plain", 503),
    }
    host: ReferenceHost | None = None

    async def serve(request: web.Request) -> web.Response:
        assert host is not None
        host.requests.append(dict(request.headers))
        data, content_type, status = bodies[request.match_info["name"]]
        return web.Response(body=data, status=status, headers={"Content-Type": content_type})

    app = web.Application()
    app.add_routes([web.get("/{name}", serve)])
    async with serving(app) as base_url:
        host = ReferenceHost(base_url)
        yield host


class CannedGemini:
    """A real HTTP server on port 0 answering every generateContent with one canned answer set by the test."""

    def __init__(self) -> None:
        self.base_url = ""
        self.status = 200
        self.body: bytes = b"{}"
        self.headers: dict[str, str] = {}

    def answer(self, body: object, status: int = 200, **headers: str) -> None:
        self.status, self.headers = status, {"Content-Type": "application/json; charset=UTF-8", **headers}
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture
async def canned() -> AsyncIterator[CannedGemini]:
    upstream = CannedGemini()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=upstream.body, status=upstream.status, headers=upstream.headers)

    app = web.Application()
    app.add_routes([web.post("/v1beta/models/{target}", serve)])
    async with serving(app) as base_url:
        upstream.base_url = base_url
        yield upstream


def make_provider(
    sandbox: Sandbox, session: aiohttp.ClientSession, api_key: str = API_KEY, **options: Any
) -> GeminiProvider:
    return GeminiProvider(session, base_url=sandbox.base_url, api_key=api_key, **options)


make_request = request_maker(model=FLASH, prompt=PROMPT)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cost_from_recorded_usage(model: str, sandbox: Sandbox) -> int:
    """What the recorded answers' usage costs, computed independently of the adapter."""
    input_rate, image_rate, text_rate = RATES[model]
    millionths = 0
    for call in sandbox.gemini.calls:
        assert call.usage is not None
        details = call.usage["candidatesTokensDetails"]
        image = sum(detail["tokenCount"] for detail in details if detail["modality"] == "IMAGE")
        text = call.usage["candidatesTokenCount"] - image + call.usage.get("thoughtsTokenCount", 0)
        millionths += call.usage["promptTokenCount"] * input_rate + image * image_rate + text * text_rate
    return -(-millionths // 1_000_000)


# --- the native-size policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "flash", "pro"),
    [
        (
            1024,
            1024,
            NativeSize(aspect_ratio="1:1", image_size=None, width=1024, height=1024),
            NativeSize(aspect_ratio="1:1", image_size="1K", width=1024, height=1024),
        ),
        (
            1080,
            1920,
            NativeSize(aspect_ratio="9:16", image_size=None, width=768, height=1344),
            NativeSize(aspect_ratio="9:16", image_size="2K", width=1536, height=2752),
        ),
        (
            1920,
            1080,
            NativeSize(aspect_ratio="16:9", image_size=None, width=1344, height=768),
            NativeSize(aspect_ratio="16:9", image_size="2K", width=2752, height=1536),
        ),
        (
            256,
            256,
            NativeSize(aspect_ratio="1:1", image_size=None, width=1024, height=1024),
            NativeSize(aspect_ratio="1:1", image_size="1K", width=1024, height=1024),
        ),
        (
            2048,
            2048,
            NativeSize(aspect_ratio="1:1", image_size=None, width=1024, height=1024),
            NativeSize(aspect_ratio="1:1", image_size="2K", width=2048, height=2048),
        ),
        (
            1600,
            900,
            NativeSize(aspect_ratio="16:9", image_size=None, width=1344, height=768),
            NativeSize(aspect_ratio="16:9", image_size="2K", width=2752, height=1536),
        ),
        (
            720,
            1280,
            NativeSize(aspect_ratio="9:16", image_size=None, width=768, height=1344),
            NativeSize(aspect_ratio="9:16", image_size="1K", width=768, height=1376),
        ),
    ],
)
def test_native_size(width: int, height: int, flash: NativeSize, pro: NativeSize) -> None:
    assert native_size(FLASH, width, height) == flash
    assert native_size(PRO, width, height) == pro


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (2045, 1000, "21:9"),  # nearer 16:9 by difference of ratios, nearer 21:9 in log space
        (1000, 2045, "9:16"),  # nothing narrower than 9:16
        (2048, 256, "21:9"),
        (1100, 1000, "1:1"),
        (1200, 1000, "5:4"),
        (1000, 1500, "2:3"),
        (1536, 1152, "4:3"),
    ],
)
def test_closest_aspect_ratio_in_log_space(width: int, height: int, ratio: str) -> None:
    assert closest_aspect_ratio(width, height) == ratio


def test_pro_takes_the_smallest_tier_that_covers_and_falls_back_to_4k() -> None:
    assert native_size(PRO, 1376, 768).image_size == "1K"
    assert native_size(PRO, 1377, 768).image_size == "2K"
    assert native_size(PRO, 3000, 1600) == NativeSize(
        aspect_ratio="16:9", image_size="4K", width=5504, height=3072
    )
    assert native_size(PRO, 9000, 9000).image_size == "4K"  # nothing covers it: the largest there is


def test_native_size_refuses_other_models() -> None:
    with pytest.raises(ValueError, match="not a Gemini model"):
        native_size("flux_2_pro", 1024, 1024)


# --- success -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variants", [1, 4])
@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1080, 1920), (1920, 1080)])
@pytest.mark.parametrize("model", [FLASH, PRO])
async def test_images_arrive_at_the_native_size(
    provider: GeminiProvider,
    sandbox: Sandbox,
    checkpoint: RecordingCheckpoint,
    model: str,
    width: int,
    height: int,
    variants: int,
) -> None:
    request = make_request(model=model, width=width, height=height, num_variants=variants)

    result = await generate(provider, request, checkpoint)

    expected = native_size(model, width, height)
    assert len(result.images) == variants
    for image in result.images:
        with Image.open(io.BytesIO(image.data)) as opened:  # reads the header only
            assert opened.size == (expected.width, expected.height)
            assert (opened.format, image.content_type) == ("PNG", "image/png")
    assert decode(result.images[0].data).size == (expected.width, expected.height)
    assert len({image.data for image in result.images}) == variants  # one call each, each its own image
    calls = list(sandbox.gemini.calls)
    assert len(calls) == variants == sandbox.counters["gemini.generate"]
    sent = {"aspectRatio": expected.aspect_ratio}
    if expected.image_size is not None:
        sent["imageSize"] = expected.image_size
    assert all(call.body["generationConfig"]["imageConfig"] == sent for call in calls)
    assert result.cost_usd_micros == cost_from_recorded_usage(model, sandbox)
    assert len(result.vendor_refs["gemini_response_ids"]) == variants
    assert checkpoint.saves == []


async def test_request_body_is_what_gemini_expects(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, references: ReferenceHost
) -> None:
    request = make_request(
        model=PRO,
        width=1080,
        height=1920,
        reference_image_urls=(references.url("ref.png"), references.url("ref.jpg")),
    )

    await generate(provider, request, checkpoint)

    (call,) = sandbox.gemini.calls
    assert call.model == "gemini-3-pro-image-preview"
    assert call.body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": PROMPT},
                    {"inlineData": {"mimeType": "image/png", "data": b64(REFERENCE_PNG)}},
                    {"inlineData": {"mimeType": "image/jpeg", "data": b64(REFERENCE_JPEG)}},
                ],
            }
        ],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "9:16", "imageSize": "2K"},
        },
    }
    assert call.headers["x-goog-api-key"] == API_KEY
    assert call.headers["Content-Type"] == "application/json"
    # The key went to Google only: not to the reference host, not into a URL.
    assert all("x-goog-api-key" not in {name.lower() for name in headers} for headers in references.requests)
    assert len(references.requests) == 2  # downloaded once, not once per variant


async def test_flash_never_gets_an_image_size(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    await generate(provider, make_request(width=2048, height=2048), checkpoint)

    (call,) = sandbox.gemini.calls
    assert call.body["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1"}


async def test_references_are_downloaded_once_for_all_variants(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, references: ReferenceHost
) -> None:
    request = make_request(num_variants=3, reference_image_urls=(references.url("ref.png"),))

    result = await generate(provider, request, checkpoint)

    assert len(result.images) == 3
    assert len(references.requests) == 1
    # 6 text + 258 image prompt tokens at $0.30/1M and 1290 image tokens at $30/1M, three times:
    # 3 x (79.2 + 38,700) = 116,337.6 micros, rounded up once.
    assert result.cost_usd_micros == 116_338


# --- cost ----------------------------------------------------------------------------------------------


async def test_flash_cost_is_exact_micros(provider: GeminiProvider, checkpoint: RecordingCheckpoint) -> None:
    one = await generate(provider, make_request(), checkpoint)
    four = await generate(provider, make_request(num_variants=4), checkpoint)

    # 6 prompt tokens x $0.30/1M = 1.8 micros; 1290 image tokens x $30/1M = 38,700 micros
    assert one.cost_usd_micros == 38_702
    assert four.cost_usd_micros == 154_808  # 4 x 38,701.8, rounded up once


async def test_pro_cost_counts_image_prompt_and_thinking_tokens(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(model=PRO), checkpoint)

    (call,) = sandbox.gemini.calls
    assert call.usage is not None
    thoughts = call.usage["thoughtsTokenCount"]
    assert thoughts > 0
    # 6 prompt tokens x $2/1M + 1120 image tokens x $120/1M + thinking tokens x $12/1M
    assert result.cost_usd_micros == 12 + 134_400 + 12 * thoughts


async def test_pro_answer_carries_thoughts_and_the_adapter_takes_the_final_image(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    provider: GeminiProvider,
    checkpoint: RecordingCheckpoint,
) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "a fox"}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "1:1"}},
    }
    status, answer = await post(session, sandbox, PRO_URL, body)
    assert status == 200
    parts = answer["candidates"][0]["content"]["parts"]
    assert [("text" in part, "inlineData" in part, part.get("thought", False)) for part in parts] == [
        (True, False, True),
        (False, True, True),
        (False, True, False),
    ]
    assert "thoughtSignature" in parts[-1]
    draft = decode(base64.b64decode(parts[1]["inlineData"]["data"]))
    assert draft.size == (256, 256)

    result = await generate(provider, make_request("a fox", model=PRO), checkpoint)
    assert decode(result.images[0].data).size == (1024, 1024)


# --- faults ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "error_class", "fragment"),
    [
        ("moderated", ContentModerated, "reference images (blockReason PROHIBITED_CONTENT)"),
        ("moderated-output", ContentModerated, "withheld the image (finishReason IMAGE_SAFETY)"),
        ("rate-limited", ProviderUnavailable, "HTTP 429 RESOURCE_EXHAUSTED"),
        ("server-error", ProviderUnavailable, "HTTP 500 INTERNAL"),
        ("down", ProviderUnavailable, "HTTP 503 UNAVAILABLE to generateContent: The model is overloaded"),
        ("malformed", ProviderUnavailable, "not valid JSON"),
        ("no-image", InvalidProviderResponse, "returned no image (finishReason STOP)"),
        ("disconnect", ProviderUnavailable, "dropped mid-response"),
        ("no-credits", ProviderAuthError, "prepayment credits are depleted"),
        ("error", InvalidProviderResponse, "no image (finishReason IMAGE_OTHER)"),
    ],
)
@pytest.mark.parametrize("model", [FLASH, PRO])
async def test_fault_maps_to_error(
    provider: GeminiProvider,
    checkpoint: RecordingCheckpoint,
    model: str,
    tag: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    error = await generate_error(provider, make_request(f"a fox [sandbox:{tag}]", model=model), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert error.retryable is error_class.retryable
    assert checkpoint.saves == []


async def test_output_moderation_quotes_googles_message(
    provider: GeminiProvider, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request("[sandbox:moderated-output]"), checkpoint)

    assert "Responsible AI practices" in error.message
    assert "Support code" in error.message


async def test_text_only_answer_quotes_the_text(
    provider: GeminiProvider, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request("[sandbox:no-image]", model=PRO), checkpoint)

    assert "I'm unable to create that image" in error.message
    assert "Composing the scene" not in error.message  # thoughts are not the answer


async def test_rate_limit_without_retry_info(
    provider: GeminiProvider, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited]"), checkpoint)

    assert error.retry_after_s is None


@pytest.mark.parametrize(("tag", "seconds"), [("rate-limited=21", 21.0), ("rate-limited=0.5", 0.5)])
async def test_rate_limit_retry_info_becomes_retry_after(
    provider: GeminiProvider, checkpoint: RecordingCheckpoint, tag: str, seconds: float
) -> None:
    error = await generate_error(provider, make_request(f"a fox [sandbox:{tag}]"), checkpoint)

    assert type(error) is ProviderUnavailable
    assert error.retry_after_s == seconds


@pytest.mark.parametrize("tag", ["rate-limited", "server-error", "disconnect"])
async def test_first_attempt_fails_and_the_retry_succeeds(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, tag: str
) -> None:
    request = make_request(f"a fox [sandbox:{tag}]")

    error = await generate_error(provider, request, checkpoint)
    assert error.retryable

    result = await generate(provider, request, checkpoint)
    assert len(result.images) == 1
    assert sandbox.counters["gemini.generate"] == 1


async def test_slow_answer_still_arrives(provider: GeminiProvider, checkpoint: RecordingCheckpoint) -> None:
    result = await generate(provider, make_request("a slow fox [sandbox:slow=0.1]"), checkpoint)

    assert len(result.images) == 1


async def test_moderation_of_one_variant_beats_throttling_of_another(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    # The first call of this prompt is throttled, the three others are moderated at output.
    request = make_request("a fox [sandbox:rate-limited=9] [sandbox:moderated-output]", num_variants=4)

    error = await generate_error(provider, request, checkpoint)

    assert type(error) is ContentModerated
    assert sandbox.counters["gemini.generate_refused"] == 1
    assert sandbox.counters["gemini.generate"] == 3


async def test_one_throttled_variant_fails_the_call_with_its_retry_hint(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request("a fox [sandbox:rate-limited=5]", num_variants=4)

    error = await generate_error(provider, request, checkpoint)

    assert (type(error), error.retry_after_s) == (ProviderUnavailable, 5.0)
    assert sandbox.counters["gemini.generate"] == 3


# --- readings of the API the sandbox does not play ---------------------------------------------------------


DANGEROUS = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}


def image_answer(parts: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}
    answer: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        answer["usageMetadata"] = usage
    return answer


async def test_jpeg_from_pro_is_taken_as_jpeg_and_thoughts_are_skipped(
    session: aiohttp.ClientSession, canned: CannedGemini, checkpoint: RecordingCheckpoint
) -> None:
    final = draw_placeholder(prompt="final", seed=1, width=32, height=32, image_format="jpeg")
    draft = draw_placeholder(prompt="draft", seed=1, width=8, height=8, image_format="png")
    canned.answer(
        image_answer(
            [
                {"text": "thinking", "thought": True},
                {"inlineData": {"mimeType": "image/png", "data": b64(draft)}, "thought": True},
                {"text": "Here it is."},
                {"inline_data": {"mime_type": "image/jpeg", "data": b64(final)}},
                {"text": "Enjoy."},
            ],
            # No per-modality breakdown: the candidates' tokens are all image.
            usage={"promptTokenCount": 10, "candidatesTokenCount": 1120, "totalTokenCount": 1130},
        )
    )
    provider = GeminiProvider(session, base_url=canned.base_url, api_key=API_KEY)

    result = await generate(provider, make_request(model=PRO), checkpoint)

    (image,) = result.images
    assert (image.data, image.content_type) == (final, "image/jpeg")
    assert result.cost_usd_micros == 20 + 134_400


@pytest.mark.parametrize(
    ("answer", "error_class", "fragment"),
    [
        ({"promptFeedback": {"blockReason": "OTHER"}}, ContentModerated, "blockReason OTHER"),
        (
            {"candidates": [{"content": {"parts": []}, "finishReason": "PROHIBITED_CONTENT"}]},
            ContentModerated,
            "finishReason PROHIBITED_CONTENT",
        ),
        (
            {"candidates": [{"content": {}, "finishReason": "SAFETY", "safetyRatings": [DANGEROUS]}]},
            ContentModerated,
            "HARM_CATEGORY_DANGEROUS_CONTENT (HIGH)",
        ),
        ({"candidates": [{"finishReason": "NO_IMAGE"}]}, InvalidProviderResponse, "finishReason NO_IMAGE"),
        ({"candidates": []}, InvalidProviderResponse, "without a candidate"),
        ([1, 2], InvalidProviderResponse, "not a JSON object"),
        (
            image_answer([{"inlineData": {"mimeType": "image/png", "data": "%%%"}}]),
            InvalidProviderResponse,
            "not valid base64",
        ),
    ],
)
async def test_other_answer_shapes_are_classified(
    session: aiohttp.ClientSession,
    canned: CannedGemini,
    checkpoint: RecordingCheckpoint,
    answer: object,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    canned.answer(answer)
    provider = GeminiProvider(session, base_url=canned.base_url, api_key=API_KEY)

    error = await generate_error(provider, make_request(), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def google_error(code: int, status: str, *details: dict[str, Any]) -> dict[str, Any]:
    error = {"code": code, "message": f"a {status} error", "status": status, "details": list(details)}
    return {"error": error}


@pytest.mark.parametrize(
    ("status", "body", "headers", "error_class", "retry_after_s"),
    [
        (429, google_error(429, "RESOURCE_EXHAUSTED"), {"Retry-After": "3"}, ProviderUnavailable, 3.0),
        (503, b"<html>Service Unavailable</html>", {"Content-Type": "text/html"}, ProviderUnavailable, None),
        (401, google_error(401, "UNAUTHENTICATED"), {}, ProviderAuthError, None),
        (400, google_error(400, "FAILED_PRECONDITION"), {}, ProviderRejected, None),
        (404, google_error(404, "NOT_FOUND"), {}, ProviderRejected, None),
        (
            429,
            google_error(429, "RESOURCE_EXHAUSTED", {"@type": RETRY_INFO, "retryDelay": "1.500s"}),
            {"Retry-After": "9"},  # RetryInfo is Google's own hint: it wins
            ProviderUnavailable,
            1.5,
        ),
    ],
)
async def test_other_http_errors_are_classified(
    session: aiohttp.ClientSession,
    canned: CannedGemini,
    checkpoint: RecordingCheckpoint,
    status: int,
    body: object,
    headers: dict[str, str],
    error_class: type[ProviderError],
    retry_after_s: float | None,
) -> None:
    canned.answer(body, status, **headers)
    provider = GeminiProvider(session, base_url=canned.base_url, api_key=API_KEY)

    error = await generate_error(provider, make_request(), checkpoint)

    assert (type(error), error.retry_after_s) == (error_class, retry_after_s)
    assert f"HTTP {status}" in error.message


# --- credentials -----------------------------------------------------------------------------------------


async def test_missing_key_is_an_auth_error(
    sandbox: Sandbox, session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(make_provider(sandbox, session, api_key=""), make_request(), checkpoint)

    assert type(error) is ProviderAuthError
    assert not error.retryable
    assert "HTTP 403 PERMISSION_DENIED" in error.message
    assert "unregistered callers" in error.message


async def test_wrong_key_is_an_auth_error(
    session: aiohttp.ClientSession, checkpoint: RecordingCheckpoint
) -> None:
    async with Sandbox.running(port=0, api_key="the-right-key") as sandbox:
        wrong = make_provider(sandbox, session, api_key="a-wrong-key")
        error = await generate_error(wrong, make_request(), checkpoint)

        assert type(error) is ProviderAuthError
        assert "HTTP 400 INVALID_ARGUMENT" in error.message
        assert "API key not valid" in error.message
        assert sandbox.counters["gemini.generate"] == 0

        right = make_provider(sandbox, session, api_key="the-right-key")
        assert len((await generate(right, make_request(), checkpoint)).images) == 1


# --- reference images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error_class", "fragment"),
    [
        ("gone.png", ProviderRejected, "answered HTTP 404"),
        ("busy.png", ProviderUnavailable, "answered HTTP 503"),
        ("page.html", ProviderRejected, "is not an image (Content-Type 'text/html')"),
        ("anim.gif", ProviderRejected, "is image/gif; Gemini reads image/png"),
        ("big.png", ProviderRejected, "over the 10000-byte limit"),
    ],
)
async def test_bad_reference_fails_before_calling_gemini(
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    checkpoint: RecordingCheckpoint,
    references: ReferenceHost,
    name: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    provider = make_provider(sandbox, session, max_reference_bytes=10_000)
    request = make_request(reference_image_urls=(references.url("ref.png"), references.url(name)))

    error = await generate_error(provider, request, checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert "reference image 2" in error.message
    assert not sandbox.gemini.calls


async def test_unreachable_reference_is_retryable(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    with socket.socket() as listener:  # a port nothing listens on once this closes
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]

    error = await generate_error(
        provider, make_request(reference_image_urls=(f"http://127.0.0.1:{port}/ref.png",)), checkpoint
    )

    assert type(error) is ProviderUnavailable
    assert "could not download reference image 1" in error.message
    assert not sandbox.gemini.calls


async def test_a_model_of_another_vendor_is_rejected(
    provider: GeminiProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    error = await generate_error(provider, make_request(model="flux_2_pro"), checkpoint)

    assert type(error) is ProviderRejected
    assert not sandbox.gemini.calls


# --- the sandbox's wire protocol, spoken directly -----------------------------------------------------------


async def post(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    path: str,
    body: object,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    sent_headers = {"x-goog-api-key": API_KEY} if headers is None else headers
    async with session.post(f"{sandbox.base_url}{path}", json=body, headers=sent_headers) as response:
        return response.status, await response.json()


def text_body(prompt: str = "x", **image_config: Any) -> dict[str, Any]:
    return {
        "contents": [{"role": "user", "parts": [{"text": prompt}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
    }


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        (FLASH_URL, text_body(aspectRatio="1:1", imageSize="1K"), "Image size is not supported"),
        (PRO_URL, text_body(aspectRatio="1:1", imageSize="2k"), "Unsupported image size: 2k"),
        (PRO_URL, text_body(aspectRatio="7:5"), "Unsupported aspect ratio: 7:5"),
        (FLASH_URL, {"generationConfig": {"responseModalities": ["IMAGE"]}}, "contents is not specified"),
        (FLASH_URL, {"contents": [{"role": "user", "parts": []}]}, "contents.parts must not be empty"),
        (FLASH_URL, {"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}, "Please use a valid role"),
        (
            FLASH_URL,
            {"contents": [{"parts": [{"inlineData": {"mimeType": "image/gif", "data": "R0lGODlh"}}]}]},
            "Unsupported MIME type: image/gif",
        ),
        (
            FLASH_URL,
            {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "aGVsbG8="}}]}]},
            "Unable to process input image",
        ),
    ],
)
async def test_invalid_request_is_400_invalid_argument(
    session: aiohttp.ClientSession, sandbox: Sandbox, path: str, body: dict[str, Any], fragment: str
) -> None:
    status, answer = await post(session, sandbox, path, body)

    assert status == 400
    assert set(answer) == {"error"}
    assert (answer["error"]["code"], answer["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert fragment in answer["error"]["message"]
    assert sandbox.counters["gemini.generate_refused"] == 1


async def test_unknown_field_is_a_bad_request_with_field_violations(
    session: aiohttp.ClientSession, sandbox: Sandbox
) -> None:
    # outputMimeType is Vertex AI's, not the Gemini API's.
    body = text_body(aspectRatio="1:1", outputMimeType="image/jpeg")

    status, answer = await post(session, sandbox, PRO_URL, body)

    assert status == 400
    message = (
        "Invalid JSON payload received. Unknown name \"outputMimeType\" at 'generation_config.image_config': "
        "Cannot find field."
    )
    assert answer["error"]["message"] == message
    (details,) = answer["error"]["details"]
    assert details == {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "generation_config.image_config", "description": message}],
    }


async def test_bad_base64_is_a_bad_request(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "not base64!"}}]}]}

    status, answer = await post(session, sandbox, FLASH_URL, body)

    assert status == 400
    expected = "Invalid value at 'contents[0].parts[0].inline_data.data' (TYPE_BYTES)"
    assert expected in answer["error"]["message"]


async def test_snake_case_and_key_in_query_are_accepted(
    session: aiohttp.ClientSession, sandbox: Sandbox
) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generation_config": {"response_modalities": ["IMAGE"], "image_config": {"aspect_ratio": "21:9"}},
    }
    async with session.post(f"{sandbox.base_url}{FLASH_URL}", params={"key": API_KEY}, json=body) as response:
        assert response.status == 200
        answer = await response.json()

    (candidate,) = answer["candidates"]
    (part,) = candidate["content"]["parts"]
    assert decode(base64.b64decode(part["inlineData"]["data"])).size == (1536, 672)
    assert answer["usageMetadata"]["candidatesTokensDetails"] == [{"modality": "IMAGE", "tokenCount": 1290}]
    assert answer["modelVersion"] == "gemini-2.5-flash-image"
    assert set(answer) == {"candidates", "usageMetadata", "modelVersion", "responseId"}


async def test_without_aspect_ratio_the_output_follows_the_first_reference(
    session: aiohttp.ClientSession, sandbox: Sandbox
) -> None:
    reference = {"inlineData": {"mimeType": "image/jpeg", "data": b64(REFERENCE_JPEG)}}
    body = {"contents": [{"role": "user", "parts": [{"text": "x"}, reference]}]}

    status, answer = await post(session, sandbox, FLASH_URL, body)

    assert status == 200
    parts = answer["candidates"][0]["content"]["parts"]
    assert "text" in parts[0]  # modalities unset: text and image
    assert decode(base64.b64decode(parts[-1]["inlineData"]["data"])).size == (832, 1248)  # 64x96 is 2:3
    assert answer["usageMetadata"]["promptTokensDetails"][1] == {"modality": "IMAGE", "tokenCount": 258}


async def test_missing_key_is_403_permission_denied(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer = await post(session, sandbox, FLASH_URL, text_body(), headers={})

    assert status == 403
    assert answer["error"]["status"] == "PERMISSION_DENIED"
    assert answer["error"]["message"].startswith("Method doesn't allow unregistered callers")
    assert not sandbox.gemini.calls


async def test_wrong_key_is_400_api_key_invalid(session: aiohttp.ClientSession) -> None:
    async with Sandbox.running(port=0, api_key="the-right-key") as sandbox:
        wrong = {"x-goog-api-key": "nope"}
        status, answer = await post(session, sandbox, FLASH_URL, text_body(), headers=wrong)

    assert (status, answer["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert answer["error"]["details"][0]["reason"] == "API_KEY_INVALID"


async def test_unknown_model_is_404(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    path = "/v1beta/models/gemini-9-ultra:generateContent"

    status, answer = await post(session, sandbox, path, text_body())

    assert (status, answer["error"]["status"]) == (404, "NOT_FOUND")
    assert "models/gemini-9-ultra is not found for API version v1beta" in answer["error"]["message"]


async def test_rate_limit_envelope(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer = await post(session, sandbox, PRO_URL, text_body("x [sandbox:rate-limited=21]"))
    again, _ = await post(session, sandbox, PRO_URL, text_body("x [sandbox:rate-limited=21]"))

    assert (status, again) == (429, 200)
    error = answer["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    quota, retry = error["details"]
    assert quota["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"
    assert quota["violations"][0]["quotaDimensions"]["model"] == "gemini-3-pro-image-preview"
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "21s"}


async def test_moderation_shapes_are_http_200(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status_in, blocked_input = await post(session, sandbox, FLASH_URL, text_body("x [sandbox:moderated]"))
    status_out, blocked_output = await post(
        session, sandbox, FLASH_URL, text_body("x [sandbox:moderated-output]")
    )

    assert (status_in, status_out) == (200, 200)
    assert "candidates" not in blocked_input
    assert blocked_input["promptFeedback"]["blockReason"] == "PROHIBITED_CONTENT"
    assert len(blocked_input["promptFeedback"]["safetyRatings"]) == 4
    (candidate,) = blocked_output["candidates"]
    assert "content" not in candidate
    assert candidate["finishReason"] == "IMAGE_SAFETY"
    assert "Responsible AI practices" in candidate["finishMessage"]

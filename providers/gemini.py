"""Google Gemini image models (Nano Banana, Nano Banana Pro): one synchronous generateContent call a variant.

Wire protocol: shared/provider-apis.md section 4. Gemini has no `n`, no task id and no result URL: every
variant is its own `POST /v1beta/models/{model}:generateContent`, run concurrently, and the image comes back
inline as base64. There is nothing to resume, so `Checkpoint.save` is never called; a failed attempt pays
again for the variants that had succeeded.

Sizes: Gemini takes an aspect ratio (and, on Pro only, a 1K / 2K / 4K tier), not pixels. `native_size` picks
the supported ratio closest to the request and, on Pro, the smallest tier that covers the request; the
worker centre-crops and resizes the result to exactly the requested size.

Reference images must be sent inline: the adapter downloads each URL once per call of `generate`, with the
shared session and without the API key, accepts only the image types Gemini reads and at most
`max_reference_bytes` each, and sends them as base64 `inlineData` parts after the prompt.

The Gemini API cannot be asked for an output format (`outputMimeType` is Vertex-only), so
`request.output_format` is left to the worker; the content type is read from each part's `mimeType`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from providers._http import (
    describe,
    most_telling,
    read_limited,
    retry_after_s,
    shorten,
    sniff_content_type,
    snippet,
)
from providers.base import (
    Checkpoint,
    ContentModerated,
    GenerationRequest,
    GenerationResult,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderImage,
    ProviderRejected,
    ProviderUnavailable,
    RetryReason,
)
from providers.catalog import CATALOG
from providers.references import check_reference_image

__all__ = [
    "ASPECT_RATIOS",
    "IMAGE_SIZES",
    "GeminiProvider",
    "NativeSize",
    "closest_aspect_ratio",
    "native_size",
]

#: the aspect ratios Gemini's `imageConfig.aspectRatio` accepts
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
#: Nano Banana Pro's `imageConfig.imageSize` tiers, smallest first, with their scale over the 1K sizes
IMAGE_SIZES: Mapping[str, int] = {"1K": 1, "2K": 2, "4K": 4}

# Google's image-generation docs, "Gemini 2.5 Flash Image": one size per aspect ratio.
_FLASH_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
# "Gemini 3 Pro Image" at 1K; 2K and 4K are exactly 2x and 4x. provider-apis.md quotes 1:1, 16:9, 4:3 and
# 21:9; the other rows are their transposes and the 3:2 / 4:5 rows of the same Google table as copied
# consistently by many third parties.
_PRO_1K_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
}
_FLASH = "nano_banana"
_PRO = "nano_banana_pro"


@dataclass(frozen=True, kw_only=True)
class _TokenPrices:
    """USD micros per million tokens."""

    input: int
    image_output: int
    #: text and thinking output
    text_output: int


# provider-apis.md section 4 (catalog PRICE_TABLE_VERSION 2026-11-01). Flash's text-output rate is not in
# those notes: it is Gemini 2.5 Flash's published $2.50 (unverified for the image model); a successful
# answer to an image-only request normally has no text tokens to bill.
_PRICES: Mapping[str, _TokenPrices] = {
    _FLASH: _TokenPrices(input=300_000, image_output=30_000_000, text_output=2_500_000),
    _PRO: _TokenPrices(input=2_000_000, image_output=120_000_000, text_output=12_000_000),
}

# A blocked prompt says why in `promptFeedback.blockReason`; every reason is a refusal.
# These finish reasons mean the safety (or recitation) filters withheld the image.
_MODERATED_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "RECITATION",
        "IMAGE_RECITATION",
        "BLOCKLIST",
        "SPII",
    }
)
# Input types Gemini reads inline (Vertex AI's Gemini 3 Pro Image model page; the same for 2.5 Flash).
_INLINE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
# Gemini refuses requests over 20 MB; larger references would need the Files API.
_MAX_REQUEST_BYTES = 20_000_000
# A 4K PNG is tens of megabytes and base64 adds a third; Pro may add interim thought images.
_MAX_ANSWER_BYTES = 192 * 1024 * 1024
_MAX_DETAIL_CHARS = 300
_OUT_OF_CREDIT = ("credits are depleted",)
_AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
# Order of precedence when variants fail differently: a final verdict beats one a retry may cure.
_PRECEDENCE: tuple[type[ProviderError], ...] = (
    ContentModerated,
    ProviderAuthError,
    ProviderRejected,
    InvalidProviderResponse,
    ProviderUnavailable,
)


@dataclass(frozen=True, kw_only=True)
class NativeSize:
    """What to ask Gemini for, and the size of the image it delivers for it."""

    aspect_ratio: str
    #: "1K" | "2K" | "4K" for Nano Banana Pro; None for Nano Banana, which has one size per aspect ratio
    image_size: str | None
    width: int
    height: int


def closest_aspect_ratio(width: int, height: int) -> str:
    """The supported aspect ratio nearest to `width:height`, compared in log space (2:1 is as far as 1:2)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda ratio: abs(target - math.log(_ratio(ratio))))


def native_size(model: str, width: int, height: int) -> NativeSize:
    """The size to ask catalog model `model` for, to be cropped and resized to `width x height`.

    Nano Banana has one size per aspect ratio (about 1 MP), so it may be smaller than the request. Nano
    Banana Pro takes the smallest tier whose image covers `width x height` once cropped to that aspect
    ratio, which is exactly when both sides are at least as large; 4K when none does.
    """
    aspect_ratio = closest_aspect_ratio(width, height)
    if model == _FLASH:
        native_width, native_height = _FLASH_SIZES[aspect_ratio]
        return NativeSize(
            aspect_ratio=aspect_ratio, image_size=None, width=native_width, height=native_height
        )
    if model == _PRO:
        base_width, base_height = _PRO_1K_SIZES[aspect_ratio]
        for tier, scale in IMAGE_SIZES.items():  # noqa: B007 - the tier the loop stops on is the answer
            if base_width * scale >= width and base_height * scale >= height:
                break
        # When no tier covers the request, the loop ends on the largest (4K).
        return NativeSize(
            aspect_ratio=aspect_ratio, image_size=tier, width=base_width * scale, height=base_height * scale
        )
    raise ValueError(f"{model!r} is not a Gemini model; expected {_FLASH!r} or {_PRO!r}")


class GeminiProvider:
    """Nano Banana and Nano Banana Pro through the Gemini API's own REST surface (no SDK)."""

    vendor = "gemini"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        references_session: aiohttp.ClientSession | None = None,
        max_reference_bytes: int = 7 * 1024 * 1024,
    ) -> None:
        self._session = session
        #: for callers' reference URLs: a session whose connector refuses non-public addresses
        self._references = references_session or session
        self._base_url = base_url.rstrip("/")
        # The key goes in a header, never in the URL, so that it stays out of logs and error messages.
        self._headers = {"x-goog-api-key": api_key, "Content-Type": "application/json"}
        #: the largest reference image downloaded (Gemini's documented limit for inline images is 7 MB)
        self._max_reference_bytes = max_reference_bytes

    async def generate(self, request: GenerationRequest, checkpoint: Checkpoint) -> GenerationResult:
        """Produce `request.num_variants` images, one generateContent call each, run concurrently."""
        spec = CATALOG.get(request.model)
        if spec is None or spec.vendor != self.vendor or request.model not in _PRICES:
            raise ProviderRejected(f"{request.model!r} is not a model this Gemini adapter serves")
        size = native_size(request.model, request.width, request.height)
        references = await self._download_references(request.reference_image_urls)
        body = await asyncio.to_thread(_encoded_payload, request.prompt, references, size)
        if len(body) > _MAX_REQUEST_BYTES:
            raise ProviderRejected(
                f"the prompt and reference images make a {len(body)}-byte request, over Gemini's "
                f"{_MAX_REQUEST_BYTES}-byte limit for inline data"
            )
        url = URL(f"{self._base_url}/v1beta/models/{quote(spec.vendor_model, safe='')}:generateContent")
        outcomes = await asyncio.gather(
            *(self._generate_one(url, body) for _ in range(request.num_variants)), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise most_telling(errors, _rank)
        answers = [outcome for outcome in outcomes if isinstance(outcome, _Answer)]
        return GenerationResult(
            images=tuple(answer.image for answer in answers),
            cost_usd_micros=_cost_usd_micros(_PRICES[request.model], [answer.usage for answer in answers]),
            vendor_refs={
                "gemini_response_ids": [answer.response_id for answer in answers],
                "gemini_model_version": answers[0].model_version if answers else None,
            },
        )

    async def _generate_one(self, url: URL, body: bytes) -> _Answer:
        try:
            async with self._session.post(
                url, data=body, headers=self._headers, raise_for_status=False
            ) as response:
                raw = await read_limited(response, _MAX_ANSWER_BYTES, "Gemini's answer")
                status, retry_after = response.status, response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"Gemini generateContent failed: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc
        if status != 200:
            raise _http_error(status, raw, retry_after)
        # A multi-megabyte JSON parse and base64 decode: keep the event loop free for other jobs.
        return await asyncio.to_thread(_read_answer, raw)

    async def _download_references(self, urls: Sequence[str]) -> list[_Reference]:
        if not urls:
            return []
        outcomes = await asyncio.gather(
            *(self._download_reference(number, url) for number, url in enumerate(urls, start=1)),
            return_exceptions=True,
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise most_telling(errors, _rank)
        return [outcome for outcome in outcomes if isinstance(outcome, _Reference)]

    async def _download_reference(self, number: int, url: str) -> _Reference:
        what = f"reference image {number} ({shorten(url, 100)})"
        try:
            # No API key: the reference's host is not Google.
            async with self._references.get(URL(url), raise_for_status=False) as response:
                status = response.status
                if status != 200:
                    raise _reference_http_error(what, status)
                mime_type = _TYPE_ALIASES.get(response.content_type, response.content_type)
                if not mime_type.startswith("image/"):
                    raise ProviderRejected(f"{what} is not an image (Content-Type {response.content_type!r})")
                if mime_type not in _INLINE_TYPES:
                    raise ProviderRejected(
                        f"{what} is {mime_type}; Gemini reads {', '.join(_INLINE_TYPES)} only"
                    )
                data = await read_limited(response, self._max_reference_bytes, what, error=ProviderRejected)
        except aiohttp.InvalidURL as exc:  # the caller's mistake: no retry will fetch it
            raise ProviderRejected(f"{what} is not a URL that can be fetched ({exc})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"could not download {what}: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc
        if not data:
            raise ProviderRejected(f"{what} is empty (0 bytes)")
        await asyncio.to_thread(check_reference_image, data, what)
        return _Reference(mime_type=mime_type, data=data)


@dataclass(frozen=True, kw_only=True)
class _Reference:
    mime_type: str
    data: bytes


@dataclass(frozen=True, kw_only=True)
class _Usage:
    prompt: int
    image_output: int
    #: text and thinking output
    text_output: int


@dataclass(frozen=True, kw_only=True)
class _Answer:
    image: ProviderImage
    usage: _Usage | None
    response_id: str | None
    model_version: str | None


def _ratio(name: str) -> float:
    width, height = name.split(":")
    return int(width) / int(height)


def _encoded_payload(prompt: str, references: Sequence[_Reference], size: NativeSize) -> bytes:
    image_config: dict[str, str] = {"aspectRatio": size.aspect_ratio}
    # Only Pro has tiers; whether 2.5 Flash ignores or refuses `imageSize` is unverified: it never gets one.
    if size.image_size is not None:
        image_config["imageSize"] = size.image_size
    parts: list[dict[str, Any]] = [{"text": prompt}]
    parts.extend(
        {"inlineData": {"mimeType": ref.mime_type, "data": base64.b64encode(ref.data).decode("ascii")}}
        for ref in references
    )
    payload = {
        "contents": [{"role": "user", "parts": parts}],
        # IMAGE only: with TEXT allowed, 2.5 Flash sometimes answers in words alone.
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
    }
    return json.dumps(payload).encode()


def _read_answer(raw: bytes) -> _Answer:
    """Classify a 200 answer: the final image, or the ProviderError it amounts to."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ProviderUnavailable(
            "Gemini answered HTTP 200 but a body that is not valid JSON "
            f"({len(raw)} bytes: {snippet(raw)}); it was probably cut short",
            reason=RetryReason.CONNECTION,
        ) from None
    if not isinstance(body, dict):
        raise InvalidProviderResponse(f"Gemini's answer is not a JSON object: {snippet(raw)}")
    feedback = body.get("promptFeedback")
    block_reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if block_reason:
        assert isinstance(feedback, dict)
        raise ContentModerated(
            "Gemini's input moderation refused the prompt or its reference images "
            f"(blockReason {block_reason})"
            + _extra(feedback.get("blockReasonMessage"), _flagged(feedback.get("safetyRatings")))
        )
    candidates = body.get("candidates")
    candidate = candidates[0] if isinstance(candidates, list) and candidates else None
    if not isinstance(candidate, dict):
        raise InvalidProviderResponse(
            f"Gemini answered without a candidate or a block reason: {snippet(raw)}"
        )
    finish_reason = str(candidate.get("finishReason") or "")
    finish_message = candidate.get("finishMessage")
    if finish_reason in _MODERATED_FINISH_REASONS:
        raise ContentModerated(
            f"Gemini's output moderation withheld the image (finishReason {finish_reason})"
            + _extra(finish_message, _flagged(candidate.get("safetyRatings")))
        )
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    parts = parts if isinstance(parts, list) else []
    image_part = _final_image(parts)
    if image_part is None:
        text = " ".join(
            part["text"]
            for part in parts
            if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
        )
        raise InvalidProviderResponse(
            f"Gemini returned no image (finishReason {finish_reason or 'missing'})"
            + _extra(finish_message, f"its text: {text[:_MAX_DETAIL_CHARS]!r}" if text else None)
        )
    mime_type, encoded = image_part
    # Proto JSON bytes may be standard or URL-safe base64, with or without padding.
    normalised = encoded.strip().replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(normalised + "=" * (-len(normalised) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidProviderResponse(f"Gemini's image is not valid base64: {exc}") from exc
    if not data:
        raise InvalidProviderResponse("Gemini's image is empty (0 bytes)")
    response_id, model_version = body.get("responseId"), body.get("modelVersion")
    return _Answer(
        image=ProviderImage(
            data=data, content_type=mime_type if mime_type.startswith("image/") else sniff_content_type(data)
        ),
        usage=_usage(body.get("usageMetadata")),
        response_id=response_id if isinstance(response_id, str) else None,
        model_version=model_version if isinstance(model_version, str) else None,
    )


def _final_image(parts: Sequence[Any]) -> tuple[str, str] | None:
    # Pro "thinks" in interim images marked `thought`; the answer is the last image that is not a thought.
    for part in reversed(parts):
        if not isinstance(part, dict) or part.get("thought"):
            continue
        blob = part.get("inlineData", part.get("inline_data"))
        if isinstance(blob, dict) and isinstance(blob.get("data"), str) and blob["data"]:
            mime_type = blob.get("mimeType", blob.get("mime_type"))
            return (mime_type.lower() if isinstance(mime_type, str) else ""), blob["data"]
    return None


def _usage(metadata: object) -> _Usage | None:
    if not isinstance(metadata, dict):
        return None
    prompt = _count(metadata.get("promptTokenCount"))
    candidates = _count(metadata.get("candidatesTokenCount"))
    if prompt is None or candidates is None:
        return None
    details = metadata.get("candidatesTokensDetails")
    if isinstance(details, list):
        image = sum(
            _count(detail.get("tokenCount")) or 0
            for detail in details
            if isinstance(detail, dict) and detail.get("modality") == "IMAGE"
        )
    else:
        # Without the breakdown, an image answer's output is all image.
        image = candidates
    thoughts = _count(metadata.get("thoughtsTokenCount")) or 0
    return _Usage(prompt=prompt, image_output=image, text_output=max(0, candidates - image) + thoughts)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _cost_usd_micros(prices: _TokenPrices, usages: Sequence[_Usage | None]) -> int | None:
    # A partial sum would undercut the catalog's estimate: report a cost only if every call had its usage.
    known = [usage for usage in usages if usage is not None]
    if not known or len(known) != len(usages):
        return None
    # Exact in millionths of a micro, rounded up once: Google bills the tokens, not each call's rounding.
    millionths = sum(
        usage.prompt * prices.input
        + usage.image_output * prices.image_output
        + usage.text_output * prices.text_output
        for usage in known
    )
    return -(-millionths // 1_000_000)


def _http_error(status: int, raw: bytes, retry_after: str | None) -> ProviderError:
    error = _error_object(raw)
    status_name = str(error.get("status") or "")
    message = error.get("message")
    detail = message if isinstance(message, str) and message else raw.decode("utf-8", "replace").strip()
    details = error.get("details") if isinstance(error.get("details"), list) else []
    reasons = {
        item.get("reason")
        for item in details
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.ErrorInfo")
    }
    text = f"Gemini answered HTTP {status}" + (f" {status_name}" if status_name else "")
    text += f" to generateContent: {detail[:_MAX_DETAIL_CHARS]}" if detail else " to generateContent"
    lowered = detail.lower()
    bad_key = bool(reasons & _AUTH_REASONS) or lowered.startswith(("api key not valid", "api key expired"))
    if status in (401, 403) or bad_key:
        return ProviderAuthError(text)
    if status == 429 and any(phrase in lowered for phrase in _OUT_OF_CREDIT):
        # Out of prepaid credit looks like throttling but a retry cannot cure it: it is the account's problem.
        return ProviderAuthError(text)
    if status in (408, 429, 499) or status >= 500:
        return ProviderUnavailable(
            text,
            retry_after_s=_retry_delay_s(details) or retry_after_s(retry_after),
            reason=RetryReason.of_status(status),
        )
    if 400 <= status < 500:
        return ProviderRejected(text)
    return InvalidProviderResponse(text)


def _error_object(raw: bytes) -> Mapping[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    # Google wraps errors in {"error": {...}}; some proxies answer a list of such objects.
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _retry_delay_s(details: Sequence[Any]) -> float | None:
    for item in details:
        if not isinstance(item, dict) or not str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            continue
        delay = item.get("retryDelay")
        # proto3 JSON renders a Duration as "21s" / "0.500s"; tolerate the {seconds, nanos} object form too.
        if isinstance(delay, str) and (match := _DURATION.match(delay)):
            return float(match.group(1))
        if isinstance(delay, dict):
            seconds, nanos = delay.get("seconds", 0), delay.get("nanos", 0)
            try:
                return float(seconds) + float(nanos) / 1e9
            except (TypeError, ValueError):
                return None
    return None


def _reference_http_error(what: str, status: int) -> ProviderError:
    message = f"{what} answered HTTP {status}"
    if status in (408, 429) or status >= 500:
        return ProviderUnavailable(message, reason=RetryReason.of_status(status))
    # Gone, forbidden or not found: retrying the same URL will not help; the request must change.
    return ProviderRejected(message)


def _flagged(ratings: object) -> str | None:
    if not isinstance(ratings, list):
        return None
    flagged = [
        f"{rating.get('category')} ({rating.get('probability')})"
        for rating in ratings
        if isinstance(rating, dict)
        and (rating.get("blocked") or rating.get("probability") in ("MEDIUM", "HIGH"))
    ]
    return f"flagged: {', '.join(flagged)}" if flagged else None


def _extra(*notes: object) -> str:
    shown = [str(note)[:_MAX_DETAIL_CHARS] for note in notes if note]
    return f": {'; '.join(shown)}" if shown else ""


def _rank(error: ProviderError) -> tuple[float, ...]:
    # One that settles the job (moderation first) beats one a retry may cure; among retryable ones, the
    # longest wait the vendor asked for wins, so the retry does not come back too early.
    kind = next((index for index, cls in enumerate(_PRECEDENCE) if isinstance(error, cls)), len(_PRECEDENCE))
    return kind, -(error.retry_after_s or 0.0)

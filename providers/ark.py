"""BytePlus ModelArk Seedream 4.0 / 4.5: one synchronous call per variant, then a download of each image URL.

Wire protocol: shared/provider-apis.md section 3. Seedream has no `n` (with `sequential_image_generation`
disabled each call makes one image) and no seed, so the variants are concurrent, independent calls.
The call is synchronous: there is no task to save with `Checkpoint`, and a retry pays again for the
images of variants that had succeeded. Ark bills `usage.generated_images` per call; the cost reported
is that count times the model's catalog price per image, summed over the calls.

Reference images are passed to Ark as the URLs the caller gave (Ark fetches them); nothing is fetched here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image, UnidentifiedImageError
from yarl import URL

from providers._http import (
    Reply,
    classify_status,
    describe,
    most_telling,
    read_limited,
    retry_after_s,
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
from providers.catalog import CATALOG, ModelSpec

__all__ = ["DEFAULT_BASE_URL", "MAX_PIXELS", "MIN_PIXELS", "SIDE_STEP", "ArkProvider", "native_size"]

#: BytePlus ModelArk's international endpoint (Volcengine China: https://ark.cn-beijing.volces.com)
DEFAULT_BASE_URL = "https://ark.ap-southeast.bytepluses.com"
#: the fewest pixels (w·h) each model accepts as an explicit "WxH" size
MIN_PIXELS: Mapping[str, int] = {"seedream_4": 1280 * 720, "seedream_4_5": 2560 * 1440}
#: the most pixels either model accepts (4096 x 4096)
MAX_PIXELS = 4096 * 4096
#: every side of a native size is a multiple of this (Ark requires none; 8 suits JPEG's 8 x 8 blocks)
SIDE_STEP = 8
_MAX_RATIO = 16
_MAX_REFERENCES = 14
# No vendor image comes near this; a larger body is a fault, not an image.
_MAX_IMAGE_BYTES = 64 * 1024 * 1024
_MAX_DETAIL_CHARS = 300
_IMAGE_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_MODERATION_SUBJECTS = {
    "InputText": "the prompt (input moderation)",
    "InputImage": "a reference image (input moderation)",
    "OutputImage": "the generated image (output moderation)",
    "OutputText": "the generated output (output moderation)",
}

# How each HTTP status Ark uses becomes an error: the class raised and the words in its message.
_HTTP_ERRORS: Mapping[int, tuple[type[ProviderError], str]] = {
    400: (ProviderRejected, "bad request"),
    401: (ProviderAuthError, "unauthorised"),
    402: (ProviderAuthError, "payment required"),
    403: (ProviderAuthError, "forbidden"),
    404: (ProviderRejected, "model or endpoint not found"),
    408: (ProviderUnavailable, "request timeout"),
    429: (ProviderUnavailable, "rate limited"),
    500: (ProviderUnavailable, "server error"),
    502: (ProviderUnavailable, "bad gateway"),
    503: (ProviderUnavailable, "service unavailable"),
    504: (ProviderUnavailable, "gateway timeout"),
}
# 400 codes that say "try again later" rather than "fix the request".
_TRANSIENT_CODES = ("InvalidEndpoint.ClosedEndpoint",)


def native_size(model: str, width: int, height: int) -> tuple[int, int]:
    """The "WxH" to ask `model` for: `width x height` scaled up just enough to reach its minimum pixels.

    The aspect ratio is kept, the size is never smaller than requested, and each side is rounded up to a
    multiple of `SIDE_STEP` (which can only add pixels). Raises ValueError when no accepted size exists.
    """
    if model not in MIN_PIXELS:
        raise ValueError(f"{model!r} is not a Seedream model; expected one of {sorted(MIN_PIXELS)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    if not 1 / _MAX_RATIO <= width / height <= _MAX_RATIO:
        raise ValueError(f"Seedream needs an aspect ratio within 1:16 to 16:1, got {width}x{height}")
    minimum = MIN_PIXELS[model]
    # Scaling by s = sqrt(minimum / (w·h)) gives sides sqrt(w·minimum/h) and sqrt(h·minimum/w); they are
    # computed in integers so that exact cases (1080x1920 → 1440x2560) stay exact.
    scaled_width = max(width, _ceil_sqrt(width * minimum, height))
    scaled_height = max(height, _ceil_sqrt(height * minimum, width))
    native = (_round_up(scaled_width, SIDE_STEP), _round_up(scaled_height, SIDE_STEP))
    if native[0] * native[1] > MAX_PIXELS:
        raise ValueError(f"{width}x{height} needs more than Seedream's {MAX_PIXELS} pixels")
    return native


class ArkProvider:
    """Seedream 4.0 / 4.5 through BytePlus ModelArk's own HTTP API (no SDK)."""

    vendor = "ark"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        path: str = "/api/v3/images/generations",
    ) -> None:
        self._session = session
        self._url = URL(f"{base_url.rstrip('/')}/{path.lstrip('/')}")
        # An empty key is sent as no key at all: Ark then answers 401, as it does for a wrong one.
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    async def generate(self, request: GenerationRequest, checkpoint: Checkpoint) -> GenerationResult:
        """Produce `request.num_variants` images, one Ark call each, all at once."""
        spec = _spec(request.model)
        try:
            width, height = native_size(request.model, request.width, request.height)
        except ValueError as exc:
            raise ProviderRejected(str(exc)) from exc
        payload = _payload(request, spec, width, height)
        # Every call runs to its end even when one fails: a later moderation verdict says more than an
        # earlier 429, and the images are paid for either way.
        outcomes = await asyncio.gather(
            *(self._variant(payload) for _ in range(request.num_variants)), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise most_telling(errors, _rank)
        variants = [outcome for outcome in outcomes if isinstance(outcome, _Variant)]
        counts = [variant.generated_images for variant in variants]
        refs: dict[str, Any] = {"ark_sizes": [variant.size for variant in variants]}
        request_ids = [variant.request_id for variant in variants if variant.request_id]
        if request_ids:
            refs["ark_request_ids"] = request_ids
        return GenerationResult(
            images=tuple(variant.image for variant in variants),
            # A partial sum would undercut the catalog's estimate: report a cost only if every call had one.
            cost_usd_micros=(
                sum(count * spec.price_per_image_usd_micros for count in counts if count is not None)
                if all(count is not None for count in counts)
                else None
            ),
            vendor_refs=refs,
        )

    async def _variant(self, payload: Mapping[str, Any]) -> _Variant:
        reply = await self._post(payload)
        if not reply.ok:
            raise _http_error(reply)
        body = _json_object(reply)
        item = _image_item(body, reply)
        b64 = item.get("b64_json")
        if isinstance(b64, str) and b64:
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                message = f"Ark's b64_json image is not valid base64{_rid(reply)}"
                raise InvalidProviderResponse(message) from exc
        else:
            data = await self._download(item["url"], reply)
        content_type = _image_type(data, reply)
        size = item.get("size")
        return _Variant(
            image=ProviderImage(data=data, content_type=content_type),
            generated_images=_generated_images(body),
            request_id=reply.request_id,
            size=size if isinstance(size, str) else None,
        )

    async def _post(self, payload: Mapping[str, Any]) -> _Reply:
        try:
            async with self._session.post(
                self._url, json=payload, headers=self._headers, raise_for_status=False
            ) as response:
                raw = await response.read()
                return _Reply(
                    status=response.status,
                    raw=raw,
                    retry_after=response.headers.get("Retry-After"),
                    request_id=response.headers.get("X-Request-Id"),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"Ark image generation call failed: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc

    async def _download(self, url: str, reply: _Reply) -> bytes:
        stage = "download of Ark's image"
        try:
            # No Authorization: the link is signed, and the key must not leak to the storage host.
            async with self._session.get(URL(url, encoded=True), raise_for_status=False) as response:
                if response.status in (403, 404, 410):
                    raise ProviderUnavailable(
                        f"Ark's image URL has expired or is invalid (HTTP {response.status} on download); "
                        f"a retry generates (and pays for) a new image{_rid(reply)}"
                    )
                if not 200 <= response.status < 300:
                    raise ProviderUnavailable(
                        f"Ark's storage answered HTTP {response.status} to the {stage}{_rid(reply)}",
                        reason=RetryReason.of_status(response.status),
                    )
                return await read_limited(response, _MAX_IMAGE_BYTES, f"the {stage}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"the {stage} failed: {describe(exc)}{_rid(reply)}", reason=RetryReason.of_transport(exc)
            ) from exc


@dataclass(frozen=True, kw_only=True)
class _Variant:
    image: ProviderImage
    #: `usage.generated_images` of the call, or None when Ark did not report it
    generated_images: int | None
    request_id: str | None
    #: `data[].size` as Ark reported it, e.g. "2560x1440"
    size: str | None


@dataclass(frozen=True, kw_only=True)
class _Reply(Reply):
    request_id: str | None


def _spec(model: str) -> ModelSpec:
    spec = CATALOG.get(model)
    if spec is None or spec.vendor != ArkProvider.vendor or model not in MIN_PIXELS:
        raise ProviderRejected(f"{model!r} is not a model served through BytePlus ModelArk")
    return spec


def _payload(request: GenerationRequest, spec: ModelSpec, width: int, height: int) -> dict[str, Any]:
    references = request.reference_image_urls
    if len(references) > _MAX_REFERENCES:
        raise ProviderRejected(
            f"Seedream takes at most {_MAX_REFERENCES} reference images, got {len(references)}"
        )
    payload: dict[str, Any] = {
        "model": spec.vendor_model,
        "prompt": request.prompt,
        "size": f"{width}x{height}",
        # Ark always delivers JPEG (the worker re-encodes); a URL keeps the JSON answer small.
        "response_format": "url",
        # Ark's default is true (an "AI generated" mark drawn on the image): off unless asked for.
        "watermark": request.options.get("watermark") is True,
        "sequential_image_generation": "disabled",
    }
    if references:
        payload["image"] = references[0] if len(references) == 1 else list(references)
    mode = request.options.get("optimize_prompt")
    if mode is not None:
        payload["optimize_prompt_options"] = {"mode": mode}
    return payload


def _json_object(reply: _Reply) -> Mapping[str, Any]:
    body = reply.body
    if body is None:
        raise ProviderUnavailable(
            f"Ark answered HTTP {reply.status} with a body that is not valid JSON "
            f"({len(reply.raw)} bytes: {snippet(reply.raw)}){_rid(reply)}",
            reason=RetryReason.CONNECTION,
        )
    if not isinstance(body, dict):
        raise InvalidProviderResponse(f"Ark's answer is not a JSON object: {snippet(reply.raw)}{_rid(reply)}")
    return body


def _image_item(body: Mapping[str, Any], reply: _Reply) -> Mapping[str, Any]:
    """The first image of a 200 answer, or the error its per-image failures amount to."""
    error = body.get("error")
    if isinstance(error, dict):
        # A 200 carrying a top-level error: classify it as if it had come with its own status.
        raise _coded_error(error, reply, status=None)
    data = body.get("data")
    if not isinstance(data, list):
        raise InvalidProviderResponse(
            f"Ark answered success without a data array: {snippet(reply.raw)}{_rid(reply)}"
        )
    failures: list[ProviderError] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        url, b64 = item.get("url"), item.get("b64_json")
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return item
        if isinstance(b64, str) and b64:
            return item
        item_error = item.get("error")
        if isinstance(item_error, dict):
            failures.append(_coded_error(item_error, reply, status=None))
    if failures:
        raise most_telling(failures, _rank)
    raise InvalidProviderResponse(
        f"Ark answered success but returned no image (data has {len(data)} items, "
        f"usage.generated_images={_generated_images(body)}){_rid(reply)}"
    )


def _generated_images(body: Mapping[str, Any]) -> int | None:
    usage = body.get("usage")
    count = usage.get("generated_images") if isinstance(usage, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def _http_error(reply: _Reply) -> ProviderError:
    body = reply.body
    error = body.get("error") if isinstance(body, dict) else None
    return _coded_error(error if isinstance(error, dict) else {}, reply, status=reply.status)


def _coded_error(error: Mapping[str, Any], reply: _Reply, *, status: int | None) -> ProviderError:
    """The error an Ark error object amounts to; `status` is None for a failure inside a 200 answer."""
    code = str(error.get("code") or "")
    message = str(error.get("message") or "").strip()
    if not message and status is not None:
        message = reply.raw.decode("utf-8", "replace").strip()
    detail = message[:_MAX_DETAIL_CHARS]
    moderated = _moderation_subject(code)
    if moderated is not None:
        return ContentModerated(
            f"Ark's moderation refused {moderated} ({code}): {detail}{_rid(reply, detail)}"
        )
    if status is None:
        # A per-image failure of a call Ark accepted: its internal errors are worth another attempt.
        return ProviderUnavailable(
            f"Ark accepted the call but failed to generate the image ({code or 'no code'}): "
            f"{detail}{_rid(reply, detail)}",
            reason=RetryReason.SERVER_ERROR,
        )
    error_class, meaning = classify_status(status, _HTTP_ERRORS)
    if code in _TRANSIENT_CODES:
        error_class = ProviderUnavailable
    label = f"{meaning}, {code}" if code else meaning
    text = f"Ark answered HTTP {status} ({label})" + (f": {detail}" if detail else "") + _rid(reply, detail)
    wait_s = retry_after_s(reply.retry_after) if status in (429, 503) else None
    return error_class(text, retry_after_s=wait_s, reason=RetryReason.of_status(status))


def _moderation_subject(code: str) -> str | None:
    # Ark's codes: InputTextSensitiveContentDetected, OutputImageSensitiveContentDetected, the generic
    # SensitiveContentDetected[.Violence…] family, and Volcengine's InputTextRiskDetection and kin.
    if "SensitiveContentDetected" not in code and not code.endswith("RiskDetection"):
        return None
    for prefix, subject in _MODERATION_SUBJECTS.items():
        if code.startswith(prefix):
            return subject
    return "the request"


def _image_type(data: bytes, reply: _Reply) -> str:
    if not data:
        raise InvalidProviderResponse(f"Ark's image is empty (0 bytes){_rid(reply)}")
    try:
        # Reads the header only: enough to know the format; the worker decodes the pixels.
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidProviderResponse(
            f"Ark's {len(data)}-byte image is not a readable image{_rid(reply)}: {exc}"
        ) from exc
    content_type = _IMAGE_TYPES.get(image_format or "")
    if content_type is None:
        raise InvalidProviderResponse(f"Ark's image is {image_format}, not JPEG, PNG or WebP{_rid(reply)}")
    return content_type


def _rid(reply: _Reply, detail: str = "") -> str:
    # Ark's messages usually end with "Request id: …" already; the header is added only when they do not.
    if reply.request_id is None or reply.request_id in detail:
        return ""
    return f" (request id {reply.request_id})"


def _rank(error: ProviderError) -> tuple[float, ...]:
    # Moderation settles the job and names the reason; then other final verdicts; a transient failure
    # only when nothing else, and among those the longest wait the vendor asked for is the one to honour.
    if isinstance(error, ContentModerated):
        return (0, 0.0)
    if not error.retryable:
        return (1, 0.0)
    return (2, math.inf if error.retry_after_s is None else -error.retry_after_s)


def _ceil_sqrt(numerator: int, denominator: int) -> int:
    """The smallest integer n with n² ≥ numerator / denominator."""
    root = math.isqrt(numerator // denominator)
    while root * root * denominator < numerator:
        root += 1
    return root


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step

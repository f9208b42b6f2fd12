"""OpenAI GPT Image 1.5: one synchronous call per job, every variant through `n`.

Wire protocol: shared/provider-apis.md section 2. Without reference images the adapter posts JSON to
`/v1/images/generations`; with them it downloads each reference (OpenAI's edits endpoint takes the
image files themselves, not URLs) and posts them as repeated `image[]` parts of a multipart
`/v1/images/edits` call. OpenAI answers with the images inline as base64 and a `usage` object, from
which the exact cost is computed. There is no task to resume, so nothing is checkpointed: a retry is a
new call (and an answer lost in transit, e.g. to a dropped connection, may already have been billed).

GPT image models draw three sizes only (1024², 1536x1024, 1024x1536), never more than 1536 px on a
side: `native_size` picks the one whose aspect ratio is closest to the request, which may be smaller
than a large request; the worker then crops and upscales to the exact size asked for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp
from yarl import URL

from providers._http import (
    Reply,
    describe,
    json_object,
    most_telling,
    read_limited,
    seconds_until,
    shorten,
    sniff_content_type,
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
    "NATIVE_SIZES",
    "TOKEN_PRICES",
    "OpenAIProvider",
    "TokenPrices",
    "native_size",
    "usage_cost_usd_micros",
]

#: the sizes the GPT image models draw, (width, height)
NATIVE_SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))


@dataclass(frozen=True, kw_only=True)
class TokenPrices:
    """A GPT image model's token prices, in USD per million tokens (= USD micros per token)."""

    text_input: Decimal
    image_input: Decimal
    image_output: Decimal
    text_output: Decimal


#: token prices by vendor model id (shared/provider-apis.md section 2; the text output price is from
#: OpenAI's gpt-image-1.5 pricing, unverified like the others)
TOKEN_PRICES: Mapping[str, TokenPrices] = {
    "gpt-image-1.5": TokenPrices(
        text_input=Decimal(5), image_input=Decimal(8), image_output=Decimal(32), text_output=Decimal(10)
    ),
}

#: options passed through to both endpoints, and those only the edits endpoint knows
_COMMON_OPTIONS = ("quality", "background")
_GENERATION_OPTIONS = ("moderation",)
_EDIT_OPTIONS = ("input_fidelity",)
_MODERATION_CODES = ("moderation_blocked", "content_policy_violation")
_MODERATION_STAGES = {
    "input": "the prompt or a reference image (input moderation)",
    "output": "the generated image (output moderation)",
}
#: OpenAI's own limits on edit inputs
_MAX_REFERENCES = 16
_MAX_REFERENCE_BYTES = 50 * 1024 * 1024
_REFERENCE_FORMATS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
# Ten 1536x1024 PNGs in base64 stay well under this; a larger body is a fault, not images.
_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_MAX_DETAIL_CHARS = 400
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# OpenAI's 429 messages say "Please try again in 12s" (or "in 850ms") even without a Retry-After header.
_TRY_AGAIN_IN = re.compile(r"try again in (\d+(?:\.\d+)?)(ms|s)\b")


def native_size(model: str, width: int, height: int) -> tuple[int, int]:
    """Of `NATIVE_SIZES`, the one whose aspect ratio is closest to `width x height`: what to ask `model` for.

    Closeness is measured on the logarithm of the ratio, so that portrait and landscape are treated
    alike: the square size serves ratios between 1/sqrt(1.5) and sqrt(1.5) (about 0.816 to 1.225).
    The result can be smaller than the request (gpt-image-1.5 never draws more than 1536 px on a side).
    """
    spec = CATALOG.get(model)
    if spec is None or spec.vendor != "openai":
        raise ValueError(f"{model!r} is not an OpenAI model of the catalog")
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    # ratio > sqrt(3/2) ⇔ 2·w² > 3·h²: in integers, no request lands on the wrong side by rounding.
    if 2 * width * width > 3 * height * height:
        return (1536, 1024)
    if 2 * height * height > 3 * width * width:
        return (1024, 1536)
    return (1024, 1024)


def usage_cost_usd_micros(usage: object, prices: TokenPrices, *, input_is_images: bool = False) -> int | None:
    """The exact cost of an OpenAI `usage` object in USD micros (rounded up), or None if it is unreadable.

    Without `input_tokens_details`, the input is priced as text, or as images when `input_is_images`
    (an edit, where most input tokens are the images); without `output_tokens_details`, every output
    token is priced as an image token.
    """
    if not isinstance(usage, Mapping):
        return None
    input_tokens, output_tokens = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if input_tokens is None or output_tokens is None:
        return None
    text_in, image_in = _split(
        usage.get("input_tokens_details"), input_tokens, images_by_default=input_is_images
    )
    text_out, image_out = _split(usage.get("output_tokens_details"), output_tokens, images_by_default=True)
    if text_in is None or image_in is None or text_out is None or image_out is None:
        return None
    micros = (
        Fraction(prices.text_input) * text_in
        + Fraction(prices.image_input) * image_in
        + Fraction(prices.text_output) * text_out
        + Fraction(prices.image_output) * image_out
    )
    return math.ceil(micros)


class OpenAIProvider:
    """GPT Image 1.5 through OpenAI's own images API (no SDK)."""

    vendor = "openai"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        organization: str | None = None,
        project: str | None = None,
        references_session: aiohttp.ClientSession | None = None,
        max_reference_bytes: int = _MAX_REFERENCE_BYTES,
    ) -> None:
        self._session = session
        #: for callers' reference URLs: a session whose connector refuses non-public addresses
        self._references = references_session or session
        base = base_url.rstrip("/")
        self._generations_url = URL(f"{base}/v1/images/generations")
        self._edits_url = URL(f"{base}/v1/images/edits")
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        if organization:
            self._headers["OpenAI-Organization"] = organization
        if project:
            self._headers["OpenAI-Project"] = project
        self._max_reference_bytes = max_reference_bytes

    async def generate(self, request: GenerationRequest, checkpoint: Checkpoint) -> GenerationResult:
        """Produce `request.num_variants` images in one call (`n`); nothing to checkpoint for a sync API."""
        spec = CATALOG.get(request.model)
        if spec is None or spec.vendor != self.vendor:
            raise ProviderRejected(f"{request.model!r} is not an OpenAI model of the catalog")
        fields = _fields(request, spec.vendor_model)
        if request.reference_image_urls:
            if len(request.reference_image_urls) > _MAX_REFERENCES:
                raise ProviderRejected(
                    f"OpenAI's edits take at most {_MAX_REFERENCES} reference images, "
                    f"got {len(request.reference_image_urls)}"
                )
            fields.update({key: request.options[key] for key in _EDIT_OPTIONS if key in request.options})
            references = await self._fetch_references(request.reference_image_urls)
            reply = await self._post("edits", self._edits_url, data=_form(fields, references))
        else:
            fields.update(
                {key: request.options[key] for key in _GENERATION_OPTIONS if key in request.options}
            )
            reply = await self._post("generations", self._generations_url, json_body=fields)
        if not reply.ok:
            raise _http_error(reply)
        # Decoding megabytes of JSON and base64 is CPU work: keep it off the event loop.
        answer = await asyncio.to_thread(_parse_answer, reply, request.num_variants)
        prices = TOKEN_PRICES.get(spec.vendor_model)
        cost = (
            usage_cost_usd_micros(answer.usage, prices, input_is_images=bool(request.reference_image_urls))
            if prices is not None
            else None
        )
        refs: dict[str, Any] = {}
        if reply.request_id:
            refs["openai_request_id"] = reply.request_id
        if isinstance(answer.usage, Mapping):
            refs["openai_usage"] = dict(answer.usage)
        return GenerationResult(images=answer.images, cost_usd_micros=cost, vendor_refs=refs)

    async def _post(
        self,
        endpoint: str,
        url: URL,
        *,
        json_body: Mapping[str, Any] | None = None,
        data: aiohttp.FormData | None = None,
    ) -> _Reply:
        # No timeout of its own: GPT image calls take tens of seconds, and the session's timeout (and
        # the worker's job deadline) are the ones that apply.
        try:
            async with self._session.post(
                url, json=json_body, data=data, headers=self._headers, raise_for_status=False
            ) as response:
                raw = await read_limited(response, _MAX_RESPONSE_BYTES, f"answer to the {endpoint} call")
                headers = response.headers
                return _Reply(
                    endpoint=endpoint,
                    status=response.status,
                    raw=raw,
                    request_id=headers.get("x-request-id"),
                    retry_after_ms=headers.get("retry-after-ms"),
                    retry_after=headers.get("retry-after"),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"OpenAI {endpoint} call failed: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc

    async def _fetch_references(self, urls: Sequence[str]) -> list[_Reference]:
        # Every fetch runs to its end (no cancel on the first failure), so that the error reported does
        # not depend on which fetch failed first.
        outcomes = await asyncio.gather(
            *(self._fetch_reference(number, url) for number, url in enumerate(urls, 1)),
            return_exceptions=True,
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise most_telling(errors)
        return [outcome for outcome in outcomes if isinstance(outcome, _Reference)]

    async def _fetch_reference(self, number: int, url: str) -> _Reference:
        what = f"reference image {number} ({_short(url)})"
        try:
            # No Authorization header: the key is OpenAI's, not the image host's.
            async with self._references.get(
                URL(url, encoded=True),
                headers={"Accept": "image/png, image/jpeg, image/webp, image/*;q=0.8"},
                raise_for_status=False,
            ) as response:
                status = response.status
                if status == 429 or status >= 500:
                    raise ProviderUnavailable(
                        f"could not fetch {what}: HTTP {status}", reason=RetryReason.of_status(status)
                    )
                if not 200 <= status < 300:
                    raise ProviderRejected(f"could not fetch {what}: HTTP {status}")
                if not response.content_type.startswith("image/"):
                    raise ProviderRejected(
                        f"{what} is not an image (Content-Type {response.content_type or 'missing'})"
                    )
                data = await read_limited(response, self._max_reference_bytes, what, error=ProviderRejected)
        except aiohttp.InvalidURL as exc:  # the caller's mistake: no retry will fetch it
            raise ProviderRejected(f"{what} is not a URL that can be fetched ({exc})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"could not fetch {what}: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc
        content_type = sniff_content_type(data)
        if content_type not in _REFERENCE_FORMATS:
            raise ProviderRejected(
                f"{what} is not a PNG, JPEG or WebP image, the formats OpenAI's edits accept"
            )
        await asyncio.to_thread(check_reference_image, data, what)
        return _Reference(
            data=data,
            content_type=content_type,
            filename=f"reference-{number}.{_REFERENCE_FORMATS[content_type]}",
        )


@dataclass(frozen=True, kw_only=True)
class _Reference:
    data: bytes
    content_type: str
    filename: str


@dataclass(frozen=True, kw_only=True)
class _Reply(Reply):
    endpoint: str
    request_id: str | None
    retry_after_ms: str | None

    @property
    def error(self) -> Mapping[str, Any]:
        """The `error` object of OpenAI's envelope, or an empty mapping."""
        body = self.body
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}


@dataclass(frozen=True, kw_only=True)
class _Answer:
    images: tuple[ProviderImage, ...]
    usage: object


def _fields(request: GenerationRequest, vendor_model: str) -> dict[str, Any]:
    width, height = native_size(request.model, request.width, request.height)
    output_format = request.output_format if request.output_format in _CONTENT_TYPES else "png"
    if request.options.get("background") == "transparent" and output_format == "jpeg":
        # OpenAI refuses a transparent JPEG; the worker re-encodes anyway (flattening onto white).
        output_format = "png"
    # `model` always: generations default to dall-e-2 without it. Never `response_format`: GPT image
    # models refuse it, and always answer base64.
    fields: dict[str, Any] = {
        "model": vendor_model,
        "prompt": request.prompt,
        "n": request.num_variants,
        "size": f"{width}x{height}",
        "output_format": output_format,
    }
    fields.update({key: request.options[key] for key in _COMMON_OPTIONS if key in request.options})
    return fields


def _form(fields: Mapping[str, Any], references: Sequence[_Reference]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, str(value))
    for reference in references:
        # Repeated `image[]` parts, as OpenAI's SDKs send an array of files.
        form.add_field(
            "image[]", reference.data, filename=reference.filename, content_type=reference.content_type
        )
    return form


def _parse_answer(reply: _Reply, num_variants: int) -> _Answer:
    body = json_object(reply, vendor="OpenAI", stage=f"{reply.endpoint} call")
    data = body.get("data")
    if not isinstance(data, list) or not data:
        raise InvalidProviderResponse(
            f"OpenAI answered the {reply.endpoint} call with HTTP {reply.status} but no images (`data` is "
            f"{'empty' if isinstance(data, list) else 'missing'}){_request_id(reply)}"
        )
    if len(data) < num_variants:
        raise InvalidProviderResponse(
            f"OpenAI returned {len(data)} of the {num_variants} images asked for{_request_id(reply)}"
        )
    declared = _CONTENT_TYPES.get(str(body.get("output_format")))
    images = tuple(_image(item, index, declared, reply) for index, item in enumerate(data[:num_variants]))
    return _Answer(images=images, usage=body.get("usage"))


def _image(item: object, index: int, declared: str | None, reply: _Reply) -> ProviderImage:
    encoded = item.get("b64_json") if isinstance(item, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise InvalidProviderResponse(
            f"OpenAI's image {index + 1} has no b64_json (GPT image models never answer with a URL)"
            f"{_request_id(reply)}"
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidProviderResponse(f"OpenAI's image {index + 1} is not valid base64: {exc}") from exc
    content_type = sniff_content_type(data)
    if content_type == "application/octet-stream":
        if declared is None:
            raise InvalidProviderResponse(
                f"OpenAI's image {index + 1} ({len(data)} bytes) is neither PNG, JPEG nor WebP"
                f"{_request_id(reply)}"
            )
        content_type = declared
    return ProviderImage(data=data, content_type=content_type)


def _http_error(reply: _Reply) -> ProviderError:
    status, error = reply.status, reply.error
    code, kind = error.get("code"), error.get("type")
    detail = _error_detail(reply)
    where = f"OpenAI answered HTTP {status} to the {reply.endpoint} call"
    if code in _MODERATION_CODES:
        details = error.get("moderation_details")
        stage = details.get("moderation_stage") if isinstance(details, dict) else None
        what = _MODERATION_STAGES.get(str(stage), "the request (OpenAI did not say at which stage)")
        return ContentModerated(f"OpenAI's safety system refused {what} ({code}): {detail}")
    if status == 429 and "insufficient_quota" in (code, kind):
        # Not throttling: the account has no credit left, and retrying will not add any.
        return ProviderAuthError(f"{where} (insufficient_quota: no credit left): {detail}")
    if status in (401, 403):
        return ProviderAuthError(f"{where} ({code or 'unauthorised'}): {detail}")
    if status in (408, 409, 429) or status >= 500:
        meaning = "rate limited" if status == 429 else code or kind or "server error"
        return ProviderUnavailable(
            f"{where} ({meaning}): {detail}",
            retry_after_s=_retry_after_s(reply),
            reason=RetryReason.of_status(status),
        )
    if 400 <= status < 500:
        return ProviderRejected(f"{where} ({code or kind or 'client error'}): {detail}")
    return InvalidProviderResponse(f"{where} (unexpected status): {detail}")


def _error_detail(reply: _Reply) -> str:
    message = reply.error.get("message")
    param = reply.error.get("param")
    text = message if isinstance(message, str) and message else reply.raw.decode("utf-8", "replace").strip()
    if isinstance(param, str) and param and f"'{param}'" not in text:
        text = f"{text} (param: {param})"
    return text[:_MAX_DETAIL_CHARS] + _request_id(reply)


def _retry_after_s(reply: _Reply) -> float | None:
    # The order OpenAI's SDKs read them in: retry-after-ms, then Retry-After (seconds or an HTTP date).
    if reply.retry_after_ms is not None:
        milliseconds = _finite(reply.retry_after_ms)
        if milliseconds is not None:
            return max(0.0, milliseconds / 1000)
    if reply.retry_after is not None:
        seconds = _finite(reply.retry_after)
        if seconds is not None:
            return max(0.0, seconds)
        until = seconds_until(reply.retry_after)
        if until is not None:
            return until
    message = reply.error.get("message")
    match = _TRY_AGAIN_IN.search(message) if isinstance(message, str) else None
    if match is not None:
        value = float(match.group(1))
        return value / 1000 if match.group(2) == "ms" else value
    return None


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _split(details: object, total: int, *, images_by_default: bool) -> tuple[int | None, int | None]:
    """(text tokens, image tokens) of a usage total, from its `*_tokens_details` when present."""
    text: int | None = 0
    image: int | None = 0
    if isinstance(details, Mapping):
        text_value, image_value = details.get("text_tokens"), details.get("image_tokens")
        text = 0 if text_value is None else _count(text_value)
        image = 0 if image_value is None else _count(image_value)
    if text is None or image is None:
        return None, None
    # Tokens the breakdown does not account for are priced in the total's usual kind, never dropped.
    rest = max(0, total - text - image)
    return (text, image + rest) if images_by_default else (text + rest, image)


def _request_id(reply: _Reply) -> str:
    return f" [request {reply.request_id}]" if reply.request_id else ""


def _short(url: str) -> str:
    # Signed URLs carry long query strings; the host and path are enough to recognise the image.
    return shorten(str(URL(url, encoded=True).with_query(None).with_fragment(None)), 120)

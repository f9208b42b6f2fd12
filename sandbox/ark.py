"""BytePlus ModelArk images API (Seedream 4.0 / 4.5) as the sandbox plays it (provider-apis.md section 3).

API host (`Sandbox.base_url`):
- `POST /api/v3/images/generations` with `Authorization: Bearer <key>` and a JSON body (`model`, `prompt`,
  `size`, `image`, `response_format`, `watermark`, `sequential_image_generation`,
  `sequential_image_generation_options`, `stream`, `optimize_prompt_options`) → synchronously, after the
  sandbox's latency plus `[sandbox:slow=S]`, `{"model", "created", "data": [{"url", "size"}], "usage":
  {"generated_images", "output_tokens", "total_tokens"}}`, or `b64_json` instead of `url`, or with
  `stream: true` a text/event-stream of `image_generation.partial_succeeded` / `partial_failed` events, one
  `image_generation.completed` event and `data: [DONE]`.
- Errors use Ark's envelope `{"error": {"code", "message", "param", "type"}}`; every message ends with
  "Request id: <id>", the id also sent as `X-Request-Id`. Per-image failures (output moderation, an
  internal error) arrive inside a 200 as `data: [{"error": {"code", "message"}}]`, not billed.

Cluster host (`Sandbox.cluster_url`):
- `GET /delivery/ark/{image id}.jpeg?se=...&sig=...` → the JPEG, no key (see `app.py`); a link is valid for
  24 hours after the image is generated, as Ark documents.

Size rules, as documented: 4.0 takes "1K" / "2K" / "4K" or "WxH" (lowercase x) with w·h in [921,600,
16,777,216] and w/h in [1/16, 16]; 4.5 takes "2K" / "4K" or "WxH" with w·h in [3,686,400, 16,777,216]
and the same ratio. Omitted size: 2048x2048. Output is always JPEG. `watermark` defaults to true and
draws "AI generated" in the bottom-right corner.

Choices where the real API is undocumented or unverified (adapters must tolerate the other reading):
- Model ids: BytePlus `seedream-4-0-250828` / `seedream-4-5-251128` and Volcengine's `doubao-` ids; any
  other model is a 404 `InvalidEndpointOrModel.NotFound` (custom `ep-…` endpoint ids are not played).
- A missing, non-Bearer or wrong key: 401 `AuthenticationError` (type `Unauthorized`), the message of
  Ark's public error-code table. A body that is not a JSON object: 400 `InvalidParameter`, param "".
- Validation stops at the first bad field (400 `InvalidParameter` or `MissingParameter`, `param` naming
  the field); message wording past "The parameter `x` specified in the request is not valid" is ours.
  Unknown fields (`seed`, `n`, `guidance_scale`) are ignored, as the 4.x docs only say they are
  unsupported. Sizes "1K" / "2K" / "4K" become 1024², 2048², 4096² (the real model picks an aspect
  ratio from the prompt). Sizes need not be multiples of anything.
- References (`image`) are never fetched: an http(s) URL or a `data:image/<lowercase format>;base64,`
  URI is accepted as is, up to 14; an upper-case format in a data URI is refused (documented quirk).
- `sequential_image_generation: "auto"` makes `max_images` images (default 15), capped so that
  references plus outputs are at most 15.
- Faults: `[sandbox:moderated]` → 400 `InputTextSensitiveContentDetected`; `[sandbox:moderated-output]`
  → a 200 whose image items are `OutputImageSensitiveContentDetected` errors; `[sandbox:rate-limited]`
  → 429 `RateLimitExceeded.EndpointIPMExceeded` (type `TooManyRequests`), with `Retry-After: S` only
  when the tag carries `=S` (whether Ark sends Retry-After is unverified); `[sandbox:server-error]` →
  500 `InternalServiceError`; `[sandbox:down]` → 503 `ServiceUnavailable`; `[sandbox:no-credits]` →
  403 `AccountOverdueError`; `[sandbox:error]` → a 200 whose first item is an `InternalServiceError`
  (and, as documented for batches, no further image is made); `[sandbox:no-image]` → a 200 with
  `data: []`; `[sandbox:malformed]` → a 200 with a truncated JSON body; `[sandbox:disconnect]` → the
  connection drops mid-body once per prompt; `[sandbox:expired-url]` → an already expired link.
  Refusals (401, 400, 403, 429, 500, 503) are answered at once, before the generation delay.
- No images-per-minute limit (BytePlus quotes 500 IPM) is enforced.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from sandbox.drawing import draw_placeholder
from sandbox.faults import Faults, drop_connection, parse_faults, strip_fault_tags

if TYPE_CHECKING:
    from sandbox.app import Sandbox

__all__ = ["MAX_PIXELS", "URL_TTL_S", "ArkApi", "ArkImage", "SeedreamRules", "output_tokens", "render_image"]

VENDOR = "ark"
#: how long an image link stays valid after generation (Ark: 24 hours)
URL_TTL_S = 24 * 3600
#: the largest WxH either model accepts (4096 x 4096)
MAX_PIXELS = 4096 * 4096
_MAX_RATIO = 16
_MAX_REFERENCES = 14
_MAX_IMAGES_PER_REQUEST = 15
_DEFAULT_SIZE = "2048x2048"
_TIER_SIDES = {"1K": 1024, "2K": 2048, "4K": 4096}
_SIZE = re.compile(r"([0-9]+)x([0-9]+)")
_DATA_URI = re.compile(r"data:image/([A-Za-z]+);base64,")
_IMAGE_FORMATS = ("jpeg", "jpg", "png", "webp", "bmp", "tiff", "gif")
_WATERMARK_TEXT = "AI generated"
_KEPT_REQUESTS = 256


@dataclass(frozen=True, kw_only=True)
class SeedreamRules:
    """What one Seedream model accepts."""

    #: the version's name in messages, e.g. "seedream-4.5"
    name: str
    tiers: tuple[str, ...]
    min_pixels: int
    prompt_modes: tuple[str, ...]


_SEEDREAM_4 = SeedreamRules(
    name="seedream-4.0", tiers=("1K", "2K", "4K"), min_pixels=1280 * 720, prompt_modes=("standard", "fast")
)
_SEEDREAM_4_5 = SeedreamRules(
    name="seedream-4.5", tiers=("2K", "4K"), min_pixels=2560 * 1440, prompt_modes=("standard",)
)
_MODELS: Mapping[str, SeedreamRules] = {
    "seedream-4-0-250828": _SEEDREAM_4,
    "doubao-seedream-4-0-250828": _SEEDREAM_4,
    "seedream-4-5-251128": _SEEDREAM_4_5,
    "doubao-seedream-4-5-251128": _SEEDREAM_4_5,
}

# Each refusal: HTTP status, error type, and the message before " Request id: ...".
_AUTHENTICATION = (401, "Unauthorized", "The API key or AK/SK in the request is missing or invalid.")
_OVERDUE = (403, "Forbidden", "The request failed because your account has an overdue balance.")
_INPUT_MODERATED = (
    400,
    "BadRequest",
    "The request failed because the input text may contain sensitive information.",
)
_RATE_LIMITED = (
    429,
    "TooManyRequests",
    "The request has exceeded the images per minute (IPM) limit of the endpoint. Please try again later.",
)
_INTERNAL = (500, "InternalServerError", "The service encountered an unexpected internal error.")
_UNAVAILABLE = (503, "ServiceUnavailable", "The service is temporarily unavailable. Please try again later.")
_OUTPUT_MODERATED_MESSAGE = "The request failed because the output image may contain sensitive information."


@dataclass(frozen=True, kw_only=True)
class ArkImage:
    """One generated image, as the sandbox remembers it to draw it when downloaded."""

    id: str
    prompt: str
    #: the placeholder's seed (Seedream 4.x takes none: the sandbox picks one per image)
    seed: int
    width: int
    height: int
    #: position in its request's batch
    index: int
    watermark: bool
    #: wall-clock generation time (the link expires `URL_TTL_S` later)
    created: float


@dataclass(frozen=True, kw_only=True)
class _Inputs:
    model: str
    rules: SeedreamRules
    prompt: str
    width: int
    height: int
    references: tuple[str, ...]
    response_format: str
    watermark: bool
    count: int
    stream: bool


class _Refused(Exception):
    """A request Ark answers with an error envelope."""

    def __init__(
        self,
        status: int,
        kind: str,
        code: str,
        message: str,
        param: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.message, self.param = status, kind, code, message, param
        self.headers = dict(headers or {})


class ArkApi:
    """ModelArk's image-generation route, and the images it made, inside one Sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        #: the JSON bodies of the latest authenticated requests, oldest first (for tests; bounded, since
        #: bodies may carry megabytes of base64 references)
        self.requests: deque[dict[str, Any]] = deque(maxlen=_KEPT_REQUESTS)
        #: every image generated, by id
        self.images: dict[str, ArkImage] = {}
        #: generation requests being answered right now
        self.in_flight = 0
        #: the most generation requests there ever were in flight at once
        self.peak_in_flight = 0
        sandbox.register_delivery(VENDOR, self._render)

    def api_routes(self) -> list[web.RouteDef]:
        """Routes served on the sandbox's API host."""
        return [web.post("/api/v3/images/generations", self._generate)]

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        request_id = _request_id()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response = await self._answer(request, request_id)
        except _Refused as refusal:
            response = _refusal(refusal, request_id)
        finally:
            self.in_flight -= 1
        self._sandbox.counters["ark.generate" if response.status == 200 else "ark.generate_refused"] += 1
        return response

    async def _answer(self, request: web.Request, request_id: str) -> web.StreamResponse:
        self._check_key(request)
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = "The request body is not a valid JSON object."
            raise _Refused(400, "BadRequest", "InvalidParameter", message)
        self.requests.append(body)
        inputs = _validate_body(body)

        faults = parse_faults(inputs.prompt)
        sandbox = self._sandbox
        if faults.down:
            raise _refused("ServiceUnavailable", _UNAVAILABLE)
        if faults.no_credits:
            raise _refused("AccountOverdueError", _OVERDUE)
        if faults.moderated:
            raise _refused("InputTextSensitiveContentDetected", _INPUT_MODERATED)
        if faults.rate_limited and sandbox.first_time(VENDOR, "rate-limited", inputs.prompt):
            retry_after = faults.rate_limited_retry_after_s
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            raise _refused("RateLimitExceeded.EndpointIPMExceeded", _RATE_LIMITED, headers)
        if faults.server_error and sandbox.first_time(VENDOR, "server-error", inputs.prompt):
            raise _refused("InternalServiceError", _INTERNAL)

        delay = sandbox.latency_s + faults.slow_s
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {"X-Request-Id": request_id}
        if faults.disconnect and sandbox.first_time(VENDOR, "disconnect", inputs.prompt):
            return await drop_connection(request, b'{"model": "', promised=4096, headers=headers)
        if faults.malformed:
            return web.Response(
                text=f'{{"model": "{inputs.model}", "created": {int(time.time())}, "data": [{{"url": "ht',
                content_type="application/json",
                headers=headers,
            )
        created = time.time()
        items = self._make_images(inputs, faults, created, request_id)
        if inputs.stream:
            return await self._stream(request, inputs, items, faults, created, headers)
        data = [await self._item(inputs, item, faults) for item in items]
        return web.json_response(
            {"model": inputs.model, "created": int(created), "data": data, "usage": _usage(items)},
            headers=headers,
        )

    def _check_key(self, request: web.Request) -> None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        key = presented.strip() if scheme.lower() == "bearer" else None
        if self._sandbox.check_key(key) != "accepted":
            raise _refused("AuthenticationError", _AUTHENTICATION)

    def _make_images(
        self, inputs: _Inputs, faults: Faults, created: float, request_id: str
    ) -> list[ArkImage | _Failure]:
        items: list[ArkImage | _Failure] = []
        if faults.no_image:
            return items
        for index in range(inputs.count):
            if faults.error:
                # Ark documents that an internal error stops the batch: no further image is made.
                message = f"{_INTERNAL[2]} Request id: {request_id}"
                items.append(_Failure(code="InternalServiceError", message=message))
                break
            if faults.moderated_output:
                message = f"{_OUTPUT_MODERATED_MESSAGE} Request id: {request_id}"
                items.append(_Failure(code="OutputImageSensitiveContentDetected", message=message))
                continue
            image = ArkImage(
                id=uuid.uuid4().hex,
                prompt=inputs.prompt,
                seed=secrets.randbelow(2**31),
                width=inputs.width,
                height=inputs.height,
                index=index,
                watermark=inputs.watermark,
                created=created,
            )
            self.images[image.id] = image
            items.append(image)
        return items

    async def _item(self, inputs: _Inputs, item: ArkImage | _Failure, faults: Faults) -> dict[str, Any]:
        if isinstance(item, _Failure):
            return {"error": {"code": item.code, "message": item.message}}
        size = f"{item.width}x{item.height}"
        if inputs.response_format == "b64_json":
            data = await asyncio.to_thread(render_image, item)
            return {"b64_json": base64.b64encode(data).decode("ascii"), "size": size}
        expires_at = item.created - 1 if faults.expired_url else item.created + URL_TTL_S
        url = self._sandbox.signed_url(VENDOR, f"{item.id}.jpeg", expires_at=expires_at)
        return {"url": url, "size": size}

    async def _stream(
        self,
        request: web.Request,
        inputs: _Inputs,
        items: Sequence[ArkImage | _Failure],
        faults: Faults,
        created: float,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for index, item in enumerate(items):
            answer = await self._item(inputs, item, faults)
            if isinstance(item, _Failure):
                event = {"type": "image_generation.partial_failed", "image_index": index, **answer}
            else:
                event = {
                    "type": "image_generation.partial_succeeded",
                    "model": inputs.model,
                    "created": int(created),
                    "image_index": index,
                    **answer,
                }
            await response.write(_event(event))
        completed = {
            "type": "image_generation.completed",
            "model": inputs.model,
            "created": int(created),
            "usage": _usage(items),
        }
        await response.write(_event(completed))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _render(self, name: str) -> tuple[bytes, str] | None:
        image_id, _, extension = name.partition(".")
        image = self.images.get(image_id)
        if image is None or extension != "jpeg":
            return None
        return render_image(image), "image/jpeg"


@dataclass(frozen=True, kw_only=True)
class _Failure:
    code: str
    message: str


def output_tokens(sizes: Sequence[tuple[int, int]]) -> int:
    """Ark's token count for generated images: round(Σ w·h / 256)."""
    return round(sum(width * height for width, height in sizes) / 256)


def render_image(image: ArkImage) -> bytes:
    """Draw `image` as the JPEG Ark delivers, watermarked in the bottom-right corner if asked."""
    data = draw_placeholder(
        prompt=strip_fault_tags(image.prompt),
        seed=image.seed,
        width=image.width,
        height=image.height,
        variant=image.index,
    )
    if not image.watermark:
        return data
    with Image.open(io.BytesIO(data)) as decoded:
        picture = decoded.convert("RGB")
    draw = ImageDraw.Draw(picture)
    size = max(10, min(image.width, image.height) // 28)
    font = ImageFont.load_default(size=size)
    margin = max(4, size // 2)
    draw.text(
        (image.width - margin, image.height - margin),
        _WATERMARK_TEXT,
        font=font,
        anchor="rd",
        fill=(255, 255, 255),
        stroke_width=max(1, size // 10),
        stroke_fill=(0, 0, 0),
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _validate_body(body: Mapping[str, Any]) -> _Inputs:
    """Check a generation body as Ark does, refusing at the first bad field."""
    model = body.get("model")
    if model is None or model == "":
        raise _missing("model")
    if not isinstance(model, str):
        raise _invalid("model", "must be a string")
    rules = _MODELS.get(model)
    if rules is None:
        raise _Refused(
            404,
            "NotFound",
            "InvalidEndpointOrModel.NotFound",
            f"The model or endpoint {model} does not exist or you do not have access to it.",
        )
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise _missing("prompt")
    if not isinstance(prompt, str):
        raise _invalid("prompt", "must be a string")
    width, height = _size(body.get("size", _DEFAULT_SIZE), rules)
    references = _references(body.get("image"))
    response_format = _choice(body, "response_format", ("url", "b64_json"), "url")
    watermark = _boolean(body, "watermark", default=True)
    stream = _boolean(body, "stream", default=False)
    sequential = _choice(body, "sequential_image_generation", ("auto", "disabled"), "disabled")
    count = 1
    if sequential == "auto":
        count = min(_max_images(body), _MAX_IMAGES_PER_REQUEST - len(references))
    _prompt_mode(body, rules)
    return _Inputs(
        model=model,
        rules=rules,
        prompt=prompt,
        width=width,
        height=height,
        references=references,
        response_format=response_format,
        watermark=watermark,
        count=count,
        stream=stream,
    )


def _size(value: object, rules: SeedreamRules) -> tuple[int, int]:
    if not isinstance(value, str):
        raise _invalid("size", "must be a string such as 2048x2048")
    if value in _TIER_SIDES:
        if value not in rules.tiers:
            tiers = ", ".join(rules.tiers)
            raise _invalid("size", f"{rules.name} supports the resolutions {tiers}, not {value}")
        return _TIER_SIDES[value], _TIER_SIDES[value]
    match = _SIZE.fullmatch(value)
    if match is None:
        tiers = ", ".join(rules.tiers)
        raise _invalid("size", f"{value!r} is neither one of {tiers} nor <width>x<height> with a lowercase x")
    width, height = int(match[1]), int(match[2])
    pixels = width * height
    if width == 0 or height == 0 or not rules.min_pixels <= pixels <= MAX_PIXELS:
        raise _invalid(
            "size",
            f"{rules.name} requires total pixels (width*height) in [{rules.min_pixels}, {MAX_PIXELS}], "
            f"got {value} = {pixels}",
        )
    if not 1 / _MAX_RATIO <= width / height <= _MAX_RATIO:
        raise _invalid("size", f"the aspect ratio (width/height) must be in [1/16, 16], got {value}")
    return width, height


def _references(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    images = [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise _invalid("image", "must be a URL or data URI, or a non-empty array of them")
    if len(images) > _MAX_REFERENCES:
        reason = f"at most {_MAX_REFERENCES} reference images are supported, got {len(images)}"
        raise _invalid("image", reason)
    for image in images:
        if image.startswith(("http://", "https://")):
            continue
        match = _DATA_URI.match(image)
        if match is None:
            raise _invalid("image", "each image must be an http(s) URL or data:image/<format>;base64,<data>")
        image_format = match[1]
        if image_format != image_format.lower():
            raise _invalid("image", f"the image format in a data URI must be lowercase, got {image_format!r}")
        if image_format not in _IMAGE_FORMATS:
            raise _invalid("image", f"unsupported image format {image_format!r}")
    return tuple(images)


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise _invalid(name, f"must be one of {', '.join(allowed)}, got {value!r}")
    assert isinstance(value, str)
    return value


def _boolean(body: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(name, f"must be a boolean, got {value!r}")
    return value


def _max_images(body: Mapping[str, Any]) -> int:
    options = body.get("sequential_image_generation_options")
    if options is None:
        return _MAX_IMAGES_PER_REQUEST
    if not isinstance(options, dict):
        raise _invalid("sequential_image_generation_options", "must be an object")
    value = options.get("max_images", _MAX_IMAGES_PER_REQUEST)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_IMAGES_PER_REQUEST:
        name = "sequential_image_generation_options.max_images"
        raise _invalid(name, f"must be an integer in [1, {_MAX_IMAGES_PER_REQUEST}], got {value!r}")
    return value


def _prompt_mode(body: Mapping[str, Any], rules: SeedreamRules) -> None:
    options = body.get("optimize_prompt_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise _invalid("optimize_prompt_options", "must be an object")
    mode = options.get("mode", "standard")
    if mode not in rules.prompt_modes:
        raise _invalid(
            "optimize_prompt_options.mode",
            f"{rules.name} supports the modes {', '.join(rules.prompt_modes)}, not {mode!r}",
        )


def _usage(items: Sequence[ArkImage | _Failure]) -> dict[str, int]:
    images = [item for item in items if isinstance(item, ArkImage)]
    tokens = output_tokens([(image.width, image.height) for image in images])
    return {"generated_images": len(images), "output_tokens": tokens, "total_tokens": tokens}


def _missing(param: str) -> _Refused:
    message = f"The request failed because it is missing one or multiple required parameters: {param}."
    return _Refused(400, "BadRequest", "MissingParameter", message, param)


def _invalid(param: str, reason: str) -> _Refused:
    message = f"The parameter `{param}` specified in the request is not valid: {reason}."
    return _Refused(400, "BadRequest", "InvalidParameter", message, param)


def _refused(code: str, refusal: tuple[int, str, str], headers: Mapping[str, str] | None = None) -> _Refused:
    status, kind, message = refusal
    return _Refused(status, kind, code, message, headers=headers)


def _refusal(refusal: _Refused, request_id: str) -> web.Response:
    error = {
        "code": refusal.code,
        "message": f"{refusal.message} Request id: {request_id}",
        "param": refusal.param,
        "type": refusal.kind,
    }
    headers = {"X-Request-Id": request_id, **refusal.headers}
    return web.json_response({"error": error}, status=refusal.status, headers=headers)


def _request_id() -> str:
    # Ark's ids: "02", a millisecond timestamp, then hex.
    return f"02{int(time.time() * 1000)}{secrets.token_hex(12)}"


def _event(payload: Mapping[str, Any]) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

"""OpenAI's images API for the GPT image models as the sandbox plays it (shared/provider-apis.md section 2).

API host (`Sandbox.base_url`), both routes with `Authorization: Bearer <key>`:
- `POST /v1/images/generations`, a JSON body → `{"created", "background", "data": [{"b64_json",
  "revised_prompt"}], "output_format", "quality", "size", "usage"}`; with `"stream": true`, server-sent
  events `image_generation.partial_image` (`partial_images` of them per image) and
  `image_generation.completed` (one per image, carrying `usage`).
- `POST /v1/images/edits`, multipart/form-data with the images as `image` or repeated `image[]` file
  parts (png, jpeg or webp, < 50 MB each, at most 16) and the other fields as text parts → the same
  answer (`image_edit.*` events when streaming).
Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, one error per answer,
and every answer carries an `x-request-id` and `openai-processing-ms` header.

What is validated, as OpenAI answers it (400 unless stated):
- No key, or an Authorization header that is not Bearer: 401 "You didn't provide an API key. ..."
  (`code: null`); a wrong key: 401 `invalid_api_key` "Incorrect API key provided: sk-*****wxyz. ...".
- Unknown fields (`response_format`, `style` and anything else outside the GPT image parameters):
  `unknown_parameter`; a missing or empty `prompt`: `missing_required_parameter` / `empty_string`; a prompt
  over 32,000 characters: `string_above_max_length`; wrong JSON types: `invalid_type`; `n` outside 1-10:
  `integer_below_min_value` / `integer_above_max_value`; a value outside its set (`size`, `quality`,
  `background`, `output_format`, `moderation`, `input_fidelity`, `model`): `invalid_value` with OpenAI's
  "Invalid value: '1254x836'. Supported values are: '1024x1024', '1024x1536', '1536x1024', and 'auto'."
- A body that is not JSON: OpenAI's "We could not parse the JSON body of your request. ..." (no code).

Faults (`sandbox/faults.py`), checked after validation, in this order:
- `[sandbox:down]`: 503 `server_error` on every call. `[sandbox:no-credits]`: 429 `insufficient_quota`
  on every call (OpenAI has no 402). `[sandbox:rate-limited]`: 429 `rate_limit_exceeded` (type
  `requests`) on the first call with this prompt; `=S` adds `retry-after: ⌈S⌉`, `retry-after-ms: S·1000`
  and "Please try again in Ss." to the message. `[sandbox:server-error]`: 500 `server_error` on the first
  call. `[sandbox:error]`: 500 `server_error` on every call. `[sandbox:moderated]`: 400
  `moderation_blocked` (type `image_generation_user_error`, `safety_violations=[violence]`) at once.
- Then the call takes `Sandbox.latency_s` plus `[sandbox:slow=S]` seconds, after which
  `[sandbox:moderated-output]` answers 400 `moderation_blocked` with `safety_violations=[sexual]` and
  `"moderation_details": {"moderation_stage": "output", "categories": ["sexual"]}`;
  `[sandbox:malformed]` answers 200 with a JSON body cut short; `[sandbox:disconnect]` sends the headers
  and part of the body of the first call with this prompt, then closes the connection;
  `[sandbox:no-image]` answers 200 with `"data": []`. `[sandbox:expired-url]` does not apply (no URLs).

Choices where the real API is undocumented or unverified (adapters must tolerate the other reading):
- Models: only the GPT image models (`gpt-image-1.5`, `gpt-image-1`, `gpt-image-1-mini`,
  `chatgpt-image-latest`) are served. DALL·E models, and generations without `model` (which OpenAI
  sends to dall-e-2), are refused with 400 `invalid_value` on `model`: the sandbox does not play DALL·E.
- Output tokens per image follow the gpt-image token table for every model: 1024x1024 low 272 /
  medium 1056 / high 4160, 1024x1536 and 1536x1024 low 408 / medium 1584 / high 6240; quality `auto`
  is answered (and counted) as `high`, background `auto` as `opaque`, size `auto` as 1024x1024 for
  generations and as the native size closest to the first image's aspect ratio for edits.
- Input text tokens are ⌈UTF-8 bytes of the prompt / 4⌉ (OpenAI tokenises; the sandbox estimates).
  Input image tokens per edit image use the GPT-4o vision rule (fit in 2048², shortest side scaled
  down to 768, 85 + 170 per 512-px tile); `input_fidelity=high` adds 4160 (square) or 6240 tokens.
  `output_tokens_details` is `{"image_tokens": output_tokens, "text_tokens": 0}`.
- `background=transparent` with `output_format=jpeg` is 400 `invalid_value` on `background` (OpenAI
  refuses it; its exact wording is unverified). A transparent image is drawn with a transparent margin.
- Edit uploads: a part that is not image/png, image/jpeg or image/webp is 400
  `unsupported_file_mimetype`, one Pillow cannot read is 400 `invalid_image_file`, 50 MB or more is 400
  `file_too_large`, more than 16 is 400 `array_above_max_length` (codes and wording unverified). The
  sandbox takes request bodies up to 64 MB in all (`app.py`), less than 16 images of 50 MB.
- Input moderation carries no `moderation_details` (seen only on output refusals, and only via Codex).
- `revised_prompt` is null. `output_compression` is validated (0-100) but does not change the encoding.
  No `x-ratelimit-*` headers (their presence on the images endpoints is unverified).
- The images are placeholders: the prompt's words without fault tags, seeded by `placeholder_seed(prompt)`
  (OpenAI takes no seed), variant `i` for the i-th image, so tests can predict the bytes.
- Edits accept multipart only (the newer JSON `images: [{"image_url"}]` form is refused with OpenAI's
  Content-Type error); `mask` is accepted and ignored. Streaming applies the input faults (answered as
  plain JSON errors before the stream starts) and output moderation, but not malformed, disconnect or
  no-image; with n > 1 the whole call's `usage` rides on the last `completed` event, the others carry null.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from sandbox.drawing import draw_placeholder
from sandbox.faults import Faults, drop_connection, parse_faults, strip_fault_tags

if TYPE_CHECKING:
    from multidict import MultiDictProxy

    from sandbox.app import Sandbox

__all__ = [
    "GPT_IMAGE_MODELS",
    "SIZES",
    "ApiError",
    "ImageParams",
    "OpenAIApi",
    "RecordedRequest",
    "UploadedImage",
    "input_image_tokens",
    "output_tokens_per_image",
    "placeholder_seed",
    "validate_edit",
    "validate_generation",
]

VENDOR = "openai"
#: the models the sandbox plays
GPT_IMAGE_MODELS = ("gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini", "chatgpt-image-latest")
#: the sizes the GPT image models draw (besides "auto"), in the order OpenAI's error message lists them
SIZES = ("1024x1024", "1024x1536", "1536x1024")
_KNOWN_MODELS = (*GPT_IMAGE_MODELS, "dall-e-2", "dall-e-3")
_QUALITIES = ("low", "medium", "high", "auto")
_BACKGROUNDS = ("transparent", "opaque", "auto")
_OUTPUT_FORMATS = ("png", "jpeg", "webp")
_MODERATIONS = ("low", "auto")
_INPUT_FIDELITIES = ("high", "low")
_MAX_PROMPT_CHARS = 32_000
_MAX_IMAGES = 16
_MAX_IMAGE_BYTES = 50 * 1024 * 1024
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
_GENERATION_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "background",
        "output_format",
        "output_compression",
        "moderation",
        "user",
        "stream",
        "partial_images",
    }
)
_EDIT_FIELDS = frozenset(
    {
        "image",
        "image[]",
        "mask",
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "background",
        "output_format",
        "output_compression",
        "input_fidelity",
        "user",
        "stream",
        "partial_images",
    }
)
_OUTPUT_TOKENS = {
    ("square", "low"): 272,
    ("square", "medium"): 1056,
    ("square", "high"): 4160,
    ("rectangle", "low"): 408,
    ("rectangle", "medium"): 1584,
    ("rectangle", "high"): 6240,
}
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_KEYS_PAGE = "https://platform.openai.com/account/api-keys"
_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if "
    "you're accessing the API from your browser and are prompted for a username and password. You can "
    f"obtain an API key from {_KEYS_PAGE}."
)
_UNPARSABLE_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you "
    "have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)
_INPUT_VIOLATIONS = ("violence",)
_OUTPUT_VIOLATIONS = ("sexual",)


class ApiError(Exception):
    """An error answer in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": type, "param": param, "code": code, **(extra or {})}
        }
        self.headers = dict(headers or {})


@dataclass(frozen=True, kw_only=True)
class UploadedImage:
    """One image file of an edit request."""

    #: the multipart field it came in ("image" or "image[]")
    field_name: str
    filename: str | None
    content_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int


@dataclass(frozen=True, kw_only=True)
class ImageParams:
    """A validated generation or edit request."""

    model: str
    prompt: str
    n: int
    #: as requested: one of `SIZES` or "auto"
    size: str
    quality: str
    background: str
    output_format: str
    output_compression: int | None
    moderation: str
    stream: bool
    partial_images: int
    input_fidelity: str
    images: tuple[UploadedImage, ...] = ()


@dataclass(kw_only=True)
class RecordedRequest:
    """One call as the sandbox received it (after the key check), kept for tests to inspect."""

    #: "generations" or "edits"
    endpoint: str
    #: the Authorization header as sent
    authorization: str | None
    content_type: str
    #: the JSON body, or the multipart text fields (a list where a field was repeated); None if unreadable
    fields: Mapping[str, Any] | None
    #: the uploaded image files of an edit, in order
    images: tuple[UploadedImage, ...] = ()
    #: the HTTP status answered
    status: int = 0
    #: the `usage` object of a successful answer
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class _Rendered:
    size: tuple[int, int]
    quality: str
    background: str
    images: tuple[str, ...]
    partials: tuple[tuple[str, ...], ...] = field(default_factory=tuple)


class OpenAIApi:
    """OpenAI's image routes and the calls they received, inside one Sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        #: every call that got past the key check, oldest first
        self.requests: list[RecordedRequest] = []

    def api_routes(self) -> list[web.RouteDef]:
        """Routes served on the sandbox's API host."""
        return [
            web.post("/v1/images/generations", self._generations),
            web.post("/v1/images/edits", self._edits),
        ]

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "generations")

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "edits")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        started = time.monotonic()
        request_id = f"req_{secrets.token_hex(16)}"
        record: RecordedRequest | None = None
        try:
            self._check_key(request.headers.get("Authorization"))
            record = RecordedRequest(
                endpoint=endpoint,
                authorization=request.headers.get("Authorization"),
                content_type=request.content_type,
                fields=None,
            )
            self.requests.append(record)
            if endpoint == "generations":
                params = await self._read_generation(request, record)
            else:
                params = await self._read_edit(request, record)
            response = await self._answer(request, endpoint, params, record, request_id, started)
        except ApiError as error:
            response = web.json_response(error.body, status=error.status, headers=error.headers)
        if record is not None and record.status == 0:
            record.status = response.status
        self._sandbox.counters[f"openai.{endpoint}" if response.status == 200 else "openai.refused"] += 1
        if not response.prepared:
            response.headers["x-request-id"] = request_id
            response.headers["openai-processing-ms"] = str(round((time.monotonic() - started) * 1000))
        return response

    def _check_key(self, header: str | None) -> None:
        scheme, _, presented = (header or "").partition(" ")
        key = presented.strip() if scheme.lower() == "bearer" else ""
        verdict = self._sandbox.check_key(key)
        if verdict == "missing":
            raise ApiError(401, _MISSING_KEY)
        if verdict == "wrong":
            raise ApiError(
                401,
                f"Incorrect API key provided: {_masked(key)}. You can find your API key at {_KEYS_PAGE}.",
                code="invalid_api_key",
            )

    async def _read_generation(self, request: web.Request, record: RecordedRequest) -> ImageParams:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, _UNPARSABLE_JSON) from None
        if isinstance(body, dict):
            record.fields = body
        return validate_generation(body)

    async def _read_edit(self, request: web.Request, record: RecordedRequest) -> ImageParams:
        if request.content_type != "multipart/form-data":
            raise ApiError(
                400,
                f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data. "
                "(HINT: If you're using curl, you can pass -H 'Content-Type: multipart/form-data')",
            )
        form = await request.post()
        fields: dict[str, Any] = {}
        for name in dict.fromkeys(form.keys()):
            values = [value for value in form.getall(name) if isinstance(value, str)]
            if values:
                fields[name] = values[0] if len(values) == 1 else values
        record.fields = fields
        # Reading the uploads (up to 16 x 50 MB) and their headers is blocking file work.
        params = await asyncio.to_thread(validate_edit, form)
        record.images = params.images
        return params

    async def _answer(
        self,
        request: web.Request,
        endpoint: str,
        params: ImageParams,
        record: RecordedRequest,
        request_id: str,
        started: float,
    ) -> web.StreamResponse:
        faults = parse_faults(params.prompt)
        self._refuse_by_fault(faults, params, request_id)
        await asyncio.sleep(self._sandbox.latency_s + faults.slow_s)
        if faults.moderated_output:
            raise _moderation_error(request_id, _OUTPUT_VIOLATIONS, stage="output")
        if faults.malformed and not params.stream:
            return web.Response(
                text=f'{{"created": {int(time.time())}, "data": [{{"b64_json": "iVBORw0KGgoAAAANSUhEUgAA',
                content_type="application/json",
            )
        no_image = faults.no_image and not params.stream
        rendered = await _render(params, count=0 if no_image else params.n)
        usage = _usage(params, rendered)
        if params.stream:
            record.status, record.usage = 200, usage
            return await _stream(request, endpoint, params, rendered, usage, request_id, started)
        body = {
            "created": int(time.time()),
            "background": rendered.background,
            "data": [{"b64_json": image, "revised_prompt": None} for image in rendered.images],
            "output_format": params.output_format,
            "quality": rendered.quality,
            "size": _size_name(rendered.size),
            "usage": usage,
        }
        if (
            not no_image
            and faults.disconnect
            and self._sandbox.first_time(VENDOR, "disconnect", params.prompt)
        ):
            encoded = json.dumps(body).encode()
            return await drop_connection(
                request,
                encoded[: len(encoded) // 3],
                promised=len(encoded),
                headers={"x-request-id": request_id},
            )
        record.status, record.usage = 200, usage
        return web.json_response(body)

    def _refuse_by_fault(self, faults: Faults, params: ImageParams, request_id: str) -> None:
        sandbox, prompt = self._sandbox, params.prompt
        if faults.down:
            raise ApiError(503, "The server is overloaded or not ready yet.", type="server_error")
        if faults.no_credits:
            raise ApiError(
                429,
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
        if faults.rate_limited and sandbox.first_time(VENDOR, "rate-limited", prompt):
            raise _rate_limit_error(params.model, faults.rate_limited_retry_after_s)
        if (faults.server_error and sandbox.first_time(VENDOR, "server-error", prompt)) or faults.error:
            raise ApiError(
                500,
                "The server had an error while processing your request. Sorry about that!",
                type="server_error",
            )
        if faults.moderated:
            raise _moderation_error(request_id, _INPUT_VIOLATIONS, stage=None)


def validate_generation(body: object) -> ImageParams:
    """Check a `/v1/images/generations` JSON body as OpenAI does, raising its first error."""
    if not isinstance(body, dict):
        raise ApiError(
            400,
            f"Invalid type for body: expected an object, but got {_json_type(body)} instead.",
            code="invalid_type",
        )
    fields = _Fields(body, from_form=False)
    fields.refuse_unknown(_GENERATION_FIELDS)
    return _params(fields, images=(), default_model=None)


def validate_edit(form: MultiDictProxy[Any]) -> ImageParams:
    """Check a `/v1/images/edits` multipart form as OpenAI does, raising its first error."""
    text: dict[str, Any] = {}
    for name in dict.fromkeys(form.keys()):
        values = form.getall(name)
        text[name] = values[0] if len(values) == 1 else values
    fields = _Fields(text, from_form=True)
    fields.refuse_unknown(_EDIT_FIELDS)
    uploads = [("image", value) for value in form.getall("image", [])]
    uploads += [("image[]", value) for value in form.getall("image[]", [])]
    if not uploads:
        raise ApiError(
            400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    if len(uploads) > _MAX_IMAGES:
        raise ApiError(
            400,
            f"Invalid 'image': array too long. Expected an array with maximum length {_MAX_IMAGES}, "
            f"but got an array with length {len(uploads)} instead.",
            param="image",
            code="array_above_max_length",
        )
    images = tuple(_uploaded_image(name, index, upload) for index, (name, upload) in enumerate(uploads))
    # Edits default to gpt-image-1.5 (generations default to dall-e-2).
    return _params(fields, images=images, default_model="gpt-image-1.5")


def output_tokens_per_image(size: tuple[int, int], quality: str) -> int:
    """Image output tokens of one image at `size` and (resolved) `quality`."""
    shape = "square" if size[0] == size[1] else "rectangle"
    return _OUTPUT_TOKENS[(shape, "high" if quality == "auto" else quality)]


def input_image_tokens(width: int, height: int, *, high_fidelity: bool) -> int:
    """The sandbox's count of input tokens for one edit image (see the module docstring)."""
    fit = min(1.0, 2048 / max(width, height))
    scale = fit * min(1.0, 768 / (min(width, height) * fit))
    tiles = math.ceil(width * scale / 512) * math.ceil(height * scale / 512)
    tokens = 85 + 170 * tiles
    if high_fidelity:
        tokens += 4160 if width == height else 6240
    return tokens


def placeholder_seed(prompt: str) -> int:
    """The seed the sandbox draws a prompt's images with (OpenAI takes no seed)."""
    return int.from_bytes(hashlib.sha256(strip_fault_tags(prompt).encode()).digest()[:4], "big")


class _Fields:
    """Reads request fields, raising OpenAI's error for the first invalid one."""

    def __init__(self, values: Mapping[str, Any], *, from_form: bool) -> None:
        self.values = values
        # Multipart fields are all strings: OpenAI converts them to the parameter's type.
        self.from_form = from_form

    def refuse_unknown(self, known: frozenset[str]) -> None:
        for name in self.values:
            if name not in known:
                raise ApiError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")

    def string(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None or isinstance(value, str):
            return value
        raise _type_error(name, "a string", value)

    def choice(self, name: str, allowed: Sequence[str], default: str) -> str:
        value = self.string(name)
        if value is None:
            return default
        if value not in allowed:
            listed = ", ".join(f"'{option}'" for option in allowed[:-1]) + f", and '{allowed[-1]}'"
            raise ApiError(
                400,
                f"Invalid value: '{value}'. Supported values are: {listed}.",
                param=name,
                code="invalid_value",
            )
        return value

    def integer(self, name: str, *, low: int, high: int) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        if self.from_form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _type_error(name, "an integer", value) from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(name, "an integer", value)
        if value < low:
            raise ApiError(
                400,
                f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, "
                f"but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
        if value > high:
            raise ApiError(
                400,
                f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, "
                f"but got {value} instead.",
                param=name,
                code="integer_above_max_value",
            )
        return value

    def boolean(self, name: str) -> bool:
        value = self.values.get(name)
        if value is None:
            return False
        if self.from_form and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise _type_error(name, "a boolean", value)
        return value


def _params(fields: _Fields, *, images: tuple[UploadedImage, ...], default_model: str | None) -> ImageParams:
    prompt = fields.string("prompt")
    if prompt is None:
        raise ApiError(
            400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    if not prompt:
        raise ApiError(
            400,
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty "
            "string instead.",
            param="prompt",
            code="empty_string",
        )
    if len(prompt) > _MAX_PROMPT_CHARS:
        raise ApiError(
            400,
            f"Invalid 'prompt': string too long. Expected a string with maximum length {_MAX_PROMPT_CHARS}, "
            f"but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    model = fields.choice("model", _KNOWN_MODELS, default_model or "dall-e-2")
    if model not in GPT_IMAGE_MODELS:
        raise ApiError(
            400,
            f"The sandbox plays the GPT image models only, not '{model}'"
            + ("" if fields.values.get("model") else " (the default without 'model')")
            + f". Supported values are: {', '.join(GPT_IMAGE_MODELS)}.",
            param="model",
            code="invalid_value",
        )
    n = fields.integer("n", low=1, high=10)
    size = fields.choice("size", (*SIZES, "auto"), "auto")
    quality = fields.choice("quality", _QUALITIES, "auto")
    background = fields.choice("background", _BACKGROUNDS, "auto")
    output_format = fields.choice("output_format", _OUTPUT_FORMATS, "png")
    compression = fields.integer("output_compression", low=0, high=100)
    moderation = fields.choice("moderation", _MODERATIONS, "auto")
    input_fidelity = fields.choice("input_fidelity", _INPUT_FIDELITIES, "low")
    stream = fields.boolean("stream")
    partial_images = fields.integer("partial_images", low=0, high=3)
    fields.string("user")
    if background == "transparent" and output_format == "jpeg":
        raise ApiError(
            400,
            "Transparent background is not supported for the 'jpeg' output format. Use 'png' or 'webp'.",
            param="background",
            code="invalid_value",
        )
    return ImageParams(
        model=model,
        prompt=prompt,
        n=1 if n is None else n,
        size=size,
        quality=quality,
        background=background,
        output_format=output_format,
        output_compression=compression,
        moderation=moderation,
        stream=stream,
        partial_images=partial_images or 0,
        input_fidelity=input_fidelity,
        images=images,
    )


def _uploaded_image(field_name: str, index: int, upload: object) -> UploadedImage:
    param = f"image[{index}]" if field_name == "image[]" else "image"
    if not isinstance(upload, web.FileField):
        raise ApiError(
            400,
            f"Invalid type for '{param}': expected a file, but got a string instead.",
            param=param,
            code="invalid_type",
        )
    data = upload.file.read()
    if upload.content_type not in _IMAGE_TYPES:
        raise ApiError(
            400,
            f"Invalid file '{param}': unsupported mimetype ('{upload.content_type}'). Supported file formats "
            "are 'image/jpeg', 'image/png', and 'image/webp'.",
            param=param,
            code="unsupported_file_mimetype",
        )
    if len(data) >= _MAX_IMAGE_BYTES:
        raise ApiError(
            400,
            f"Invalid file '{param}': the file is {len(data)} bytes; images must be smaller than 50 MB.",
            param=param,
            code="file_too_large",
        )
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(
            400,
            f"Invalid image file or mode for image {index + 1}, please check your image file.",
            param=param,
            code="invalid_image_file",
        ) from None
    return UploadedImage(
        field_name=field_name,
        filename=upload.filename,
        content_type=upload.content_type,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
    )


async def _render(params: ImageParams, *, count: int) -> _Rendered:
    size = _resolved_size(params)
    background = "transparent" if params.background == "transparent" else "opaque"
    # Partial images are earlier drafts of each image: drawn as other variants, after the finals.
    partial_variants = [
        [params.n + variant * 3 + index for index in range(params.partial_images)]
        for variant in range(count if params.stream else 0)
    ]
    variants = [*range(count), *(v for drafts in partial_variants for v in drafts)]
    # Drawing takes tens of milliseconds an image: off the event loop, and in parallel.
    encoded = await asyncio.gather(
        *(asyncio.to_thread(_encoded_image, params, size, variant) for variant in variants)
    )
    by_variant = dict(zip(variants, encoded, strict=True))
    return _Rendered(
        size=size,
        quality="high" if params.quality == "auto" else params.quality,
        background=background,
        images=tuple(by_variant[variant] for variant in range(count)),
        partials=tuple(tuple(by_variant[v] for v in drafts) for drafts in partial_variants),
    )


def _encoded_image(params: ImageParams, size: tuple[int, int], variant: int) -> str:
    data = draw_placeholder(
        prompt=strip_fault_tags(params.prompt),
        seed=placeholder_seed(params.prompt),
        width=size[0],
        height=size[1],
        variant=variant,
        image_format=params.output_format,
    )
    if params.background == "transparent":
        data = _with_transparent_margin(data, params.output_format)
    return base64.b64encode(data).decode("ascii")


def _resolved_size(params: ImageParams) -> tuple[int, int]:
    if params.size != "auto":
        width, _, height = params.size.partition("x")
        return int(width), int(height)
    if not params.images:
        return 1024, 1024
    first = params.images[0]
    # The same closest-aspect rule the adapter uses: compare squared ratios with 3/2, exactly.
    if 2 * first.width**2 > 3 * first.height**2:
        return 1536, 1024
    if 2 * first.height**2 > 3 * first.width**2:
        return 1024, 1536
    return 1024, 1024


def _with_transparent_margin(data: bytes, image_format: str) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGBA")
    width, height = image.size
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (width // 8, height // 8, width - width // 8, height - height // 8))
    image.putalpha(alpha)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="WEBP", quality=80)
    return buffer.getvalue()


def _usage(params: ImageParams, rendered: _Rendered) -> dict[str, Any]:
    text_tokens = max(1, math.ceil(len(strip_fault_tags(params.prompt).encode()) / 4))
    high_fidelity = params.input_fidelity == "high"
    image_tokens = sum(
        input_image_tokens(i.width, i.height, high_fidelity=high_fidelity) for i in params.images
    )
    output_tokens = output_tokens_per_image(rendered.size, rendered.quality) * params.n
    return {
        "input_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": text_tokens + image_tokens + output_tokens,
    }


async def _stream(
    request: web.Request,
    endpoint: str,
    params: ImageParams,
    rendered: _Rendered,
    usage: Mapping[str, Any],
    request_id: str,
    started: float,
) -> web.StreamResponse:
    prefix = "image_generation" if endpoint == "generations" else "image_edit"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "x-request-id": request_id,
            "openai-processing-ms": str(round((time.monotonic() - started) * 1000)),
        }
    )
    await response.prepare(request)
    common = {
        "background": rendered.background,
        "output_format": params.output_format,
        "quality": rendered.quality,
        "size": _size_name(rendered.size),
    }
    for variant, image in enumerate(rendered.images):
        for index, partial in enumerate(rendered.partials[variant]):
            event = {
                "type": f"{prefix}.partial_image",
                "b64_json": partial,
                "created_at": int(time.time()),
                "partial_image_index": index,
                **common,
            }
            await response.write(_sse(event))
        # Usage is the whole request's; it rides on the last completed event only.
        last = variant == len(rendered.images) - 1
        event = {"type": f"{prefix}.completed", "b64_json": image, "created_at": int(time.time()), **common}
        event["usage"] = dict(usage) if last else None
        await response.write(_sse(event))
    await response.write_eof()
    return response


def _sse(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _rate_limit_error(model: str, retry_after_s: float | None) -> ApiError:
    headers: dict[str, str] = {}
    hint = ""
    if retry_after_s is not None:
        headers = {
            "retry-after": str(math.ceil(retry_after_s)),
            "retry-after-ms": str(round(retry_after_s * 1000)),
        }
        hint = f" Please try again in {retry_after_s:g}s."
    return ApiError(
        429,
        f"Rate limit reached for {model} in organization org-sandbox on images per minute (IPM): Limit 5, "
        f"Used 5, Requested 1.{hint} Visit https://platform.openai.com/account/rate-limits to learn more.",
        type="requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


def _moderation_error(request_id: str, violations: Sequence[str], *, stage: str | None) -> ApiError:
    extra = (
        {"moderation_details": {"moderation_stage": stage, "categories": list(violations)}} if stage else {}
    )
    return ApiError(
        400,
        "Your request was rejected by the safety system. If you believe this is an error, contact us at "
        f"help.openai.com and include the request ID {request_id}. "
        f"safety_violations=[{', '.join(violations)}].",
        type="image_generation_user_error",
        code="moderation_blocked",
        extra=extra,
    )


def _type_error(name: str, expected: str, value: object) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{name}': expected {expected}, but got {_json_type(value)} instead.",
        param=name,
        code="invalid_type",
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _masked(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def _size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"

"""Google Gemini generateContent (Nano Banana / Nano Banana Pro) as the sandbox plays it.

Wire protocol: shared/provider-apis.md section 4.

API host (`Sandbox.base_url`):
- `POST /v1beta/models/{model}:generateContent` with the key in `x-goog-api-key` (or `?key=`) and a
  camelCase (or snake_case: proto JSON accepts both) `GenerateContentRequest` body → HTTP 200 with
  `{"candidates": [...], "usageMetadata": {...}, "modelVersion", "responseId"}`, the image inline as base64.
  Models: `gemini-2.5-flash-image` and `gemini-3-pro-image-preview`; any other answers 404 NOT_FOUND.
  Synchronous: the answer comes after the sandbox's latency plus `[sandbox:slow=S]`.

Output sizes are Google's tables: 2.5 Flash has one size per aspect ratio (about 1 MP); 3 Pro has 1K / 2K /
4K, where 2K and 4K are exactly 2x and 4x the 1K size. The images are drawn at exactly that size, as PNG.
Token counts: 2.5 Flash 1290 output tokens per image and 258 input tokens per reference image; 3 Pro 1120
output tokens at 1K and 2K, 2000 at 4K, 560 input tokens per reference image (Vertex AI's model page), plus
`thoughtsTokenCount`. Text is counted as one token per 4 characters, rounded up.

For tests: `GeminiApi.calls` keeps the latest requests whose key was accepted (model, parsed body, headers,
and the `usageMetadata` answered); `Sandbox.counters` counts "gemini.generate" (answered 200),
"gemini.generate_refused" (answered an error) and "gemini.generate_dropped" (connection dropped mid-body).

Failures, with Google's envelope `{"error": {"code", "message", "status", "details"?}}`:
- no key: 403 PERMISSION_DENIED "Method doesn't allow unregistered callers ..."; a wrong key: 400
  INVALID_ARGUMENT "API key not valid. ..." with a `google.rpc.ErrorInfo` whose reason is API_KEY_INVALID.
- a body that is not proto JSON of a `GenerateContentRequest`: 400 INVALID_ARGUMENT with a
  `google.rpc.BadRequest` (unknown field names, values of the wrong type, base64 that does not decode).
- a request the model cannot serve (no contents, an empty part, a bad role, an unsupported MIME type or an
  undecodable image, an aspect ratio or image size outside the lists): 400 INVALID_ARGUMENT, no details.
- moderation is in-band with HTTP 200: input → no candidates and `promptFeedback.blockReason`
  PROHIBITED_CONTENT; output → a candidate without content, `finishReason` IMAGE_SAFETY and a
  `finishMessage`.

Fault tags (`faults.py`): `moderated`, `moderated-output`, `rate-limited[=S]` (429 RESOURCE_EXHAUSTED with a
QuotaFailure, plus a RetryInfo `retryDelay` when S is given), `server-error` (500 INTERNAL once), `down`
(503 UNAVAILABLE "The model is overloaded..."), `slow=S`, `malformed` (a 200 whose body is cut off
mid-JSON), `no-image` (finishReason STOP with text only), `disconnect` (the connection drops mid-body once),
`no-credits`, `error`.

Choices where the real API is unverified (adapters must tolerate the other reading):
- `imageSize` sent to 2.5 Flash is refused (400 INVALID_ARGUMENT); the real model may ignore it instead.
  A lower-case "2k" is refused (documented as rejected; the exact message is not). The messages for an
  unsupported aspect ratio or image size, and for `candidateCount` above 1, are the sandbox's own words.
- 3 Pro's output is PNG here; whether the real model sends PNG or JPEG is unverified (read `mimeType`).
- 3 Pro answers always carry its thinking: a thought text part and an interim image (`"thought": true`, a
  quarter of the final size) before the final image, which has a `thoughtSignature`. The real API may
  return thought parts only when `thinkingConfig.includeThoughts` is set; interim images are not billed.
- With `responseModalities` unset or containing TEXT, a short text part precedes the image (and its tokens
  are counted under TEXT); with ["IMAGE"] the answer has the image only. Without IMAGE the model answers
  with text only.
- Output moderation: the candidate has no `content` key at all (some reports show an empty `content`).
  The `finishMessage` wording and its support code are the sandbox's own.
- `[sandbox:error]` is a generation failure in-band: finishReason IMAGE_OTHER, no content, HTTP 200.
- `[sandbox:no-credits]`: 429 RESOURCE_EXHAUSTED "Your prepayment credits are depleted. ..." without
  details, as reported by users of prepaid AI Studio billing (third-party reports; not in Google's docs).
- `[sandbox:rate-limited]`: the message and the QuotaFailure violation are modelled on reported answers;
  no `Retry-After` header is sent (RetryInfo is Google's hint). `retryDelay` is a proto3 JSON Duration
  ("21s", "0.500s").
- An unknown method on a model (`:countTokens`, `:streamGenerateContent` are not served) answers a JSON 404
  NOT_FOUND; Google's front end may answer such paths differently.
- `responseModalities` names are taken in any case ("Image"), as Google's SDK examples send them; whether
  the API itself or the SDK normalises the case is unverified.
- Reference counts are not limited (3 Pro documents 14, 2.5 Flash "works best" with up to 3); without an
  `aspectRatio` the output follows the first reference image's shape, else it is square.
- Output moderation and failures carry only `promptTokenCount` in their usage (blocked images are not billed).
- Token counts are simplified: every reference image costs the model's flat figure (Gemini 2.x tiles large
  images into 258-token tiles; 2.5 Flash Image's rule is unverified), and 3 Pro's `thoughtsTokenCount` is
  an arbitrary figure that varies with the seed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image, UnidentifiedImageError

from sandbox.drawing import draw_placeholder
from sandbox.faults import Faults, drop_connection, parse_faults, strip_fault_tags

if TYPE_CHECKING:
    from sandbox.app import Sandbox

__all__ = [
    "ASPECT_RATIOS",
    "MODELS",
    "GeminiApi",
    "GeminiCall",
    "GeminiModel",
    "ImageRequest",
    "validate_request",
]

VENDOR = "gemini"

#: the aspect ratios `imageConfig.aspectRatio` accepts
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")

# Google's image-generation docs, "Gemini 2.5 Flash Image" table.
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
# Google's "Gemini 3 Pro Image" table at 1K; its 2K and 4K columns are these times 2 and 4.
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
_PRO_SCALES: Mapping[str, int] = {"1K": 1, "2K": 2, "4K": 4}

_SUPPORTED_INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
# Pillow cannot read HEIC/HEIF without a plugin: those are accepted unchecked.
_CHECKED_INPUT_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_MODALITIES = ("MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO")
_ROLES = ("user", "model")
_HARM_CATEGORIES = (
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)
_TYPE_PREFIX = "type.googleapis.com/google.ai.generativelanguage.v1beta."
_CHARS_PER_TOKEN = 4
_JSON_TYPE = "application/json; charset=UTF-8"
_RECORDED_CALLS = 256


@dataclass(frozen=True, kw_only=True)
class GeminiModel:
    """One image model the sandbox serves: its sizes and token counts."""

    id: str
    #: `imageSize` values accepted, each with its scale over the base table; empty when not supported
    image_sizes: Mapping[str, int]
    base_sizes: Mapping[str, tuple[int, int]]
    #: output tokens of one image, by `imageSize` (None: the model's only size)
    image_tokens: Mapping[str | None, int]
    #: input tokens of one reference image
    input_image_tokens: int
    #: whether answers carry thought parts and `thoughtsTokenCount`
    thinks: bool

    @property
    def default_image_size(self) -> str | None:
        """The `imageSize` used when none is sent ("1K"), or None for a model with one size."""
        return "1K" if self.image_sizes else None

    def output_size(self, aspect_ratio: str, image_size: str | None) -> tuple[int, int]:
        """The exact pixel size of an image at `aspect_ratio` and `image_size` (None: the only size)."""
        width, height = self.base_sizes[aspect_ratio]
        scale = self.image_sizes[image_size] if image_size is not None else 1
        return width * scale, height * scale


#: the models served, by vendor model id
MODELS: Mapping[str, GeminiModel] = {
    model.id: model
    for model in (
        GeminiModel(
            id="gemini-2.5-flash-image",
            image_sizes={},
            base_sizes=_FLASH_SIZES,
            image_tokens={None: 1290},
            input_image_tokens=258,
            thinks=False,
        ),
        GeminiModel(
            id="gemini-3-pro-image-preview",
            image_sizes=_PRO_SCALES,
            base_sizes=_PRO_1K_SIZES,
            image_tokens={"1K": 1120, "2K": 1120, "4K": 2000},
            input_image_tokens=560,
            thinks=True,
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """A validated generateContent request, reduced to what the sandbox draws from."""

    #: the text of every user part, joined with spaces
    prompt: str
    #: (mimeType, bytes) of every inline image in the user's turns
    images: tuple[tuple[str, bytes], ...]
    #: `responseModalities` as sent; empty when unset
    modalities: tuple[str, ...]
    aspect_ratio: str | None
    image_size: str | None
    seed: int | None


@dataclass(kw_only=True)
class GeminiCall:
    """One generateContent request whose key was accepted, as received, and the usage it was answered with."""

    model: str
    #: the parsed JSON body (or None when it was not JSON)
    body: Any
    #: the `usageMetadata` of the 200 answer, once answered with one
    usage: dict[str, Any] | None = None
    #: HTTP status of the answer, once answered
    status: int | None = None
    #: the request's headers (case-insensitive)
    headers: Mapping[str, str] = field(default_factory=CIMultiDict)


class GeminiApi:
    """Gemini's generateContent route inside one Sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        #: the latest requests whose key was accepted, oldest first (bounded: a sandbox may run for days)
        self.calls: deque[GeminiCall] = deque(maxlen=_RECORDED_CALLS)

    def api_routes(self) -> list[web.RouteDef]:
        """Routes served on the sandbox's API host."""
        return [web.post("/v1beta/models/{target}", self._generate_content)]

    async def _generate_content(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        if not isinstance(response, web.Response):
            kind = "generate_dropped"  # only a dropped connection streams its answer
        else:
            kind = "generate" if response.status == 200 else "generate_refused"
        self._sandbox.counters[f"{VENDOR}.{kind}"] += 1
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        # "models/{model}:{method}": model ids never contain a colon.
        model_id, _, method = request.match_info["target"].partition(":")
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        call = GeminiCall(model=model_id, body=body, headers=CIMultiDict(request.headers))
        self.calls.append(call)
        response = await self._answer_call(request, call, method, raw)
        call.status = response.status
        return response

    async def _answer_call(
        self, request: web.Request, call: GeminiCall, method: str, raw: bytes
    ) -> web.StreamResponse:
        model = MODELS.get(call.model)
        if model is None:
            return _error(
                404,
                "NOT_FOUND",
                f"models/{call.model} is not found for API version v1beta, or is not supported for "
                "generateContent. Call ListModels to see the list of available models and their supported "
                "methods.",
            )
        if method != "generateContent":
            return _error(404, "NOT_FOUND", "Method not found.")
        if call.body is None:
            snippet = raw[:40].decode("utf-8", "replace")
            return _bad_request([(None, f"Invalid JSON payload received. Unexpected token.\n{snippet}\n^")])
        # Checking inline images decodes them: keep the event loop free for other clients.
        inputs, refusal = await asyncio.to_thread(validate_request, call.body, model)
        if inputs is None:
            assert refusal is not None
            return refusal
        return await self._generate(request, call, model, inputs)

    async def _generate(
        self, request: web.Request, call: GeminiCall, model: GeminiModel, inputs: ImageRequest
    ) -> web.StreamResponse:
        faults = parse_faults(inputs.prompt)
        sandbox = self._sandbox
        if faults.down:
            return _error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if faults.no_credits:
            return _error(
                429,
                "RESOURCE_EXHAUSTED",
                "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects "
                "to manage your project and billing.",
            )
        if faults.rate_limited and sandbox.first_time(VENDOR, "rate-limited", inputs.prompt):
            return _rate_limited(model.id, faults.rate_limited_retry_after_s)
        if faults.server_error and sandbox.first_time(VENDOR, "server-error", inputs.prompt):
            return _error(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            )
        prompt_usage = _prompt_usage(inputs, model)
        if faults.moderated:
            # Input moderation refuses before any generation: no waiting, no candidates.
            answer = _envelope(model, [], prompt_usage, promptFeedback=_blocked_prompt_feedback())
            return _json(call, answer)
        await asyncio.sleep(sandbox.latency_s + faults.slow_s)
        if faults.disconnect and sandbox.first_time(VENDOR, "disconnect", inputs.prompt):
            return await drop_connection(
                request,
                b'{"candidates": [{"content": {"role": "model", "parts": [{"inlineData": {"mimeT',
                promised=1 << 20,
                content_type=_JSON_TYPE,
            )
        if faults.malformed:
            return web.Response(
                text='{"candidates": [{"content": {"role": "model", "parts": [{"inlineData": {"mimeTy',
                headers={"Content-Type": _JSON_TYPE},
            )
        # Drawing and encoding megapixels of PNG as base64 JSON: keep the event loop free for other clients.
        answer, encoded = await asyncio.to_thread(_encoded_answer, model, inputs, faults, prompt_usage)
        call.usage = answer["usageMetadata"]
        return web.Response(body=encoded, headers={"Content-Type": _JSON_TYPE})

    def _refuse_key(self, request: web.Request) -> web.Response | None:
        presented = request.headers.get("x-goog-api-key") or request.query.get("key")
        verdict = self._sandbox.check_key(presented)
        if verdict == "missing":
            return _error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if verdict == "wrong":
            message = "API key not valid. Please pass a valid API key."
            return _error(
                400,
                "INVALID_ARGUMENT",
                message,
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                        "locale": "en-US",
                        "message": message,
                    },
                ],
            )
        return None


# --- request validation ------------------------------------------------------------------------------------

# Proto field names (snake_case) of the messages the sandbox reads; JSON may use them or their camelCase.
_FIELDS: Mapping[str, frozenset[str]] = {
    "GenerateContentRequest": frozenset(
        {
            "model",
            "contents",
            "tools",
            "tool_config",
            "safety_settings",
            "system_instruction",
            "generation_config",
            "cached_content",
        }
    ),
    "Content": frozenset({"role", "parts"}),
    "Part": frozenset(
        {
            "text",
            "inline_data",
            "file_data",
            "function_call",
            "function_response",
            "executable_code",
            "code_execution_result",
            "video_metadata",
            "thought",
            "thought_signature",
            "part_metadata",
            "media_resolution",
        }
    ),
    "Blob": frozenset({"mime_type", "data"}),
    "GenerationConfig": frozenset(
        {
            "stop_sequences",
            "response_mime_type",
            "response_schema",
            "response_json_schema",
            "response_modalities",
            "candidate_count",
            "max_output_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "response_logprobs",
            "logprobs",
            "enable_enhanced_civic_answers",
            "speech_config",
            "thinking_config",
            "image_config",
            "media_resolution",
        }
    ),
    "ImageConfig": frozenset({"aspect_ratio", "image_size"}),
}

# The members of Part's `data` oneof: a part must set exactly one.
_PART_DATA = frozenset(
    {
        "text",
        "inline_data",
        "file_data",
        "function_call",
        "function_response",
        "executable_code",
        "code_execution_result",
    }
)


class _Invalid(Exception):
    """A request refused; carries the answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def validate_request(body: object, model: GeminiModel) -> tuple[ImageRequest | None, web.Response | None]:
    """Check a generateContent body as Google would: the request, or None and the 400 answer."""
    try:
        return _read_request(body, model), None
    except _Invalid as invalid:
        return None, invalid.response


def _read_request(body: object, model: GeminiModel) -> ImageRequest:  # noqa: C901 - one check per rule of the vendor's request schema
    if not isinstance(body, dict):
        raise _Invalid(
            _bad_request(
                [(None, 'Invalid JSON payload received. Unknown name "": Root element must be a message.')]
            )
        )
    reader = _ProtoReader()
    reader.message(body, "GenerateContentRequest", "")
    contents = reader.repeated(body, "contents", "", "Content")
    config = reader.message_field(body, "generation_config", "", "GenerationConfig")
    image_config = reader.message_field(config, "image_config", "generation_config", "ImageConfig")
    texts: list[str] = []
    images: list[tuple[str, bytes]] = []
    roles: list[str] = []
    empty_contents: list[int] = []
    empty_parts: list[str] = []
    for index, content in enumerate(contents):
        path = f"contents[{index}]"
        roles.append(reader.string(content, "role", path) or "")
        parts = reader.repeated(content, "parts", path, "Part")
        if not parts:
            empty_contents.append(index)
        for number, part in enumerate(parts):
            part_path = f"{path}.parts[{number}]"
            text = reader.string(part, "text", part_path)
            thought = reader.boolean(part, "thought", part_path)
            blob = reader.message_field(part, "inline_data", part_path, "Blob")
            mime_type = reader.string(blob, "mime_type", f"{part_path}.inline_data")
            data = reader.bytes_field(blob, "data", f"{part_path}.inline_data")
            if not any(_get(part, name) is not None for name in _PART_DATA):
                empty_parts.append(part_path)
            if roles[-1] == "model" or thought:
                continue
            if text is not None:
                texts.append(text)
            if blob:
                images.append((mime_type or "", data or b""))
    modalities = reader.enums(config, "response_modalities", "generation_config", "Modality", _MODALITIES)
    candidate_count = reader.integer(config, "candidate_count", "generation_config")
    seed = reader.integer(config, "seed", "generation_config")
    aspect_ratio = reader.string(image_config, "aspect_ratio", "generation_config.image_config")
    image_size = reader.string(image_config, "image_size", "generation_config.image_config")
    reader.raise_if_invalid()

    problems: list[str] = []
    if not contents:
        problems.append("* GenerateContentRequest.contents: contents is not specified\n")
    problems.extend(
        f"* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty.\n"
        for index in empty_contents
    )
    problems.extend(
        f"* GenerateContentRequest.{path}.data: required oneof field 'data' must have one initialized field\n"
        for path in empty_parts
    )
    if problems:
        raise _Invalid(_error(400, "INVALID_ARGUMENT", "".join(problems)))
    if any(role not in ("", *_ROLES) for role in roles):
        raise _Invalid(_error(400, "INVALID_ARGUMENT", "Please use a valid role: user, model."))
    for mime_type, data in images:
        _check_input_image(mime_type, data)
    if candidate_count is not None and candidate_count > 1:
        raise _Invalid(
            _error(400, "INVALID_ARGUMENT", f"Multiple candidates is not enabled for models/{model.id}")
        )
    if aspect_ratio is not None and aspect_ratio not in ASPECT_RATIOS:
        raise _Invalid(
            _error(
                400,
                "INVALID_ARGUMENT",
                f"Unsupported aspect ratio: {aspect_ratio}. Supported values are {', '.join(ASPECT_RATIOS)}.",
            )
        )
    if image_size is not None:
        if not model.image_sizes:
            raise _Invalid(
                _error(400, "INVALID_ARGUMENT", f"Image size is not supported for models/{model.id}.")
            )
        if image_size not in model.image_sizes:
            raise _Invalid(
                _error(
                    400,
                    "INVALID_ARGUMENT",
                    f"Unsupported image size: {image_size}. Supported values are "
                    f"{', '.join(model.image_sizes)} (upper-case K).",
                )
            )
    return ImageRequest(
        prompt=" ".join(texts),
        images=tuple(images),
        modalities=tuple(modalities),
        aspect_ratio=aspect_ratio,
        image_size=image_size,
        seed=seed,
    )


def _check_input_image(mime_type: str, data: bytes) -> None:
    if mime_type not in _SUPPORTED_INPUT_TYPES:
        raise _Invalid(_error(400, "INVALID_ARGUMENT", f"Unsupported MIME type: {mime_type}"))
    image_format = _CHECKED_INPUT_FORMATS.get(mime_type)
    if image_format is None:
        return
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            image.verify()
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
    ):
        raise _Invalid(
            _error(
                400,
                "INVALID_ARGUMENT",
                "Unable to process input image. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            )
        ) from None


class _ProtoReader:
    """Reads proto JSON fields by either name, collecting Google-style `BadRequest` violations."""

    def __init__(self) -> None:
        self.violations: list[tuple[str | None, str]] = []

    def message(self, value: dict[str, Any], message: str, path: str) -> None:
        """Report the unknown names in `value`, a JSON object for proto `message`."""
        known = _FIELDS[message]
        for name in value:
            if name not in known and name not in {_camel(field_name) for field_name in known}:
                where = f" at '{path}'" if path else ""
                description = (
                    f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.'
                )
                self.violations.append((path or None, description))

    def message_field(self, parent: dict[str, Any], name: str, path: str, message: str) -> dict[str, Any]:
        """The sub-message `name` of `parent` ({} when absent or invalid)."""
        value = _get(parent, name)
        if value is None:
            return {}
        field_path = _join(path, name)
        if not isinstance(value, dict):
            self._invalid(field_path, _TYPE_PREFIX + message, value)
            return {}
        self.message(value, message, field_path)
        return value

    def repeated(self, parent: dict[str, Any], name: str, path: str, message: str) -> list[dict[str, Any]]:
        """The repeated sub-messages `name` of `parent`, each checked."""
        value = _get(parent, name)
        if value is None:
            return []
        field_path = _join(path, name)
        items = value if isinstance(value, list) else [value]
        checked: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            item_path = f"{field_path}[{index}]"
            if not isinstance(item, dict):
                self._invalid(item_path, _TYPE_PREFIX + message, item)
                continue
            self.message(item, message, item_path)
            checked.append(item)
        return checked

    def string(self, parent: dict[str, Any], name: str, path: str) -> str | None:
        """The string field `name`, or None."""
        value = _get(parent, name)
        if value is not None and not isinstance(value, str):
            self._invalid(_join(path, name), "TYPE_STRING", value)
            return None
        return value

    def boolean(self, parent: dict[str, Any], name: str, path: str) -> bool:
        """The bool field `name` (false when absent)."""
        value = _get(parent, name)
        if value is not None and not isinstance(value, bool):
            self._invalid(_join(path, name), "TYPE_BOOL", value)
            return False
        return bool(value)

    def integer(self, parent: dict[str, Any], name: str, path: str) -> int | None:
        """The int32 field `name` (proto JSON also takes a decimal string), or None."""
        value = _get(parent, name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            self._invalid(_join(path, name), "TYPE_INT32", value)
            return None
        try:
            number = int(value) if not isinstance(value, float) or value.is_integer() else None
        except ValueError:
            number = None
        if number is None:
            self._invalid(_join(path, name), "TYPE_INT32", value)
        return number

    def bytes_field(self, parent: dict[str, Any], name: str, path: str) -> bytes | None:
        """The bytes field `name`, decoded from standard or URL-safe base64, or None."""
        value = _get(parent, name)
        if value is None:
            return None
        field_path = _join(path, name)
        if not isinstance(value, str):
            self._invalid(field_path, "TYPE_BYTES", value)
            return None
        try:
            padded = value + "=" * (-len(value) % 4)
            return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) <= 20 else value[:20] + "..."
            description = (
                f"Invalid value at '{field_path}' (TYPE_BYTES), Base64 decoding failed for \"{shown}\""
            )
            self.violations.append((field_path, description))
            return None

    def enums(
        self, parent: dict[str, Any], name: str, path: str, enum: str, allowed: tuple[str, ...]
    ) -> list[str]:
        """The repeated enum field `name`, as names."""
        value = _get(parent, name)
        if value is None:
            return []
        field_path = _join(path, name)
        items = value if isinstance(value, list) else [value]
        names: list[str] = []
        for index, item in enumerate(items):
            if isinstance(item, str) and item.upper() in allowed:
                names.append(item.upper())
            elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(allowed):
                names.append(allowed[item])
            else:
                self._invalid(f"{field_path}[{index}]", f"{_TYPE_PREFIX}GenerationConfig.{enum}", item)
        return names

    def raise_if_invalid(self) -> None:
        """Refuse the request when any field was invalid."""
        if self.violations:
            raise _Invalid(_bad_request(self.violations))

    def _invalid(self, path: str, type_name: str, value: object) -> None:
        self.violations.append((path, f"Invalid value at '{path}' ({type_name}), {json.dumps(value)}"))


def _get(message: dict[str, Any], name: str) -> Any:
    value = message.get(_camel(name))
    return message.get(name) if value is None else value


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- answers -----------------------------------------------------------------------------------------------


def _generation_answer(
    model: GeminiModel, inputs: ImageRequest, faults: Faults, prompt_usage: dict[str, Any]
) -> dict[str, Any]:
    """The 200 body of a generation that ran (drawn here: call it off the event loop)."""
    if faults.moderated_output:
        support_code = int.from_bytes(hashlib.sha256(inputs.prompt.encode()).digest()[:4]) % 10**8
        candidate = {
            "finishReason": "IMAGE_SAFETY",
            "finishMessage": "Unable to show the generated image. The generated image may violate Google's "
            f"Responsible AI practices. Try rephrasing the prompt. Support code: {support_code:08d}",
            "index": 0,
        }
        return _envelope(model, [candidate], prompt_usage)
    if faults.error:
        candidate = {
            "finishReason": "IMAGE_OTHER",
            "finishMessage": "Unable to show the generated image. The model could not generate the image "
            "based on the prompt provided.",
            "index": 0,
        }
        return _envelope(model, [candidate], prompt_usage)

    wants_image = not inputs.modalities or "IMAGE" in inputs.modalities
    wants_text = not inputs.modalities or "TEXT" in inputs.modalities or not wants_image
    aspect_ratio = inputs.aspect_ratio or _aspect_of_first_image(inputs.images) or "1:1"
    image_size = inputs.image_size or model.default_image_size
    width, height = model.output_size(aspect_ratio, image_size)
    seed = inputs.seed if inputs.seed is not None else secrets.randbelow(2**31)
    drawn_prompt = strip_fault_tags(inputs.prompt)

    parts: list[dict[str, Any]] = []
    thoughts_tokens = 0
    if model.thinks:
        thought_text = f"**Composing the scene**\n\nI'm laying out {drawn_prompt!r} at {aspect_ratio}."
        thoughts_tokens = _text_tokens(thought_text) + 64 + seed % 97
        parts.append({"text": thought_text, "thought": True})
        if wants_image and not faults.no_image:
            draft = draw_placeholder(
                prompt=f"(draft) {drawn_prompt}",
                seed=seed,
                width=max(16, width // 4),
                height=max(16, height // 4),
                image_format="png",
            )
            parts.append({"inlineData": {"mimeType": "image/png", "data": _b64(draft)}, "thought": True})
    text_tokens = 0
    if wants_text or faults.no_image:
        text = (
            "I'm unable to create that image, but here is a description of it instead."
            if faults.no_image or not wants_image
            else "Here is the image you asked for."
        )
        text_tokens = _text_tokens(text)
        parts.append({"text": text})
    image_tokens = 0
    if wants_image and not faults.no_image:
        image = draw_placeholder(
            prompt=drawn_prompt, seed=seed, width=width, height=height, image_format="png"
        )
        final: dict[str, Any] = {"inlineData": {"mimeType": "image/png", "data": _b64(image)}}
        if model.thinks:
            final["thoughtSignature"] = _b64(hashlib.sha256(f"{seed}{drawn_prompt}".encode()).digest())
        parts.append(final)
        image_tokens = model.image_tokens[image_size]

    details = [
        {"modality": modality, "tokenCount": count}
        for modality, count in (("TEXT", text_tokens), ("IMAGE", image_tokens))
        if count
    ]
    usage = dict(prompt_usage)
    usage["candidatesTokenCount"] = text_tokens + image_tokens
    usage["totalTokenCount"] = usage["promptTokenCount"] + text_tokens + image_tokens + thoughts_tokens
    usage["candidatesTokensDetails"] = details
    if thoughts_tokens:
        usage["thoughtsTokenCount"] = thoughts_tokens
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
    return _envelope(model, [candidate], usage)


def _encoded_answer(
    model: GeminiModel, inputs: ImageRequest, faults: Faults, prompt_usage: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    answer = _generation_answer(model, inputs, faults, prompt_usage)
    return answer, json.dumps(answer).encode()


def _envelope(
    model: GeminiModel, candidates: list[dict[str, Any]], usage: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    if candidates:
        answer["candidates"] = candidates
    answer.update(extra)
    answer["usageMetadata"] = usage
    answer["modelVersion"] = model.id
    answer["responseId"] = secrets.token_urlsafe(17)[:23]
    return answer


def _prompt_usage(inputs: ImageRequest, model: GeminiModel) -> dict[str, Any]:
    text_tokens = _text_tokens(inputs.prompt)
    image_tokens = model.input_image_tokens * len(inputs.images)
    details = [{"modality": "TEXT", "tokenCount": text_tokens}]
    if image_tokens:
        details.append({"modality": "IMAGE", "tokenCount": image_tokens})
    total = text_tokens + image_tokens
    return {"promptTokenCount": total, "totalTokenCount": total, "promptTokensDetails": details}


def _blocked_prompt_feedback() -> dict[str, Any]:
    return {
        "blockReason": "PROHIBITED_CONTENT",
        "safetyRatings": [
            {"category": category, "probability": "NEGLIGIBLE"} for category in _HARM_CATEGORIES
        ],
    }


def _aspect_of_first_image(images: tuple[tuple[str, bytes], ...]) -> str | None:
    if not images:
        return None
    try:
        with Image.open(io.BytesIO(images[0][1])) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    ratio = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda name: abs(ratio - math.log(_ratio(name))))


def _ratio(name: str) -> float:
    width, height = name.split(":")
    return int(width) / int(height)


def _text_tokens(text: str) -> int:
    return max(1, -(-len(text) // _CHARS_PER_TOKEN))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json(call: GeminiCall, answer: dict[str, Any]) -> web.Response:
    call.usage = answer.get("usageMetadata")
    return web.Response(body=json.dumps(answer).encode(), headers={"Content-Type": _JSON_TYPE})


def _rate_limited(model_id: str, retry_after_s: float | None) -> web.Response:
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
        "usage, head to: https://ai.dev/usage?tab=rate-limit. \n* Quota exceeded for metric: "
        f"generativelanguage.googleapis.com/generate_content_paid_tier_requests, limit: 10, model: {model_id}"
    )
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                    "quotaDimensions": {"location": "global", "model": model_id},
                    "quotaValue": "10",
                }
            ],
        }
    ]
    if retry_after_s is not None:
        message += f"\nPlease retry in {retry_after_s:g}s."
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": _duration(retry_after_s)}
        )
    return _error(429, "RESOURCE_EXHAUSTED", message, details)


def _duration(seconds: float) -> str:
    # proto3 JSON Duration: whole seconds, or 3, 6 or 9 fractional digits.
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s" if round(seconds, 3) == seconds else f"{seconds:.9f}s"


def _error(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


def _bad_request(violations: list[tuple[str | None, str]]) -> web.Response:
    field_violations = [
        {"field": path, "description": description} if path else {"description": description}
        for path, description in violations
    ]
    return _error(
        400,
        "INVALID_ARGUMENT",
        "\n".join(description for _, description in violations),
        [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": field_violations}],
    )

"""Black Forest Labs FLUX.2 [pro] as the sandbox plays it (shared/provider-apis.md section 1).

API host (`Sandbox.base_url`):
- `POST /v1/flux-2-pro` with a `Flux2Inputs` JSON body and `x-key` → `{"id", "polling_url", "cost",
  "input_mp", "output_mp"}`.
- `GET /v1/get_result?id=...` answers "Task not found" for every id: tasks live on the cluster host, as
  behind BFL's global endpoint, so only a client that polls `polling_url` as returned finds them.

Cluster host (`Sandbox.cluster_url`):
- `GET /v1/get_result?id=...` with `x-key` → `{"id", "status", "result", "progress", "details",
  "preview"}`; status "Pending" until the task's latency has elapsed, then "Ready" (or the fault's status).
- `GET /delivery/bfl/{id}/sample.{jpeg|png}?se=...&sig=...` → the image, no key (see `app.py`).

Choices where the real API is undocumented or unverified (adapters must tolerate the other reading):
- No `x-key` (or an empty one): 403 `{"detail": "Not authenticated"}`, as FastAPI's `APIKeyHeader`
  answers. A wrong key: 403 `{"detail": "Invalid API key"}`; BFL's error page lists 403 and no 401.
- "Task not found" comes with HTTP 200; the real status code for it is unverified.
- Sizes must be multiples of 16 (422 `multiple_of`; whether BFL rounds instead is unverified); a size
  over 4 MP is a 422 with `loc: ["body"]`, as a pydantic model validator reports it. Omitted sizes
  default to 1024 x 1024.
- The concurrency limit's 429 has no Retry-After and a FastAPI `{"detail": ...}` body; 500 is
  Starlette's plain-text "Internal Server Error"; 503 and 402 carry a `{"detail": ...}` body.
- `progress` is a fraction from 0 to 1 while Pending; `webhook_url` is accepted and ignored.
- Cost: 3 credits for the first output megapixel, 1.5 for each further one (megapixels =
  max(1, round(w·h / 10⁶))), 1.5 per reference image, each reference counted as one input megapixel
  (the sandbox never fetches them).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox.drawing import CONTENT_TYPES, draw_placeholder
from sandbox.faults import Faults, drop_connection, parse_faults, strip_fault_tags

if TYPE_CHECKING:
    from sandbox.app import Sandbox

__all__ = ["MAX_PIXELS", "BflApi", "BflTask", "Flux2Inputs", "flux_2_pro_credits", "validate_inputs"]

VENDOR = "bfl"
#: FLUX.2's largest output: 4 MP (2048 x 2048)
MAX_PIXELS = 2048 * 2048
_DEFAULT_SIDE = 1024
_REFERENCE_FIELDS = ("input_image", *(f"input_image_{n}" for n in range(2, 9)))
_INPUT_MODERATION_REASONS = ("Violence",)
_OUTPUT_MODERATION_REASONS = ("Sexual Content",)


@dataclass(frozen=True, kw_only=True)
class Flux2Inputs:
    """A validated FLUX.2 submit body."""

    prompt: str
    width: int
    height: int
    seed: int | None
    safety_tolerance: int
    output_format: str
    input_images: tuple[str, ...]
    prompt_upsampling: bool


@dataclass(kw_only=True)
class BflTask:
    """One submitted task, as the sandbox remembers it."""

    id: str
    inputs: Flux2Inputs
    #: the seed used: the requested one, or one the sandbox picked
    seed: int
    faults: Faults
    cost: float
    #: wall-clock submit time, reported as `result.start_time`
    start_time: float
    #: how long the task takes, from submit to Ready
    duration_s: float
    #: `time.monotonic()` deadline at which the task stops being Pending
    ready_at: float
    polls: int = 0


class BflApi:
    """BFL's routes and task table inside one Sandbox."""

    def __init__(self, sandbox: Sandbox, *, max_active: int) -> None:
        self._sandbox = sandbox
        #: the concurrency limit: tasks Pending at once before submits answer 429 (BFL: 24)
        self.max_active = max_active
        #: every task submitted, by id
        self.tasks: dict[str, BflTask] = {}
        self._active: dict[str, float] = {}
        sandbox.register_delivery(VENDOR, self._render)

    def api_routes(self) -> list[web.RouteDef]:
        """Routes served on the API host."""
        return [
            web.post("/v1/flux-2-pro", self._submit),
            web.get("/v1/get_result", self._get_result_elsewhere),
        ]

    def cluster_routes(self) -> list[web.RouteDef]:
        """Routes served on the cluster host."""
        return [web.get("/v1/get_result", self._get_result)]

    async def _submit(self, request: web.Request) -> web.Response:
        response = await self._accept_or_refuse(request)
        self._sandbox.counters["bfl.submit" if response.status == 200 else "bfl.submit_refused"] += 1
        return response

    async def _accept_or_refuse(self, request: web.Request) -> web.Response:
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
            message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            error = _error("json_invalid", ["body", position], "JSON decode error", {}, error=message)
            return _validation_failed([error])
        inputs, errors = validate_inputs(body)
        if inputs is None:
            return _validation_failed(errors)

        faults = parse_faults(inputs.prompt)
        sandbox = self._sandbox
        if faults.down:
            return web.json_response({"detail": "Service temporarily unavailable"}, status=503)
        if faults.no_credits:
            return web.json_response(
                {"detail": "Insufficient credits. Add credits to your account to continue."}, status=402
            )
        if faults.rate_limited and sandbox.first_time(VENDOR, "rate-limited", inputs.prompt):
            headers: dict[str, str] = {}
            if faults.rate_limited_retry_after_s is not None:
                headers["Retry-After"] = f"{faults.rate_limited_retry_after_s:g}"
            return web.json_response({"detail": "Rate limit exceeded"}, status=429, headers=headers)
        if faults.server_error and sandbox.first_time(VENDOR, "server-error", inputs.prompt):
            return web.Response(status=500, text="Internal Server Error")

        now = time.monotonic()
        self._active = {task_id: ready for task_id, ready in self._active.items() if ready > now}
        if len(self._active) >= self.max_active:
            return web.json_response(
                {
                    "detail": f"You have reached the limit of {self.max_active} active tasks. "
                    "Wait for a task to finish before submitting another."
                },
                status=429,
            )

        task = self._create_task(inputs, faults, now)
        return web.json_response(
            {
                "id": task.id,
                "polling_url": f"{sandbox.cluster_url}/v1/get_result?id={task.id}",
                "cost": task.cost,
                "input_mp": float(len(inputs.input_images)),
                "output_mp": round(inputs.width * inputs.height / 1_000_000, 2),
            }
        )

    def _create_task(self, inputs: Flux2Inputs, faults: Faults, now: float) -> BflTask:
        duration = self._sandbox.latency_s + faults.slow_s
        task = BflTask(
            id=str(uuid.uuid4()),
            inputs=inputs,
            seed=inputs.seed if inputs.seed is not None else secrets.randbelow(2**32),
            faults=faults,
            cost=flux_2_pro_credits(inputs.width, inputs.height, len(inputs.input_images)),
            start_time=time.time(),
            duration_s=duration,
            ready_at=now + duration,
        )
        self.tasks[task.id] = task
        # Input moderation refuses the task before it occupies a generation slot.
        if not faults.moderated:
            self._active[task.id] = task.ready_at
        return task

    async def _get_result(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        task_id = request.query.get("id")
        if task_id is None:
            return _validation_failed([_error("missing", ["query", "id"], "Field required", None)])
        self._sandbox.counters["bfl.poll"] += 1
        task = self.tasks.get(task_id)
        if task is None:
            return web.json_response(_result_response(task_id, "Task not found"))
        task.polls += 1
        if task.faults.disconnect and task.polls == 1:
            return await drop_connection(request, b'{"id": "', promised=4096)
        if task.faults.malformed:
            return web.Response(text=f'{{"id": "{task.id}", "status": "Rea', content_type="application/json")
        return web.json_response(self._result_of(task))

    async def _get_result_elsewhere(self, request: web.Request) -> web.Response:
        refusal = self._refuse_key(request)
        if refusal is not None:
            return refusal
        task_id = request.query.get("id")
        if task_id is None:
            return _validation_failed([_error("missing", ["query", "id"], "Field required", None)])
        self._sandbox.counters["bfl.poll_wrong_host"] += 1
        return web.json_response(_result_response(task_id, "Task not found"))

    def _result_of(self, task: BflTask) -> dict[str, Any]:
        faults = task.faults
        if faults.moderated:
            return _result_response(
                task.id, "Request Moderated", details={"Moderation Reasons": list(_INPUT_MODERATION_REASONS)}
            )
        remaining = task.ready_at - time.monotonic()
        if remaining > 0:
            progress = round(1 - remaining / task.duration_s, 2) if task.duration_s else 0.0
            return _result_response(task.id, "Pending", progress=progress)
        if faults.error:
            return _result_response(task.id, "Error", details={"error": "Internal error during generation"})
        if faults.moderated_output:
            return _result_response(
                task.id, "Content Moderated", details={"Moderation Reasons": list(_OUTPUT_MODERATION_REASONS)}
            )
        end_time = task.start_time + task.duration_s
        result: dict[str, Any] = {
            "prompt": task.inputs.prompt,
            "seed": task.seed,
            "start_time": task.start_time,
            "end_time": end_time,
            "duration": task.duration_s,
        }
        if not faults.no_image:
            expires_at = task.start_time - 1 if faults.expired_url else end_time + self._sandbox.result_ttl_s
            result["sample"] = self._sandbox.signed_url(
                VENDOR, f"{task.id}/sample.{task.inputs.output_format}", expires_at=expires_at
            )
        return _result_response(task.id, "Ready", result=result, progress=1.0)

    def _render(self, name: str) -> tuple[bytes, str] | None:
        task_id, _, file_name = name.partition("/")
        task = self.tasks.get(task_id)
        if task is None or file_name != f"sample.{task.inputs.output_format}":
            return None
        data = draw_placeholder(
            prompt=strip_fault_tags(task.inputs.prompt),
            seed=task.seed,
            width=task.inputs.width,
            height=task.inputs.height,
            image_format=task.inputs.output_format,
        )
        return data, CONTENT_TYPES[task.inputs.output_format]

    def _refuse_key(self, request: web.Request) -> web.Response | None:
        verdict = self._sandbox.check_key(request.headers.get("x-key"))
        if verdict == "missing":
            return web.json_response({"detail": "Not authenticated"}, status=403)
        if verdict == "wrong":
            return web.json_response({"detail": "Invalid API key"}, status=403)
        return None


def flux_2_pro_credits(width: int, height: int, reference_images: int) -> float:
    """BFL's price of one FLUX.2 [pro] task in credits (1 credit = $0.01)."""
    megapixels = max(1, round(width * height / 1_000_000))
    return 3.0 + 1.5 * (megapixels - 1) + 1.5 * reference_images


def validate_inputs(body: object) -> tuple[Flux2Inputs | None, list[dict[str, Any]]]:
    """Check a submit body as BFL's FastAPI model would: the inputs, or None and pydantic-style errors."""
    if not isinstance(body, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        return None, [_error("model_attributes_type", ["body"], message, body)]
    fields = _BodyFields(body)
    prompt = fields.string("prompt", required=True)
    width = fields.integer("width", ge=64, multiple_of=16) or _DEFAULT_SIDE
    height = fields.integer("height", ge=64, multiple_of=16) or _DEFAULT_SIDE
    seed = fields.integer("seed")
    safety_tolerance = fields.integer("safety_tolerance", ge=0, le=5)
    output_format = fields.choice("output_format", ("jpeg", "png"))
    prompt_upsampling = fields.boolean("prompt_upsampling")
    images = [image for name in _REFERENCE_FIELDS if (image := fields.string(name)) is not None]
    if width * height > MAX_PIXELS:
        reason = f"width * height must not exceed {MAX_PIXELS} pixels (4 megapixels)"
        fields.errors.append(_error("value_error", ["body"], f"Value error, {reason}", body, error=reason))
    if fields.errors or prompt is None:
        return None, fields.errors
    inputs = Flux2Inputs(
        prompt=prompt,
        width=width,
        height=height,
        seed=seed,
        safety_tolerance=2 if safety_tolerance is None else safety_tolerance,
        output_format=output_format or "jpeg",
        input_images=tuple(images),
        prompt_upsampling=True if prompt_upsampling is None else prompt_upsampling,
    )
    return inputs, []


class _BodyFields:
    """Reads the fields of a JSON body, collecting pydantic-style errors for the ones that are invalid."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[dict[str, Any]] = []

    def string(self, name: str, *, required: bool = False) -> str | None:
        """The field if it is a string; None if absent or null (an error if required) or invalid."""
        value = self.body.get(name)
        if required and name not in self.body:
            self._fail("missing", name, "Field required", self.body)
        elif value is not None and not isinstance(value, str):
            self._fail("string_type", name, "Input should be a valid string", value)
        return value if isinstance(value, str) else None

    def integer(
        self, name: str, *, ge: int | None = None, le: int | None = None, multiple_of: int | None = None
    ) -> int | None:
        """The field as an integer within its bounds; None if absent, null or invalid."""
        value = self.body.get(name)
        if value is None:
            return None
        number = _lax_int(value)
        if isinstance(number, tuple):
            kind, message = number
            self._fail(kind, name, message, value)
        elif multiple_of is not None and number % multiple_of:
            message = f"Input should be a multiple of {multiple_of}"
            self._fail("multiple_of", name, message, value, multiple_of=multiple_of)
        elif le is not None and number > le:
            self._fail("less_than_equal", name, f"Input should be less than or equal to {le}", value, le=le)
        elif ge is not None and number < ge:
            message = f"Input should be greater than or equal to {ge}"
            self._fail("greater_than_equal", name, message, value, ge=ge)
        else:
            return number
        return None

    def boolean(self, name: str) -> bool | None:
        """The field if it is a boolean; None if absent, null or invalid."""
        value = self.body.get(name)
        if value is not None and not isinstance(value, bool):
            self._fail("bool_type", name, "Input should be a valid boolean", value)
        return value if isinstance(value, bool) else None

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        """The field if it is one of `allowed`; None if absent, null or invalid."""
        value = self.body.get(name)
        if value is None or value in allowed:
            return value
        expected = " or ".join(f"'{option}'" for option in allowed)
        self._fail("enum", name, f"Input should be {expected}", value, expected=expected)
        return None

    def _fail(self, kind: str, name: str, msg: str, value: object, **ctx: object) -> None:
        self.errors.append(_error(kind, ["body", name], msg, value, **ctx))


def _lax_int(value: object) -> int | tuple[str, str]:
    # Pydantic's lax mode: integral floats and numeric strings are integers; booleans are refused here.
    # Returns the integer, or the error's (type, msg).
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        return "int_from_float", "Input should be a valid integer, got a number with a fractional part"
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
    return "int_type", "Input should be a valid integer"


def _error(kind: str, loc: list[str | int], msg: str, value: object, **ctx: object) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx:
        error["ctx"] = ctx
    return error


def _validation_failed(errors: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"detail": errors}, status=422)


def _result_response(
    task_id: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    progress: float | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": task_id,
        "status": status,
        "result": result,
        "progress": progress,
        "details": details,
        "preview": None,
    }

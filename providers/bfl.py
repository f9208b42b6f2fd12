"""Black Forest Labs FLUX.2 [pro]: submit one task per variant, poll each `polling_url`, download the results.

Wire protocol: shared/provider-apis.md section 1. BFL bills at submit, so the adapter saves every task
it submitted (`Checkpoint.save`) before it waits, and a later attempt of the same job resumes those
tasks instead of paying for new ones. A task BFL can no longer deliver (status "Error", "Task not
found", an expired result URL) is removed from the saved state before the error is raised, so that the
retry submits it afresh.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from providers._http import (
    Reply,
    classify_status,
    describe,
    json_object,
    most_telling,
    read_limited,
    retry_after_s,
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
from providers.catalog import bfl_native_size

__all__ = ["BflProvider"]

#: 1 BFL credit = $0.01
_USD_MICROS_PER_CREDIT = 10_000
_REFERENCE_FIELDS = ("input_image", *(f"input_image_{n}" for n in range(2, 9)))
_PASSED_OPTIONS = ("safety_tolerance", "prompt_upsampling")
_MODERATED = {
    "Request Moderated": "the prompt or a reference image (input moderation)",
    "Content Moderated": "the generated image (output moderation)",
}
_FAILED = ("Error", "Failed")
# No vendor image comes near this; a larger body is a fault, not an image.
_MAX_IMAGE_BYTES = 64 * 1024 * 1024
_MAX_DETAIL_CHARS = 300

# How each HTTP status BFL documents becomes an error: the class raised and the words in its message.
_HTTP_ERRORS: Mapping[int, tuple[type[ProviderError], str]] = {
    400: (ProviderRejected, "bad request"),
    401: (ProviderAuthError, "unauthorised"),
    402: (ProviderAuthError, "insufficient credits"),
    403: (ProviderAuthError, "forbidden"),
    404: (ProviderRejected, "not found"),
    408: (ProviderUnavailable, "request timeout"),
    422: (ProviderRejected, "invalid request"),
    429: (ProviderUnavailable, "rate limited"),
    500: (ProviderUnavailable, "server error"),
    502: (ProviderUnavailable, "bad gateway"),
    503: (ProviderUnavailable, "service unavailable"),
    504: (ProviderUnavailable, "gateway timeout"),
}


class BflProvider:
    """FLUX.2 [pro] through BFL's own HTTP API (no SDK)."""

    vendor = "bfl"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        model_path: str = "/v1/flux-2-pro",
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 3.0,
        max_polls_per_s: float = 250.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._submit_url = f"{self._base_url}/{model_path.lstrip('/')}"
        self._auth = {"x-key": api_key, "Accept": "application/json"}
        self._poll_interval_s = poll_interval_s
        self._max_poll_interval_s = max(poll_interval_s, max_poll_interval_s)
        # Thousands of tasks waiting at once would otherwise poll faster than one process can make
        # requests; past this rate, polls queue (each task is then polled less often, not dropped).
        self._poll_budget = _RateLimit(max_polls_per_s)

    async def generate(self, request: GenerationRequest, checkpoint: Checkpoint) -> GenerationResult:
        """Produce `request.num_variants` images, one BFL task each, resuming tasks saved earlier."""
        tasks = _tasks_from_state(request.resume_state, request.num_variants)
        await self._submit_missing(request, tasks, checkpoint)
        submitted = [task for task in tasks if task is not None]
        try:
            async with asyncio.TaskGroup() as group:
                variants = [
                    group.create_task(self._complete(task, _seed(request, variant)))
                    for variant, task in enumerate(submitted)
                ]
        except BaseExceptionGroup as failures:
            lost = {failure.task_id for failure in _leaves(failures) if isinstance(failure, _TaskLost)}
            if lost:
                await checkpoint.save(_state([None if t is None or t.id in lost else t for t in tasks]))
            raise _public(most_telling(_leaves(failures))) from None
        # A partial sum would undercut the catalog's estimate: report a cost only if every task had one.
        costs = [task.cost for task in submitted if task.cost is not None]
        return GenerationResult(
            images=tuple(variant.result() for variant in variants),
            cost_usd_micros=(
                sum(round(cost * _USD_MICROS_PER_CREDIT) for cost in costs)
                if len(costs) == len(submitted)
                else None
            ),
            vendor_refs={"bfl_task_ids": [task.id for task in submitted]},
        )

    async def _submit_missing(
        self, request: GenerationRequest, tasks: list[_Task | None], checkpoint: Checkpoint
    ) -> None:
        missing = [variant for variant, task in enumerate(tasks) if task is None]
        if not missing:
            return
        outcomes = await asyncio.gather(
            *(self._submit(request, variant) for variant in missing), return_exceptions=True
        )
        for variant, outcome in zip(missing, outcomes, strict=True):
            if isinstance(outcome, _Task):
                tasks[variant] = outcome
        # Save what was paid for even when some submits failed: the retry submits only the rest.
        if any(isinstance(outcome, _Task) for outcome in outcomes):
            await checkpoint.save(_state(tasks))
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise _public(most_telling(errors))

    async def _submit(self, request: GenerationRequest, variant: int) -> _Task:
        payload = _payload(request, variant)
        reply = await self._exchange("POST", URL(self._submit_url), "submit", payload=payload)
        if not reply.ok:
            raise _http_error("submit", reply)
        body = json_object(reply, vendor="BFL", stage="submit")
        task_id = body.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise InvalidProviderResponse(
                f"BFL accepted the submit but its answer has no task id: {snippet(reply.raw)}"
            )
        polling_url = body.get("polling_url")
        if not isinstance(polling_url, str) or not polling_url.startswith(("https://", "http://")):
            # BFL's older answers had only the id; its single-cluster hosts still serve get_result.
            polling_url = f"{self._base_url}/v1/get_result?id={quote(task_id)}"
        cost = body.get("cost")
        return _Task(
            id=task_id,
            polling_url=polling_url,
            cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        )

    async def _complete(self, task: _Task, requested_seed: int | None) -> ProviderImage:
        result = await self._poll_until_ready(task)
        sample = result.get("sample")
        if not isinstance(sample, str) or not sample:
            raise InvalidProviderResponse(
                f'BFL reported task {task.id} "Ready" but gave no image URL (result.sample is missing)'
            )
        data, content_type = await self._download(task, sample)
        seed = result.get("seed")
        return ProviderImage(
            data=data,
            content_type=content_type,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else requested_seed,
        )

    async def _poll_until_ready(self, task: _Task) -> Mapping[str, Any]:
        stage = f"poll of task {task.id}"
        interval = self._poll_interval_s
        # The polling URL may name another cluster's host: use it exactly as BFL returned it.
        polling_url = URL(task.polling_url, encoded=True)
        while True:
            await self._poll_budget.take()
            reply = await self._exchange("GET", polling_url, stage)
            parsed = reply.body
            status = parsed.get("status") if isinstance(parsed, dict) else None
            # The HTTP code of "Task not found" is unverified: accept it with 200 or as a 404.
            if status == "Task not found" or reply.status == 404:
                raise _TaskLost(
                    task.id,
                    f'BFL no longer knows task {task.id} ("Task not found"): it expired or was lost; '
                    "a retry submits (and pays for) a new task",
                )
            if not reply.ok:
                raise _http_error(stage, reply)
            body = json_object(reply, vendor="BFL", stage=stage)
            if not isinstance(status, str):
                raise InvalidProviderResponse(
                    f"BFL's answer to the {stage} has no status: {snippet(reply.raw)}"
                )
            if status == "Ready":
                result = body.get("result")
                return result if isinstance(result, dict) else {}
            if status in _MODERATED:
                raise ContentModerated(
                    f"BFL's moderation refused {_MODERATED[status]} of task {task.id} "
                    f'(status "{status}"): {_moderation_reasons(body)}'
                )
            if status in _FAILED:
                raise _TaskLost(
                    task.id,
                    f'BFL task {task.id} failed with status "{status}"{_details(body)}; '
                    "a retry submits (and pays for) a new task",
                )
            # "Pending", and statuses newer models add ("Reasoning", "Generating"): not done yet.
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self._max_poll_interval_s)

    async def _download(self, task: _Task, sample: str) -> tuple[bytes, str]:
        stage = f"download of task {task.id}'s image"
        try:
            # No x-key: the URL is signed, and the key must not leak to the delivery host.
            async with self._session.get(URL(sample, encoded=True), raise_for_status=False) as response:
                if response.status in (403, 404, 410):
                    raise _TaskLost(
                        task.id,
                        f"BFL's result URL for task {task.id} has expired or is invalid "
                        f"(HTTP {response.status} on download); the task was dropped, so a retry submits "
                        "and pays for a new one",
                    )
                if not 200 <= response.status < 300:
                    raise ProviderUnavailable(
                        f"BFL answered HTTP {response.status} to the {stage}",
                        reason=RetryReason.of_status(response.status),
                    )
                data = await read_limited(response, _MAX_IMAGE_BYTES, f"BFL's {stage}")
                content_type = response.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"BFL {stage} failed: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc
        if not data:
            raise InvalidProviderResponse(f"BFL's image for task {task.id} is empty (0 bytes)")
        if not content_type.startswith("image/"):
            content_type = sniff_content_type(data)
        return data, content_type

    async def _exchange(
        self, method: str, url: URL, stage: str, *, payload: Mapping[str, Any] | None = None
    ) -> Reply:
        try:
            async with self._session.request(
                method, url, json=payload, headers=self._auth, raise_for_status=False
            ) as response:
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
                reply = Reply(status=response.status, raw=raw, retry_after=retry_after)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"BFL {stage} failed: {describe(exc)}", reason=RetryReason.of_transport(exc)
            ) from exc
        return reply


@dataclass(frozen=True, kw_only=True)
class _Task:
    id: str
    polling_url: str
    #: credits BFL charged, from the submit answer
    cost: float | None

    def to_state(self) -> dict[str, Any]:
        return {"id": self.id, "polling_url": self.polling_url, "cost": self.cost}

    @classmethod
    def from_state(cls, saved: object) -> _Task | None:
        if not isinstance(saved, Mapping):
            return None
        task_id, polling_url, cost = saved.get("id"), saved.get("polling_url"), saved.get("cost")
        if not isinstance(task_id, str) or not isinstance(polling_url, str):
            return None
        known_cost = float(cost) if isinstance(cost, int | float) else None
        return cls(id=task_id, polling_url=polling_url, cost=known_cost)


class _TaskLost(ProviderUnavailable):
    """BFL can no longer deliver this task: forget it, so that the retry submits a new one."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class _RateLimit:
    """At most `per_second` permits a second, spaced evenly; waiters are served in arrival order."""

    def __init__(self, per_second: float) -> None:
        self._spacing = 1.0 / per_second
        self._next = 0.0

    async def take(self) -> None:
        """Wait for a permit."""
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next)
        self._next = slot + self._spacing
        if slot > now:
            await asyncio.sleep(slot - now)


def _tasks_from_state(state: Mapping[str, Any] | None, num_variants: int) -> list[_Task | None]:
    tasks: list[_Task | None] = [None] * num_variants
    saved = state.get("tasks") if state is not None else None
    if isinstance(saved, Sequence) and not isinstance(saved, str):
        for variant, entry in enumerate(saved[:num_variants]):
            tasks[variant] = _Task.from_state(entry)
    return tasks


def _state(tasks: Sequence[_Task | None]) -> dict[str, Any]:
    return {"tasks": [None if task is None else task.to_state() for task in tasks]}


def _payload(request: GenerationRequest, variant: int) -> dict[str, Any]:
    if len(request.reference_image_urls) > len(_REFERENCE_FIELDS):
        raise ProviderRejected(
            f"FLUX.2 [pro] takes at most {len(_REFERENCE_FIELDS)} reference images, "
            f"got {len(request.reference_image_urls)}"
        )
    width, height = bfl_native_size(request.width, request.height)
    payload: dict[str, Any] = {
        "prompt": request.prompt,
        "width": width,
        "height": height,
        # BFL delivers jpeg or png; png is asked for only when png is what will be stored.
        "output_format": "png" if request.output_format == "png" else "jpeg",
    }
    seed = _seed(request, variant)
    if seed is not None:
        payload["seed"] = seed
    payload.update(zip(_REFERENCE_FIELDS, request.reference_image_urls, strict=False))
    payload.update({key: request.options[key] for key in _PASSED_OPTIONS if key in request.options})
    return payload


def _seed(request: GenerationRequest, variant: int) -> int | None:
    # BFL has no `n`: each variant is its own task, and a fixed seed would draw the same image four times.
    return None if request.seed is None else request.seed + variant


def _http_error(stage: str, reply: Reply) -> ProviderError:
    status = reply.status
    error_class, meaning = classify_status(status, _HTTP_ERRORS)
    detail = _error_detail(reply)
    message = f"BFL answered HTTP {status} ({meaning}) to the {stage}" + (f": {detail}" if detail else "")
    wait_s = retry_after_s(reply.retry_after) if status in (429, 503) else None
    return error_class(message, retry_after_s=wait_s, reason=RetryReason.of_status(status))


def _error_detail(reply: Reply) -> str:
    body = reply.body
    detail: object = None
    if isinstance(body, dict):
        detail = body.get("detail", body.get("message", body.get("error")))
    if isinstance(detail, list):
        # FastAPI validation errors: [{"loc": ["body", "width"], "msg": "...", "type": "..."}]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                location = ".".join(str(part) for part in item.get("loc", ()))
                parts.append(f"{location}: {item.get('msg', '')}" if location else str(item.get("msg", "")))
        detail = "; ".join(parts)
    if detail is None or detail == "":
        detail = reply.raw.decode("utf-8", "replace").strip()
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return text[:_MAX_DETAIL_CHARS]


def _moderation_reasons(body: Mapping[str, Any]) -> str:
    details = body.get("details")
    reasons = details.get("Moderation Reasons") if isinstance(details, dict) else None
    if isinstance(reasons, list) and reasons:
        return ", ".join(str(reason) for reason in reasons)
    return "no reasons given"


def _details(body: Mapping[str, Any]) -> str:
    details = body.get("details")
    return f" ({json.dumps(details)[:_MAX_DETAIL_CHARS]})" if details else ""


def _public(error: BaseException) -> BaseException:
    # _TaskLost only tells `generate` which task to forget; the worker sees the public class.
    if isinstance(error, _TaskLost):
        return ProviderUnavailable(error.message, retry_after_s=error.retry_after_s, reason=error.reason)
    return error


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves

"""The real BFL adapter against the real BFL sandbox, on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from providers.base import (
    ContentModerated,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.bfl import BflProvider
from sandbox import Sandbox
from sandbox.drawing import draw_placeholder
from tests.vendor_fixtures import RecordingCheckpoint, decode, generate, generate_error, request_maker

API_KEY = "test-key"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def provider(sandbox: Sandbox, session: aiohttp.ClientSession) -> BflProvider:
    return make_provider(sandbox, session)


@pytest.fixture
def checkpoint(sandbox: Sandbox) -> RecordingCheckpoint:
    # Not the shared fixture: BFL's adapter saves its tasks before polling, and tests check it did.
    return RecordingCheckpoint(sandbox)


def make_provider(sandbox: Sandbox, session: aiohttp.ClientSession, api_key: str = API_KEY) -> BflProvider:
    return BflProvider(
        session, base_url=sandbox.base_url, api_key=api_key, poll_interval_s=0.01, max_poll_interval_s=0.05
    )


make_request = request_maker(
    model="flux_2_pro", prompt="a red fox in the snow", width=256, height=256, output_format="jpeg"
)


# --- success -------------------------------------------------------------------------------------------


async def test_one_variant_at_native_size(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(width=1080, height=1920), checkpoint)

    (image,) = result.images
    decoded = decode(image.data)
    assert decoded.size == (1088, 1920)  # FLUX sizes are multiples of 16; the service crops later
    assert decoded.format == "JPEG"
    assert image.content_type == "image/jpeg"
    (task,) = sandbox.bfl.tasks.values()
    assert (task.inputs.width, task.inputs.height) == (1088, 1920)
    assert image.seed == task.seed
    assert result.vendor_refs == {"bfl_task_ids": [task.id]}
    # 1088 x 1920 is 2.09 MP → 2 MP: 3 credits + 1.5 credits = $0.045
    assert result.cost_usd_micros == 45_000
    assert sandbox.counters["bfl.submit"] == 1
    assert sandbox.counters["bfl.download"] == 1


async def test_four_png_variants_with_consecutive_seeds(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(num_variants=4, seed=100, output_format="png"), checkpoint)

    assert [image.seed for image in result.images] == [100, 101, 102, 103]
    assert all(image.content_type == "image/png" for image in result.images)
    assert all(decode(image.data).format == "PNG" for image in result.images)
    assert len({image.data for image in result.images}) == 4
    assert sorted(task.seed for task in sandbox.bfl.tasks.values()) == [100, 101, 102, 103]
    assert sandbox.counters["bfl.submit"] == 4
    assert result.cost_usd_micros == 4 * 30_000
    assert len(result.vendor_refs["bfl_task_ids"]) == 4


async def test_webp_output_is_asked_as_jpeg(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(output_format="webp"), checkpoint)

    assert result.images[0].content_type == "image/jpeg"
    assert [task.inputs.output_format for task in sandbox.bfl.tasks.values()] == ["jpeg"]


async def test_references_and_options_are_passed_through(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    references = ("https://example.com/a.png", "https://example.com/b.png")
    request = make_request(
        reference_image_urls=references, options={"safety_tolerance": 5, "prompt_upsampling": False}
    )

    result = await generate(provider, request, checkpoint)

    (task,) = sandbox.bfl.tasks.values()
    assert task.inputs.input_images == references
    assert task.inputs.safety_tolerance == 5
    assert task.inputs.prompt_upsampling is False
    assert result.cost_usd_micros == 60_000  # 3 credits + 1.5 per reference


async def test_polling_url_is_on_another_host_and_used_as_returned(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    await generate(provider, make_request(), checkpoint)

    (saved,) = checkpoint.last["tasks"]
    assert URL(saved["polling_url"]).port != URL(sandbox.base_url).port
    assert sandbox.counters["bfl.poll"] >= 1
    assert sandbox.counters["bfl.poll_wrong_host"] == 0


async def test_tasks_are_saved_before_the_first_poll(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request(num_variants=2), checkpoint)

    assert checkpoint.polls_at_save == [0]
    assert [task["id"] for task in checkpoint.last["tasks"]] == result.vendor_refs["bfl_task_ids"]
    assert [task["cost"] for task in checkpoint.last["tasks"]] == [3.0, 3.0]


async def test_slow_task_is_polled_until_ready(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    result = await generate(provider, make_request("a slow fox [sandbox:slow=0.2]"), checkpoint)

    assert len(result.images) == 1
    assert sandbox.counters["bfl.poll"] >= 3


async def test_placeholder_bytes_are_deterministic(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    first = await generate(provider, make_request(seed=7), checkpoint)
    again = await generate(provider, make_request(seed=7), checkpoint)
    other_seed = await generate(provider, make_request(seed=8), checkpoint)

    assert first.images[0].data == again.images[0].data
    assert first.images[0].data != other_seed.images[0].data
    drawn = draw_placeholder(prompt="a red fox in the snow", seed=7, width=256, height=256)
    assert first.images[0].data == drawn
    assert sandbox.counters["bfl.submit"] == 3


# --- resuming --------------------------------------------------------------------------------------


async def test_resume_polls_saved_tasks_without_submitting(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    first = await generate(provider, make_request(num_variants=2), checkpoint)

    resumed_checkpoint = RecordingCheckpoint(sandbox)
    request = make_request(num_variants=2, resume_state=checkpoint.last)
    resumed = await generate(provider, request, resumed_checkpoint)

    assert sandbox.counters["bfl.submit"] == 2
    assert resumed.vendor_refs == first.vendor_refs
    assert [image.data for image in resumed.images] == [image.data for image in first.images]
    assert resumed.cost_usd_micros == first.cost_usd_micros
    assert resumed_checkpoint.saves == []


async def test_resume_submits_only_variants_without_a_task(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    await generate(provider, make_request(num_variants=2), checkpoint)
    kept = checkpoint.last["tasks"][0]

    request = make_request(num_variants=3, resume_state={"tasks": [kept, None]})
    result = await generate(provider, request, checkpoint)

    assert sandbox.counters["bfl.submit"] == 2 + 2
    assert result.vendor_refs["bfl_task_ids"][0] == kept["id"]
    assert checkpoint.last["tasks"][0] == kept
    assert all(task is not None for task in checkpoint.last["tasks"])


async def test_dropped_connection_then_resume_succeeds_without_paying_twice(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    request = make_request("a fox [sandbox:disconnect]")

    error = await generate_error(provider, request, checkpoint)
    assert type(error) is ProviderUnavailable
    assert error.retryable
    assert "dropped" in error.message

    result = await generate(provider, make_request(request.prompt, resume_state=checkpoint.last), checkpoint)
    assert len(result.images) == 1
    assert sandbox.counters["bfl.submit"] == 1


async def test_unknown_task_is_forgotten(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint
) -> None:
    lost = {"id": "gone", "polling_url": f"{sandbox.cluster_url}/v1/get_result?id=gone", "cost": 3.0}

    error = await generate_error(provider, make_request(resume_state={"tasks": [lost]}), checkpoint)

    assert type(error) is ProviderUnavailable
    assert "Task not found" in error.message
    assert sandbox.counters["bfl.submit"] == 0
    assert checkpoint.last == {"tasks": [None]}


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "error_class", "fragment"),
    [
        ("moderated", ContentModerated, "input moderation) of task"),
        ("moderated-output", ContentModerated, '"Content Moderated"'),
        ("rate-limited", ProviderUnavailable, "BFL answered HTTP 429 (rate limited)"),
        ("server-error", ProviderUnavailable, "HTTP 500"),
        ("down", ProviderUnavailable, "HTTP 503"),
        ("malformed", ProviderUnavailable, "not valid JSON"),
        ("no-image", InvalidProviderResponse, "no image URL"),
        ("disconnect", ProviderUnavailable, "dropped mid-response"),
        ("expired-url", ProviderUnavailable, "pays for a new one"),
        ("error", ProviderUnavailable, 'status "Error"'),
        ("no-credits", ProviderAuthError, "HTTP 402"),
    ],
)
async def test_fault_maps_to_error(
    provider: BflProvider,
    checkpoint: RecordingCheckpoint,
    tag: str,
    error_class: type[ProviderError],
    fragment: str,
) -> None:
    error = await generate_error(provider, make_request(f"a fox [sandbox:{tag}]"), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert error.retryable is error_class.retryable


async def test_moderation_names_the_reasons(provider: BflProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request("[sandbox:moderated-output]"), checkpoint)

    assert "output moderation" in error.message
    assert "Sexual Content" in error.message


@pytest.mark.parametrize("tag", ["rate-limited", "server-error"])
async def test_first_submit_fails_and_the_retry_succeeds(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, tag: str
) -> None:
    request = make_request(f"a fox [sandbox:{tag}]")

    error = await generate_error(provider, request, checkpoint)
    assert error.retryable
    assert checkpoint.saves == []  # nothing was paid for

    result = await generate(provider, request, checkpoint)
    assert len(result.images) == 1
    assert sandbox.counters["bfl.submit"] == 1


async def test_rate_limit_without_retry_after(provider: BflProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited]"), checkpoint)

    assert error.retry_after_s is None


async def test_rate_limit_with_retry_after(provider: BflProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request("[sandbox:rate-limited=7]"), checkpoint)

    assert type(error) is ProviderUnavailable
    assert error.retry_after_s == 7.0


@pytest.mark.parametrize("tag", ["error", "expired-url"])
async def test_dead_task_is_removed_from_the_checkpoint(
    provider: BflProvider, sandbox: Sandbox, checkpoint: RecordingCheckpoint, tag: str
) -> None:
    request = make_request(f"a fox [sandbox:{tag}]", num_variants=2)

    await generate_error(provider, request, checkpoint)

    assert checkpoint.saves[0]["tasks"][0] is not None
    assert None in checkpoint.last["tasks"]
    await generate_error(provider, make_request(request.prompt, resume_state=checkpoint.last), checkpoint)
    assert sandbox.counters["bfl.submit"] > 2  # the dropped task was submitted again


async def test_combined_tags(provider: BflProvider, checkpoint: RecordingCheckpoint) -> None:
    request = make_request("a fox [sandbox:rate-limited=1] [sandbox:slow=0.05] [sandbox:moderated-output]")

    first = await generate_error(provider, request, checkpoint)
    second = await generate_error(provider, request, checkpoint)

    assert (type(first), first.retry_after_s) == (ProviderUnavailable, 1.0)
    assert type(second) is ContentModerated


async def test_bad_option_is_rejected(provider: BflProvider, checkpoint: RecordingCheckpoint) -> None:
    error = await generate_error(provider, make_request(options={"safety_tolerance": 9}), checkpoint)

    assert type(error) is ProviderRejected
    assert "HTTP 422" in error.message
    assert "body.safety_tolerance: Input should be less than or equal to 5" in error.message


async def test_wrong_key_is_an_auth_error(session: aiohttp.ClientSession) -> None:
    async with Sandbox.running(port=0, api_key="the-right-key") as sandbox:
        provider = make_provider(sandbox, session, api_key="a-wrong-key")
        error = await generate_error(provider, make_request(), RecordingCheckpoint())

        assert type(error) is ProviderAuthError
        assert not error.retryable
        assert "HTTP 403" in error.message
        assert sandbox.counters["bfl.submit"] == 0

        right = make_provider(sandbox, session, api_key="the-right-key")
        result = await generate(right, make_request(), RecordingCheckpoint())
        assert len(result.images) == 1


async def test_concurrency_limit_answers_429(session: aiohttp.ClientSession) -> None:
    async with Sandbox.running(port=0, bfl_max_active=2) as sandbox:
        checkpoint = RecordingCheckpoint(sandbox)
        request = make_request("busy [sandbox:slow=30]", num_variants=3)

        error = await generate_error(make_provider(sandbox, session), request, checkpoint)

        assert type(error) is ProviderUnavailable
        assert "HTTP 429" in error.message
        assert error.retry_after_s is None
        # The two accepted tasks are saved, so the retry submits only the third.
        assert sum(task is None for task in checkpoint.last["tasks"]) == 1
        async with session.post(
            f"{sandbox.base_url}/v1/flux-2-pro", json={"prompt": "one more"}, headers={"x-key": API_KEY}
        ) as response:
            assert response.status == 429
            assert "Retry-After" not in response.headers


# --- the sandbox's wire protocol, spoken directly -------------------------------------------------


async def submit(
    session: aiohttp.ClientSession, sandbox: Sandbox, body: object, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    url = f"{sandbox.base_url}/v1/flux-2-pro"
    sent_headers = {"x-key": API_KEY} if headers is None else headers
    async with session.post(url, json=body, headers=sent_headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"prompt": "x", "width": 1000}, ["body", "width"], "multiple_of"),
        ({"prompt": "x", "height": 32}, ["body", "height"], "greater_than_equal"),
        ({"prompt": "x", "width": 4096, "height": 2048}, ["body"], "value_error"),
        ({"prompt": "x", "width": "wide"}, ["body", "width"], "int_parsing"),
        ({"width": 512}, ["body", "prompt"], "missing"),
        ({"prompt": "x", "output_format": "webp"}, ["body", "output_format"], "enum"),
        ({"prompt": "x", "safety_tolerance": -1}, ["body", "safety_tolerance"], "greater_than_equal"),
    ],
)
async def test_invalid_body_is_422(
    session: aiohttp.ClientSession, sandbox: Sandbox, body: dict[str, Any], loc: list[str], kind: str
) -> None:
    status, answer = await submit(session, sandbox, body)

    assert status == 422
    (error,) = answer["detail"]
    assert error["loc"] == loc
    assert error["type"] == kind
    assert error["msg"]
    assert sandbox.counters["bfl.submit"] == 0


async def test_largest_size_is_accepted(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer = await submit(session, sandbox, {"prompt": "x", "width": 2048, "height": 2048})

    assert status == 200
    assert answer["cost"] == 3 + 1.5 * 3  # 4.19 MP → 4 MP
    assert set(answer) == {"id", "polling_url", "cost", "input_mp", "output_mp"}


async def test_missing_key_is_403_not_authenticated(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    status, answer = await submit(session, sandbox, {"prompt": "x"}, headers={})

    assert (status, answer) == (403, {"detail": "Not authenticated"})


async def test_get_result_needs_an_id(session: aiohttp.ClientSession, sandbox: Sandbox) -> None:
    async with session.get(f"{sandbox.cluster_url}/v1/get_result", headers={"x-key": API_KEY}) as response:
        assert response.status == 422
        assert (await response.json())["detail"][0]["loc"] == ["query", "id"]


async def test_result_shape_and_tasks_live_on_the_cluster_host(
    session: aiohttp.ClientSession, sandbox: Sandbox
) -> None:
    status, answer = await submit(session, sandbox, {"prompt": "x", "width": 64, "height": 64, "seed": 3})
    assert status == 200

    async with session.get(answer["polling_url"], headers={"x-key": API_KEY}) as response:
        ready = await response.json()
    async with session.get(
        f"{sandbox.base_url}/v1/get_result", params={"id": answer["id"]}, headers={"x-key": API_KEY}
    ) as response:
        elsewhere = await response.json()

    assert set(ready) == {"id", "status", "result", "progress", "details", "preview"}
    assert ready["status"] == "Ready"
    assert set(ready["result"]) == {"sample", "prompt", "seed", "start_time", "end_time", "duration"}
    assert ready["result"]["seed"] == 3
    assert elsewhere["status"] == "Task not found"


async def test_tampered_or_expired_download_is_403(session: aiohttp.ClientSession) -> None:
    async with Sandbox.running(port=0, result_ttl_s=0) as sandbox:
        _, answer = await submit(session, sandbox, {"prompt": "x", "width": 64, "height": 64})
        async with session.get(answer["polling_url"], headers={"x-key": API_KEY}) as response:
            sample = (await response.json())["result"]["sample"]

        async with session.get(sample) as response:
            assert response.status == 403
            assert "AuthenticationFailed" in await response.text()
        async with session.get(sample.replace("sig=", "sig=0")) as response:
            assert response.status == 403
            assert "Signature did not match" in await response.text()


# --- the command line ------------------------------------------------------------------------------


async def test_command_line_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox",
        "--port",
        "0",
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            base_url = (await process.stdout.readline()).decode().strip()
        assert base_url.startswith("http://127.0.0.1:")

        async with session.post(
            f"{base_url}/v1/flux-2-pro", json={"prompt": "hello"}, headers={"x-key": "any"}
        ) as response:
            assert response.status == 200
            assert "polling_url" in await response.json()

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

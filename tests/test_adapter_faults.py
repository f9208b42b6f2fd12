"""Every vendor's adapter meets every fault tag the same way: one error class per fault, a retry reason
for the transient ones, and the vendor's own words in the message.

Each adapter runs against its own sandbox on ephemeral loopback ports, and each fault is the vendor's wire
shape for it (BFL's `Request Moderated` status, OpenAI's `moderation_blocked`, Ark's
`InputTextSensitiveContentDetected`, Gemini's `blockReason`...). What is specific to one vendor beyond
this table is in its own test file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest

from providers.ark import ArkProvider
from providers.base import (
    ContentModerated,
    GenerationRequest,
    ImageProvider,
    InvalidProviderResponse,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    RetryReason,
)
from providers.bfl import BflProvider
from providers.gemini import GeminiProvider
from providers.openai import OpenAIProvider
from sandbox import Sandbox
from tests.vendor_fixtures import RecordingCheckpoint, generate, generate_error, request_maker


@dataclass(frozen=True)
class Vendor:
    """How to build one vendor's adapter against the sandbox, and what its faults say."""

    adapter: Callable[[aiohttp.ClientSession, str], ImageProvider]
    make_request: Callable[..., GenerationRequest]
    #: tag → (error class, a fragment of the message in the vendor's own words)
    faults: dict[str, tuple[type[ProviderError], str]]


VENDORS = {
    "bfl": Vendor(
        adapter=lambda session, url: BflProvider(
            session, base_url=url, api_key="test-key", poll_interval_s=0.01, max_poll_interval_s=0.05
        ),
        make_request=request_maker(model="flux_2_pro", prompt="a fox", width=256, height=256),
        faults={
            "moderated": (ContentModerated, "input moderation) of task"),
            "moderated-output": (ContentModerated, '"Content Moderated"'),
            "rate-limited": (ProviderUnavailable, "BFL answered HTTP 429 (rate limited)"),
            "server-error": (ProviderUnavailable, "HTTP 500"),
            "down": (ProviderUnavailable, "HTTP 503"),
            "malformed": (ProviderUnavailable, "not valid JSON"),
            "no-image": (InvalidProviderResponse, "no image URL"),
            "disconnect": (ProviderUnavailable, "dropped mid-response"),
            "expired-url": (ProviderUnavailable, "pays for a new one"),
            "error": (ProviderUnavailable, 'status "Error"'),
            "no-credits": (ProviderAuthError, "HTTP 402"),
        },
    ),
    "openai": Vendor(
        adapter=lambda session, url: OpenAIProvider(session, base_url=url, api_key="sk-test-key-0123456789"),
        make_request=request_maker(model="gpt_image_1_5", prompt="a poster"),
        faults={
            "moderated": (ContentModerated, "refused the request (OpenAI did not say at which stage)"),
            "moderated-output": (ContentModerated, "the generated image (output moderation)"),
            "rate-limited": (ProviderUnavailable, "OpenAI answered HTTP 429 to the generations call"),
            "server-error": (ProviderUnavailable, "HTTP 500"),
            "down": (ProviderUnavailable, "HTTP 503"),
            "malformed": (ProviderUnavailable, "not valid JSON"),
            "no-image": (InvalidProviderResponse, "no images (`data` is empty)"),
            "disconnect": (ProviderUnavailable, "dropped mid-response"),
            "error": (ProviderUnavailable, "HTTP 500"),
            "no-credits": (ProviderAuthError, "insufficient_quota"),
        },
    ),
    "ark": Vendor(
        adapter=lambda session, url: ArkProvider(session, base_url=url, api_key="test-key"),
        make_request=request_maker(model="seedream_4", prompt="a fox"),
        faults={
            "moderated": (
                ContentModerated,
                "the prompt (input moderation) (InputTextSensitiveContentDetected)",
            ),
            "moderated-output": (
                ContentModerated,
                "output moderation) (OutputImageSensitiveContentDetected)",
            ),
            "rate-limited": (ProviderUnavailable, "HTTP 429 (rate limited, RateLimitExceeded.EndpointIPM"),
            "server-error": (ProviderUnavailable, "HTTP 500 (server error, InternalServiceError)"),
            "down": (ProviderUnavailable, "HTTP 503 (service unavailable, ServiceUnavailable)"),
            "malformed": (ProviderUnavailable, "not valid JSON"),
            "no-image": (InvalidProviderResponse, "returned no image"),
            "disconnect": (ProviderUnavailable, "dropped mid-response"),
            "expired-url": (ProviderUnavailable, "expired or is invalid (HTTP 403 on download)"),
            "error": (ProviderUnavailable, "failed to generate the image (InternalServiceError)"),
            "no-credits": (ProviderAuthError, "HTTP 403 (forbidden, AccountOverdueError)"),
        },
    ),
    "gemini": Vendor(
        adapter=lambda session, url: GeminiProvider(session, base_url=url, api_key="test-key"),
        make_request=request_maker(model="nano_banana", prompt="a fox"),
        faults={
            "moderated": (ContentModerated, "(blockReason PROHIBITED_CONTENT)"),
            "moderated-output": (ContentModerated, "withheld the image (finishReason IMAGE_SAFETY)"),
            "rate-limited": (ProviderUnavailable, "HTTP 429 RESOURCE_EXHAUSTED"),
            "server-error": (ProviderUnavailable, "HTTP 500 INTERNAL"),
            "down": (ProviderUnavailable, "HTTP 503 UNAVAILABLE to generateContent: The model is overloaded"),
            "malformed": (ProviderUnavailable, "not valid JSON"),
            "no-image": (InvalidProviderResponse, "returned no image (finishReason STOP)"),
            "disconnect": (ProviderUnavailable, "dropped mid-response"),
            "error": (InvalidProviderResponse, "no image (finishReason IMAGE_OTHER)"),
            "no-credits": (ProviderAuthError, "prepayment credits are depleted"),
        },
    ),
}

VENDORS["gemini-pro"] = Vendor(
    adapter=VENDORS["gemini"].adapter,
    make_request=request_maker(model="nano_banana_pro", prompt="a fox"),
    faults=VENDORS["gemini"].faults,
)

#: why each transient fault happened, whichever vendor it came from
RETRY_REASONS = {
    "rate-limited": RetryReason.RATE_LIMITED,
    "server-error": RetryReason.SERVER_ERROR,
    "down": RetryReason.SERVER_ERROR,
    "malformed": RetryReason.CONNECTION,
    "disconnect": RetryReason.CONNECTION,
}

#: faults of the first call only: the same request then succeeds
ONCE = ("rate-limited", "server-error")


def _cases(tags: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    return [
        (vendor, tag)
        for vendor, spec in VENDORS.items()
        for tag in spec.faults
        if tags is None or tag in tags
    ]


@pytest.mark.parametrize(("vendor", "tag"), _cases())
async def test_a_fault_becomes_its_error_with_the_vendors_words(
    vendor: str, tag: str, sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    spec = VENDORS[vendor]
    error_class, fragment = spec.faults[tag]
    provider = spec.adapter(session, sandbox.base_url)

    checkpoint = RecordingCheckpoint()

    error = await generate_error(provider, spec.make_request(f"a fox [sandbox:{tag}]"), checkpoint)

    assert type(error) is error_class
    assert fragment in error.message
    assert error.retryable is error_class.retryable
    if tag in RETRY_REASONS:
        assert error.reason is RETRY_REASONS[tag]
    if vendor != "bfl":  # only the asynchronous vendor has tasks to checkpoint
        assert checkpoint.saves == []


@pytest.mark.parametrize(("vendor", "tag"), _cases(ONCE))
async def test_after_a_passing_fault_the_same_request_succeeds(
    vendor: str, tag: str, sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    spec = VENDORS[vendor]
    provider = spec.adapter(session, sandbox.base_url)
    request = spec.make_request(f"a fox [sandbox:{tag}]")

    error = await generate_error(provider, request, RecordingCheckpoint())
    assert error.retryable

    result = await generate(provider, request, RecordingCheckpoint())
    assert len(result.images) == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (429, RetryReason.RATE_LIMITED),
        (408, RetryReason.TIMEOUT),
        (504, RetryReason.TIMEOUT),
        (500, RetryReason.SERVER_ERROR),
        (503, RetryReason.SERVER_ERROR),
        (499, RetryReason.OTHER),
    ],
)
def test_an_http_status_gives_its_retry_reason(status: int, reason: RetryReason) -> None:
    assert RetryReason.of_status(status) is reason


def test_a_transport_failure_gives_its_retry_reason() -> None:
    assert RetryReason.of_transport(TimeoutError()) is RetryReason.TIMEOUT
    assert RetryReason.of_transport(aiohttp.ServerDisconnectedError()) is RetryReason.CONNECTION

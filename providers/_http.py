"""HTTP helpers every vendor adapter shares: reading answers, describing failures, choosing what to report.

Each adapter keeps its own wire protocol, status tables and wording; what is here is the part that is the
same for all of them, so that a fix (a new transport failure to describe, a Retry-After form) lands once.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import aiohttp

from providers.base import (
    InvalidProviderResponse,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RetryReason,
)

__all__ = [
    "Reply",
    "classify_status",
    "describe",
    "json_object",
    "most_telling",
    "read_limited",
    "retry_after_s",
    "seconds_until",
    "shorten",
    "sniff_content_type",
    "snippet",
]


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A vendor's HTTP answer, read in full; adapters subclass it to keep their own headers."""

    status: int
    raw: bytes
    #: the Retry-After header as sent, or None
    retry_after: str | None

    @property
    def ok(self) -> bool:
        """Whether the status is a 2xx."""
        return 200 <= self.status < 300

    @cached_property
    def body(self) -> Any:
        """The parsed JSON body, or None when it is not JSON."""
        try:
            return json.loads(self.raw)
        except ValueError:
            return None


def json_object(reply: Reply, *, vendor: str, stage: str) -> Mapping[str, Any]:
    """The JSON object `reply` holds; `vendor` and `stage` ("BFL", "submit") name the exchange in errors."""
    body = reply.body
    if body is None:
        # Most likely cut short on the way: worth another attempt.
        raise ProviderUnavailable(
            f"{vendor} answered the {stage} with HTTP {reply.status} but a body that is not valid JSON "
            f"({len(reply.raw)} bytes: {snippet(reply.raw)})",
            reason=RetryReason.CONNECTION,
        )
    if not isinstance(body, dict):
        raise InvalidProviderResponse(
            f"{vendor}'s answer to the {stage} is not a JSON object: {snippet(reply.raw)}"
        )
    return body


def describe(exc: BaseException) -> str:
    """A short account of a transport failure (dropped connection, timeout...) for an error message."""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the connection dropped mid-response ({exc})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def retry_after_s(value: str | None) -> float | None:
    """The wait a Retry-After header asks for, in seconds, or None when it is absent or unreadable."""
    # Retry-After is either delta-seconds or an HTTP date (RFC 9110 section 10.2.3).
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    return seconds_until(value)


def seconds_until(http_date: str) -> float | None:
    """Seconds from now until an HTTP date (0 when it is past), or None when it is not a date."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def read_limited(
    response: aiohttp.ClientResponse,
    limit: int,
    what: str,
    *,
    error: type[ProviderError] = InvalidProviderResponse,
) -> bytes:
    """The body of `response`, raising `error` (naming `what`) once it is over `limit` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise error(f"{what} is {response.content_length} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise error(f"{what} exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def sniff_content_type(data: bytes) -> str:
    """The image type the bytes' signature shows (PNG, JPEG, WebP), else "application/octet-stream"."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def snippet(raw: bytes) -> str:
    """The start of a body, quoted, to show in an error message."""
    return repr(raw[:120].decode("utf-8", "replace"))


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in "..." when it was cut."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def classify_status(
    status: int, known: Mapping[int, tuple[type[ProviderError], str]]
) -> tuple[type[ProviderError], str]:
    """The error class and meaning of an HTTP status: from the vendor's table `known`, else by its range."""
    if status in known:
        return known[status]
    if status >= 500:
        return ProviderUnavailable, "server error"
    if status >= 400:
        return ProviderRejected, "client error"
    return InvalidProviderResponse, "unexpected status"


def most_telling(
    errors: Sequence[BaseException], rank: Callable[[ProviderError], tuple[float, ...]] | None = None
) -> BaseException:
    """The one of several failures to report: a bug first, else the vendor error that ranks lowest.

    Without `rank`, a final verdict (one that is not retryable) beats one a retry may cure; ties go to
    the earliest error.
    """
    # A bug (not a ProviderError) must not hide behind a vendor error.
    unexpected = [error for error in errors if not isinstance(error, ProviderError)]
    if unexpected:
        return unexpected[0]
    vendor_errors = [error for error in errors if isinstance(error, ProviderError)]
    return min(vendor_errors, key=rank or _final_first)


def _final_first(error: ProviderError) -> tuple[float, ...]:
    return (1 if error.retryable else 0,)

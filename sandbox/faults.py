"""Fault injection by tags in the prompt, e.g. "a red fox [sandbox:slow=2] [sandbox:moderated-output]".

Tags (several may be combined; unknown tags are ignored so that a tag meant for another vendor's
sandbox does no harm):

| tag | effect |
|---|---|
| `[sandbox:moderated]` | the vendor's input moderation refuses the request |
| `[sandbox:moderated-output]` | the vendor's output moderation refuses the generated image |
| `[sandbox:rate-limited]` | the first submit of this exact prompt is throttled (429, no Retry-After) |
| `[sandbox:rate-limited=S]` | the same, with `Retry-After: S` |
| `[sandbox:server-error]` | the first submit of this exact prompt fails with 500 |
| `[sandbox:down]` | every submit fails with 503 |
| `[sandbox:slow=S]` | the task takes S seconds more than the sandbox's latency |
| `[sandbox:malformed]` | the result body is not valid JSON |
| `[sandbox:no-image]` | the vendor reports success without an image |
| `[sandbox:disconnect]` | the connection drops mid-body on the first poll of the task |
| `[sandbox:expired-url]` | the result URL has already expired when it is handed out |
| `[sandbox:error]` | the task fails on the vendor's side |
| `[sandbox:no-credits]` | the account has no credit left (402) |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

__all__ = ["Faults", "drop_connection", "parse_faults", "strip_fault_tags"]

_TAG = re.compile(r"\[sandbox:([a-z][a-z-]*)(?:=([0-9]+(?:\.[0-9]+)?))?\]")


@dataclass(frozen=True, kw_only=True)
class Faults:
    """The faults a prompt asks for."""

    moderated: bool = False
    moderated_output: bool = False
    rate_limited: bool = False
    #: the Retry-After value sent with the injected 429, when the tag carried one
    rate_limited_retry_after_s: float | None = None
    server_error: bool = False
    down: bool = False
    slow_s: float = 0.0
    malformed: bool = False
    no_image: bool = False
    disconnect: bool = False
    expired_url: bool = False
    error: bool = False
    no_credits: bool = False


def parse_faults(prompt: str) -> Faults:
    """Read every `[sandbox:...]` tag in `prompt`."""
    # findall gives (name, value) pairs, value "" when the tag has none; a repeated tag's last value wins.
    tags: dict[str, str] = dict(_TAG.findall(prompt))
    retry_after = tags.get("rate-limited")
    slow = tags.get("slow")
    return Faults(
        moderated="moderated" in tags,
        moderated_output="moderated-output" in tags,
        rate_limited="rate-limited" in tags,
        rate_limited_retry_after_s=float(retry_after) if retry_after else None,
        server_error="server-error" in tags,
        down="down" in tags,
        slow_s=float(slow) if slow else 0.0,
        malformed="malformed" in tags,
        no_image="no-image" in tags,
        disconnect="disconnect" in tags,
        expired_url="expired-url" in tags,
        error="error" in tags,
        no_credits="no-credits" in tags,
    )


def strip_fault_tags(prompt: str) -> str:
    """The prompt without its fault tags, as a vendor's model would "see" it."""
    return " ".join(_TAG.sub(" ", prompt).split())


async def drop_connection(
    request: web.Request,
    start: bytes,
    *,
    promised: int,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.StreamResponse:
    """`[sandbox:disconnect]`: answer 200 promising `promised` bytes, send `start`, close the socket.

    The client sees a truncated payload, as when a proxy or the vendor's server dies mid-response.
    """
    response = web.StreamResponse(status=200, headers={**(headers or {}), "Content-Type": content_type})
    response.content_length = promised
    await response.prepare(request)
    await response.write(start)
    if request.transport is not None:
        request.transport.close()
    return response

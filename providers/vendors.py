"""The vendors this service can call, and what the rest of the service needs to know of each.

`server` builds adapters from this table and labels metrics with it, so that nothing outside
`providers` names a vendor's URL paths or the quirks of its adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from providers.ark import ArkProvider
from providers.base import ImageProvider
from providers.bfl import BflProvider
from providers.gemini import GeminiProvider
from providers.openai import OpenAIProvider


@dataclass(frozen=True, kw_only=True)
class Vendor:
    """One vendor's adapter and the facts about it that its callers need."""

    name: str
    #: the adapter class: `adapter(session, base_url=..., api_key=..., **options)`
    adapter: Callable[..., ImageProvider]
    #: the vendor's production API base URL
    production_url: str
    #: whether its adapter fetches reference images itself (then it takes `references_session`)
    inline_references: bool = False
    #: whether its adapter polls for results (then it takes `poll_interval_s` and `max_polls_per_s`)
    polls: bool = False
    #: the vendor's API paths, matched by suffix, with a bounded endpoint label for metrics
    endpoints: tuple[tuple[str, str], ...] = ()


VENDORS: Mapping[str, Vendor] = {
    vendor.name: vendor
    for vendor in (
        Vendor(
            name="bfl",
            adapter=BflProvider,
            production_url="https://api.bfl.ai",
            polls=True,
            endpoints=(("/v1/flux-2-pro", "submit"), ("/v1/get_result", "poll")),
        ),
        Vendor(
            name="openai",
            adapter=OpenAIProvider,
            production_url="https://api.openai.com",
            inline_references=True,
            endpoints=(("/v1/images/generations", "generations"), ("/v1/images/edits", "edits")),
        ),
        Vendor(
            name="ark",
            adapter=ArkProvider,
            production_url="https://ark.ap-southeast.bytepluses.com",
            endpoints=(("/api/v3/images/generations", "generations"),),
        ),
        Vendor(
            name="gemini",
            adapter=GeminiProvider,
            production_url="https://generativelanguage.googleapis.com",
            inline_references=True,
            endpoints=((":generateContent", "generate_content"),),
        ),
    )
}

_ENDPOINTS = tuple(endpoint for vendor in VENDORS.values() for endpoint in vendor.endpoints)


def endpoint_of(path: str) -> str:
    """The endpoint label of a vendor URL path; anything that is no API path is a file download."""
    for suffix, name in _ENDPOINTS:
        if path.endswith(suffix):
            return name
    return "download"

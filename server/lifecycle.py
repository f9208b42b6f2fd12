"""Vendors' own word on model lifecycles, read at start and then daily, over the catalog file's.

OpenAI publishes each model's `shutdown_date` (YYYY-MM-DD or null) in `GET /v1/models`. Where it differs
from the catalog, the vendor wins: the catalog's date is replaced (so a date that has passed refuses
the id at submit, and the shutdown gauge moves), and a log line says what changed. The other vendors
publish no such field: their dates come from the catalog file alone.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date
from typing import Any

import aiohttp

from providers.catalog import Catalog
from server.metrics import ServiceMetrics

log = logging.getLogger(__name__)

_MAX_LIST_BYTES = 8 * 1024 * 1024
# The first read runs before the server starts serving: an unreachable vendor must not hold it up for long.
_READ_TIMEOUT_S = 15.0


class LifecycleWatcher:
    """Keeps the catalog's OpenAI shutdown dates in line with `GET /v1/models`."""

    def __init__(
        self,
        catalog: Catalog,
        metrics: ServiceMetrics,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        interval_s: float,
    ) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self._session = session
        self._url = f"{base_url.rstrip('/')}/v1/models"
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._interval_s = interval_s

    async def run(self) -> None:
        """Refresh every interval until cancelled (the app refreshes once at start itself)."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh_logged()

    async def refresh_logged(self) -> None:
        """`refresh`, where a failed read is a log line and the dates known are kept."""
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await self.refresh()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning(
                "could not read OpenAI's model list at %s (%s); keeping the dates known", self._url, exc
            )

    async def refresh(self) -> list[str]:
        """Read the vendor's list once and apply it; returns the product ids whose date changed."""
        async with self._session.get(self._url, headers=self._headers, raise_for_status=True) as response:
            if (response.content_length or 0) > _MAX_LIST_BYTES:
                raise ValueError(f"a {response.content_length}-byte model list")
            body = await response.json(content_type=None)
        listed = _shutdown_dates(body)
        changed: list[str] = []
        for vendor_model, product_ids in self._catalog.vendor_models("openai").items():
            if vendor_model not in listed:
                continue  # not listed, or listed without the field: nothing to compare
            vendor_date = listed[vendor_model]
            for product_id in product_ids:
                file_date = self._catalog[product_id].lifecycle.shutdown_date
                if vendor_date == file_date:
                    continue
                log.warning(
                    "OpenAI says %s shuts down %s, the catalog said %s: the vendor's date is used for %s",
                    vendor_model,
                    vendor_date or "never (no date)",
                    file_date or "never (no date)",
                    product_id,
                    extra={"provider": product_id, "served_model": vendor_model, "outcome": "lifecycle"},
                )
                self._catalog.set_shutdown_date(product_id, vendor_date, source=self._url)
                changed.append(product_id)
        self._metrics.set_shutdown_dates(self._catalog.shutdown_dates())
        return changed


def _shutdown_dates(body: Any) -> dict[str, date | None]:
    """{model id: shutdown date or None} of a `GET /v1/models` answer, for entries that carry the field."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("the model list has no `data` array")
    dates: dict[str, date | None] = {}
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "shutdown_date" not in item:
            continue
        value = item["shutdown_date"]
        if value is None:
            dates[item["id"]] = None
        elif isinstance(value, str):
            try:
                dates[item["id"]] = date.fromisoformat(value)
            except ValueError:
                log.warning("OpenAI lists %s with an unreadable shutdown_date %r", item["id"], value)
    return dates

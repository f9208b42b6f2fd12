"""Webhook delivery, as the Standard Webhooks spec has it: signed, thin, at least once.

Every process runs a `WebhookSender`. It claims due outbox rows (`storage.webhooks`), posts each with
`webhook-id` (the row id, the same on every retry), `webhook-timestamp` and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under each of the account's current secrets), and
records the outcome. 2xx is delivered; 410 disables the endpoint; anything else, a timeout or a
redirect (never followed) is tried again with exponential backoff and jitter, or after the receiver's
Retry-After, until the retry window has passed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import random
import socket
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import aiohttp

from providers.references import IPNetwork, PublicOnlyConnector, host_problem
from server.metrics import ServiceMetrics
from storage.errors import SchemaBehind, StorageError
from storage.jobs import SqlJobStore
from storage.models import JobEvent, utcnow
from storage.webhooks import Delivery, Endpoint

log = logging.getLogger(__name__)

#: the longest wait between two attempts of one delivery
MAX_BACKOFF_S = 3600.0
#: the longest webhook URL accepted
MAX_URL_CHARS = 2000
#: deliveries one process has in flight at once
SENDER_CONCURRENCY = 32


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `id.timestamp.body` under a `whsec_` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(secrets: Sequence[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers; several secrets (a rotation) give space-separated signatures."""
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(secret, message_id, timestamp, body) for secret in secrets),
    }


def payload(delivery: Delivery, event: JobEvent | None) -> str:
    """The thin JSON body: what happened and to which job; GetJob has the rest."""
    data: dict[str, object] = {
        "job_id": str(delivery.job_id),
        "account_id": delivery.account_id,
        "status": delivery.event_type.removeprefix("job."),
        "version": delivery.job_version,
    }
    when = delivery.create_time
    if event is not None:
        job = event.job
        when = event.event_time
        data.update(
            sequence=event.sequence,
            folder_id=job.spec.folder_id,
            provider=job.serving_provider,
            served_model=job.served_model,
            error_code=job.error.code if job.error is not None else "",
        )
    body = {"type": delivery.event_type, "timestamp": when.isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"))


def target_violation(url: str, allow: Sequence[IPNetwork]) -> str | None:
    """Why a webhook URL may not be used (None: it may): https (http only where the allow-list admits
    addresses, i.e. tests), no credentials, and a host that passes the reference-URL address guard.
    `PublicOnlyConnector` checks every address a name resolves to again, at each connection."""
    if "\x00" in url or len(url) > MAX_URL_CHARS:
        return f"must be a URL of at most {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("https", "http") or not host or (parts.scheme == "http" and not allow):
        return "must be an https URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    problem = host_problem(host, allow)
    if problem is not None:
        return f"must not point at a loopback, private, link-local or metadata address: {problem}"
    return None


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - utcnow()).total_seconds())


def backoff_s(attempts: int, base_s: float) -> float:
    """Exponential backoff with jitter: about base·2^(attempt-1), between half and all of it."""
    ceiling = min(MAX_BACKOFF_S, base_s * 2 ** min(attempts - 1, 30))
    return random.uniform(ceiling / 2, ceiling)


class WebhookSender:
    """Claims and sends deliveries; safe in any number of replicas (rows are taken SKIP LOCKED)."""

    def __init__(
        self,
        store: SqlJobStore,
        metrics: ServiceMetrics,
        *,
        owner: str,
        allow: Sequence[IPNetwork],
        poll_interval_s: float,
        timeout_s: float,
        lease_s: float,
        retry_hours: float,
        retry_base_s: float,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._owner = owner
        self._allow = tuple(allow)
        self._poll_interval_s = poll_interval_s
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._retry_window = timedelta(hours=retry_hours)
        self._retry_base_s = retry_base_s
        self._session: aiohttp.ClientSession | None = None
        self._last_sample = 0.0

    async def run(self) -> None:
        """Deliver forever."""
        connector = PublicOnlyConnector(allow=self._allow, limit=SENDER_CONCURRENCY, family=socket.AF_UNSPEC)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout_s)
        )
        try:
            while True:
                sent = await self.send_due()
                if time.monotonic() - self._last_sample > max(1.0, self._poll_interval_s):
                    await self._sample()
                if sent < SENDER_CONCURRENCY:
                    await asyncio.sleep(self._poll_interval_s)
        finally:
            await self._session.close()

    async def send_due(self) -> int:
        """Claim what is due and send it; how many were claimed."""
        try:
            claimed = await self._store.claim_deliveries(
                owner=self._owner, limit=SENDER_CONCURRENCY, lease_s=self._lease_s
            )
        except StorageError as exc:
            if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                log.warning("webhook sender could not reach the database: %s", exc)
            return 0
        except Exception:
            log.exception("webhook sender failed to claim; it tries again next interval")
            return 0
        if claimed:
            await asyncio.gather(*(self._send_logged(d, e) for d, e in claimed))
        return len(claimed)

    async def _send_logged(self, delivery: Delivery, endpoint: Endpoint | None) -> None:
        try:
            await self._send(delivery, endpoint)
        except StorageError as exc:
            log.warning("webhook %s: could not record the outcome: %s", delivery.id, exc)
        except Exception:
            # its lease runs out and another attempt follows
            log.exception("webhook %s: delivery failed unexpectedly", delivery.id)

    async def _send(self, delivery: Delivery, endpoint: Endpoint | None) -> None:
        body_text = delivery.payload
        if body_text is None:
            await self._store.sequence_events()  # the payload carries the event's place in the stream
            body_text = payload(delivery, await self._store.delivery_event(delivery))
        if delivery.endpoint_id is not None and (endpoint is None or not endpoint.enabled):
            reason = (
                "endpoint removed" if endpoint is None else f"endpoint disabled: {endpoint.disabled_reason}"
            )
            await self._finish(delivery, "failed", body_text, error=reason, outcome="failed")
            return
        url = endpoint.url if endpoint is not None else (delivery.url or "")
        secrets = await self._store.signing_secrets(delivery.account_id)
        violation = target_violation(url, self._allow)
        if not secrets or violation:
            error = "the account has no webhook secret" if not secrets else f"the URL {violation}"
            await self._finish(delivery, "failed", body_text, error=error, outcome="failed")
            return
        body = body_text.encode()
        assert self._session is not None
        status_code: int | None = None
        wait: float | None = None
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers(secrets, delivery.id, int(time.time()), body),
                allow_redirects=False,
            ) as response:
                status_code = response.status
                wait = retry_after_s(response.headers.get("Retry-After"))
                await response.read()
            error = "" if 200 <= status_code < 300 else f"HTTP {status_code}"
        except TimeoutError:
            error = f"no answer within {self._timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # ForbiddenAddress and the like: the target is refused
            error = f"{type(exc).__name__}: {exc}"
        if status_code is not None and 200 <= status_code < 300:
            await self._finish(delivery, "delivered", body_text, status_code=status_code, outcome="delivered")
            return
        if status_code == 410 and endpoint is not None:
            await self._store.disable_endpoint(endpoint.id, f"answered 410 Gone at {utcnow().isoformat()}")
            await self._finish(
                delivery, "failed", body_text, status_code=410, error="410 Gone", outcome="gone"
            )
            log.warning("webhook endpoint %s answered 410 Gone: disabled", endpoint.id)
            return
        if status_code == 410:
            await self._finish(
                delivery, "failed", body_text, status_code=410, error="410 Gone", outcome="gone"
            )
            return
        delay = wait if wait is not None else backoff_s(delivery.attempts, self._retry_base_s)
        at = utcnow() + timedelta(seconds=min(delay, MAX_BACKOFF_S))
        if at > delivery.create_time + self._retry_window:
            await self._finish(
                delivery, "failed", body_text, status_code=status_code, error=error, outcome="failed"
            )
            log.warning("webhook %s given up after %d attempts: %s", delivery.id, delivery.attempts, error)
            return
        await self._finish(
            delivery, "pending", body_text, status_code=status_code, error=error, outcome="retry", at=at
        )

    async def _finish(
        self,
        delivery: Delivery,
        status: str,
        body: str,
        *,
        outcome: str,
        status_code: int | None = None,
        error: str = "",
        at: datetime | None = None,
    ) -> None:
        held = await self._store.finish_delivery(
            delivery,
            owner=self._owner,
            status=status,
            payload=body,
            next_attempt_at=at,
            status_code=status_code,
            error=error,
        )
        if held:
            self._metrics.webhook_deliveries.labels(outcome).inc()

    async def _sample(self) -> None:
        self._last_sample = time.monotonic()
        with contextlib.suppress(StorageError):
            oldest = await self._store.oldest_undelivered()
            age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
            self._metrics.webhook_oldest_undelivered.set(max(0.0, age))

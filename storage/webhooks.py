"""Webhooks: accounts' signing secrets, their endpoints, and the outbox of deliveries.

The outbox rows are written by a trigger on job_events (migration 0008), in the transaction of the
event that causes them; this module administers endpoints and secrets and hands deliveries to senders.
A sender claims due rows with SKIP LOCKED and holds them under a lease (the row's `next_attempt_at`
is pushed to the lease's end), so a sender that dies mid-delivery loses nothing: the row falls due
again when its lease runs out, and any replica sends it, under the same webhook-id.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from storage.codec import event_from_row
from storage.connections import Connections
from storage.models import JobEvent, JobStatus, utcnow
from storage.schema import job_events, webhook_deliveries, webhook_endpoints, webhook_secrets

#: the statuses an endpoint can ask for (the event type is "job." + status)
WEBHOOK_STATUSES = (
    JobStatus.COMPLETED.value,
    JobStatus.FAILED.value,
    JobStatus.CANCELLED.value,
    JobStatus.PROCESSING.value,
)
#: what an endpoint gets when it does not say
DEFAULT_WEBHOOK_STATUSES = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


def new_secret() -> str:
    """A Standard Webhooks secret: "whsec_" and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One endpoint of an account."""

    id: str
    account_id: str
    url: str
    statuses: tuple[str, ...]
    enabled: bool
    disabled_reason: str
    create_time: datetime


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One outbox row: one event for one target."""

    id: str
    account_id: str
    endpoint_id: str | None
    url: str | None
    job_id: uuid.UUID
    job_version: int
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    payload: str | None
    last_status_code: int | None
    last_error: str
    create_time: datetime
    delivered_time: datetime | None


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(
        id=row.id,
        account_id=row.account_id,
        url=row.url,
        statuses=tuple(s for s in row.events.split(",") if s),
        enabled=bool(row.enabled),
        disabled_reason=row.disabled_reason,
        create_time=row.create_time,
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(**{name: getattr(row, name) for name in Delivery.__dataclass_fields__})


class Webhooks:
    """Endpoints, secrets and the outbox (a part of `SqlJobStore`)."""

    _db: Connections

    # ------------------------------------------------------------ administration

    async def add_endpoint(
        self, account_id: str, url: str, statuses: tuple[str, ...] = DEFAULT_WEBHOOK_STATUSES
    ) -> tuple[Endpoint, str | None]:
        """Add an endpoint; with it the account's secret when this made one (shown once), else None."""
        now = utcnow()
        endpoint_id = "we_" + uuid.uuid4().hex
        made: str | None = None
        async with self._db.transaction() as conn:
            if not await self._has_secret(conn, account_id):
                made = new_secret()
                await conn.execute(
                    insert(webhook_secrets).values(account_id=account_id, secret=made, update_time=now)
                )
            await conn.execute(
                insert(webhook_endpoints).values(
                    id=endpoint_id,
                    account_id=account_id,
                    url=url,
                    events="," + ",".join(statuses) + ",",
                    enabled=True,
                    disabled_reason="",
                    create_time=now,
                )
            )
            row = (
                await conn.execute(select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id))
            ).one()
        return _endpoint(row), made

    async def endpoints(self, account_id: str | None = None) -> list[Endpoint]:
        """The endpoints of an account (or of every account), oldest first."""
        query = select(webhook_endpoints).order_by(webhook_endpoints.c.create_time, webhook_endpoints.c.id)
        if account_id is not None:
            query = query.where(webhook_endpoints.c.account_id == account_id)
        async with self._db.connection() as conn:
            return [_endpoint(row) for row in (await conn.execute(query)).all()]

    async def remove_endpoint(self, endpoint_id: str) -> bool:
        """Remove an endpoint (its pending deliveries are then given up); False if there was none."""
        async with self._db.transaction() as conn:
            result = await conn.execute(
                delete(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
            )
        return result.rowcount == 1

    async def disable_endpoint(self, endpoint_id: str, reason: str) -> None:
        """Stop delivering to an endpoint (it answered 410 Gone)."""
        async with self._db.transaction() as conn:
            await conn.execute(
                update(webhook_endpoints)
                .where(webhook_endpoints.c.id == endpoint_id)
                .values(enabled=False, disabled_reason=reason)
            )

    async def rotate_secret(self, account_id: str, *, overlap: timedelta) -> str:
        """A new secret for the account (returned, shown once); the old one still signs for `overlap`."""
        now = utcnow()
        fresh = new_secret()
        async with self._db.transaction() as conn:
            current = (
                await conn.execute(
                    select(webhook_secrets.c.secret)
                    .where(webhook_secrets.c.account_id == account_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if current is None:
                await conn.execute(
                    insert(webhook_secrets).values(account_id=account_id, secret=fresh, update_time=now)
                )
            else:
                await conn.execute(
                    update(webhook_secrets)
                    .where(webhook_secrets.c.account_id == account_id)
                    .values(
                        secret=fresh,
                        previous_secret=current,
                        previous_expires_at=now + overlap,
                        update_time=now,
                    )
                )
        return fresh

    async def signing_secrets(self, account_id: str) -> list[str]:
        """The secrets that sign the account's deliveries now: the current one, and the previous one
        while its rotation overlaps."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(select(webhook_secrets).where(webhook_secrets.c.account_id == account_id))
            ).first()
        if row is None:
            return []
        found = [row.secret]
        if row.previous_secret and row.previous_expires_at and row.previous_expires_at > utcnow():
            found.append(row.previous_secret)
        return found

    async def has_webhook_secret(self, account_id: str) -> bool:
        """Whether the account has a signing secret (a callback_url needs one)."""
        async with self._db.connection() as conn:
            return await self._has_secret(conn, account_id)

    @staticmethod
    async def _has_secret(conn: Any, account_id: str) -> bool:
        found = (
            await conn.execute(
                select(webhook_secrets.c.account_id).where(webhook_secrets.c.account_id == account_id)
            )
        ).first()
        return found is not None

    async def deliveries(
        self, account_id: str, *, limit: int = 20, status: str | None = None
    ) -> list[Delivery]:
        """The account's most recent deliveries, newest first."""
        query = select(webhook_deliveries).where(webhook_deliveries.c.account_id == account_id)
        if status is not None:
            query = query.where(webhook_deliveries.c.status == status)
        query = query.order_by(webhook_deliveries.c.create_time.desc(), webhook_deliveries.c.id).limit(limit)
        async with self._db.connection() as conn:
            return [_delivery(row) for row in (await conn.execute(query)).all()]

    async def redeliver(self, delivery_id: str) -> bool:
        """Send a delivery again, with the same webhook-id, as soon as a sender is free; it gets a new
        retry window. False if there is no such delivery."""
        now = utcnow()
        async with self._db.transaction() as conn:
            result = await conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == delivery_id)
                .values(status="pending", next_attempt_at=now, create_time=now, lease_owner=None)
            )
        return result.rowcount == 1

    # ------------------------------------------------------------ senders

    async def claim_deliveries(
        self, *, owner: str, limit: int, lease_s: float
    ) -> list[tuple[Delivery, Endpoint | None]]:
        """Take up to `limit` due deliveries under a lease, with their endpoints (None: a callback_url, or
        an endpoint since removed, which the sender tells apart by `endpoint_id`)."""
        now = utcnow()
        async with self._db.transaction() as conn:
            ids = (
                (
                    await conn.execute(
                        select(webhook_deliveries.c.id)
                        .where(
                            webhook_deliveries.c.status == "pending",
                            webhook_deliveries.c.next_attempt_at <= now,
                        )
                        .order_by(webhook_deliveries.c.next_attempt_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            rows = (
                await conn.execute(
                    update(webhook_deliveries)
                    .where(webhook_deliveries.c.id.in_(ids))
                    .values(
                        lease_owner=owner,
                        next_attempt_at=now + timedelta(seconds=lease_s),
                        attempts=webhook_deliveries.c.attempts + 1,
                    )
                    .returning(*webhook_deliveries.c)
                )
            ).all()
            claimed = [_delivery(row) for row in rows]
            wanted = sorted({d.endpoint_id for d in claimed if d.endpoint_id})
            endpoints = {}
            if wanted:
                endpoints = {
                    row.id: _endpoint(row)
                    for row in (
                        await conn.execute(
                            select(webhook_endpoints).where(webhook_endpoints.c.id.in_(wanted))
                        )
                    ).all()
                }
        claimed.sort(key=lambda d: d.create_time)
        return [(d, endpoints.get(d.endpoint_id) if d.endpoint_id else None) for d in claimed]

    async def delivery_event(self, delivery: Delivery) -> JobEvent | None:
        """The event a delivery is about (None if retention dropped it)."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(
                    select(job_events).where(
                        job_events.c.job_id == delivery.job_id, job_events.c.version == delivery.job_version
                    )
                )
            ).first()
        return event_from_row(row) if row is not None else None

    async def finish_delivery(
        self,
        delivery: Delivery,
        *,
        owner: str,
        status: str,
        payload: str | None,
        next_attempt_at: datetime | None = None,
        status_code: int | None = None,
        error: str = "",
    ) -> bool:
        """Record an attempt's outcome, if `owner` still holds this attempt; whether it did."""
        now = utcnow()
        values: dict[str, Any] = {
            "status": status,
            "lease_owner": None,
            "last_status_code": status_code,
            "last_error": error[:500],
            "next_attempt_at": next_attempt_at or now,
        }
        if payload is not None:
            values["payload"] = payload
        if status == "delivered":
            values["delivered_time"] = now
        async with self._db.transaction() as conn:
            result = await conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == delivery.id,
                    webhook_deliveries.c.lease_owner == owner,
                    webhook_deliveries.c.attempts == delivery.attempts,
                )
                .values(**values)
            )
        return result.rowcount == 1

    async def oldest_undelivered(self) -> datetime | None:
        """When the oldest pending delivery was made (None: nothing pending)."""
        async with self._db.connection() as conn:
            oldest: datetime | str | None = (
                await conn.execute(
                    select(func.min(webhook_deliveries.c.create_time)).where(
                        webhook_deliveries.c.status == "pending"
                    )
                )
            ).scalar_one_or_none()
        if isinstance(oldest, str):  # SQLite's min() of a timestamp comes back as text
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=utcnow().tzinfo)
        return oldest

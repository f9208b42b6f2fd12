"""The tables as SQLAlchemy Core metadata (Alembic migrations own the schema; a test checks they agree)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database keeps.

    PostgreSQL stores `timestamptz`; SQLite has no time zones and hands back naive values, which are UTC
    here because the store writes nothing else.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use storage.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stamp: datetime = value
        return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("account_id", String(128), nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("request_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    # the request
    Column("provider", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("negative_prompt", Text, nullable=False, server_default=""),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("num_variants", Integer, nullable=False),
    Column("seed", BigInteger, nullable=True),
    Column("output_format", String(8), nullable=False),
    Column("folder_id", String(128), nullable=False, server_default=""),
    Column("reference_image_urls", Json, nullable=False),
    Column("provider_options", Json, nullable=False),
    Column("labels", Json, nullable=False),
    Column("fallback_providers", Json, nullable=False, server_default=text("'[]'")),
    Column("fallback_on_moderation", Boolean, nullable=False, server_default=text("false")),
    Column("fallback_options", Json, nullable=False, server_default=text("'{}'")),
    # the model of the chain the job runs on (vendor caps count it), and the attempts before it
    Column("active_provider", String(64), nullable=False, server_default=""),
    Column("attempt_base", Integer, nullable=False, server_default=text("0")),
    # the queue
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("deadline_at", UtcDateTime, nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("provider_state", Json, nullable=True),
    # the outcome
    Column("images", Json, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("error_retryable", Boolean, nullable=False, server_default=text("false")),
    Column("message", Text, nullable=False, server_default=""),
    Column("estimated_cost_usd_micros", BigInteger, nullable=False),
    Column("cost_usd_micros", BigInteger, nullable=False, server_default=text("0")),
    # what GenerateImage reserved from the account's budget (0: the account had none)
    Column("reserved_usd_micros", BigInteger, nullable=False, server_default=text("0")),
    # the vendor model the catalog resolved the provider to at submit
    Column("served_model", String(128), nullable=False, server_default=""),
    Column("create_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
    Column("start_time", UtcDateTime, nullable=True),
    Column("end_time", UtcDateTime, nullable=True),
    # when the job is deleted (request ttl or server retention); NULL: kept until DeleteJob
    Column("expire_time", UtcDateTime, nullable=True),
    # the submit's W3C traceparent, when it was traced: each attempt's span links to it
    Column("trace_context", String(64), nullable=True),
    # the claim scans only these small partial indexes
    Index(
        "ix_jobs_pending",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
    Index(
        "ix_jobs_leases",
        "lease_expires_at",
        postgresql_where=text("status = 'processing'"),
        sqlite_where=text("status = 'processing'"),
    ),
    # per-account backpressure counts only the account's pending jobs
    Index(
        "ix_jobs_account_pending",
        "account_id",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
    # ListJobs: newest first within an account
    Index("ix_jobs_account_created", "account_id", "create_time", "id"),
    # AIP-155 idempotency; NULL request ids never collide
    Index("uq_jobs_account_request", "account_id", "request_id", unique=True),
    # the event hub's periodic catch-up reads recently changed jobs
    Index("ix_jobs_update_time", "update_time"),
    # the retention sweeper; jobs kept forever are not in it
    Index(
        "ix_jobs_expire_time",
        "expire_time",
        postgresql_where=text("expire_time IS NOT NULL"),
        sqlite_where=text("expire_time IS NOT NULL"),
    ),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("account_id", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("previous_status", String(16), nullable=True),
    Column("message", Text, nullable=False, server_default=""),
    Column("event_time", UtcDateTime, nullable=False),
    # the whole job as of this version, so a resumed watch replays exactly what happened
    Column("snapshot", Json, nullable=False),
    Index("uq_job_events_job_version", "job_id", "version", unique=True),
)

#: accounts with a budget; an account without a row here is unlimited
accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(128), primary_key=True),
    Column("balance_usd_micros", BigInteger, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
)

#: every change of a balance, with the balance after it
ledger = Table(
    "ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("account_id", String(128), nullable=False),
    Column("job_id", Uuid, nullable=True),
    # set | add | reserve | settle | refund
    Column("kind", String(16), nullable=False),
    Column("amount_usd_micros", BigInteger, nullable=False),
    Column("balance_usd_micros", BigInteger, nullable=False),
    Column("time", UtcDateTime, nullable=False),
    Column("note", Text, nullable=False, server_default=""),
    Index("ix_ledger_account_id", "account_id", "id"),
)

#: each vendor's circuit breaker, shared by every replica (see storage.breakers)
provider_breakers = Table(
    "provider_breakers",
    metadata,
    Column("vendor", String(32), primary_key=True),
    # closed | open | half_open
    Column("state", String(16), nullable=False, server_default="closed"),
    # the failure window: requests and failures counted since window_start
    Column("window_start", UtcDateTime, nullable=False),
    Column("requests", Integer, nullable=False, server_default=text("0")),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("opened_at", UtcDateTime, nullable=True),
    # while open: when probes may start; while half-open: when unanswered probe slots are given out again
    Column("probe_at", UtcDateTime, nullable=True),
    Column("probes_claimed", Integer, nullable=False, server_default=text("0")),
    Column("probes_succeeded", Integer, nullable=False, server_default=text("0")),
    Column("probes_failed", Integer, nullable=False, server_default=text("0")),
    Column("update_time", UtcDateTime, nullable=False),
)

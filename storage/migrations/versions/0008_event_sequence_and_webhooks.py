"""the account stream's sequence, and webhooks: secrets, endpoints, and the outbox with its trigger

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UtcDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The outbox rows are written by a trigger on job_events, so every path that writes an event (each
# dialect's single statements as well as the portable transactions) writes its deliveries in the same
# transaction. Its WHEN clause is checked without calling the function, so the events no webhook is
# for (every job's first, PENDING) cost nothing; an account with no endpoint and a job with no
# callback_url select no rows.
_POSTGRES_OUTBOX = """
CREATE FUNCTION imagegen_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, account_id, endpoint_id, url, job_id, job_version, event_type,
                                    status, attempts, next_attempt_at, create_time)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), NEW.account_id, w.id, NULL, NEW.job_id,
           NEW.version, 'job.' || NEW.status, 'pending', 0, NEW.event_time, NEW.event_time
    FROM webhook_endpoints w
    WHERE w.account_id = NEW.account_id AND w.enabled
      AND position(',' || NEW.status || ',' IN w.events) > 0
    UNION ALL
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), NEW.account_id, NULL, j.callback_url,
           NEW.job_id, NEW.version, 'job.' || NEW.status, 'pending', 0, NEW.event_time, NEW.event_time
    FROM jobs j
    WHERE j.id = NEW.job_id AND NEW.status <> 'processing' AND j.callback_url IS NOT NULL;
    RETURN NULL;
END
$$
"""
_POSTGRES_OUTBOX_TRIGGER = """
CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events FOR EACH ROW
    WHEN (NEW.status IN ('processing', 'completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION imagegen_webhook_outbox()
"""
_SQLITE_OUTBOX = """
CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events
WHEN NEW.status IN ('processing', 'completed', 'failed', 'cancelled')
BEGIN
    INSERT INTO webhook_deliveries (id, account_id, endpoint_id, url, job_id, job_version, event_type,
                                    status, attempts, next_attempt_at, create_time)
    SELECT 'msg_' || lower(hex(randomblob(16))), NEW.account_id, w.id, NULL, NEW.job_id, NEW.version,
           'job.' || NEW.status, 'pending', 0, NEW.event_time, NEW.event_time
    FROM webhook_endpoints w
    WHERE w.account_id = NEW.account_id AND w.enabled AND instr(w.events, ',' || NEW.status || ',') > 0
    UNION ALL
    SELECT 'msg_' || lower(hex(randomblob(16))), NEW.account_id, NULL, j.callback_url, NEW.job_id,
           NEW.version, 'job.' || NEW.status, 'pending', 0, NEW.event_time, NEW.event_time
    FROM jobs j
    WHERE j.id = NEW.job_id AND NEW.status <> 'processing' AND j.callback_url IS NOT NULL;
END
"""


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("sequence", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_job_events_account_sequence",
        "job_events",
        ["account_id", "sequence"],
        postgresql_where=sa.text("sequence IS NOT NULL"),
        sqlite_where=sa.text("sequence IS NOT NULL"),
    )
    op.create_index(
        "ix_job_events_unsequenced",
        "job_events",
        ["id"],
        postgresql_where=sa.text("sequence IS NULL"),
        sqlite_where=sa.text("sequence IS NULL"),
    )
    sequencer = op.create_table(
        "event_sequencer",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("pruned_through", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_sequencer"),
    )
    op.bulk_insert(sequencer, [{"id": 1, "last_sequence": 0, "pruned_through": 0}])
    op.create_table(
        "webhook_secrets",
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_expires_at", UtcDateTime(), nullable=True),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_webhook_secrets"),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", sa.String(128), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoints"),
    )
    op.create_index("ix_webhook_endpoints_account_id", "webhook_endpoints", ["account_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("endpoint_id", sa.String(40), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("job_version", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("delivered_time", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_account_created", "webhook_deliveries", ["account_id", "create_time"]
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRES_OUTBOX)
        op.execute(_POSTGRES_OUTBOX_TRIGGER)
    else:
        op.execute(_SQLITE_OUTBOX)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER job_events_webhook_outbox ON job_events")
        op.execute("DROP FUNCTION imagegen_webhook_outbox()")
    else:
        op.execute("DROP TRIGGER job_events_webhook_outbox")
    op.drop_index("ix_webhook_deliveries_account_created", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhook_endpoints_account_id", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
    op.drop_table("webhook_secrets")
    op.drop_table("event_sequencer")
    op.drop_index("ix_job_events_unsequenced", table_name="job_events")
    op.drop_index("ix_job_events_account_sequence", table_name="job_events")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("sequence")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("callback_url")

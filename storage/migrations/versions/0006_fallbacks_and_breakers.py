"""fallback chains on jobs, and the vendors' circuit breakers

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("fallback_providers", _JSON, nullable=False, server_default=sa.text("'[]'"))
        )
        batch.add_column(
            sa.Column("fallback_on_moderation", sa.Boolean, nullable=False, server_default=sa.text("false"))
        )
        batch.add_column(sa.Column("fallback_options", _JSON, nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("active_provider", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("attempt_base", sa.Integer, nullable=False, server_default=sa.text("0")))
    # vendor caps count jobs by the model they run on: until now, always the one asked for
    op.execute("UPDATE jobs SET active_provider = provider WHERE active_provider = ''")
    op.create_table(
        "provider_breakers",
        sa.Column("vendor", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="closed"),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probes_claimed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("probes_succeeded", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("probes_failed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("provider_breakers")
    with op.batch_alter_table("jobs") as batch:
        for column in ("attempt_base", "active_provider", "fallback_options", "fallback_on_moderation"):
            batch.drop_column(column)
        batch.drop_column("fallback_providers")

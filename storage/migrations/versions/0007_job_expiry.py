"""when each job expires (request ttl or server retention), indexed for the retention sweeper

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("expire_time", UtcDateTime(), nullable=True))
    # Partial: jobs kept forever (NULL) cost the index nothing, and the column never changes after the
    # insert, so transitions stay HOT updates.
    op.create_index(
        "ix_jobs_expire_time",
        "jobs",
        ["expire_time"],
        postgresql_where=sa.text("expire_time IS NOT NULL"),
        sqlite_where=sa.text("expire_time IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_expire_time", table_name="jobs")
    op.drop_column("jobs", "expire_time")

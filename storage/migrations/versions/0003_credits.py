"""accounts with budgets, the credit ledger, and each job's reservation

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("balance_usd_micros", sa.BigInteger(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_accounts"),
    )
    op.create_table(
        "ledger",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_usd_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_usd_micros", sa.BigInteger(), nullable=False),
        sa.Column("time", UtcDateTime(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger"),
    )
    op.create_index("ix_ledger_account_id", "ledger", ["account_id", "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("reserved_usd_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reserved_usd_micros")
    op.drop_index("ix_ledger_account_id", table_name="ledger")
    op.drop_table("ledger")
    op.drop_table("accounts")

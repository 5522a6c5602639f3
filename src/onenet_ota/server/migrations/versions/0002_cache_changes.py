"""The cache change feed: cache_changes (server/changes.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_changes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("dev_id", sa.BigInteger(), nullable=True),
        sa.Column("xid", sa.BigInteger(), nullable=True),
        sa.Column("origin", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_changes")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_cache_changes_xid", "cache_changes", ["xid"], unique=False)
    op.create_index("ix_cache_changes_created_at", "cache_changes", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_cache_changes_created_at", table_name="cache_changes")
    op.drop_index("ix_cache_changes_xid", table_name="cache_changes")
    op.drop_table("cache_changes")

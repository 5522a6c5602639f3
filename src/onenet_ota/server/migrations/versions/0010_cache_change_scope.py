"""Cache change feed rows say what of the device changed.

``cache_changes`` gains ``scope`` (server/changes.py ``Scope``): 0, anything about the device
(its row, its keys, its tasks), or 1, only its device tasks and stored versions. Rows written
before, and by writers that do not say, read as 0: the widest, which drops every cached fact.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "cache_changes",
        sa.Column("scope", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("cache_changes") as batch:
        batch.drop_column("scope")

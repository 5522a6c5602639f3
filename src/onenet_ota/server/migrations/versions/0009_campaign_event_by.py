"""Campaign events say who acted.

``campaign_events`` gains ``by``: the API token's name for an operator's action, or
``system:campaigns`` for the evaluator's decision, the name the audit log records for the same
change. Events recorded before keep NULL: who took them is in the audit log only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("campaign_events", sa.Column("by", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaign_events") as batch:
        batch.drop_column("by")

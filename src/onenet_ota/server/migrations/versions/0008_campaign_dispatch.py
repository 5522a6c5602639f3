"""Campaign dispatch rate and dynamic membership.

``campaigns`` gains ``rate`` (the dispatch rate as JSON, NULL: every member at once),
``dynamic`` (newly matching devices join while it runs), ``dispatch_since_ms`` and
``dispatched`` (where the current stage's rate started and how many devices it has dispatched
since). ``campaign_devices`` gains ``pending`` (a member chosen for its stage whose device task
waits for the rate) and an index on ``dev_id``, so that the evaluator can tell which campaigns a
device's report concerns.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("campaigns", sa.Column("rate", sa.Text(), nullable=True))
    op.add_column(
        "campaigns", sa.Column("dynamic", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("campaigns", sa.Column("dispatch_since_ms", sa.BigInteger(), nullable=True))
    op.add_column(
        "campaigns",
        sa.Column("dispatched", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "campaign_devices",
        sa.Column("pending", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.create_index("ix_campaign_devices_dev_id", "campaign_devices", ["dev_id"])


def downgrade() -> None:
    op.drop_index("ix_campaign_devices_dev_id", table_name="campaign_devices")
    with op.batch_alter_table("campaign_devices") as batch:
        batch.drop_column("pending")
    with op.batch_alter_table("campaigns") as batch:
        for name in ("dispatched", "dispatch_since_ms", "dynamic", "rate"):
            batch.drop_column(name)

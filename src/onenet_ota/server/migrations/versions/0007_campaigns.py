"""Staged campaigns and device labels.

New tables only: ``device_labels`` (free-form ``key=value`` labels of devices), ``campaigns``,
``campaign_devices`` (members once activated), ``campaign_events`` (every decision and action,
unique per campaign version) and ``leases`` (the campaign evaluator's lease, one row made here).

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_labels",
        sa.Column("dev_id", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["dev_id"], ["devices.dev_id"], name="fk_device_labels_dev_id_devices"
        ),
        sa.PrimaryKeyConstraint("dev_id", "key", name="pk_device_labels"),
    )
    op.create_index("ix_device_labels_key_value", "device_labels", ["key", "value"])
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("module_type", sa.SmallInteger(), nullable=False),
        sa.Column("selector", sa.Text(), nullable=False),
        sa.Column("stages", sa.Text(), nullable=False),
        sa.Column("failure_classes", sa.Text(), server_default="{}", nullable=False),
        sa.Column("signal", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("power", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("retry", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("interval", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=True),
        sa.Column("deadline", sa.BigInteger(), nullable=True),
        sa.Column("salt", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.Integer(), server_default=sa.text("-1"), nullable=False),
        sa.Column("stage_started_at", sa.BigInteger(), nullable=True),
        sa.Column("activated_stage", sa.Integer(), server_default=sa.text("-1"), nullable=False),
        sa.Column("population", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"], name="fk_campaigns_package_id_packages"
        ),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name="fk_campaigns_pid_products"),
        sa.PrimaryKeyConstraint("id", name="pk_campaigns"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_campaigns_state", "campaigns", ["state"])
    op.create_table(
        "campaign_devices",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("dev_id", sa.BigInteger(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("activated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name="fk_campaign_devices_campaign_id_campaigns"
        ),
        sa.ForeignKeyConstraint(
            ["dev_id"], ["devices.dev_id"], name="fk_campaign_devices_dev_id_devices"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name="fk_campaign_devices_task_id_tasks"
        ),
        sa.PrimaryKeyConstraint("campaign_id", "dev_id", name="pk_campaign_devices"),
    )
    op.create_index(
        "ix_campaign_devices_campaign_id_stage", "campaign_devices", ["campaign_id", "stage"]
    )
    op.create_index("ix_campaign_devices_task_id", "campaign_devices", ["task_id"])
    op.create_table(
        "campaign_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=False),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=1000), nullable=False),
        sa.Column("numbers", sa.Text(), server_default="{}", nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name="fk_campaign_events_campaign_id_campaigns"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_events"),
        sa.UniqueConstraint("campaign_id", "version", name="uq_campaign_events_campaign_id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=64), server_default="", nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )
    op.execute("INSERT INTO leases (name, holder, expires_at) VALUES ('campaigns', '', 0)")


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("campaign_events")
    op.drop_index("ix_campaign_devices_task_id", table_name="campaign_devices")
    op.drop_index("ix_campaign_devices_campaign_id_stage", table_name="campaign_devices")
    op.drop_table("campaign_devices")
    op.drop_index("ix_campaigns_state", table_name="campaigns")
    op.drop_table("campaigns")
    op.drop_index("ix_device_labels_key_value", table_name="device_labels")
    op.drop_table("device_labels")

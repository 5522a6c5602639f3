"""Device timelines: ``device_task_events`` and ``device_task_bytes`` (server/timeline.py).

``device_task_events`` ids are never reused (SQLite AUTOINCREMENT, a PostgreSQL sequence), so a
history cursor names one row forever. ``device_task_bytes`` holds the bytes served per device
task, added to in batches by each worker.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_task_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("dev_id", sa.BigInteger(), nullable=False),
        sa.Column("device_task_id", sa.Integer(), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("dialect", sa.String(length=8), nullable=True),
        sa.Column("endpoint", sa.String(length=16), nullable=True),
        sa.Column("code", sa.SmallInteger(), nullable=True),
        sa.Column("errno", sa.SmallInteger(), nullable=True),
        sa.Column("from_state", sa.SmallInteger(), nullable=True),
        sa.Column("to_state", sa.SmallInteger(), nullable=True),
        sa.Column("detail", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_task_events")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_device_task_events_dev_id_id", "device_task_events", ["dev_id", "id"], unique=False
    )
    op.create_index(
        "ix_device_task_events_device_task_id",
        "device_task_events",
        ["device_task_id"],
        unique=False,
    )
    op.create_index(
        "uq_device_task_events_offered",
        "device_task_events",
        ["device_task_id", "dialect"],
        unique=True,
        sqlite_where=sa.text("kind = 'offered'"),
        postgresql_where=sa.text("kind = 'offered'"),
    )
    op.create_table(
        "device_task_bytes",
        sa.Column("device_task_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("served", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_task_id", name=op.f("pk_device_task_bytes")),
    )


def downgrade() -> None:
    op.drop_table("device_task_bytes")
    op.drop_index("uq_device_task_events_offered", table_name="device_task_events")
    op.drop_index("ix_device_task_events_device_task_id", table_name="device_task_events")
    op.drop_index("ix_device_task_events_dev_id_id", table_name="device_task_events")
    op.drop_table("device_task_events")

"""Initial schema: products, devices, packages, tasks, device tasks, tokens.

Matches onenet_ota.server.schema exactly; tests/server/test_db.py checks it with Alembic's
compare_metadata on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("access_key", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pid", name=op.f("pk_products")),
    )
    op.create_table(
        "devices",
        sa.Column("dev_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("auth_info", sa.String(length=256), nullable=False),
        sa.Column("device_key", sa.String(length=128), nullable=True),
        sa.Column("f_version", sa.String(length=20), nullable=True),
        sa.Column("s_version", sa.String(length=20), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name=op.f("fk_devices_pid_products")),
        sa.PrimaryKeyConstraint("dev_id", name=op.f("pk_devices")),
        sa.UniqueConstraint("pid", "name", name=op.f("uq_devices_pid")),
    )
    op.create_index("ix_devices_pid_auth_info", "devices", ["pid", "auth_info"], unique=False)

    op.create_table(
        "packages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("module_type", sa.SmallInteger(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("from_version", sa.String(length=20), nullable=True),
        sa.Column("target", sa.String(length=20), nullable=False),
        sa.Column("manuf", sa.String(length=32), nullable=True),
        sa.Column("model", sa.String(length=32), nullable=True),
        sa.Column("file_name", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "(kind = 2) = (from_version IS NOT NULL)", name=op.f("ck_packages_from_version")
        ),
        sa.CheckConstraint("kind IN (1, 2)", name=op.f("ck_packages_kind")),
        sa.CheckConstraint("module_type IN (1, 2)", name=op.f("ck_packages_module_type")),
        sa.CheckConstraint("size >= 1", name=op.f("ck_packages_size")),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name=op.f("fk_packages_pid_products")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packages")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("module_type", sa.SmallInteger(), nullable=False),
        sa.Column("signal", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("power", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("retry", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("interval", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=False),
        sa.Column("deadline", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"], name=op.f("fk_tasks_package_id_packages")
        ),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name=op.f("fk_tasks_pid_products")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index("ix_tasks_package_id", "tasks", ["package_id"], unique=False)

    op.create_table(
        "device_tasks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("dev_id", sa.BigInteger(), nullable=False),
        sa.Column("module_type", sa.SmallInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("paused_from", sa.SmallInteger(), nullable=True),
        sa.Column("progress", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("result_code", sa.SmallInteger(), nullable=True),
        sa.Column("current_token", sa.String(length=32), nullable=True),
        sa.Column("token_issued_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dev_id"], ["devices.dev_id"], name=op.f("fk_device_tasks_dev_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_device_tasks_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_tasks")),
        sa.UniqueConstraint("task_id", "dev_id", name=op.f("uq_device_tasks_task_id")),
    )
    op.create_index(
        "ix_device_tasks_task_id_state", "device_tasks", ["task_id", "state"], unique=False
    )
    op.create_index(
        "uq_device_tasks_open",
        "device_tasks",
        ["dev_id", "module_type"],
        unique=True,
        sqlite_where=sa.text("state IN (1, 2, 3, 7)"),
        postgresql_where=sa.text("state IN (1, 2, 3, 7)"),
    )

    op.create_table(
        "tokens",
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("device_task_id", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_task_id"],
            ["device_tasks.id"],
            name=op.f("fk_tokens_device_task_id_device_tasks"),
        ),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_tokens")),
    )
    op.create_index("ix_tokens_device_task_id", "tokens", ["device_task_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_tokens_device_task_id", table_name="tokens")

    op.drop_table("tokens")
    op.drop_index(
        "uq_device_tasks_open",
        table_name="device_tasks",
        sqlite_where=sa.text("state IN (1, 2, 3, 7)"),
        postgresql_where=sa.text("state IN (1, 2, 3, 7)"),
    )
    op.drop_index("ix_device_tasks_task_id_state", table_name="device_tasks")

    op.drop_table("device_tasks")
    op.drop_index("ix_tasks_package_id", table_name="tasks")

    op.drop_table("tasks")
    op.drop_table("packages")
    op.drop_index("ix_devices_pid_auth_info", table_name="devices")

    op.drop_table("devices")
    op.drop_table("products")

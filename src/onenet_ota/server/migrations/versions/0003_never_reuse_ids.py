"""Never reuse ids on SQLite: packages, tasks and device_tasks become AUTOINCREMENT tables.

Without AUTOINCREMENT, SQLite hands the largest rowid out again once its row is deleted, so a
repeated ``task delete 7`` (after a lost reply, say) could delete a newer task that got number 7.
AUTOINCREMENT is part of a table's CREATE statement, so each table is rebuilt (Alembic's batch
mode: create a copy, move the rows with their ids, drop the old table, rename the copy), rows,
constraints and indexes kept. The tables are spelled out here as of revision 0002 rather than
reflected, so that named CHECK constraints and the partial index come through exactly.

The rebuild drops tables that other tables refer to, which SQLite allows only with foreign keys
off; ``db.migration_transaction`` switches them off around the migration and checks every
reference before the commit.

PostgreSQL's serial columns draw from sequences, which never hand a number out twice: nothing to
do there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN_STATES = "state IN (1, 2, 3, 7)"


def _tables(autoincrement: bool) -> list[sa.Table]:
    """packages, tasks and device_tasks as revision 0002 made them, optionally AUTOINCREMENT."""
    metadata = sa.MetaData()
    # Referred-to tables, so that the foreign keys below resolve; never created here.
    sa.Table("products", metadata, sa.Column("pid", sa.String(32), primary_key=True))
    sa.Table("devices", metadata, sa.Column("dev_id", sa.BigInteger(), primary_key=True))
    packages = sa.Table(
        "packages",
        metadata,
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
            "(kind = 2) = (from_version IS NOT NULL)", name="ck_packages_from_version"
        ),
        sa.CheckConstraint("kind IN (1, 2)", name="ck_packages_kind"),
        sa.CheckConstraint("module_type IN (1, 2)", name="ck_packages_module_type"),
        sa.CheckConstraint("size >= 1", name="ck_packages_size"),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name="fk_packages_pid_products"),
        sa.PrimaryKeyConstraint("id", name="pk_packages"),
        sqlite_autoincrement=autoincrement,
    )
    tasks = sa.Table(
        "tasks",
        metadata,
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
            ["package_id"], ["packages.id"], name="fk_tasks_package_id_packages"
        ),
        sa.ForeignKeyConstraint(["pid"], ["products.pid"], name="fk_tasks_pid_products"),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.Index("ix_tasks_package_id", "package_id"),
        sqlite_autoincrement=autoincrement,
    )
    device_tasks = sa.Table(
        "device_tasks",
        metadata,
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
            ["dev_id"], ["devices.dev_id"], name="fk_device_tasks_dev_id_devices"
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_device_tasks_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_device_tasks"),
        sa.UniqueConstraint("task_id", "dev_id", name="uq_device_tasks_task_id"),
        sa.Index("ix_device_tasks_task_id_state", "task_id", "state"),
        sa.Index(
            "uq_device_tasks_open",
            "dev_id",
            "module_type",
            unique=True,
            sqlite_where=sa.text(_OPEN_STATES),
            postgresql_where=sa.text(_OPEN_STATES),
        ),
        sqlite_autoincrement=autoincrement,
    )
    return [packages, tasks, device_tasks]


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in _tables(autoincrement):
        with op.batch_alter_table(
            table.name,
            copy_from=table,
            recreate="always",
            table_kwargs={"sqlite_autoincrement": autoincrement},
        ):
            pass


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)

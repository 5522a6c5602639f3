"""Accounts for ``userid/{uid}`` tokens (spec §13.3, F2, F12) and the products they own.

A new ``accounts`` table, and ``products.account_uid``: the account a product belongs to, if
any (nullable, a foreign key to ``accounts.uid``, indexed for "the products of this account").

SQLite adds a column with a foreign key only by rebuilding the table, so ``products`` goes
through Alembic's batch mode (create a copy, move the rows, drop the old table, rename the copy),
rows kept. ``products`` is spelled out as revision 0003 left it rather than reflected, so that
the copy is exactly that table. The rebuild drops a table that devices, packages and tasks refer
to, which SQLite allows only with foreign keys off; ``db.migration_transaction`` switches them
off around the migration and checks every reference before the commit. PostgreSQL alters the
table in place.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _products() -> sa.Table:
    """``products`` as revision 0001 made it (0002 and 0003 left it alone)."""
    return sa.Table(
        "products",
        sa.MetaData(),
        sa.Column("pid", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("access_key", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pid", name="pk_products"),
    )


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("uid", sa.String(length=19), nullable=False),
        sa.Column("name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("access_key", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("uid", name="pk_accounts"),
    )
    with op.batch_alter_table("products", copy_from=_products()) as batch:
        batch.add_column(sa.Column("account_uid", sa.String(length=19), nullable=True))
        batch.create_foreign_key(
            "fk_products_account_uid_accounts", "accounts", ["account_uid"], ["uid"]
        )
        batch.create_index("ix_products_account_uid", ["account_uid"], unique=False)


def downgrade() -> None:
    products = _products()
    products.append_column(sa.Column("account_uid", sa.String(length=19), nullable=True))
    products.append_constraint(
        sa.ForeignKeyConstraint(
            ["account_uid"], ["accounts.uid"], name="fk_products_account_uid_accounts"
        )
    )
    sa.Table("accounts", products.metadata, sa.Column("uid", sa.String(19), primary_key=True))
    op.drop_index("ix_products_account_uid", table_name="products")
    with op.batch_alter_table("products", copy_from=products) as batch:
        batch.drop_constraint("fk_products_account_uid_accounts", type_="foreignkey")
        batch.drop_column("account_uid")
    op.drop_table("accounts")

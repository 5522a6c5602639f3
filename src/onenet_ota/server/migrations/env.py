"""Alembic environment. The server calls :func:`onenet_ota.server.db.migrate`, which hands over an
open connection (already inside a locked transaction) through ``config.attributes``; the alembic
CLI instead passes the database URL with ``-x url=...``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from onenet_ota.server.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from onenet_ota.server.db import create_engine, migration_transaction

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=DATABASE_URL upgrade head")
    engine = create_engine(url, pool_size=1)
    try:
        with migration_transaction(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
_run_online()

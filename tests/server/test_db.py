"""server/db.py: engines, migrations (against schema.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from onenet_ota.server import db, schema
from onenet_ota.server.db import create_engine, migrate, normalize_url


def _normalize_default(value: str | None) -> str | None:
    # Reflection spells the same default differently per database ("''", "'active'::character
    # varying", "(0)"); compare the literal values.
    if value is None:
        return None
    value = value.strip()
    while value.startswith("(") and value.endswith(")"):
        value = value[1:-1].strip()
    value = re.sub(r"::[a-z ]+$", "", value)
    return value.strip("'\"")


def _compare_default(
    _context: object,
    _inspected_column: object,
    _metadata_column: object,
    inspected_default: str | None,
    _metadata_default: object,
    rendered_metadata_default: str | None,
) -> bool:
    return _normalize_default(inspected_default) != _normalize_default(rendered_metadata_default)


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": _compare_default}
        )
        return list(compare_metadata(context, schema.metadata))


def test_migrated_schema_equals_schema_py(engine: Engine) -> None:
    assert _diff(engine) == []


def test_migrations_reach_head_and_rerun_is_a_no_op(engine: Engine) -> None:
    migrate(engine)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0010"
    assert _diff(engine) == []


def test_empty_database_differs_from_schema(db_url: str) -> None:
    # Guards the comparison itself: an unmigrated database must show differences.
    eng = create_engine(db_url)
    try:
        assert _diff(eng) != []
    finally:
        eng.dispose()


def test_concurrent_migrations_are_serialised(db_url: str) -> None:
    engines = [create_engine(db_url, pool_size=1) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def run(eng: Engine) -> None:
        try:
            barrier.wait()
            migrate(eng)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(eng,)) for eng in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert _diff(engines[0]) == []
        with engines[0].connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        for eng in engines:
            eng.dispose()


def test_many_connections_opening_a_fresh_sqlite_file_at_once_all_get_wal(tmp_path: Path) -> None:
    # Each new connection switches the file to WAL; when several try at once SQLite reports
    # "database is locked" without waiting (a lock deadlock, not a busy lock). Seen in CI as a
    # failing concurrent migration; without the retry this loop fails in about one round in ten.
    rounds, width = 25, 4
    errors: list[BaseException] = []
    modes: list[str] = []
    for round_no in range(rounds):
        url = f"sqlite:///{tmp_path}/fresh-{round_no}.db"
        engines = [create_engine(url, pool_size=1) for _ in range(width)]
        barrier = threading.Barrier(width)

        def connect(eng: Engine, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                with eng.connect() as conn:
                    modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=connect, args=(eng,)) for eng in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for eng in engines:
            eng.dispose()
    assert errors == []
    assert modes == ["wal"] * rounds * width


def test_wal_switch_gives_up_on_other_errors_and_after_the_busy_timeout() -> None:
    class Cursor:
        def __init__(self, message: str) -> None:
            self.message = message
            self.calls = 0

        def execute(self, _sql: str) -> Cursor:
            self.calls += 1
            raise sqlite3.OperationalError(self.message)

    other = Cursor("disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        db._enable_wal(other)  # type: ignore[arg-type]
    assert other.calls == 1

    clock = iter([0.0, 1.0, 5.0, 11.0])
    locked = Cursor("database is locked")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db._enable_wal(locked, clock=lambda: next(clock), sleep=lambda _s: None)  # type: ignore[arg-type]
    assert locked.calls == 3  # at 1 s, 5 s and 11 s; the deadline was 10 s


def test_integrity_errors_tell_a_missing_reference_from_a_duplicate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(schema.products).values(pid="1", access_key="k", created_at=0))
    device = {"dev_id": 7, "name": "d", "auth_info": "d", "created_at": 0}
    with pytest.raises(IntegrityError) as missing, engine.begin() as conn:
        conn.execute(insert(schema.devices).values(pid="2", **device))
    assert db.is_foreign_key_violation(missing.value)
    with pytest.raises(IntegrityError) as duplicate, engine.begin() as conn:
        conn.execute(insert(schema.products).values(pid="1", access_key="k", created_at=0))
    assert not db.is_foreign_key_violation(duplicate.value)
    assert not db.is_transient(duplicate.value)


def test_one_open_device_task_per_device_and_type(engine: Engine) -> None:
    # D23 is enforced by the migrated partial unique index, not only by schema.py.
    with engine.begin() as conn:
        conn.execute(insert(schema.products).values(pid="1", access_key="k", created_at=0))
        conn.execute(
            insert(schema.devices).values(dev_id=7, pid="1", name="d", auth_info="d", created_at=0)
        )
        conn.execute(
            insert(schema.packages).values(
                id=1, pid="1", module_type=1, kind=1, target="2", file_name="f",
                size=1, md5="0" * 32, sha256="0" * 64, created_at=0,
            )
        )  # fmt: skip
        for task_id in (1, 2, 3):
            conn.execute(
                insert(schema.tasks).values(
                    id=task_id, pid="1", package_id=1, module_type=1, start_time=0, created_at=0
                )
            )
        conn.execute(
            insert(schema.device_tasks).values(
                task_id=1, dev_id=7, module_type=1, state=5, updated_at=0
            )
        )
        conn.execute(
            insert(schema.device_tasks).values(
                task_id=2, dev_id=7, module_type=1, state=1, updated_at=0
            )
        )
    second_open = insert(schema.device_tasks).values(
        task_id=3, dev_id=7, module_type=1, state=7, updated_at=0
    )
    with engine.begin() as conn, pytest.raises(IntegrityError):
        conn.execute(second_open)
    with engine.connect() as conn:
        count = conn.execute(select(schema.device_tasks.c.id)).all()
    assert len(count) == 2


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: object) -> None:
    eng = create_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        eng.dispose()


def test_all_tables_created(engine: Engine) -> None:
    names = set(inspect(engine).get_table_names())
    assert set(schema.metadata.tables) <= names


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u:p@h:5/db", "postgresql+psycopg://u:p@h:5/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_errors_never_carry_statement_parameters(engine: Engine) -> None:
    # Parameters include download tokens and keys; a logged database error must not show them.
    secret = "ota_SECRETsecretSECRET1"
    with engine.begin() as conn:
        conn.execute(insert(schema.products).values(pid="9", access_key="k", created_at=0))
    with pytest.raises(IntegrityError) as excinfo, engine.begin() as conn:
        conn.execute(insert(schema.tokens).values(token=secret, device_task_id=999, issued_at=0))
    assert secret not in str(excinfo.value)


# ------------------------------------------------------------------------- prepared statements

_PRODUCT = insert(schema.products).values(
    pid=bindparam("pid"), access_key=bindparam("key"), created_at=0
)
_PRODUCT_KEY = select(schema.products.c.pid, schema.products.c.access_key).where(
    schema.products.c.pid == bindparam("pid")
)
_SET_KEY = (
    update(schema.products)
    .where(schema.products.c.pid == bindparam("pid"))
    .values(access_key=bindparam("key"))
)


def test_prepared_statements_write_and_read_inside_the_callers_transaction(
    engine: Engine,
) -> None:
    insert_product, read_key, set_key = (
        db.Prepared(_PRODUCT),
        db.Prepared(_PRODUCT_KEY),
        db.Prepared(_SET_KEY),
    )
    with engine.begin() as conn:
        assert insert_product.run(conn, {"pid": "1", "key": "a"}) == 1
        assert insert_product.run(conn, {"pid": "2", "key": "b"}) == 1
        assert set_key.run(conn, {"pid": "2", "key": "c"}) == 1
        assert set_key.run(conn, {"pid": "404", "key": "c"}) == 0  # compare-and-set: no row
        found = read_key.first(conn, {"pid": "2"})
        assert found is not None
        assert (found.pid, found.access_key) == ("2", "c")
        assert read_key.first(conn, {"pid": "404"}) is None
        assert [tuple(row) for row in read_key.all(conn, {"pid": "1"})] == [("1", "a")]
    # Committed with the transaction; a transaction rolled back takes them away with it.
    with contextlib.suppress(RuntimeError), engine.begin() as conn:
        set_key.run(conn, {"pid": "1", "key": "lost"})
        raise RuntimeError
    with engine.connect() as conn:
        keys = conn.execute(select(schema.products.c.access_key).order_by("pid")).scalars()
        assert list(keys) == ["a", "c"]


def test_prepared_statements_run_only_inside_a_transaction(engine: Engine) -> None:
    # Core would begin one on its own; a statement sent to the driver alone would not tell it.
    with engine.connect() as conn, pytest.raises(RuntimeError, match="inside"):
        db.Prepared(_PRODUCT).run(conn, {"pid": "1", "key": "a"})


def test_prepared_statement_errors_are_cores_and_reach_its_listeners(engine: Engine) -> None:
    # The device service retries a transaction on IntegrityError (a token collision) and the
    # metrics count errors through handle_error: both as for a statement run through Core.
    secret = "ota_SECRETsecretSECRET2"
    seen: list[BaseException] = []
    event.listen(engine, "handle_error", lambda context: seen.append(context.original_exception))
    insert_product = db.Prepared(_PRODUCT)
    with engine.begin() as conn:
        insert_product.run(conn, {"pid": "1", "key": "a"})
    with pytest.raises(IntegrityError) as excinfo, engine.begin() as conn:
        insert_product.run(conn, {"pid": "1", "key": secret})
    assert not db.is_foreign_key_violation(excinfo.value)
    assert secret not in str(excinfo.value)  # parameters hidden, as create_engine sets
    assert len(seen) == 1
    assert seen[0] is excinfo.value.orig


def test_prepared_statements_reach_cursor_event_listeners(engine: Engine) -> None:
    # Tests pause a transaction inside its statements through these events (tests/server/races).
    statements: list[tuple[str, int]] = []

    def after(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        statements.append((statement.split()[0], cursor.rowcount))

    event.listen(engine, "after_cursor_execute", after)
    try:
        with engine.begin() as conn:
            db.Prepared(_PRODUCT).run(conn, {"pid": "1", "key": "a"})
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert ("INSERT", 1) in statements


def test_prepared_statements_reach_listeners_of_the_connection_itself(engine: Engine) -> None:
    # A listener on one Connection (not its engine) sees the statements run on it, before and
    # after, as Core's own statements would.
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append("before " + statement.split()[0])

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append("after " + statement.split()[0])

    with engine.begin() as conn:
        event.listen(conn, "before_cursor_execute", before)
        event.listen(conn, "after_cursor_execute", after)
        db.Prepared(_PRODUCT).run(conn, {"pid": "2", "key": "a"})
    assert seen == ["before INSERT", "after INSERT"]


def test_prepared_statements_close_every_cursor_they_open(engine: Engine) -> None:
    # run, first and all share one execute-and-close path: each cursor is closed after use,
    # also when fetching from it fails.
    cursors: list[Any] = []

    def after(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.startswith("BEGIN"):
            cursors.append(cursor)

    read_key = db.Prepared(_PRODUCT_KEY)
    event.listen(engine, "after_cursor_execute", after)
    try:
        with engine.begin() as conn:
            db.Prepared(_PRODUCT).run(conn, {"pid": "1", "key": "a"})
            read_key.first(conn, {"pid": "1"})
            read_key.all(conn, {"pid": "1"})
            with pytest.raises(ZeroDivisionError):
                read_key._execute(conn, {"pid": "1"}, lambda _cursor: 1 // 0)
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert len(cursors) == 4
    for cursor in cursors:
        # sqlite3 refuses a closed cursor; psycopg says so.
        closed = getattr(cursor, "closed", None)
        if closed is None:
            with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
                cursor.fetchall()
        else:
            assert closed


# ------------------------------------------------------------------------------ ids never reused

_PACKAGE = {
    "pid": "1", "module_type": 1, "kind": 1, "target": "2", "file_name": "f", "size": 1,
    "md5": "0" * 32, "sha256": "0" * 64, "created_at": 0,
}  # fmt: skip
_TASK = {"pid": "1", "module_type": 1, "start_time": 0, "created_at": 0}


def _new_id(conn: Connection, table: Table, **row: object) -> int:
    return int(conn.execute(insert(table).values(**row).returning(table.c.id)).scalar_one())


def _parents(conn: Connection) -> None:
    conn.execute(insert(schema.products).values(pid="1", access_key="k", created_at=0))
    conn.execute(
        insert(schema.devices).values(dev_id=7, pid="1", name="d", auth_info="d", created_at=0)
    )


def _create_delete_create(engine: Engine, table: Table, **row: object) -> tuple[int, int]:
    """Insert a row, delete it, insert again; returns both ids."""
    with engine.begin() as conn:
        first = _new_id(conn, table, **row)
    with engine.begin() as conn:
        conn.execute(delete(table).where(table.c.id == first))
    with engine.begin() as conn:
        second = _new_id(conn, table, **row)
    return first, second


def test_deleted_ids_are_never_handed_out_again(engine: Engine) -> None:
    # A repeated "task delete N" (after a lost reply) must not delete a newer task that got the
    # freed number: SQLite reuses the largest rowid unless the table is AUTOINCREMENT.
    with engine.begin() as conn:
        _parents(conn)
        package_id = _new_id(conn, schema.packages, **_PACKAGE)
        task_id = _new_id(conn, schema.tasks, package_id=package_id, **_TASK)
    device_task = {"task_id": task_id, "dev_id": 7, "module_type": 1, "state": 5, "updated_at": 0}
    token = {"name": "t", "role": "viewer", "secret_hash": "0" * 64, "created_at": 0}
    entry = {"created_at": 0, "actor": "a", "action": "x.y", "target": "x:1"}
    for table, row in (
        (schema.api_tokens, token),
        (schema.audit_log, entry),
        (schema.packages, _PACKAGE),
        (schema.tasks, {"package_id": package_id, **_TASK}),
        (schema.device_tasks, device_task),
    ):
        first, second = _create_delete_create(engine, table, **row)
        assert second > first, table.name


Shape = dict[str, list[str]]


def _shape(conn: Connection) -> Shape:
    """The tables of schema.py that the database has, with the columns it has of each: an
    older revision lacks some of both."""
    inspector = inspect(conn)
    present = set(inspector.get_table_names())
    return {
        name: [c["name"] for c in inspector.get_columns(name) if c["name"] in table.c]
        for name, table in schema.metadata.tables.items()
        if name in present and name != "cache_changes"
    }


def _rows(conn: Connection, shape: Shape | None = None) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tables and columns of ``shape`` (by default, all the database has)."""
    shape = _shape(conn) if shape is None else shape
    rows = {}
    for name, columns in shape.items():
        table = schema.metadata.tables[name]
        query = select(*(table.c[c] for c in columns)).order_by(*table.primary_key)
        rows[name] = [tuple(row) for row in conn.execute(query)]
    return rows


def test_upgrade_to_never_reused_ids_keeps_every_row(db_url: str) -> None:
    eng = create_engine(db_url)
    try:
        migrate(eng, "0002")
        with eng.begin() as conn:
            _parents(conn)
            packages = [_new_id(conn, schema.packages, **_PACKAGE) for _ in range(3)]
            conn.execute(delete(schema.packages).where(schema.packages.c.id == packages[2]))
            tasks = [_new_id(conn, schema.tasks, package_id=packages[0], **_TASK) for _ in range(2)]
            device_task = _new_id(
                conn, schema.device_tasks,
                task_id=tasks[1], dev_id=7, module_type=1, state=2, updated_at=0,
            )  # fmt: skip
            conn.execute(
                insert(schema.tokens).values(
                    token="t" * 32, device_task_id=device_task, issued_at=0
                )
            )
            shape = _shape(conn)
            before = _rows(conn, shape)
        migrate(eng)
        with eng.connect() as conn:
            assert _rows(conn, shape) == before
            if eng.dialect.name == "sqlite":
                found = conn.execute(
                    text("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
                )
                created: dict[str, str] = {name: sql for name, sql in found}
                for name in ("packages", "tasks", "device_tasks"):
                    assert "AUTOINCREMENT" in created[name], created[name]
                assert "WHERE state IN (1, 2, 3, 7)" in created["uq_device_tasks_open"]
                assert "ck_packages_from_version" in created["packages"]
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert _diff(eng) == []
        # The references survived the rebuild: they are still enforced.
        with pytest.raises(IntegrityError), eng.begin() as conn:
            conn.execute(
                insert(schema.tokens).values(token="u" * 32, device_task_id=999, issued_at=0)
            )
        first, second = _create_delete_create(eng, schema.tasks, package_id=packages[0], **_TASK)
        assert second > first > tasks[1]
    finally:
        eng.dispose()


# ------------------------------------------------------------------------------ accounts (0004)


def _downgrade(engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(db.MIGRATIONS_DIR / "alembic.ini"))
    with db.migration_transaction(engine) as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_upgrade_to_accounts_keeps_every_row(db_url: str) -> None:
    eng = create_engine(db_url)
    try:
        migrate(eng, "0003")
        with eng.begin() as conn:
            _parents(conn)
            conn.execute(
                insert(schema.products).values(pid="2", name="two", access_key="k2", created_at=5)
            )
            package_id = _new_id(conn, schema.packages, **_PACKAGE)
            task_id = _new_id(conn, schema.tasks, package_id=package_id, **_TASK)
            _new_id(
                conn, schema.device_tasks,
                task_id=task_id, dev_id=7, module_type=1, state=2, updated_at=0,
            )  # fmt: skip
            shape = _shape(conn)
            before = _rows(conn, shape)
        assert "accounts" not in shape
        assert "account_uid" not in shape["products"]
        migrate(eng)
        with eng.connect() as conn:
            assert _rows(conn, shape) == before
            owners = conn.execute(select(schema.products.c.account_uid)).scalars().all()
            assert owners == [None, None]
            assert conn.execute(select(schema.accounts)).all() == []
            if eng.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert _diff(eng) == []
        # The new reference is enforced, and the old ones survived the rebuild.
        with pytest.raises(IntegrityError), eng.begin() as conn:
            conn.execute(
                schema.products.update()
                .where(schema.products.c.pid == "1")
                .values(account_uid="42")
            )
        with pytest.raises(IntegrityError), eng.begin() as conn:
            conn.execute(
                insert(schema.devices).values(
                    dev_id=8, pid="none", name="e", auth_info="e", created_at=0
                )
            )
        with eng.begin() as conn:
            conn.execute(insert(schema.accounts).values(uid="42", access_key="k", created_at=0))
            conn.execute(
                schema.products.update()
                .where(schema.products.c.pid == "1")
                .values(account_uid="42")
            )
        # And back: the column and the table go, the products stay.
        with eng.begin() as conn:
            conn.execute(schema.products.update().values(account_uid=None))
        _downgrade(eng, "0003")
        with eng.connect() as conn:
            assert _shape(conn) == shape
            assert _rows(conn, shape) == before
    finally:
        eng.dispose()

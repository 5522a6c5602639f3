"""Database engines: SQLite (the embedded default, WAL) and PostgreSQL, by URL.

SQLAlchemy Core with prebuilt statements; no ORM on the hot paths (measured several times slower on
SQLite: docs/performance.md).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy import create_engine as _sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from onenet_ota.server.schema import metadata

T = TypeVar("T")

IN_LIST_CHUNK: Final = 500
"""Rows per ``IN (...)`` list and per executemany batch: SQLite binds at most 32,766 parameters
a statement, and a shorter list keeps each statement's plan and memory small on both databases."""


def chunks(items: Sequence[T], size: int = IN_LIST_CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and pin the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


_BUSY_TIMEOUT_MS = 10_000
_WAL_RETRY_SLEEP = 0.005


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _enable_wal(
    cursor: sqlite3.Cursor,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Switch the database to WAL, retrying while another connection holds it locked.

    Switching a new database to WAL needs its exclusive lock. When several connections try at
    once (servers or tools started together on a fresh file), each holds a shared lock while it
    waits for the exclusive one; SQLite detects the deadlock and answers "database is locked"
    at once, without calling the busy handler. So the busy timeout does not cover this step,
    and the retry here does, within the same time limit.
    """
    deadline = clock() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or clock() >= deadline:
                raise
        sleep(_WAL_RETRY_SLEEP)


PING_AFTER_S: Final = 1.0
"""A pooled PostgreSQL connection idle at least this long is tested before
use (:class:`_IdlePing`)."""


IDLE_SINCE: Final = "onenet_ota_idle_since"
"""The key, in a pooled connection's ``info``, of when it went back to the pool (monotonic
seconds); absent before its first use."""


def create_engine(url: str, *, pool_size: int = 8, ping_after: float = PING_AFTER_S) -> Engine:
    """An engine for ``url`` with this project's settings (WAL and pragmas on SQLite; on
    PostgreSQL, a pooled connection idle for ``ping_after`` seconds is tested before use).

    Statement parameters are hidden from error messages: they include download tokens and keys.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = _sa_create_engine(
            url,
            connect_args={"check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size,
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take control so that write
        # transactions start with BEGIN IMMEDIATE and never deadlock on lock upgrades, while
        # read transactions (engine.connect() without begin()) take no lock (_SQLiteConnection).
        event.listen(engine, "connect", _disable_pysqlite_begin)
        event.listen(engine, "begin", _begin)
        engine._connection_cls = _SQLiteConnection
        return engine
    engine = _sa_create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, hide_parameters=True
    )
    pinger = _IdlePing(engine.dialect, ping_after)
    event.listen(engine, "checkin", pinger.checkin)
    event.listen(engine, "checkout", pinger.checkout)
    return engine


class _IdlePing:
    """Test a pooled connection before use, as SQLAlchemy's ``pool_pre_ping`` does, but only
    when it sat idle in the pool for ``after`` seconds or more.

    Why: the test is a round trip, and ``pool_pre_ping`` makes it on every checkout, so on
    every transaction; a busy server (a fleet upgrading) spent one round trip in nine on it.
    A connection that served a transaction a moment ago is very likely alive; one that sat idle
    may have been cut while nobody looked (the database restarted, a proxy timed it out), which
    is what the test is for. A connection cut within ``after`` seconds of its last use fails
    its first statement instead: the device service runs such a transaction again
    (:func:`is_lost_before_commit`), and Core invalidates the pool on that error, so the other
    idle connections are replaced rather than tried.
    """

    __slots__ = ("_after", "_dialect")

    def __init__(self, dialect: Dialect, after: float) -> None:
        self._dialect = dialect
        self._after = after

    def checkin(self, _dbapi_conn: Any, record: Any) -> None:
        record.info[IDLE_SINCE] = time.monotonic()

    def checkout(self, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(IDLE_SINCE)
        if since is None or time.monotonic() - since < self._after:
            return  # new, or used a moment ago
        try:
            self._dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (a new one if need be).
            raise DisconnectionError(f"a pooled connection was lost: {exc}") from exc


def _disable_pysqlite_begin(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.isolation_level = None


class _SQLiteConnection(Connection):
    """A connection that tells the ``begin`` event how its transaction started.

    ``engine.begin()`` and ``conn.begin()`` start a **write** transaction: BEGIN IMMEDIATE takes
    SQLite's write lock at once, so a transaction that reads and then writes never has to upgrade
    its lock (an upgrade fails at once with "database is locked" when another connection wrote
    since the read, whatever the busy timeout). A statement run on ``engine.connect()`` without
    ``begin()`` starts a **read** transaction (SQLAlchemy's autobegin): a plain BEGIN, which in
    WAL mode reads a snapshot and never waits for a writer. Were reads to take the write lock
    too, every reader would queue behind every writer (a management GET behind a bulk import),
    and a reader polling often (a dashboard, a benchmark) would starve the writers, whose busy
    handler backs off to 100 ms sleeps, until one gave up with "database is locked".

    A read transaction must not write: the project's writes all go through ``begin()``.
    """

    _reading = False

    def _autobegin(self) -> None:
        self._reading = True
        try:
            super()._autobegin()
        finally:
            self._reading = False


def _begin(conn: Any) -> None:
    # Straight to the driver (as Prepared runs statements), through Core's error handling.
    _driver_execute(conn, "BEGIN" if getattr(conn, "_reading", False) else "BEGIN IMMEDIATE", ())


def _driver_execute(conn: Connection, sql: str, args: Any) -> Any:
    """Run ``sql`` on ``conn``'s DBAPI connection; an open cursor, or Core's exception.

    Listeners of the cursor events (``before_cursor_execute``, ``after_cursor_execute``) see the
    statement as they see Core's, without an execution context; checked first, so that an
    engine without listeners pays nothing for them. The engines here always have listeners of
    other events (connect, begin, handle_error), so the cursor events' own lists are asked:
    Core's joined dispatch builds a listener object per access (measured: 3 us a statement).
    """
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    if conn._has_events:  # listeners on Connection itself: Core's joined dispatch
        before: Any = conn.dispatch.before_cursor_execute
        after: Any = conn.dispatch.after_cursor_execute
    elif conn.engine._has_events:
        dispatch = conn.engine.dispatch
        before = dispatch.before_cursor_execute or None
        after = dispatch.after_cursor_execute or None
    else:
        before = after = None
    try:
        if before is not None:
            before(conn, cursor, sql, args, None, False)
        cursor.execute(sql, args)
        if after is not None:
            after(conn, cursor, sql, args, None, False)
    except Exception as exc:
        cursor.close()
        # Core's own handling of a driver error (the one every statement run through Core
        # gets): wrapped as a DBAPIError subclass with its parameters hidden, the engine's
        # handle_error listeners called (the metrics count them), and the connection
        # invalidated when the error says it was lost. Raises.
        conn._handle_dbapi_exception(exc, sql, args, cursor, None)
    return cursor


class Prepared:
    """A prebuilt statement compiled once per dialect and run straight on the DBAPI connection
    of the caller's Core :class:`~sqlalchemy.Connection`, inside its transaction.

    Why: every ``Connection.execute`` of a prebuilt statement still computes the statement's
    cache key, looks its compiled form up, builds an execution context and fires events. On
    SQLite that cost about 80 us a statement on the development machine against about 15 us for
    the same SQL on the driver, and the device API's write transactions run four to seven
    statements each. Errors go through Core's handling all the same (:func:`_driver_execute`).

    Only for statements whose parameters and columns need no type processing by SQLAlchemy
    (integers and strings, on pysqlite and psycopg) and which have no expanding parameters.
    Rows come back as named tuples of the statement's selected or returned columns.
    """

    __slots__ = ("_compiled", "_row", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, tuple[str, dict[str, Any], list[str] | None]] = {}
        names: list[str] = []
        columns = getattr(statement, "selected_columns", None)
        if columns is None:
            columns = getattr(statement, "returning_column_descriptions", None)
            names = [] if not columns else [c["name"] for c in columns]
        else:
            names = list(columns.keys())
        self._row: Any = namedtuple("Row", names) if names else None

    def _for(self, dialect: Dialect) -> tuple[str, dict[str, Any], list[str] | None]:
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            assert isinstance(compiled, SQLCompiler)
            sql = str(compiled)
            if "POSTCOMPILE" in sql:
                raise ValueError("Prepared cannot run statements with expanding parameters")
            order = list(compiled.positiontup or ()) if compiled.positional else None
            found = (sql, dict(compiled.params), order)
            self._compiled[dialect.name] = found
        return found

    def _args(self, conn: Connection, params: Mapping[str, Any]) -> tuple[str, Any]:
        if not conn.in_transaction():
            # Core would begin one on its first statement; the driver alone would not tell it.
            raise RuntimeError("Prepared statements run inside the caller's transaction")
        sql, defaults, order = self._for(conn.dialect)
        merged = {**defaults, **params} if defaults else params
        return sql, (merged if order is None else [merged[name] for name in order])

    def _execute(self, conn: Connection, params: Mapping[str, Any], fetch: Callable[[Any], T]) -> T:
        """Run the statement on ``conn`` and hand its cursor to ``fetch``; the cursor is closed
        whatever ``fetch`` does."""
        sql, args = self._args(conn, params)
        cursor = _driver_execute(conn, sql, args)
        try:
            return fetch(cursor)
        finally:
            cursor.close()

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute; the number of rows the statement changed."""
        return self._execute(conn, params, _rowcount)

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Any | None:
        """Execute; the first row, or None."""
        row = self._execute(conn, params, _fetchone)
        return None if row is None else self._row._make(row)

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """Execute; every row."""
        make = self._row._make
        return [make(row) for row in self._execute(conn, params, _fetchall)]


def _rowcount(cursor: Any) -> int:
    return int(cursor.rowcount)


def _fetchone(cursor: Any) -> Any:
    return cursor.fetchone()


def _fetchall(cursor: Any) -> Any:
    return cursor.fetchall()


# PostgreSQL's serialization_failure and deadlock_detected: the server rolled the transaction
# back, so nothing of it happened and running it again is safe.
_TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01"})
_FOREIGN_KEY_SQLSTATE: Final = "23503"


def sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of a PostgreSQL error (psycopg), or None (SQLite has none)."""
    state = getattr(exc.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: DBAPIError) -> bool:
    """Whether the database aborted the transaction only to break a deadlock or a
    serialisation conflict, so that running it again is safe and may well succeed."""
    return sqlstate(exc) in _TRANSIENT_SQLSTATES


def is_lost_before_commit(exc: DBAPIError, committing: bool) -> bool:
    """Whether the connection was lost while a transaction ran, before its COMMIT was sent:
    the database then rolled the transaction back with its session, so running it again on
    another connection is safe. A connection lost during COMMIT leaves unknown whether it
    committed: never run again."""
    return bool(exc.connection_invalidated) and not committing


def is_foreign_key_violation(exc: IntegrityError) -> bool:
    """Whether a row referred to was missing (deleted meanwhile), as opposed to a duplicate."""
    if sqlstate(exc) == _FOREIGN_KEY_SQLSTATE:
        return True
    # sqlite3 has no SQLSTATE; its message for this case is fixed.
    return "FOREIGN KEY constraint failed" in str(exc.orig)


def create_schema(engine: Engine) -> None:
    """Create every table directly. Deployments use :func:`migrate`; this is for quick tests."""
    metadata.create_all(engine)


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant naming this project's PostgreSQL advisory lock for migrations.
_MIGRATION_LOCK_KEY = 0x6F6E656E6574  # "onenet"


def lock_for_migration(connection: Connection) -> None:
    """Serialise schema migrations across processes and hosts, for the current transaction.

    PostgreSQL: a transaction-level advisory lock. SQLite: the engine already began the
    transaction with BEGIN IMMEDIATE, which holds the database's write lock until commit.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` with Alembic, in one locked transaction.

    Safe to call from several server processes starting at once: the first one migrates while
    the others wait for the lock, then find the schema current and do nothing.
    """
    from alembic import command
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    with migration_transaction(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@contextlib.contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One locked transaction (:func:`lock_for_migration`) for schema migrations.

    On SQLite, foreign keys are off for its duration: a migration that rebuilds a table (Alembic's
    batch mode) drops a table that other tables refer to, which SQLite refuses while they are on,
    and they can be switched only outside a transaction. Every reference is checked before the
    commit instead, so a migration cannot leave a dangling one behind.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _driver_pragma(connection, "PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                lock_for_migration(connection)
                yield connection
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
                    if broken is not None:
                        raise RuntimeError(f"migration left a dangling reference: {tuple(broken)}")
        finally:
            if sqlite:
                _driver_pragma(connection, "PRAGMA foreign_keys=ON")


def _driver_pragma(connection: Connection, pragma: str) -> None:
    # Straight to sqlite3: through SQLAlchemy the statement would begin a transaction first, inside
    # which SQLite ignores this pragma. The driver begins none itself (_disable_pysqlite_begin).
    dbapi = connection.connection.driver_connection
    assert isinstance(dbapi, sqlite3.Connection)
    dbapi.execute(pragma)

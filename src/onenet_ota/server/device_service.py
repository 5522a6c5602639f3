"""The device-side rules of the classic API over the database (spec §4.2, §5, §6; D3-D23).

Synchronous SQLAlchemy Core with prebuilt statements, at most one transaction per request; inside
it, the statements run on the transaction's driver connection (:class:`.db.Prepared`). Every
task transition goes through :mod:`onenet_ota.protocol.states`; nothing here decides a state by
itself, and the SQL that changes a device task's state is :mod:`.transitions`' (shared with the
management side).

Reads first. A request is first decided on a single-statement read (:class:`_Reader`: the prebuilt
statement, compiled once, run on a per-thread autocommit DBAPI connection). Most device requests
change nothing (polling E3, the E5 before every chunk, E6, refusals) and end there. As soon as the
decision needs a write, it is dropped and the request runs again, reading afresh, inside a Core
transaction (:meth:`DeviceService._read_first`). Measured on SQLite: Core ``begin`` + ``execute``
of E3's statement about 580 us, the same read this way about 25 us.

Concurrency. Several requests for one task, possibly in several server processes sharing one
database, are serialised by compare-and-set: every UPDATE of a device task names the state (or the
token) it read, and a transaction whose UPDATE matched no row is rolled back and run again. SQLite
takes its write lock at BEGIN (db.py), so there it never conflicts; on PostgreSQL (READ COMMITTED)
the re-evaluated WHERE clause is what detects a concurrent change. Writes go in one lock order,
device_tasks rows before the devices row, and deadlocks or serialisation failures are retried.

Caching (all in-process, in the service's :class:`~.device_caches.DeviceCaches`, each cache
bounded by the bytes it holds, keys included: :mod:`.bounded_cache`; an entry lives at most
``cache_ttl`` seconds, 30 s by default). Each method consults the caches for its own question
before the database:

- verified Authorization values -> the principal (pid, device), re-checked against ``et`` on use,
  and dropped with the device whose key verified them;
- ``dev_id`` -> (pid, name) for P3;
- E6's token -> (task state, token issue time, deadline, package file, size, file_name);
- per device, E3 answers (errno 0 or 11) and successful E5 answers that changed nothing, keyed by
  the question (type, version, manuf, model; or the token).

Token expiry, deadlines and start times are times, compared with the clock on every use, so they
are never stale. Changes are seen as follows:

- This process's own transitions drop the entries of their device at once (its answers and
  grants: :attr:`.changes.Scope.TASKS`, since a device's requests never change its row or keys);
  the management side in the same process calls :meth:`DeviceService.invalidate`. Both end in
  :meth:`.DeviceCaches.invalidate` or :meth:`.DeviceCaches.clear`.
- A device's creation, deletion and key rotation are in the feed like any change of the device,
  and dropping a device drops the tokens verified with its key: once a process has read the
  feed past such a change, it verifies the device's tokens against the database again, so a
  revoked key is refused from the next request after that read.
- Every transaction that changes something cached (here or in :mod:`.admin_service`) also writes a
  row to the change feed (:mod:`.changes`) in the same commit. :meth:`DeviceService.sync`, which
  the device API calls before every request, reads the feed at most every ``feed_interval``
  seconds (0.1 s) and drops what other processes changed. So for about 0.1 s another worker or
  host may still offer a task paused elsewhere, pass its E5 or serve it bytes; if the feed cannot
  be read, every cache is dropped until it can.
- Changes made outside the server (SQL typed into the database) are not in the feed: they are
  seen when the entries they affect reach ``cache_ttl``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import string
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Insert,
    Row,
    Select,
    Update,
    and_,
    bindparam,
    cast,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from onenet_ota import auth
from onenet_ota.protocol import values
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TID_MAX, TaskInfo, TidTaskInfo
from onenet_ota.protocol.states import (
    DOWNLOADABLE_STATES,
    OPEN_STATES,
    RUNNING_STATES,
    Action,
    TaskState,
    on_action,
    on_download,
    on_report,
    on_status_query,
    on_token_check,
    wire_status,
)
from onenet_ota.protocol.status import PackageKind, ReportKind, TaskType
from onenet_ota.server import changes, timeline
from onenet_ota.server.db import (
    IDLE_SINCE,
    PING_AFTER_S,
    Prepared,
    is_lost_before_commit,
    is_transient,
)
from onenet_ota.server.device_caches import (
    Answer,
    Clock,
    DeviceCaches,
    check_state_tid_key,
    check_task_key,
    check_tid_task_key,
    check_token_key,
    download_tid_key,
    reached_latest_key,
)
from onenet_ota.server.schema import (
    accounts,
    device_tasks,
    devices,
    packages,
    products,
    tasks,
    tokens,
)
from onenet_ota.server.transitions import (
    ConcurrentChange,
    apply_action,
    expire_deadlines,
    set_progress,
    set_state,
)

__all__ = [
    "Basis",
    "Clock",
    "DeviceRef",
    "DeviceService",
    "DownloadGrant",
    "Principal",
    "TidGrant",
    "new_token",
]

log = logging.getLogger(__name__)

_Row: TypeAlias = "Row[*tuple[Any, ...]]"
T = TypeVar("T")
InfoT = TypeVar("InfoT")

_ALPHANUMERIC: Final = string.ascii_letters + string.digits
_MAX_ATTEMPTS: Final = 8
# last_seen_at is informational; E3 polls refresh it at most this often, so a poll with an
# unchanged version stays a read-only transaction.
_LAST_SEEN_RESOLUTION_S: Final = 60
# What the device API's own writes change of a device (see _Tx.touched).
_TOUCHED: Final = changes.Scope.TASKS
DEFAULT_CACHE_TTL: Final = 30.0
"""Seconds a cached entry lives at most: the bound for changes the change feed does not carry."""
_OPEN_CODES: Final = tuple(int(s) for s in OPEN_STATES)
# Literal values: an IN over bound parameters is re-expanded on every execution (measured: a
# fifth of E3's statement time on SQLite).
_OPEN_LITERALS: Final[list[Any]] = [literal_column(str(code)) for code in sorted(_OPEN_CODES)]


# Random bytes to characters, uniformly: 248 = 4 x 62, so each of the bytes 0-247 stands for one
# character (its value modulo 62) and the eight above are dropped (rejection sampling). One
# ``secrets.token_bytes`` call instead of twenty ``secrets.choice`` (measured: about 40 us a
# token against 3).
_TOKEN_TABLE: Final = bytes(ord(_ALPHANUMERIC[b % 62]) for b in range(248)) + bytes(8)
_TOKEN_REJECTED: Final = bytes(range(248, 256))


def new_token() -> str:
    """A fresh download token: ``ota_`` + 20 random ``[A-Za-z0-9]`` from ``secrets`` (D13)."""
    need = values.TOKEN_RANDOM_LEN
    tail = b""
    while len(tail) < need:
        tail += secrets.token_bytes(need + 8).translate(_TOKEN_TABLE, _TOKEN_REJECTED)
    return values.TOKEN_PREFIX + tail[:need].decode("ascii")


def token_expired(issued_at: int | None, now: float) -> bool:
    """A token is valid while ``now < issued_at + 48 h``; the lifetime is fixed (§5.6, D13)."""
    return issued_at is None or now >= issued_at + values.TOKEN_LIFETIME_S


def _deadline_passed(deadline: int | None, now: float) -> bool:
    return deadline is not None and deadline <= now


# --------------------------------------------------------------------------------------------
# Values handed to the HTTP side


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified Authorization value speaks for (§3.3, D4)."""

    pid: str  # "" for an account: no product's pid (§1: 1-32 characters), so P3 never binds
    device_name: str | None  # set for a device-level res
    expires_at: int
    version: str = auth.VERSION  # the token's version: the dialects accept different ones
    user_id: str | None = None  # set for an account-level res (F2, F12)

    def __repr__(self) -> str:
        return f"Principal(pid={self.pid!r}, device={self.device_name!r}, user={self.user_id!r})"


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """The part of a device row that P3 needs."""

    dev_id: int
    pid: str
    name: str


@dataclass(frozen=True, slots=True)
class DownloadGrant:
    """What E6 needs to know about a token: its task's state and its package file (§6.6, D6)."""

    device_task_id: int
    dev_id: int
    state: TaskState
    token_issued_at: int
    current: bool  # still the task's current token (an older one is always expired)
    deadline: int | None
    sha256: str
    size: int
    file_name: str
    # Before this time (Unix seconds) bytes may be served: the token's expiry or the deadline,
    # whichever is first; -inf for an old token or an inactive task. E6 checks it per chunk.
    usable_until: float = field(init=False)

    def __post_init__(self) -> None:
        until = -_FOREVER
        if self.current and self.state in DOWNLOADABLE_STATES:
            until = _valid_until(self.token_issued_at, self.deadline)
        object.__setattr__(self, "usable_until", until)

    def usable(self, now: float) -> bool:
        """Whether bytes may be served now: token valid and task active (D6, step 2)."""
        return now < self.usable_until


@dataclass(frozen=True, slots=True)
class TidGrant:
    """What S-D and F-D need to know about a device task: its state (a passed deadline read as
    failed) and its package file."""

    state: TaskState
    sha256: str
    size: int
    file_name: str
    # Whether bytes may be served (S7, F8: states 1-3, DOWNLOAD_TABLE). Decided once: a grant
    # is cached and asked on every chunk.
    downloadable: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "downloadable", on_download(self.state, moves=True) is not None)


# --------------------------------------------------------------------------------------------
# Prebuilt statements (statements built per call cost 2-5x on SQLite, docs/performance.md)

_dt, _t, _p = device_tasks, tasks, packages
_TASK_JOIN = _dt.join(_t, _t.c.id == _dt.c.task_id).join(_p, _p.c.id == _t.c.package_id)
_TASK_COLUMNS = (
    _dt.c.id.label("dt_id"),
    _dt.c.dev_id.label("dt_dev_id"),
    _dt.c.module_type,
    _dt.c.state,
    _dt.c.paused_from,
    _dt.c.progress,
    _dt.c.current_token,
    _dt.c.token_issued_at,
    _t.c.start_time,
    _t.c.deadline,
    _t.c.signal,
    _t.c.power,
    _t.c.retry,
    _t.c.interval,
    _p.c.target,
    _p.c.size,
    _p.c.md5,
    _p.c.kind,
    _p.c.from_version,
    _p.c.manuf,
    _p.c.model,
    _p.c.sha256,
    _p.c.file_name,
)

_SELECT_KEYS = (
    select(products.c.access_key, devices.c.dev_id, devices.c.device_key)
    .select_from(
        products.outerjoin(
            devices,
            and_(devices.c.pid == products.c.pid, devices.c.name == bindparam("name")),
        )
    )
    .where(products.c.pid == bindparam("pid"))
)
_SELECT_DEVICE = select(devices.c.pid, devices.c.name).where(
    devices.c.dev_id == bindparam("dev_id")
)
_SELECT_DEVICE_ID = (
    select(devices.c.dev_id, products.c.account_uid)
    .select_from(devices.join(products, products.c.pid == devices.c.pid))
    .where(devices.c.pid == bindparam("pid"), devices.c.name == bindparam("name"))
)
# F6: the device's most recent task of one type, whatever its state.
_SELECT_LATEST_TASK = (
    select(_dt.c.state, _p.c.target)
    .select_from(_TASK_JOIN)
    .where(_dt.c.dev_id == bindparam("dev_id"), _dt.c.module_type == bindparam("module_type"))
    .order_by(_dt.c.id.desc())
    .limit(1)
)
_SELECT_ACCOUNT_KEY = select(accounts.c.access_key).where(accounts.c.uid == bindparam("uid"))
# Studio and fuse: a device task named by its id, the tid (§12.1), with its task and package.
_SELECT_TID = select(*_TASK_COLUMNS).select_from(_TASK_JOIN).where(_dt.c.id == bindparam("tid"))
_SELECT_VERSIONS = select(devices.c.f_version, devices.c.s_version).where(
    devices.c.dev_id == bindparam("dev_id")
)
# E1's read-only attempt: the stored versions with every open task's fields that E1's rules read
# (T5's deadline, T6's target), in one statement, so in one snapshot: a row per open task, or one
# row without a task.
_SELECT_VERSIONS_AND_OPEN_TASKS = (
    select(
        devices.c.f_version,
        devices.c.s_version,
        devices.c.last_seen_at,
        _dt.c.id.label("dt_id"),
        _dt.c.module_type,
        _t.c.start_time,
        _t.c.deadline,
        _p.c.target,
    )
    .select_from(
        devices.outerjoin(
            _dt,
            and_(_dt.c.dev_id == devices.c.dev_id, _dt.c.state.in_(_OPEN_LITERALS)),
        )
        .outerjoin(_t, _t.c.id == _dt.c.task_id)
        .outerjoin(_p, _p.c.id == _t.c.package_id)
    )
    .where(devices.c.dev_id == bindparam("dev_id"))
)
_SELECT_BY_AUTH_INFO = (
    select(devices.c.dev_id, devices.c.name)
    .where(devices.c.pid == bindparam("pid"), devices.c.auth_info == bindparam("auth_info"))
    .order_by(devices.c.dev_id)
    .limit(2)
)


def _device_and_open_task(*keys: Any) -> Select[Any]:
    """E3/E4: the device's versions and its open task of one type, if any (D23: at most one);
    with ``keys`` (columns of the device's product), joined to its product."""
    base = devices.join(products, products.c.pid == devices.c.pid) if keys else devices
    return (
        select(
            devices.c.pid,
            devices.c.name,
            devices.c.f_version,
            devices.c.s_version,
            devices.c.last_seen_at,
            *_TASK_COLUMNS,
            *keys,
        )
        .select_from(
            # A flat chain of LEFT JOINs: SQLite materialises a parenthesised join (every open
            # device task, for every request) but walks this one by index.
            base.outerjoin(
                _dt,
                and_(
                    _dt.c.dev_id == devices.c.dev_id,
                    _dt.c.module_type == bindparam("module_type"),
                    _dt.c.state.in_(_OPEN_LITERALS),
                ),
            )
            .outerjoin(_t, _t.c.id == _dt.c.task_id)
            .outerjoin(_p, _p.c.id == _t.c.package_id)
        )
        .where(devices.c.dev_id == bindparam("dev_id"))
    )


_SELECT_DEVICE_AND_OPEN_TASK = _device_and_open_task()
# The cold poll (E3 of a device whose token is not cached): the same row with the keys that
# verify the device's tokens (D4), so that P1, P3 and E3 take one read.
_SELECT_DEVICE_KEYS_AND_OPEN_TASK = _device_and_open_task(
    products.c.access_key, devices.c.device_key
)
# E1's transaction: the stored versions and every open task of the device, in one statement: a
# row per open task, in a fixed order (lock order across transactions), or one row without a
# task.
_SELECT_VERSIONS_AND_OPEN_TASK_ROWS = (
    select(devices.c.f_version, devices.c.s_version, *_TASK_COLUMNS)
    .select_from(
        devices.outerjoin(
            _dt, and_(_dt.c.dev_id == devices.c.dev_id, _dt.c.state.in_(_OPEN_LITERALS))
        )
        .outerjoin(_t, _t.c.id == _dt.c.task_id)
        .outerjoin(_p, _p.c.id == _t.c.package_id)
    )
    .where(devices.c.dev_id == bindparam("dev_id"))
    .order_by(_dt.c.id)
)
# E5-E8: a token (any ever issued, D13) with its task and package.
_SELECT_TOKEN = (
    select(tokens.c.issued_at.label("issued_at"), *_TASK_COLUMNS)
    .select_from(tokens.join(_TASK_JOIN, _dt.c.id == tokens.c.device_task_id))
    .where(tokens.c.token == bindparam("token"))
)


def _set_token() -> Update:
    # Built anew for each statement made from it (see transitions._set_state).
    return (
        update(_dt)
        .where(
            _dt.c.id == bindparam("b_id"),
            _dt.c.state == bindparam("b_state"),
            _dt.c.current_token.is_not_distinct_from(
                bindparam("b_token", type_=_dt.c.current_token.type)
            ),
        )
        .values(
            current_token=bindparam("v_token"),
            token_issued_at=bindparam("now"),
            updated_at=bindparam("now"),
        )
    )


_SET_TOKEN = _set_token()
_INSERT_TOKEN = insert(tokens).values(
    token=bindparam("v_token"), device_task_id=bindparam("v_id"), issued_at=bindparam("now")
)


def _issue_token_statement() -> Insert:
    """PostgreSQL: the compare-and-set of the task's current token and the new token's row in
    one statement (a round trip less); its rowcount is 1 when the task was still as read."""
    issued = _set_token().returning(_dt.c.id).cte("issued")
    return (
        insert(tokens)
        .from_select(
            ["token", "device_task_id", "issued_at"],
            select(
                cast(bindparam("v_token", type_=tokens.c.token.type), tokens.c.token.type),
                issued.c.id,
                cast(bindparam("now", type_=BigInteger()), BigInteger()),
            ),
        )
        .add_cte(issued)
    )


# A NULL parameter keeps the stored version: one statement serves E1 (both), E3 and T15 (one).
_SET_VERSIONS = (
    update(devices)
    .where(devices.c.dev_id == bindparam("b_dev_id"))
    .values(
        f_version=func.coalesce(
            bindparam("f", type_=devices.c.f_version.type), devices.c.f_version
        ),
        s_version=func.coalesce(
            bindparam("s", type_=devices.c.s_version.type), devices.c.s_version
        ),
        last_seen_at=bindparam("now"),
    )
)

# The same statements inside write transactions, run on the driver (db.Prepared): most device
# requests that write run three to six of them.
_TX_DEVICE_AND_OPEN_TASK: Final = Prepared(_SELECT_DEVICE_AND_OPEN_TASK)
_TX_TOKEN: Final = Prepared(_SELECT_TOKEN)
_TX_TID: Final = Prepared(_SELECT_TID)
_TX_VERSIONS_AND_OPEN_TASKS: Final = Prepared(_SELECT_VERSIONS_AND_OPEN_TASK_ROWS)
_TX_SET_TOKEN: Final = Prepared(_SET_TOKEN)
_TX_INSERT_TOKEN: Final = Prepared(_INSERT_TOKEN)
_TX_ISSUE_TOKEN: Final = Prepared(_issue_token_statement())
_TX_SET_VERSIONS: Final = Prepared(_SET_VERSIONS)


class _ReadConnections:
    """One autocommit DBAPI connection per thread for :class:`_Reader`, detached from the pool.

    Detached, so that reads never wait for (or starve) the pool that transactions use; in
    autocommit, so that a read is one statement and one round trip, with no transaction left
    open. A connection that fails is dropped and replaced on the next read.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self.on_error: Callable[[BaseException], None] | None = None  # see DeviceService

    def get(self) -> tuple[Any, bool]:
        """This thread's connection, and whether it was opened before this call (it served
        this thread's reads, or sat in the pool, where nobody checks it: db.create_engine)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        fairy = self._engine.raw_connection()
        conn = fairy.driver_connection
        assert conn is not None
        pooled = IDLE_SINCE in fairy.info  # served transactions before
        fairy.detach()  # ours now: the pool forgets it and keeps its capacity
        if self._engine.dialect.name != "sqlite":  # db.py already runs sqlite3 unwrapped
            conn.autocommit = True
        with self._lock:
            self._all.append(conn)
        self._local.conn = conn
        return conn, pooled

    def discard(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()


class _WriteConnections:
    """The Core connection of the last write transaction, kept out of the pool for the next one.

    Why: ``engine.begin()`` checks a connection out of the pool and back in around every
    transaction (events, a reset, a new Connection); on SQLite that cost about 60 us of an empty
    transaction against about 20 us for ``begin()`` on a kept connection, and a device's upgrade
    runs eight write transactions.

    Only a connection whose transaction committed is kept, one (two threads finishing at the
    same moment may keep one each; a later one returns its own to the pool), and only while
    idle for less than :data:`.db.PING_AFTER_S`: one idle longer goes back to the pool, which
    tests it before handing it out again, as it tests every connection that sat idle that long.
    """

    _KEEP: Final = 1

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._kept: list[tuple[Connection, float]] = []  # list.pop and append are atomic
        self._closed = False

    def take(self) -> Connection:
        """The kept connection if fresh, else one from the pool."""
        kept = self._kept
        while kept:
            try:
                conn, since = kept.pop()
            except IndexError:  # another thread took it
                break
            if time.monotonic() - since < PING_AFTER_S and not conn.invalidated:
                return conn
            conn.close()
        return self._engine.connect()

    def keep(self, conn: Connection) -> None:
        """Keep ``conn`` (its transaction committed) for the next write, or return it."""
        if self._closed or len(self._kept) >= self._KEEP:
            conn.close()
        else:
            self._kept.append((conn, time.monotonic()))

    def close(self) -> None:
        self._closed = True
        while self._kept:
            try:
                conn, _since = self._kept.pop()
            except IndexError:
                break
            with contextlib.suppress(Exception):
                conn.close()


class _Reader:
    """One prebuilt SELECT, compiled once for the engine's dialect and run on a dedicated
    autocommit DBAPI connection (:class:`_ReadConnections`), outside SQLAlchemy's execution
    machinery.

    Why: on the development machine a Core ``engine.begin()`` + ``execute`` of E3's statement
    cost about 580 us on SQLite, the same SQL through the pooled sqlite3 connection about 25 us
    (raw sqlite3 measured at 4-7x Core). Reads are single statements, so the database's
    own statement-level snapshot is all the consistency they need; every write still goes through
    a Core transaction with compare-and-set (see the module docstring). Values come back as the
    driver returns them: the columns read here are integers and strings, which need no result
    processing on SQLite or psycopg.
    """

    def __init__(
        self, engine: Engine, connections: _ReadConnections, statement: Select[Any]
    ) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self._connections = connections
        self._sql = str(compiled)
        self._defaults = dict(compiled.params)  # e.g. a LIMIT's value
        self._order = list(compiled.positiontup or ()) if compiled.positional else None
        self._row: Any = namedtuple("Row", list(statement.selected_columns.keys()))  # type: ignore[misc]

    def _run(self, params: dict[str, Any], fetch: Callable[[Any], Any]) -> Any:
        if self._defaults:
            params = {**self._defaults, **params}
        args: Any = params if self._order is None else [params[name] for name in self._order]
        connections = self._connections
        while True:
            conn, reused = connections.get()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute(self._sql, args)
                    return fetch(cursor)
                finally:
                    cursor.close()
            except Exception as exc:
                if connections.on_error is not None:
                    connections.on_error(exc)
                connections.discard()  # perhaps broken: the next read reconnects
                # A connection that served earlier reads (or sat in the pool) may have been cut
                # since (the database restarted, a proxy timed it out) with nobody noticing: one
                # more try on another connection. A read is one statement, so trying it again
                # is safe.
                if not (reused and _connection_lost(conn)):
                    raise

    def all(self, **params: Any) -> list[Any]:
        """Every row, as named tuples."""
        make = self._row._make
        return [make(row) for row in self._run(params, _fetchall)]

    def one(self, **params: Any) -> Any | None:
        """The first row, or None."""
        row = self._run(params, _fetchone)
        return None if row is None else self._row._make(row)


def _connection_lost(conn: Any) -> bool:
    # psycopg marks a connection whose session ended under it as broken (and closed); sqlite3
    # connections have no such state: a failed SQLite read is never a lost connection.
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False) is True)


def _fetchall(cursor: Any) -> Any:
    return cursor.fetchall()


def _fetchone(cursor: Any) -> Any:
    return cursor.fetchone()


# --------------------------------------------------------------------------------------------
# The service


class _NeedsWrite(Exception):
    """Raised by a read-only attempt that found it must write: run it as a transaction."""


@dataclass(slots=True)
class _Tx:
    """One attempt at a request: inside a transaction (``conn``), or read-only (``conn`` None)
    on a row read without one; any write in read-only mode raises :class:`_NeedsWrite`."""

    conn: Connection | None
    now: float
    # Devices whose tasks or stored versions changed (never their row or keys: the device API
    # changes neither, so these are published and dropped as changes.Scope.TASKS).
    touched: set[int] = field(default_factory=set)
    touched_all: bool = False
    offered: list[tuple[int, str | None]] = field(default_factory=list)  # first offers written
    served: dict[int, int] = field(default_factory=dict)  # bytes served written, per device task

    @property
    def writer(self) -> Connection:
        if self.conn is None:
            raise _NeedsWrite
        return self.conn


@dataclass(frozen=True, slots=True)
class Basis:
    """What a cached E3 or E5 answer rests on, for a caller that memoises whole replies.

    Taken with :meth:`DeviceService.basis` right after the answer was computed or found in the
    cache; :meth:`.DeviceCaches.holds` then says, in a few dictionary lookups, whether every part
    is still what the service would use: the same verified Authorization value (and within its
    ``et``), the same P3 device row, the same cached answer (and within its validity). Anything
    that would make the service answer differently (a TTL running out, an invalidation, a token
    expiring, a deadline passing) makes ``holds`` false.

    ``named``: the device was named by product and name in the path (Studio, fuse), so P3
    rests on the cached (pid, name) -> dev_id entry rather than on the cached device row.

    ``generation`` is the caches' generation read before those facts were, and
    ``fresh_until`` when the first of their entries reaches its TTL (monotonic seconds): while
    no invalidation has run since (every change, this process's own and those the change feed
    brings, bumps the generation) and none has reached its TTL, the facts are still the cached
    ones and ``holds`` needs no lookup beyond the times.
    """

    authorization: str
    principal: Principal
    dev_id: int
    device: DeviceRef
    key: tuple[Any, ...]
    answer: Answer
    named: bool = False
    generation: int = -1
    fresh_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Report:
    """A decoded E7/E8 report: its column of §5.5 and the value sent (step or result code)."""

    kind: ReportKind
    value: int


class DeviceService:
    """The device API's rules over one database. Methods run one transaction each and return
    errno values (or data); they never raise for a client's mistake.

    ``clock`` returns Unix seconds; tests pass a fake one to expire tokens and deadlines.
    ``caches`` are the caches to consult and fill (by default new ones with ``cache_ttl``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = time.time,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        feed_interval: float = changes.DEFAULT_INTERVAL,
        caches: DeviceCaches | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._cache_ttl = cache_ttl
        self.caches = DeviceCaches(ttl=cache_ttl, clock=clock) if caches is None else caches
        self._readers = readers = _ReadConnections(engine)
        self._origin = changes.new_origin()
        self._feed_failing = False
        self._feed = (
            changes.ChangeFeed(
                engine,
                lambda statement: _Reader(engine, readers, statement).all,
                origin=self._origin,
                interval=feed_interval,
                clock=clock,
            )
            if cache_ttl > 0
            else None
        )
        self._read_keys = _Reader(engine, readers, _SELECT_KEYS)
        self._read_device = _Reader(engine, readers, _SELECT_DEVICE)
        self._read_versions = _Reader(engine, readers, _SELECT_VERSIONS)
        self._read_versions_and_tasks = _Reader(engine, readers, _SELECT_VERSIONS_AND_OPEN_TASKS)
        self._read_by_auth_info = _Reader(engine, readers, _SELECT_BY_AUTH_INFO)
        self._read_open_task = _Reader(engine, readers, _SELECT_DEVICE_AND_OPEN_TASK)
        self._read_keys_and_open_task = _Reader(engine, readers, _SELECT_DEVICE_KEYS_AND_OPEN_TASK)
        self._read_token = _Reader(engine, readers, _SELECT_TOKEN)
        self._read_device_id = _Reader(engine, readers, _SELECT_DEVICE_ID)
        self._read_account_key = _Reader(engine, readers, _SELECT_ACCOUNT_KEY)
        self._read_latest_task = _Reader(engine, readers, _SELECT_LATEST_TASK)
        self._read_tid = _Reader(engine, readers, _SELECT_TID)
        # Device tasks (and dialects) whose first offer is known to be on their timeline.
        self._offered: set[tuple[int, str | None]] = set()
        # First offers made by polls that wrote nothing else, not written yet: device task ->
        # dialect -> (when, the request). Bounded by the device tasks offered since the last
        # flush (rows of the database, whatever clients send).
        self._pending_offers: dict[int, dict[str | None, tuple[float, timeline.Source]]] = {}
        self.served = timeline.ServedBytes(engine, clock)
        self._writers = _WriteConnections(engine)

    def close(self) -> None:
        """Close the read connections, return the kept write connection to the pool and close
        the caches' open files (the engine and its pool stay the caller's)."""
        self._readers.close()
        self._writers.close()
        self.caches.close()

    def on_database_error(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` with every exception a direct read raises (the metrics count them).

        Those reads bypass SQLAlchemy's execution machinery, so its ``handle_error`` event, which
        sees every other statement's errors, never sees theirs.
        """
        self._readers.on_error = callback

    @property
    def clock(self) -> Clock:
        """The service's clock (Unix seconds)."""
        return self._clock

    @property
    def cache_ttl(self) -> float:
        """The longest a cached entry lives, in seconds (0: nothing is cached)."""
        return self._cache_ttl

    # -- transactions ------------------------------------------------------------------------

    def _run(self, work: Callable[[_Tx], T]) -> T:
        writers = self._writers
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            tx: _Tx | None = None
            committing = False
            conn: Connection | None = None
            try:
                conn = writing = writers.take()
                with writing.begin():
                    tx = _Tx(writing, self._clock())
                    result = work(tx)
                    # Other processes learn of it from the feed, in the same commit.
                    if tx.touched_all:
                        changes.publish(writing, None, tx.now, origin=self._origin)
                    elif tx.touched:
                        changes.publish(
                            writing, tx.touched, tx.now, origin=self._origin, scope=_TOUCHED
                        )
                    committing = True
                conn = None
                writers.keep(writing)  # committed: clean, no transaction open
                tx.served.clear()  # committed: written
                self._remember_offers(tx.offered)  # committed: they are on the timeline
                return result
            except (ConcurrentChange, IntegrityError):
                # IntegrityError: a token collision or a concurrent insert; both retry cleanly.
                if attempt == _MAX_ATTEMPTS:
                    raise
            except DBAPIError as exc:
                # A connection lost before the commit (cut while it sat in the pool, which
                # tests only connections idle for a while: db.create_engine) rolled nothing in.
                retry = is_transient(exc) or is_lost_before_commit(exc, committing)
                if attempt == _MAX_ATTEMPTS or not retry:
                    raise
            finally:
                if conn is not None:  # failed: back to the pool (Core invalidated it if lost)
                    conn.close()
                if tx is not None:
                    self._invalidate_touched(tx)
                    for dt_id, nbytes in tx.served.items():  # not committed: pending again
                        self.served.add(dt_id, nbytes)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_first(
        self,
        reader: _Reader,
        statement: Prepared,
        params: dict[str, Any],
        work: Callable[[_Tx, Any], T],
    ) -> T:
        """Answer from a plain read when ``work`` writes nothing (polling, the E5 before every
        chunk); otherwise run ``work`` again on a fresh read inside a transaction."""
        return self._decide(reader.one(**params), statement, params, work)

    def _decide(
        self,
        row: Any,
        statement: Prepared,
        params: dict[str, Any],
        work: Callable[[_Tx, Any], T],
    ) -> T:
        """:meth:`_read_first` on ``row``, already read (with ``statement``'s columns, or more)."""
        try:
            return work(_Tx(None, self._clock()), row)
        except _NeedsWrite:
            pass
        return self._run(lambda tx: work(tx, statement.first(tx.writer, params)))

    def _invalidate_touched(self, tx: _Tx) -> None:
        if tx.touched_all:
            self.invalidate()
            return
        for dev_id in tx.touched:
            self.invalidate(dev_id, _TOUCHED)

    def invalidate(
        self, dev_id: int | None = None, scope: changes.Scope = changes.Scope.DEVICE
    ) -> None:
        """Forget what is cached about one device (:meth:`.DeviceCaches.invalidate`: all of
        it, or with :attr:`.changes.Scope.TASKS` what its tasks decide), or everything when
        called without an argument (:meth:`.DeviceCaches.clear`).

        The management side calls this (without arguments) after it changes tasks, devices or
        keys in a process that also serves the device API; :meth:`sync` calls it for what other
        processes changed.
        """
        if dev_id is None:
            self.caches.clear()
        else:
            self.caches.invalidate(dev_id, scope)

    def sync(self) -> None:
        """Drop what other processes changed, read from the change feed (:mod:`.changes`) at
        most every 0.1 s. Cheap when not due: the device API calls it before every request.

        When the feed cannot be read, everything is dropped: what was missed is unknown.
        """
        feed = self._feed
        if feed is None or not feed.due():
            return
        try:
            found = feed.read()
        except Exception:
            if not self._feed_failing:
                log.warning("cannot read the cache change feed; caching nothing until it works")
                self._feed_failing = True
            self.invalidate()
            return
        if self._feed_failing:
            log.info("the cache change feed works again")
            self._feed_failing = False
        if found.everything:
            self.invalidate()
            return
        tasks_only = found.tasks_only
        for dev_id in found.dev_ids:
            scope = changes.Scope.TASKS if dev_id in tasks_only else changes.Scope.DEVICE
            self.invalidate(dev_id, scope)

    def _transition(
        self,
        tx: _Tx,
        row: _Row,
        new: TaskState,
        *,
        progress: int | None = None,
        result_code: int | None = None,
        kind: timeline.EventKind = "state",
        code: int | None = None,
    ) -> None:
        old = TaskState(row.state)
        self._write_kept_offers(tx, row.dt_id)
        set_state(
            tx.writer,
            row.dt_id,
            old,
            new,
            tx.now,
            progress=row.progress if progress is None else progress,
            result_code=result_code,
            kind=kind,
            code=code,
        )
        tx.touched.add(row.dt_dev_id)

    def _remember_offers(self, keys: list[tuple[int, str | None]]) -> None:
        if not keys:
            return
        pending = self._pending_offers
        for dt_id, dialect in keys:
            kept = pending.get(dt_id)
            if kept is not None:
                kept.pop(dialect, None)
                if not kept:
                    del pending[dt_id]
        if len(self._offered) >= _OFFERED_MEMO_MAX:
            self._offered.clear()  # bounded: forgetting costs one read per device task
        self._offered.update(keys)

    @property
    def pending_offers(self) -> int:
        """First offers made and not written yet (see :meth:`flush_offers`)."""
        return sum(len(kept) for kept in self._pending_offers.values())

    def flush_offers(self) -> int:
        """Write the first offers kept back (polls that wrote nothing else keep theirs, so that
        a fleet's first round of polls is not a write per device) in one transaction; on
        failure they stay kept (and the error is raised). Returns how many were kept.

        The device API calls it with its periodic flush of the bytes served and when it closes;
        an offer also goes out in the transaction of its device task's next event in this
        process (:meth:`_write_kept_offers`), so that it stays first on the timeline.
        """
        keys = [(dt_id, d) for dt_id, kept in self._pending_offers.items() for d in kept]
        if not keys:
            return 0

        def work(tx: _Tx) -> None:
            offers = []
            for dt_id, dialect in keys:
                found = self._pending_offers.get(dt_id, {}).get(dialect)
                if found is not None:
                    offers.append((dt_id, *found))
            timeline.record_first_offers(tx.writer, offers)
            tx.offered.extend(keys)

        self._run(work)
        return len(keys)

    def _write_kept_offers(self, tx: _Tx, dt_id: int) -> None:
        """Before another event of device task ``dt_id``: its kept first offers, in the same
        transaction (forgotten from the keeping once it commits)."""
        kept = self._pending_offers.get(dt_id)
        if kept:
            timeline.record_first_offers(tx.writer, [(dt_id, *found) for found in kept.values()])
            tx.offered.extend((dt_id, dialect) for dialect in kept)

    def _record_offer(self, tx: _Tx, row: _Row, default_dialect: str | None) -> None:
        """The device task's first offer through this dialect on its timeline; later offers
        find it (timeline module docstring: repeats write nothing)."""
        source = timeline.current_source(default_dialect)
        key = (row.dt_id, source.dialect)
        if key in self._offered:
            return
        if tx.conn is None:
            # A poll that writes nothing else stays a read: its offer is kept and written with
            # the next flush, or with the device task's next event (flush_offers).
            kept = self._pending_offers.setdefault(row.dt_id, {})
            if source.dialect not in kept:
                kept[source.dialect] = (tx.now, source)
            return
        # One statement, written unless the device task has an offer through this dialect
        # already (another worker's, or one this worker forgot), rather than a read and then
        # an insert: each is a round trip on PostgreSQL. Remembered once committed, either way.
        # Nothing cached depends on the timeline: no invalidation, so the answer stays cacheable.
        kept_at = self._pending_offers.get(row.dt_id, {}).get(source.dialect)
        at, who = (tx.now, source) if kept_at is None else kept_at
        timeline.record_first_offers(tx.writer, [(row.dt_id, at, who)])
        tx.offered.append(key)

    def _effective_state(self, tx: _Tx, row: _Row, dev_id: int) -> TaskState:
        """The row's state after T5, applied lazily: a passed deadline fails the open tasks."""
        state = TaskState(row.state)
        if state.is_open and _deadline_passed(row.deadline, tx.now):
            if expire_deadlines(tx.writer, tx.now, dev_id=dev_id):
                tx.touched.add(dev_id)  # T5 on this device's open tasks only
            return on_action(state, Action.DEADLINE)
        return state

    # -- P1 and P3 ---------------------------------------------------------------------------

    def authenticate(
        self, authorization: str | None, policy: auth.TokenPolicy = auth.CLASSIC_POLICY
    ) -> Principal | None:
        """P1 (§3.3, D3, D4; S2 with Studio's ``policy``): the principal, or None for errno 1.
        Answered from the cache when this exact value was verified before and is within its
        ``et``; otherwise verified against the keys in the database (and cached).

        Only values the classic policy accepts are cached: a cached principal is then good for
        every dialect (Studio's and fuse's policies accept everything classic's does), and a
        ``2022-05-01`` token verified for Studio can never pass classic's P1 through the cache.
        """
        if not authorization:
            return None
        caches = self.caches
        principal = caches.principal(authorization)
        if principal is not None:
            # The key is the exact value, so its version is the one verified: a 2022-05-01
            # token cached for Studio or fuse is still refused by classic (D3).
            return principal if principal.version in policy.versions else None
        generation = caches.generation
        token = self._parse(authorization, policy)
        if token is None:
            return None
        if isinstance(token, auth.UserToken):
            return self._authenticate_account(token)
        row = self._read_keys.one(pid=token.product_id, name=token.device_name)
        if row is None:  # unknown product
            return None
        if token.device_name is not None and row.dev_id is None:  # unknown device in it
            return None
        # D4: the device key verifies a device-level token when the device has one.
        encoded = row.device_key if token.device_name is not None and row.device_key else None
        try:
            key = auth.decode_key(encoded or row.access_key)
        except ValueError:
            log.warning("a key of product %s is not base64; refusing its tokens", token.product_id)
            return None
        try:
            auth.verify_token(token, key, now=self._clock())
        except auth.TokenError:
            return None
        principal = Principal(token.product_id, token.device_name, token.expires_at, token.version)
        caches.keep_principal(generation, authorization, principal, row.dev_id)
        return principal

    def _parse(self, authorization: str, policy: auth.TokenPolicy) -> auth.AnyToken | None:
        """The fields of ``authorization`` if ``policy`` takes its form, else None. Parsed once
        per distinct value (a pure function of it; verifying stays the caller's)."""
        tokens = self.caches.tokens
        token = tokens.get(authorization)
        if token is None:
            try:
                # The widest policy: a value it refuses, every policy refuses.
                token = auth.parse_any_token(authorization, policy=auth.FUSE_POLICY)
            except auth.TokenError:
                return None
            # Its fields hold at most the value's characters, as strings of their own.
            tokens.put(authorization, token, _TOKEN_BYTES + len(authorization))
        if token.version not in policy.versions or token.kind not in policy.kinds:
            return None
        return token

    def _verify_with_row(
        self, authorization: str, token: auth.ParsedToken, dev_id: int, row: Any, generation: int
    ) -> Principal | None:
        """P1 and P3 of a classic ``token`` on the device ``row`` read with its keys (D4): the
        principal (kept in the cache, as :meth:`authenticate` keeps it), or None for errno 1.

        A device of another product, or another device than a device-level token's, is errno 1
        whatever the signature (P3), so only the device's own keys need reading.
        """
        if row is None or row.pid != token.product_id:
            return None
        if token.device_name is not None and token.device_name != row.name:
            return None
        encoded = row.device_key if token.device_name is not None and row.device_key else None
        try:
            key = auth.decode_key(encoded or row.access_key)
        except ValueError:
            log.warning("a key of product %s is not base64; refusing its tokens", token.product_id)
            return None
        try:
            auth.verify_token(token, key, now=self._clock())
        except auth.TokenError:
            return None
        principal = Principal(token.product_id, token.device_name, token.expires_at, token.version)
        tag = None if token.device_name is None else dev_id  # as authenticate tags it
        self.caches.keep_principal(generation, authorization, principal, tag)
        return principal

    def _authenticate_account(self, token: auth.UserToken) -> Principal | None:
        """F2, F12: a ``userid/{uid}`` token, verified with the account's key. Never cached: a
        rotated key or a deleted account is refused from the next request on every worker."""
        row = self._read_account_key.one(uid=token.user_id)
        if row is None:
            return None
        try:
            key = auth.decode_key(row.access_key)
            auth.verify_token(token, key, now=self._clock())
        except (ValueError, auth.TokenError):  # TokenError is a ValueError too
            return None
        return Principal("", None, token.expires_at, token.version, user_id=token.user_id)

    def device_named(self, principal: Principal, pid: str, name: str) -> int | None:
        """P3 for the dialects that name the device in the path (§12.1, S2, S3, F2, F4): the
        dev_id of device ``name`` of product ``pid`` if ``principal`` speaks for it, else None
        (an unknown product or device answers as a bad signature). An account speaks for every
        device of the products it owns now: the owner is read on every request, so a product
        moved to another account is refused at once."""
        if principal.user_id is not None:
            # Never from a cache: ownership moves and account keys take effect at once.
            row = self._read_device_id.one(pid=pid, name=name)
            if row is None or row.account_uid != principal.user_id:
                return None
            return int(row.dev_id)
        caches = self.caches
        dev_id = caches.names.get((pid, name))
        if dev_id is None:
            generation = caches.generation
            row = self._read_device_id.one(pid=pid, name=name)
            if row is None:
                return None
            dev_id = int(row.dev_id)
            caches.keep_name(generation, pid, name, dev_id)
        # binds() on this device, without building its DeviceRef (asked on every request).
        if principal.pid != pid or principal.device_name not in (None, name):
            return None
        return dev_id

    def device(self, dev_id: int) -> DeviceRef | None:
        """The device row for P3, from the cache or else the database (and cached)."""
        ref = self.caches.device(dev_id)
        if ref is not None:
            return ref
        row = self._read_device.one(dev_id=dev_id)
        if row is None:
            return None
        ref = DeviceRef(dev_id, row.pid, row.name)
        self.caches.keep_device(ref)
        return ref

    @staticmethod
    def binds(principal: Principal, device: DeviceRef | None) -> bool:
        """P3 (§4.2, D4): the device exists, is in the token's product, and is the token's device
        when the token is device-level."""
        if device is None or device.pid != principal.pid:
            return False
        return principal.device_name is None or principal.device_name == device.name

    # -- E1, E2 ------------------------------------------------------------------------------

    def report_version(self, dev_id: int, f_version: str | None, s_version: str | None) -> Errno:
        """E1 (§6.1, D16): store the versions; an open task whose target is reported succeeds
        (T6).

        A report that would change nothing (the versions stored already, no open task to move,
        ``last_seen_at`` refreshed less than a minute ago) is answered from one read and writes
        nothing: devices may post their version before every poll.
        """
        reported = {TaskType.FOTA: f_version, TaskType.SOTA: s_version}
        if self._version_report_changes_nothing(dev_id, f_version, s_version, reported):
            return Errno.SUCC

        def work(tx: _Tx) -> Errno:
            rows = _TX_VERSIONS_AND_OPEN_TASKS.all(tx.writer, {"dev_id": dev_id})
            before = rows[0] if rows else None
            for row in rows:
                if row.dt_id is None or row.start_time > tx.now:  # none, or not started (§5.2)
                    continue
                state = self._effective_state(tx, row, dev_id)
                version = reported[TaskType(row.module_type)]
                if state.is_open and version is not None and version == row.target:
                    self._transition(tx, row, on_action(state, Action.VERSION_REACHED))
            updated = _TX_SET_VERSIONS.run(
                tx.writer,
                {"b_dev_id": dev_id, "f": f_version, "s": s_version, "now": int(tx.now)},
            )
            if before is not None:
                changed = {}
                if f_version is not None and f_version != before.f_version:
                    changed["f_version"] = f_version
                if s_version is not None and s_version != before.s_version:
                    changed["s_version"] = s_version
                timeline.record_version(tx.writer, dev_id, tx.now, changed)
            # Cached E3/S-C/F-C answers rest on the stored versions (their step 5 records the
            # version only when it changed): drop them.
            tx.touched.add(dev_id)
            return Errno.SUCC if updated == 1 else Errno.AUTH_FAILED

        return self._run(work)

    def _version_report_changes_nothing(
        self,
        dev_id: int,
        f_version: str | None,
        s_version: str | None,
        reported: dict[TaskType, str | None],
    ) -> bool:
        """Whether E1's transaction would write nothing but ``last_seen_at``, and that is fresh
        (refreshed at most every minute, as by E3): the versions are the stored ones and no
        started open task has reached its deadline (T5) or is reported at its target (T6)."""
        rows = self._read_versions_and_tasks.all(dev_id=dev_id)
        if not rows:
            return False  # unknown device: the transaction answers it
        now = self._clock()
        first = rows[0]
        if (f_version is not None and f_version != first.f_version) or (
            s_version is not None and s_version != first.s_version
        ):
            return False
        if first.last_seen_at is None or now - first.last_seen_at >= _LAST_SEEN_RESOLUTION_S:
            return False
        for row in rows:
            if row.dt_id is None or row.start_time > now:  # none, or not started (§5.2)
                continue
            if _deadline_passed(row.deadline, now):
                return False  # T5 to apply
            if reported[TaskType(row.module_type)] == row.target:
                return False  # T6
        return True

    def query_version(self, dev_id: int) -> dict[str, str] | None:
        """E2 (§6.2): the known versions (keys only for known ones); None if the device vanished."""
        row = self._read_versions.one(dev_id=dev_id)
        if row is None:
            return None
        data: dict[str, str] = {}
        if row.f_version is not None:
            data["f_version"] = row.f_version
        if row.s_version is not None:
            data["s_version"] = row.s_version
        return data

    # -- E3, E4 ------------------------------------------------------------------------------

    def check_task(
        self,
        dev_id: int,
        task_type: TaskType,
        version: str,
        *,
        manuf: str | None = None,
        model: str | None = None,
        principal: Principal | None = None,
        authorization: str | None = None,
    ) -> tuple[Errno, TaskInfo | None]:
        """E3 after its parameter checks (§6.3 steps 5-9, D11, D13, D17).

        Records ``version`` (without T6), finds the active task of ``task_type``, runs the
        pre-flight checks while it is to-be-upgraded (errno 8/9 fail it: T7, T8) and returns the
        task with its current token, issuing one if it has none or it expired.

        With ``principal``, P3 runs here too, on the same row, and a device that the principal
        may not speak for gets errno 1 before anything is written: a polling device whose row is
        not cached then costs one transaction instead of two.

        Answers that changed no task (errno 0 or 11) are cached, and a cached answer to the same
        question that still holds (:meth:`.DeviceCaches.check_task`) is returned without reading
        the database, unless P3 is to run here.

        With ``authorization`` instead (a value not verified yet: the cold poll), P1 runs here
        too, on the same read: the device's row comes with the keys that verify its tokens.
        """
        caches = self.caches
        key = check_task_key(task_type, version, manuf, model)
        if principal is None and authorization is None:
            cached = caches.answer(dev_id, key)
            if cached is not None:
                return cached.errno, cached.info
        generation = caches.generation
        params = {"dev_id": dev_id, "module_type": int(task_type)}
        row: Any = None
        if authorization is not None:
            token = self._parse(authorization, auth.CLASSIC_POLICY)
            if not isinstance(token, auth.ParsedToken):
                return Errno.AUTH_FAILED, None  # P1
            row = self._read_keys_and_open_task.one(**params)
            principal = self._verify_with_row(authorization, token, dev_id, row, generation)
            if principal is None:
                return Errno.AUTH_FAILED, None  # P1, or P3

        def work(tx: _Tx, row: _Row | None) -> tuple[Errno, TaskInfo | None, float | None]:
            return self._check(tx, row, dev_id, task_type, version, principal, offer)

        def offer(tx: _Tx, row: _Row) -> tuple[Errno, TaskInfo | None, float | None]:
            errno, state, valid_until = self._preflight(tx, row, dev_id, version, manuf, model)
            if state is None:
                return errno, None, valid_until
            self._record_offer(tx, row, "classic")
            token = row.current_token
            if token is None or token_expired(row.token_issued_at, tx.now):
                return Errno.SUCC, _task_info(row, self._issue_token(tx, row, state)), None
            until = _valid_until(row.token_issued_at, row.deadline)
            return Errno.SUCC, _task_info(row, token), until

        if row is None:
            row = self._read_open_task.one(**params)
        errno, info, valid_until = self._decide(row, _TX_DEVICE_AND_OPEN_TASK, params, work)
        if valid_until is not None:
            caches.keep_answer(generation, dev_id, key, Answer(errno, info, valid_until))
        return errno, info

    def check_task_tid(
        self, dev_id: int, task_type: TaskType, version: str
    ) -> tuple[Errno, TidTaskInfo | None]:
        """S-C and F-C (S4, S5, F6): E3's rules (the version recorded, the pre-flight check and
        its T8) on the device's open task of ``task_type``, answered with the task's ``tid`` and
        state; nothing is issued (S5). Errno 11 means no active task (each dialect numbers it)."""

        caches = self.caches
        key = check_tid_task_key(task_type, version)
        cached = caches.answer(dev_id, key)
        if cached is not None:
            return cached.errno, cached.tid_info
        generation = caches.generation

        def work(tx: _Tx, row: _Row | None) -> tuple[Errno, TidTaskInfo | None, float | None]:
            return self._check(tx, row, dev_id, task_type, version, None, offer)

        def offer(tx: _Tx, row: _Row) -> tuple[Errno, TidTaskInfo | None, float | None]:
            if row.dt_id is not None and row.dt_id > TID_MAX:
                # S11: a device keeps the tid in 32 bits, where this one would name another
                # task (SQLite's keys can pass the limit; PostgreSQL's column cannot).
                log.error("device task %d has an id past 2^31-1: no tid names it (S11)", row.dt_id)
                return Errno.INTERNAL_ERROR, None, None
            errno, state, valid_until = self._preflight(tx, row, dev_id, version, None, None)
            if state is None:
                return errno, None, valid_until
            self._record_offer(tx, row, None)
            # Holds until the deadline; any change of the task invalidates the device.
            until = _FOREVER if row.deadline is None else float(row.deadline)
            return Errno.SUCC, _tid_task_info(row, state), until

        params = {"dev_id": dev_id, "module_type": int(task_type)}
        errno, info, valid_until = self._read_first(
            self._read_open_task, _TX_DEVICE_AND_OPEN_TASK, params, work
        )
        if valid_until is not None and errno is not Errno.AUTH_FAILED:
            answer = Answer(errno, None, valid_until, tid_info=info)
            caches.keep_answer(generation, dev_id, key, answer)
        return errno, info

    def reached_latest(self, dev_id: int, task_type: TaskType, version: str) -> bool:
        """F6: whether the device's most recent task of ``task_type`` succeeded and its target
        is ``version`` (exact strings, F5): the device already runs it.

        Asked on every F-C that finds no open task, which is most of a fleet's polling: cached
        per device like E3's answers (a new task or any change of one invalidates the device).
        """
        caches = self.caches
        key = reached_latest_key(task_type, version)
        cached = caches.answer(dev_id, key)
        if cached is not None:
            return cached.errno is Errno.SUCC
        generation = caches.generation
        row = self._read_latest_task.one(dev_id=dev_id, module_type=int(task_type))
        reached = row is not None and row.state == TaskState.SUCCEEDED and row.target == version
        answer = Answer(Errno.SUCC if reached else Errno.NO_TASK, None, _FOREVER)
        caches.keep_answer(generation, dev_id, key, answer)
        return reached

    def _check(
        self,
        tx: _Tx,
        row: _Row | None,
        dev_id: int,
        task_type: TaskType,
        version: str,
        principal: Principal | None,
        offer: Callable[[_Tx, _Row], tuple[Errno, InfoT, float | None]],
    ) -> tuple[Errno, InfoT | None, float | None]:
        """E3's transaction for every dialect: P3 when ``principal`` is given, the offer (which
        tells the dialects apart: a token or a tid), then step 5, recording the version."""
        if row is None:
            return Errno.AUTH_FAILED, None, None  # unknown, or deleted since P3
        if principal is not None:
            ref = DeviceRef(dev_id, row.pid, row.name)
            self.caches.keep_device(ref)
            if not self.binds(principal, ref):
                return Errno.AUTH_FAILED, None, None  # P3
        answer = offer(tx, row)
        # Step 5: record the version. Written only when it changed (or to refresh
        # last_seen_at now and then), so that polling stays a read-only transaction.
        stored = row.f_version if task_type is TaskType.FOTA else row.s_version
        stale = row.last_seen_at is None or tx.now - row.last_seen_at >= _LAST_SEEN_RESOLUTION_S
        if stored != version:
            # The device's cached answers to its other questions were each cached when their
            # version was the stored one: answered from the cache again, they would skip this
            # step and leave this version stored.
            tx.touched.add(dev_id)
        if stored != version or stale:
            fota = task_type is TaskType.FOTA
            if stored != version:
                field_name = "f_version" if fota else "s_version"
                timeline.record_version(tx.writer, dev_id, tx.now, {field_name: version})
            _TX_SET_VERSIONS.run(
                tx.writer,
                {
                    "b_dev_id": dev_id,
                    "f": version if fota else None,
                    "s": None if fota else version,
                    "now": int(tx.now),
                },
            )
        return answer

    def _preflight(
        self,
        tx: _Tx,
        row: _Row,
        dev_id: int,
        version: str,
        manuf: str | None,
        model: str | None,
    ) -> tuple[Errno, TaskState | None, float | None]:
        """E3 steps 6-8 on the open task: its state when it is offered, else the errno and
        until when that answer may be cached (None: it changed something)."""
        if row.dt_id is None:
            return Errno.NO_TASK, None, _FOREVER
        if row.start_time > tx.now:  # not started: invisible until start_time (§5.2, D22)
            return Errno.NO_TASK, None, row.start_time
        state = self._effective_state(tx, row, dev_id)
        if not state.is_active:  # paused or (now) failed: step 6
            return Errno.NO_TASK, None, _FOREVER
        if state is TaskState.TO_BE_UPGRADED:
            # D11: exact string comparison, only against what the package declares.
            if (manuf is not None and row.manuf is not None and manuf != row.manuf) or (
                model is not None and row.model is not None and model != row.model
            ):
                self._transition(tx, row, on_action(state, Action.PREFLIGHT_FAILED))  # T7
                return Errno.MANUF_MODEL_MISMATCH, None, None
            if row.kind == PackageKind.DIFF and row.from_version != version:
                self._transition(tx, row, on_action(state, Action.PREFLIGHT_FAILED))  # T8
                return Errno.VERSION_MISMATCH, None, None
        return Errno.SUCC, state, None

    def _issue_token(self, tx: _Tx, row: _Row, state: TaskState) -> str:
        """D13: a fresh token with a fresh 48 h; the old ones stay remembered for E7/E8."""
        token = new_token()
        now = int(tx.now)
        params = {
            "b_id": row.dt_id,
            "b_state": int(state),
            "b_token": row.current_token,
            "v_token": token,
            "now": now,
        }
        conn = tx.writer
        if conn.dialect.name == "postgresql":
            if _TX_ISSUE_TOKEN.run(conn, params) != 1:
                raise ConcurrentChange
        else:
            if _TX_SET_TOKEN.run(conn, params) != 1:
                raise ConcurrentChange
            _TX_INSERT_TOKEN.run(conn, {"v_token": token, "v_id": row.dt_id, "now": now})
        tx.touched.add(row.dt_dev_id)
        return token

    def tasking(self, dev_id: int, task_type: TaskType) -> tuple[Errno, TaskInfo | None]:
        """E4 (§6.4, D18): the downloading/upgrading task and its current token; never issues."""

        def work(tx: _Tx, row: _Row | None) -> tuple[Errno, TaskInfo | None]:
            if row is None:
                return Errno.AUTH_FAILED, None
            if row.dt_id is None or row.start_time > tx.now:
                return Errno.NO_VALID_TOKEN, None
            if self._effective_state(tx, row, dev_id) not in RUNNING_STATES:
                return Errno.NO_VALID_TOKEN, None
            if row.current_token is None or token_expired(row.token_issued_at, tx.now):
                return Errno.TOKEN_EXPIRED, None
            return Errno.SUCC, _task_info(row, row.current_token)

        params = {"dev_id": dev_id, "module_type": int(task_type)}
        return self._read_first(self._read_open_task, _TX_DEVICE_AND_OPEN_TASK, params, work)

    # -- E5, E7, E8 --------------------------------------------------------------------------

    def check_token(self, dev_id: int, token: str) -> Errno:
        """E5 (§6.5, §5.4): token check; to-be-upgraded becomes downloading (T9).

        A successful check that changed nothing (T10) is cached and answered from the cache
        while it holds (:meth:`.DeviceCaches.check_token`)."""
        caches = self.caches
        key = check_token_key(token)
        cached = caches.answer(dev_id, key)
        if cached is not None:
            return cached.errno
        if values.TOKEN_RE.fullmatch(token) is None:
            return Errno.NO_VALID_TOKEN  # never issued: this server issues only this format
        generation = caches.generation

        def work(tx: _Tx, row: _Row | None) -> tuple[Errno, float | None]:
            if row is None or row.dt_dev_id != dev_id:
                return Errno.NO_VALID_TOKEN, None  # unknown or another device's (§5.6)
            state = self._effective_state(tx, row, dev_id)
            # An older token of the task is expired by construction: E3 reissues only after
            # expiry (§5.6, "E5 with an old or expired token answers errno 12").
            expired = token != row.current_token or token_expired(row.issued_at, tx.now)
            outcome = on_token_check(state, token_expired=expired)
            if outcome.ok and outcome.state is not None and outcome.state is not state:
                self._transition(tx, row, outcome.state)  # T9
                return outcome.errno, None
            if outcome.ok:  # T10 changes nothing: the C SDK's check before every chunk
                return outcome.errno, _valid_until(row.issued_at, row.deadline)
            return outcome.errno, None

        errno, valid_until = self._read_first(self._read_token, _TX_TOKEN, {"token": token}, work)
        if valid_until is not None:
            caches.keep_answer(generation, dev_id, key, Answer(errno, None, valid_until))
        return errno

    # -- memoised replies ----------------------------------------------------------------------

    def basis(self, authorization: str, dev_id: int, key: tuple[Any, ...]) -> Basis | None:
        """The cached principal, device and answer behind a reply to ``key``, if all are cached
        and valid now; None otherwise (then the reply must not be memoised)."""
        caches = self.caches
        generation = caches.generation
        principal = caches.principal(authorization)
        device = caches.device(dev_id)
        answer = caches.answer(dev_id, key)
        if principal is None or device is None or answer is None:
            return None
        if not self.binds(principal, device):
            return None
        fresh = caches.fresh_until(authorization, caches.devices.expires(dev_id), dev_id)
        return Basis(
            authorization, principal, dev_id, device, key, answer, False, generation, fresh
        )

    def basis_named(
        self, authorization: str, pid: str, name: str, key: tuple[Any, ...]
    ) -> Basis | None:
        """:meth:`basis` for the dialects that name the device in the path (Studio, fuse):
        the cached principal, the cached dev_id of (``pid``, ``name``) and the cached answer to
        ``key``. None when any is missing, or the principal is an account's (never cached: F2,
        F12) or does not speak for the device."""
        caches = self.caches
        generation = caches.generation
        principal = caches.principal(authorization)
        dev_id = caches.names.get((pid, name))
        if principal is None or dev_id is None:
            return None
        answer = caches.answer(dev_id, key)
        device = DeviceRef(dev_id, pid, name)
        if answer is None or not self.binds(principal, device):
            return None
        fresh = caches.fresh_until(authorization, caches.names.expires((pid, name)), dev_id)
        return Basis(authorization, principal, dev_id, device, key, answer, True, generation, fresh)

    def report(self, dev_id: int, token: str | None, report: Report | Errno) -> Errno:
        """E7/E8 (§6.7, §6.8, §5.5, D14, D15) on any token ever issued for the device's task.

        ``report`` is the decoded body, or the errno its decoding failed with: body errors rank
        below an unknown token (errno 1), so the token is resolved first.
        """
        if token is None or values.TOKEN_RE.fullmatch(token) is None:
            return Errno.AUTH_FAILED
        errno = self._report(dev_id, _TX_TOKEN, {"token": token}, report)
        return Errno.AUTH_FAILED if errno is None else errno  # unknown or foreign (§5.6)

    def report_tid(self, dev_id: int, tid: int, report: Report | Errno) -> Errno | None:
        """S-R and F-R (S8, F9): E7's table on the device task ``tid``; None when it is not
        this device's task (each dialect numbers that answer)."""
        return self._report(dev_id, _TX_TID, {"tid": tid}, report)

    def _report(
        self, dev_id: int, statement: Prepared, params: dict[str, Any], report: Report | Errno
    ) -> Errno | None:
        """The report rules of every dialect, on the task ``statement`` finds; None when it
        finds none of this device's."""

        def work(tx: _Tx) -> Errno | None:
            row = statement.first(tx.writer, params)
            if row is None or row.dt_dev_id != dev_id:
                return None
            if isinstance(report, Errno):
                return report
            self._write_kept_offers(tx, row.dt_id)  # before the report's own event
            state = self._effective_state(tx, row, dev_id)
            outcome = on_report(state, report.kind)
            if not outcome.ok or outcome.state is None:
                # Refused, with its reason on the timeline (a report that changed nothing).
                timeline.record_refused(
                    tx.writer, row.dt_id, state, report.value, int(outcome.errno), tx.now
                )
                return outcome.errno
            new = outcome.state
            if report.kind is ReportKind.PROGRESS:  # T11: progress only, no state change
                set_progress(tx.writer, row.dt_id, state, report.value, tx.now)
                return Errno.SUCC
            progress = 100 if new is TaskState.UPGRADING else None  # T12, T13
            self._transition(
                tx,
                row,
                new,
                progress=progress,
                result_code=report.value if new.is_terminal else None,  # T14-T16
                kind="report",
                code=report.value,
            )
            # The download is over: what this worker served of it is written with the report,
            # in its transaction, rather than at the next periodic flush (or in a transaction of
            # its own after this one).
            self._write_served(tx, row.dt_id)
            if report.kind is ReportKind.UPGRADED:  # T15: the device now runs the target
                fota = TaskType(row.module_type) is TaskType.FOTA
                _TX_SET_VERSIONS.run(
                    tx.writer,
                    {
                        "b_dev_id": dev_id,
                        "f": row.target if fota else None,
                        "s": None if fota else row.target,
                        "now": int(tx.now),
                    },
                )
            return Errno.SUCC

        return self._run(work)

    def _write_served(self, tx: _Tx, device_task_id: int) -> None:
        """The bytes served of ``device_task_id`` not written yet, in ``tx``; they are counted
        as pending again if ``tx`` does not commit (:meth:`_run`)."""
        nbytes = self.served.take(device_task_id)
        if nbytes:
            tx.served[device_task_id] = tx.served.get(device_task_id, 0) + nbytes
            timeline.add_bytes(tx.writer, {device_task_id: nbytes}, tx.now)

    # -- Studio and fuse: the task named by its tid -----------------------------------------

    def check_state_tid(
        self, dev_id: int, tid: int, *, refuses: bool
    ) -> tuple[Errno, int | None] | None:
        """S-T and F-T on the device task ``tid``: the errno and the ``status`` shown (1-6), or
        None when ``tid`` is not this device's task (or not started, so invisible, §5.2).

        ``refuses``: Studio's S-T answers as E5 by state (S6: §5.4's table, a tid never expires);
        fuse's F-T refuses nothing by state (F7: ``STATUS_QUERY_TABLE``). Both move a
        to-be-upgraded task to downloading (T9).

        As E5's (:meth:`check_token`): a successful check that changed nothing (T10, the check
        the C SDK makes before every chunk) is cached, until the task's deadline, and answered
        from the cache while it holds; every change of the task invalidates the device.
        """
        caches = self.caches
        key = check_state_tid_key(tid, refuses)
        cached = caches.answer(dev_id, key)
        if cached is not None:
            return cached.errno, cached.status
        generation = caches.generation

        def work(tx: _Tx, row: _Row | None) -> tuple[tuple[Errno, int | None] | None, float | None]:
            if row is None or row.dt_dev_id != dev_id or row.start_time > tx.now:
                return None, None
            stored = TaskState(row.state)
            state = self._effective_state(tx, row, dev_id)
            if refuses:
                outcome = on_token_check(state, token_expired=False)
                if not outcome.ok or outcome.state is None:
                    return (outcome.errno, None), None  # refusals are never cached (as E5)
                new = outcome.state
            else:
                new = on_status_query(state)
            if new is not state:
                self._transition(tx, row, new)  # T9 (a read-only attempt runs again, writing)
            paused_from = None if row.paused_from is None else TaskState(row.paused_from)
            found = (Errno.SUCC, wire_status(new, paused_from))
            if new is not stored:
                return found, None  # changed something (T9 or T5): not cached
            until = _FOREVER if row.deadline is None or not new.is_open else float(row.deadline)
            return found, until

        found, valid_until = self._read_first(self._read_tid, _TX_TID, {"tid": tid}, work)
        if found is not None and valid_until is not None:
            answer = Answer(found[0], None, valid_until, status=found[1])
            caches.keep_answer(generation, dev_id, key, answer)
        return found

    def download_tid(self, dev_id: int, tid: int) -> TidGrant | None:
        """S-D and F-D's task lookup (S7, F8): what may be served of the device task ``tid``, or
        None when it is not this device's task. Changes nothing: a successful download calls
        :meth:`downloaded_tid`."""
        caches = self.caches
        key = download_tid_key(tid)
        cached = caches.answer(dev_id, key)
        if cached is not None:
            return cached.grant
        generation = caches.generation
        row = self._read_tid.one(tid=tid)
        now = self._clock()
        if row is None or row.dt_dev_id != dev_id or row.start_time > now:
            return None
        state = TaskState(row.state)
        if state.is_open and _deadline_passed(row.deadline, now):
            state = TaskState.FAILED  # T5, applied by the next request that writes
        grant = TidGrant(state, row.sha256, row.size, row.file_name)
        # Every change of the task invalidates the device; the deadline is a time.
        until = _FOREVER if row.deadline is None or not state.is_open else float(row.deadline)
        caches.keep_answer(generation, dev_id, key, Answer(Errno.SUCC, None, until, grant=grant))
        return grant

    def downloaded_tid(self, dev_id: int, tid: int) -> None:
        """After a successful S-D/F-D: a to-be-upgraded task moves to downloading (S7,
        ``DOWNLOAD_TABLE``), so that devices that skip S-T still progress."""

        def work(tx: _Tx, row: _Row | None) -> None:
            if row is None or row.dt_dev_id != dev_id:
                return
            state = self._effective_state(tx, row, dev_id)
            new = on_download(state, moves=True)
            if new is not None and new is not state:
                self._transition(tx, row, new)

        self._read_first(self._read_tid, _TX_TID, {"tid": tid}, work)

    # -- E6 ----------------------------------------------------------------------------------

    def download_grant(self, token: str) -> DownloadGrant | None:
        """E6's token lookup (D6): None when the token was never issued. Changes nothing.
        Answered from the cache when the token's grant is there (see the module docstring for
        staleness), else read and cached."""
        caches = self.caches
        grant = caches.grant(token)
        if grant is not None:
            return grant
        if values.TOKEN_RE.fullmatch(token) is None:
            return None
        generation = caches.generation
        row = self._read_token.one(token=token)
        if row is None:
            return None
        grant = DownloadGrant(
            device_task_id=row.dt_id,
            dev_id=row.dt_dev_id,
            state=TaskState(row.state),
            token_issued_at=row.issued_at,
            current=row.current_token == token,
            deadline=row.deadline,
            sha256=row.sha256,
            size=row.size,
            file_name=row.file_name,
        )
        caches.keep_grant(generation, token, grant)  # not if raced with an invalidation
        return grant

    # -- E9 ----------------------------------------------------------------------------------

    def dev_info(self, principal: Principal, auth_info: str) -> int | None:
        """E9 (§6.9 step 4): the dev_id of the product's device with ``auth_info``, or None.

        An ambiguous ``auth_info`` (two devices share it) finds no device rather than a guess.
        """
        rows = self._read_by_auth_info.all(pid=principal.pid, auth_info=auth_info)
        if len(rows) != 1:
            return None
        row = rows[0]
        if principal.device_name is not None and row.name != principal.device_name:
            return None
        return int(row.dev_id)

    # -- management helpers ------------------------------------------------------------------

    def expire_deadlines(self, dev_id: int | None = None) -> int:
        """T5 in its own transaction (see :func:`expire_deadlines`); invalidates the caches."""

        def work(tx: _Tx) -> int:
            changed = expire_deadlines(tx.writer, tx.now, dev_id=dev_id)
            tx.touched_all = changed > 0
            return changed

        return self._run(work)

    def apply_action(
        self, device_task_id: int, action: Action
    ) -> tuple[TaskState, TaskState] | None:
        """:func:`apply_action` in its own transaction, retried on concurrent changes."""

        def work(tx: _Tx) -> tuple[TaskState, TaskState] | None:
            result = apply_action(tx.writer, device_task_id, action, tx.now)
            tx.touched_all = True  # rare: drop everything rather than look up the device
            return result

        return self._run(work)


_FOREVER: Final = float("inf")
_OFFERED_MEMO_MAX: Final = 100_000  # about 10 MB at most
# A parsed Authorization value beyond its characters: the object and its seven strings (CPython
# 3.11, about).
_TOKEN_BYTES: Final = 500


def _valid_until(token_issued_at: int, deadline: int | None) -> float:
    """When a cached answer about a token stops holding: its expiry or the task's deadline."""
    until = float(token_issued_at + values.TOKEN_LIFETIME_S)
    return until if deadline is None else min(until, float(deadline))


def _tid_task_info(row: _Row, state: TaskState) -> TidTaskInfo:
    return TidTaskInfo(
        target=row.target,
        tid=row.dt_id,
        size=row.size,
        md5=row.md5,
        status=wire_status(state),
        kind=PackageKind(row.kind),
    )


def _task_info(row: _Row, token: str) -> TaskInfo:
    return TaskInfo(
        target=row.target,
        token=token,
        size=row.size,
        md5=row.md5,
        signal=row.signal,
        power=row.power,
        retry=row.retry,
        interval=row.interval,
        kind=PackageKind(row.kind),
    )

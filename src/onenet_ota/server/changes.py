"""The cache change feed: how one server process learns what other processes changed.

Every server process keeps in-process caches for the device API (:mod:`.device_service`,
:mod:`.device_api`). Its own changes drop its own entries at once. To learn of changes made
elsewhere (another worker of ``serve --workers N``, another host on the same PostgreSQL, the
management API served by another process), every transaction that changes something a cache may
hold also inserts, in the same transaction, a ``cache_changes`` row naming the device (or NULL:
anything may have changed) and what of it changed (its :class:`Scope`), with :func:`publish`.
Each process reads the rows it has not seen, at most every ``interval`` seconds (0.1 s by
default) while it serves requests, and drops what they name (:class:`ChangeFeed`).

Reading "the rows not seen yet" exactly:

- SQLite: write transactions are serialised (BEGIN IMMEDIATE, db.py) and ids come from
  AUTOINCREMENT inside them, so ids become visible in order and are never reused: ``id > last``
  is exact, and a gap before the first new row can only be rows pruned before this process read
  them, so it drops everything.
- PostgreSQL: ids come from a sequence before commit, so a smaller id may become visible after a
  larger one; ids cannot say what is new. Each row carries its transaction's id
  (``pg_current_xact_id()``) instead. Every read first takes a snapshot (``pg_current_snapshot()``:
  ``xmax``, one past the highest transaction id that had ended, and ``xip``, the ids below it of
  the transactions running), then reads the rows. A row that becomes visible after one read was
  written by a transaction that had not ended at that read's snapshot: one listed in ``xip``, or
  one whose id is ``>= xmax`` (running then, or not started yet; a running one with such an id
  is not listed in ``xip``). So the next read asks for exactly those rows, and skips the
  few of them that the previous read already found (they committed between its snapshot and its
  rows). Each read thus costs what changed since the previous one, whatever else runs: a
  transaction left open for hours elsewhere in the cluster adds only the rows it wrote itself.

Rows older than ``retention`` seconds (10 minutes) are deleted by the readers now and then. A
process that has not read for half that long (it served nothing meanwhile) drops everything
rather than trust the feed. A row is dated when it is written, not when it commits, so a
transaction that stayed open longer than the retention could see its rows pruned before every
reader has read them (PostgreSQL has no gap to notice it by); the server's own transactions last
milliseconds, a bulk import seconds. Changes made outside the server (SQL typed by an operator)
are not in the feed; the caches' maximum age bounds how long those go unseen.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnClause,
    Connection,
    Engine,
    Select,
    any_,
    bindparam,
    cast,
    delete,
    insert,
    literal_column,
    or_,
    select,
    text,
)

from onenet_ota.server.db import Prepared
from onenet_ota.server.schema import cache_changes

__all__ = [
    "DEFAULT_INTERVAL",
    "MAX_DEVICES_PER_CHANGE",
    "ChangeFeed",
    "Changes",
    "Scope",
    "new_origin",
    "publish",
]

log = logging.getLogger(__name__)
_c = cache_changes.c
DEFAULT_INTERVAL: Final = 0.1
"""Seconds between two reads of the feed: how long another process's change may go unseen."""
_BATCH: Final = 5000  # rows read at once; more than that and everything is dropped instead
# A change touching more devices than this is published as "anything may have changed": one row
# instead of thousands, which every process would read.
MAX_DEVICES_PER_CHANGE: Final = 1000
_PG_XID: Final[ColumnClause[Any]] = literal_column("pg_current_xact_id()::text::bigint")
_PG_SNAPSHOT: Final[Select[Any]] = select(
    literal_column("pg_current_snapshot()::text").label("snapshot")
)

Reader = Callable[[Select[Any]], Callable[..., list[Any]]]
"""Compiles a SELECT once and returns a function running it (keyword parameters) to rows."""


class Scope(IntEnum):
    """What of a device a change touched (the ``scope`` column of its feed row)."""

    DEVICE = 0
    """Anything about the device: its row (pid, name), its keys, its tasks. A deletion, a key
    rotation or anything the writer does not sort finer drops every cached fact about it,
    the tokens verified with its keys included."""
    TASKS = 1
    """Only its device tasks (state, token, progress) and its stored versions: what a device's
    own requests change. Its row and keys are as they were, so what rests on them stays."""


def new_origin() -> int:
    """A random id for one writer process, so that a reader can skip its own rows."""
    return secrets.randbits(62)


def publish(
    conn: Connection,
    dev_ids: Iterable[int] | None,
    now: float,
    *,
    origin: int = 0,
    scope: Scope = Scope.DEVICE,
) -> None:
    """Record, inside the caller's transaction, that cached facts about ``dev_ids`` changed
    (None, or more than :data:`MAX_DEVICES_PER_CHANGE` devices: about anything), and which
    (``scope``). ``origin`` names the writing process (0: unnamed)."""
    ids: list[int | None] = [None]
    if dev_ids is not None:
        ids = [*sorted(set(dev_ids))]
        if not ids:
            return
        if len(ids) > MAX_DEVICES_PER_CHANGE:
            ids = [None]
    postgres = conn.dialect.name == "postgresql"
    created_at = int(now)
    if len(ids) == 1:  # most transactions touch one device: one prepared INSERT
        prepared = _PREPARED_PG if postgres else _PREPARED
        params = {"dev_id": ids[0], "created_at": created_at, "origin": origin, "scope": scope}
        prepared.run(conn, params)
        return
    rows = [
        {"dev_id": dev_id, "created_at": created_at, "origin": origin, "scope": scope}
        for dev_id in ids
    ]
    conn.execute(_INSERT_PG if postgres else _INSERT, rows)


# Prebuilt: every write transaction of the device API publishes, and a statement built per call
# costs its construction and cache-key computation each time (measured on SQLite: about 300 us per
# publish built per call, about 80 us prebuilt, less again prepared).
_INSERT: Final = insert(cache_changes).values(
    dev_id=bindparam("dev_id"),
    created_at=bindparam("created_at"),
    origin=bindparam("origin"),
    scope=bindparam("scope"),
)
_INSERT_PG: Final = _INSERT.values(xid=_PG_XID)
_PREPARED: Final = Prepared(_INSERT)
_PREPARED_PG: Final = Prepared(_INSERT_PG)


@dataclass(frozen=True, slots=True)
class Changes:
    """What a read of the feed found: everything, or the devices that changed (``dev_ids``),
    of which ``tasks_only`` are those whose every row said :attr:`Scope.TASKS`. A reader that
    does not care what changed reads ``dev_ids`` alone (the campaign evaluator does)."""

    everything: bool = False
    dev_ids: frozenset[int] = frozenset()
    tasks_only: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return self.everything or bool(self.dev_ids)


NOTHING: Final = Changes()
EVERYTHING: Final = Changes(everything=True)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What ``pg_current_snapshot()`` says: no transaction with an id from ``xmax`` on had ended
    (some may have been running), and ``xip`` lists the ones below ``xmax`` then running."""

    xmax: int
    xip: tuple[int, ...]

    @classmethod
    def parse(cls, text_: str) -> _Snapshot:
        # "xmin:xmax:xip,xip,..." (PostgreSQL's pg_snapshot text form; xip may be empty).
        _xmin, xmax, xip = text_.split(":")
        return cls(int(xmax), tuple(int(x) for x in xip.split(",") if x))


class ChangeFeed:
    """Reads ``cache_changes`` for one process (see the module docstring). Not thread-safe: one
    caller at a time (the device API calls it from its event loop).

    ``reader`` runs SELECTs outside any write transaction; ``origin`` is this process's own
    :func:`publish` origin, whose rows it skips (it has dropped those entries already).
    """

    def __init__(
        self,
        engine: Engine,
        reader: Reader,
        *,
        origin: int,
        interval: float = DEFAULT_INTERVAL,
        retention: float = 600.0,
        batch: int = _BATCH,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._origin = origin
        self._interval = interval
        self._retention = retention
        self._clock = clock
        self._monotonic = monotonic
        self._batch = batch
        columns = (_c.id, _c.dev_id, _c.xid, _c.origin, _c.scope)
        if self._postgres:
            self._read_snapshot = reader(_PG_SNAPSHOT)
            # An array parameter, not IN (...): readers compile their statement once.
            xip = cast(bindparam("xip"), ARRAY(BigInteger))
            by = or_(_c.xid >= bindparam("xmax"), _c.xid == any_(xip))
        else:
            # AUTOINCREMENT's counter, not max(id): the table may have been pruned empty.
            self._read_last = reader(
                select(literal_column("seq").label("last"))
                .select_from(text("sqlite_sequence"))
                .where(literal_column("name") == cache_changes.name)
            )
            by = _c.id > bindparam("since")
        self._read_rows = reader(select(*columns).where(by).order_by(_c.id).limit(batch + 1))
        self._since: int | None = None  # SQLite: the last id read
        self._snapshot: _Snapshot | None = None  # PostgreSQL: the last read's snapshot
        self._seen: frozenset[int] = frozenset()  # PostgreSQL: ids the last read found
        self._next_read = 0.0
        self._last_read = monotonic()
        self._next_prune = monotonic() + retention / 10

    def start(self) -> None:
        """Note where the feed is now: rows from before are not reported (call it before the
        caches are first filled)."""
        if self._postgres:
            self._snapshot = self._take_snapshot()
        else:
            self._since = self._last_id()
        self._seen = frozenset()
        now = self._monotonic()
        self._last_read = now
        self._next_read = now + self._interval

    def due(self) -> bool:
        """Whether :meth:`read` should run now (``interval`` has passed since the last one)."""
        return self._monotonic() >= self._next_read

    def read(self) -> Changes:
        """What changed since the last read. Raises what the database raises; the caller should
        then drop everything, since it cannot know what it missed."""
        now = self._monotonic()
        self._next_read = now + self._interval
        stale = now - self._last_read > self._retention / 2
        if (self._snapshot if self._postgres else self._since) is None or stale:
            self.start()
            return EVERYTHING
        changes = self._read_postgres() if self._postgres else self._read_sqlite()
        self._last_read = now
        if now >= self._next_prune:
            self._next_prune = now + self._retention / 10
            # A write: off the caller's thread, which may be an event loop that must not wait
            # for the database's write lock.
            threading.Thread(target=self._prune, name="onenet-ota-prune", daemon=True).start()
        return changes

    def _last_id(self) -> int:
        rows = self._read_last()
        return int(rows[0].last) if rows else 0

    def _take_snapshot(self) -> _Snapshot:
        return _Snapshot.parse(self._read_snapshot()[0].snapshot)

    def _read_sqlite(self) -> Changes:
        since = self._since
        assert since is not None
        rows = self._read_rows(since=since)
        if not rows:
            return NOTHING
        gap = rows[0].id != since + 1  # rows pruned before this process read them
        if len(rows) > self._batch or gap:
            self.start()
            return EVERYTHING
        self._since = rows[-1].id
        return self._collect(rows)

    def _read_postgres(self) -> Changes:
        last = self._snapshot
        assert last is not None
        # The snapshot first, in a statement of its own: every transaction it does not show
        # running has ended before the rows below are read (a later statement, a later
        # snapshot), so the next read need not look at those transactions again.
        snapshot = self._take_snapshot()
        rows = self._read_rows(xmax=last.xmax, xip=list(last.xip))
        self._snapshot = snapshot
        if len(rows) > self._batch:
            self._seen = frozenset()
            return EVERYTHING
        fresh = [row for row in rows if row.id not in self._seen]
        self._seen = frozenset(row.id for row in rows)
        return self._collect(fresh)

    def _collect(self, rows: list[Any]) -> Changes:
        dev_ids: set[int] = set()
        whole: set[int] = set()  # devices some row said more than their tasks of
        for row in rows:
            if row.origin == self._origin and self._origin:
                continue
            if row.dev_id is None:
                return EVERYTHING
            dev_ids.add(row.dev_id)
            # Anything but a known narrower scope (a value written by a newer release, say)
            # is read as the widest: forgetting too much costs reads, too little a revocation.
            if row.scope != Scope.TASKS:
                whole.add(row.dev_id)
        if not dev_ids:
            return NOTHING
        return Changes(dev_ids=frozenset(dev_ids), tasks_only=frozenset(dev_ids - whole))

    def _prune(self) -> None:
        cutoff = int(self._clock() - self._retention)
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(cache_changes).where(_c.created_at < cutoff))
        except Exception:  # the next prune tries again; readers are unaffected
            log.warning("cannot prune the cache change feed", exc_info=True)

"""Device timelines: what happened to a device's tasks, when, through which dialect and endpoint.

One ``device_task_events`` row per

- **state change** of a device task (every edge of the state tables, whoever caused it: a device
  request, a management action, a deadline), written by :mod:`.transitions` in the transaction
  of the change, so that the timeline and the device-task row never disagree;
- **report** (E7, E8, S-R, F-R): kind ``report`` when it moved the state, ``progress`` for T11,
  and a refused report with the errno it got (reasons: "reported 205 while cancelled");
- **version report** (E1, S-V, F-V, and the version E3/S-C/F-C record) that changed a stored
  version. A device repeating the same version writes nothing: E1 before every poll must not
  grow the table;
- **first offer** of a device task to a device, per dialect (an E3, S-C or F-C that returned the
  task). Repeated polls write nothing: a polling fleet would otherwise write a row per device and
  poll. A repeat's count is not kept either: most repeats are answered from the caches or
  memoised replies without reaching the service, so a count would undercount anyway, and
  keeping one exactly would cost a write per poll. An offer made by a poll that writes nothing
  else is kept in memory by the worker (a fleet's first round of polls would otherwise be a
  write transaction per device) and written, with the time of the poll, by the periodic flush
  below (and at shutdown), or earlier in the transaction of its device task's next event in
  that worker, so that it stays first on the timeline (:meth:`.DeviceService.flush_offers`).

Who caused an event is read from :func:`set_call`, which each device API handler sets per
request (a context variable, so concurrent requests on the event loop keep theirs); changes made
without one (the management API, the deadline sweep) name their source explicitly.

Bytes served per device task (:class:`ServedBytes`) are summed in memory by each worker and
added to ``device_task_bytes`` in one transaction per interval, the kept first offers with them
(and at shutdown; for the device task being reported on, in the report's own transaction),
never a write per chunk. The history shows a success report (101, or 201, §6.7.1) made while
fewer bytes than the package were served as ``short_download``: flagged, not refused. The
OneNET C SDK example does exactly that on packages of 4096·k + 1 bytes, whose last byte it
never requests, and on 1-byte packages, which it never downloads (its chunk loop runs while
``start < size − 1``, spec §7 step 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    SmallInteger,
    String,
    and_,
    bindparam,
    cast,
    exists,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from onenet_ota.management.models import EventKind, HistoryEvent, ShortDownload
from onenet_ota.protocol.code_texts import code_name, code_text
from onenet_ota.protocol.states import TaskState
from onenet_ota.server.db import Prepared
from onenet_ota.server.http import FileSegment, Response
from onenet_ota.server.schema import (
    device_task_bytes,
    device_task_events,
    device_tasks,
    packages,
    tasks,
)

__all__ = [
    "ADMIN",
    "DEADLINE",
    "EventKind",
    "HistoryEvent",
    "ServedBytes",
    "Source",
    "body_length",
    "current_source",
    "delete_for",
    "device_history",
    "event_params",
    "record_bulk",
    "record_first_offers",
    "record_refused",
    "record_transition",
    "record_version",
    "set_call",
    "with_event",
]

log = logging.getLogger(__name__)

_ev, _dt, _b = device_task_events, device_tasks, device_task_bytes


@dataclass(frozen=True, slots=True)
class Source:
    """Who caused an event: a device's dialect and endpoint label, or (dialect None) the
    management API or a deadline."""

    dialect: str | None
    endpoint: str | None


ADMIN: Final = Source(None, "admin")
DEADLINE: Final = Source(None, "deadline")
_NOBODY: Final = Source(None, None)

_CALL: ContextVar[Source] = ContextVar("onenet_ota_device_call", default=_NOBODY)


def set_call(dialect: str, endpoint: str) -> None:
    """Name the device request being answered (its dialect and endpoint label, e.g. ``classic``
    and ``E7``) for the events it causes. Each device API handler calls it per request."""
    _CALL.set(Source(dialect, endpoint))


def current_source(default_dialect: str | None = None) -> Source:
    """The request named by :func:`set_call` in this context; ``default_dialect`` when none was
    (a service called directly)."""
    found = _CALL.get()
    if found.dialect is None and default_dialect is not None:
        return Source(default_dialect, found.endpoint)
    return found


def _ms(now: float) -> int:
    return int(now * 1000)


# -- writing, inside the caller's transaction ------------------------------------------------


def _param(name: str, type_: Any) -> Any:
    # Cast so that PostgreSQL knows a parameter's type in a SELECT list.
    return cast(bindparam(name, type_=type_), type_)


_EVENT_COLUMNS: Final = [
    "dev_id",
    "device_task_id",
    "task_id",
    "at_ms",
    "kind",
    "dialect",
    "endpoint",
    "code",
    "errno",
    "from_state",
    "to_state",
]
# An event's own values, after the three ids (dev_id, device_task_id, task_id) that come from
# its device task's row; their parameters are :func:`event_params`'.
_EVENT_VALUES: Final = (
    _param("e_at", BigInteger()),
    _param("e_kind", String(16)),
    _param("e_dialect", String(8)),
    _param("e_endpoint", String(16)),
    _param("e_code", SmallInteger()),
    _param("e_errno", SmallInteger()),
    _param("e_from", SmallInteger()),
    _param("e_to", SmallInteger()),
)
# One device task's event, its dev_id and task_id read from its row in the same statement.
_INSERT_FOR_TASK = insert(_ev).from_select(
    _EVENT_COLUMNS,
    select(_dt.c.dev_id, _dt.c.id, _dt.c.task_id, *_EVENT_VALUES).where(
        _dt.c.id == bindparam("e_id")
    ),
)


_INSERT_FOR_TASK_PREPARED: Final = Prepared(_INSERT_FOR_TASK)


def with_event(change: Any) -> Any:
    """``change`` (an UPDATE of one device task, by id) and the event of the device task it
    changes, in one statement: PostgreSQL's ``WITH changed AS (UPDATE ... RETURNING ...)
    INSERT INTO device_task_events ... SELECT ... FROM changed``. Its rowcount is the rows the
    UPDATE changed (an event for each); its parameters are the UPDATE's and
    :func:`event_params`'. What :func:`record_transition` after the UPDATE writes, in one
    round trip instead of two (SQLite cannot put an UPDATE in a WITH; its statements cost no
    round trip)."""
    changed = change.returning(_dt.c.dev_id, _dt.c.id, _dt.c.task_id).cte("changed")
    return (
        insert(_ev)
        .from_select(
            _EVENT_COLUMNS,
            select(changed.c.dev_id, changed.c.id, changed.c.task_id, *_EVENT_VALUES),
        )
        .add_cte(changed)
    )


def event_params(
    old: TaskState | None,
    new: TaskState | None,
    now: float,
    *,
    kind: EventKind = "state",
    code: int | None = None,
    errno: int | None = None,
    source: Source | None = None,
) -> dict[str, Any]:
    """The parameters of an event's own values (see :func:`record_transition`)."""
    who = current_source() if source is None else source
    return {
        "e_at": _ms(now),
        "e_kind": kind,
        "e_dialect": who.dialect,
        "e_endpoint": who.endpoint,
        "e_code": code,
        "e_errno": errno,
        "e_from": None if old is None else int(old),
        "e_to": None if new is None else int(new),
    }


def record_transition(
    conn: Connection,
    device_task_id: int,
    old: TaskState | None,
    new: TaskState | None,
    now: float,
    *,
    kind: EventKind = "state",
    code: int | None = None,
    errno: int | None = None,
    source: Source | None = None,
) -> None:
    """One event of device task ``device_task_id`` (its state change from ``old`` to ``new``,
    or a report that changed nothing when they are None)."""
    params = event_params(old, new, now, kind=kind, code=code, errno=errno, source=source)
    params["e_id"] = device_task_id
    _INSERT_FOR_TASK_PREPARED.run(conn, params)


def record_refused(
    conn: Connection, device_task_id: int, state: TaskState, code: int, errno: int, now: float
) -> None:
    """A report the state machine refused: ``code`` reported in ``state``, answered ``errno``
    (classic numbers; each dialect numbers its answer from it)."""
    record_transition(conn, device_task_id, state, None, now, kind="report", code=code, errno=errno)


def record_bulk(
    conn: Connection, where: Any, new_state: Any, now: float, source: Source | None
) -> None:
    """The events of a bulk change, before its UPDATE: one per device task matching ``where``,
    from its current state to ``new_state`` (a SQL expression over the row: the UPDATE's own
    CASE). The caller's UPDATE must then move exactly these rows (it has the same condition and
    runs in the same transaction, after the rows were locked)."""
    who = current_source() if source is None else source
    conn.execute(
        insert(_ev).from_select(
            _EVENT_COLUMNS,
            select(
                _dt.c.dev_id,
                _dt.c.id,
                _dt.c.task_id,
                cast(literal(_ms(now), BigInteger()), BigInteger()),
                cast(literal("state", String(16)), String(16)),
                cast(literal(who.dialect, String(8)), String(8)),
                cast(literal(who.endpoint, String(16)), String(16)),
                cast(literal(None, SmallInteger()), SmallInteger()),
                cast(literal(None, SmallInteger()), SmallInteger()),
                _dt.c.state,
                new_state,
            ).where(where),
        )
    )


_INSERT_VERSION = insert(_ev).values(
    dev_id=bindparam("e_dev_id"),
    at_ms=bindparam("e_at"),
    kind="version",
    dialect=bindparam("e_dialect"),
    endpoint=bindparam("e_endpoint"),
    detail=bindparam("e_detail"),
)


def record_version(
    conn: Connection,
    dev_id: int,
    now: float,
    changed: dict[str, str],
    *,
    default_dialect: str | None = None,
) -> None:
    """A version report that changed the stored versions (``changed``: field -> new value)."""
    if not changed:
        return
    who = current_source(default_dialect)
    detail = " ".join(f"{field}={value}" for field, value in sorted(changed.items()))
    _INSERT_VERSION_PREPARED.run(
        conn,
        {
            "e_dev_id": dev_id,
            "e_at": _ms(now),
            "e_dialect": who.dialect,
            "e_endpoint": who.endpoint,
            "e_detail": detail[:64],
        },
    )


_INSERT_VERSION_PREPARED: Final = Prepared(_INSERT_VERSION)

# A first offer (one kept back by DeviceService, or one made in a transaction that writes anyway):
# written unless its row is there already (another worker's, or one written meanwhile); its
# device task's ids read in the same statement, and nothing written for a device task deleted
# since.
_OFFER_ROW = select(
    _dt.c.dev_id,
    _dt.c.id,
    _dt.c.task_id,
    _param("e_at", BigInteger()),
    cast(literal("offered", String(16)), String(16)),
    _param("e_dialect", String(8)),
    _param("e_endpoint", String(16)),
    cast(literal(None, SmallInteger()), SmallInteger()),
    cast(literal(None, SmallInteger()), SmallInteger()),
    cast(literal(None, SmallInteger()), SmallInteger()),
    cast(literal(None, SmallInteger()), SmallInteger()),
).where(_dt.c.id == bindparam("e_id"))
_OFFERED = select(_ev.c.id).where(
    _ev.c.device_task_id == bindparam("e_id"),
    # A literal: SQLite prepares a statement again on every run when a bound value decided
    # whether a partial index applies (uq_device_task_events_offered's kind = 'offered').
    _ev.c.kind == literal_column("'offered'"),
    _ev.c.dialect.is_not_distinct_from(bindparam("e_dialect", type_=_ev.c.dialect.type)),
)
_INSERT_FIRST_OFFER = insert(_ev).from_select(_EVENT_COLUMNS, _OFFER_ROW.where(~exists(_OFFERED)))


_INSERT_FIRST_OFFER_PREPARED: Final = Prepared(_INSERT_FIRST_OFFER)


def record_first_offers(conn: Connection, offers: Iterable[tuple[int, float, Source]]) -> None:
    """First offers (device task id, when, through which request), each written unless its
    device task has one through that dialect already. A concurrent insert of the same offer
    fails on the unique index: the caller's transaction is retried."""
    rows = [
        {"e_id": dt_id, "e_at": _ms(at), "e_dialect": who.dialect, "e_endpoint": who.endpoint}
        for dt_id, at, who in offers
    ]
    if len(rows) == 1:  # an offer made now, or kept back and written with the next event
        _INSERT_FIRST_OFFER_PREPARED.run(conn, rows[0])
    elif rows:
        conn.execute(_INSERT_FIRST_OFFER, rows)


def delete_for(conn: Connection, device_task_ids: Any) -> None:
    """Delete the timelines and byte counts of the device tasks ``device_task_ids`` (a SELECT
    of ids), with them."""
    conn.execute(_ev.delete().where(_ev.c.device_task_id.in_(device_task_ids)))
    conn.execute(_b.delete().where(_b.c.device_task_id.in_(device_task_ids)))


def delete_device(conn: Connection, dev_id: int) -> None:
    """Delete what is left of a device's timeline (its version reports) with the device."""
    conn.execute(_ev.delete().where(_ev.c.dev_id == dev_id))


# -- bytes served -----------------------------------------------------------------------------


def _build_add_bytes(insert_: Any) -> Any:
    ins = insert_(_b)
    return ins.on_conflict_do_update(
        index_elements=[_b.c.device_task_id],
        set_={"served": _b.c.served + ins.excluded.served, "updated_at": ins.excluded.updated_at},
    )


# Prebuilt per dialect: every download's end writes its bytes (see ServedBytes).
_ADD_BYTES: Final = {
    "postgresql": _build_add_bytes(postgresql.insert),
    "sqlite": _build_add_bytes(sqlite.insert),
}
_ADD_BYTES_PREPARED: Final = {name: Prepared(statement) for name, statement in _ADD_BYTES.items()}


def add_bytes(conn: Connection, counts: dict[int, int], now: float) -> None:
    """Add ``counts`` (device task id -> bytes) to ``device_task_bytes`` in one statement."""
    if counts:
        rows = [
            {"device_task_id": dt_id, "served": n, "updated_at": int(now)}
            for dt_id, n in counts.items()
        ]
        name = conn.dialect.name
        if len(rows) == 1:  # a report's own download, the common case
            _ADD_BYTES_PREPARED[name].run(conn, rows[0])
        else:
            conn.execute(_ADD_BYTES[name], rows)


class ServedBytes:
    """Bytes of packages served per device task, summed in memory and written in batches.

    :meth:`add` is a dictionary update (the download paths call it per chunk); :meth:`flush`
    writes what is pending in one transaction (a periodic task and shutdown call it);
    :meth:`take` hands one device task's bytes to a report that ends its download, which
    writes them in its own transaction. All of it runs on the
    worker's event loop thread, so no lock is needed. What is pending is bounded by the device
    tasks this worker served, never by what clients send.
    """

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self._engine = engine
        self._clock = clock
        self._pending: dict[int, int] = {}

    def add(self, device_task_id: int, nbytes: int) -> None:
        """Count ``nbytes`` served for ``device_task_id``."""
        pending = self._pending
        pending[device_task_id] = pending.get(device_task_id, 0) + nbytes

    def take(self, device_task_id: int) -> int:
        r"""The bytes pending for ``device_task_id``, no longer pending: the caller writes them
        in its own transaction (and :meth:`add`\ s them back if that does not commit)."""
        return self._pending.pop(device_task_id, 0)

    @property
    def pending(self) -> int:
        """Device tasks with bytes not yet written."""
        return len(self._pending)

    def flush(self, device_task_ids: Iterable[int] | None = None) -> int:
        """Write what is pending (only for ``device_task_ids`` when given) in one transaction;
        on failure it stays pending (and the error is raised). Returns how many device tasks
        were written."""
        if device_task_ids is None:
            taken, self._pending = self._pending, {}
        else:
            taken = {}
            for dt_id in device_task_ids:
                nbytes = self._pending.pop(dt_id, 0)
                if nbytes:
                    taken[dt_id] = nbytes
        if not taken:
            return 0
        try:
            with self._engine.begin() as conn:
                add_bytes(conn, taken, self._clock())
        except Exception:
            for dt_id, nbytes in taken.items():
                self.add(dt_id, nbytes)
            raise
        return len(taken)


def body_length(response: Response) -> int:
    """The bytes a download response carries (a cached chunk's, or a file segment's)."""
    body = response.body
    if isinstance(body, bytes):
        return len(body)
    if isinstance(body, FileSegment):
        return body.length
    return 0  # a stream is never a download reply


def served_total(conn: Connection, device_task_id: int) -> int:
    """The bytes written for ``device_task_id`` so far."""
    found = conn.execute(
        select(_b.c.served).where(_b.c.device_task_id == device_task_id)
    ).scalar_one_or_none()
    return 0 if found is None else int(found)


# -- reading ------------------------------------------------------------------------------------

_STATE_NAMES: Final = {int(state): state.name.lower() for state in TaskState}
# Reports of a downloaded package (§6.7.1): 101, and 201 (which a device may send without 101);
# and the progress value 100, which stands for 101 on E7 (§5.5).
_SUCCESS_CODES: Final = frozenset({101, 201})


def _history_event(row: Any, short: ShortDownload | None) -> HistoryEvent:
    return HistoryEvent(
        id=row.id,
        at_ms=row.at_ms,
        kind=row.kind,
        task_id=row.task_id,
        device_task_id=row.device_task_id,
        dialect=row.dialect,
        endpoint=row.endpoint,
        code=row.code,
        status_name=code_name(row.code) if row.kind != "progress" else None,
        status_text=code_text(row.code) if row.kind != "progress" else None,
        errno=row.errno,
        from_state=None if row.from_state is None else _STATE_NAMES.get(row.from_state),
        to_state=None if row.to_state is None else _STATE_NAMES.get(row.to_state),
        detail=row.detail,
        short_download=short,
    )


def _is_success_report(row: Any) -> bool:
    if row.kind != "report" or row.errno is not None:
        return False
    return row.code in _SUCCESS_CODES or row.code == 100


def device_history(
    conn: Connection,
    dev_id: int,
    *,
    task_id: int | None,
    after: int | None,
    limit: int,
) -> tuple[list[HistoryEvent], bool]:
    """A page of ``dev_id``'s events in id order (after ``after``), optionally of one task, and
    whether more follow."""
    where = _ev.c.dev_id == dev_id
    if task_id is not None:
        where = and_(where, _ev.c.task_id == task_id)
    if after is not None:
        where = and_(where, _ev.c.id > after)
    rows = conn.execute(select(_ev).where(where).order_by(_ev.c.id).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    sizes = _served_and_sizes(conn, {r.device_task_id for r in rows if _is_success_report(r)})
    events = []
    for row in rows:
        short = None
        found = sizes.get(row.device_task_id) if _is_success_report(row) else None
        if found is not None and found[0] < found[1]:
            short = ShortDownload(served=found[0], size=found[1])
        events.append(_history_event(row, short))
    return events, more


def _served_and_sizes(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Bytes served and package size of each device task of ``ids``."""
    wanted = sorted(ids)
    if not wanted:
        return {}
    rows = conn.execute(
        select(_dt.c.id, packages.c.size, _b.c.served)
        .select_from(
            _dt.join(tasks, tasks.c.id == _dt.c.task_id)
            .join(packages, packages.c.id == tasks.c.package_id)
            .outerjoin(_b, _b.c.device_task_id == _dt.c.id)
        )
        .where(_dt.c.id.in_(wanted))
    ).all()
    return {int(r.id): (int(r.served or 0), int(r.size)) for r in rows}

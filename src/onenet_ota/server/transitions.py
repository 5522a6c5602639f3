"""Device-task state changes in SQL, shared by the device and the management services (spec §5).

Every change of a device task's state is one of the statements here, run inside the caller's
transaction, and each moves rows only along the edges of the state tables in
:mod:`onenet_ota.protocol.states`:

- :func:`set_state`: one device task, from the state it was read in (T6-T16 on device requests,
  and :func:`apply_action`); :func:`set_progress`: T11, progress without a state change;
- :func:`apply_action`: one management action (T2-T5) on one device task, through
  :func:`~onenet_ota.protocol.states.on_action`;
- :func:`apply_bulk`: pause, resume or cancel (T2-T4) on every matching device task in one
  ``UPDATE ... CASE`` read from ``ACTION_TABLE`` and ``RESUME_TABLE``, so every row moves once,
  atomically;
- :func:`expire_deadlines`: T5 on every open device task of a task whose deadline has passed.

Single-row changes are compare-and-set: the UPDATE names the state it read, and a row that
another transaction changed meanwhile matches nothing and raises :class:`ConcurrentChange` (run
the transaction again). Every change also writes its timeline event (:mod:`.timeline`) in the
same transaction: one row per device task moved, so the timeline and the state never disagree.

The change feed row (:func:`.changes.publish`) stays with the caller: a transaction may change
several device tasks and other rows, and it publishes once, at its end, every device it touched
(:class:`.device_service.DeviceService` collects them per request; the management service per
operation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    Connection,
    SmallInteger,
    Update,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    select,
    update,
)

from onenet_ota.protocol.states import (
    ACTION_TABLE,
    OPEN_STATES,
    RESUME_TABLE,
    Action,
    TaskState,
    action_sources,
    on_action,
)
from onenet_ota.server.db import Prepared, chunks
from onenet_ota.server.schema import device_tasks, tasks
from onenet_ota.server.timeline import (
    ADMIN,
    DEADLINE,
    EventKind,
    Source,
    event_params,
    record_bulk,
    record_transition,
    with_event,
)

__all__ = [
    "ConcurrentChange",
    "apply_action",
    "apply_bulk",
    "create_task",
    "expire_deadlines",
    "open_task_devices",
    "set_progress",
    "set_state",
]

_dt, _t = device_tasks, tasks
_TERMINAL_CODES: Final = [int(state) for state in TaskState if state.is_terminal]


class ConcurrentChange(Exception):
    """A compare-and-set UPDATE matched no row: another transaction changed the task first."""


# -- one device task -----------------------------------------------------------------------------

_SELECT_STATE = select(_dt.c.id, _dt.c.state, _dt.c.paused_from, _dt.c.progress).where(
    _dt.c.id == bindparam("b_id")
)


def _set_state() -> Update:
    # Compare-and-set: the UPDATE names the state it read; no match means a concurrent change.
    # Built anew for each statement made from it: a statement memoises its columns when first
    # asked (db.Prepared asks), and a copy of it with RETURNING added would keep that memo.
    return (
        update(_dt)
        .where(_dt.c.id == bindparam("b_id"), _dt.c.state == bindparam("b_state"))
        .values(
            state=bindparam("v_state"),
            paused_from=bindparam("v_paused_from"),
            progress=bindparam("v_progress"),
            result_code=func.coalesce(
                bindparam("v_result_code", type_=_dt.c.result_code.type), _dt.c.result_code
            ),
            updated_at=bindparam("now"),
            finished_at=bindparam("v_finished_at"),
        )
    )


def _set_progress() -> Update:
    return (
        update(_dt)
        .where(_dt.c.id == bindparam("b_id"), _dt.c.state == bindparam("b_state"))
        .values(progress=bindparam("v_progress"), updated_at=bindparam("now"))
    )


# Run on the driver (db.Prepared): every device report and check that moves a task runs one.
# On PostgreSQL each UPDATE carries its timeline event in the same statement (a round trip less
# per change); on SQLite the event is a statement of its own (timeline.with_event).
_SET_STATE_PREPARED: Final = Prepared(_set_state())
_SET_PROGRESS_PREPARED: Final = Prepared(_set_progress())
_SET_STATE_WITH_EVENT: Final = Prepared(with_event(_set_state()))
_SET_PROGRESS_WITH_EVENT: Final = Prepared(with_event(_set_progress()))

_INSERT_BATCH: Final = 500  # device-task rows per executemany
_OPEN_CODES: Final = [int(state) for state in OPEN_STATES]


def open_task_devices(conn: Connection, dev_ids: Sequence[int], module_type: int) -> set[int]:
    """Those of ``dev_ids`` that have an open device task of ``module_type``: D23 allows one
    per module type, so T1 must skip them (an operator's task and a campaign's stage alike)."""
    busy: set[int] = set()
    for chunk in chunks(dev_ids):
        busy.update(
            conn.execute(
                select(_dt.c.dev_id).where(
                    _dt.c.dev_id.in_(chunk),
                    _dt.c.module_type == module_type,
                    _dt.c.state.in_(_OPEN_CODES),
                )
            ).scalars()
        )
    return busy


def create_task(
    conn: Connection,
    *,
    pid: str,
    package_id: int,
    module_type: int,
    signal: int,
    power: int,
    retry: int,
    interval: int,
    start_time: int,
    deadline: int | None,
    dev_ids: Sequence[int],
    now: int,
) -> int:
    """T1: an active task and a to-be-upgraded device task per device of ``dev_ids``; returns
    the task's id. Shared by an operator's task and a campaign's stage activation."""
    task_id: int = conn.execute(
        insert(tasks)
        .values(
            pid=pid,
            package_id=package_id,
            module_type=module_type,
            signal=signal,
            power=power,
            retry=retry,
            interval=interval,
            start_time=start_time,
            deadline=deadline,
            status="active",
            created_at=now,
        )
        .returning(tasks.c.id)
    ).scalar_one()
    rows = [
        {
            "task_id": task_id,
            "dev_id": dev_id,
            "module_type": module_type,
            "state": int(TaskState.TO_BE_UPGRADED),
            "paused_from": None,
            "progress": 0,
            "updated_at": now,
        }
        for dev_id in dev_ids
    ]
    for start in range(0, len(rows), _INSERT_BATCH):
        conn.execute(insert(device_tasks), rows[start : start + _INSERT_BATCH])
    return task_id


def set_state(
    conn: Connection,
    device_task_id: int,
    old: TaskState,
    new: TaskState,
    now: float,
    *,
    progress: int,
    paused_from: TaskState | None = None,
    result_code: int | None = None,
    kind: EventKind = "state",
    code: int | None = None,
    source: Source | None = None,
) -> None:
    """Move a device task from ``old`` (the state it was read in) to ``new``; a terminal state
    records ``finished_at``, a ``result_code`` of None keeps the stored one. Raises
    :class:`ConcurrentChange` when the row is no longer in ``old``.

    The timeline event says ``kind`` (``report`` for a device's report, whose value is
    ``code``; ``state`` otherwise) and ``source`` (None: the device request being answered)."""
    params = {
        "b_id": device_task_id,
        "b_state": int(old),
        "v_state": int(new),
        "v_paused_from": None if paused_from is None else int(paused_from),
        "v_progress": progress,
        "v_result_code": result_code,
        "now": int(now),
        "v_finished_at": int(now) if new.is_terminal else None,
    }
    event_code = result_code if code is None else code
    if conn.dialect.name == "postgresql":
        params.update(event_params(old, new, now, kind=kind, code=event_code, source=source))
        if _SET_STATE_WITH_EVENT.run(conn, params) != 1:
            raise ConcurrentChange
        return
    if _SET_STATE_PREPARED.run(conn, params) != 1:
        raise ConcurrentChange
    record_transition(
        conn, device_task_id, old, new, now, kind=kind, code=event_code, source=source
    )


def set_progress(
    conn: Connection, device_task_id: int, state: TaskState, progress: int, now: float
) -> None:
    """T11: record ``progress`` on a device task still in ``state``; :class:`ConcurrentChange`
    when it no longer is."""
    params: dict[str, Any] = {
        "b_id": device_task_id,
        "b_state": int(state),
        "v_progress": progress,
        "now": int(now),
    }
    if conn.dialect.name == "postgresql":
        params.update(event_params(None, None, now, kind="progress", code=progress))
        if _SET_PROGRESS_WITH_EVENT.run(conn, params) != 1:
            raise ConcurrentChange
        return
    if _SET_PROGRESS_PREPARED.run(conn, params) != 1:
        raise ConcurrentChange
    record_transition(conn, device_task_id, None, None, now, kind="progress", code=progress)


def apply_action(
    conn: Connection, device_task_id: int, action: Action, now: float, *, source: Source = ADMIN
) -> tuple[TaskState, TaskState] | None:
    """Apply a management action (T2 pause, T3 resume, T4 cancel, T5 deadline) to one device
    task inside the caller's transaction, through :func:`protocol.states.on_action`.

    Returns (old state, new state), or None when the device task does not exist. Raises
    :class:`~onenet_ota.protocol.states.IllegalTransition` when the state machine refuses, and
    :class:`ConcurrentChange` when another transaction changed the row between the read and the
    write (run the transaction again).
    """
    row = conn.execute(_SELECT_STATE, {"b_id": device_task_id}).first()
    if row is None:
        return None
    old = TaskState(row.state)
    paused_from = TaskState(row.paused_from) if row.paused_from is not None else None
    new = on_action(old, action, paused_from=paused_from)
    set_state(
        conn,
        row.id,
        old,
        new,
        now,
        progress=row.progress,
        paused_from=old if new is TaskState.PAUSED else None,
        source=source,
    )
    return old, new


# -- many device tasks ---------------------------------------------------------------------------


def _action_case(action: Action) -> tuple[Any, list[int]]:
    """A SQL CASE applying ``action`` (not RESUME) to the state, built from ``ACTION_TABLE``,
    and the states it applies to: rows in other states are left out, untouched."""
    edges = sorted(ACTION_TABLE[action].items())
    whens = [(_dt.c.state == int(state), int(target)) for state, target in edges]
    return case(*whens, else_=_dt.c.state), [int(state) for state, _ in edges]


def _resume_case() -> tuple[Any, list[int]]:
    """RESUME's target depends on ``paused_from`` (T3): a CASE over ``RESUME_TABLE``, and the
    ``paused_from`` values it applies to."""
    edges = sorted(RESUME_TABLE.items())
    whens = [(_dt.c.paused_from == int(before), int(target)) for before, target in edges]
    return case(*whens, else_=_dt.c.state), [int(before) for before, _ in edges]


def _lock(conn: Connection, condition: Any) -> None:
    """PostgreSQL: lock the rows a bulk change will move before its events are written, so that
    a concurrent transaction cannot move one between the events' INSERT and the UPDATE (SQLite
    has one writer at a time)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(_dt.c.id).where(condition).with_for_update())


def apply_bulk(
    conn: Connection, action: Action, where: Any, now: float, *, source: Source = ADMIN
) -> int:
    """One UPDATE moving every device task matching ``where`` along the table's edge for
    ``action`` (T2 pause, T3 resume, T4 cancel); rows where the action is illegal stay as they
    are. Returns how many moved. Each moved row gets its timeline event first, computed from
    the same CASE."""
    state = _dt.c.state
    if action is Action.RESUME:
        new_state, froms = _resume_case()
        condition = and_(where, state == int(TaskState.PAUSED), _dt.c.paused_from.in_(froms))
        new_values: dict[str, Any] = {"state": new_state, "paused_from": None}
    else:
        new_state, sources = _action_case(action)
        condition = and_(where, state.in_(sources))
        new_values = {"state": new_state}
        if action is Action.PAUSE:
            new_values["paused_from"] = state  # T2: remember where to resume
        else:
            new_values["paused_from"] = None
            new_values["finished_at"] = case(
                (new_state.in_(_TERMINAL_CODES), literal(int(now))),
                else_=_dt.c.finished_at,
            )
    new_values["updated_at"] = int(now)
    _lock(conn, condition)
    record_bulk(conn, condition, new_state, now, source)
    result = conn.execute(update(_dt).where(condition).values(**new_values))
    return int(result.rowcount)


# T5 as one statement, read from the action table: every state DEADLINE may leave goes to the one
# state DEADLINE leads to (D23: every open device task of the task fails). The unpacking fails at
# import if the table ever gives DEADLINE two targets.
_DEADLINE_SOURCES: Final = tuple(sorted(int(state) for state in action_sources(Action.DEADLINE)))
(_DEADLINE_TARGET,) = {int(target) for target in ACTION_TABLE[Action.DEADLINE].values()}
_DEADLINE_TASKS = select(_t.c.id).where(
    _t.c.deadline.is_not(None), _t.c.deadline <= bindparam("now")
)
_EXPIRE_ALL = (
    update(_dt)
    .where(_dt.c.state.in_(_DEADLINE_SOURCES), _dt.c.task_id.in_(_DEADLINE_TASKS))
    .values(
        state=_DEADLINE_TARGET,
        paused_from=None,
        updated_at=bindparam("now"),
        finished_at=bindparam("now"),
    )
)
_EXPIRE_DEVICE = _EXPIRE_ALL.where(_dt.c.dev_id == bindparam("b_dev_id"))


def expire_deadlines(conn: Connection, now: float, *, dev_id: int | None = None) -> int:
    """Apply T5 inside the caller's transaction: open device tasks of every task whose deadline
    has passed (``deadline <= now``) become failed (§5.3, D23). Returns how many changed.

    ``dev_id`` limits it to one device's tasks (what the device paths do lazily); without it, it
    sweeps everything (for the management side or a periodic job). Callers in a process that also
    serves the device API should afterwards call :meth:`.DeviceService.invalidate`.
    """
    params: dict[str, Any] = {"now": int(now)}
    condition = and_(
        _dt.c.state.in_(_DEADLINE_SOURCES),
        _dt.c.task_id.in_(
            select(_t.c.id).where(_t.c.deadline.is_not(None), _t.c.deadline <= int(now))
        ),
    )
    if dev_id is not None:
        condition = and_(condition, _dt.c.dev_id == dev_id)
    _lock(conn, condition)
    record_bulk(conn, condition, cast(literal(_DEADLINE_TARGET), SmallInteger()), now, DEADLINE)
    if dev_id is None:
        result = conn.execute(_EXPIRE_ALL, params)
    else:
        params["b_dev_id"] = dev_id
        result = conn.execute(_EXPIRE_DEVICE, params)
    return int(result.rowcount)

"""Helpers for tests that race two transactions: run a call in a thread and learn its outcome,
wait until a PostgreSQL session is blocked on a lock, and make a call a deadlock's victim."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, Executable, event, text


def wait_until_blocked(engine: Engine, worker: threading.Thread, sessions: int = 1) -> None:
    """On PostgreSQL, return once ``sessions`` sessions of this database wait for a lock (held
    by the test or by a paused transaction), or ``worker`` has ended. SQLite's waits
    (busy_timeout) are not observable: return."""
    if engine.dialect.name != "postgresql":
        return
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(6000):  # a bound for a hung test, not a timing expectation
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() >= sessions:
                return
        if not worker.is_alive():
            return
        time.sleep(0.005)
    pytest.fail("the concurrent transaction never waited for the lock")


class Outcome:
    """What a call run in a thread returned or raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.result: object = None
        self.ident: int | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(call,))

    def _run(self, call: Callable[[], object]) -> None:
        self.ident = threading.get_ident()
        self.started.set()
        try:
            self.result = call()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Outcome:
        self.thread.start()
        self.started.wait()
        return self

    def join(self) -> Outcome:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self


def _updates(statement: str, table: str) -> bool:
    """Whether ``statement`` is an UPDATE of ``table``, alone or in a WITH (on PostgreSQL a
    device task's change carries its timeline event: ``WITH changed AS (UPDATE ...) INSERT``,
    whose rowcount is the UPDATE's)."""
    text = statement.lstrip()
    return text.startswith(f"UPDATE {table} ") or (
        text.startswith("WITH ") and f"(UPDATE {table} " in text
    )


def run_as_deadlock_victim(
    engine: Engine, call: Callable[[], object], *, hold: Executable, collide: Executable, table: str
) -> tuple[Outcome, int]:
    """Run ``call`` in a thread as the victim of a real PostgreSQL deadlock, in an order that
    does not depend on how fast the machine is:

    1. another session runs ``hold``, locking a row that ``call`` will want later;
    2. ``call`` runs until its first UPDATE of ``table`` that changed a row, and is held there
       (its transaction now holds that row);
    3. the other session runs ``collide`` and waits for that row;
    4. ``call`` goes on and waits for the row of ``hold``: it closes the cycle.

    PostgreSQL looks for a deadlock once per wait, ``deadlock_timeout`` after the wait began. The
    other session's is 60 s, so the check that finds the cycle is the one of ``call``'s last
    wait, which began after the cycle was complete: ``call``'s transaction is the one aborted.
    Returns the joined outcome of ``call`` and how many such UPDATEs it ran (2: it ran again).
    """
    paused, release = threading.Event(), threading.Event()
    updates = 0
    victim: Outcome | None = None

    def listener(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal updates
        mine = victim is not None and threading.get_ident() == victim.ident
        if mine and _updates(statement, table) and cursor.rowcount > 0:
            updates += 1
            if not paused.is_set():
                paused.set()
                release.wait(60)

    with engine.connect() as other:
        other.execute(text("SET deadlock_timeout = '60s'"))
        other.execute(hold)
        event.listen(engine, "after_cursor_execute", listener)
        try:
            # Assigned before the thread starts: the listener finds the thread through it.
            victim = Outcome(call)
            victim.start()
            assert paused.wait(60), f"the call updated no row of {table}"
            colliding = Outcome(lambda: other.execute(collide)).start()
            wait_until_blocked(engine, colliding.thread)
            release.set()
            colliding.join()
            assert colliding.error is None, colliding.error
            other.commit()
            victim.join()
        finally:
            release.set()
            event.remove(engine, "after_cursor_execute", listener)
    return victim, updates

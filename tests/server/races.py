"""Helpers for tests that race two transactions: run a call in a thread and learn its outcome,
and wait until a PostgreSQL session is blocked on a lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text


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

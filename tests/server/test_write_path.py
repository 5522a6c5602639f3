"""The device API's write transactions: how many statements each sends (each is a round trip on
PostgreSQL), and what happens when a pooled connection was cut while it sat in the pool."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import DBAPIError

from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import ReportKind, TaskType
from onenet_ota.server import device_service, transitions
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine
from onenet_ota.server.device_service import DeviceService, Report
from onenet_ota.server.schema import device_task_events
from tests.server.seed import DB_PARAMS, FakeClock, Seeder, module_database, offer

S = TaskState
FOTA = TaskType.FOTA
POSTGRES = [pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=POSTGRES)
def pg_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as engine:
        yield engine


@pytest.fixture
def pg_seeder(pg_engine: Engine, tmp_path: Path) -> Seeder:
    return Seeder(pg_engine, BlobStore(tmp_path / "blobs"), FakeClock())


@pytest.fixture
def pg_service(pg_engine: Engine, pg_seeder: Seeder) -> Iterator[DeviceService]:
    service = DeviceService(pg_engine, clock=pg_seeder.clock, cache_ttl=0)
    yield service
    service.close()


def _cut_sessions(engine: Engine) -> None:
    """End every session of ``engine``'s database, as a database restart does, while the
    engine's pool still holds their connections (from a connection of another engine)."""
    other = create_engine(engine.url.render_as_string(hide_password=False), pool_size=1)
    try:
        with other.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
    finally:
        other.dispose()


def test_a_write_on_a_connection_cut_in_the_pool_runs_again_on_a_new_one(
    pg_service: DeviceService, pg_seeder: Seeder, pg_engine: Engine
) -> None:
    # The pool tests only connections idle for a second or more (db.create_engine): one cut a
    # moment after its last use fails its first statement, before anything was committed, and
    # the device service runs the transaction again instead of answering errno 7.
    world = pg_seeder.world()
    token = offer(pg_service, world)
    _cut_sessions(pg_engine)
    assert pg_service.check_token(world.dev_id, token) is Errno.SUCC  # T9: a write
    assert world.state() is S.DOWNLOADING
    _cut_sessions(pg_engine)
    report = Report(ReportKind.PROGRESS, 40)
    assert pg_service.report(world.dev_id, token, report) is Errno.SUCC
    assert pg_seeder.device_task(world.task_id).progress == 40


@pytest.mark.parametrize("ping_after", [0.0, 3600.0])
def test_the_pool_tests_a_connection_idle_for_ping_after_seconds(
    pg_engine: Engine, ping_after: float
) -> None:
    engine = create_engine(
        pg_engine.url.render_as_string(hide_password=False), pool_size=1, ping_after=ping_after
    )
    try:
        with engine.begin() as conn:
            conn.execute(select(1)).one()
        _cut_sessions(pg_engine)
        if ping_after == 0:  # idle long enough: tested, replaced, the statement succeeds
            with engine.begin() as conn:
                assert conn.execute(select(1)).scalar_one() == 1
        else:  # used a moment ago: not tested, its first statement finds it lost
            with pytest.raises(DBAPIError) as lost, engine.begin() as conn:
                conn.execute(select(1)).one()
            assert lost.value.connection_invalidated
            with engine.begin() as conn:  # and the next transaction gets a new connection
                assert conn.execute(select(1)).scalar_one() == 1
    finally:
        engine.dispose()


# -- statements per write transaction ---------------------------------------------------------


def _count_statements(engine: Engine, call: Callable[[], Any]) -> int:
    """The statements ``call`` sends inside transactions (BEGIN and COMMIT not counted)."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.startswith("BEGIN"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", before)
    return len(seen)


def _events(engine: Engine, device_task_id: int) -> list[str]:
    ev = device_task_events
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(ev.c.kind).where(ev.c.device_task_id == device_task_id).order_by(ev.c.id)
            ).scalars()
        )


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as engine:
        yield engine


# Statements each write transaction of an upgrade sends, by database. On PostgreSQL every
# statement is a round trip, so a device task's change carries its timeline event
# (timeline.with_event), a token's compare-and-set carries the new token's row, E1 reads the
# versions and the open tasks in one statement, and E3's first offer is one conditional INSERT.
# On SQLite, which cannot put an UPDATE in a WITH, they stay separate statements (no round trip
# there). The feed row (cache_changes) is one statement on both.
UPGRADE_STATEMENTS = {
    "sqlite": {"E1": 4, "E3": 5, "E5": 4, "progress": 3, "101": 4, "201": 5},
    "postgresql": {"E1": 4, "E3": 4, "E5": 3, "progress": 2, "101": 3, "201": 4},
}


def test_an_upgrades_write_transactions_send_few_statements(engine: Engine, tmp_path: Path) -> None:
    seeder = Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())
    service = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    try:
        world = seeder.world()
        counts: dict[str, int] = {}
        counts["E1"] = _count_statements(
            engine, lambda: service.report_version(world.dev_id, "1.0.0", None)
        )
        token = ""

        def check() -> None:
            nonlocal token
            token = offer(service, world)

        counts["E3"] = _count_statements(engine, check)
        counts["E5"] = _count_statements(engine, lambda: service.check_token(world.dev_id, token))
        for kind, value, label in (
            (ReportKind.PROGRESS, 50, "progress"),
            (ReportKind.DOWNLOADED, 101, "101"),
            (ReportKind.UPGRADED, 201, "201"),
        ):
            report = Report(kind, value)
            counts[label] = _count_statements(
                engine, functools.partial(service.report, world.dev_id, token, report)
            )
        assert world.state() is S.SUCCEEDED
        assert seeder.versions(world.dev_id) == ("1.0.1", None)
        # The same timeline on both databases, whichever statements wrote it.
        assert _events(engine, world.task_id) == [
            "offered", "state", "progress", "report", "report",
        ]  # fmt: skip
        assert counts == UPGRADE_STATEMENTS[engine.dialect.name]
    finally:
        service.close()


# -- the kept write connection ------------------------------------------------------------------


def _checkouts(engine: Engine, call: Callable[[], Any]) -> int:
    """How many times ``call`` checks a connection out of ``engine``'s pool."""
    seen: list[object] = []

    def checkout(*_args: Any) -> None:
        seen.append(None)

    event.listen(engine.pool, "checkout", checkout)
    try:
        call()
    finally:
        event.remove(engine.pool, "checkout", checkout)
    return len(seen)


def _upgrade(service: DeviceService, world: Any) -> None:
    token = offer(service, world)
    assert service.check_token(world.dev_id, token) is Errno.SUCC
    for kind, value in ((ReportKind.PROGRESS, 50), (ReportKind.DOWNLOADED, 101)):
        assert service.report(world.dev_id, token, Report(kind, value)) is Errno.SUCC


def test_write_transactions_share_one_kept_connection_until_close(
    engine: Engine, tmp_path: Path
) -> None:
    seeder = Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())
    service = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    try:
        world = seeder.world()
        assert service.report_version(world.dev_id, "1.0.0", None) is Errno.SUCC
        # Four more write transactions (E3's token, T9, a progress report, 101): none checks a
        # connection out of the pool; the first one's is still out, kept.
        assert _checkouts(engine, lambda: _upgrade(service, world)) == 0
        assert engine.pool.checkedout() >= 1  # type: ignore[attr-defined]
        assert world.state() is S.UPGRADING
    finally:
        service.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_connection_kept_idle_too_long_goes_back_to_the_pool(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool tests a connection idle for a while before handing it out (db.create_engine);
    # a kept one idle that long is returned to it rather than used untested.
    monkeypatch.setattr(device_service, "PING_AFTER_S", 0.0)
    seeder = Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())
    service = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    try:
        world = seeder.world()
        assert service.report_version(world.dev_id, "1.0.0", None) is Errno.SUCC
        assert _checkouts(engine, lambda: _upgrade(service, world)) == 4
        assert world.state() is S.UPGRADING
    finally:
        service.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_failed_write_returns_its_connection_and_commits_nothing(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeder = Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())
    service = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    try:
        world = seeder.world()
        token = offer(service, world)
        assert service.check_token(world.dev_id, token) is Errno.SUCC

        def broken(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("the event cannot be written")

        monkeypatch.setattr(transitions, "record_transition", broken)
        monkeypatch.setattr(transitions, "event_params", broken)  # PostgreSQL's path
        report = Report(ReportKind.DOWNLOADED, 101)
        with pytest.raises(RuntimeError):
            service.report(world.dev_id, token, report)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert world.state() is S.DOWNLOADING  # rolled back, event and state alike
        monkeypatch.undo()
        assert service.report(world.dev_id, token, report) is Errno.SUCC
        assert world.state() is S.UPGRADING
        assert _events(engine, world.task_id)[-1] == "report"
    finally:
        service.close()

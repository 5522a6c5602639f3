"""Device timelines over a real database (SQLite file and PostgreSQL): every edge of the state
tables writes exactly one event, refused reports and first offers are kept once, version reports
only when they change something, and tasks whose every device ended show finished."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.exc import StatementError

from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import (
    ACTION_TABLE,
    RESUME_TABLE,
    Action,
    IllegalTransition,
    TaskState,
    on_report,
)
from onenet_ota.protocol.status import ReportKind, TaskType
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_service import DeviceService, Report
from onenet_ota.server.schema import device_task_bytes, device_task_events, device_tasks, tasks
from onenet_ota.server.timeline import set_call
from onenet_ota.server.transitions import apply_bulk, expire_deadlines
from tests.server.seed import (
    DB_PARAMS,
    HOUR,
    T0,
    FakeClock,
    Seeder,
    World,
    issue_token,
    module_database,
    running_api,
)

S = TaskState
_ev = device_task_events
# One value of each report column of §5.5.
VALUES = {
    ReportKind.PROGRESS: 50,
    ReportKind.COMPLETE: 100,
    ReportKind.DOWNLOADED: 101,
    ReportKind.DOWNLOAD_FAILED: 104,
    ReportKind.UPGRADED: 201,
    ReportKind.UPGRADE_FAILED: 205,
}


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@pytest.fixture
def seeder(engine: Engine, tmp_path: Path) -> Seeder:
    return Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())


@pytest.fixture
def service(engine: Engine, seeder: Seeder) -> Iterator[DeviceService]:
    made = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    yield made
    made.close()


def events(engine: Engine, **where: Any) -> list[Any]:
    conditions = [getattr(_ev.c, name) == value for name, value in where.items()]
    with engine.connect() as conn:
        return list(conn.execute(select(_ev).where(*conditions).order_by(_ev.c.id)).all())


def _put(seeder: Seeder, w: World, state: TaskState) -> None:
    """The device task in ``state`` (a paused one paused from downloading)."""
    seeder.set_state(w.task_id, state, S.DOWNLOADING if state is S.PAUSED else None)


@pytest.mark.parametrize("kind", list(ReportKind), ids=lambda k: k.value)
@pytest.mark.parametrize("state", list(TaskState), ids=lambda s: s.name.lower())
def test_every_report_writes_exactly_one_event_as_the_report_table_says(
    seeder: Seeder, service: DeviceService, engine: Engine, state: TaskState, kind: ReportKind
) -> None:
    w = seeder.world()
    _put(seeder, w, state)
    set_call("fuse", "F-R")
    errno = service.report_tid(w.dev_id, w.task_id, Report(kind, VALUES[kind]))
    (event,) = events(engine, device_task_id=w.task_id)
    outcome = on_report(state, kind)
    assert errno is outcome.errno
    assert (event.dialect, event.endpoint, event.code, event.dev_id) == (
        "fuse",
        "F-R",
        VALUES[kind],
        w.dev_id,
    )
    if not outcome.ok:  # refused: the reason is kept
        assert (event.kind, event.from_state, event.to_state) == ("report", int(state), None)
        assert event.errno == int(outcome.errno)
    elif kind is ReportKind.PROGRESS:  # T11: no state change
        assert (event.kind, event.to_state, event.errno) == ("progress", None, None)
    else:
        assert outcome.state is not None
        assert (event.kind, event.from_state, event.to_state) == (
            "report",
            int(state),
            int(outcome.state),
        )
        assert w.state() is outcome.state


@pytest.mark.parametrize("action", [Action.PAUSE, Action.RESUME, Action.CANCEL], ids=str)
@pytest.mark.parametrize("state", list(TaskState), ids=lambda s: s.name.lower())
def test_every_management_action_writes_one_event_or_none_when_illegal(
    seeder: Seeder, service: DeviceService, engine: Engine, state: TaskState, action: Action
) -> None:
    w = seeder.world()
    _put(seeder, w, state)
    try:
        moved = service.apply_action(w.task_id, action)
    except IllegalTransition:
        moved = None
    found = events(engine, device_task_id=w.task_id)
    if moved is None:
        assert found == []
        return
    (event,) = found
    assert (event.kind, event.dialect, event.endpoint) == ("state", None, "admin")
    assert (event.from_state, event.to_state) == (int(moved[0]), int(moved[1]))


@pytest.mark.parametrize("action", [Action.PAUSE, Action.RESUME, Action.CANCEL], ids=str)
def test_a_bulk_action_writes_one_event_per_device_task_it_moves(
    seeder: Seeder, engine: Engine, action: Action
) -> None:
    worlds = [seeder.world() for _ in TaskState]
    for w, state in zip(worlds, TaskState, strict=True):
        _put(seeder, w, state)
    ids = [w.task_id for w in worlds]
    with engine.begin() as conn:
        moved = apply_bulk(conn, action, device_tasks.c.id.in_(ids), T0)
    found = [e for e in events(engine) if e.device_task_id in ids]
    assert len(found) == moved
    expected = {}
    for w, state in zip(worlds, TaskState, strict=True):
        if action is Action.RESUME:
            target = RESUME_TABLE.get(S.DOWNLOADING) if state is S.PAUSED else None
        else:
            target = ACTION_TABLE[action].get(state)
        if target is not None:
            expected[w.task_id] = (int(state), int(target))
            assert w.state() is target
    assert {e.device_task_id: (e.from_state, e.to_state) for e in found} == expected


def test_deadlines_write_one_event_per_failed_device_task(seeder: Seeder, engine: Engine) -> None:
    open_one = seeder.world(deadline=T0 - 1)
    ended = seeder.world(deadline=T0 - 1)
    seeder.set_state(ended.task_id, S.SUCCEEDED)
    with engine.begin() as conn:
        assert expire_deadlines(conn, T0) >= 1
    (event,) = events(engine, device_task_id=open_one.task_id)
    assert (event.endpoint, event.from_state, event.to_state) == ("deadline", 1, int(S.FAILED))
    assert events(engine, device_task_id=ended.task_id) == []


def test_a_task_is_offered_once_however_often_it_is_polled(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    w = seeder.world()
    set_call("classic", "E3")
    for _ in range(5):
        assert service.check_task(w.dev_id, TaskType.FOTA, "1.0.0")[0] is Errno.SUCC
    set_call("studio", "S-C")
    for _ in range(3):
        assert service.check_task_tid(w.dev_id, TaskType.FOTA, "1.0.0")[0] is Errno.SUCC
    # The first E3 wrote (its version), so its offer went with it; the S-C polls wrote nothing:
    # their offer is kept until the next flush.
    assert service.pending_offers == 1
    assert service.flush_offers() == 1
    assert service.pending_offers == 0
    offers = [e for e in events(engine, device_task_id=w.task_id) if e.kind == "offered"]
    assert [(e.dialect, e.endpoint) for e in offers] == [("classic", "E3"), ("studio", "S-C")]
    # A second worker (a fresh service, nothing remembered) keeps an offer, and its flush finds
    # the row and adds none.
    other = DeviceService(engine, clock=seeder.clock, cache_ttl=0)
    try:
        set_call("classic", "E3")
        other.check_task(w.dev_id, TaskType.FOTA, "1.0.0")
        assert other.pending_offers == 1
        other.flush_offers()
    finally:
        other.close()
    assert len([e for e in events(engine, device_task_id=w.task_id) if e.kind == "offered"]) == 2


def test_a_kept_offer_goes_first_with_its_device_tasks_next_event(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    """A poll that writes nothing keeps its first offer; the device task's next event in this
    process (T9 by S-T here, a report) writes it first, in the same transaction."""
    w = seeder.world()
    set_call("classic", "E3")
    service.check_task(w.dev_id, TaskType.FOTA, "1.0.0")  # records the version: writes
    set_call("fuse", "F-C")
    service.check_task_tid(w.dev_id, TaskType.FOTA, "1.0.0")  # a read: the offer is kept
    assert service.pending_offers == 1
    set_call("fuse", "F-T")
    assert service.check_state_tid(w.dev_id, w.task_id, refuses=False) == (Errno.SUCC, 2)  # T9
    assert service.pending_offers == 0
    kinds = [(e.kind, e.dialect, e.endpoint) for e in events(engine, device_task_id=w.task_id)]
    assert kinds == [
        ("offered", "classic", "E3"),
        ("offered", "fuse", "F-C"),
        ("state", "fuse", "F-T"),
    ]
    assert service.flush_offers() == 0  # nothing left to write


def test_a_kept_offer_is_never_lost(
    seeder: Seeder, service: DeviceService, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that fails keeps the offers for the next one; the device API writes what is
    kept when it closes."""
    w = seeder.world()
    set_call("classic", "E3")
    service.check_task(w.dev_id, TaskType.FOTA, "1.0.0")
    set_call("studio", "S-C")
    service.check_task_tid(w.dev_id, TaskType.FOTA, "1.0.0")

    def fail() -> Any:
        raise RuntimeError("database is gone")

    # Every write transaction starts by taking a connection (the kept one, or the pool's).
    monkeypatch.setattr(service, "_writers", type("Gone", (), {"take": staticmethod(fail)})())
    with pytest.raises(RuntimeError):
        service.flush_offers()
    assert service.pending_offers == 1
    monkeypatch.undo()
    assert service.flush_offers() == 1
    assert [e.dialect for e in events(engine, device_task_id=w.task_id) if e.kind == "offered"] == [
        "classic",
        "studio",
    ]
    other = seeder.world()
    with running_api(engine, seeder.blobs, seeder.clock) as (api, server):
        issue_token(server.url, other)  # records the version: written at once
        offered = httpx2.get(
            f"{server.url}/fuse-ota/{other.pid}/{other.name}/check?type=1&version=1.0.0",
            headers={"Authorization": other.auth},
        )
        assert offered.json()["code"] == 0
        assert api.service.pending_offers == 1
    found = [e.dialect for e in events(engine, device_task_id=other.task_id) if e.kind == "offered"]
    assert found == ["classic", "fuse"]  # running_api closed the device API: written


def test_version_reports_are_kept_when_they_change_a_version(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    w = seeder.world(task=False)
    set_call("classic", "E1")
    for _ in range(3):
        service.report_version(w.dev_id, "1.0", "2.0")
    service.report_version(w.dev_id, "1.1", "2.0")
    set_call("classic", "E3")
    service.check_task(w.dev_id, TaskType.SOTA, "2.1")  # E3 records the version too (step 5)
    found = [(e.kind, e.endpoint, e.detail) for e in events(engine, dev_id=w.dev_id)]
    assert found == [
        ("version", "E1", "f_version=1.0 s_version=2.0"),
        ("version", "E1", "f_version=1.1"),
        ("version", "E3", "s_version=2.1"),
    ]


# -- finished tasks ------------------------------------------------------------------------------


def test_a_task_whose_every_device_ended_shows_finished(seeder: Seeder, engine: Engine) -> None:
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)
    w = seeder.world(task=False)
    other = seeder.device(w.dev_id + 2_000_000, w.pid, f"other{w.dev_id}")
    task_id, (a, b) = seeder.task(w.package_id, (w.dev_id, other), pid=w.pid)
    seeder.set_state(a, S.SUCCEEDED)
    assert admin.get_task(task_id).status == "active"  # b is still to be upgraded
    seeder.set_state(b, S.FAILED)
    shown = admin.get_task(task_id)
    assert (shown.status, shown.counts.succeeded, shown.counts.failed) == ("finished", 1, 1)
    finished = {t.id for t in admin.list_tasks(pid=w.pid, status="finished", limit=1000).items}
    active = {t.id for t in admin.list_tasks(pid=w.pid, status="active", limit=1000).items}
    assert task_id in finished
    assert task_id not in active
    listed = {t.id: t.status for t in admin.list_tasks(pid=w.pid, limit=1000).items}
    assert listed[task_id] == "finished"
    # A cancelled task stays cancelled: the operator's word is the more telling.
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(status="cancelled"))
    assert admin.get_task(task_id).status == "cancelled"
    assert task_id not in {t.id for t in admin.list_tasks(status="finished", limit=1000).items}


def test_a_paused_task_whose_devices_all_ended_is_finished_and_one_without_devices_is_not(
    seeder: Seeder, engine: Engine
) -> None:
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)
    w = seeder.world()
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.pid == w.pid).values(status="paused"))
    seeder.set_state(w.task_id, S.CANCELLED)
    (task,) = admin.list_tasks(pid=w.pid).items
    assert task.status == "finished"
    empty_id, _ = seeder.task(w.package_id, (), pid=w.pid, start_time=T0 + HOUR)
    assert admin.get_task(empty_id).status == "active"


def test_deleting_a_device_deletes_its_timeline(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)
    w = seeder.world()
    service.report_version(w.dev_id, "0.9", None)
    service.report_tid(w.dev_id, w.task_id, Report(ReportKind.DOWNLOAD_FAILED, 102))
    assert len(events(engine, dev_id=w.dev_id)) == 2
    admin.delete_device(w.dev_id)
    with engine.connect() as conn:
        left = conn.execute(select(func.count()).where(_ev.c.dev_id == w.dev_id)).scalar_one()
    assert left == 0


def test_bytes_served_still_pending_are_written_when_the_device_api_closes(
    seeder: Seeder, engine: Engine
) -> None:
    w = seeder.world()
    with running_api(engine, seeder.blobs, seeder.clock) as (api, server):
        token = issue_token(server.url, w)
        reply = httpx2.get(f"{server.url}/ota/south/download/{token}", headers={"Range": "0-99"})
        assert len(reply.content) == 100
        assert api.service.served.pending == 1  # counted in memory, not yet written
        with engine.connect() as conn:
            written = conn.execute(select(device_task_bytes.c.device_task_id)).scalars().all()
        assert w.task_id not in written
    with engine.connect() as conn:  # running_api closed the device API: flushed
        served = conn.execute(
            select(device_task_bytes.c.served).where(
                device_task_bytes.c.device_task_id == w.task_id
            )
        ).scalar_one()
    assert served == 100


def _bytes_written(engine: Engine, device_task_id: int) -> int | None:
    with engine.connect() as conn:
        return conn.execute(
            select(device_task_bytes.c.served).where(
                device_task_bytes.c.device_task_id == device_task_id
            )
        ).scalar_one_or_none()


def test_a_report_ending_a_download_writes_its_bytes_served_in_its_own_transaction(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    # One commit for the report and the bytes: never a report on the timeline whose download's
    # bytes a crash lost in between, and one transaction fewer per device.
    w = seeder.world()
    seeder.set_state(w.task_id, S.DOWNLOADING)
    service.served.add(w.task_id, 4096)
    commits: list[object] = []

    def count(conn: object) -> None:
        commits.append(conn)

    event.listen(engine, "commit", count)
    try:
        reported = service.report_tid(w.dev_id, w.task_id, Report(ReportKind.DOWNLOADED, 101))
    finally:
        event.remove(engine, "commit", count)
    assert reported is Errno.SUCC
    assert len(commits) == 1
    assert service.served.pending == 0
    assert _bytes_written(engine, w.task_id) == 4096
    assert w.state() is S.UPGRADING


def test_bytes_served_stay_pending_when_the_reports_transaction_fails(
    seeder: Seeder, service: DeviceService, engine: Engine
) -> None:
    w = seeder.world()
    seeder.set_state(w.task_id, S.DOWNLOADING)
    service.served.add(w.task_id, 4096)

    def fail_the_feed_row(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO cache_changes"):  # the report's last statement
            raise RuntimeError("the database went away")

    event.listen(engine, "before_cursor_execute", fail_the_feed_row)
    try:
        with pytest.raises(StatementError, match="went away"):
            service.report_tid(w.dev_id, w.task_id, Report(ReportKind.DOWNLOADED, 101))
    finally:
        event.remove(engine, "before_cursor_execute", fail_the_feed_row)
    assert w.state() is S.DOWNLOADING  # nothing of the report committed
    assert _bytes_written(engine, w.task_id) is None
    assert service.served.pending == 1  # so the periodic flush or the next report writes them
    assert service.report_tid(w.dev_id, w.task_id, Report(ReportKind.DOWNLOADED, 101)) is Errno.SUCC
    assert _bytes_written(engine, w.task_id) == 4096
    assert service.served.pending == 0

"""server/changes.py: the cache change feed between server processes (SQLite and PostgreSQL).

Each test plays several server processes with several readers and services on one database; the
feed is what makes one see the others' changes.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Select, func, insert, literal_column, select

from onenet_ota import auth
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import Action, TaskState
from onenet_ota.protocol.status import TaskType
from onenet_ota.server import changes
from onenet_ota.server.admin_service import (
    AdminService,
    DeviceCreate,
    DeviceKeyRotate,
    KeyRotate,
    TaskCreate,
)
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.changes import EVERYTHING, NOTHING, ChangeFeed, Changes, Scope, publish
from onenet_ota.server.device_service import DeviceService
from onenet_ota.server.schema import cache_changes
from tests.server.seed import K2, T0, FakeClock, Seeder, core_reader, offer, running_api

FOTA = TaskType.FOTA
# Transactions that commit out of order exist only there: SQLite serialises its writers.
POSTGRES_ONLY = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


class Ticks:
    """A settable monotonic clock for the feed's intervals."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def make_feed(engine: Engine, ticks: Ticks) -> Callable[..., ChangeFeed]:
    def make(origin: int = 1, **options: Any) -> ChangeFeed:
        options.setdefault("interval", 0.0)
        return ChangeFeed(engine, core_reader(engine), origin=origin, monotonic=ticks, **options)

    return make


def emit(engine: Engine, dev_ids: list[int] | None, *, origin: int = 2, now: float = T0) -> None:
    with engine.begin() as conn:
        publish(conn, dev_ids, now, origin=origin)


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(cache_changes)).scalar_one())


# -- the feed ------------------------------------------------------------------------------------


def test_reads_what_other_processes_published(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    emit(engine, [1])  # before the reader started: not its business
    feed = make_feed(origin=7)
    assert feed.read() is EVERYTHING  # the first read only finds its place
    assert feed.read() is NOTHING
    emit(engine, [5, 6, 5])
    emit(engine, [9])
    assert feed.read() == Changes(dev_ids=frozenset({5, 6, 9}))
    assert feed.read() is NOTHING
    emit(engine, [11], origin=7)  # its own change: dropped already, at once
    assert feed.read() is NOTHING
    emit(engine, [12])
    emit(engine, None)  # a management change: anything
    assert feed.read() is EVERYTHING
    assert feed.read() is NOTHING


def test_due_follows_the_interval(make_feed: Callable[..., ChangeFeed], ticks: Ticks) -> None:
    feed = make_feed(interval=0.1)
    assert feed.due()
    feed.read()
    assert not feed.due()
    ticks.now += 0.1
    assert feed.due()


def test_more_rows_than_a_batch_drop_everything(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    feed = make_feed()
    feed.read()
    emit(engine, list(range(1, 5002)))
    assert feed.read() is EVERYTHING
    assert feed.read() is NOTHING  # and it continues after them
    emit(engine, [3])
    assert feed.read() == Changes(dev_ids=frozenset({3}))


def test_a_reader_idle_too_long_drops_everything(
    engine: Engine, make_feed: Callable[..., ChangeFeed], ticks: Ticks
) -> None:
    feed = make_feed(retention=600)
    feed.read()
    ticks.now += 301  # more than half the retention: rows may have been pruned unread
    assert feed.read() is EVERYTHING
    emit(engine, [4])
    assert feed.read() == Changes(dev_ids=frozenset({4}))


def test_old_rows_are_pruned(
    engine: Engine, make_feed: Callable[..., ChangeFeed], ticks: Ticks
) -> None:
    clock = FakeClock(T0)
    feed = make_feed(retention=600, clock=clock)
    feed.read()
    emit(engine, [1], now=T0 - 700)
    emit(engine, [2], now=T0 - 10)
    assert feed.read() == Changes(dev_ids=frozenset({1, 2}))
    assert rows(engine) == 2
    ticks.now += 61  # a tenth of the retention: time to prune (in a thread of its own)
    assert feed.read() is NOTHING
    deadline = time.monotonic() + 10
    while rows(engine) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rows(engine) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # ids are gap-free only here
def test_sqlite_rows_pruned_unread_drop_everything(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    feed = make_feed()
    feed.read()
    emit(engine, [1])
    emit(engine, [2])
    with engine.begin() as conn:
        first = conn.execute(select(func.min(cache_changes.c.id))).scalar_one()
        conn.execute(cache_changes.delete().where(cache_changes.c.id == first))
    assert feed.read() is EVERYTHING
    # Starting again on an emptied table continues from the AUTOINCREMENT counter, not id 0.
    with engine.begin() as conn:
        conn.execute(cache_changes.delete())
    feed.start()
    emit(engine, [3])
    assert feed.read() == Changes(dev_ids=frozenset({3}))


@POSTGRES_ONLY  # SQLite serialises writers: there, ids become visible in order
def test_postgres_late_commit_is_not_missed(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    """A transaction that took its id earlier but commits later is still read, once."""
    assert engine.dialect.name == "postgresql"
    feed = make_feed()
    feed.read()
    with engine.connect() as slow:
        transaction = slow.begin()
        publish(slow, [1], T0, origin=2)  # sequence value and xid taken now, committed below
        emit(engine, [2])  # a later id, committed first
        assert feed.read() == Changes(dev_ids=frozenset({2}))
        transaction.commit()
    assert feed.read() == Changes(dev_ids=frozenset({1}))
    assert feed.read() is NOTHING


@POSTGRES_ONLY
def test_postgres_a_long_open_transaction_does_not_widen_the_reads(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    """Each read costs what changed since the last one, even while a transaction that started
    long ago (an operator's idle psql session, a bulk import) holds the cluster's xmin back."""
    feed = make_feed(batch=10)
    feed.read()
    with engine.connect() as idle:
        idle.begin()
        idle.execute(select(literal_column("pg_current_xact_id()")))  # it now holds an xid
        for round_no in range(4):  # 32 rows in all, more than a batch, at most 8 per read
            first = 100 * round_no
            emit(engine, list(range(first, first + 8)))
            assert feed.read() == Changes(dev_ids=frozenset(range(first, first + 8)))
        publish(idle, [7], T0, origin=2)
        assert feed.read() is NOTHING  # not committed yet
        idle.commit()
    assert feed.read() == Changes(dev_ids=frozenset({7}))
    assert feed.read() is NOTHING


@POSTGRES_ONLY
def test_postgres_a_commit_between_the_snapshot_and_the_rows_is_reported_once(
    engine: Engine, ticks: Ticks
) -> None:
    commit_now: list[Callable[[], None]] = []
    plain = core_reader(engine)

    def reader(statement: Select[Any]) -> Callable[..., list[Any]]:
        run = plain(statement)
        if "pg_current_snapshot" not in str(statement):
            return run

        def snapshot_then_commit(**params: Any) -> list[Any]:
            found = run(**params)
            while commit_now:
                commit_now.pop()()
            return found

        return snapshot_then_commit

    feed = ChangeFeed(engine, reader, origin=1, interval=0, monotonic=ticks)
    feed.read()
    with engine.connect() as slow:
        transaction = slow.begin()
        publish(slow, [3], T0, origin=2)
        commit_now.append(transaction.commit)  # after this read's snapshot, before its rows
        assert feed.read() == Changes(dev_ids=frozenset({3}))
    # The next read asks again for the transactions that snapshot showed running: found again,
    # and skipped, since the previous read reported it.
    assert feed.read() is NOTHING
    emit(engine, [4])
    assert feed.read() == Changes(dev_ids=frozenset({4}))


class _Writer:
    """One session of the interleaving test: at most one open transaction."""

    def __init__(self, engine: Engine) -> None:
        self.conn = engine.connect()
        self.pending: list[int] = []

    def publish(self, dev_id: int) -> None:
        if not self.conn.in_transaction():
            self.conn.begin()
        publish(self.conn, [dev_id], T0, origin=2)
        self.pending.append(dev_id)

    def end(self, commit: bool) -> list[int]:
        done, self.pending = self.pending, []
        if self.conn.in_transaction():
            if commit:
                self.conn.commit()
            else:
                self.conn.rollback()
        return done if commit else []


@POSTGRES_ONLY
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(0, 2)),
            st.tuples(st.just("commit"), st.integers(0, 2)),
            st.tuples(st.just("rollback"), st.integers(0, 2)),
            st.tuples(st.just("read"), st.just(0)),
        ),
        max_size=30,
    )
)
def test_postgres_every_committed_change_is_read_exactly_once(
    engine: Engine, ticks: Ticks, steps: list[tuple[str, int]]
) -> None:
    """Any interleaving of three sessions' transactions and the reads: each committed row is
    reported by exactly one read, no later than the first read after its commit; rolled-back
    rows never are."""
    feed = ChangeFeed(engine, core_reader(engine), origin=1, interval=0, monotonic=ticks)
    feed.read()
    writers = [_Writer(engine) for _ in range(3)]
    committed: set[int] = set()
    reported: list[int] = []
    next_id = itertools.count(1)
    try:
        for action, who in [*steps, ("commit", 0), ("commit", 1), ("commit", 2), ("read", 0)]:
            writer = writers[who]
            if action == "publish":
                writer.publish(next(next_id))
            elif action in ("commit", "rollback"):
                committed.update(writer.end(action == "commit"))
            else:
                found = feed.read()
                assert not found.everything
                reported.extend(found.dev_ids)
                assert set(reported) == committed  # nothing committed is still unreported
    finally:
        for writer in writers:
            writer.conn.close()
    assert sorted(reported) == sorted(committed)  # and nothing twice


def test_a_task_change_is_read_as_one_and_a_device_change_wins(
    engine: Engine, make_feed: Callable[..., ChangeFeed]
) -> None:
    feed = make_feed()
    feed.start()
    with engine.begin() as conn:
        publish(conn, [1, 2], T0, origin=2, scope=Scope.TASKS)
    assert feed.read() == Changes(dev_ids=frozenset({1, 2}), tasks_only=frozenset({1, 2}))
    emit(engine, [3])
    with engine.begin() as conn:
        publish(conn, [2, 3], T0, origin=2, scope=Scope.TASKS)
    emit(engine, [2])
    assert feed.read() == Changes(dev_ids=frozenset({2, 3}))  # each said more by another row
    with engine.begin() as conn:
        publish(conn, [4], T0, origin=2, scope=Scope.TASKS)
    emit(engine, None)
    assert feed.read() is EVERYTHING


def test_a_change_of_many_devices_is_published_as_anything(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changes, "MAX_DEVICES_PER_CHANGE", 2)
    emit(engine, [1, 2])
    emit(engine, [3, 4, 5])
    with engine.connect() as conn:
        found = conn.execute(select(cache_changes.c.dev_id).order_by(cache_changes.c.id))
        assert list(found.scalars()) == [1, 2, None]


def test_publish_writes_nothing_for_no_devices(engine: Engine) -> None:
    emit(engine, [])
    assert rows(engine) == 0
    with engine.begin() as conn:
        conn.execute(insert(cache_changes).values(dev_id=1, created_at=T0))
    assert rows(engine) == 1


# -- the device service: caches follow the feed ----------------------------------------------------


@pytest.fixture
def seeder(engine: Engine, tmp_path: Path) -> Seeder:
    return Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())


@pytest.fixture
def services(engine: Engine, seeder: Seeder) -> Iterator[Callable[[], DeviceService]]:
    made: list[DeviceService] = []

    def make() -> DeviceService:
        made.append(DeviceService(engine, clock=seeder.clock, cache_ttl=3600, feed_interval=0))
        return made[-1]

    yield make
    for service in made:
        service.close()


def test_another_process_transition_drops_that_devices_answers_only(
    services: Callable[[], DeviceService], seeder: Seeder
) -> None:
    """A task transition elsewhere drops the device's answers; its row (pid, name) and the
    tokens verified with its key stay cached: a transition changes neither."""
    here, there = services(), services()
    w, other = seeder.world(device_key=K2), seeder.world()
    device_level = auth.build_token(w.pid, K2, device_name=w.name)
    here.sync()
    token = offer(here, w)
    offer(here, w)  # cached now
    offer(here, other)
    offer(here, other)
    here.device(w.dev_id)  # P3's rows, cached
    here.device(other.dev_id)
    assert here.authenticate(device_level) is not None
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is not None
    assert there.check_token(w.dev_id, token) is Errno.SUCC  # T9, in the other process
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is not None  # not read yet
    here.sync()
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert here.caches.device(w.dev_id) is not None  # the row: a transition never changes it
    assert here.caches.principal(device_level) is not None  # nor the key
    assert here.caches.check_task(other.dev_id, FOTA, "1.0.0") is not None
    assert here.caches.device(other.dev_id) is not None


def test_an_own_transition_keeps_the_devices_row_and_tokens(
    services: Callable[[], DeviceService], seeder: Seeder
) -> None:
    here = services()
    w = seeder.world(device_key=K2)
    device_level = auth.build_token(w.pid, K2, device_name=w.name)
    here.sync()
    token = offer(here, w)
    here.device(w.dev_id)
    assert here.authenticate(device_level) is not None
    assert here.check_token(w.dev_id, token) is Errno.SUCC  # T9, here
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert here.caches.device(w.dev_id) is not None
    assert here.caches.principal(device_level) is not None


@pytest.mark.parametrize("change", ["delete", "rotate device key", "revoke product key"])
def test_a_device_change_elsewhere_drops_its_row_and_tokens_at_once(
    services: Callable[[], DeviceService], seeder: Seeder, engine: Engine, change: str
) -> None:
    """Whatever task transitions came before, a deletion or a key change made in another
    process drops the device's row and the tokens verified with its keys on the next feed
    read, and the old token is refused from then on."""
    here, there = services(), services()
    w = seeder.world(device_key=K2)
    device_level = auth.build_token(w.pid, K2, device_name=w.name)
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)  # no on_change: elsewhere
    here.sync()
    token = offer(here, w)
    assert there.check_token(w.dev_id, token) is Errno.SUCC  # a transition elsewhere first
    here.sync()
    assert here.device(w.dev_id) is not None
    for value in (device_level, w.auth):
        assert here.authenticate(value) is not None
    if change == "delete":
        seeder.set_state(w.task_id, TaskState.SUCCEEDED)  # ended (no feed row): deletable
        admin.delete_device(w.dev_id)
        dropped = [device_level]  # a product-level token still passes P1 (P3 then refuses)
    elif change == "rotate device key":
        admin.rotate_device_key(w.dev_id, DeviceKeyRotate())
        dropped = [device_level]
    else:
        admin.rotate_product_key(w.pid, KeyRotate())
        dropped = [w.auth]
    here.sync()
    for value in dropped:
        assert here.caches.principal(value) is None
        assert here.authenticate(value) is None
    if change == "delete":
        assert here.caches.device(w.dev_id) is None
        assert here.device(w.dev_id) is None


def test_management_changes_elsewhere_drop_everything(
    services: Callable[[], DeviceService], seeder: Seeder, engine: Engine
) -> None:
    here = services()
    w, other = seeder.world(), seeder.world()
    here.sync()
    for world in (w, other):
        offer(here, world)
        offer(here, world)
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)  # no on_change: elsewhere
    task_id = seeder.device_task(w.task_id).task_id
    admin.act_on_device_task(task_id, w.dev_id, Action.PAUSE)
    here.sync()
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert here.caches.check_task(other.dev_id, FOTA, "1.0.0") is not None
    assert here.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.NO_TASK, None)
    admin.rotate_product_key(other.pid, KeyRotate())
    here.sync()
    assert here.caches.check_task(other.dev_id, FOTA, "1.0.0") is None
    assert here.caches.principal(other.auth) is None


def test_unreadable_feed_caches_nothing_and_warns_once(
    services: Callable[[], DeviceService],
    seeder: Seeder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    here = services()
    w = seeder.world()
    here.sync()
    offer(here, w)
    offer(here, w)
    feed = here._feed
    assert feed is not None

    def broken() -> Changes:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(feed, "read", broken)
    with caplog.at_level(logging.WARNING, logger="onenet_ota.server.device_service"):
        here.sync()
        offer(here, w)
        here.sync()
    assert here.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert [r.message for r in caplog.records].count(
        "cannot read the cache change feed; caching nothing until it works"
    ) == 1


def test_two_servers_over_http_see_each_other(engine: Engine, seeder: Seeder) -> None:
    """Two device APIs on one database, as two workers: a pause made through one is answered
    by the other's cached E3 within its feed interval, not its cache's maximum age."""
    w = seeder.world()
    query: dict[str, str | int] = {"dev_id": w.dev_id, "type": 1, "version": "1.0.0"}
    with (
        running_api(engine, seeder.blobs, seeder.clock, cache_ttl=3600) as (_, first),
        running_api(engine, seeder.blobs, seeder.clock, cache_ttl=3600) as (second_api, _),
        httpx2.Client(base_url=first.url) as client,
    ):

        def errno() -> int:
            reply = client.get(
                "/ota/south/check", params=query, headers={"Authorization": w.auth}
            ).json()
            return int(reply["errno"])

        assert errno() == 0
        assert errno() == 0  # cached (and memoised) in the first server
        second_api.service.apply_action(w.task_id, Action.PAUSE)  # through the second one
        assert w.state() is TaskState.PAUSED
        deadline = time.monotonic() + 10
        while errno() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert errno() == 11


# -- revocation: a device's key stops working at once in every process ---------------------------


@contextmanager
def two_servers(engine: Engine, seeder: Seeder) -> Iterator[tuple[httpx2.Client, httpx2.Client]]:
    """Two device APIs on one database, as two workers, with caches and a feed read before
    every request (so "the next request" is "after one more feed read")."""
    options: dict[str, Any] = {"cache_ttl": 3600, "feed_interval": 0}
    with (
        running_api(engine, seeder.blobs, seeder.clock, **options) as (_, first),
        running_api(engine, seeder.blobs, seeder.clock, **options) as (_, second),
        httpx2.Client(base_url=first.url) as here,
        httpx2.Client(base_url=second.url) as there,
    ):
        yield here, there


def query_version(client: httpx2.Client, dev_id: int, authorization: str) -> int:
    """E2's errno: 0 when the token is accepted for ``dev_id``, 1 when refused (P1/P3)."""
    reply = client.get(
        "/ota/device/version", params={"dev_id": dev_id}, headers={"Authorization": authorization}
    )
    return int(reply.json()["errno"])


def test_a_deleted_and_recreated_device_refuses_its_old_key_elsewhere_at_once(
    engine: Engine, seeder: Seeder
) -> None:
    """Deleting a device and creating it again with a new key, through one process's management
    side, makes another process refuse tokens signed with the old key on its next request."""
    w = seeder.world(task=False, device_key=K2)
    old = auth.build_token(w.pid, K2, device_name=w.name)
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)  # no on_change: elsewhere
    with two_servers(engine, seeder) as (here, there):
        assert query_version(there, w.dev_id, old) == 0
        assert query_version(there, w.dev_id, old) == 0  # its principal is cached there now
        admin.delete_device(w.dev_id)
        assert query_version(here, w.dev_id, old) == 1  # gone
        again = admin.create_device(DeviceCreate(pid=w.pid, name=w.name, generate_device_key=True))
        assert again.device_key is not None
        assert query_version(there, again.dev_id, old) == 1
        new = auth.build_token(w.pid, again.device_key, device_name=w.name)
        assert query_version(there, again.dev_id, new) == 0
        assert query_version(here, again.dev_id, old) == 1


def test_a_rotated_device_key_is_refused_elsewhere_at_once(engine: Engine, seeder: Seeder) -> None:
    w = seeder.world(device_key=K2)
    old = auth.build_token(w.pid, K2, device_name=w.name)
    other = seeder.world(device_key=K2)
    others = auth.build_token(other.pid, K2, device_name=other.name)
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)
    with two_servers(engine, seeder) as (here, there):
        for client in (here, there):
            for _ in range(2):  # cached in both processes
                assert query_version(client, w.dev_id, old) == 0
                assert query_version(client, other.dev_id, others) == 0
        rotated = admin.rotate_device_key(w.dev_id, DeviceKeyRotate())
        assert rotated.device_key not in (None, K2)
        assert query_version(there, w.dev_id, old) == 1
        assert query_version(here, w.dev_id, old) == 1
        assert rotated.device_key is not None
        new = auth.build_token(w.pid, rotated.device_key, device_name=w.name)
        assert query_version(there, w.dev_id, new) == 0
        assert query_version(there, other.dev_id, others) == 0  # another device: untouched


def test_a_feed_row_for_a_device_drops_the_tokens_verified_with_its_key(
    services: Callable[[], DeviceService], seeder: Seeder, engine: Engine
) -> None:
    """The service level: one feed read after a device's row names it, the principals verified
    with that device's key are gone; product-level ones and other devices' stay."""
    there = services()
    w, other = seeder.world(device_key=K2), seeder.world(device_key=K2)
    device_level = auth.build_token(w.pid, K2, device_name=w.name)
    there.sync()  # the first read only finds its place (and drops everything)
    for value in (device_level, w.auth, auth.build_token(other.pid, K2, device_name=other.name)):
        assert there.authenticate(value) is not None
    emit(engine, [w.dev_id])
    assert there.caches.principal(device_level) is not None  # not read yet
    there.sync()
    assert there.caches.principal(device_level) is None
    assert there.caches.principal(w.auth) is not None  # product key: not the device's
    assert (
        there.caches.principal(auth.build_token(other.pid, K2, device_name=other.name)) is not None
    )


def test_memoised_replies_end_elsewhere_at_once(engine: Engine, seeder: Seeder) -> None:
    """Memoised replies (E3, E5, F-C, F-D) in one process end with a change made elsewhere on
    that process's next request (one feed read): a pause, a resume, a cancel, a rotated device
    or product key, a new task for the device; and with the Authorization value's ``et``.
    Each memo is re-checked on every use, so none outlives what it rests on."""
    w = seeder.world(device_key=K2)
    admin = AdminService(engine, seeder.blobs, clock=seeder.clock)  # no on_change: elsewhere
    task_id = seeder.device_task(w.task_id).task_id
    fuse_auth = auth.build_token(w.pid, K2, device_name=w.name, version=auth.VERSION_2022)
    base = f"/fuse-ota/{w.pid}/{w.name}"
    e3_query: dict[str, str | int] = {"dev_id": w.dev_id, "type": 1, "version": "1.0.0"}
    with two_servers(engine, seeder) as (_, there):

        def e3(authorization: str = w.auth) -> dict[str, Any]:
            headers = {"Authorization": authorization}
            reply = there.get("/ota/south/check", params=e3_query, headers=headers).json()
            assert isinstance(reply, dict)
            return reply

        def e5(token: str) -> int:
            path = f"/ota/south/download/{token}/check"
            reply = there.get(path, params={"dev_id": w.dev_id}, headers={"Authorization": w.auth})
            return int(reply.json()["errno"])

        def fc(authorization: str = fuse_auth) -> int:
            path = f"{base}/check?type=1&version=1.0.0"
            return int(there.get(path, headers={"Authorization": authorization}).json()["code"])

        def fd(authorization: str = fuse_auth) -> str | None:
            headers = {"Authorization": authorization, "Range": "bytes=0-9"}
            reply = there.get(f"{base}/{w.task_id}/download", headers=headers)
            return reply.headers.get("Ota-Errno") if reply.status_code != 206 else None

        def memoised(call: Callable[[], Any], expected: Any) -> None:
            for _ in range(3):  # computed, then answered from the memo
                assert call() == expected

        token = e3()["data"]["token"]
        assert e5(token) == 0  # T9
        memoised(lambda: e3()["errno"], 0)
        memoised(lambda: e5(token), 0)
        memoised(fc, 0)
        memoised(fd, None)
        admin.act_on_task(task_id, Action.PAUSE)
        assert e3()["errno"] == 11
        assert e5(token) == 17
        assert fc() == 12012
        assert fd() == "5"
        admin.act_on_task(task_id, Action.RESUME)
        memoised(lambda: e3()["errno"], 0)
        memoised(lambda: e5(token), 0)
        memoised(fc, 0)
        memoised(fd, None)
        rotated = admin.rotate_device_key(w.dev_id, DeviceKeyRotate())
        assert rotated.device_key is not None
        assert fc() == 10403
        assert fd() == "6"
        new_fuse_auth = auth.build_token(
            w.pid, rotated.device_key, device_name=w.name, version=auth.VERSION_2022
        )
        memoised(lambda: fc(new_fuse_auth), 0)
        admin.rotate_product_key(w.pid, KeyRotate(access_key=K2))
        assert e3()["errno"] == 1
        assert e5(token) == 1
        new_auth = auth.build_token(w.pid, K2)
        short = auth.build_token(w.pid, K2, et=int(seeder.clock()) + 30)
        memoised(lambda: e3(short)["errno"], 0)
        seeder.clock.advance(31)
        assert e3(short)["errno"] == 1  # its et passed
        assert e3(new_auth)["errno"] == 0
        admin.act_on_task(task_id, Action.CANCEL)
        memoised(lambda: e3(new_auth)["errno"], 11)
        assert fd(new_fuse_auth) == "5"
        package = seeder.package(w.pid, target="1.0.2", data=b"another package")
        admin.create_task(TaskCreate(package_id=package, dev_ids=[w.dev_id], retry=3, interval=1))
        reply = e3(new_auth)
        assert (reply["errno"], reply["data"]["target"]) == (0, "1.0.2")  # the new package

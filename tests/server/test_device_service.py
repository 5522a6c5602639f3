"""The device service over a real database (SQLite file and PostgreSQL): tokens (D13), version
recording, deadlines (T5), management actions, caching and concurrent requests."""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, event, func, select, update

from onenet_ota import auth
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import Action, IllegalTransition, TaskState
from onenet_ota.protocol.status import ReportKind, TaskType
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_service import (
    DeviceService,
    Report,
    new_token,
    token_expired,
)
from onenet_ota.server.schema import device_tasks, devices
from onenet_ota.server.transitions import ConcurrentChange, expire_deadlines
from tests.server.races import run_as_deadlock_victim
from tests.server.seed import (
    DB_PARAMS,
    HOUR,
    K1,
    T0,
    TOKEN_LIFE,
    FakeClock,
    Seeder,
    World,
    module_database,
)

S = TaskState
T = TypeVar("T")
FOTA = TaskType.FOTA


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """One database per module and flavour; every test seeds its own rows (Seeder.world)."""
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@pytest.fixture
def seeder(engine: Engine, tmp_path: Path) -> Seeder:
    return Seeder(engine, BlobStore(tmp_path / "blobs"), FakeClock())


@pytest.fixture
def make_service(engine: Engine, seeder: Seeder) -> Iterator[Callable[[float], DeviceService]]:
    """DeviceService(cache_ttl) on the test's clock; closed at the end of the test."""
    made: list[DeviceService] = []

    def make(cache_ttl: float) -> DeviceService:
        made.append(DeviceService(engine, clock=seeder.clock, cache_ttl=cache_ttl))
        return made[-1]

    yield make
    for service in made:
        service.close()


@pytest.fixture
def service(make_service: Callable[[float], DeviceService]) -> DeviceService:
    return make_service(0)


def offer(service: DeviceService, w: World, version: str = "1.0.0", **kw: Any) -> Any:
    errno, info = service.check_task(w.dev_id, FOTA, version, **kw)
    assert errno is Errno.SUCC, errno
    assert info is not None
    return info


# -- tokens (§5.6, D13) --------------------------------------------------------------------------


def test_new_token_format_and_randomness() -> None:
    minted = {new_token() for _ in range(2000)}
    assert len(minted) == 2000
    assert all(re.fullmatch(r"ota_[A-Za-z0-9]{20}", token) for token in minted)
    # Every alphanumeric shows up: drawn from the whole alphabet, not hex or lower case only.
    assert len(set("".join(token[4:] for token in minted))) == 62


def test_new_token_draws_every_character_equally_often() -> None:
    # 400,000 characters: about 6,452 of each, with a standard deviation of about 80. A draw
    # favouring some characters (bytes taken modulo 62 without dropping 248-255 gives eight of
    # them a quarter more) lands far outside 10 %.
    counts = collections.Counter("".join(new_token()[4:] for _ in range(20_000)))
    expected = 20_000 * 20 / 62
    assert len(counts) == 62
    assert all(abs(n - expected) < expected / 10 for n in counts.values()), counts


def test_token_lifetime_is_48_hours_fixed() -> None:
    assert not token_expired(T0, T0 + TOKEN_LIFE - 0.001)
    assert token_expired(T0, T0 + TOKEN_LIFE)
    assert token_expired(None, T0)


def test_token_issue_reuse_and_reissue(service: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    first = offer(service, w).token
    seeder.clock.advance(HOUR)
    assert offer(service, w).token == first  # same while valid, no sliding life
    seeder.clock.now = T0 + TOKEN_LIFE
    second = offer(service, w).token
    assert second != first
    assert seeder.tokens(w.task_id) == [first, second]
    row = seeder.device_task(w.task_id)
    assert (row.current_token, row.token_issued_at) == (second, T0 + TOKEN_LIFE)
    # Old tokens still resolve for reports (E7/E8), and E5 calls them expired.
    assert service.check_token(w.dev_id, first) is Errno.TOKEN_EXPIRED
    assert service.report(w.dev_id, first, Report(ReportKind.DOWNLOADED, 101)) is Errno.SUCC


def test_tokens_are_unique_across_tasks(service: DeviceService, seeder: Seeder) -> None:
    issued = [offer(service, seeder.world()).token for _ in range(20)]
    assert len(set(issued)) == 20


# -- versions ------------------------------------------------------------------------------------


def test_e3_records_version_without_completing(service: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    offer(service, w, "1.0.1")  # the target itself: T6 is E1's alone (§6.3 step 5)
    assert w.state() is S.TO_BE_UPGRADED
    assert seeder.versions(w.dev_id) == ("1.0.1", None)
    assert service.report_version(w.dev_id, "1.0.1", None) is Errno.SUCC
    assert w.state() is S.SUCCEEDED


def test_e3_polling_refreshes_last_seen_once_a_minute(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    w = seeder.world()

    def last_seen() -> int:
        with engine.begin() as conn:
            query = select(devices.c.last_seen_at).where(devices.c.dev_id == w.dev_id)
            return int(conn.execute(query).scalar_one())

    offer(service, w)
    assert last_seen() == T0
    seeder.clock.advance(59)
    offer(service, w)
    assert last_seen() == T0  # same version, recent: a read-only poll
    seeder.clock.advance(1)
    offer(service, w)
    assert last_seen() == T0 + 60
    seeder.clock.advance(1)
    offer(service, w, "1.0.0-b")
    assert last_seen() == T0 + 61  # a changed version is always written


def _commits_of(engine: Engine, call: Callable[[], T]) -> tuple[T, int]:
    """``call``'s result and how many transactions it committed."""
    commits: list[object] = []

    def count(conn: object) -> None:
        commits.append(conn)

    event.listen(engine, "commit", count)
    try:
        return call(), len(commits)
    finally:
        event.remove(engine, "commit", count)


def test_e1_repeating_the_stored_versions_writes_nothing_for_a_minute(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    # Devices may post their version before every poll: like E3, a report that changes nothing
    # stays a read, and last_seen_at is refreshed at most once a minute.
    w = seeder.world()

    def last_seen() -> int:
        with engine.begin() as conn:
            query = select(devices.c.last_seen_at).where(devices.c.dev_id == w.dev_id)
            return int(conn.execute(query).scalar_one())

    def post(f: str | None, s: str | None = None) -> tuple[Errno, int]:
        return _commits_of(engine, lambda: service.report_version(w.dev_id, f, s))

    assert post("1.0.0") == (Errno.SUCC, 1)
    assert last_seen() == T0
    seeder.clock.advance(59)
    assert post("1.0.0") == (Errno.SUCC, 0)
    assert post(None) == (Errno.SUCC, 0)  # nothing reported: nothing to store either
    assert last_seen() == T0
    assert post("1.0.0", "2.0") == (Errno.SUCC, 1)  # a changed version is always written
    assert seeder.versions(w.dev_id) == ("1.0.0", "2.0")
    seeder.clock.advance(60)
    assert post("1.0.0", "2.0") == (Errno.SUCC, 1)
    assert last_seen() == T0 + 119
    assert w.state() is S.TO_BE_UPGRADED
    assert service.report_version(404, "1.0.0", None) is Errno.AUTH_FAILED


def test_e1_repeating_the_stored_versions_still_applies_t5_and_t6(
    service: DeviceService, seeder: Seeder
) -> None:
    # The versions stored and last_seen_at fresh, but a task to move: the report writes.
    reached = seeder.world()
    assert service.check_task(reached.dev_id, FOTA, "1.0.1")[0] is Errno.SUCC  # stores 1.0.1
    assert service.report_version(reached.dev_id, "1.0.1", None) is Errno.SUCC
    assert reached.state() is S.SUCCEEDED  # T6
    due = seeder.world(deadline=T0 + 30)
    assert service.report_version(due.dev_id, "1.0.0", None) is Errno.SUCC
    seeder.clock.advance(30)
    assert service.report_version(due.dev_id, "1.0.0", None) is Errno.SUCC
    assert due.state() is S.FAILED  # T5
    later = seeder.world(start_time=T0 + HOUR)  # not started: invisible, so nothing to do
    assert service.report_version(later.dev_id, "1.0.1", None) is Errno.SUCC
    assert service.report_version(later.dev_id, "1.0.1", None) is Errno.SUCC
    assert later.state() is S.TO_BE_UPGRADED


def test_e1_completes_both_types_when_targets_coincide(
    service: DeviceService, seeder: Seeder
) -> None:
    fota = seeder.world()
    package = seeder.package(fota.pid, module_type=2, target="1.0.1")
    sota_task = seeder.task(package, (fota.dev_id,), pid=fota.pid)[1][0]
    # The C SDK sends both keys with the same value (§6.1).
    assert service.report_version(fota.dev_id, "1.0.1", "1.0.1") is Errno.SUCC
    assert fota.state() is S.SUCCEEDED
    assert seeder.state(sota_task) is S.SUCCEEDED


def test_vanished_device_is_errno_1(service: DeviceService) -> None:
    assert service.report_version(424242, "1", None) is Errno.AUTH_FAILED
    assert service.check_task(424242, FOTA, "1") == (Errno.AUTH_FAILED, None)
    assert service.tasking(424242, FOTA) == (Errno.AUTH_FAILED, None)
    assert service.query_version(424242) is None


# -- deadlines (T5, D23) -------------------------------------------------------------------------


def test_expire_deadlines_sweeps_only_open_tasks_past_deadline(
    engine: Engine, seeder: Seeder
) -> None:
    # Deadlines well before every other test's (which start at T0 - 1 h), so that this sweep
    # over the shared database sees exactly these tasks.
    now = T0 - 10 * HOUR
    due = [seeder.world(deadline=now), seeder.world(deadline=now - HOUR)]
    paused = seeder.world(deadline=now)
    seeder.set_state(paused.task_id, S.PAUSED, S.DOWNLOADING)
    done = seeder.world(deadline=now)
    seeder.set_state(done.task_id, S.SUCCEEDED)
    later = seeder.world(deadline=now + 1)
    never = seeder.world()
    with engine.begin() as conn:
        assert expire_deadlines(conn, now) == 3
    for w in (*due, paused):
        row = seeder.device_task(w.task_id)
        assert (row.state, row.paused_from, row.finished_at) == (S.FAILED, None, now)
    assert done.state() is S.SUCCEEDED
    assert later.state() is S.TO_BE_UPGRADED
    assert never.state() is S.TO_BE_UPGRADED
    with engine.begin() as conn:
        assert expire_deadlines(conn, now) == 0  # idempotent


def test_expire_deadlines_for_one_device(engine: Engine, seeder: Seeder) -> None:
    a, b = seeder.world(deadline=T0), seeder.world(deadline=T0)
    with engine.begin() as conn:
        assert expire_deadlines(conn, T0, dev_id=a.dev_id) == 1
    assert (a.state(), b.state()) == (S.FAILED, S.TO_BE_UPGRADED)


def test_service_expire_deadlines_invalidates_cached_grants(
    seeder: Seeder, make_service: Callable[[float], DeviceService]
) -> None:
    service = make_service(60)
    w = seeder.world(deadline=T0 + 10)
    token = offer(service, w).token
    assert service.download_grant(token) is not None
    assert service.caches.grant(token) is not None
    seeder.clock.advance(10)
    assert service.expire_deadlines(w.dev_id) == 1
    assert service.caches.grant(token) is None
    assert w.state() is S.FAILED


# -- management actions --------------------------------------------------------------------------


def test_apply_action_pause_resume_cancel(service: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    offer(service, w)
    service.check_token(w.dev_id, seeder.device_task(w.task_id).current_token)
    assert service.apply_action(w.task_id, Action.PAUSE) == (S.DOWNLOADING, S.PAUSED)
    assert seeder.device_task(w.task_id).paused_from == S.DOWNLOADING
    assert service.apply_action(w.task_id, Action.RESUME) == (S.PAUSED, S.DOWNLOADING)
    assert seeder.device_task(w.task_id).paused_from is None
    assert service.apply_action(w.task_id, Action.CANCEL) == (S.DOWNLOADING, S.CANCELLED)
    with pytest.raises(IllegalTransition, match="can't resume a task in state cancelled"):
        service.apply_action(w.task_id, Action.RESUME)
    assert service.apply_action(999_999, Action.CANCEL) is None


def test_transactions_retry_after_a_concurrent_change(service: DeviceService) -> None:
    attempts = []

    def work(tx: Any) -> str:
        attempts.append(tx)
        if len(attempts) < 3:
            raise ConcurrentChange
        return "done"

    assert service._run(work) == "done"
    assert len(attempts) == 3


def test_transactions_give_up_eventually(service: DeviceService) -> None:
    def work(tx: Any) -> None:
        raise ConcurrentChange

    with pytest.raises(ConcurrentChange):
        service._run(work)


# -- caches --------------------------------------------------------------------------------------


def test_authenticate_caches_but_rechecks_et(
    seeder: Seeder, make_service: Callable[[float], DeviceService]
) -> None:
    service = make_service(60)
    w = seeder.world(task=False)
    value = auth.build_token(w.pid, K1, et=T0 + 5)
    principal = service.authenticate(value)
    assert principal is not None
    assert (principal.pid, principal.device_name) == (w.pid, None)
    assert "sign" not in repr(principal)
    assert service.caches.principal(value) == principal
    seeder.clock.advance(6)
    assert service.caches.principal(value) is None
    assert service.authenticate(value) is None


def test_own_transitions_invalidate_grants_others_wait_for_ttl(
    seeder: Seeder, make_service: Callable[[float], DeviceService]
) -> None:
    service = make_service(60)
    w = seeder.world()
    token = offer(service, w).token
    grant = service.download_grant(token)
    assert grant is not None
    assert grant.usable(seeder.clock())
    # A change by another process is not seen while cached (the documented staleness) ...
    seeder.set_state(w.task_id, S.PAUSED, S.TO_BE_UPGRADED)
    cached = service.caches.grant(token)
    assert cached is not None
    assert cached.state is S.TO_BE_UPGRADED
    service.invalidate()  # ... until the cache is dropped (or its TTL passes).
    assert service.caches.grant(token) is None
    seeder.set_state(w.task_id, S.TO_BE_UPGRADED)
    service.download_grant(token)
    # This process's own transition drops the entry at once.
    assert service.report(w.dev_id, token, Report(ReportKind.DOWNLOAD_FAILED, 107)) is Errno.SUCC
    assert service.caches.grant(token) is None
    fresh = service.download_grant(token)
    assert fresh is not None
    assert not fresh.usable(seeder.clock())


def test_cache_ttl_zero_caches_nothing(service: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    token = offer(service, w).token
    assert service.download_grant(token) is not None
    assert service.caches.grant(token) is None


# -- concurrency ---------------------------------------------------------------------------------


def at_once(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(i)`` for i in range(n) in n threads released together."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_concurrent_checks_issue_one_token(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    w = seeder.world()
    results = at_once(12, lambda _: service.check_task(w.dev_id, FOTA, "1.0.0"))
    issued = {info.token for errno, info in results if info is not None}
    assert all(errno is Errno.SUCC for errno, _ in results)
    assert len(issued) == 1
    assert seeder.tokens(w.task_id) == list(issued)  # no duplicate rows


def test_concurrent_final_reports_have_one_winner(service: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    token = offer(service, w).token
    assert service.check_token(w.dev_id, token) is Errno.SUCC
    codes = [201, 205, 206, 201, 107, 202, 203, 201]
    results = at_once(
        len(codes),
        lambda i: service.report(w.dev_id, token, Report(kind_of(codes[i]), codes[i])),
    )
    winners = [code for code, errno in zip(codes, results, strict=True) if errno is Errno.SUCC]
    assert len(winners) == 1
    assert all(errno is Errno.TASK_FINISHED for errno in results if errno is not Errno.SUCC)
    row = seeder.device_task(w.task_id)
    assert row.result_code == winners[0]
    assert row.state == (S.SUCCEEDED if winners[0] == 201 else S.FAILED)


def kind_of(code: int) -> ReportKind:
    if code == 201:
        return ReportKind.UPGRADED
    return ReportKind.UPGRADE_FAILED if code > 200 else ReportKind.DOWNLOAD_FAILED


def test_concurrent_e1_and_pause_stay_consistent(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    worlds = [seeder.world() for _ in range(6)]

    def act(i: int) -> Any:
        w = worlds[i // 2]
        if i % 2:
            return service.report_version(w.dev_id, "1.0.1", "1.0.1")
        try:
            return service.apply_action(w.task_id, Action.PAUSE)
        except IllegalTransition:
            return None  # T6 came first: a finished task cannot be paused

    at_once(12, act)
    for w in worlds:
        # Either order ends the same: pause then T6 (D16: paused included), or T6 alone.
        assert w.state() is S.SUCCEEDED
        assert seeder.device_task(w.task_id).paused_from is None


@pytest.mark.parametrize(  # SQLite serialises write transactions: they cannot deadlock
    "engine", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_report_chosen_as_deadlock_victim_runs_again(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    w = seeder.world()
    token = offer(service, w).token
    seeder.set_state(w.task_id, S.UPGRADING)
    upgraded = Report(ReportKind.UPGRADED, 201)
    # The report holds the device task (T15) and wants the device row (its versions); the other
    # session holds the device row and wants the device task.
    reporting, runs = run_as_deadlock_victim(
        engine,
        lambda: service.report(w.dev_id, token, upgraded),
        hold=select(devices.c.dev_id).where(devices.c.dev_id == w.dev_id).with_for_update(),
        collide=update(device_tasks)
        .where(device_tasks.c.id == w.task_id)
        .values(updated_at=T0 + 1),
        table="device_tasks",
    )
    assert reporting.error is None, reporting.error
    # It ran again. A retry can take the device task's row before the other session's waiting
    # UPDATE does, and be the victim of the same cycle once more: more runs, same outcome.
    assert runs >= 2
    assert reporting.result is Errno.SUCC
    assert w.state() is S.SUCCEEDED
    assert seeder.versions(w.dev_id) == ("1.0.1", None)


# -- cached answers (E3, E5) ---------------------------------------------------------------------


@pytest.fixture
def cached(make_service: Callable[[float], DeviceService]) -> DeviceService:
    return make_service(60)


def test_e3_answers_are_cached_only_when_nothing_changed(
    cached: DeviceService, seeder: Seeder
) -> None:
    w = seeder.world(deadline=T0 + TOKEN_LIFE + HOUR)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    first = offer(cached, w)  # issues the token: a write, so not cached
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert offer(cached, w) == first
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.SUCC, first)
    # Another question is another entry.
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0", manuf="001") is None
    assert cached.caches.check_task(w.dev_id, FOTA, "0.9") is None
    # The token's expiry ends the answer, whatever the TTL.
    seeder.clock.advance(TOKEN_LIFE)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    second = offer(cached, w)
    assert second.token != first.token
    offer(cached, w)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.SUCC, second)
    # ... and so does the deadline.
    seeder.clock.now = T0 + TOKEN_LIFE + HOUR
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None


def test_e3_no_task_is_cached_until_start_time(cached: DeviceService, seeder: Seeder) -> None:
    w = seeder.world(start_time=T0 + 30)
    # The first question records the version, a change: answers are cached from the second.
    assert cached.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.NO_TASK, None)
    assert cached.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.NO_TASK, None)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") == (Errno.NO_TASK, None)
    seeder.clock.advance(30)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert offer(cached, w).target == "1.0.1"


def test_own_transitions_drop_cached_answers(cached: DeviceService, seeder: Seeder) -> None:
    w = seeder.world()
    token = offer(cached, w).token
    offer(cached, w)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is not None
    assert cached.check_token(w.dev_id, token) is Errno.SUCC  # T9: a write, not cached
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None
    assert cached.caches.check_token(w.dev_id, token) is None
    assert cached.check_token(w.dev_id, token) is Errno.SUCC  # T10: nothing changed
    assert cached.caches.check_token(w.dev_id, token) is Errno.SUCC
    assert cached.caches.check_token(w.dev_id + 1, token) is None  # per device
    assert cached.report(w.dev_id, token, Report(ReportKind.DOWNLOADED, 101)) is Errno.SUCC
    assert cached.caches.check_token(w.dev_id, token) is None
    assert cached.check_token(w.dev_id, token) is Errno.INVALID_STATE
    assert cached.caches.check_token(w.dev_id, token) is None  # refusals are never cached


def test_a_cached_answer_never_skips_recording_a_changed_version(
    cached: DeviceService, seeder: Seeder
) -> None:
    """E3 step 5, S4, F6 with the caches on: a question answered from the cache still leaves
    the device's stored version what it last reported. Found by the F14 state machine: S-C with
    1.0.0 (cached), S-C with 1.0.1, S-C with 1.0.0 again from the cache left 1.0.1 stored. A
    recorded change of version, by E3/S-C/F-C or by E1, drops the device's cached answers."""
    w = seeder.world()
    for check in (
        lambda version: offer(cached, w, version),
        lambda version: cached.check_task_tid(w.dev_id, FOTA, version),
    ):
        for version in ("1.0.0", "1.0.0", "0.9", "1.0.0"):
            check(version)
            assert seeder.versions(w.dev_id)[0] == version
        assert cached.report_version(w.dev_id, "0.8", None) is Errno.SUCC
        check("1.0.0")
        assert seeder.versions(w.dev_id)[0] == "1.0.0"


def test_answers_racing_an_invalidation_are_not_cached(
    cached: DeviceService, seeder: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = seeder.world()
    offer(cached, w)
    decide = cached._decide  # every read-first answer is decided there

    def read_then_invalidate(*args: Any) -> Any:
        result = decide(*args)
        cached.invalidate()  # as if another thread's transition committed meanwhile
        return result

    monkeypatch.setattr(cached, "_decide", read_then_invalidate)
    offer(cached, w)
    assert cached.caches.check_task(w.dev_id, FOTA, "1.0.0") is None


def test_a_broken_read_connection_is_replaced(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    w = seeder.world(task=False)
    assert service.device(w.dev_id) is not None
    conn, reused = service._readers.get()
    assert reused
    conn.close()
    if engine.dialect.name == "sqlite":
        # A closed sqlite3 connection is a bug, not an outage: that request fails (the API
        # answers errno 7) ...
        with pytest.raises(Exception, match=r"(?i)closed"):
            service.device(w.dev_id)
    ref = service.device(w.dev_id)  # ... and the next one reconnects (PostgreSQL: this one)
    assert ref is not None
    assert ref.pid == w.pid


@pytest.mark.parametrize(
    "engine", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_read_session_the_database_ended_costs_no_request(
    service: DeviceService, seeder: Seeder, engine: Engine
) -> None:
    """The server ends the read connection's session (a restart, an idle timeout, an operator's
    pg_terminate_backend): the next read notices only when it runs, and runs again on a new
    connection instead of failing its request."""
    w = seeder.world(task=False)
    assert service.device(w.dev_id) is not None
    conn, _ = service._readers.get()
    with engine.connect() as other:
        other.execute(select(func.pg_terminate_backend(conn.info.backend_pid)))
    ref = service.device(w.dev_id)
    assert ref is not None
    assert ref.pid == w.pid
    fresh, reused = service._readers.get()
    assert fresh is not conn
    assert reused

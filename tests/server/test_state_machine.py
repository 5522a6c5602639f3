"""The task state machine through the real server (spec §5.3-§5.6, D12-D16, D23, S10, F14).

Two parts:

- every transition T1-T16 of §5.3, walked explicitly over HTTP (a table of paths);
- a hypothesis rule-based machine that drives E1/E3/E5/E6/E7/E8 over HTTP plus pause, resume,
  cancel, deadlines and the passing of time against a model built from ``protocol.states``'
  tables, and checks every answer and the stored state after every step. The same device also
  speaks Studio (S-V, S-C, S-T, S-D, S-R) and fuse (F-V, F-C, F-T, F-D, F-R) between any two
  of those requests, so it switches dialect mid-task as F14 allows: one task, whose state is
  what the tables say whichever dialect moved it (S10, F14). It runs with the device API's
  caches off and on (their memoised replies included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import update

from onenet_ota import auth
from onenet_ota.protocol.codes import Dialect, Operation, reply_code, verdict_of_errno
from onenet_ota.protocol.states import (
    Action,
    IllegalTransition,
    TaskState,
    on_action,
    on_download,
    on_report,
    on_status_query,
    on_token_check,
    wire_status,
)
from onenet_ota.protocol.status import classify_result, classify_step
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.schema import packages, tasks
from tests.server.seed import (
    DB_PARAMS,
    FIRMWARE,
    HOUR,
    TOKEN_LIFE,
    FakeClock,
    Seeder,
    World,
    module_database,
    running_api,
)

S = TaskState


@dataclass
class Env:
    seeder: Seeder
    api: DeviceApi
    client: httpx2.Client


@pytest.fixture(scope="module", params=DB_PARAMS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with module_database(request, tmp_path_factory) as engine:
        clock = FakeClock()
        seeder = Seeder(engine, BlobStore(tmp_path_factory.mktemp("blobs")), clock)
        with (
            running_api(engine, seeder.blobs, clock) as (api, srv),
            httpx2.Client(base_url=srv.url, timeout=10) as client,
        ):
            yield Env(seeder, api, client)


@pytest.fixture
def cached_env(env: Env) -> Iterator[Env]:
    """A second device API on the same database with its caches on (memoised replies and
    chunks included), served on its own port."""
    seeder = env.seeder
    with (
        running_api(seeder.engine, seeder.blobs, seeder.clock, cache_ttl=30) as (api, srv),
        httpx2.Client(base_url=srv.url, timeout=10) as client,
    ):
        yield Env(seeder, api, client)


class Device:
    """The calls a device makes, for one world."""

    def __init__(self, env: Env, world: World) -> None:
        self.env = env
        self.w = world

    def _json(self, method: str, path: str, params: dict[str, Any], body: Any = None) -> Any:
        response = self.env.client.request(
            method,
            path,
            params={"dev_id": self.w.dev_id, **params},
            headers={"Authorization": self.w.auth},
            json=body,
        )
        assert response.status_code == 200
        return response.json()

    def e1(self, version: str) -> int:
        body = {"f_version": version}
        return int(self._json("POST", "/ota/device/version", {}, body)["errno"])

    def e3(self, **params: Any) -> tuple[int, str | None]:
        reply = self._json("GET", "/ota/south/check", {"type": 1, "version": "1.0.0", **params})
        return int(reply["errno"]), reply.get("data", {}).get("token")

    def e5(self, token: str) -> int:
        return int(self._json("GET", f"/ota/south/download/{token}/check", {})["errno"])

    def e6(self, token: str) -> int | None:
        response = self.env.client.get(f"/ota/south/download/{token}", headers={"Range": "0-9"})
        if "Content-Length" in response.headers:
            assert response.content == FIRMWARE[:10]
            return None
        return response.content[0]

    def e7(self, token: str, step: int) -> int:
        path = f"/ota/south/device/download/{token}/progress"
        return int(self._json("POST", path, {}, {"step": step})["errno"])

    def e8(self, token: str, result: int | None) -> int:
        body = None if result is None else {"result": result}
        return int(self._json("POST", "/ota/south/report", {"token": token}, body)["errno"])

    # -- Studio (§12) and fuse (§13): the device named in the path, the task by its tid --------

    def _path_json(
        self, dialect: Dialect, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        response = self.env.client.request(
            method,
            DIALECT_PREFIX[dialect] + f"/{self.w.pid}/{self.w.name}{path}",
            headers={"Authorization": self.path_auth(dialect)},
            json=body,
        )
        assert response.status_code == 200
        reply = response.json()
        return int(reply["code" if dialect is Dialect.FUSE else "errno"]), reply.get("data")

    def path_auth(self, dialect: Dialect) -> str:
        """Each dialect's default device-level token (§12.2: sha1 2018-10-31; §13.7: 2022)."""
        version = auth.VERSION_2022 if dialect is Dialect.FUSE else auth.VERSION
        return auth.build_token(self.w.pid, self.w.key, device_name=self.w.name, version=version)

    def version(self, dialect: Dialect, version: str) -> int:
        return self._path_json(dialect, "POST", "/version", {"f_version": version})[0]

    def check_tid(self, dialect: Dialect, version: str) -> tuple[int, Any]:
        return self._path_json(dialect, "GET", f"/check?type=1&version={version}")

    def state_check(self, dialect: Dialect, tid: int) -> tuple[int, Any]:
        return self._path_json(dialect, "GET", f"/{tid}/check")

    def tid_report(self, dialect: Dialect, tid: int, step: int) -> int:
        return self._path_json(dialect, "POST", f"/{tid}/status", {"step": step})[0]

    def tid_download(self, dialect: Dialect, tid: int) -> int | None:
        """None for the first ten bytes served, else the Ota-Errno (§12.3, §13.4)."""
        response = self.env.client.get(
            DIALECT_PREFIX[dialect] + f"/{self.w.pid}/{self.w.name}/{tid}/download",
            headers={"Authorization": self.path_auth(dialect), "Range": "bytes=0-9"},
        )
        code = int(response.headers.get("Ota-Errno", "0"))
        if code == 0:
            assert response.status_code == 206
            assert response.content == FIRMWARE[:10]
            return None
        return code


DIALECT_PREFIX = {Dialect.STUDIO: "/ota", Dialect.FUSE: "/fuse-ota"}


# ---------------------------------------------------------------------------------------------
# Every transition of §5.3, explicitly


def to_state(env: Env, state: TaskState) -> tuple[Device, str]:
    """A fresh task brought to ``state`` through device requests and management actions."""
    d = Device(env, env.seeder.world(package_options={"manuf": "001"}))
    errno, token = d.e3()
    assert errno == 0
    assert token is not None
    if state in (S.DOWNLOADING, S.UPGRADING):
        assert d.e5(token) == 0
    if state is S.UPGRADING:
        assert d.e7(token, 101) == 0
    if state is S.PAUSED:
        assert d.e5(token) == 0
        env.api.service.apply_action(d.w.task_id, Action.PAUSE)
    assert d.w.state() is state
    return d, token


Step = Callable[[Env, Device, str], object]


def _expect(errno: int, got: int) -> None:
    assert got == errno


TRANSITIONS: list[tuple[str, TaskState, Step, TaskState]] = [
    ("T2 pause", S.TO_BE_UPGRADED,
     lambda e, d, t: e.api.service.apply_action(d.w.task_id, Action.PAUSE), S.PAUSED),
    ("T2 pause downloading", S.DOWNLOADING,
     lambda e, d, t: e.api.service.apply_action(d.w.task_id, Action.PAUSE), S.PAUSED),
    ("T3 resume", S.PAUSED,
     lambda e, d, t: e.api.service.apply_action(d.w.task_id, Action.RESUME), S.DOWNLOADING),
    ("T4 cancel upgrading", S.UPGRADING,
     lambda e, d, t: e.api.service.apply_action(d.w.task_id, Action.CANCEL), S.CANCELLED),
    ("T4 cancel paused", S.PAUSED,
     lambda e, d, t: e.api.service.apply_action(d.w.task_id, Action.CANCEL), S.CANCELLED),
    ("T5 deadline", S.UPGRADING, lambda e, d, t: pass_deadline(e, d), S.FAILED),
    ("T5 deadline paused", S.PAUSED, lambda e, d, t: pass_deadline(e, d), S.FAILED),
    ("T6 E1 target", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e1("1.0.1")), S.SUCCEEDED),
    ("T6 E1 paused", S.PAUSED, lambda e, d, t: _expect(0, d.e1("1.0.1")), S.SUCCEEDED),
    ("T7 manuf", S.TO_BE_UPGRADED, lambda e, d, t: _expect(8, d.e3(manuf="x")[0]), S.FAILED),
    ("T8 from-version", S.TO_BE_UPGRADED, lambda e, d, t: diff_mismatch(e, d), S.FAILED),
    ("T9 E5", S.TO_BE_UPGRADED, lambda e, d, t: _expect(0, d.e5(t)), S.DOWNLOADING),
    ("T10 E5", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e5(t)), S.DOWNLOADING),
    ("T11 progress", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e7(t, 99)), S.DOWNLOADING),
    ("T12 step 100", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e7(t, 100)), S.UPGRADING),
    ("T13 E7 101", S.TO_BE_UPGRADED, lambda e, d, t: _expect(0, d.e7(t, 101)), S.UPGRADING),
    ("T13 E8 101", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e8(t, 101)), S.UPGRADING),
    ("T14 E7 102", S.TO_BE_UPGRADED, lambda e, d, t: _expect(0, d.e7(t, 102)), S.FAILED),
    ("T14 E8 107", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e8(t, 107)), S.FAILED),
    ("T15 E7 201", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e7(t, 201)), S.SUCCEEDED),
    ("T15 E8 201", S.UPGRADING, lambda e, d, t: _expect(0, d.e8(t, 201)), S.SUCCEEDED),
    ("T16 E7 208", S.UPGRADING, lambda e, d, t: _expect(0, d.e7(t, 208)), S.FAILED),
    ("T16 E8 202", S.DOWNLOADING, lambda e, d, t: _expect(0, d.e8(t, 202)), S.FAILED),
]  # fmt: skip


def pass_deadline(env: Env, d: Device) -> None:
    with env.seeder.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.pid == d.w.pid).values(deadline=0))
    assert d.e3()[0] == 11  # applied lazily by the next device request


def diff_mismatch(env: Env, d: Device) -> None:
    with env.seeder.engine.begin() as conn:
        conn.execute(
            update(packages)
            .where(packages.c.id == d.w.package_id)
            .values(kind=2, from_version="0.9")
        )
    assert d.e3()[0] == 9


@pytest.mark.parametrize(
    ("name", "start", "step", "end"), TRANSITIONS, ids=[t[0] for t in TRANSITIONS]
)
def test_transition(env: Env, name: str, start: TaskState, step: Step, end: TaskState) -> None:
    d, token = to_state(env, start)  # T1: every world starts to-be-upgraded
    step(env, d, token)
    assert d.w.state() is end
    if end is S.SUCCEEDED and "E1" not in name:
        assert env.seeder.versions(d.w.dev_id)[0] == "1.0.1"  # T15's side effect


def test_every_transition_is_listed() -> None:
    numbers = {name.split()[0] for name, *_ in TRANSITIONS}
    assert numbers == {f"T{n}" for n in range(2, 17)}  # T1 is every world's start


# ---------------------------------------------------------------------------------------------
# The rule-based machine


@dataclass
class Model:
    """What protocol.states says the task must be."""

    state: TaskState = S.TO_BE_UPGRADED
    paused_from: TaskState | None = None
    tokens: list[tuple[str, float]] = field(default_factory=list)
    version: str | None = None

    @property
    def current(self) -> tuple[str, float] | None:
        return self.tokens[-1] if self.tokens else None


TOKEN_CHOICES = st.sampled_from(["current", "oldest", "unknown", "foreign"])
PATH_DIALECTS = st.sampled_from([Dialect.STUDIO, Dialect.FUSE])
TID_CHOICES = st.sampled_from(["own", "foreign"])
# The answer to a tid that is not this device's task (S6-S8, F7-F9).
UNKNOWN_TID = {Dialect.STUDIO: 4, Dialect.FUSE: 12012}
UNKNOWN_TID_DOWNLOAD = {Dialect.STUDIO: 5, Dialect.FUSE: 1}
STEPS = st.sampled_from([0, 50, 99, 100, 101, 102, 107, 108, 150, 201, 205, 208, 209, -1])
RESULTS = st.sampled_from([None, 50, 100, 101, 104, 107, 201, 203, 208, 300])


class TaskMachine(RuleBasedStateMachine):
    env: Env

    def __init__(self) -> None:
        super().__init__()
        seeder = self.env.seeder
        self.clock = seeder.clock
        self.device = Device(self.env, seeder.world(package_options={"manuf": "001"}))
        other = Device(self.env, seeder.world())
        _, foreign = other.e3()
        assert foreign is not None
        self.foreign = foreign
        self.foreign_tid = other.w.task_id
        self.foreign_issued = int(self.clock())
        self.model = Model()

    # -- helpers --------------------------------------------------------------------------------

    def expired(self, token: str) -> bool:
        current = self.model.current
        issued = dict(self.model.tokens)[token]
        return current is None or token != current[0] or self.clock() >= issued + TOKEN_LIFE

    def pick(self, choice: str) -> tuple[str, bool]:
        """A token to send and whether it is one of this task's."""
        if choice == "foreign":
            return self.foreign, False
        if choice == "unknown" or not self.model.tokens:
            return "ota_0000000000unknown0", False
        token = self.model.tokens[-1 if choice == "current" else 0][0]
        return token, True

    # -- rules ----------------------------------------------------------------------------------

    @rule(manuf=st.sampled_from([None, "001", "002"]))
    def check(self, manuf: str | None) -> None:
        params = {} if manuf is None else {"manuf": manuf}
        errno, token = self.device.e3(**params)
        self.model.version = "1.0.0"
        if not self.model.state.is_active:
            assert (errno, token) == (11, None)
        elif manuf == "002" and self.model.state is S.TO_BE_UPGRADED:
            assert (errno, token) == (8, None)  # T7
            self.model.state = on_action(self.model.state, Action.PREFLIGHT_FAILED)
        else:
            assert errno == 0
            current = self.model.current
            if current is not None and self.clock() < current[1] + TOKEN_LIFE:
                assert token == current[0]  # reused while valid
            else:
                assert token is not None
                assert token not in dict(self.model.tokens)
                self.model.tokens.append((token, int(self.clock())))

    @rule(choice=TOKEN_CHOICES)
    def token_check(self, choice: str) -> None:
        token, ours = self.pick(choice)
        errno = self.device.e5(token)
        if not ours:
            assert errno == 4
            return
        outcome = on_token_check(self.model.state, token_expired=self.expired(token))
        assert errno == outcome.errno
        if outcome.ok and outcome.state is not None:
            self.model.state = outcome.state

    @rule(choice=TOKEN_CHOICES)
    def download(self, choice: str) -> None:
        token, ours = self.pick(choice)
        byte = self.device.e6(token)
        if choice == "foreign":
            # D5/D6: the path token alone is the credential; it serves its own (active) task.
            usable = self.clock() < self.foreign_issued + TOKEN_LIFE
        else:
            usable = ours and not self.expired(token) and self.model.state.is_active
        assert byte == (None if usable else 3)

    @rule(choice=TOKEN_CHOICES, step=STEPS)
    def progress(self, choice: str, step: int) -> None:
        token, ours = self.pick(choice)
        errno = self.device.e7(token, step)
        if not ours:
            assert errno == 1
            return
        kind = classify_step(step)
        self._report(errno, kind, step)

    @rule(choice=TOKEN_CHOICES, result=RESULTS)
    def report(self, choice: str, result: int | None) -> None:
        token, ours = self.pick(choice)
        errno = self.device.e8(token, result)
        if not ours:
            assert errno == 1
            return
        if result is None:
            assert errno == 24
            return
        self._report(errno, classify_result(result), result)

    def _report(self, errno: int, kind: Any, value: int) -> None:
        if kind is None:
            assert errno == 2
            return
        outcome = on_report(self.model.state, kind)
        assert errno == outcome.errno
        if outcome.ok and outcome.state is not None:
            self.model.state = outcome.state
            if value == 201:
                self.model.version = "1.0.1"

    @rule(version=st.sampled_from(["1.0.1", "1.0.0"]))
    def post_version(self, version: str) -> None:
        assert self.device.e1(version) == 0
        self.model.version = version
        if version == "1.0.1" and self.model.state.is_open:
            self.model.state = on_action(self.model.state, Action.VERSION_REACHED)  # T6

    @rule(action=st.sampled_from([Action.PAUSE, Action.RESUME, Action.CANCEL]))
    def manage(self, action: Action) -> None:
        try:
            expected = on_action(self.model.state, action, paused_from=self.model.paused_from)
        except IllegalTransition:
            expected = None
        try:
            result = self.env.api.service.apply_action(self.device.w.task_id, action)
        except IllegalTransition:
            result = None
        if expected is None:
            assert result is None
            return
        assert result == (self.model.state, expected)
        self.model.paused_from = self.model.state if expected is S.PAUSED else None
        self.model.state = expected

    @rule()
    def deadline(self) -> None:
        with self.env.seeder.engine.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.pid == self.device.w.pid).values(deadline=0))
        self.env.api.service.expire_deadlines()  # the management side's sweep
        if self.model.state.is_open:
            self.model.state = on_action(self.model.state, Action.DEADLINE)
            self.model.paused_from = None

    @rule(seconds=st.sampled_from([1, HOUR, 47 * HOUR, TOKEN_LIFE]))
    def wait(self, seconds: int) -> None:
        self.clock.advance(seconds)

    # -- Studio and fuse on the same task (S10, F14) ---------------------------------------------

    def tid(self, choice: str) -> int:
        return self.device.w.task_id if choice == "own" else self.foreign_tid

    @rule(dialect=PATH_DIALECTS, version=st.sampled_from(["1.0.0", "1.0.1"]))
    def path_check(self, dialect: Dialect, version: str) -> None:
        """S-C / F-C (S4, S5, F6): the open task with its tid and state; recorded like E3's."""
        code, data = self.device.check_tid(dialect, version)
        self.model.version = version
        state = self.model.state
        if state.is_active:
            assert code == 0
            assert (data["tid"], data["status"]) == (self.device.w.task_id, wire_status(state))
            return
        if dialect is Dialect.STUDIO:
            assert code == 10  # S4
        elif state is S.SUCCEEDED and version == "1.0.1":
            assert code == 12013  # F6: the device already runs the latest task's target
        else:
            assert code == 12012

    @rule(dialect=PATH_DIALECTS, choice=TID_CHOICES)
    def path_state_check(self, dialect: Dialect, choice: str) -> None:
        """S-T answers as E5 by state (S6); F-T shows every state (F7); both do T9."""
        code, data = self.device.state_check(dialect, self.tid(choice))
        if choice == "foreign":
            assert code == UNKNOWN_TID[dialect]
            return
        state = self.model.state
        if dialect is Dialect.STUDIO:
            outcome = on_token_check(state, token_expired=False)
            if not outcome.ok or outcome.state is None:
                assert (code, data) == (int(outcome.errno), None)
                return
            new = outcome.state
        else:
            new = on_status_query(state)
        assert (code, data) == (0, {"status": wire_status(new, self.model.paused_from)})
        self.model.state = new

    @rule(dialect=PATH_DIALECTS, choice=TID_CHOICES)
    def path_download(self, dialect: Dialect, choice: str) -> None:
        """S-D / F-D (S7, F8): served in states 1-3, moving to-be-upgraded to downloading."""
        code = self.device.tid_download(dialect, self.tid(choice))
        if choice == "foreign":
            assert code == UNKNOWN_TID_DOWNLOAD[dialect]
            return
        new = on_download(self.model.state, moves=True)
        if new is None:
            assert code == 5
            return
        assert code is None
        self.model.state = new

    @rule(dialect=PATH_DIALECTS, choice=TID_CHOICES, step=STEPS)
    def path_report(self, dialect: Dialect, choice: str, step: int) -> None:
        """S-R / F-R: the E7 table keyed by tid (S8, F9)."""
        code = self.device.tid_report(dialect, self.tid(choice), step)
        if choice == "foreign":
            assert code == UNKNOWN_TID[dialect]
            return
        kind = classify_step(step)
        if kind is not None:
            # F3: these outcomes keep their classic numbers in both dialects.
            errno = on_report(self.model.state, kind).errno
            verdict = verdict_of_errno(errno)
            assert code == reply_code(dialect, Operation.REPORT_STATUS, verdict) == int(errno)
        self._report(code, kind, step)

    @rule(dialect=PATH_DIALECTS, version=st.sampled_from(["1.0.1", "1.0.0"]))
    def path_version(self, dialect: Dialect, version: str) -> None:
        """S-V / F-V (S9, F5): as E1, completing an open task whose target is reported (T6)."""
        assert self.device.version(dialect, version) == 0
        self.model.version = version
        if version == "1.0.1" and self.model.state.is_open:
            self.model.state = on_action(self.model.state, Action.VERSION_REACHED)  # T6

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def stored_state_matches_the_model(self) -> None:
        row = self.env.seeder.device_task(self.device.w.task_id)
        assert TaskState(row.state) is self.model.state
        if self.model.state is S.PAUSED:
            assert row.paused_from == self.model.paused_from
        assert self.env.seeder.tokens(self.device.w.task_id) == [t for t, _ in self.model.tokens]
        assert self.env.seeder.versions(self.device.w.dev_id)[0] == self.model.version


@pytest.mark.parametrize("caches", ["off", "on"])
def test_state_machine(env: Env, cached_env: Env, caches: str) -> None:
    """T1-T16 and F14: the task's state stays what protocol.states says through any sequence
    of classic, Studio and fuse requests and management actions."""
    TaskMachine.env = env if caches == "off" else cached_env
    run_state_machine_as_test(
        TaskMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

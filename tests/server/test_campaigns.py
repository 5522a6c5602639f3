"""Campaigns in SQL (server/campaigns.py) on SQLite and PostgreSQL: validation before anything
goes live, activation onto tasks, automatic decisions, operator actions, exactly-once under
concurrency, the evaluator's lease, and device labels as selectors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Table, and_, func, select, update

from onenet_ota.management.models import DispatchRate
from onenet_ota.protocol.states import TaskState
from onenet_ota.server import audit, changes, schema
from onenet_ota.server.admin_service import (
    AdminService,
    Conflict,
    DeviceImport,
    DeviceImportItem,
    Invalid,
    LabelsSet,
    PackageCreate,
    ProductCreate,
)
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.campaign_engine import FailureClass, StageSpec, order_members
from onenet_ota.server.campaigns import (
    CampaignCreate,
    CampaignEvaluator,
    CampaignService,
    DevicesAdd,
    RetryFailed,
    Selector,
)

NOW = 1_800_000_000
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
PID = "123123"


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def admin(engine: Engine, tmp_path: Path, clock: Clock) -> AdminService:
    return AdminService(engine, BlobStore(tmp_path / "packages"), clock=clock)


@pytest.fixture
def service(engine: Engine, clock: Clock) -> CampaignService:
    return CampaignService(engine, clock=clock)


def _fleet(admin: AdminService, n: int, labels: dict[int, dict[str, str]] | None = None) -> int:
    """Product PID with ``n`` devices d0..d{n-1} (dev_ids 1..n) and a FOTA package; its id."""
    admin.create_product(ProductCreate(pid=PID, access_key=K1))
    labels = labels or {}
    admin.import_devices(
        DeviceImport(
            pid=PID,
            devices=[
                DeviceImportItem(name=f"d{i}", dev_id=i + 1, labels=labels.get(i + 1))
                for i in range(n)
            ],
        )
    )
    spec = PackageCreate.model_validate(
        {"pid": PID, "module_type": 1, "target": "1.0.1", "file_name": "fw.bin"}
    )
    return admin.create_package(spec, admin.blobs.put_bytes(b"firmware")).id


def _spec(package_id: int, *stages: StageSpec, **selector: object) -> CampaignCreate:
    return CampaignCreate(
        package_id=package_id, selector=Selector.model_validate(selector), stages=list(stages)
    )


def _members(engine: Engine, campaign_id: int) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(schema.campaign_devices.c.dev_id, schema.campaign_devices.c.stage).where(
                schema.campaign_devices.c.campaign_id == campaign_id
            )
        ).all()
    return {r.dev_id: r.stage for r in rows}


def _report(
    engine: Engine, campaign_id: int, dev_ids: list[int], state: TaskState, code: int | None
) -> None:
    """What the device API does on a terminal report (T14-T16), for these members' tasks."""
    dt, cd = schema.device_tasks, schema.campaign_devices
    with engine.begin() as conn:
        for dev_id in dev_ids:
            task_id = conn.execute(
                select(cd.c.task_id).where(cd.c.campaign_id == campaign_id, cd.c.dev_id == dev_id)
            ).scalar_one()
            conn.execute(
                update(dt)
                .where(dt.c.task_id == task_id, dt.c.dev_id == dev_id)
                .values(state=int(state), result_code=code, finished_at=NOW)
            )


def _stage_members(engine: Engine, campaign_id: int, stage: int) -> list[int]:
    return sorted(d for d, s in _members(engine, campaign_id).items() if s == stage)


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("stages", "selector", "message"),
    [
        ([StageSpec(count=30)], {"labels": {"region": "mars"}}, "matches no device"),
        ([StageSpec(count=5, max_failed=6)], {}, "can never trip"),
        ([StageSpec(percent=50), StageSpec(percent=20)], {}, "does not grow"),
        ([StageSpec(count=15), StageSpec(count=30), StageSpec(rest=True)], {}, "no device left"),
    ],
)
def test_unsatisfiable_campaigns_are_refused_before_anything_is_written(
    admin: AdminService,
    service: CampaignService,
    engine: Engine,
    stages: list[StageSpec],
    selector: dict[str, object],
    message: str,
) -> None:
    package = _fleet(admin, 20)
    with pytest.raises(Invalid, match=message):
        service.create(_spec(package, *stages, **selector))
    with pytest.raises(Invalid, match=message):
        service.preview(_spec(package, *stages, **selector))
    assert _count(engine, schema.campaigns) == 0
    assert _count(engine, schema.tasks) == 0


def test_dry_run_shows_each_stage_and_changes_nothing(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    package = _fleet(admin, 100)
    spec = _spec(package, StageSpec(percent=10), StageSpec(count=30), StageSpec(rest=True))
    preview = service.preview(spec)
    assert [s.devices for s in preview.stages] == [10, 20, 70]
    campaign = service.create(spec)
    again = service.preview_campaign(campaign.id)
    assert [s.devices for s in again.stages] == [10, 20, 70]
    assert _count(engine, schema.tasks) == 0
    assert _count(engine, schema.campaign_devices) == 0


# ------------------------------------------------------------------------------ running


def test_stages_activate_in_order_gates_advance_and_the_last_finishes(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    package = _fleet(admin, 50)
    spec = _spec(
        package,
        StageSpec(count=5, success_percent=100),
        StageSpec(percent=50, success_percent=90),
        StageSpec(rest=True, success_percent=80),
    )
    campaign = service.create(spec)
    with audit.acting_as("release-bot"):
        started = service.act(campaign.id, "start")
    assert started.campaign.state == "running"
    assert [len(c.dev_ids) for c in started.created] == [5]
    assert len(_members(engine, campaign.id)) == 5
    assert service.evaluate(campaign.id) is None  # nothing reported yet

    _report(engine, campaign.id, _stage_members(engine, campaign.id, 0), TaskState.SUCCEEDED, 201)
    advanced = service.evaluate(campaign.id)
    assert advanced is not None
    assert advanced.campaign.stage == 1
    assert len(_stage_members(engine, campaign.id, 1)) == 20  # 50 % of 50, cumulative
    assert service.evaluate(campaign.id) is None

    second = _stage_members(engine, campaign.id, 1)
    _report(engine, campaign.id, second[:18], TaskState.SUCCEEDED, 201)
    _report(engine, campaign.id, second[18:], TaskState.FAILED, 105)  # deferrals: not counted
    assert service.evaluate(campaign.id) is not None
    last = _stage_members(engine, campaign.id, 2)
    assert len(last) == 25
    _report(engine, campaign.id, last, TaskState.SUCCEEDED, 201)
    finished = service.evaluate(campaign.id)
    assert finished is not None
    assert finished.campaign.state == "finished"

    detail = service.get(campaign.id)
    assert [s.counts["targeted"] for s in detail.stages] == [5, 20, 25]
    assert detail.stages[1].counts["deferred"] == 2
    actions = [(e.actor, e.by, e.action) for e in service.events(campaign.id)]
    assert actions == [
        ("operator", "release-bot", "start"),  # who acted, as the audit log names them
        ("auto", "system:campaigns", "advance"),
        ("auto", "system:campaigns", "advance"),
        ("auto", "system:campaigns", "finish"),
    ]


def test_ceiling_pauses_the_campaign_and_its_tasks_and_no_later_stage_starts(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    package = _fleet(admin, 40)
    spec = _spec(
        package,
        StageSpec(count=10, max_failed_percent=20, min_executed=5, success_percent=50),
        StageSpec(rest=True),
    )
    campaign = service.create(spec)
    service.act(campaign.id, "start")
    first = _stage_members(engine, campaign.id, 0)
    _report(engine, campaign.id, first[:4], TaskState.SUCCEEDED, 201)
    _report(engine, campaign.id, first[4:6], TaskState.FAILED, 205)
    paused = service.evaluate(campaign.id)
    assert paused is not None
    assert paused.campaign.state == "paused"
    (event,) = [e for e in service.events(campaign.id) if e.actor == "auto"]
    assert event.detail == "paused in stage 1: 2/6 = 33.3 % >= 20 % after 6 executed"
    assert event.numbers["failed_package"] == 2
    with engine.connect() as conn:
        states = conn.execute(
            select(schema.device_tasks.c.state)
            .join(
                schema.campaign_devices,
                and_(
                    schema.campaign_devices.c.task_id == schema.device_tasks.c.task_id,
                    schema.campaign_devices.c.dev_id == schema.device_tasks.c.dev_id,
                ),
            )
            .where(schema.device_tasks.c.state.in_([1, 2, 3]))
        ).all()
    assert states == []  # the open ones were paused (T2)
    assert set(_members(engine, campaign.id).values()) == {0}
    # Resuming would trip the ceiling again at once: refused with the numbers.
    with pytest.raises(Conflict, match="stop again at once"):
        service.act(campaign.id, "resume")
    aborted = service.act(campaign.id, "abort")
    assert aborted.campaign.state == "aborted"
    assert set(_members(engine, campaign.id).values()) == {0}
    # The audit log has each decision once, the automatic one with its numbers.
    with engine.connect() as conn:
        rows = conn.execute(
            select(schema.audit_log.c.actor, schema.audit_log.c.action, schema.audit_log.c.detail)
            .where(schema.audit_log.c.target == f"campaign:{campaign.id}")
            .order_by(schema.audit_log.c.id)
        ).all()
    assert [(r.actor, r.action) for r in rows] == [
        ("system:direct", "campaign.start"),
        ("system:campaigns", "campaign.pause"),
        ("system:direct", "campaign.abort"),
    ]
    assert rows[1].detail == "paused in stage 1: 2/6 = 33.3 % >= 20 % after 6 executed"


def test_retry_failed_gives_failed_members_a_new_task(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    package = _fleet(admin, 10)
    campaign = service.create(_spec(package, StageSpec(rest=True)))
    service.act(campaign.id, "start")
    members = _stage_members(engine, campaign.id, 0)
    _report(engine, campaign.id, members[:3], TaskState.FAILED, 105)
    _report(engine, campaign.id, members[3:5], TaskState.FAILED, 205)
    retried = service.act(campaign.id, "retry_failed", RetryFailed(classes=[FailureClass.DEFERRAL]))
    assert [sorted(c.dev_ids) for c in retried.created] == [members[:3]]
    counts = service.get(campaign.id).stages[0].counts
    assert (counts["deferred"], counts["failed_package"], counts["open"]) == (0, 2, 8)


def test_add_devices_to_a_running_campaign_activates_up_to_the_share(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    package = _fleet(admin, 20)
    campaign = service.create(_spec(package, StageSpec(percent=50), dev_ids=list(range(1, 11))))
    service.act(campaign.id, "start")
    assert len(_members(engine, campaign.id)) == 5
    service.act(campaign.id, "add_devices", DevicesAdd(dev_ids=list(range(11, 21))))
    assert len(_members(engine, campaign.id)) == 10  # 50 % of the 20 it covers now
    with pytest.raises(Invalid, match="not found"):
        service.act(campaign.id, "add_devices", DevicesAdd(dev_ids=[999]))


def test_actions_refused_in_the_wrong_state(admin: AdminService, service: CampaignService) -> None:
    package = _fleet(admin, 5)
    campaign = service.create(_spec(package, StageSpec(rest=True)))
    with pytest.raises(Conflict, match="can't pause a campaign that is draft"):
        service.act(campaign.id, "pause")
    service.act(campaign.id, "start")
    with pytest.raises(Conflict, match="can't start a campaign that is running"):
        service.act(campaign.id, "start")


# ------------------------------------------------------------------------------ exactly once


def test_concurrent_evaluations_apply_a_decision_once(
    admin: AdminService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 30)
    services = [CampaignService(engine, clock=clock) for _ in range(4)]
    campaign = services[0].create(_spec(package, StageSpec(count=10), StageSpec(rest=True)))
    services[0].act(campaign.id, "start")
    _report(engine, campaign.id, _stage_members(engine, campaign.id, 0), TaskState.SUCCEEDED, 201)
    barrier = threading.Barrier(len(services))
    results: list[object] = []

    def evaluate(service: CampaignService) -> None:
        barrier.wait()
        results.append(service.evaluate(campaign.id))

    threads = [threading.Thread(target=evaluate, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert any(r is not None for r in results)
    assert len(_members(engine, campaign.id)) == 30
    assert [e.action for e in services[0].events(campaign.id)] == ["start", "advance"]
    assert _count(engine, schema.tasks) == 2


def test_concurrent_operator_actions_apply_once(
    admin: AdminService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 10)
    services = [CampaignService(engine, clock=clock) for _ in range(4)]
    campaign = services[0].create(_spec(package, StageSpec(count=5), StageSpec(rest=True)))
    version = services[0].act(campaign.id, "start").campaign.version
    barrier = threading.Barrier(len(services))
    outcomes: list[str] = []

    def advance(service: CampaignService) -> None:
        # Four operators saw the same campaign (version) and press "advance" at once.
        barrier.wait()
        try:
            service.act(campaign.id, "advance", if_version=version)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=advance, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"]
    assert [e.action for e in services[0].events(campaign.id)] == ["start", "advance"]
    assert len(_members(engine, campaign.id)) == 10


def test_one_lease_holder_at_a_time(engine: Engine, clock: Clock) -> None:
    a = CampaignService(engine, clock=clock)
    b = CampaignService(engine, clock=clock)
    assert a.hold_lease("a", 3.0)
    assert not b.hold_lease("b", 3.0)
    assert a.hold_lease("a", 3.0)  # renewal
    clock.now += 5  # a stopped renewing: the lease expires and b takes over
    assert b.hold_lease("b", 3.0)
    assert not a.hold_lease("a", 3.0)
    b.release_lease("b")
    assert a.hold_lease("a", 3.0)


# ------------------------------------------------------------------------------ labels


def test_labels_select_devices_and_campaign_members(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    labels = {i: {"region": "eu" if i % 2 else "us"} for i in range(1, 21)}
    package = _fleet(admin, 20, labels)
    eu = admin.list_devices(labels=[("region", "eu")], limit=100).items
    assert sorted(d.dev_id for d in eu) == list(range(1, 21, 2))
    admin.set_device_labels(2, LabelsSet(labels={"region": "eu", "ring": "canary"}), replace=True)
    admin.set_device_labels(2, LabelsSet(labels={"ring": None}), replace=False)
    assert admin.get_device(2).labels == {"region": "eu"}
    campaign = service.create(_spec(package, StageSpec(rest=True), labels={"region": "eu"}))
    assert campaign.population == 11
    service.act(campaign.id, "start")
    assert sorted(_members(engine, campaign.id)) == [1, 2, *range(3, 21, 2)]


def test_more_than_32_labels_are_refused(admin: AdminService) -> None:
    _fleet(admin, 1)
    many = {f"k{i}": "v" for i in range(33)}
    with pytest.raises(ValueError, match="at most 32"):
        LabelsSet.model_validate({"labels": many})
    admin.set_device_labels(1, LabelsSet(labels={f"k{i}": "v" for i in range(32)}), replace=True)
    with pytest.raises(Invalid, match="at most 32"):
        admin.set_device_labels(1, LabelsSet(labels={"extra": "v"}), replace=False)


def test_an_advance_whose_activation_failed_is_activated_at_the_next_look(
    admin: AdminService, service: CampaignService, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _fleet(admin, 30)
    campaign = service.create(_spec(package, StageSpec(count=10), StageSpec(rest=True)))
    service.act(campaign.id, "start")
    _report(engine, campaign.id, _stage_members(engine, campaign.id, 0), TaskState.SUCCEEDED, 201)
    real = CampaignService._activate

    def broken(*args: object, **kwargs: object) -> object:
        raise OSError("the process died here")

    monkeypatch.setattr(CampaignService, "_activate", broken)
    with pytest.raises(OSError, match="died"):
        service.evaluate(campaign.id)
    detail = service.get(campaign.id)
    assert (detail.stage, detail.activated_stage) == (1, 0)  # decided, not yet activated
    assert _stage_members(engine, campaign.id, 1) == []
    monkeypatch.setattr(CampaignService, "_activate", real)
    # The empty stage is not judged (its gate would pass on 0 of 0): it is activated first.
    again = service.evaluate(campaign.id)
    assert again is not None
    assert again.campaign.state == "running"
    assert len(_stage_members(engine, campaign.id, 1)) == 20
    assert [e.action for e in service.events(campaign.id)] == ["start", "advance"]


# ------------------------------------------------------------------------------ dispatch rate


def _pending(engine: Engine, campaign_id: int) -> int:
    cd = schema.campaign_devices
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(cd.c.campaign_id == campaign_id, cd.c.pending)
            ).scalar_one()
        )


def _dispatched(engine: Engine, campaign_id: int) -> list[int]:
    """Members with a device task, whatever its state."""
    cd = schema.campaign_devices
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                select(cd.c.dev_id).where(
                    cd.c.campaign_id == campaign_id, cd.c.task_id.is_not(None)
                )
            ).scalars()
        )


def _rated(package: int, *stages: StageSpec, per_minute: float = 6, **rate: Any) -> CampaignCreate:
    spec = _spec(package, *stages)
    return spec.model_copy(update={"rate": DispatchRate(per_minute=per_minute, **rate)})


def test_a_rate_dispatches_members_in_batches_and_the_gate_waits_for_all(
    admin: AdminService, service: CampaignService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 20)
    # 6 a minute: one at once, then one every 10 s.
    campaign = service.create(_rated(package, StageSpec(count=10), StageSpec(rest=True)))
    started = service.act(campaign.id, "start")
    assert [len(c.dev_ids) for c in started.created] == [1]
    assert len(_members(engine, campaign.id)) == 10  # membership is decided at activation
    assert _pending(engine, campaign.id) == 9
    look = service.look(campaign.id)
    assert look.applied is None
    assert look.due == pytest.approx(NOW + 10, abs=0.01)  # the rate's next slot

    clock.now += 10
    assert len(_dispatched(engine, campaign.id)) == 1
    batch = service.look(campaign.id)
    assert batch.applied is not None
    assert [len(c.dev_ids) for c in batch.applied.created] == [1]
    clock.now += 35  # A(45 s) = 4.5: five devices in all
    service.look(campaign.id)
    assert len(_dispatched(engine, campaign.id)) == 5
    # Every dispatched member succeeded: 100 % of the targeted, yet the gate waits.
    _report(engine, campaign.id, _dispatched(engine, campaign.id), TaskState.SUCCEEDED, 201)
    assert service.look(campaign.id).applied is None
    assert service.get(campaign.id).stage == 0
    clock.now += 60
    service.look(campaign.id)
    assert _pending(engine, campaign.id) == 0
    _report(engine, campaign.id, _dispatched(engine, campaign.id), TaskState.SUCCEEDED, 201)
    advanced = service.look(campaign.id)
    assert advanced.applied is not None
    assert advanced.applied.campaign.stage == 1
    # The next stage starts its rate again: one member at once.
    assert len(_dispatched(engine, campaign.id)) == 11
    # One audited decision per stage activation, none per batch.
    assert [e.action for e in service.events(campaign.id)] == ["start", "advance"]
    with engine.connect() as conn:
        audited = conn.execute(
            select(func.count()).where(schema.audit_log.c.target == f"campaign:{campaign.id}")
        ).scalar_one()
    assert audited == 2


def test_the_ceiling_trips_on_dispatched_members_before_the_rest_are_dispatched(
    admin: AdminService, service: CampaignService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 20)
    spec = _rated(package, StageSpec(count=10, max_failed=2), StageSpec(rest=True))
    campaign = service.create(spec)
    service.act(campaign.id, "start")
    clock.now += 10
    service.look(campaign.id)
    _report(engine, campaign.id, _dispatched(engine, campaign.id), TaskState.FAILED, 206)
    paused = service.look(campaign.id)
    assert paused.applied is not None
    assert paused.applied.campaign.state == "paused"
    clock.now += 600
    assert service.look(campaign.id).applied is None  # a paused campaign dispatches nothing
    assert len(_dispatched(engine, campaign.id)) == 2
    assert _pending(engine, campaign.id) == 8


def test_a_resume_restarts_the_rate_instead_of_a_burst(
    admin: AdminService, service: CampaignService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 20)
    campaign = service.create(_rated(package, StageSpec(rest=True)))
    service.act(campaign.id, "start")
    service.act(campaign.id, "pause")
    clock.now += 3600
    resumed = service.act(campaign.id, "resume")
    assert resumed.campaign.dispatched == 0
    service.look(campaign.id)
    assert len(_dispatched(engine, campaign.id)) == 2  # the first one, and one at once
    clock.now += 10
    service.look(campaign.id)
    assert len(_dispatched(engine, campaign.id)) == 3


def test_concurrent_looks_dispatch_a_batch_once(
    admin: AdminService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 40)
    services = [CampaignService(engine, clock=clock) for _ in range(4)]
    campaign = services[0].create(_rated(package, StageSpec(rest=True), per_minute=60))
    services[0].act(campaign.id, "start")
    clock.now += 10  # ten more allowed
    barrier = threading.Barrier(len(services))

    def look(service: CampaignService) -> None:
        barrier.wait()
        service.look(campaign.id)

    threads = [threading.Thread(target=look, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_dispatched(engine, campaign.id)) == 11
    with engine.connect() as conn:
        row = conn.execute(
            select(schema.campaigns.c.dispatched).where(schema.campaigns.c.id == campaign.id)
        ).scalar_one()
        tasks_made = conn.execute(select(func.count()).select_from(schema.tasks)).scalar_one()
    assert row == 11
    assert tasks_made == 2  # the first device's task and one batch's


# ------------------------------------------------------------------------------ dynamic mode


def test_dynamic_campaign_takes_newly_matching_devices_up_to_the_current_share(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    labels = {i: {"region": "eu"} for i in range(1, 11)}
    package = _fleet(admin, 20, labels)
    spec = _spec(
        package, StageSpec(percent=50), StageSpec(rest=True), labels={"region": "eu"}
    ).model_copy(update={"dynamic": True})
    campaign = service.create(spec)
    service.act(campaign.id, "start")
    first = set(_members(engine, campaign.id))
    assert len(first) == 5
    assert service.look(campaign.id).applied is None  # nothing new matches

    # Ten devices come to match: the population is 20, the first stage covers 10 of them.
    for dev_id in range(11, 21):
        admin.set_device_labels(dev_id, LabelsSet(labels={"region": "eu"}), replace=False)
    joined = service.look(campaign.id)
    assert joined.applied is not None
    members = _members(engine, campaign.id)
    assert len(members) == 10
    assert set(members.values()) == {0}
    assert len(_dispatched(engine, campaign.id)) == 10
    detail = service.get(campaign.id)
    assert detail.population == 20
    assert detail.stages[0].counts["targeted"] == 10
    # Members never leave; the newcomers are the lowest positions in the stable order of the
    # devices not yet members, and the others wait for the second stage.
    rest = order_members(_salt(engine, campaign.id), [d for d in range(1, 21) if d not in first])
    assert set(members) == first | set(rest[:5])

    # A new device that matches: 21 devices, the first stage's share is 11.
    admin.import_devices(DeviceImport(pid=PID, devices=[DeviceImportItem(name="late", dev_id=21)]))
    admin.set_device_labels(21, LabelsSet(labels={"region": "eu"}), replace=False)
    service.look(campaign.id)
    assert len(_members(engine, campaign.id)) == 11
    _report(engine, campaign.id, sorted(_members(engine, campaign.id)), TaskState.SUCCEEDED, 201)
    service.look(campaign.id)
    assert sorted(_members(engine, campaign.id)) == list(range(1, 22))
    # The joins are not campaign events; the stage decisions are.
    assert [e.action for e in service.events(campaign.id)] == ["start", "advance"]


def test_a_static_campaign_ignores_newly_matching_devices_until_its_next_stage(
    admin: AdminService, service: CampaignService, engine: Engine
) -> None:
    labels = {i: {"region": "eu"} for i in range(1, 11)}
    package = _fleet(admin, 20, labels)
    campaign = service.create(
        _spec(package, StageSpec(percent=50), StageSpec(rest=True), labels={"region": "eu"})
    )
    service.act(campaign.id, "start")
    for dev_id in range(11, 21):
        admin.set_device_labels(dev_id, LabelsSet(labels={"region": "eu"}), replace=False)
    assert service.look(campaign.id).applied is None
    assert len(_members(engine, campaign.id)) == 5


def test_dynamic_mode_refuses_an_explicit_list() -> None:
    with pytest.raises(ValueError, match="dynamic mode needs a filter selector"):
        CampaignCreate(
            package_id=1,
            selector=Selector(dev_ids=[1, 2]),
            stages=[StageSpec(rest=True)],
            dynamic=True,
        )


def _salt(engine: Engine, campaign_id: int) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                select(schema.campaigns.c.salt).where(schema.campaigns.c.id == campaign_id)
            ).scalar_one()
        )


# ------------------------------------------------------------------------------ the evaluator


class CountingService(CampaignService):
    """A service that remembers which campaigns the evaluator looked at."""

    looked: list[int]

    def look(self, campaign_id: int, *, rejoin: bool = True) -> Any:
        self.looked.append(campaign_id)
        return super().look(campaign_id, rejoin=rejoin)


def test_the_evaluator_looks_when_the_feed_an_action_or_a_timer_says_so(
    admin: AdminService, engine: Engine, clock: Clock
) -> None:
    package = _fleet(admin, 20)
    service = CountingService(engine, clock=clock)
    service.looked = []
    mono = [0.0]
    evaluator = CampaignEvaluator(
        service, feed_interval=0, sweep_interval=1e9, monotonic=lambda: mono[0]
    )
    spec = _spec(package, StageSpec(count=5, soak_s=60), StageSpec(rest=True))
    campaign = service.create(spec)
    service.act(campaign.id, "start")
    assert evaluator.tick() == []  # takes the lease and sweeps once: the soak is not over
    assert service.looked == [campaign.id]

    # Reports written without a change feed row: nothing names the campaign, and it does not poll.
    _report(engine, campaign.id, _stage_members(engine, campaign.id, 0), TaskState.SUCCEEDED, 201)
    assert evaluator.tick() == []
    assert service.looked == [campaign.id]
    # The soak's end is a due time: the look at it advances.
    clock.now += 60
    advanced = evaluator.tick()
    assert [a.campaign.stage for a in advanced] == [1]

    assert evaluator.tick() == []  # reads the activation's own feed rows: nothing to do
    # A report with its feed row (as the device API writes it) names the campaign.
    last = _stage_members(engine, campaign.id, 1)
    _report(engine, campaign.id, last, TaskState.SUCCEEDED, 201)
    looks = len(service.looked)
    assert evaluator.tick() == []  # not yet in the feed
    assert len(service.looked) == looks
    with engine.begin() as conn:  # the device API says only the device's tasks changed
        changes.publish(conn, last[:1], NOW, scope=changes.Scope.TASKS)
    finished = evaluator.tick()
    assert [a.campaign.state for a in finished] == ["finished"]

    # An operator action in this process wakes the evaluator for that campaign.
    other = service.create(_spec(package, StageSpec(rest=True)))
    service.act(other.id, "start")
    evaluator.tick()
    assert service.looked[-1] == other.id
    assert [e.action for e in service.events(campaign.id)] == ["start", "advance", "finish"]

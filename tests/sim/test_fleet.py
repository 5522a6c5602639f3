"""Small fleets of real upgraders against the real platform (SQLite and PostgreSQL): faults,
power cuts, gates, existing tasks, and the agreement check that must catch a disagreement."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from onenet_ota.device.upgrader import Outcome, UpgradeResult
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import StatusCode, TaskType
from onenet_ota.sim import FleetConfig, SimulationError, ValueRange, simulate
from onenet_ota.sim.config import HTTP_CLIENTS
from onenet_ota.sim.fleet import DeviceLogPolicy, DeviceRecord, Fleet, FleetState, Phase
from onenet_ota.sim.provision import DeviceView, FleetTarget, provision
from onenet_ota.sim.report import FleetReport, check_agreement, retry_summary
from onenet_ota.sim.transport import DeviceLink, device_context
from tests.sim.platform import Platform

SMALL: dict[str, Any] = {"package_size": 32 * 1024, "chunk_size": 8 * 1024, "retry_interval": 0.02}


@pytest.mark.parametrize("http", HTTP_CLIENTS)
def test_faulty_fleet_all_succeed_and_the_server_agrees(platform: Platform, http: str) -> None:
    """Drops and power cuts, over the SDK's own transport and over a shared httpx2 client."""
    config = FleetConfig(
        devices=50, concurrency=16, drop_rate=0.05, power_cut_rate=0.3, seed=5, http=http, **SMALL
    )
    report = simulate(config, server=platform.url, admin_token=platform.admin_token)
    assert report.reasons() == []
    assert report.ok
    assert report.succeeded == 50
    assert report.install_mismatches == 0
    faults = report.metrics.injected
    assert faults["power-cut"] > 0
    assert faults["refused"] + faults["reset"] + faults["truncated"] > 0
    assert sum(record.power_cuts for record in report.state.devices) == faults["power-cut"]
    agreement = report.agreement
    assert agreement is not None
    assert (agreement.checked, agreement.lost_reports, agreement.duplicated_reports) == (50, 0, 0)
    assert agreement.server_counts["succeeded"] == 50
    assert report.task_counts is not None
    assert report.task_counts["succeeded"] == 50
    for record in report.state.devices:
        assert record.accepted[StatusCode.UPGRADED] <= 1
    endpoints = report.metrics.endpoints
    for endpoint in (Endpoint.CHECK_TASK, Endpoint.CHECK_TOKEN, Endpoint.DOWNLOAD):
        assert endpoints[endpoint].latency.count > 0
        assert endpoints[endpoint].latency.percentile(99) > 0
    # Each device downloads the 32 KiB at least once; retries and resumes may repeat chunks.
    assert endpoints[Endpoint.DOWNLOAD].bytes >= 50 * 32 * 1024
    data = report.to_dict()
    assert data["outcomes"] == {"succeeded": 50}
    assert set(data["endpoints"]["E6 download package"]["latency_ms"]) >= {"p50", "p95", "p99"}


def test_failed_gate_is_reported_and_the_server_agrees(sqlite_platform: Platform) -> None:
    config = FleetConfig(
        devices=6, concurrency=6, power=ValueRange(10, 20), task_power=50, gate_fail=True, **SMALL
    )
    report = simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)
    assert not report.ok
    assert report.failure_codes == {str(int(StatusCode.DOWNLOAD_LOW_BATTERY)): 6}
    assert report.agreement is not None
    assert report.agreement.ok
    assert report.agreement.server_counts["failed"] == 6
    assert report.metrics.endpoints.get(Endpoint.DOWNLOAD) is None  # nothing was downloaded


def test_deferred_devices_leave_their_tasks_open(sqlite_platform: Platform) -> None:
    config = FleetConfig(devices=4, concurrency=4, signal=ValueRange(5, 5), task_signal=30, **SMALL)
    report = simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)
    assert report.outcomes == {"deferred": 4}
    assert report.agreement is not None
    assert report.agreement.ok
    assert report.agreement.server_counts["to_be_upgraded"] == 4


def test_existing_task_runs_its_waiting_devices(sqlite_platform: Platform) -> None:
    admin = sqlite_platform.admin()
    try:
        target = provision(admin, FleetConfig(devices=10, **SMALL))
    finally:
        admin.close()
    run: dict[str, Any] = {
        "server": sqlite_platform.url,
        "admin_token": sqlite_platform.admin_token,
    }
    report = simulate(
        FleetConfig(devices=6, task_id=target.task_id, allow_real_devices=True, **SMALL), **run
    )
    assert report.ok
    assert report.target.md5 == target.md5
    assert set(report.target.dev_ids) < set(target.dev_ids)
    assert report.task_counts is not None
    assert (report.task_counts["succeeded"], report.task_counts["to_be_upgraded"]) == (6, 4)
    with pytest.raises(SimulationError, match="has 4 device\\(s\\) waiting to upgrade; use --dev"):
        simulate(
            FleetConfig(devices=5, task_id=target.task_id, allow_real_devices=True, **SMALL), **run
        )
    with pytest.raises(SimulationError, match=r"reading task 999999: .*not"):
        simulate(FleetConfig(devices=5, task_id=999_999, allow_real_devices=True, **SMALL), **run)


def test_setup_errors_are_clear(sqlite_platform: Platform) -> None:
    with pytest.raises(SimulationError, match="check --admin-token"):
        simulate(FleetConfig(devices=1), server=sqlite_platform.url, admin_token="wrong-token-0000")
    with pytest.raises(SimulationError, match=r"--admin-token .* is needed"):
        simulate(FleetConfig(devices=1), server=sqlite_platform.url)
    with pytest.raises(SimulationError, match="must be an http:// or https:// URL"):
        simulate(FleetConfig(devices=1), server="ftp://x", admin_token="t")
    with pytest.raises(SimulationError, match="does not answer"):
        simulate(FleetConfig(devices=1), server="http://127.0.0.1:9", admin_token="t")


def _record(dev_id: int, outcome: Outcome, code: StatusCode | None = None) -> DeviceRecord:
    phase = Phase(outcome.value)
    result = UpgradeResult(outcome=outcome, task_type=TaskType.FOTA, code=code)
    record = DeviceRecord(dev_id, phase=phase, result=result)
    if outcome is Outcome.SUCCEEDED:
        record.accepted.update({101: 1, 201: 1})
    if code is not None:
        record.accepted[int(code)] = 1
    return record


def test_agreement_catches_every_kind_of_disagreement() -> None:
    records = [
        _record(1, Outcome.SUCCEEDED),
        _record(2, Outcome.SUCCEEDED),  # the server says failed
        _record(3, Outcome.SUCCEEDED),  # the server lost the 201
        _record(4, Outcome.FAILED, StatusCode.DOWNLOAD_LOW_BATTERY),
        _record(5, Outcome.DEFERRED),
        _record(6, Outcome.SUCCEEDED),  # missing on the server
        _record(7, Outcome.SUCCEEDED),  # 201 acknowledged twice
    ]
    records[6].accepted[201] = 2
    views = {
        1: DeviceView(TaskState.SUCCEEDED, 100, 201),
        2: DeviceView(TaskState.FAILED, 100, 205),
        3: DeviceView(TaskState.SUCCEEDED, 100, None),
        4: DeviceView(TaskState.FAILED, 0, 105),
        5: DeviceView(TaskState.TO_BE_UPGRADED, 0, None),
        7: DeviceView(TaskState.SUCCEEDED, 100, 201),
    }
    agreement = check_agreement(FleetState(records, phases=Counter()), views)
    assert not agreement.ok
    assert agreement.mismatches == 1
    assert agreement.missing == 1
    assert agreement.duplicated_reports == 1
    assert agreement.lost_reports == 2  # device 2's 201 (server shows 205) and device 3's
    assert agreement.checked == 6
    assert any(
        e.startswith("2: the device ended succeeded, the server says failed")
        for e in agreement.examples
    )
    good = check_agreement(FleetState(records[:1] + records[3:5]), {k: views[k] for k in (1, 4, 5)})
    assert good.ok


def test_an_unusable_state_directory_is_a_clear_error(
    sqlite_platform: Platform, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    config = FleetConfig(devices=1, state_root=missing, **SMALL)
    with pytest.raises(SimulationError, match="cannot make the devices' state directories in"):
        simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)


def test_a_fleet_shared_out_to_processes(sqlite_platform: Platform) -> None:
    config = FleetConfig(
        devices=24, concurrency=6, processes=3, drop_rate=0.05, power_cut_rate=0.3, seed=9, **SMALL
    )
    ticks: list[int] = []
    report = simulate(
        config,
        server=sqlite_platform.url,
        admin_token=sqlite_platform.admin_token,
        on_tick=lambda state: ticks.append(state.done),
    )
    assert report.reasons() == []
    assert report.ok
    assert [record.dev_id for record in report.state.devices] == list(report.target.dev_ids)
    assert report.state.phases == Counter({Phase.SUCCEEDED: 24})
    # The parent merged every process's measurements.
    assert report.metrics.endpoints[Endpoint.CHECK_TASK].requests >= 24
    assert report.metrics.injected["power-cut"] == sum(r.power_cuts for r in report.state.devices)
    assert ticks[-1] == 24
    # The retries by step and the device log records held back, merged too.
    state = report.state
    assert state.retries > 0
    assert sum(state.retry_steps.values()) == state.retries
    assert state.device_logs["WARNING"] >= state.retries  # each retry's warning, held back


def test_virtual_devices_retries_are_counted_not_logged_line_by_line(
    sqlite_platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    """With connections dropped, every retry of the SDK's upgrader logs a WARNING: at 100,000
    devices, tens of thousands of lines. The simulator holds its virtual devices' SDK records
    below ERROR back and counts them, and counts the retries by step in its report."""
    caplog.set_level(logging.DEBUG)
    config = FleetConfig(devices=30, concurrency=8, drop_rate=0.15, seed=3, **SMALL)
    report = simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)
    assert report.ok
    state = report.state
    assert state.retries > 0
    sdk = [r for r in caplog.records if r.name.startswith("onenet_ota.device")]
    assert sdk == []
    assert sum(state.retry_steps.values()) == state.retries
    assert state.device_logs["WARNING"] >= state.retries
    assert state.device_logs["INFO"] > 0  # the reports, tasks and installs of every device
    data = report.to_dict()
    assert data["retries_by_step"] == dict(state.retry_steps.most_common())
    assert data["device_log_records_held"] == dict(state.device_logs)
    assert "retries by step: " in retry_summary(data)
    # The policy is gone with the run: the SDK logs as always afterwards.
    logging.getLogger("onenet_ota.device.upgrader").warning("after the run")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("onenet_ota.device")] == [
        "after the run"
    ]


def test_the_device_log_policy_holds_back_only_virtual_devices_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    counts: Counter[str] = Counter()
    policy = DeviceLogPolicy(counts)
    upgrader = logging.getLogger("onenet_ota.device.upgrader")
    policy.install()
    try:
        upgrader.warning("a real device retries")  # no simulated device's context: it goes out
        with device_context(DeviceLink()):
            upgrader.warning("a virtual device retries")
            logging.getLogger("onenet_ota.device").info("a virtual device reported")
            upgrader.error("a virtual device's error")  # errors still go out
            logging.getLogger("onenet_ota.sim.fleet").warning("the simulator's own")
    finally:
        policy.remove()
    with device_context(DeviceLink()):
        upgrader.warning("after remove")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "a real device retries",
        "a virtual device's error",
        "the simulator's own",
        "after remove",
    ]
    assert counts == Counter({"WARNING": 1, "INFO": 1})


def test_processes_beyond_the_concurrency_are_reduced() -> None:
    assert FleetConfig(devices=10, concurrency=4, processes=8).processes == 4
    with pytest.raises(SimulationError, match="--processes must be an integer from 1 to 64"):
        FleetConfig(processes=0)


def test_a_waiting_device_costs_its_record_alone() -> None:
    """A fleet of 100,000 devices holds a record for each from the start; a device that has not
    started costs the record (128 bytes), its place in the fleet and a list slot, and no
    counter of acknowledged reports until it has one."""
    count = 10_000
    target = FleetTarget(
        pid="123456",
        access_key="a2V5" * 11,
        task_id=1,
        dev_ids=tuple(range(10**6, 10**6 + count)),
        names=tuple(f"sim-00000000-{i:06d}" for i in range(count)),
        task_type=TaskType.FOTA,
        version="1.0.0",
        target="1.0.1",
        size=256 * 1024,
        md5="0" * 32,
        created=True,
    )
    config = FleetConfig(devices=count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fleet = Fleet(config, target, "http://127.0.0.1:9")
        per_device = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert per_device < 200, f"{per_device:.0f} bytes per waiting device"
    record = fleet.state.devices[0]
    assert record.accepted == Counter()
    record.accepted[101] += 1  # a report makes the counter, and it stays
    assert record.accepted == Counter({101: 1})


def test_an_interrupted_run_counts_only_finished_devices_per_second() -> None:
    target = FleetTarget(
        pid="123456", access_key="a2V5" * 11, task_id=1, dev_ids=(1, 2, 3, 4),
        names=("a", "b", "c", "d"), task_type=TaskType.FOTA, version="1.0.0", target="1.0.1",
        size=1, md5="0" * 32, created=True,
    )  # fmt: skip
    records = [_record(1, Outcome.SUCCEEDED, StatusCode.UPGRADED), DeviceRecord(2)]
    records += [DeviceRecord(3), DeviceRecord(4)]
    state = FleetState(records, started_at=100.0, finished_at=110.0, interrupted=True)
    state.phases = Counter(record.phase for record in records)
    report = FleetReport(FleetConfig(devices=4), target, "http://x", None, state, None)
    assert report.to_dict()["devices_per_s"] == 0.1  # one device in 10 s, not four


def test_a_fleet_runs_on_uvloop_and_its_devices_still_upgrade(sqlite_platform: Platform) -> None:
    # The simulator's processes are CPU-bound; libuv's loop runs the event loop's share in C.
    # The devices are unchanged: the real upgrader over the SDK's own transport and HTTP.
    uvloop = pytest.importorskip("uvloop")
    admin = sqlite_platform.admin()
    try:
        config = FleetConfig(devices=4, concurrency=4, seed=1, **SMALL)
        target = provision(admin, config)
    finally:
        admin.close()
    loops: set[type[Any]] = set()

    def on_tick(state: FleetState) -> None:
        loops.add(type(asyncio.get_running_loop()))

    fleet = Fleet(config, target, sqlite_platform.url)
    state = fleet.run_until_stopped(on_tick)
    assert loops == {uvloop.Loop}
    assert [record.phase for record in state.devices] == [Phase.SUCCEEDED] * 4
    assert all(record.installed_ok for record in state.devices)

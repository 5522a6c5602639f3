"""Fleets in each dialect with each client profile, against the real platform.

What the clients did is checked in what the server received (the recording platform's
``seen``: request line, headers, small bodies, and the connection each came on), not in the
simulator's own counters; what they ended with is checked in the server's task records (the
agreement check) and in the installed bytes.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pytest

from onenet_ota.device.upgrader import Outcome, UpgradeResult
from onenet_ota.protocol import ranges
from onenet_ota.protocol.codes import Dialect, Operation
from onenet_ota.protocol.dialects import match
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import StatusCode, TaskType
from onenet_ota.sim import FleetConfig, SimulationError, ValueRange, simulate
from onenet_ota.sim.fleet import DeviceRecord, FleetState, Phase
from onenet_ota.sim.profiles import (
    DIALECT_NAMES,
    PROFILE_NAMES,
    PROFILES,
    dialect_of,
    profile_of,
)
from onenet_ota.sim.provision import DeviceView
from onenet_ota.sim.report import FleetReport, check_agreement
from tests.sim.platform import Platform, Seen

PACKAGE = 12 * 1024
SMALL: dict[str, Any] = {
    "package_size": PACKAGE,
    "chunk_size": 8 * 1024,
    "retry_interval": 0.02,
}


def _operation(seen: Seen) -> tuple[Operation, str | None]:
    """What a request did, and the device's name on Studio and fuse (None on classic)."""
    route = match(seen.path)
    assert route is not None, seen.path
    spec = route.by_method[seen.method]
    return spec.operation, route.name


def _by_device(report: FleetReport, seen: list[Seen]) -> dict[int, list[Seen]]:
    """The requests the server received from each of the run's devices, in arrival order."""
    by_name = {record.name: record.dev_id for record in report.state.devices}
    ours = set(by_name.values())
    found: dict[int, list[Seen]] = defaultdict(list)
    for request in seen:
        _, name = _operation(request)
        if name is not None:
            dev_id = by_name.get(name)
        else:
            # Classic names the device in the query; E6 does not (its token does).
            query = dict(part.partition("=")[::2] for part in request.query.split("&") if part)
            dev_id = int(query["dev_id"]) if "dev_id" in query else None
        if dev_id in ours:
            found[dev_id].append(request)
    return found


def _downloads(requests: list[Seen]) -> list[Seen]:
    return [r for r in requests if _operation(r)[0] is Operation.DOWNLOAD]


def _steps(requests: list[Seen]) -> list[int]:
    return [
        json.loads(r.body)["step"]
        for r in requests
        if _operation(r)[0] is Operation.REPORT_STATUS and r.status == 200
    ]


def _classic_tokens(requests: list[Seen]) -> set[str]:
    """The download tokens of a classic device's reports (E7 names its token in the path)."""
    return {
        route.token
        for r in requests
        if (route := match(r.path)) is not None and route.token is not None
    }


def _with_downloads(report: FleetReport, seen: list[Seen]) -> dict[int, list[Seen]]:
    """Every device's requests, classic E6 (which carries no dev_id) included by its token."""
    found = _by_device(report, seen)
    for record in report.state.devices:
        if record.dialect is not Dialect.CLASSIC:
            continue
        tokens = _classic_tokens(found[record.dev_id])
        extra = [
            r
            for r in seen
            if _operation(r)[0] is Operation.DOWNLOAD
            and (route := match(r.path)) is not None
            and route.token in tokens
            and r not in found[record.dev_id]
        ]
        found[record.dev_id] = sorted(found[record.dev_id] + extra, key=seen.index)
    return found


def _range_size(request: Seen) -> int | None:
    value = request.header("Range")
    if value is None:
        return None
    spec = ranges.parse_range(value)
    assert spec is not None, value
    assert spec.first is not None, value
    assert spec.last is not None, value
    return spec.last - spec.first + 1


def _check_profile(record: DeviceRecord, requests: list[Seen]) -> None:
    """The server saw ``record``'s profile's behaviour."""
    profile = PROFILES[record.profile]
    downloads = _downloads(requests)
    assert downloads, record
    peers = [r.peer for r in requests]
    steps = _steps(requests)
    if record.profile == "c-sdk":
        # 4 KiB ranges, a check before each, a new connection for every request, no progress.
        assert [_range_size(r) for r in downloads] == [4096, 4096, PACKAGE - 8192]
        for before, download in itertools.pairwise(requests):
            if download in downloads:
                assert _operation(before)[0] is Operation.CHECK_STATE, record
        assert len(set(peers)) == len(peers), record
        assert all(r.header("Connection") != "close" for r in requests)
        assert steps == [StatusCode.DOWNLOADED, StatusCode.UPGRADED]
    elif record.profile == "at-module":
        chunk = profile.chunk_size(record.index, 0)
        assert 256 <= chunk <= 1024
        assert all(_range_size(r) == chunk for r in downloads[:-1]), record
        assert all(r.header("Connection") == "close" for r in requests), record
        assert len(set(peers)) == len(peers), record
        assert steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 101, 201], record
    elif record.profile == "esp32-stream":
        assert len(downloads) == 1, record
        assert downloads[0].header("Range") is None
        assert downloads[0].status == 200
        assert steps[-2:] == [101, 201]
    else:
        assert all(_range_size(r) == 8 * 1024 for r in downloads[:-1]), record
        assert steps[-2:] == [101, 201]


@pytest.mark.parametrize("dialect", DIALECT_NAMES)
def test_every_profile_in_each_dialect(recording_platform: Platform, dialect: str) -> None:
    platform = recording_platform
    start = len(platform.seen)
    config = FleetConfig(devices=12, concurrency=6, dialect=dialect, profile="mixed", **SMALL)
    report = simulate(config, server=platform.url, admin_token=platform.admin_token)
    assert report.reasons() == []
    assert report.ok
    assert report.agreement is not None
    assert report.agreement.ok
    assert report.agreement.checked == 12
    assert report.outcomes_by("dialect") == {dialect: {"succeeded": 12}}
    assert report.outcomes_by("profile") == {name: {"succeeded": 3} for name in PROFILE_NAMES}
    seen = platform.seen[start:]
    requests = _with_downloads(report, seen)
    for record in report.state.devices:
        assert record.dialect is Dialect(dialect)
        _check_profile(record, requests[record.dev_id])
    # Keep-alive clients share connections: some connection carried several requests.
    default = [
        r.peer for record in report.state.devices for r in requests[record.dev_id]
        if record.profile == "default"
    ]  # fmt: skip
    assert len(set(default)) < len(default)
    data = report.to_dict()
    assert (data["dialect"], data["profile"]) == (dialect, "mixed")
    assert data["by_profile"]["at-module"] == {"succeeded": 3}


def test_mixed_dialects_and_profiles_with_faults(platform: Platform) -> None:
    config = FleetConfig(
        devices=24,
        concurrency=8,
        dialect="mixed",
        profile="mixed",
        drop_rate=0.05,
        power_cut_rate=0.7,  # so that each dialect's 8 devices surely meet some
        seed=11,
        **SMALL,
    )
    report = simulate(config, server=platform.url, admin_token=platform.admin_token)
    # Dropped connections and power cuts are recoverable: every device succeeds all the same.
    assert report.reasons() == []
    assert report.ok
    assert report.install_mismatches == 0
    faults = report.metrics.injected
    assert faults["power-cut"] > 0
    assert faults["refused"] + faults["reset"] + faults["truncated"] > 0
    agreement = report.agreement
    assert agreement is not None
    assert agreement.ok
    assert (agreement.checked, agreement.lost_reports, agreement.duplicated_reports) == (24, 0, 0)
    assert report.outcomes_by("dialect") == {name: {"succeeded": 8} for name in DIALECT_NAMES}
    assert report.outcomes_by("profile") == {name: {"succeeded": 6} for name in PROFILE_NAMES}
    cut = {record.dialect for record in report.state.devices if record.power_cuts}
    assert cut == set(Dialect)  # the power cuts hit every dialect


def test_a_failed_gate_fails_classic_devices_only(sqlite_platform: Platform) -> None:
    """The task's battery threshold reaches classic devices with E3's advisory values (§6.3);
    S-C and F-C send none (§12.2, §13.1), so Studio and fuse devices cannot gate on it."""
    config = FleetConfig(
        devices=6,
        concurrency=6,
        dialect="mixed",
        profile="mixed",
        power=ValueRange(10, 20),
        task_power=50,
        gate_fail=True,
        **SMALL,
    )
    report = simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)
    assert not report.ok
    assert report.failure_codes == {str(int(StatusCode.DOWNLOAD_LOW_BATTERY)): 2}
    assert report.outcomes_by("dialect") == {
        "classic": {"failed": 2},
        "fuse": {"succeeded": 2},
        "studio": {"succeeded": 2},
    }
    assert report.agreement is not None
    assert report.agreement.ok
    assert report.agreement.server_counts["failed"] == 2
    assert report.agreement.server_counts["succeeded"] == 4


def test_mixed_assignment_is_stable_and_covers_every_pairing() -> None:
    pairs = {(dialect_of("mixed", i), profile_of("mixed", i).name) for i in range(12)}
    assert pairs == {(Dialect(d), p) for d in DIALECT_NAMES for p in PROFILE_NAMES}
    assert [dialect_of("mixed", i) for i in range(6)] == [dialect_of("mixed", i) for i in range(6)]
    assert dialect_of("fuse", 5) is Dialect.FUSE
    assert profile_of("c-sdk", 7) is PROFILES["c-sdk"]


@pytest.mark.parametrize(
    ("changes", "flag"), [({"dialect": "mqtt"}, "--dialect"), ({"profile": "esp8266"}, "--profile")]
)
def test_unknown_dialects_and_profiles_are_refused(changes: dict[str, Any], flag: str) -> None:
    with pytest.raises(SimulationError, match=flag):
        FleetConfig(**changes)


def test_disagreements_are_counted_per_dialect_and_profile() -> None:
    def record(dev_id: int, dialect: Dialect, profile: str) -> DeviceRecord:
        return DeviceRecord(
            dev_id,
            dialect=dialect,
            profile=profile,
            phase=Phase.SUCCEEDED,
            result=UpgradeResult(Outcome.SUCCEEDED, TaskType.FOTA),
        )

    records = [
        record(1, Dialect.STUDIO, "at-module"),  # the server says failed
        record(2, Dialect.FUSE, "c-sdk"),  # missing on the server
        record(3, Dialect.STUDIO, "c-sdk"),
    ]
    views = {
        1: DeviceView(TaskState.FAILED, 100, 205),
        3: DeviceView(TaskState.SUCCEEDED, 100, 201),
    }
    agreement = check_agreement(FleetState(records), views)
    assert agreement.disagreeing == {
        "dialect": {"studio": 1, "fuse": 1},
        "profile": {"at-module": 1, "c-sdk": 1},
    }
    assert agreement.to_dict()["disagreeing"]["dialect"] == {"fuse": 1, "studio": 1}

"""The upgrade flow (sans-IO) against an in-memory platform that runs the spec's state tables,
and the sync/async drivers over real clients (MockTransport for their error paths).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onenet_ota.device import (
    AsyncOtaClient,
    Credentials,
    DeviceConfig,
    OtaClient,
    OtaEvent,
    PackageDownloaded,
)
from onenet_ota.device._flow import (
    CheckTask,
    CheckToken,
    Download,
    Finished,
    GatePolicy,
    Install,
    Operation,
    Outcome,
    PostVersion,
    Progress,
    Report,
    Reported,
    Restarted,
    Retrying,
    TokenCheck,
    UpgradeOptions,
    UpgradeResult,
    Verified,
    Waiting,
)
from onenet_ota.device.errors import (
    AuthFailed,
    DownloadError,
    HTTPStatusError,
    InvalidOperation,
    PlatformInternalError,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from onenet_ota.device.install import FileInstaller, InstallError
from onenet_ota.device.retry import Retry
from onenet_ota.device.state import StateStore, open_for_update
from onenet_ota.device.upgrader import AsyncUpgrader, Upgrader
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.states import Action, TaskState
from onenet_ota.protocol.status import StatusCode, TaskType
from tests.device.fake_platform import FakePlatform, Harness, package_bytes

SIZE = 10_000
FAST = Retry(interval=1, jitter=0, pause_poll=5, pause_limit=60)


@pytest.fixture
def package() -> bytes:
    return package_bytes(SIZE)


def harness(tmp_path: Path, platform: FakePlatform, **options: Any) -> Harness:
    options.setdefault("chunk_size", 4096)
    options.setdefault("retry", FAST)
    return Harness(
        platform=platform,
        state_dir=tmp_path / "state",
        output=tmp_path / "firmware.bin",
        options=UpgradeOptions(**options),
    )


def timeout(endpoint: Endpoint = Endpoint.DOWNLOAD) -> RequestTimeout:
    return RequestTimeout("timed out after 3000 ms", endpoint=endpoint)


def reset(endpoint: Endpoint = Endpoint.DOWNLOAD) -> TransportError:
    return TransportError("ConnectionResetError: connection reset by peer", endpoint=endpoint)


# -- the happy path ---------------------------------------------------------------------------


def test_full_upgrade_follows_the_c_sdk_order(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.target == "1.0.1"
    assert result.bytes_downloaded == SIZE
    assert result.reports == (101, 201)
    assert h.output.read_bytes() == package
    # §7: E1, E3, (E5, E6) per chunk, 101, 201; then E1 with the new version.
    assert platform.requests == [
        "PostVersion",
        "CheckTask",
        *["CheckToken", "Download"] * 3,
        "Report",
        "Report",
        "PostVersion",
    ]
    assert platform.status_reports == [101, 201]
    assert platform.versions == ["1.0.0", "1.0.1"]
    assert platform.state is TaskState.SUCCEEDED
    assert list((tmp_path / "state").iterdir()) == [tmp_path / "state" / "fota.lock"]
    finished = h.of(Finished)
    assert len(finished) == 1
    assert finished[0].result == result
    assert h.of(Verified) == [Verified(size=SIZE, md5=hashlib.md5(package).hexdigest())]
    assert [e.downloaded for e in h.of(Progress)] == [4096, 8192, SIZE]


def test_progress_is_reported_at_the_configured_granularity(tmp_path: Path) -> None:
    platform = FakePlatform(package_bytes(100_000))
    h = harness(tmp_path, platform, chunk_size=5000, progress_step=25)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    # 0-99 only: 100 would replace 101 (§5.5), and 0 says nothing.
    assert platform.accepted == [25, 50, 75, 101, 201]
    assert result.reports == (25, 50, 75, 101, 201)


def test_token_check_once_per_run(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, token_check=TokenCheck.FIRST_CHUNK, progress_step=0)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert platform.requests.count("CheckToken") == 1
    assert platform.requests.count("Download") == 3


def test_one_byte_last_chunk_asks_for_two_bytes(tmp_path: Path) -> None:
    """§7: the C SDK never fetches the last byte of a 4096k+1 file; we ask for >= 2 (§6.6.1)."""
    platform = FakePlatform(package_bytes(4097))
    h = harness(tmp_path, platform, progress_step=0)
    seen: list[Download] = []
    h.on_op = lambda op, n: seen.append(op) if isinstance(op, Download) else None
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert [(d.start, d.size) for d in seen] == [(0, 4096), (4096, 2)]
    assert h.output.read_bytes() == platform.package


def test_no_task(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, state=TaskState.SUCCEEDED)
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.NO_TASK
    assert result.ok
    assert platform.status_reports == []
    assert not h.output.exists()


# -- integrity -------------------------------------------------------------------------------


def test_md5_mismatch_reports_205_and_installs_nothing(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, served_md5="0" * 32)
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.UPGRADE_MD5_MISMATCH
    assert platform.status_reports == [205]
    assert platform.state is TaskState.FAILED
    assert not h.output.exists()
    assert "Install" not in platform.requests
    assert not any(p.name.endswith(".part") for p in (tmp_path / "state").iterdir())


def test_resumed_download_failing_md5_is_downloaded_once_more(
    tmp_path: Path, package: bytes
) -> None:
    """A power cut may damage bytes below the durable offset: one full retry, then 205."""
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, checkpoint_bytes=4096, progress_step=0)
    assert h.run(kill_after=6) is None  # E1, E3, E5, E6, E5, E6: two chunks on disk
    part = tmp_path / "state" / "fota.part"
    damaged = bytearray(part.read_bytes())
    damaged[100] ^= 0xFF
    part.write_bytes(bytes(damaged))
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert h.output.read_bytes() == package
    assert any("downloading again" in e.reason for e in h.of(Restarted))
    assert platform.status_reports == [101, 201]


# -- overlap: the next request goes out before a chunk is written ----------------------------


class _WriteLog:
    """The partial package's file, noting which requests the platform had seen at each write."""

    def __init__(self, file: BinaryIO, platform: FakePlatform, seen: list[list[str]]) -> None:
        self._file = file
        self._platform = platform
        self._seen = seen

    def write(self, data: bytes) -> int:
        self._seen.append(list(self._platform.requests))
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


@pytest.mark.parametrize(
    ("token_check", "pipeline", "before_writes", "downloads"),
    [
        # E5 before every chunk: the next chunk's E5 precedes the write (pipelined, its E6
        # too: the drivers' tests show that on the wire).
        (TokenCheck.EVERY_CHUNK, False, ["CheckToken", "CheckToken", "Download"], [1, 2, 3]),
        # E5 once (fuse's habit): the next chunk's E6 precedes the write.
        (TokenCheck.FIRST_CHUNK, False, ["Download", "Download", "Download"], [2, 3, 3]),
    ],
)
def test_the_next_request_is_sent_before_a_chunk_is_written(
    tmp_path: Path,
    package: bytes,
    token_check: TokenCheck,
    pipeline: bool,
    before_writes: list[str],
    downloads: list[int],
) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0, token_check=token_check, pipeline=pipeline)
    h.prefetch = True  # the platform answers a prefetch when it is sent, as a server does
    seen: list[list[str]] = []
    h.opener = lambda path: _WriteLog(open_for_update(path), platform, seen)  # type: ignore[assignment,return-value]
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert h.output.read_bytes() == package
    # Each chunk but the last is written once the next chunk's request went out.
    assert [requests[-1] for requests in seen] == before_writes
    assert [requests.count("Download") for requests in seen] == downloads


def test_overlap_keeps_the_requests_and_their_order(tmp_path: Path) -> None:
    """The same requests in the same order with and without overlap, progress reports
    included: a chunk after which a report is due is written before the next check goes out."""
    runs = []
    for prefetch in (False, True):
        platform = FakePlatform(package_bytes(100_000))
        h = harness(tmp_path / str(prefetch), platform, chunk_size=5000, progress_step=25)
        h.prefetch = prefetch
        result = h.run()
        assert result is not None
        assert result.outcome is Outcome.SUCCEEDED, result.reason
        runs.append((platform.requests, platform.accepted))
    assert runs[0] == runs[1]
    assert runs[1][1] == [25, 50, 75, 101, 201]


def test_a_failed_write_after_a_prefetch_reports_and_uses_nothing_prefetched(
    tmp_path: Path, package: bytes
) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    h.prefetch = True
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    h.opener = lambda path: _FullDisk(open_for_update(path), 5000, error)  # type: ignore[assignment,return-value]
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.DOWNLOAD_NO_SPACE
    assert platform.status_reports == [102]
    # The third chunk's check went out before the second chunk's write failed; its answer was
    # dropped unused and the failure reported next.
    assert platform.requests == [
        "PostVersion",
        "CheckTask",
        *["CheckToken", "Download"] * 2,
        "CheckToken",
        "Report",
    ]


def test_checkpoints_run_behind_the_download_and_resume_from_the_last_settled(
    tmp_path: Path, package: bytes
) -> None:
    """A checkpoint's fsync and save run in a worker thread while the next chunk downloads;
    a run interrupted after it resumes from the offset it made durable."""
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, checkpoint_bytes=4096, progress_step=0)
    threads: set[str] = set()
    real_save = StateStore.save

    def save(store: StateStore, state: Any) -> None:
        threads.add(threading.current_thread().name)
        real_save(store, state)

    # Operations 0-5: E1, E3, E5, E6, E5, E6; the kill comes at the third chunk's E5.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StateStore, "save", save)
        assert h.run(kill_after=6, reply_lost=False) is None
    assert "onenet-ota-checkpoint" in threads
    state = StateStore(tmp_path / "state", TaskType.FOTA).load()
    assert state is not None
    assert state.offset == 8192
    assert (tmp_path / "state" / "fota.part").read_bytes()[:8192] == package[:8192]
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.resumed_from == 8192
    assert h.output.read_bytes() == package


def test_a_checkpoint_failing_behind_the_download_is_reported(
    tmp_path: Path, package: bytes
) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, checkpoint_bytes=4096, progress_step=0)
    real_save = StateStore.save

    def save(store: StateStore, state: Any) -> None:
        if threading.current_thread().name == "onenet-ota-checkpoint":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(store, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StateStore, "save", save)
        result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.DOWNLOAD_NO_SPACE
    assert platform.status_reports == [102]


# -- platform answers ---------------------------------------------------------------------------


def test_cancelled_mid_download_stops_without_a_report(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)

    def cancel_after_first_chunk(op: Operation, n: int) -> None:
        if isinstance(op, CheckToken) and platform.requests.count("Download") == 1:
            platform.act(Action.CANCEL)

    h.on_op = cancel_after_first_chunk
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.CANCELLED
    assert result.code is None
    assert platform.status_reports == []
    assert not h.output.exists()
    assert not (tmp_path / "state" / "fota.json").exists()
    assert not (tmp_path / "state" / "fota.part").exists()


def test_finished_elsewhere_stops_cleanly(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)
    h.on_op = lambda op, n: (
        platform.act(Action.DEADLINE)
        if isinstance(op, CheckToken) and "Download" in platform.requests
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FINISHED
    assert platform.status_reports == []
    assert not (tmp_path / "state" / "fota.json").exists()


def test_token_expiry_mid_download_runs_e3_again(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    h.on_op = lambda op, n: (
        platform.expire_token()
        if isinstance(op, CheckToken)
        and platform.requests.count("Download") == 1
        and len(platform.tokens) == 1
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert len(platform.tokens) == 2
    assert platform.requests.count("CheckTask") == 2
    assert h.output.read_bytes() == package
    assert result.bytes_downloaded == SIZE  # nothing downloaded twice
    assert h.slept == []  # expiry is not a failure


def test_byte_3_from_download_refreshes_the_token(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, token_check=TokenCheck.FIRST_CHUNK, progress_step=0)
    h.on_op = lambda op, n: (
        platform.expire_token()
        if isinstance(op, Download) and op.start == 4096 and len(platform.tokens) == 1
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert len(platform.tokens) == 2
    assert h.output.read_bytes() == package


def test_a_changed_package_restarts_the_download(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    new_package = package_bytes(12_345, seed=99)
    h = harness(tmp_path, platform, progress_step=0)

    def swap(op: Operation, n: int) -> None:
        if (
            isinstance(op, CheckToken)
            and platform.requests.count("Download") == 2
            and platform.package is package
        ):
            platform.replace_package(new_package)
            platform.expire_token()

    h.on_op = swap
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert h.output.read_bytes() == new_package
    assert [e.reason for e in h.of(Restarted)] == ["the task's package changed"]


def test_paused_task_waits_without_using_the_retry_budget(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, retry=1)  # a single failure would end the upgrade
    h = harness(tmp_path, platform, progress_step=0)
    pauses = 0

    def pause_then_resume(op: Operation, n: int) -> None:
        nonlocal pauses
        if isinstance(op, CheckToken) and platform.requests.count("Download") == 1:
            if platform.state is TaskState.DOWNLOADING and pauses == 0:
                platform.act(Action.PAUSE)
            elif platform.state is TaskState.PAUSED:
                pauses += 1
                if pauses == 3:
                    platform.act(Action.RESUME)

    h.on_op = pause_then_resume
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert [w.wait for w in h.of(Waiting)] == [5, 5, 5]
    assert h.of(Retrying) == []


def test_pause_longer_than_the_limit_defers_and_keeps_the_state(
    tmp_path: Path, package: bytes
) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, checkpoint_bytes=4096, progress_step=0)
    h.on_op = lambda op, n: (
        platform.act(Action.PAUSE)
        if isinstance(op, CheckToken)
        and platform.requests.count("Download") == 1
        and platform.state is TaskState.DOWNLOADING
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.DEFERRED
    assert "paused" in result.reason
    assert sum(h.slept) == 60  # the pause limit
    assert platform.status_reports == []
    state = StateStore(tmp_path / "state", TaskType.FOTA).load()
    assert state is not None
    assert state.offset == 4096
    # Resumed later: the next run continues from the durable offset.
    platform.act(Action.RESUME)
    h.on_op = None
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert result.resumed_from == 4096
    assert result.bytes_downloaded == SIZE - 4096
    assert h.output.read_bytes() == package


def test_paused_before_the_run_waits_for_resume(tmp_path: Path, package: bytes) -> None:
    """E3 hides a paused task (D12); the stored token's E5 answers 17, so the run waits."""
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    assert h.run(kill_after=4) is None  # one chunk downloaded
    platform.act(Action.PAUSE)
    h.on_op = lambda op, n: (
        platform.act(Action.RESUME)
        if len(h.slept) == 2 and platform.state is TaskState.PAUSED
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert len(h.of(Waiting)) == 2


# -- retries ------------------------------------------------------------------------------------


def test_transient_failures_are_retried_with_backoff(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, retry=3, interval=2)
    platform.faults[Download] = [timeout(), reset()]
    platform.faults[CheckTask] = [PlatformInternalError(7, "internal error")]
    h = harness(tmp_path, platform, progress_step=0)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    # E3 before the task is known: the defaults (1 s); then the task's interval, doubled.
    assert h.slept == [1, 2, 4]
    assert [r.step for r in h.of(Retrying)] == ["check task", "download", "download"]


def test_timeouts_until_the_budget_ends_report_104_once(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, retry=3)
    platform.faults[Download] = [timeout() for _ in range(3)]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.DOWNLOAD_TIMEOUT
    assert platform.status_reports == [104]
    assert platform.requests.count("Download") == 3  # "at most retry attempts in total" (§7)
    assert not (tmp_path / "state" / "fota.json").exists()


def test_resets_until_the_budget_ends_report_107(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, retry=2)
    platform.faults[Download] = [reset(), ProtocolError("short read")]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.DOWNLOAD_OTHER
    assert platform.status_reports == [107]


def test_a_refusal_that_cannot_succeed_is_not_retried(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    platform.faults[Download] = [
        DownloadError(DownloadErrorCode.NOT_FOUND, endpoint=Endpoint.DOWNLOAD)
    ]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.DOWNLOAD_OTHER
    assert platform.requests.count("Download") == 1
    assert h.slept == []


def test_http_404_is_a_configuration_error(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    platform.faults[PostVersion] = [HTTPStatusError(404, endpoint=Endpoint.POST_VERSION)]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is None
    assert "server URL" in result.reason
    assert h.slept == []


def test_auth_failure_is_a_configuration_error(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    platform.faults[CheckTask] = [AuthFailed(1, "auth failed", endpoint=Endpoint.CHECK_TASK)]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert "access key" in result.reason
    assert platform.status_reports == []


def test_unreachable_platform_gives_up(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    platform.faults[PostVersion] = [reset(Endpoint.POST_VERSION) for _ in range(10)]
    h = harness(tmp_path, platform)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert "cannot reach the platform" in result.reason
    assert len(h.slept) == FAST.attempts - 1


def test_failure_report_that_cannot_be_sent_is_sent_by_the_next_run(
    tmp_path: Path, package: bytes
) -> None:
    platform = FakePlatform(package, retry=2)
    platform.faults[Download] = [timeout(), timeout()]
    platform.faults[Report] = [reset(Endpoint.REPORT_PROGRESS)] * 2
    h = harness(tmp_path, platform, retry=Retry(attempts=2, interval=1, jitter=0))
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.DOWNLOAD_TIMEOUT
    assert "sent again on the next run" in result.reason
    assert platform.status_reports == []
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.DOWNLOAD_TIMEOUT
    assert platform.status_reports == [104]
    assert "Download" not in platform.requests[-3:]
    assert not (tmp_path / "state" / "fota.json").exists()


# -- gate, deadline, local failures --------------------------------------------------------------


def test_gate_defers_without_a_report_by_default(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, signal=10, power=20)
    h = harness(tmp_path, platform, signal_probe=lambda: 5, power_probe=lambda: 90)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.DEFERRED
    assert result.reason == "signal 5 is not above the task's threshold 10"
    assert platform.status_reports == []
    assert "Download" not in platform.requests


@pytest.mark.parametrize(
    ("signal", "power", "code"),
    [(5, 90, StatusCode.DOWNLOAD_WEAK_SIGNAL), (50, 20, StatusCode.DOWNLOAD_LOW_BATTERY)],
)
def test_gate_may_fail_the_task(
    tmp_path: Path, package: bytes, signal: int, power: int, code: StatusCode
) -> None:
    platform = FakePlatform(package, signal=10, power=20)
    h = harness(
        tmp_path,
        platform,
        signal_probe=lambda: signal,
        power_probe=lambda: power,
        gate=GatePolicy.FAIL,
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is code
    assert platform.status_reports == [int(code)]


def test_gate_thresholds_of_zero_mean_none(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)  # signal = power = 0: the unset default (§4.5)
    h = harness(tmp_path, platform, signal_probe=lambda: -90, power_probe=lambda: 0)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED


def test_battery_checked_again_before_install(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, power=20)
    readings = iter([80, 10, 10])
    h = harness(tmp_path, platform, power_probe=lambda: next(readings), gate=GatePolicy.FAIL)
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.UPGRADE_LOW_BATTERY
    assert platform.status_reports == [101, 202]
    assert not h.output.exists()


def test_failing_probe_defers(tmp_path: Path, package: bytes) -> None:
    def broken() -> int:
        raise RuntimeError("no modem")

    platform = FakePlatform(package, signal=10)
    h = harness(tmp_path, platform, signal_probe=broken)
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.DEFERRED
    assert "no modem" in result.reason


def test_upgrade_past_max_duration_reports_208(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, max_duration=100)

    def slow(op: Operation, n: int) -> None:
        if isinstance(op, Download):
            h.now += 60

    h.on_op = slow
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.UPGRADE_EXPIRED
    assert platform.status_reports == [208]


class _FullDisk:
    def __init__(self, file: BinaryIO, room: int, error: BaseException) -> None:
        self._file = file
        self._room = room
        self._error = error

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise self._error
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), StatusCode.DOWNLOAD_NO_SPACE),
        (MemoryError(), StatusCode.DOWNLOAD_NO_MEMORY),
        (OSError(errno.EIO, os.strerror(errno.EIO)), StatusCode.DOWNLOAD_OTHER),
    ],
)
def test_local_write_failures_map_to_their_codes(
    tmp_path: Path, package: bytes, error: BaseException, code: StatusCode
) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)
    h.opener = lambda path: _FullDisk(open_for_update(path), 5000, error)  # type: ignore[assignment,return-value]
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is code
    assert platform.status_reports == [int(code)]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InstallError("flash write failed"), StatusCode.UPGRADE_OTHER),
        (
            InstallError("package says 1.0.0", StatusCode.UPGRADE_VERSION_MISMATCH),
            StatusCode.UPGRADE_VERSION_MISMATCH,
        ),
        (MemoryError(), StatusCode.UPGRADE_NO_MEMORY),
        (RuntimeError("bug in the installer"), StatusCode.UPGRADE_OTHER),
    ],
)
def test_installer_failures_are_reported(
    tmp_path: Path, package: bytes, error: BaseException, code: StatusCode
) -> None:
    class Failing:
        def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
            raise error

    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    h.installer = Failing()
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.code is code
    assert platform.status_reports == [101, int(code)]


# -- restarts -----------------------------------------------------------------------------------


def test_restart_after_101_was_accepted_but_not_recorded(tmp_path: Path, package: bytes) -> None:
    """The reply to 101 was lost: the repeat meets 21, and E4 shows the task is upgrading."""
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    # Operations 0-7: E1, E3, 3x (E5, E6); operation 8, 101, reaches the platform.
    assert h.run(kill_after=8, reply_lost=True) is None
    assert platform.status_reports == [101]
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert platform.status_reports == [101, 201]
    assert "Tasking" in platform.requests
    assert h.output.read_bytes() == package


def test_restart_after_201_was_accepted_but_not_recorded(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0, report_version=False)
    # Operations 0-9: E1, E3, 3x (E5, E6), 101, install; operation 10, 201, reaches it.
    assert h.run(kill_after=10, reply_lost=True) is None
    assert platform.status_reports == [101, 201]
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert result.reason == "201 was already recorded"
    assert platform.status_reports == [101, 201]
    assert "PostVersion" not in platform.requests[-1:]  # no E1/E3 before completing


def test_201_refused_with_21_completes_by_reporting_the_version(
    tmp_path: Path, package: bytes
) -> None:
    """Paused after 101 is impossible (T2), but a platform may still refuse: E1 completes (T6)."""
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    h.on_op = lambda op, n: (
        platform.faults.setdefault(Report, []).append(InvalidOperation(21, "invalid operation"))
        if isinstance(op, Install)
        else None
    )
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert "errno 21" in result.reason
    assert platform.state is TaskState.SUCCEEDED  # via E1 with the target (T6)


def test_state_of_another_package_is_discarded(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, progress_step=0)
    assert h.run(kill_after=4) is None
    platform.replace_package(package_bytes(SIZE, seed=3))
    platform.expire_token()
    result = h.run()
    assert result is not None
    assert result.outcome is Outcome.SUCCEEDED
    assert result.resumed_from == 0
    assert h.output.read_bytes() == platform.package


def test_endless_token_expiry_ends_with_107(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)
    h.on_op = lambda op, n: platform.expire_token() if isinstance(op, CheckToken) else None
    result = h.run()
    assert result is not None
    assert result.code is StatusCode.DOWNLOAD_OTHER
    assert "renewed 4 times" in result.reason
    assert platform.status_reports == [107]


def test_a_second_upgrader_on_the_same_state_is_refused(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)
    with StateStore(tmp_path / "state", TaskType.FOTA).lock():
        result = h.run()
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert "another upgrader" in result.reason
    assert platform.requests == []


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kills=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=12),
    damage=st.booleans(),
)
def test_killed_at_any_point_ends_installed_with_one_success(
    tmp_path_factory: pytest.TempPathFactory,
    kills: list[tuple[int, bool]],
    damage: bool,
) -> None:
    """The state machine under crashes: kill after any operation (its reply lost or not), with
    unsynced bytes of the partial package garbled as a power cut may; restart; repeat. The end
    is always one installed, identical package and one accepted 201, and 101 never precedes a
    verified package."""
    tmp_path = tmp_path_factory.mktemp("crash")
    package = package_bytes(20_000, seed=5)
    platform = FakePlatform(package)
    h = harness(tmp_path, platform, chunk_size=3000, checkpoint_bytes=6000, progress_step=20)
    part = tmp_path / "state" / "fota.part"

    def check_101(op: Operation, n: int) -> None:
        if isinstance(op, Report) and op.code == 101:
            assert hashlib.md5(part.read_bytes()).hexdigest() == platform.md5

    h.on_op = check_101
    for kill_after, reply_lost in kills:
        h.ops = 0
        if h.run(kill_after=kill_after, reply_lost=reply_lost) is not None:
            break
        if damage and part.exists():
            state = json.loads((tmp_path / "state" / "fota.json").read_text())
            data = bytearray(part.read_bytes())
            for i in range(state["offset"], len(data)):  # never synced: anything goes
                data[i] ^= 0x5A
            part.write_bytes(bytes(data))
    result = h.run()
    assert result is not None
    if platform.state is TaskState.SUCCEEDED:
        assert result.outcome in (Outcome.SUCCEEDED, Outcome.NO_TASK)
    assert h.output.read_bytes() == package
    assert platform.status_reports.count(201) == 1
    assert platform.status_reports.count(101) == 1
    assert set(platform.status_reports) == {101, 201}
    assert platform.state is TaskState.SUCCEEDED


# -- the drivers over real clients ----------------------------------------------------------------


def _reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx2.Response:
    # The client reads replies with iter_raw(); a Response built with content= is already
    # read (httpx's behaviour), so the body goes in as a stream.
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    return httpx2.Response(status, headers=headers, stream=httpx2.ByteStream(body))


def _mock_platform(platform: FakePlatform) -> httpx2.MockTransport:
    """Serves FakePlatform over HTTP through MockTransport, as the real device API would."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path

        def envelope(call: Any) -> httpx2.Response:
            try:
                value = call()
            except Exception as exc:
                errno_value = getattr(exc, "errno", None)
                if errno_value is None:
                    raise
                return _reply(200, json.dumps({"errno": errno_value, "error": "x"}).encode())
            body: dict[str, Any] = {"errno": 0, "error": "succ"}
            if isinstance(value, TaskInfo):
                body["data"] = value.to_data()
            return _reply(200, json.dumps(body).encode())

        if path == "/ota/device/version":
            return envelope(
                lambda: platform.perform(PostVersion(json.loads(request.content).get("f_version")))
            )
        if path == "/ota/south/check":
            return envelope(lambda: platform.perform(CheckTask()))
        if path.endswith("/check"):
            token = path.split("/")[-2]
            return envelope(lambda: platform.perform(CheckToken(token)))
        if path.endswith("/progress"):
            token = path.split("/")[-2]
            step = json.loads(request.content)["step"]
            return envelope(lambda: platform.perform(Report(token, step)))
        token = path.split("/")[-1]
        first, _, last = request.headers["Range"].partition("-")
        start = int(first)
        chunk = platform.perform(Download(token, start, int(last) - start + 1))
        content_range = f"bytes {chunk.start}-{chunk.end}/{chunk.total}"
        return _reply(206, chunk.data, {"Content-Range": content_range})

    return httpx2.MockTransport(handler)


def _config() -> DeviceConfig:
    return DeviceConfig(
        credentials=Credentials.from_access_key(
            "123123", "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
        ),
        dev_id="987654321",
        version="1.0.0",
    )


def test_sync_upgrader_drives_a_client(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    events: list[Any] = []
    slept: list[float] = []
    with (
        httpx2.Client(transport=_mock_platform(platform)) as http,
        OtaClient(_config(), base_url="http://ota.test", http_client=http) as client,
    ):
        result = Upgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(chunk_size=4096, retry=FAST),
            on_event=events.append,
            sleep=slept.append,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert (tmp_path / "fw.bin").read_bytes() == package
    assert isinstance(events[-1], Finished)
    assert platform.versions == ["1.0.0", "1.0.1"]


def test_a_client_closed_mid_download_fails_the_run_instead_of_crashing_it(
    tmp_path: Path, package: bytes
) -> None:
    # The next chunk's check cannot be sent ahead on a closed client: the flow meets the error
    # where it judges errors (107, whose report fails too), not at the prefetch.
    platform = FakePlatform(package)
    with httpx2.Client(transport=_mock_platform(platform)) as http:
        client: OtaClient

        def close_after_a_chunk(event: OtaEvent) -> None:
            if isinstance(event, PackageDownloaded):
                client.close()

        client = OtaClient(
            _config(), base_url="http://ota.test", http_client=http, on_event=close_after_a_chunk
        )
        result = Upgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(chunk_size=4096, retry=FAST, progress_step=0),
        ).run()
    assert result.outcome is Outcome.FAILED
    assert "closed" in result.reason
    assert platform.requests.count("Download") == 1
    assert not (tmp_path / "fw.bin").exists()


def test_sync_upgrader_retries_a_timeout_then_reports_104(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package, retry=2)
    inner = _mock_platform(platform)

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.headers.get("Range"):
            raise httpx2.ReadTimeout("timed out", request=request)
        return inner.handle_request(request)

    slept: list[float] = []
    with (
        httpx2.Client(transport=httpx2.MockTransport(handler)) as http,
        OtaClient(_config(), base_url="http://ota.test", http_client=http) as client,
    ):
        result = Upgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(retry=FAST),
            sleep=slept.append,
        ).run()
    assert result.code is StatusCode.DOWNLOAD_TIMEOUT
    assert platform.status_reports == [104]
    assert slept == [1]
    assert not (tmp_path / "fw.bin").exists()


@pytest.mark.anyio
async def test_async_upgrader_drives_a_client(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    transport = _mock_platform(platform)
    timeouts = 1

    async def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal timeouts
        if request.headers.get("Range") and timeouts:
            timeouts -= 1
            raise httpx2.ReadTimeout("timed out", request=request)
        return transport.handle_request(request)

    async with (
        httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as http,
        AsyncOtaClient(_config(), base_url="http://ota.test", http_client=http) as client,
    ):
        result = await AsyncUpgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(chunk_size=3000, retry=FAST),
            sleep=sleep,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert (tmp_path / "fw.bin").read_bytes() == package
    assert slept == [1]


@pytest.mark.anyio
async def test_async_upgrader_awaits_an_async_installer(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    installed: list[Path] = []

    class AsyncInstaller:
        async def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
            installed.append(package)

    async with (
        httpx2.AsyncClient(transport=_async(_mock_platform(platform))) as http,
        AsyncOtaClient(_config(), base_url="http://ota.test", http_client=http) as client,
    ):
        result = await AsyncUpgrader(
            client,
            AsyncInstaller(),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(retry=FAST),
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert installed == [tmp_path / "state" / "fota.part"]
    assert platform.status_reports == [101, 201]


def _async(transport: httpx2.MockTransport) -> httpx2.MockTransport:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        return transport.handle_request(request)

    return httpx2.MockTransport(handler)


def test_upgrader_refuses_the_wrong_client_flavour(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="AsyncOtaClient"):
        Upgrader(
            AsyncOtaClient(_config()),  # type: ignore[arg-type]
            FileInstaller(tmp_path / "x"),
            state_dir=tmp_path,
        )

    class AsyncInstaller:
        async def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
            pass

    with OtaClient(_config()) as client, pytest.raises(TypeError, match="AsyncUpgrader"):
        Upgrader(client, AsyncInstaller(), state_dir=tmp_path)  # type: ignore[arg-type]


def test_events_serialise_to_json(tmp_path: Path, package: bytes) -> None:
    platform = FakePlatform(package)
    h = harness(tmp_path, platform)
    h.run()
    for event in h.events:
        json.dumps(event.to_dict())
    assert h.events[-1].to_dict()["event"] == "result"
    assert h.events[-1].to_dict()["outcome"] == "succeeded"
    assert any(isinstance(e, Reported) for e in h.events)


# -- logging and the package's exports -----------------------------------------------------------

ACCESS_KEY = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="


def _logged_run(
    tmp_path: Path, platform: FakePlatform, handler: Callable[[httpx2.Request], httpx2.Response]
) -> UpgradeResult:
    with (
        httpx2.Client(transport=httpx2.MockTransport(handler)) as http,
        OtaClient(_config(), base_url="http://ota.test", http_client=http) as client,
    ):
        return Upgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(chunk_size=4096, retry=FAST),
            sleep=lambda seconds: None,
        ).run()


def _check_no_secrets(caplog: pytest.LogCaptureFixture, platform: FakePlatform) -> None:
    assert platform.tokens
    for record in caplog.records:
        text = record.getMessage()
        assert not any(token in text for token in platform.tokens), text
        assert ACCESS_KEY not in text
        assert "sign=" not in text


def test_the_upgrader_logs_retries_and_outcomes(
    tmp_path: Path, package: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    platform = FakePlatform(package, retry=3)
    inner = _mock_platform(platform)
    failures = iter([True, False])

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.headers.get("Range") and next(failures, False):
            # A library message that quotes the URL, download token included.
            raise httpx2.ConnectError(f"cannot connect for {request.url}", request=request)
        return inner.handle_request(request)

    caplog.set_level(logging.DEBUG, "onenet_ota.device")
    result = _logged_run(tmp_path, platform, handler)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    logged = [
        (r.name, r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "onenet_ota.device.upgrader" and r.levelno >= logging.INFO
    ]
    retry = "download failed (1 of 3 attempts), retrying in 1.0 s: E6 download package: "
    assert [(level, text.startswith(retry)) for _, level, text in logged if "retrying" in text] == [
        (logging.WARNING, True)
    ]
    assert "***" in next(text for _, _, text in logged if "retrying" in text)
    texts = [text for _, _, text in logged]
    assert "reported 101 downloaded (package downloaded)" in texts
    assert "reported 201 upgraded (upgrade succeeded)" in texts
    assert texts[-1] == "FOTA upgrade succeeded"
    _check_no_secrets(caplog, platform)


def test_a_failed_upgrade_is_logged_as_an_error(
    tmp_path: Path, package: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    platform = FakePlatform(package, retry=2)
    inner = _mock_platform(platform)

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.headers.get("Range"):
            raise httpx2.ReadTimeout("timed out", request=request)
        return inner.handle_request(request)

    caplog.set_level(logging.INFO, "onenet_ota.device")
    result = _logged_run(tmp_path, platform, handler)
    assert result.code is StatusCode.DOWNLOAD_TIMEOUT
    last = caplog.records[-1]
    assert (last.name, last.levelno) == ("onenet_ota.device.upgrader", logging.ERROR)
    assert last.getMessage().startswith(
        "FOTA upgrade failed, reported 104 download timeout "
        "(download failed: request timed out): download: "
    )
    _check_no_secrets(caplog, platform)


def test_the_package_exports_the_upgrader() -> None:
    import onenet_ota.device as sdk

    # What the README's and docs/upgrader.md's examples import from the package itself.
    exported = {
        "Upgrader": Upgrader, "AsyncUpgrader": AsyncUpgrader, "Outcome": Outcome,
        "FileInstaller": FileInstaller, "UpgradeOptions": UpgradeOptions,
        "UpgradeResult": UpgradeResult, "InstallError": InstallError, "Retry": Retry,
    }  # fmt: skip
    assert {name: getattr(sdk, name, None) for name in exported} == exported
    assert set(exported) <= set(sdk.__all__)
    assert all(hasattr(sdk, name) for name in sdk.__all__)
    # A library stays silent unless the application configures logging.
    handlers = logging.getLogger("onenet_ota.device").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)

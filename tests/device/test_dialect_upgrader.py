"""Upgrader and AsyncUpgrader on Studio and fuse (§13.7), over real loopback HTTP against
:class:`DialectPlatform` (the protocol core's state tables, codes and framing)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from onenet_ota.device import (
    AsyncOtaClient,
    Credentials,
    DeviceConfig,
    Dialect,
    OtaClient,
    OtaEvent,
    PackageDownloaded,
    TaskType,
)
from onenet_ota.device.retry import Retry
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    FileInstaller,
    Outcome,
    Restarted,
    UpgradeEvent,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
    Waiting,
)
from onenet_ota.protocol.codes import DownloadVerdict, Operation
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import StatusCode
from tests.device.conftest import K1
from tests.device.dialect_platform import DialectPlatform
from tests.device.fake_platform import package_bytes
from tests.device.scripted_server import (
    Action,
    RecordedRequest,
    Reply,
    ScriptedServer,
    envelope,
    fuse_envelope,
    raw_response,
)

pytestmark = pytest.mark.anyio

FAST = Retry(interval=1, jitter=0, pause_poll=5, pause_limit=60)
SIZE = 10_000
CHUNK = 1024
CHUNKS = -(-SIZE // CHUNK)


class PowerCut(Exception):
    """Raised from the client's event callback: the run ends as itself, like a power loss."""


def config_for(dialect: Dialect, version: str = "1.0.0") -> DeviceConfig:
    return DeviceConfig(
        credentials=Credentials.for_dialect(dialect, "123123", K1, device_name="dev01"),
        dev_id=None,
        version=version,
        type=TaskType.FOTA,
        dialect=dialect,
        product_id="123123",
        device_name="dev01",
    )


@pytest.fixture(params=[Dialect.STUDIO, Dialect.FUSE], ids=lambda d: d.value)
def platform(request: pytest.FixtureRequest, server: ScriptedServer) -> DialectPlatform:
    dialect: Dialect = request.param
    found = DialectPlatform(
        dialect,
        package_bytes(SIZE),
        Credentials.for_dialect(dialect, "123123", K1, device_name="dev01").authorization,
    )
    server.handler = found
    return found


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


class Run:
    """One upgrader run of the test's flavour against the server."""

    def __init__(self, flavour: str, server: ScriptedServer, tmp_path: Path) -> None:
        self.flavour = flavour
        self.server = server
        self.target = tmp_path / "fw.bin"
        self.state_dir = tmp_path / "state"
        self.events: list[UpgradeEvent] = []
        self.client_events: list[OtaEvent] = []

    async def __call__(
        self,
        dialect: Dialect,
        *,
        version: str = "1.0.0",
        cut_after_chunks: int | None = None,
        **options: Any,
    ) -> UpgradeResult:
        chunks = 0

        def on_client_event(event: OtaEvent) -> None:
            nonlocal chunks
            self.client_events.append(event)
            if isinstance(event, PackageDownloaded):
                chunks += 1
                if cut_after_chunks is not None and chunks > cut_after_chunks:
                    raise PowerCut

        options.setdefault("chunk_size", CHUNK)
        options.setdefault("checkpoint_bytes", CHUNK)
        options.setdefault("retry", FAST)
        opts = UpgradeOptions(**options)
        config = config_for(dialect, version)
        installer = FileInstaller(self.target)
        if self.flavour == "sync":
            with OtaClient(config, base_url=self.server.url, on_event=on_client_event) as client:
                return Upgrader(
                    client,
                    installer,
                    state_dir=self.state_dir,
                    options=opts,
                    on_event=self.events.append,
                    sleep=lambda seconds: None,
                ).run()

        async def no_sleep(seconds: float) -> None:
            return None

        async with AsyncOtaClient(
            config, base_url=self.server.url, on_event=on_client_event
        ) as aclient:
            return await AsyncUpgrader(
                aclient,
                installer,
                state_dir=self.state_dir,
                options=opts,
                on_event=self.events.append,
                sleep=no_sleep,
            ).run()


@pytest.fixture
def run(flavour: str, server: ScriptedServer, tmp_path: Path) -> Run:
    return Run(flavour, server, tmp_path)


def checks(platform: DialectPlatform) -> int:
    return platform.operations().count(Operation.CHECK_STATE)


async def test_success(platform: DialectPlatform, run: Run) -> None:
    result = await run(platform.dialect)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert run.target.read_bytes() == platform.package
    assert platform.reports == [101, 201]
    assert platform.state is TaskState.SUCCEEDED
    if platform.dialect is Dialect.STUDIO:  # §13.7: S-T before every chunk
        assert checks(platform) == CHUNKS
    else:  # §13.7: F-T at the start and before each report (101, 201), not per chunk
        assert checks(platform) == 3
    assert not run.state_dir.joinpath("fota.json").exists()


def _kinds(server: ScriptedServer) -> list[tuple[str, bool]]:
    """Each request as ("check" | "download" | ..., whether it was pipelined)."""
    return [(r.path.rsplit("/", 1)[-1], r.queued) for r in server.requests]


async def test_pipelined_checks_and_chunks(
    platform: DialectPlatform, run: Run, server: ScriptedServer
) -> None:
    """``pipeline``: a status check (S-T; F-T) and the chunk after it go out together, on one
    connection, and the platform's record is that of a run without pipelining."""
    result = await run(platform.dialect, pipeline=True)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert run.target.read_bytes() == platform.package
    assert platform.reports == [101, 201]
    assert platform.state is TaskState.SUCCEEDED
    kinds = _kinds(server)
    after_check = [kinds[i] for i in range(1, len(kinds)) if kinds[i - 1][0] == "check"]
    pairs = [queued for kind, queued in after_check if kind == "download"]
    # Studio checks before every chunk, fuse before the first only (§13.7); each such chunk
    # was written behind its check, before the check's reply.
    assert pairs == [True] * (CHUNKS if platform.dialect is Dialect.STUDIO else 1)
    assert server.connections == 1
    downloaded = [e for e in run.client_events if isinstance(e, PackageDownloaded)]
    assert len(downloaded) == CHUNKS


async def test_pipelining_against_a_server_that_closes_after_each_reply(
    platform: DialectPlatform, run: Run, server: ScriptedServer
) -> None:
    """A server that answers one request per connection drops the chunk pipelined behind a
    check: it is asked again on a new connection, once, and never delivered twice."""

    def one_per_connection(request: RecordedRequest) -> Action:
        action = platform(request)
        return replace(action, close=True) if isinstance(action, Reply) else action

    server.handler = one_per_connection
    result = await run(platform.dialect, pipeline=True)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.bytes_downloaded == SIZE
    assert run.target.read_bytes() == platform.package
    assert platform.reports == [101, 201]
    assert platform.operations().count(Operation.DOWNLOAD) == CHUNKS
    downloaded = [e for e in run.client_events if isinstance(e, PackageDownloaded)]
    assert [(e.chunk.start, e.chunk.end) for e in downloaded] == [
        (start, min(start + CHUNK, SIZE) - 1) for start in range(0, SIZE, CHUNK)
    ]
    if platform.dialect is Dialect.STUDIO:  # still a check before every chunk
        kinds = [kind for kind, _ in _kinds(server)]
        assert all(kinds[i - 1] == "check" for i, k in enumerate(kinds) if k == "download")


async def test_resume_after_a_power_cut(platform: DialectPlatform, run: Run) -> None:
    with pytest.raises(PowerCut):
        await run(platform.dialect, cut_after_chunks=4)
    assert platform.reports == []
    result = await run(platform.dialect)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.resumed_from >= 3 * CHUNK
    assert result.bytes_downloaded <= SIZE - 3 * CHUNK
    assert run.target.read_bytes() == platform.package
    assert platform.reports == [101, 201]


async def test_a_state_of_another_dialect_is_not_resumed(
    platform: DialectPlatform, run: Run, server: ScriptedServer
) -> None:
    other = Dialect.FUSE if platform.dialect is Dialect.STUDIO else Dialect.STUDIO
    first = DialectPlatform(
        other,
        platform.package,
        Credentials.for_dialect(other, "123123", K1, device_name="dev01").authorization,
    )
    server.handler = first
    with pytest.raises(PowerCut):
        await run(other, cut_after_chunks=4)
    server.handler = platform
    result = await run(platform.dialect)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.resumed_from == 0
    assert result.bytes_downloaded == SIZE
    assert any(isinstance(e, Restarted) and other.value in e.reason for e in run.events), run.events


async def test_a_state_of_another_tid_is_not_resumed(platform: DialectPlatform, run: Run) -> None:
    with pytest.raises(PowerCut):
        await run(platform.dialect, cut_after_chunks=4)
    platform.tid = 4343  # the operator replaced the task: same package, another device task
    result = await run(platform.dialect)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.bytes_downloaded == SIZE
    assert any(isinstance(e, Restarted) and "tid" in e.reason for e in run.events)
    assert platform.reports == [101, 201]


async def test_a_corrupt_package_is_never_installed(platform: DialectPlatform, run: Run) -> None:
    corrupt = bytearray(platform.package)
    corrupt[5000] ^= 0xFF
    platform.served = bytes(corrupt)
    result = await run(platform.dialect)
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.UPGRADE_MD5_MISMATCH
    assert not run.target.exists()
    assert platform.reports == [205]  # exactly one terminal report


def _json_refusal(platform: DialectPlatform, code: int) -> Action:
    return fuse_envelope(code) if platform.dialect is Dialect.FUSE else envelope(code)


@pytest.mark.parametrize(("code", "outcome"), [(20, Outcome.FINISHED), (22, Outcome.CANCELLED)])
async def test_a_terminal_status_answer_stops_without_a_report(
    platform: DialectPlatform, run: Run, code: int, outcome: Outcome
) -> None:
    platform.fault(Operation.CHECK_STATE, _json_refusal(platform, code))
    result = await run(platform.dialect)
    assert result.outcome is outcome
    assert platform.reports == []
    assert Operation.REPORT_STATUS not in platform.operations()
    assert not run.target.exists()


@pytest.mark.parametrize(("code", "outcome"), [(20, Outcome.FINISHED), (22, Outcome.CANCELLED)])
async def test_a_terminal_answer_to_101_stops_without_a_failure_report(
    platform: DialectPlatform, run: Run, code: int, outcome: Outcome
) -> None:
    platform.fault(Operation.REPORT_STATUS, _json_refusal(platform, code))
    result = await run(platform.dialect)
    assert result.outcome is outcome
    assert platform.operations().count(Operation.REPORT_STATUS) == 1
    assert not run.target.exists()


async def test_fuse_12013_ends_as_no_task(server: ScriptedServer, run: Run) -> None:
    platform = DialectPlatform(
        Dialect.FUSE,
        package_bytes(SIZE),
        Credentials.for_dialect(Dialect.FUSE, "123123", K1, device_name="dev01").authorization,
        state=TaskState.SUCCEEDED,
    )
    server.handler = platform
    result = await run(Dialect.FUSE, version="1.0.1")
    assert result.outcome is Outcome.NO_TASK
    assert "already runs" in result.reason
    assert platform.log[-1] == (Operation.CHECK_TASK, 12013)
    assert platform.reports == []


@pytest.mark.parametrize(
    ("ended", "outcome"),
    [
        (TaskState.CANCELLED, Outcome.CANCELLED),
        (TaskState.FAILED, Outcome.FINISHED),
        (TaskState.SUCCEEDED, Outcome.FINISHED),
    ],
)
async def test_ota_errno_5_then_a_terminal_status_stops_without_a_report(
    platform: DialectPlatform, run: Run, ended: TaskState, outcome: Outcome
) -> None:
    def end_then_refuse(found: DialectPlatform) -> Action:
        found.state = ended
        return found.download_error(DownloadVerdict.NOT_DOWNLOADABLE)

    platform.fault(Operation.DOWNLOAD, end_then_refuse)
    result = await run(platform.dialect)
    assert result.outcome is outcome, result.reason
    assert Operation.REPORT_STATUS not in platform.operations()
    assert platform.log[-1][0] is Operation.CHECK_STATE  # the status check came after the 5
    assert not run.target.exists()


async def test_ota_errno_5_with_an_active_task_waits_and_goes_on(
    platform: DialectPlatform, run: Run
) -> None:
    def refuse(found: DialectPlatform) -> Action:
        return found.download_error(DownloadVerdict.NOT_DOWNLOADABLE)

    platform.fault(Operation.DOWNLOAD, refuse)
    result = await run(platform.dialect)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert any(isinstance(e, Waiting) for e in run.events)
    assert platform.reports == [101, 201]


async def test_fuse_checks_the_task_after_a_failed_chunk(server: ScriptedServer, run: Run) -> None:
    platform = DialectPlatform(
        Dialect.FUSE,
        package_bytes(SIZE),
        Credentials.for_dialect(Dialect.FUSE, "123123", K1, device_name="dev01").authorization,
    )
    server.handler = platform
    platform.fault(Operation.DOWNLOAD, Reply(raw_response(500, b"")))  # retryable (5xx)
    result = await run(Dialect.FUSE)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    ops = platform.operations()
    failed = ops.index(Operation.DOWNLOAD)
    assert ops[failed + 1] is Operation.CHECK_STATE
    assert ops[failed + 2] is Operation.DOWNLOAD
    assert checks(platform) == 4  # start, after the failed chunk, before 101, before 201

"""The upgrader against the project's own platform when its surroundings misbehave: an
``on_event`` callback that raises, a run cancelled or interrupted mid-download, and the CLI
printing into a pipe whose reader went away.

The verdict is always the server's: the device task ends ``succeeded`` with one 201, and nothing
a callback or an interruption did is reported to the platform as the device's failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from onenet_ota.device import AsyncOtaClient, OtaClient, OtaEvent, PackageDownloaded
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    FileInstaller,
    Finished,
    Outcome,
    Progress,
    UpgradeEvent,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
)
from onenet_ota.server.http import Request, Response
from tests.integration.conftest import CURRENT, Platform, World
from tests.integration.test_upgrade_e2e import OPTIONS, unique_package
from tests.serverthread import ServerThread

PACKAGE_SIZE = 100_000  # seven chunks of OPTIONS.chunk_size
# A checkpoint only at the end: whatever a resumed run skips, the interrupted run's close kept.
NO_CHECKPOINT = UpgradeOptions(
    chunk_size=OPTIONS.chunk_size, retry=OPTIONS.retry, checkpoint_bytes=10 * PACKAGE_SIZE
)
UPGRADER_LOG = "onenet_ota.device.upgrader"

pytestmark = pytest.mark.parametrize("platform", ["sqlite"], indirect=True)


def terminal_history(platform: Platform, world: World) -> list[tuple[str, int | None]]:
    """The device's task history on the server: one entry per device task, with its result."""
    return [(t["state"], t["result_code"]) for t in platform.device(world)["tasks"]]


def status_reports(result: UpgradeResult) -> list[int]:
    """The status codes (not progress values) the platform acknowledged in a run."""
    return [code for code in result.reports if code > 100]


def run_sync(
    platform: Platform,
    world: World,
    tmp_path: Path,
    *,
    options: UpgradeOptions = OPTIONS,
    on_event: Callable[[UpgradeEvent], None] | None = None,
    on_client_event: Callable[[OtaEvent], None] | None = None,
    base_url: str | None = None,
) -> UpgradeResult:
    url = platform.api.url if base_url is None else base_url
    with OtaClient(
        world.config(), base_url=url, timeout=10_000, on_event=on_client_event
    ) as client:
        return Upgrader(
            client,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=options,
            on_event=on_event,
            sleep=lambda seconds: None,
        ).run()


async def run_async(
    platform: Platform,
    world: World,
    tmp_path: Path,
    *,
    options: UpgradeOptions = OPTIONS,
    on_event: Callable[[UpgradeEvent], None] | None = None,
) -> UpgradeResult:
    async def no_sleep(seconds: float) -> None:
        pass

    async with AsyncOtaClient(world.config(), base_url=platform.api.url, timeout=10_000) as ota:
        return await AsyncUpgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=options,
            on_event=on_event,
            sleep=no_sleep,
        ).run()


# -- a callback that raises -----------------------------------------------------------------------

ERRORS: list[Callable[[], Exception]] = [
    lambda: BrokenPipeError(32, "Broken pipe"),  # `onenet-ota device upgrade --json | head`
    lambda: OSError(28, "No space left on device"),  # a full log disk
    lambda: RuntimeError("a bug in the application's callback"),
]


# The events of a clean run, by name; None: raise at every one of them.
EVENTS = [None, "task", "progress", "verified", "report", "installed", "result"]


class Raising:
    """An ``on_event`` that records every event and raises a fresh error at those named ``at``."""

    def __init__(self, make: Callable[[], Exception], at: str | None) -> None:
        self.make = make
        self.at = at
        self.seen: list[UpgradeEvent] = []
        self.raised = 0

    def __call__(self, event: UpgradeEvent) -> None:
        self.seen.append(event)
        if self.at is None or event.name == self.at:
            self.raised += 1
            raise self.make()


def check_unharmed(
    platform: Platform,
    world: World,
    tmp_path: Path,
    result: UpgradeResult,
    callback: Raising,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert status_reports(result) == [101, 201]
    assert (tmp_path / "fw.bin").read_bytes() == world.data
    assert platform.state(world) == "succeeded"
    assert terminal_history(platform, world) == [("succeeded", 201)]
    # Every event reached the callback, the last one included.
    assert isinstance(callback.seen[-1], Finished)
    assert callback.raised > 0
    # Logged once per kind of error, then only counted.
    kind = type(callback.make()).__qualname__
    logged = [r for r in caplog.records if r.name == UPGRADER_LOG and "on_event raised" in r.msg]
    assert logged[0].levelno == logging.WARNING
    assert kind in logged[0].getMessage()
    if callback.raised == 1:
        assert len(logged) == 1
    else:
        assert len(logged) == 2
        assert f"on_event raised {kind} {callback.raised} times" in logged[1].getMessage()


ERROR_IDS = ["BrokenPipeError", "OSError", "RuntimeError"]
EVENT_IDS = ["every-event", *EVENTS[1:]]


@pytest.mark.parametrize("at", EVENTS, ids=EVENT_IDS)
@pytest.mark.parametrize("make", ERRORS, ids=ERROR_IDS)
def test_a_raising_callback_does_not_fail_a_sync_upgrade(
    platform: Platform,
    tmp_path: Path,
    make: Callable[[], Exception],
    at: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    callback = Raising(make, at)
    caplog.set_level(logging.WARNING, UPGRADER_LOG)
    result = run_sync(platform, world, tmp_path, on_event=callback)
    check_unharmed(platform, world, tmp_path, result, callback, caplog)


@pytest.mark.anyio
@pytest.mark.parametrize("at", EVENTS, ids=EVENT_IDS)
@pytest.mark.parametrize("make", ERRORS, ids=ERROR_IDS)
async def test_a_raising_callback_does_not_fail_an_async_upgrade(
    platform: Platform,
    tmp_path: Path,
    make: Callable[[], Exception],
    at: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    callback = Raising(make, at)
    caplog.set_level(logging.WARNING, UPGRADER_LOG)
    result = await run_async(platform, world, tmp_path, on_event=callback)
    check_unharmed(platform, world, tmp_path, result, callback, caplog)


def test_an_oserror_from_the_client_callback_is_not_reported_as_the_devices_failure(
    platform: Platform, tmp_path: Path
) -> None:
    """The client's own callback runs inside its calls; what it raises reaches the caller of
    run() unchanged (as the client's documentation says), and nothing is reported for it: it
    used to look like a local disk failure and fail the task with 107."""
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    chunks: list[int] = []

    def print_into_a_closed_pipe(event: OtaEvent) -> None:
        if isinstance(event, PackageDownloaded):
            chunks.append(event.chunk.start)
            if len(chunks) == 2:
                raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_sync(platform, world, tmp_path, on_client_event=print_into_a_closed_pipe)
    assert platform.device_task(world)["state"] == "downloading"
    assert platform.device_task(world)["result_code"] is None
    result = run_sync(platform, world, tmp_path)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert status_reports(result) == [101, 201]
    assert (tmp_path / "fw.bin").read_bytes() == world.data
    assert terminal_history(platform, world) == [("succeeded", 201)]


# -- cancelled and interrupted runs ---------------------------------------------------------------


def check_resumed(platform: Platform, world: World, tmp_path: Path, result: UpgradeResult) -> None:
    """A second run after the interruption: resumes where the first stopped, one 201."""
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.resumed_from > 0  # the closed run kept its bytes (no checkpoint had run)
    assert result.bytes_downloaded == PACKAGE_SIZE - result.resumed_from
    assert status_reports(result) == [101, 201]
    assert (tmp_path / "fw.bin").read_bytes() == world.data
    assert terminal_history(platform, world) == [("succeeded", 201)]


@pytest.mark.anyio
async def test_a_cancelled_async_run_releases_its_state(platform: Platform, tmp_path: Path) -> None:
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    progress: list[int] = []
    errors: list[BaseException] = []  # keeps the cancellation, as an application's log may

    async with anyio.create_task_group() as group:

        def cancel_mid_download(event: UpgradeEvent) -> None:
            if isinstance(event, Progress):
                progress.append(event.downloaded)
                if len(progress) == 2:
                    group.cancel_scope.cancel()

        async def first_run() -> None:
            try:
                await run_async(
                    platform, world, tmp_path, options=NO_CHECKPOINT, on_event=cancel_mid_download
                )
            except anyio.get_cancelled_exc_class() as exc:
                errors.append(exc)
                raise
            pytest.fail("the run was not cancelled")

        group.start_soon(first_run)
    assert len(errors) == 1
    assert progress == [OPTIONS.chunk_size, 2 * OPTIONS.chunk_size]
    assert platform.state(world) == "downloading"  # nothing was reported for the cancellation
    result = await run_async(platform, world, tmp_path)
    check_resumed(platform, world, tmp_path, result)
    assert result.resumed_from == 2 * OPTIONS.chunk_size


def test_keyboard_interrupt_from_a_client_callback_releases_the_state(
    platform: Platform, tmp_path: Path
) -> None:
    """KeyboardInterrupt is not an Exception: it still stops the run (here from the client's
    callback, which runs in the driver, outside the flow), and the next run resumes."""
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    chunks: list[int] = []

    def interrupt_on_third_chunk(event: OtaEvent) -> None:
        if isinstance(event, PackageDownloaded):
            chunks.append(event.chunk.start)
            if len(chunks) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as interrupted:
        run_sync(
            platform,
            world,
            tmp_path,
            options=NO_CHECKPOINT,
            on_client_event=interrupt_on_third_chunk,
        )
    assert interrupted.value is not None  # held, as a caller's handler holds it
    assert platform.state(world) == "downloading"
    result = run_sync(platform, world, tmp_path)
    check_resumed(platform, world, tmp_path, result)
    assert result.resumed_from == 2 * OPTIONS.chunk_size  # the third chunk never arrived whole


def test_keyboard_interrupt_from_the_upgrader_callback_stops_the_run(
    platform: Platform, tmp_path: Path
) -> None:
    """on_event's Exceptions are ignored, but KeyboardInterrupt still ends the run."""
    world = platform.world(data=unique_package(PACKAGE_SIZE))

    def interrupt(event: UpgradeEvent) -> None:
        if isinstance(event, Progress) and event.downloaded == 3 * OPTIONS.chunk_size:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sync(platform, world, tmp_path, options=NO_CHECKPOINT, on_event=interrupt)
    assert platform.state(world) == "downloading"
    result = run_sync(platform, world, tmp_path)
    check_resumed(platform, world, tmp_path, result)


def test_sigint_mid_download_releases_the_state(platform: Platform, tmp_path: Path) -> None:
    """A real SIGINT, sent by the platform while the upgrader waits for a download reply."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT is handled in the main thread only")
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    main = threading.main_thread().ident
    assert main is not None
    served = platform.recorder("interrupting")
    downloads = 0

    async def interrupt_third_download(request: Request) -> Response:
        nonlocal downloads
        if request.path.startswith("/ota/south/download/"):
            downloads += 1
            if downloads == 3:
                # The device is blocked on this reply: the signal lands inside its E6 call.
                signal.pthread_kill(main, signal.SIGINT)
        return await served(request)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with (
            ServerThread(interrupt_third_download) as server,
            pytest.raises(KeyboardInterrupt) as interrupted,
        ):
            run_sync(platform, world, tmp_path, options=NO_CHECKPOINT, base_url=server.url)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.value is not None  # held, as a caller's handler holds it
    assert downloads == 3
    assert platform.state(world) == "downloading"
    result = run_sync(platform, world, tmp_path)
    check_resumed(platform, world, tmp_path, result)


# -- the CLI into a closed pipe -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["--json"], []], ids=["json", "text"])
def test_cli_output_into_a_reader_that_closes_early(
    platform: Platform, tmp_path: Path, mode: list[str]
) -> None:
    """``onenet-ota device upgrade --json | head -n 1``: the upgrade goes on and succeeds."""
    world = platform.world(data=unique_package(PACKAGE_SIZE))
    served = platform.recorder("gated")
    reader_gone = threading.Event()

    async def downloads_after_the_reader_left(request: Request) -> Response:
        # Everything after the first line is printed into the closed pipe, for certain.
        if request.path.startswith("/ota/south/download/"):
            await asyncio.to_thread(reader_gone.wait, 60)
        return await served(request)

    env = {k: v for k, v in os.environ.items() if not k.startswith("ONENET_OTA_")}
    env["ONENET_OTA_ACCESS_KEY"] = world.access_key
    read, write = os.pipe()
    with ServerThread(downloads_after_the_reader_left) as server:
        command = [
            sys.executable,
            *("-m", "onenet_ota.cli.main", "device", "upgrade"),
            *("--server", server.url, "--dev-id", str(world.dev_id)),
            *("--product-id", world.pid, "--version", CURRENT),
            *("--state-dir", str(tmp_path / "state"), "--output", str(tmp_path / "fw.bin")),
            *("--chunk-size", "4k", "--progress-step", "5", "--retry-interval", "0.01"),
            *mode,
        ]
        with subprocess.Popen(
            command, env=env, stdout=write, stderr=subprocess.PIPE, text=True
        ) as process:
            os.close(write)
            with os.fdopen(read, "rb") as reader:
                first = reader.readline()  # `head -n 1`, then the reader goes away
            reader_gone.set()
            _, stderr = process.communicate(timeout=120)
    assert first.startswith(b'{"event":"task"' if mode else b"task: upgrade to"), (first, stderr)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr
    assert (tmp_path / "fw.bin").read_bytes() == world.data
    assert terminal_history(platform, world) == [("succeeded", 201)]

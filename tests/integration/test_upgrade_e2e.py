"""The whole upgrade against the project's own platform on loopback, end to end.

Setup and verdicts go through the management API (``platform`` from this folder's conftest): the
server's record of the task is what counts, not what the device believed. Covered: full FOTA
(sync) and SOTA (async) upgrades; the upgrader process SIGKILLed at 20+ random points and
restarted each time; a corrupt package (205, nothing installed); a task cancelled mid-download;
the download token expiring mid-download (the platform's injected clock); a full disk (102).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from onenet_ota.device import AsyncOtaClient, OtaClient, TaskType
from onenet_ota.device.install import FileInstaller
from onenet_ota.device.retry import Retry
from onenet_ota.device.state import open_for_update
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    Outcome,
    Progress,
    UpgradeEvent,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
)
from onenet_ota.protocol import values
from onenet_ota.protocol.status import StatusCode
from tests.integration.conftest import CURRENT, TARGET, Platform, World
from tests.tmpfs import small_tmpfs

PACKAGE_SIZE = 300_000
# Fast retries: the platform is on loopback, and the tests must never wait for real.
OPTIONS = UpgradeOptions(chunk_size=16 * 1024, retry=Retry(interval=0.01, jitter=0))


def unique_package(size: int = PACKAGE_SIZE) -> bytes:
    """Bytes no other test uploads: blobs are content-addressed, and some tests damage theirs."""
    return random.Random(os.urandom(16)).randbytes(size)


def client(platform: Platform, world: World, **config: Any) -> OtaClient:
    return OtaClient(world.config(**config), base_url=platform.api.url, timeout=10_000)


def run_upgrade(
    platform: Platform,
    world: World,
    tmp_path: Path,
    *,
    options: UpgradeOptions = OPTIONS,
    on_event: Any = None,
    **kwargs: Any,
) -> UpgradeResult:
    with client(platform, world) as ota:
        return Upgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=options,
            on_event=on_event,
            sleep=lambda seconds: None,
            **kwargs,
        ).run()


def server_record(platform: Platform, world: World) -> tuple[str, int | None]:
    row = platform.device_task(world)
    return row["state"], row["result_code"]


# -- full upgrades --------------------------------------------------------------------------------


# Each chunk's E5 and E6 one after the other, or pipelined on one connection (the project's
# server pipelines); the platform must see the same requests in the same order either way.
PIPELINE = pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])


@PIPELINE
def test_full_fota_upgrade(platform: Platform, tmp_path: Path, pipeline: bool) -> None:
    data = unique_package()
    world = platform.world(data=data)
    watch = platform.watch()
    result = run_upgrade(platform, world, tmp_path, options=replace(OPTIONS, pipeline=pipeline))
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.target == TARGET
    assert result.bytes_downloaded == len(data)
    assert (tmp_path / "fw.bin").read_bytes() == data
    assert server_record(platform, world) == ("succeeded", 201)
    assert platform.device(world)["f_version"] == TARGET
    # §7's order: E1, E3, then E5 before every E6, then E7s, then E1 with the new version.
    paths = [(r.method, r.path.rsplit("/", 1)[-1]) for r in watch.requests]
    chunks = -(-len(data) // OPTIONS.chunk_size)
    assert paths[:2] == [("POST", "version"), ("GET", "check")]
    downloads = [i for i, (m, last) in enumerate(paths) if last.startswith("ota_")]
    assert len(downloads) == chunks
    assert all(paths[i - 1] == ("GET", "check") for i in downloads)
    assert paths[-1] == ("POST", "version")
    assert not (tmp_path / "state" / "fota.json").exists()


@pytest.mark.anyio
@PIPELINE
async def test_full_sota_upgrade_async(platform: Platform, tmp_path: Path, pipeline: bool) -> None:
    data = unique_package(123_457)
    world = platform.world(data=data, module_type="sota")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    config = world.config(type=TaskType.SOTA)
    async with AsyncOtaClient(config, base_url=platform.api.url, timeout=10_000) as ota:
        result = await AsyncUpgrader(
            ota,
            FileInstaller(tmp_path / "app.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(chunk_size=4096, retry=OPTIONS.retry, pipeline=pipeline),
            sleep=sleep,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert (tmp_path / "app.bin").read_bytes() == data
    assert server_record(platform, world) == ("succeeded", 201)
    device = platform.device(world)
    assert device["s_version"] == TARGET
    assert device["f_version"] is None
    assert slept == []


# -- SIGKILL at random points ---------------------------------------------------------------------


def _cli_env(world: World) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONENET_OTA_")}
    env["ONENET_OTA_ACCESS_KEY"] = world.access_key
    return env


@pytest.mark.parametrize("platform", ["sqlite"], indirect=True)
def test_sigkill_at_random_points_then_one_success(platform: Platform, tmp_path: Path) -> None:
    """Kill the upgrader process (the CLI) with SIGKILL at random points, restart it, repeat.

    20 kills land during the download, each after a random number of the run's events plus a
    random delay (so also between events: mid-chunk, mid-checkpoint); then more land after the
    package was verified (around 101, install, 201). The end: an installed file identical to
    the package, one success on the server, nothing left behind.
    """
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    data = unique_package(1024 * 1024)
    world = platform.world(data=data)
    output = tmp_path / "fw.bin"
    command = [
        sys.executable,
        "-m",
        "onenet_ota.cli.main",
        "device",
        "upgrade",
        *("--server", platform.api.url, "--dev-id", str(world.dev_id)),
        *("--product-id", world.pid, "--version", CURRENT),
        *("--state-dir", str(tmp_path / "state"), "--output", str(output)),
        *("--chunk-size", "4k", "--checkpoint", "16k", "--progress-step", "5"),
        *("--retry-interval", "0.01", "--json"),
    ]
    env = _cli_env(world)
    kills: list[str] = []
    final: dict[str, Any] | None = None
    for _ in range(100):  # a bound, so that a bug cannot loop forever
        downloading = sum(k.startswith("downloading") for k in kills) < 20
        # During the download: after 2-8 events. Afterwards: 0-3 events after the package is
        # known to be verified (its "verified" event, or a run that starts past the download).
        count = rng.randint(2, 8) if downloading else None
        extra = rng.randint(0, 3)
        events: list[dict[str, Any]] = []
        armed_at: int | None = None
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                event = json.loads(line)
                events.append(event)
                if armed_at is None and (
                    event["event"] == "verified"
                    or (event["event"] == "task" and event["phase"] != "downloading")
                ):
                    armed_at = len(events)
                due = (
                    len(events) == count
                    if count is not None
                    else armed_at is not None and len(events) == armed_at + extra
                )
                if due:
                    time.sleep(rng.uniform(0, 0.003))
                    if process.poll() is None:
                        process.send_signal(signal.SIGKILL)
                        phase = "downloading" if count is not None else "verified"
                        kills.append(f"{phase}: after {event}")
                    break
            _, stderr = process.communicate(timeout=60)
        if process.returncode != -signal.SIGKILL:
            assert process.returncode == 0, (seed, stderr, events)
            final = events[-1]
            break
    assert final is not None, (seed, kills)
    assert sum(k.startswith("downloading") for k in kills) >= 20, (seed, kills)
    assert any(k.startswith("verified") for k in kills), (seed, kills)
    assert final["event"] == "result", (seed, final)
    assert final["outcome"] in ("succeeded", "no_task"), (seed, final)
    assert output.read_bytes() == data, seed
    assert server_record(platform, world) == ("succeeded", 201)
    history = platform.device(world)["tasks"]
    assert [(t["state"], t["result_code"]) for t in history] == [("succeeded", 201)]
    if final["outcome"] == "succeeded":
        # (After "no_task", the extra run reported the --version it was given, as told.)
        assert platform.device(world)["f_version"] == TARGET
    # Nothing left behind: no state, no partial package, no installer temporaries.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw.bin", "state"]
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["fota.lock"]


# -- failures the platform must hear about ---------------------------------------------------------


@PIPELINE
def test_corrupt_package_reports_205_and_installs_nothing(
    platform: Platform, tmp_path: Path, pipeline: bool
) -> None:
    data = unique_package()
    world = platform.world(data=data)
    # Damage the stored file in place: same size, so the server serves it, but its MD5 is not
    # the one recorded at upload (what E3 announces).
    with platform.blob(world).open("r+b") as blob:
        blob.seek(1234)
        byte = blob.read(1)
        blob.seek(1234)
        blob.write(bytes([byte[0] ^ 0xFF]))
    result = run_upgrade(platform, world, tmp_path, options=replace(OPTIONS, pipeline=pipeline))
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.UPGRADE_MD5_MISMATCH
    statuses = [code for code in result.reports if code > 100]  # progress values aside
    assert statuses == [StatusCode.UPGRADE_MD5_MISMATCH]  # no 101 for a package that failed
    assert server_record(platform, world) == ("failed", 205)
    assert not (tmp_path / "fw.bin").exists()
    assert not (tmp_path / "state" / "fota.part").exists()


@PIPELINE
def test_task_cancelled_mid_download_stops_the_upgrader(
    platform: Platform, tmp_path: Path, pipeline: bool
) -> None:
    data = unique_package()
    world = platform.world(data=data)
    seen: list[int] = []

    def cancel_after_first_chunk(event: UpgradeEvent) -> None:
        if isinstance(event, Progress):
            seen.append(event.downloaded)
            if len(seen) == 1:
                platform.act(world, "cancel")

    result = run_upgrade(
        platform,
        world,
        tmp_path,
        on_event=cancel_after_first_chunk,
        options=replace(OPTIONS, pipeline=pipeline),
    )
    assert result.outcome is Outcome.CANCELLED
    assert result.code is None
    assert result.reports == ()
    # No chunk whose check came after the cancel. The second chunk's check went out before the
    # first chunk was written (overlap): one at a time, the chunk itself follows the cancel and
    # is refused; pipelined, the server may have answered both before the cancel, and the
    # third chunk's check then stops the run.
    chunk = OPTIONS.chunk_size
    assert seen in ([[chunk], [chunk, 2 * chunk]] if pipeline else [[chunk]])
    assert server_record(platform, world) == ("cancelled", None)
    assert not (tmp_path / "fw.bin").exists()
    assert not (tmp_path / "state" / "fota.json").exists()


@PIPELINE
def test_token_expiry_mid_download_recovers(
    platform: Platform, tmp_path: Path, pipeline: bool
) -> None:
    data = unique_package()
    world = platform.world(data=data)
    watch = platform.watch()
    start = platform.clock.now

    def expire_after_first_chunk(event: UpgradeEvent) -> None:
        if isinstance(event, Progress) and event.downloaded == OPTIONS.chunk_size:
            platform.clock.advance(values.TOKEN_LIFETIME_S + 1)  # the 48 h are up (D13)

    try:
        result = run_upgrade(
            platform,
            world,
            tmp_path,
            on_event=expire_after_first_chunk,
            options=replace(OPTIONS, pipeline=pipeline),
        )
    finally:
        platform.clock.now = start
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.bytes_downloaded == len(data)  # resumed under the new token, not restarted
    assert (tmp_path / "fw.bin").read_bytes() == data
    assert server_record(platform, world) == ("succeeded", 201)
    checks = [r for r in watch.requests if r.path == "/ota/south/check"]
    assert len(checks) == 2  # E3 again after errno 12
    tokens = {r.path.split("/")[4] for r in watch.requests if r.path.count("/") >= 4}
    assert len({t for t in tokens if t.startswith("ota_")}) == 2


class _FillsUp:
    """A partial-package file on a disk with ``room`` bytes left."""

    def __init__(self, file: BinaryIO, room: int) -> None:
        self._file = file
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def test_disk_full_reports_102(platform: Platform, tmp_path: Path) -> None:
    data = unique_package()
    world = platform.world(data=data)

    def opener(path: Path) -> BinaryIO:
        return _FillsUp(open_for_update(path), room=100_000)  # type: ignore[return-value]

    result = run_upgrade(platform, world, tmp_path, opener=opener)
    assert result.outcome is Outcome.FAILED
    assert result.code is StatusCode.DOWNLOAD_NO_SPACE
    assert "No space left on device" in result.reason
    assert server_record(platform, world) == ("failed", 102)
    assert not (tmp_path / "fw.bin").exists()


@pytest.mark.parametrize("platform", ["sqlite"], indirect=True)
def test_disk_full_on_a_real_filesystem_reports_102(platform: Platform, tmp_path: Path) -> None:
    """The CLI with its state directory on a 64 KiB tmpfs (root only: skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data = unique_package()
    world = platform.world(data=data)
    with small_tmpfs(tmp_path / "small", "64k") as small:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "onenet_ota.cli.main",
                "device",
                "upgrade",
                *("--server", platform.api.url, "--dev-id", str(world.dev_id)),
                *("--product-id", world.pid, "--version", CURRENT),
                *("--state-dir", str(small / "state"), "--output", str(tmp_path / "fw.bin")),
                "--json",
            ],
            env=_cli_env(world),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert process.returncode == 1, process.stderr
        final = json.loads(process.stdout.splitlines()[-1])
        assert final["code"] == 102
        assert not (small / "state" / "fota.part").exists()  # the space is given back
    assert server_record(platform, world) == ("failed", 102)
    assert not (tmp_path / "fw.bin").exists()

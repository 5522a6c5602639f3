"""The device SDK's upgrader in the Studio and fuse dialects against the project's own platform.

The server's record is what counts (``platform`` from this folder's conftest, on SQLite and
PostgreSQL): the device task ends succeeded with 201 whatever dialect the device speaks (S10,
F14), and the installed file is the package.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import httpx2
import pytest

from onenet_ota.device import (
    AsyncOtaClient,
    AsyncUpgrader,
    Credentials,
    DeviceConfig,
    Dialect,
    FileInstaller,
    OtaClient,
    Outcome,
    Upgrader,
)
from onenet_ota.device.retry import Retry
from onenet_ota.device.upgrader import UpgradeOptions
from tests.integration.conftest import CURRENT, TARGET, Platform, World

OPTIONS = UpgradeOptions(chunk_size=16 * 1024, retry=Retry(interval=0.01, jitter=0))
NEW_DIALECTS = [Dialect.STUDIO, Dialect.FUSE]


def _config(world: World, dialect: Dialect, *, device_level: bool) -> DeviceConfig:
    credentials = Credentials.for_dialect(
        dialect,
        world.pid,
        world.access_key,
        device_name=world.name if device_level else None,
    )
    return DeviceConfig(
        credentials=credentials,
        dev_id=None,
        version=CURRENT,
        dialect=dialect,
        product_id=world.pid,
        device_name=world.name,
    )


def _data() -> bytes:
    return random.Random(os.urandom(16)).randbytes(100_003)  # not a multiple of any chunk size


# Each check and the chunk after it one after the other, or pipelined on one connection (the
# project's server pipelines): the platform's record must be the same.
PIPELINE = pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])


@PIPELINE
@pytest.mark.parametrize("device_level", [True, False], ids=["device-token", "product-token"])
@pytest.mark.parametrize("dialect", NEW_DIALECTS, ids=str)
def test_sync_upgrade_in_each_dialect(
    platform: Platform, tmp_path: Path, dialect: Dialect, device_level: bool, pipeline: bool
) -> None:
    data = _data()
    world = platform.world(data=data)
    config = _config(world, dialect, device_level=device_level)
    watch = platform.watch()
    with OtaClient(config, base_url=platform.api.url, timeout=10_000) as ota:
        result = Upgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=replace(OPTIONS, pipeline=pipeline),
            sleep=lambda seconds: None,
        ).run()
        pipelining = ota._sender.pipelining  # type: ignore[attr-defined]
    assert pipelining  # the project's server never made the client give pipelining up
    # Studio checks before every chunk, fuse before the first (§13.7); no chunk asked twice.
    paths = [r.path.rsplit("/", 1)[-1] for r in watch.requests]
    chunks = -(-len(data) // OPTIONS.chunk_size)
    assert paths.count("download") == chunks
    if dialect is Dialect.STUDIO:
        assert all(paths[i - 1] == "check" for i, p in enumerate(paths) if p == "download")
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.target == TARGET
    assert (tmp_path / "fw.bin").read_bytes() == data
    row = platform.device_task(world)
    assert (row["state"], row["result_code"]) == ("succeeded", 201)
    assert platform.device(world)["f_version"] == TARGET


@pytest.mark.anyio
@PIPELINE
@pytest.mark.parametrize("dialect", NEW_DIALECTS, ids=str)
async def test_async_upgrade_in_each_dialect(
    platform: Platform, tmp_path: Path, dialect: Dialect, pipeline: bool
) -> None:
    data = _data()
    world = platform.world(data=data)

    async def sleep(seconds: float) -> None:
        del seconds

    config = _config(world, dialect, device_level=True)
    async with AsyncOtaClient(config, base_url=platform.api.url, timeout=10_000) as ota:
        result = await AsyncUpgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=replace(OPTIONS, pipeline=pipeline),
            sleep=sleep,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert (tmp_path / "fw.bin").read_bytes() == data
    row = platform.device_task(world)
    assert (row["state"], row["result_code"]) == ("succeeded", 201)


@pytest.mark.parametrize("dialect", NEW_DIALECTS, ids=str)
def test_a_wrong_key_is_refused_and_nothing_changes(
    platform: Platform, tmp_path: Path, dialect: Dialect
) -> None:
    world = platform.world()
    other_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    bad = DeviceConfig(
        credentials=Credentials.for_dialect(dialect, world.pid, other_key, device_name=world.name),
        dev_id=None,
        version=CURRENT,
        dialect=dialect,
        product_id=world.pid,
        device_name=world.name,
    )
    with OtaClient(bad, base_url=platform.api.url, timeout=10_000) as ota:
        result = Upgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=UpgradeOptions(retry=Retry(attempts=1, interval=0.01, jitter=0)),
            sleep=lambda seconds: None,
        ).run()
    assert result.outcome is not Outcome.SUCCEEDED
    assert not (tmp_path / "fw.bin").exists()
    row = platform.device_task(world)
    assert row["state"] == "to_be_upgraded"


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
async def test_progress_100_then_101_is_confirmed_in_each_dialect(
    platform: Platform, tmp_path: Path, dialect: Dialect
) -> None:
    """An AT-command module's habit (§13.1): 100 moves the task to upgrading (§5.5), so the 101
    after it meets errno 21, and the upgrader must confirm the task is upgrading and go on. On
    Studio the confirmation cannot be S-T alone, which answers 17 for upgrading and paused
    alike (S6)."""
    data = _data()
    world = platform.world(data=data)

    async def sleep(seconds: float) -> None:
        del seconds

    config = (
        world.config() if dialect is Dialect.CLASSIC else _config(world, dialect, device_level=True)
    )
    options = UpgradeOptions(
        chunk_size=16 * 1024,
        report_full_progress=True,
        retry=Retry(interval=0.01, jitter=0),
    )
    async with AsyncOtaClient(config, base_url=platform.api.url, timeout=10_000) as ota:
        result = await AsyncUpgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=options,
            sleep=sleep,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.reports[-3:] == (100, 101, 201)
    assert (tmp_path / "fw.bin").read_bytes() == data
    row = platform.device_task(world)
    assert (row["state"], row["result_code"]) == ("succeeded", 201)


class _LoseFirst101Reply(httpx2.AsyncBaseTransport):
    """Real HTTP, except that the reply to the first report of 101 is lost after the server
    processed it (a connection reset): the client's one reconnect sends 101 again (§10)."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport(trust_env=False)
        self.lost = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if not self.lost and request.method == "POST" and b'"step":101' in request.content:
            self.lost += 1
            await response.aread()
            await response.aclose()
            raise httpx2.ReadError("connection reset by peer", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
async def test_a_101_whose_reply_was_lost_is_confirmed_in_each_dialect(
    platform: Platform, tmp_path: Path, dialect: Dialect
) -> None:
    """The repeated 101 meets errno 21 (the task is upgrading already, §5.5); the upgrader
    confirms that and goes on to install, whatever the dialect."""
    data = _data()
    world = platform.world(data=data)

    async def sleep(seconds: float) -> None:
        del seconds

    config = (
        world.config() if dialect is Dialect.CLASSIC else _config(world, dialect, device_level=True)
    )
    transport = _LoseFirst101Reply()
    async with (
        httpx2.AsyncClient(transport=transport, trust_env=False) as http,
        AsyncOtaClient(config, base_url=platform.api.url, timeout=10_000, http_client=http) as ota,
    ):
        result = await AsyncUpgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=OPTIONS,
            sleep=sleep,
        ).run()
    assert transport.lost == 1
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.reports[-2:] == (101, 201)
    row = platform.device_task(world)
    assert (row["state"], row["result_code"]) == ("succeeded", 201)


@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
def test_progress_100_then_101_with_the_sync_upgrader(
    platform: Platform, tmp_path: Path, dialect: Dialect
) -> None:
    """The sync upgrader confirms the 101 after 100 the same way (S-C on Studio)."""
    world = platform.world(data=_data())
    config = (
        world.config() if dialect is Dialect.CLASSIC else _config(world, dialect, device_level=True)
    )
    options = UpgradeOptions(chunk_size=16 * 1024, report_full_progress=True, retry=OPTIONS.retry)
    with OtaClient(config, base_url=platform.api.url, timeout=10_000) as ota:
        result = Upgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=options,
            sleep=lambda seconds: None,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.reports[-3:] == (100, 101, 201)
    row = platform.device_task(world)
    assert (row["state"], row["result_code"]) == ("succeeded", 201)

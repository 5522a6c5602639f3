"""The device SDK against the project's own platform, over real HTTP on loopback.

Every test runs with :class:`OtaClient` and :class:`AsyncOtaClient` (``make_client``) on SQLite
and on PostgreSQL (``platform``). Setup goes through the management API; the outcome is read back
from it too, so a test shows what the server did, not only what the client believed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from onenet_ota.device import (
    AuthFailed,
    ClientClosedError,
    Credentials,
    DownloadedChunk,
    DownloadError,
    DownloadErrorCode,
    EventKind,
    HTTPStatusError,
    InvalidArgumentError,
    InvalidOperation,
    InvalidState,
    ManufModelMismatch,
    NoTask,
    NoValidToken,
    PackageDownloaded,
    PackageKind,
    PlatformInternalError,
    ProtocolError,
    StatusCode,
    StatusReported,
    TaskCancelled,
    TaskChecked,
    TaskFinished,
    TaskInfo,
    TaskType,
    TokenChecked,
    TokenExpired,
    VersionInfo,
    VersionMismatch,
    VersionPosted,
)
from onenet_ota.protocol import values
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.server.http import Limits, make_server_ssl_context
from tests.device.conftest import Driver, MakeClient
from tests.integration.conftest import ADVISORY, CURRENT, TARGET, Platform, Seen, md5, wait_until
from tests.server.seed import FIRMWARE, FIRMWARE_MD5, K2, T0

pytestmark = pytest.mark.anyio

SIZE = len(FIRMWARE)
NEVER_ISSUED = "ota_" + "Z" * 20
SUCC = b'{"errno":0,"error":"succ"}'


async def download_all(client: Driver, task: TaskInfo, chunk: int = 4096) -> bytes:
    """The C SDK's loop (§7): E5, then E6 for the next ``chunk`` bytes, until ``size`` bytes."""
    package = b""
    while len(package) < task.size:
        await client("check_token", task.token)
        package += await client("download_package", task.token, len(package), chunk)
    return package


def endpoints(requests: list[Seen], token: str) -> list[str]:
    """The requests as ``METHOD path``, with the download token shown as ``{token}``."""
    return [f"{r.method} {r.path.replace(token, '{token}')}" for r in requests]


def unique_data(world_hint: str) -> bytes:
    """A package no other world shares: the blob store is content-addressed, and these tests
    remove or change the file on disk."""
    return FIRMWARE[:5000] + world_hint.encode() + os.urandom(16)


# -- every operation, and a whole upgrade -------------------------------------------------------


async def test_full_upgrade_ends_with_the_task_succeeded_and_the_version_updated(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    # Both versions, as the C SDK reports them (§6.1).
    client = make_client(world.config(other_version=CURRENT))
    watch = platform.watch()

    await client("post_version")
    assert await client("query_version") == VersionInfo(CURRENT, CURRENT)
    task = await client("check_task")
    assert values.TOKEN_RE.fullmatch(task.token)  # D13
    assert task == TaskInfo(
        target=TARGET,
        token=task.token,
        size=SIZE,
        md5=FIRMWARE_MD5,
        **ADVISORY,
        kind=PackageKind.FULL,
        ip_port=None,  # cdn=false (D10)
    )
    assert await client("check_task") == task  # the same token while it is valid (D13)
    assert platform.state(world) == "to_be_upgraded"

    package = await download_all(client, task)
    assert package == FIRMWARE
    assert md5(package) == task.md5
    assert platform.state(world) == "downloading"

    await client("report_status", task.token, 50)
    assert platform.device_task(world)["progress"] == 50
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    shown = platform.device_task(world)
    assert (shown["state"], shown["progress"]) == ("upgrading", 100)
    assert await client("tasking") == task  # E4 recovers the running task (§6.4)
    await client("report_status", task.token, StatusCode.UPGRADED)

    shown = platform.device_task(world)
    assert (shown["state"], shown["result_code"]) == ("succeeded", 201)
    # T15: the platform set the device's FOTA version to the target.
    assert await client("query_version") == VersionInfo(TARGET, CURRENT)
    device = platform.device(world)
    assert (device["f_version"], device["s_version"]) == (TARGET, CURRENT)
    assert [t["state"] for t in device["tasks"]] == ["succeeded"]
    assert endpoints(watch.requests, task.token) == [
        "POST /ota/device/version",
        "GET /ota/device/version",
        "GET /ota/south/check",
        "GET /ota/south/check",
        *["GET /ota/south/download/{token}/check", "GET /ota/south/download/{token}"] * 3,
        "POST /ota/south/device/download/{token}/progress",
        "POST /ota/south/device/download/{token}/progress",
        "GET /ota/south/tasking",
        "POST /ota/south/device/download/{token}/progress",
        "GET /ota/device/version",
    ]


async def test_download_range_places_clamped_chunks(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    watch = platform.watch()

    # The C SDK's last chunk runs past EOF; the server keeps the start (§6.6.2, §8.3).
    last = await client("download_range", task.token, 8192, 4096)
    assert last == DownloadedChunk(FIRMWARE[8192:], 8192, SIZE - 1, SIZE, partial=True)
    assert await client("download_package", task.token, 8192, 4096) == FIRMWARE[8192:]
    whole = await client("download_range", task.token, 0, SIZE)
    assert whole == DownloadedChunk(FIRMWARE, 0, SIZE - 1, SIZE, partial=True)
    # A start past EOF is reset to 0 (§6.6.2) and the bytes are placed there (§10) ...
    restarted = await client("download_range", task.token, SIZE, SIZE)
    assert (restarted.start, restarted.end, restarted.data) == (0, SIZE - 1, FIRMWARE)
    # ... which bare bytes cannot say: download_package refuses rather than misplace them.
    with pytest.raises(ProtocolError, match="not from the requested 10000"):
        await client("download_package", task.token, SIZE, SIZE)
    # The restarted range is larger than asked for: refused from its head, body unread.
    with pytest.raises(ProtocolError, match="announced 10000 bytes for a 4096-byte range"):
        await client("download_range", task.token, SIZE, 4096)

    assert [r.header("Range") for r in watch.requests] == [
        "8192-12287",
        "8192-12287",
        "0-9999",
        "10000-19999",
        "10000-19999",
        "10000-14095",
    ]
    # The C SDK's habit, kept: Authorization on E6 too, which the server ignores (D5).
    assert all(r.header("Authorization") == world.credentials.authorization for r in watch.requests)
    assert platform.state(world) == "to_be_upgraded"  # E6 changes no state (§6.6)


async def test_cdn_downloads_from_the_public_address(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config(cdn=True))
    watch = platform.watch()

    task = await client("check_task")
    assert task.ip_port == platform.public_address  # D10
    package = await download_all(client, task)
    assert package == FIRMWARE
    assert (await client("tasking")).ip_port == platform.public_address

    by_listener = [(r.listener, r.path.replace(task.token, "{token}")) for r in watch.requests]
    assert by_listener == [
        ("api", "/ota/south/check"),
        *[("api", "/ota/south/download/{token}/check"), ("cdn", "/ota/south/download/{token}")] * 3,
        ("api", "/ota/south/tasking"),
    ]
    downloads = [r for r in watch.requests if r.listener == "cdn"]
    # The credential stays with the API host: E6 is authenticated by its path token (D5).
    assert all(r.header("Authorization") is None for r in downloads)
    assert {r.header("Host") for r in downloads} == {platform.public_address}


async def test_report_result_and_a_reported_version_complete_the_task(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    assert await download_all(client, task) == FIRMWARE

    await client("report_result", task.token, StatusCode.DOWNLOADED)  # E8, the two-call form
    assert platform.state(world) == "upgrading"
    # After rebooting into the target, E1 completes the task (T6, D16).
    await client("post_version", version=TARGET)
    assert platform.state(world) == "succeeded"
    assert await client("query_version") == VersionInfo(TARGET, None)
    with pytest.raises(TaskFinished) as info:
        await client("report_result", task.token, StatusCode.UPGRADED)
    assert (info.value.code, info.value.endpoint) == (20, Endpoint.REPORT_RESULT)


async def test_dev_info_looks_up_the_dev_id(platform: Platform, make_client: MakeClient) -> None:
    world = platform.world(task=False)
    # A device that knows only its product key and its name looks its dev_id up first (§6.9).
    client = make_client(world.config(dev_id=None))
    for method in ("POST", "GET"):  # D18: both
        assert await client("dev_info", world.name, method=method) == str(world.dev_id)
        with pytest.raises(AuthFailed) as info:
            await client("dev_info", "nobody", method=method)
        assert info.value.endpoint is Endpoint.DEV_INFO
    watch = platform.watch()
    with pytest.raises(InvalidArgumentError, match="dev_id is not configured"):
        await client("check_task")
    assert watch.requests == []


async def test_large_ranges_stream_from_the_package_file(
    platform: Platform, make_client: MakeClient
) -> None:
    # Ranges above 64 KiB leave the server through its sendfile path, not a buffered read.
    data = os.urandom(300_000)
    world = platform.world(data=data)
    client = make_client(world.config())
    task = await client("check_task")
    assert (task.size, task.md5) == (len(data), md5(data))
    assert await download_all(client, task, chunk=128 * 1024) == data
    last = await client("download_range", task.token, 262_144, 128 * 1024)
    assert (last.start, last.end, len(last.data)) == (262_144, 299_999, 37_856)


async def test_device_level_tokens_and_every_signing_method(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(task=False)
    keyed = platform.world(task=False, device={"generate_device_key": True})
    assert keyed.device_key is not None
    accepted = [
        (world, Credentials.from_access_key(world.pid, world.access_key, method=method))
        for method in ("md5", "sha1", "sha256")
    ]
    accepted += [
        # D4: a device without a key of its own signs device-level tokens with the product's.
        (world, Credentials.from_access_key(world.pid, world.access_key, device_name=world.name)),
        (keyed, Credentials.from_access_key(keyed.pid, keyed.device_key, device_name=keyed.name)),
    ]
    for owner, credentials in accepted:
        await make_client(owner.config(credentials=credentials))("post_version")

    refused = [
        # D4: once the device has a key, only that key signs for it.
        (keyed, Credentials.from_access_key(keyed.pid, keyed.access_key, device_name=keyed.name)),
        # A device-level token speaks for the device it names only (P3).
        (world, Credentials.from_access_key(world.pid, world.access_key, device_name=keyed.name)),
        # et is checked against the server's clock (§3.3 step 6).
        (world, Credentials.from_access_key(world.pid, world.access_key, et=T0 - 1)),
    ]
    for owner, credentials in refused:
        with pytest.raises(AuthFailed):
            await make_client(owner.config(credentials=credentials))("check_task")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``server.pem`` (RSA key and chain for 127.0.0.1) and ``ca.pem``; RSA keys are slow to
    make, so once per module."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    cert.private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder


async def test_https_through_the_c_sdk_compatible_tls_listener(
    platform: Platform, make_client: MakeClient, tls_files: Path
) -> None:
    # D25: the listener the platform builds for TLS, which also offers the C SDK's suites.
    context = make_server_ssl_context(tls_files / "server.pem", c_sdk_compatible=True)
    world = platform.world()
    watch = platform.watch()
    with platform.listener("tls", ssl=context) as tls:
        client = make_client(world.config(), base_url=tls.url, ca_file=tls_files / "ca.pem")
        task = await client("check_task")
        await client("check_token", task.token)
        assert await client("download_package", task.token, 0, 4096) == FIRMWARE[:4096]
        await client.close()
    assert [r.listener for r in watch.requests] == ["tls"] * 3
    assert platform.state(world) == "downloading"


async def test_sota_upgrade_sets_the_application_version(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(data=unique_data("sota"), module_type="sota")
    client = make_client(world.config(type=TaskType.SOTA, other_version="M1"))
    with pytest.raises(NoTask):  # the task is of the other type
        await make_client(world.config())("check_task")
    task = await client("check_task")
    assert await download_all(client, task) == world.data
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    await client("report_status", task.token, StatusCode.UPGRADED)
    assert platform.state(world) == "succeeded"
    # T15 for a SOTA task: the application version; the module firmware's stays (§6.1).
    assert await client("query_version") == VersionInfo(CURRENT, TARGET)


async def test_a_task_starts_and_ends_on_the_server_clock(
    platform: Platform, make_client: MakeClient
) -> None:
    now = int(platform.clock.now)
    world = platform.world(start_time=now + 60, deadline=now + 120)
    client = make_client(world.config())
    with pytest.raises(NoTask):  # invisible until start_time (§5.2)
        await client("check_task")
    with platform.clock_advanced(60):
        task = await client("check_task")
        await client("check_token", task.token)
    with platform.clock_advanced(120):  # T5: the deadline fails the open task
        with pytest.raises(TaskFinished):
            await client("check_token", task.token)
        with pytest.raises(DownloadError) as download:
            await client("download_range", task.token, 0, 4096)
        assert download.value.reason is DownloadErrorCode.INVALID_TOKEN
        with pytest.raises(NoTask):
            await client("check_task")
    assert platform.state(world) == "failed"


# -- errno classes -------------------------------------------------------------------------------


async def test_errno_1_for_a_wrong_key_a_foreign_device_and_a_foreign_token(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    other = platform.world()
    stranger = platform.world(own_product=True, task=False)

    wrong_key = Credentials.from_access_key(world.pid, K2)
    client = make_client(world.config(credentials=wrong_key))
    with pytest.raises(AuthFailed) as info:
        await client("post_version")
    assert (info.value.code, info.value.endpoint) == (1, Endpoint.POST_VERSION)
    assert wrong_key.authorization not in str(info.value)
    with pytest.raises(AuthFailed):
        await client("check_task")

    # A valid token of world's product naming a dev_id of another product (P3).
    foreign = make_client(world.config(dev_id=str(stranger.dev_id)))
    for operation in ("check_task", "query_version", "post_version"):
        with pytest.raises(AuthFailed):
            await foreign(operation)
    assert platform.device(stranger)["f_version"] is None  # nothing was recorded

    # E7/E8 with another device's token: unknown to this device (§5.6).
    token = (await make_client(world.config())("check_task")).token
    thief = make_client(other.config())
    with pytest.raises(AuthFailed) as info:
        await thief("report_status", token, StatusCode.DOWNLOADED)
    assert info.value.endpoint is Endpoint.REPORT_PROGRESS
    with pytest.raises(AuthFailed):
        await thief("report_result", token, StatusCode.DOWNLOADED)
    assert platform.state(world) == "to_be_upgraded"


async def test_errno_2_is_refused_before_sending(
    platform: Platform, make_client: MakeClient
) -> None:
    # Every request the client builds is valid, so the server's errno 2 is unreachable: the
    # client refuses such values itself, sends nothing, and stays usable.
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    watch = platform.watch()
    refused: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("report_status", (task.token, 150), {}),  # E7: not 0-100, 101-107 or 201-208
        ("report_status", (task.token, True), {}),  # a bool is not an integer here (§2.4)
        ("report_result", (task.token, 50), {}),  # E8 takes no progress values (D15)
        ("report_result", (task.token, 209), {}),
        ("download_range", (task.token, 0, 1), {}),  # at least 2 bytes (§10)
        ("download_range", (task.token, -1, 4096), {}),
        ("check_token", ("ota_x/check",), {}),  # no path tricks in a token
        ("check_token", ("",), {}),
        ("check_task", (), {"timeout_ms": 0}),
        ("dev_info", ("",), {}),
    ]
    for operation, args, kwargs in refused:
        with pytest.raises(InvalidArgumentError) as info:
            await client(operation, *args, **kwargs)
        assert info.value.code == -2, operation
    assert watch.requests == []
    await client("check_token", task.token)  # nothing was lost
    assert platform.state(world) == "downloading"
    await client.close()
    with pytest.raises(ClientClosedError):
        await client("check_token", task.token)
    assert len(watch.requests) == 1


async def test_errno_2_bad_configuration_is_refused_before_sending(platform: Platform) -> None:
    world = platform.world(task=False)
    watch = platform.watch()
    for changes in ({"dev_id": "0"}, {"dev_id": "12a"}, {"dev_id": str(2**63)}, {"type": 3}):
        with pytest.raises(InvalidArgumentError):
            world.config(**changes)
    assert watch.requests == []


async def test_errno_4_without_a_running_task_or_with_another_devices_token(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    other = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    # E4 reports only downloading/upgrading tasks (D18); this one is still to-be-upgraded.
    with pytest.raises(NoValidToken) as info:
        await client("tasking")
    assert (info.value.code, info.value.endpoint) == (4, Endpoint.TASKING)

    other_client = make_client(other.config())
    with pytest.raises(NoValidToken) as info:
        await other_client("check_token", task.token)
    assert info.value.endpoint is Endpoint.CHECK_TOKEN
    with pytest.raises(NoValidToken):
        await other_client("check_token", NEVER_ISSUED)
    assert platform.state(world) == "to_be_upgraded"


class DatabaseFailure:
    """Makes the platform's next call of one ``DeviceService`` method raise, as a lost database
    would, for exactly one request; the calls after it go through. (``break_db`` in
    tests/server/test_device_api.py breaks a method for the rest of a test.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, platform: Platform) -> None:
        self._monkeypatch = monkeypatch
        self._service = platform.resources.device_api.service
        self.failed: list[str] = []

    def next_call_of(self, name: str) -> None:
        """Arm the failure for the next call of method ``name``."""
        original: Callable[..., Any] = getattr(self._service, name)
        armed = [True]

        def fail_once(*args: Any, **kwargs: Any) -> Any:
            if armed:
                armed.clear()
                self.failed.append(name)
                raise RuntimeError("database is gone")
            return original(*args, **kwargs)

        self._monkeypatch.setattr(self._service, name, fail_once)

    async def errno_7(
        self, name: str, endpoint: Endpoint, client: Driver, operation: str, *args: Any
    ) -> None:
        """``operation`` fails with errno 7 from ``endpoint`` when ``name`` fails once."""
        before = len(self.failed)
        self.next_call_of(name)
        with pytest.raises(PlatformInternalError) as info:
            await client(operation, *args)
        assert (info.value.code, info.value.endpoint) == (7, endpoint)
        assert str(info.value) == f"{endpoint.label}: errno 7: internal error"
        assert self.failed[before:] == [name]  # the request reached the broken call


async def test_errno_7_on_every_json_endpoint_for_a_failed_database_call(
    platform: Platform, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A whole upgrade in which every call first meets a database failure: the SDK raises
    # PlatformInternalError (code 7, the endpoint), the failed request changed nothing on the
    # server, and the same call made again succeeds (what the upgrader's retry relies on).
    # The world has its own product, so that its key is not in the server's cache yet and P1
    # itself reaches the database.
    world = platform.world(own_product=True)
    client = make_client(world.config())
    failure = DatabaseFailure(monkeypatch, platform)

    await failure.errno_7("authenticate", Endpoint.POST_VERSION, client, "post_version")
    await failure.errno_7("report_version", Endpoint.POST_VERSION, client, "post_version")
    assert platform.device(world)["f_version"] is None
    await client("post_version")
    assert platform.device(world)["f_version"] == CURRENT

    await failure.errno_7("query_version", Endpoint.QUERY_VERSION, client, "query_version")
    assert await client("query_version") == VersionInfo(CURRENT, None)

    await failure.errno_7("check_task", Endpoint.CHECK_TASK, client, "check_task")
    assert platform.state(world) == "to_be_upgraded"
    task = await client("check_task")

    await failure.errno_7("check_token", Endpoint.CHECK_TOKEN, client, "check_token", task.token)
    assert platform.state(world) == "to_be_upgraded"  # E5 did not start the download
    await client("check_token", task.token)
    assert platform.state(world) == "downloading"
    assert await download_all(client, task) == world.data

    await failure.errno_7("tasking", Endpoint.TASKING, client, "tasking")
    assert await client("tasking") == task

    downloaded, upgraded = StatusCode.DOWNLOADED, StatusCode.UPGRADED
    await failure.errno_7(
        "report", Endpoint.REPORT_PROGRESS, client, "report_status", task.token, downloaded
    )
    assert platform.state(world) == "downloading"  # the failed 101 was not recorded
    await client("report_status", task.token, downloaded)
    assert platform.state(world) == "upgrading"
    await failure.errno_7(
        "report", Endpoint.REPORT_RESULT, client, "report_result", task.token, upgraded
    )
    assert platform.state(world) == "upgrading"
    await client("report_result", task.token, upgraded)
    assert platform.state(world) == "succeeded"

    lookup = make_client(world.config(dev_id=None))
    await failure.errno_7("dev_info", Endpoint.DEV_INFO, lookup, "dev_info", world.name)
    assert await lookup("dev_info", world.name) == str(world.dev_id)


# Errno 24 (E8 without an integer result) is not tested here: the SDK cannot send such a body.
# report_result takes an int and refuses anything outside 101-107/201-208 before sending (see
# test_errno_2_is_refused_before_sending); the server's own tests cover errno 24.


@pytest.mark.parametrize(
    ("device_codes", "fails"),
    [
        ({"manuf": "001", "model": "00108"}, False),
        ({}, False),  # the C SDK sends neither (D11)
        ({"manuf": "001", "model": "00109"}, True),
        ({"manuf": "1", "model": "108"}, True),  # codes are strings: "001" != "1" (D11)
    ],
)
async def test_errno_8_manuf_model_mismatch_fails_the_task(
    platform: Platform, make_client: MakeClient, device_codes: dict[str, str], fails: bool
) -> None:
    world = platform.world(package={"manuf": "001", "model": "00108"})
    client = make_client(world.config(**device_codes))
    if not fails:
        assert (await client("check_task")).target == TARGET
        assert platform.state(world) == "to_be_upgraded"
        return
    with pytest.raises(ManufModelMismatch) as info:
        await client("check_task")
    assert (info.value.code, info.value.endpoint) == (8, Endpoint.CHECK_TASK)
    assert platform.state(world) == "failed"  # T7
    with pytest.raises(NoTask):
        await client("check_task")


@pytest.mark.parametrize(("version", "fails"), [("0.9", False), (CURRENT, True)])
async def test_errno_9_differential_from_version_mismatch_fails_the_task(
    platform: Platform, make_client: MakeClient, version: str, fails: bool
) -> None:
    world = platform.world(package={"kind": "diff", "from_version": "0.9"})
    client = make_client(world.config(version=version))
    if not fails:
        task = await client("check_task")
        assert (task.kind, task.target) == (PackageKind.DIFF, TARGET)
        return
    with pytest.raises(VersionMismatch) as info:
        await client("check_task")
    assert (info.value.code, info.value.endpoint) == (9, Endpoint.CHECK_TASK)
    assert platform.state(world) == "failed"  # T8
    # E3 recorded the version it was given before the check (§6.3 step 5).
    assert await client("query_version") == VersionInfo(version, None)


async def test_errno_11_without_a_task_and_while_paused(
    platform: Platform, make_client: MakeClient
) -> None:
    idle = platform.world(task=False)
    with pytest.raises(NoTask) as info:
        await make_client(idle.config())("check_task")
    assert (info.value.code, info.value.endpoint) == (11, Endpoint.CHECK_TASK)

    world = platform.world()
    with pytest.raises(NoTask):  # a FOTA task is no SOTA task
        await make_client(world.config(type=TaskType.SOTA))("check_task")
    client = make_client(world.config())
    platform.act(world, "pause")
    with pytest.raises(NoTask):  # D12
        await client("check_task")
    platform.act(world, "resume")
    assert (await client("check_task")).target == TARGET


async def test_errno_12_token_expired_on_the_server_clock(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    old = await client("check_task")
    await client("check_token", old.token)  # downloading

    with platform.clock_advanced(values.TOKEN_LIFETIME_S):  # the 48 h are up (D13)
        with pytest.raises(TokenExpired) as info:
            await client("check_token", old.token)
        assert (info.value.code, info.value.endpoint) == (12, Endpoint.CHECK_TOKEN)
        with pytest.raises(TokenExpired) as info:
            await client("tasking")  # E4 never issues tokens (§6.4)
        assert info.value.endpoint is Endpoint.TASKING
        with pytest.raises(DownloadError) as download:
            await client("download_range", old.token, 0, 4096)
        assert download.value.reason is DownloadErrorCode.INVALID_TOKEN
        # Reports still count with an expired token; the task state alone decides (§5.6).
        await client("report_status", old.token, 30)
        assert platform.device_task(world)["progress"] == 30

        # §10: run E3 again for a fresh token, for the same task in the same state.
        fresh = await client("check_task")
        assert fresh.token != old.token
        assert fresh == dataclasses.replace(old, token=fresh.token)
        await client("check_token", fresh.token)
        assert await client("download_package", fresh.token, 0, 4096) == FIRMWARE[:4096]
        with pytest.raises(TokenExpired):
            await client("check_token", old.token)  # old tokens stay expired
        assert platform.state(world) == "downloading"


async def test_errno_17_while_paused_and_for_progress_after_101(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    await client("check_token", task.token)

    platform.act(world, "pause")  # from downloading (T2)
    with pytest.raises(InvalidState) as info:
        await client("check_token", task.token)
    assert (info.value.code, info.value.endpoint) == (17, Endpoint.CHECK_TOKEN)
    with pytest.raises(DownloadError) as download:
        await client("download_range", task.token, 0, 4096)
    assert download.value.reason is DownloadErrorCode.INVALID_TOKEN  # D12: byte 3
    with pytest.raises(InvalidState):
        await client("report_status", task.token, 10)
    with pytest.raises(InvalidOperation):  # status codes while paused: 21 (D12)
        await client("report_status", task.token, StatusCode.DOWNLOADED)
    assert platform.state(world) == "paused"

    platform.act(world, "resume")  # back to downloading (T3)
    await client("check_token", task.token)
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    with pytest.raises(InvalidState) as info:  # progress after 101 (§5.5)
        await client("report_status", task.token, 100)
    assert info.value.endpoint is Endpoint.REPORT_PROGRESS
    with pytest.raises(InvalidState):  # upgrading: no more downloading either
        await client("check_token", task.token)
    assert platform.state(world) == "upgrading"


async def test_errno_20_once_the_task_finished(platform: Platform, make_client: MakeClient) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    await client("check_token", task.token)
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    await client("report_status", task.token, StatusCode.UPGRADED)

    with pytest.raises(TaskFinished) as info:
        await client("check_token", task.token)
    assert (info.value.code, info.value.endpoint) == (20, Endpoint.CHECK_TOKEN)
    with pytest.raises(TaskFinished):
        await client("report_status", task.token, StatusCode.UPGRADED)
    with pytest.raises(DownloadError) as download:
        await client("download_range", task.token, 0, 4096)
    assert download.value.reason is DownloadErrorCode.INVALID_TOKEN
    with pytest.raises(NoTask):
        await client("check_task")
    assert platform.state(world) == "succeeded"


async def test_errno_21_for_a_report_the_state_machine_refuses(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    with pytest.raises(InvalidOperation) as info:  # 201 straight from to-be-upgraded (§5.5)
        await client("report_status", task.token, StatusCode.UPGRADED)
    assert (info.value.code, info.value.endpoint) == (21, Endpoint.REPORT_PROGRESS)
    with pytest.raises(InvalidOperation) as info:
        await client("report_result", task.token, 205)
    assert info.value.endpoint is Endpoint.REPORT_RESULT
    assert platform.state(world) == "to_be_upgraded"

    await client("report_status", task.token, StatusCode.DOWNLOADED)  # T13
    with pytest.raises(InvalidOperation):  # 101 twice
        await client("report_status", task.token, StatusCode.DOWNLOADED)
    assert platform.state(world) == "upgrading"


async def test_errno_22_once_the_task_was_cancelled(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    task = await client("check_task")
    await client("check_token", task.token)
    platform.act(world, "cancel")

    with pytest.raises(TaskCancelled) as info:
        await client("check_token", task.token)
    assert (info.value.code, info.value.endpoint) == (22, Endpoint.CHECK_TOKEN)
    with pytest.raises(TaskCancelled):
        await client("report_status", task.token, 40)
    with pytest.raises(TaskCancelled):
        await client("report_result", task.token, 107)
    with pytest.raises(DownloadError) as download:
        await client("download_range", task.token, 0, 4096)
    assert download.value.reason is DownloadErrorCode.INVALID_TOKEN
    with pytest.raises(NoTask):
        await client("check_task")
    assert platform.state(world) == "cancelled"


async def test_errno_27_is_refused_before_sending(
    platform: Platform, make_client: MakeClient
) -> None:
    # The client checks versions against §4.5 itself, so E3's errno 27 cannot be reached.
    world = platform.world()
    watch = platform.watch()
    for bad in ("1.0.0 beta", "v/1", "", "x" * 21):
        with pytest.raises(InvalidArgumentError, match="version"):
            world.config(version=bad)
    client = make_client(world.config())
    with pytest.raises(InvalidArgumentError) as info:
        await client("post_version", version="1.0.1 final")
    assert info.value.endpoint is Endpoint.POST_VERSION
    assert watch.requests == []
    assert (await client("check_task")).target == TARGET


# -- download error bytes from the real server ---------------------------------------------------


async def test_download_error_3_for_a_token_never_issued(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    with pytest.raises(DownloadError) as info:
        await client("download_range", NEVER_ISSUED, 0, 4096)
    assert (info.value.code, info.value.reason) == (3, DownloadErrorCode.INVALID_TOKEN)
    assert info.value.endpoint is Endpoint.DOWNLOAD


async def test_download_error_1_when_the_package_file_is_gone(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(data=unique_data("gone"))
    client = make_client(world.config())
    task = await client("check_task")
    blob = platform.blob(world)
    blob.unlink()
    try:
        with pytest.raises(DownloadError) as info:
            await client("download_range", task.token, 0, 4096)
        assert (info.value.code, info.value.reason) == (1, DownloadErrorCode.NOT_FOUND)
    finally:
        blob.write_bytes(world.data)
    assert await client("download_package", task.token, 0, 4096) == world.data[:4096]


async def test_download_error_2_when_the_file_size_changed(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(data=unique_data("grown"))
    client = make_client(world.config())
    task = await client("check_task")
    blob = platform.blob(world)
    with blob.open("ab") as file:
        file.write(b"tail")
    try:
        with pytest.raises(DownloadError) as info:
            await client("download_range", task.token, 0, 4096)
        assert (info.value.code, info.value.reason) == (2, DownloadErrorCode.SIZE_MISMATCH)
    finally:
        os.truncate(blob, len(world.data))
    assert await client("download_package", task.token, 0, 4096) == world.data[:4096]


async def test_download_error_4_when_the_package_file_cannot_be_read(
    platform: Platform, make_client: MakeClient
) -> None:
    # As test_e6_read_failure_is_byte_4 in the server's tests: a directory where the package
    # file should be. Its stat passes the size check (the package is made exactly as large as
    # an empty directory on the blob store's filesystem), and the read fails with EISDIR.
    with tempfile.TemporaryDirectory(dir=platform.resources.blobs.root) as probe:
        size = os.stat(probe).st_size
    if size < 2:  # e.g. btrfs: directories of size 0 cannot pass for a package
        pytest.skip(f"an empty directory has size {size} on this filesystem")
    world = platform.world(data=os.urandom(size))
    client = make_client(world.config())
    task = await client("check_task")
    assert task.size == size
    blob = platform.blob(world)
    blob.unlink()
    blob.mkdir()
    try:
        assert os.stat(blob).st_size == size
        with pytest.raises(DownloadError) as info:
            await client("download_range", task.token, 0, 4096)
        assert (info.value.code, info.value.reason) == (4, DownloadErrorCode.READ_FAILED)
        assert info.value.endpoint is Endpoint.DOWNLOAD
        with pytest.raises(DownloadError) as info:
            await client("download_package", task.token, 0, size)
        assert info.value.reason is DownloadErrorCode.READ_FAILED
    finally:
        blob.rmdir()
        blob.write_bytes(world.data)
    assert await client("download_package", task.token, 0, size) == world.data
    assert platform.state(world) == "to_be_upgraded"  # E6 changes no state (§6.6)


# Byte 5 (a malformed s_id, §6.6.4 / D7) is not tested here: the SDK never sends s_id, as the C
# SDK does not (§6.6); the server's own tests cover it.


# -- events ----------------------------------------------------------------------------------------


async def test_events_carry_the_seed_payloads(platform: Platform, make_client: MakeClient) -> None:
    world = platform.world()
    client = make_client(world.config())
    await client("post_version")
    task = await client("check_task")
    await client("check_token", task.token)
    recovered = await client("tasking")
    chunk = await client("download_range", task.token, 8192, 4096)
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    await client("report_result", task.token, StatusCode.UPGRADED)
    with pytest.raises(NoTask):  # a call that raises delivers no event
        await client("check_task")

    task_reply = json.dumps(
        {"errno": 0, "error": "succ", "data": task.to_data()}, separators=(",", ":")
    ).encode()
    assert client.events == [
        VersionPosted(Endpoint.POST_VERSION, SUCC, CURRENT, None),
        TaskChecked(Endpoint.CHECK_TASK, task_reply, task),
        TokenChecked(Endpoint.CHECK_TOKEN, SUCC, task.token),
        TaskChecked(Endpoint.TASKING, task_reply, recovered),
        PackageDownloaded(Endpoint.DOWNLOAD, task.token, chunk),
        StatusReported(Endpoint.REPORT_PROGRESS, SUCC, task.token, 101),
        StatusReported(Endpoint.REPORT_RESULT, SUCC, task.token, 201),
    ]
    assert [event.kind for event in client.events] == [
        EventKind.POST_VERSION,
        EventKind.CHECK_TASK,
        EventKind.CHECK_TOKEN,
        EventKind.CHECK_TASK,
        EventKind.DOWNLOAD_PACKAGE,
        EventKind.REPORT_STATUS,
        EventKind.REPORT_STATUS,
    ]
    assert chunk.data == FIRMWARE[8192:]


# -- connections -----------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world()
    client = make_client(world.config())
    watch = platform.watch()
    await client("post_version")
    task = await client("check_task")
    assert await download_all(client, task) == FIRMWARE
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    assert len(watch.requests) == 9
    assert len({r.peer for r in watch.requests}) == 1


async def test_one_request_per_connection_when_the_server_closes_each(
    platform: Platform, make_client: MakeClient
) -> None:
    # The C SDK's style (§2.3), forced from the server side: every reply closes its connection,
    # and the client opens a new one for each request (§10).
    world = platform.world()
    with platform.listener("short", limits=Limits(max_requests=1)) as short:
        client = make_client(world.config(), base_url=short.url)
        watch = platform.watch()
        await client("post_version")
        task = await client("check_task")
        assert await download_all(client, task) == FIRMWARE
        await client("report_status", task.token, StatusCode.DOWNLOADED)
        await client("report_status", task.token, StatusCode.UPGRADED)
        await client.close()
    assert len(watch.requests) == 10
    assert {r.listener for r in watch.requests} == {"short"}
    assert len({r.peer for r in watch.requests}) == 10
    assert platform.state(world) == "succeeded"


async def test_reconnects_after_the_server_closed_an_idle_connection(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(task=False)
    with platform.listener("idle", limits=Limits(idle_timeout=0.2)) as idle:
        client = make_client(world.config(), base_url=idle.url)
        watch = platform.watch()
        await client("post_version")
        server = idle.server
        assert server is not None
        wait_until(lambda: not server.connections)  # D19: the server dropped the idle one
        await client("post_version")
        await client.close()
    assert len({r.peer for r in watch.requests}) == 2


async def test_a_non_2xx_reply_is_an_http_status_error(
    platform: Platform, make_client: MakeClient
) -> None:
    world = platform.world(task=False)
    client = make_client(world.config(), base_url=platform.api.url + "/nowhere")
    with pytest.raises(HTTPStatusError) as info:
        await client("post_version")
    assert (info.value.code, info.value.status_code) == (404, 404)  # §4.3: unknown path

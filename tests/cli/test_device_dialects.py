"""``onenet-ota device --dialect studio|fuse``: options, output and exit codes.

The project's server does not speak Studio or fuse yet, so these run against the device tests'
loopback platform built from the protocol core (tests/device/dialect_platform.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from onenet_ota.cli.device import EXIT_OK, EXIT_USAGE, device
from onenet_ota.device import Credentials
from onenet_ota.protocol.codes import Dialect, Operation
from tests.device.conftest import K1
from tests.device.dialect_platform import DialectPlatform
from tests.device.fake_platform import package_bytes
from tests.device.scripted_server import ScriptedServer

PACKAGE = package_bytes(20_000, seed=3)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def platform_for(server: ScriptedServer, dialect: Dialect, authorization: str) -> DialectPlatform:
    platform = DialectPlatform(dialect, PACKAGE, authorization)
    server.handler = platform
    return platform


def device_token(dialect: Dialect) -> str:
    return Credentials.for_dialect(dialect, "123123", K1, device_name="dev01").authorization


def run(args: list[str]) -> Result:
    return CliRunner().invoke(device, args, env={}, catch_exceptions=False)


def common(server: ScriptedServer, dialect: Dialect, *extra: str) -> list[str]:
    return [
        "--dialect",
        dialect.value,
        "--server",
        server.url,
        "--product-id",
        "123123",
        "--device-name",
        "dev01",
        "--access-key",
        K1,
        "--version",
        "1.0.0",
        *extra,
    ]


@pytest.mark.parametrize("dialect", [Dialect.STUDIO, Dialect.FUSE], ids=lambda d: d.value)
def test_check_prints_the_tid_task(server: ScriptedServer, dialect: Dialect) -> None:
    platform_for(server, dialect, device_token(dialect))
    result = run(["check", *common(server, dialect, "--json")])
    assert result.exit_code == EXIT_OK, result.output
    task = json.loads(result.output)["task"]
    assert (task["tid"], task["size"], task["type"]) == (4242, len(PACKAGE), "full")
    prefix = "/ota" if dialect is Dialect.STUDIO else "/fuse-ota"
    assert server.requests[0].path == f"{prefix}/123123/dev01/check"


@pytest.mark.parametrize("dialect", [Dialect.STUDIO, Dialect.FUSE], ids=lambda d: d.value)
def test_upgrade_runs_the_whole_flow(
    server: ScriptedServer, dialect: Dialect, tmp_path: Path
) -> None:
    platform = platform_for(server, dialect, device_token(dialect))
    args = common(
        server,
        dialect,
        "--json",
        "--state-dir",
        str(tmp_path / "state"),
        "--output",
        str(tmp_path / "fw.bin"),
        "--chunk-size",
        "4k",
    )
    result = run(["upgrade", *args])
    assert result.exit_code == EXIT_OK, result.output
    assert (tmp_path / "fw.bin").read_bytes() == PACKAGE
    assert platform.reports == [101, 201]
    # §13.7 through the CLI's default --token-check: every chunk on Studio, not on fuse.
    status_checks = platform.operations().count(Operation.CHECK_STATE)
    assert status_checks == (5 if dialect is Dialect.STUDIO else 3)


def test_fuse_user_token(server: ScriptedServer) -> None:
    token = Credentials.from_user_key("4242", K1).authorization
    platform_for(server, Dialect.FUSE, token)
    result = run(["check", *common(server, Dialect.FUSE, "--user-id", "4242", "--json")])
    assert result.exit_code == EXIT_OK, result.output
    assert server.requests[0].header("Authorization") == token


def test_token_version_option(server: ScriptedServer) -> None:
    token = Credentials.for_dialect(
        Dialect.FUSE, "123123", K1, device_name="dev01", version="2018-10-31"
    ).authorization
    platform_for(server, Dialect.FUSE, token)
    result = run(["check", *common(server, Dialect.FUSE, "--token-version", "2018-10-31")])
    assert result.exit_code == EXIT_OK, result.output
    assert server.requests[0].header("Authorization") == token


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dialect", "classic"], "--dev-id is required"),
        (["--dialect", "studio"], "--device-name is required"),
        (["--dialect", "studio", "--device-name", "d", "--user-id", "1"], "fuse only"),
        (["--dialect", "fuse", "--device-name", "bad/name"], "device name"),
        (["--dialect", "things"], "Invalid value for '--dialect'"),
    ],
)
def test_bad_usage_exits_2(args: list[str], needle: str) -> None:
    base = ["check", "--server", "http://127.0.0.1:9", "--product-id", "123123"]
    result = run([*base, "--access-key", K1, "--version", "1.0.0", *args])
    assert result.exit_code == EXIT_USAGE
    assert needle in result.output
    assert K1 not in result.output

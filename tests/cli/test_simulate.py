"""``onenet-ota simulate``: refusals, a run against a real server, and interrupts that leave
nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from onenet_ota.cli.main import cli
from onenet_ota.cli.simulate import simulate
from onenet_ota.sim import FleetConfig
from onenet_ota.sim.config import HTTP_CLIENTS
from onenet_ota.sim.profiles import DIALECT_NAMES, PROFILE_NAMES
from onenet_ota.sim.provision import provision
from tests.server.serve_process import children
from tests.sim.platform import Platform, sqlite_platform
from tests.sim.test_server import wait_gone

__all__ = ["sqlite_platform"]  # the fixture, for pytest

ONENET_OTA = Path(sys.executable).with_name("onenet-ota")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["simulate", *args], env=env, catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0"], "error: --devices must be an integer from 1 to 100000"),
        (["--concurrency", "-1"], "error: --concurrency must be an integer from 1"),
        (["--drop-rate", "1"], "error: --drop-rate must be a number of at least 0 and below 1"),
        (["--power-cut-rate", "2"], "error: --power-cut-rate must be a number"),
        (["--chunk-size", "1"], "error: --chunk-size must be an integer from 2"),
        (["--signal", "90:10"], "error: --signal: 90:10 is empty"),
        (["--power", "x"], "error: --power: expected N or LOW:HIGH"),
        (["--package", "/nonexistent/fw.bin"], "error: --package /nonexistent/fw.bin: No such"),
        (["--target", "1.0.0"], "error: --target must differ from --version"),
        (["--server", "http://x", "--db", "sqlite:///x"], "error: --db configures the local"),
        (["--server-workers", "0"], "error: --server-workers must be an integer from 1 to 64"),
        (["--server", "ftp://x", "--admin-token", "t"], "error: --server must be an http://"),
        (["--server", "http://127.0.0.1:9"], "error: --admin-token (or ONENET_OTA_ADMIN_TOKEN)"),
    ],
)
def test_impossible_parameters_are_refused(args: list[str], message: str) -> None:
    result = invoke(*args, env={"ONENET_OTA_ADMIN_TOKEN": "", "ONENET_OTA_SERVER": ""})
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unparsable_sizes_are_usage_errors() -> None:
    result = invoke("--chunk-size", "64 parsecs")
    assert result.exit_code == 2
    assert "expected bytes such as 4096, 64k or 1m" in result.output


def test_a_run_against_a_server(sqlite_platform: Platform, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    result = invoke(
        "--server", sqlite_platform.url, "--devices", "12", "--concurrency", "4",
        "--package-size", "20k", "--chunk-size", "4096", "--drop-rate", "0.05",
        "--power-cut-rate", "0.3", "--retry-interval", "0.02", "--seed", "11",
        "--no-live", "--json", str(summary), "--state-dir", str(tmp_path),
        env={"ONENET_OTA_ADMIN_TOKEN": sqlite_platform.admin_token},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "server and devices agree: 12 devices checked" in result.output
    assert "E6 download package" in result.output
    data = json.loads(summary.read_text())
    assert data["ok"] is True
    assert data["outcomes"] == {"succeeded": 12}
    assert data["agreement"]["server_counts"]["succeeded"] == 12
    assert data["endpoints"]["E3 check task"]["latency_ms"]["p99"] > 0
    assert list(tmp_path.iterdir()) == [summary]  # the device state directories are gone


def test_a_run_in_mixed_dialects_and_profiles(sqlite_platform: Platform) -> None:
    result = invoke(
        "--server", sqlite_platform.url, "--admin-token", sqlite_platform.admin_token,
        "--devices", "12", "--concurrency", "6", "--package-size", "8k",
        "--dialect", "mixed", "--profile", "mixed", "--drop-rate", "0.05",
        "--retry-interval", "0.02", "--http", "httpx2", "--no-live", "--json", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["dialect"], data["profile"], data["http"]) == ("mixed", "mixed", "httpx2")
    assert data["by_dialect"] == {name: {"succeeded": 4} for name in DIALECT_NAMES}
    assert data["by_profile"] == {name: {"succeeded": 3} for name in PROFILE_NAMES}
    assert data["agreement"]["ok"] is True
    assert data["agreement"]["disagreeing"] == {"dialect": {}, "profile": {}}
    # Studio's and fuse's requests are metered under the classic endpoints they correspond to.
    assert "other" not in data["endpoints"]
    assert "By dialect and client profile" in result.stderr
    assert "profile esp32-stream" in result.stderr


def test_the_dialect_and_profile_choices_are_the_table_s() -> None:
    for flag, names in (("--dialect", DIALECT_NAMES), ("--profile", PROFILE_NAMES)):
        option = next(p for p in simulate.params if f"{flag}" in p.opts)
        assert isinstance(option.type, click.Choice)
        assert list(option.type.choices) == [*names, "mixed"]
    option = next(p for p in simulate.params if "--http" in p.opts)
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == HTTP_CLIENTS


def test_a_run_that_does_not_succeed_exits_1(sqlite_platform: Platform) -> None:
    result = invoke(
        "--server", sqlite_platform.url, "--admin-token", sqlite_platform.admin_token,
        "--devices", "3", "--package-size", "4k", "--power", "5", "--task-power", "50",
        "--json", "-",
    )  # fmt: skip
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["outcomes"] == {"deferred": 3}
    assert data["agreement"]["ok"] is True


def _existing_task(platform: Platform, devices: int) -> tuple[int, list[dict[str, Any]]]:
    """A task made by someone else (an operator's, of real devices), and its devices' rows."""
    admin = platform.admin()
    try:
        target = provision(admin, FleetConfig(devices=devices, package_size=4096))
        rows = admin.request("GET", f"/tasks/{target.task_id}/devices")["items"]
    finally:
        admin.close()
    return target.task_id, rows


def _task_devices(platform: Platform, task_id: int) -> list[dict[str, Any]]:
    admin = platform.admin()
    try:
        items: list[dict[str, Any]] = admin.request("GET", f"/tasks/{task_id}/devices")["items"]
        return items
    finally:
        admin.close()


def test_an_existing_task_is_refused_without_allow_real_devices(sqlite_platform: Platform) -> None:
    task_id, before = _existing_task(sqlite_platform, 2)
    result = invoke(
        "--server", sqlite_platform.url, "--admin-token", sqlite_platform.admin_token,
        "--task", str(task_id), "--devices", "2", "--no-live",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"error: --task {task_id} runs devices this simulator did not create" in result.output
    assert "--allow-real-devices" in result.output
    assert "Traceback" not in result.output
    assert _task_devices(sqlite_platform, task_id) == before  # not one device was touched
    assert {row["state"] for row in before} == {"to_be_upgraded"}


def test_an_existing_task_runs_with_allow_real_devices(sqlite_platform: Platform) -> None:
    task_id, _ = _existing_task(sqlite_platform, 2)
    result = invoke(
        "--server", sqlite_platform.url, "--admin-token", sqlite_platform.admin_token,
        "--task", str(task_id), "--devices", "2", "--allow-real-devices", "--json", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcomes"] == {"succeeded": 2}
    rows = _task_devices(sqlite_platform, task_id)
    assert [(row["state"], row["result_code"]) for row in rows] == [("succeeded", 201)] * 2


def test_failure_codes_are_shown_with_their_names(sqlite_platform: Platform) -> None:
    result = invoke(
        "--server", sqlite_platform.url, "--admin-token", sqlite_platform.admin_token,
        "--devices", "2", "--package-size", "4k", "--power", "5", "--task-power", "50",
        "--gate", "fail", "--no-live",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "failed, reported 105 download low battery" in result.output


@pytest.fixture
def isolated(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """An environment whose temporary directories are ours to inspect afterwards."""
    tmp = tmp_path / "tmp"
    states = tmp_path / "states"
    tmp.mkdir()
    states.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    for name in ("ONENET_OTA_SERVER", "ONENET_OTA_ADMIN_TOKEN", "ONENET_OTA_DB"):
        env.pop(name, None)
    return env, tmp, states


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *_descendants(child)]
    return found


@pytest.mark.parametrize(
    ("signum", "processes"), [(signal.SIGINT, "1"), (signal.SIGTERM, "1"), (signal.SIGINT, "2")]
)
def test_an_interrupt_leaves_nothing_running(
    signum: int, processes: str, isolated: tuple[dict[str, str], Path, Path]
) -> None:
    env, tmp, states = isolated
    process = subprocess.Popen(
        [str(ONENET_OTA), "simulate", "--devices", "3000", "--concurrency", "16",
         "--processes", processes, "--no-live", "--state-dir", str(states)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    output: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "devices upgrade to" in line:
                break
        else:
            pytest.fail("the fleet never started:\n" + "".join(output))
        time.sleep(1)  # some devices are mid-upgrade now
        spawned = _descendants(process.pid)
        assert spawned, "no local server process found"
        assert any(states.iterdir())
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=60)
        output.append(rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = "".join(output)
    assert process.returncode == 130, text
    assert "interrupted" in text
    assert "Traceback" not in text
    for pid in spawned:
        assert wait_gone(pid, 10), f"process {pid} outlived the simulator"
    assert list(tmp.iterdir()) == []  # the server's data directory (and its database) is gone
    assert list(states.iterdir()) == []


def test_an_interrupt_during_setup(isolated: tuple[dict[str, str], Path, Path]) -> None:
    env, tmp, _ = isolated
    # During setup the simulator relies on Python's own SIGINT handler (KeyboardInterrupt). A
    # test run started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python keeps an ignored SIGINT ignored; a handler here is reset to the default in the child
    # at exec, so the child gets Python's handler as it would from a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [str(ONENET_OTA), "simulate", "--devices", "100000", "--no-live"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert process.stdout is not None
        output = [process.stdout.readline()]
        output.append(process.stdout.readline())  # "creating a product, ...": the server runs
        spawned = _descendants(process.pid)
        assert spawned, "no local server process found"
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = "".join(output) + rest
    assert process.returncode == 130, text
    assert "interrupted during setup" in text
    assert "Traceback" not in text
    for pid in spawned:
        assert wait_gone(pid, 10), f"process {pid} outlived the simulator"
    assert list(tmp.iterdir()) == []

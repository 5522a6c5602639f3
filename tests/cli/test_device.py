"""``onenet-ota device``: options (and their environment variables), output, exit codes.

Runs against the real platform in a child process (:class:`LocalServer`), set up through the
management API, with the command invoked in-process through click's runner.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from onenet_ota.cli.device import EXIT_DEFERRED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, device
from onenet_ota.demo import Provisioned, generate_package, provision
from onenet_ota.management import ManagementClient
from onenet_ota.sim.server import LocalServer

PACKAGE = generate_package(300_000, seed=11)
ENV_PREFIX = "ONENET_OTA_"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[LocalServer, ManagementClient]]:
    with LocalServer() as local:
        admin = ManagementClient(local.url, local.admin_token)
        try:
            yield local, admin
        finally:
            admin.close()


_names = iter(range(1, 10_000))


def new_world(
    server: tuple[LocalServer, ManagementClient], data: bytes = PACKAGE, **task: Any
) -> Provisioned:
    return provision(server[1], data, device_name=f"dev{next(_names)}", task=task or None)


def run(args: list[str], env: dict[str, str] | None = None) -> Result:
    # The environment is cleared of the ONENET_OTA_* variables the caller's shell may have set.
    runner = CliRunner()
    return runner.invoke(device, args, env=env, catch_exceptions=False)


def upgrade_args(world: Provisioned, url: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "upgrade",
        *world.device_args(url),
        "--access-key",
        world.access_key,
        "--state-dir",
        str(tmp_path / "state"),
        "--output",
        str(tmp_path / "fw.bin"),
        *extra,
    ]


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_upgrade_json_prints_one_object_per_event(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server)
    result = run(upgrade_args(world, server[0].url, tmp_path, "--json", "--chunk-size", "64k"))
    assert result.exit_code == EXIT_OK, result.output
    events = json_lines(result.output)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "task"
    assert kinds[-1] == "result"
    assert kinds.count("progress") == 5  # 300 000 bytes in 64 KiB chunks
    assert events[-1]["outcome"] == "succeeded"
    assert events[-1]["bytes_downloaded"] == len(PACKAGE)
    assert 101 in events[-1]["reports"]
    assert 201 in events[-1]["reports"]
    assert (tmp_path / "fw.bin").read_bytes() == PACKAGE
    assert world.access_key not in result.output
    rows = server[1].request("GET", f"/tasks/{world.task_id}/devices")["items"]
    assert [(r["state"], r["result_code"]) for r in rows] == [("succeeded", 201)]


def test_every_option_can_come_from_the_environment(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server)
    env = {
        "SERVER": server[0].url,
        "DEV_ID": str(world.dev_id),
        "PRODUCT_ID": world.pid,
        "ACCESS_KEY": world.access_key,
        "TYPE": "fota",
        "VERSION": world.current,
        "STATE_DIR": str(tmp_path / "state"),
        "OUTPUT": str(tmp_path / "fw.bin"),
        "CHUNK_SIZE": "32k",
        "PROGRESS_STEP": "0",
        "TOKEN_CHECK": "first-chunk",
        "JSON": "1",
    }
    result = run(["upgrade"], env={ENV_PREFIX + k: v for k, v in env.items()})
    assert result.exit_code == EXIT_OK, result.output
    final = json_lines(result.output)[-1]
    assert final["reports"] == [101, 201]  # progress reports off, from the environment
    assert (tmp_path / "fw.bin").read_bytes() == PACKAGE


def test_text_output_without_a_terminal(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server)
    result = run(upgrade_args(world, server[0].url, tmp_path))
    assert result.exit_code == EXIT_OK, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("task: upgrade to 1.0.1 (300000 bytes")
    assert "downloaded 300000/300000 bytes (100%)" in lines
    assert lines[-1] == "upgraded to 1.0.1"


def test_no_task_exits_0(server: tuple[LocalServer, ManagementClient], tmp_path: Path) -> None:
    world = new_world(server)
    server[1].request("POST", f"/tasks/{world.task_id}/cancel")
    result = run(upgrade_args(world, server[0].url, tmp_path, "--json"))
    assert result.exit_code == EXIT_OK, result.output
    assert json_lines(result.output)[-1]["outcome"] == "no_task"


def test_gate_below_threshold_defers_with_exit_3(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server, signal=10)
    result = run(upgrade_args(world, server[0].url, tmp_path, "--signal", "3", "--json"))
    assert result.exit_code == EXIT_DEFERRED, result.output
    final = json_lines(result.output)[-1]
    assert final["outcome"] == "deferred"
    assert "signal 3" in final["reason"]
    rows = server[1].request("GET", f"/tasks/{world.task_id}/devices")["items"]
    assert rows[0]["state"] == "to_be_upgraded"  # nothing reported


def test_gate_fail_policy_reports_and_exits_1(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server, power=50)
    args = upgrade_args(world, server[0].url, tmp_path, "--power", "20", "--gate", "fail")
    result = run([*args, "--json"])
    assert result.exit_code == EXIT_FAILED, result.output
    final = json_lines(result.output)[-1]
    assert final["code"] == 105  # machine-readable: the integer, and its name beside it
    assert final["code_name"] == "download failed: battery too low"
    rows = server[1].request("GET", f"/tasks/{world.task_id}/devices")["items"]
    assert (rows[0]["state"], rows[0]["result_code"]) == ("failed", 105)


def test_text_output_names_the_status_codes(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server, power=50)
    args = upgrade_args(world, server[0].url, tmp_path, "--power", "20", "--gate", "fail")
    result = run(args)
    assert result.exit_code == EXIT_FAILED, result.output
    lines = result.output.splitlines()
    assert "reported 105 download low battery (download failed: battery too low)" in lines
    assert lines[-1].startswith(
        "failed, reported 105 download low battery (download failed: battery too low): "
    )


def test_wrong_access_key_is_a_clear_failure(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server)
    wrong = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    args = upgrade_args(world, server[0].url, tmp_path)
    args[args.index(world.access_key)] = wrong
    result = run(args)
    assert result.exit_code == EXIT_FAILED
    assert "errno 1: auth failed (check the product id, access key and dev_id)" in result.output
    assert wrong not in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--server", "ftp://x"), "--server must be an http:// or https:// URL"),
        (("--access-key", "not base64!"), "not valid base64"),
        (("--version", "1.0 beta"), "version must be 1-20 characters"),
        (("--dev-id", "12x"), "dev_id must be 1-19 decimal digits"),
        (("--chunk-size", "1"), "chunk_size must be an integer from 2"),
        (("--chunk-size", "lots"), "expected bytes such as 4096"),
        (("--output", "/nonexistent-dir/fw.bin"), "directory /nonexistent-dir does not exist"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    args = [
        "upgrade",
        "--server",
        "http://127.0.0.1:9",
        "--dev-id",
        "1",
        "--product-id",
        "123",
        "--access-key",
        "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg=",
        "--version",
        "1.0.0",
        "--state-dir",
        str(tmp_path / "state"),
        "--output",
        str(tmp_path / "fw.bin"),
    ]
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = run(args)
    assert result.exit_code == EXIT_USAGE
    assert message in result.output
    assert "Traceback" not in result.output
    if flag == "--access-key":
        assert value not in result.output


def test_unreachable_server_fails_without_a_traceback(tmp_path: Path) -> None:
    args = [
        "upgrade",
        "--server",
        "http://127.0.0.1:9",
        "--dev-id",
        "1",
        "--product-id",
        "123",
        "--access-key",
        "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg=",
        "--version",
        "1.0.0",
        "--state-dir",
        str(tmp_path / "state"),
        "--output",
        str(tmp_path / "fw.bin"),
        "--timeout",
        "500",
        "--retry-attempts",
        "2",
        "--retry-interval",
        "0",
    ]
    env = {ENV_PREFIX + "JSON": "1"}
    result = run(args, env=env)
    assert result.exit_code == EXIT_FAILED
    events = json_lines(result.output)
    assert [e["event"] for e in events] == ["retry", "result"]
    assert "cannot reach the platform" in events[-1]["reason"]
    assert "gave up after 2 attempts" in events[-1]["reason"]


def test_unwritable_state_directory_is_a_clear_failure(
    server: tuple[LocalServer, ManagementClient], tmp_path: Path
) -> None:
    world = new_world(server)
    (tmp_path / "file").write_text("a file, not a directory")
    args = upgrade_args(world, server[0].url, tmp_path, "--json")
    args[args.index("--state-dir") + 1] = str(tmp_path / "file" / "state")
    result = run(args)
    assert result.exit_code == EXIT_FAILED
    final = json_lines(result.output)[-1]
    assert final["outcome"] == "failed"
    assert "cannot create state directory" in final["reason"]
    assert "Not a directory" in final["reason"]


def test_check_prints_the_task(server: tuple[LocalServer, ManagementClient]) -> None:
    world = new_world(server)
    args = ["check", *world.device_args(server[0].url), "--access-key", world.access_key]
    result = run([*args, "--json"])
    assert result.exit_code == EXIT_OK, result.output
    task = json.loads(result.output)["task"]
    assert task["target"] == "1.0.1"
    assert task["size"] == len(PACKAGE)
    assert task["md5"] == world.md5
    assert task["type"] == "full"
    text = run(args)
    assert text.exit_code == EXIT_OK
    assert f"md5: {world.md5}" in text.output


def test_check_without_a_task(server: tuple[LocalServer, ManagementClient]) -> None:
    world = new_world(server)
    server[1].request("POST", f"/tasks/{world.task_id}/cancel")
    args = ["check", *world.device_args(server[0].url), "--access-key", world.access_key]
    assert run([*args, "--json"]).output.strip() == '{"task":null}'
    assert run(args).output.strip() == "no task"


def test_check_error_exits_1(server: tuple[LocalServer, ManagementClient]) -> None:
    world = new_world(server)
    args = ["check", *world.device_args(server[0].url), "--access-key", world.access_key]
    args[args.index("--dev-id") + 1] = "999999999999"
    result = run(args)
    assert result.exit_code == EXIT_FAILED
    assert "errno 1: auth failed" in result.output

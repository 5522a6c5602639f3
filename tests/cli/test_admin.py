"""``onenet-ota admin`` against a real server (create_app on a SQLite file, over loopback HTTP)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx2
from click.testing import Result

from onenet_ota import auth
from onenet_ota.device import Credentials, DeviceConfig, OtaClient, StatusCode
from tests.cli.conftest import Admin

K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="


_pid = iter(range(500, 10_000))


def _product(admin: Admin) -> str:
    pid = str(next(_pid))
    admin("product", "create", "--id", pid, "--access-key", K1)
    return pid


def _json(result: Result) -> Any:
    return json.loads(result.stdout)


def _device_task(admin: Admin, tmp_path: Path, firmware: bytes) -> tuple[str, int, int, int]:
    """A new product with one device and a FOTA task for it, made with the CLI:
    (pid, dev_id, package id, task id). ``firmware`` is made unique per product."""
    pid = _product(admin)
    dev = _json(admin("device", "add", "--pid", pid, "--name", "a", "--json"))["dev_id"]
    path = tmp_path / "fw.bin"
    path.write_bytes(firmware + pid.encode())
    package_id = _json(admin("package", "upload", str(path), "--pid", pid, "--type", "fota",
                             "--target", "2.0", "--json"))["id"]  # fmt: skip
    task_id = _json(admin("task", "create", "--package", str(package_id), "--dev-id", str(dev),
                          "--json"))["id"]  # fmt: skip
    return pid, dev, package_id, task_id


def test_product_create_with_onenet_ids(admin: Admin) -> None:
    pid = str(next(_pid))
    result = admin("product", "create", "--id", pid, "--access-key", K1)
    assert f"pid           {pid}" in result.stdout
    assert K1 in result.stdout
    shown = _json(admin("product", "show", pid, "--json"))
    assert (shown["pid"], shown["access_key"]) == (pid, None)
    revealed = _json(admin("product", "show", pid, "--reveal-key", "--json"))
    assert (revealed["pid"], revealed["access_key"]) == (pid, K1)


def test_generated_product_and_key_rotation(admin: Admin) -> None:
    product = _json(admin("product", "create", "--json"))
    assert len(product["access_key"]) == 44
    rotated = _json(admin("product", "rotate-key", product["pid"], "--json"))
    assert rotated["access_key"] != product["access_key"]
    listed = _json(admin("product", "list", "--json", "--limit", "1000"))
    assert product["pid"] in {p["pid"] for p in listed["items"]}


def test_device_key_rotation(admin: Admin, server: str) -> None:
    pid = _product(admin)
    device = _json(admin("device", "add", "--pid", pid, "--name", "d", "--generate-key", "--json"))
    old = auth.build_token(pid, device["device_key"], device_name="d")

    def errno(authorization: str) -> int:
        reply = httpx2.get(
            server + "/ota/device/version",
            params={"dev_id": device["dev_id"]},
            headers={"Authorization": authorization},
        )
        return int(reply.json()["errno"])

    assert errno(old) == 0
    rotated = _json(admin("device", "rotate-key", str(device["dev_id"]), "--json"))
    assert rotated["device_key"] not in (None, device["device_key"])
    assert errno(old) == 1  # refused at once
    assert errno(auth.build_token(pid, rotated["device_key"], device_name="d")) == 0
    result = admin("device", "rotate-key", str(device["dev_id"]), "--device-key", K1)
    assert f"device_key    {K1}" in result.stdout
    assert _json(admin("device", "show", str(device["dev_id"]), "--json"))["device_key"] == K1
    failed = admin("device", "rotate-key", "999999999", ok=False)
    assert failed.exit_code == 1
    assert "device 999999999 not found (HTTP 404)" in failed.stderr


def test_duplicate_is_a_clear_error(admin: Admin) -> None:
    pid = _product(admin)
    result = admin("product", "create", "--id", pid, ok=False)
    assert result.exit_code == 1
    assert result.stderr == f"error: product {pid} already exists (HTTP 409)\n"
    assert result.stdout == ""


K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def _fields(text: str) -> dict[str, str]:
    """The human output of one object ("key  value" lines) as a dict."""
    pairs = (([*line.split(maxsplit=1), ""])[:2] for line in text.splitlines())
    return {key: value for key, value in pairs}


def test_account_commands(admin: Admin) -> None:
    uid = str(next(_pid))
    created = admin("account", "create", "--uid", uid, "--access-key", K1, "--name", "moved")
    fields = _fields(created.stdout)
    assert (fields["uid"], fields["access_key"], fields["name"]) == (uid, K1, "moved")
    shown = _json(admin("account", "show", uid, "--json"))
    assert (shown["uid"], shown["access_key"], shown["product_count"]) == (uid, None, 0)
    revealed = _json(admin("account", "show", uid, "--reveal-key", "--json"))
    assert (revealed["uid"], revealed["access_key"]) == (uid, K1)
    listed = admin("account", "list", "--limit", "1000")
    assert "UID" in listed.stdout.splitlines()[0]
    assert any(line.split()[:2] == [uid, "moved"] for line in listed.stdout.splitlines())
    assert K1 not in listed.stdout  # lists carry no keys
    rotated = _json(admin("account", "rotate-key", uid, "--access-key", K2, "--json"))
    assert rotated["access_key"] == K2
    generated = _json(admin("account", "rotate-key", uid, "--json"))
    assert generated["access_key"] not in (None, K2)
    fresh = _json(admin("account", "create", "--json"))
    assert len(fresh["access_key"]) == 44

    pid = _product(admin)
    owned = _json(admin("product", "set-account", pid, uid, "--json"))
    assert owned["account_uid"] == uid
    product = admin("product", "show", pid).stdout
    assert _fields(product)["account_uid"] == uid
    refused = admin("account", "delete", uid, ok=False)
    assert (refused.exit_code, refused.stdout) == (1, "")
    assert refused.stderr == (
        f"error: account {uid} still owns product {pid}; clear their account first (HTTP 409)\n"
    )
    cleared = _json(admin("product", "clear-account", pid, "--json"))
    assert cleared["account_uid"] is None
    assert admin("account", "delete", uid).stdout == f"account {uid} deleted\n"
    gone = admin("account", "show", uid, ok=False)
    assert (gone.exit_code, gone.stderr) == (1, f"error: account {uid} not found (HTTP 404)\n")
    unknown = admin("product", "set-account", pid, uid, ok=False)
    assert unknown.stderr == f"error: account {uid} not found (HTTP 404)\n"


def test_bad_account_input_is_a_clear_error(admin: Admin) -> None:
    bad_uid = admin("account", "create", "--uid", "0123", ok=False)
    assert bad_uid.exit_code == 1
    assert bad_uid.stderr.startswith("error: uid: ")
    assert "(HTTP 422)" in bad_uid.stderr
    bad_key = admin("account", "create", "--access-key", "not base64", ok=False)
    assert bad_key.exit_code == 1
    assert "base64" in bad_key.stderr
    reserved = admin("product", "create", "--id", "devInfo", ok=False)
    assert reserved.exit_code == 1
    assert "pid devInfo is reserved" in reserved.stderr
    # A uid with a slash must not reach another route: it is one (unknown) path segment.
    slash = admin("account", "show", "1/rotate-key", ok=False)
    assert slash.stderr == "error: no uid '1/rotate-key' (HTTP 404)\n"


def test_devices_add_import_list_show(admin: Admin, tmp_path: Path) -> None:
    pid = _product(admin)
    added = _json(admin("device", "add", "--pid", pid, "--name", "dev01", "--dev-id",
                        f"7{pid}0", "--json"))  # fmt: skip
    assert added["dev_id"] == int(f"7{pid}0")
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(f"name,dev_id,auth_info\ndev02,7{pid}2,861234567890123\ndev03,,\n")
    result = admin("device", "import", "--pid", pid, str(csv_file))
    assert "2 device(s) created" in result.stdout
    json_file = tmp_path / "devices.json"
    json_file.write_text(json.dumps([{"name": "dev04", "device_key": K1}]))
    admin("device", "import", "--pid", pid, str(json_file))
    listed = _json(admin("device", "list", "--pid", pid, "--json"))
    assert {d["name"] for d in listed["items"]} == {"dev01", "dev02", "dev03", "dev04"}
    dev_ids = [d["dev_id"] for d in listed["items"]]
    assert dev_ids == sorted(dev_ids)
    shown = admin("device", "show", f"7{pid}2")
    assert "861234567890123" in shown.stdout
    assert "(none)" in shown.stdout  # no task history yet


def test_bad_import_files(admin: Admin, tmp_path: Path) -> None:
    pid = _product(admin)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,dev_id\nx,abc\n")
    result = admin("device", "import", "--pid", pid, str(bad), ok=False)
    assert result.exit_code == 1
    assert "dev_id 'abc' is not a number" in result.stderr
    broken = tmp_path / "bad.json"
    broken.write_text("[{")
    assert "not valid JSON" in admin("device", "import", "--pid", pid, str(broken), ok=False).stderr
    dup = tmp_path / "dup.csv"
    dup.write_text("name\nsame\nsame\n")
    result = admin("device", "import", "--pid", pid, str(dup), ok=False)
    assert "repeated" in result.stderr
    assert "(HTTP 422)" in result.stderr


def test_package_upload_list_delete(admin: Admin, tmp_path: Path) -> None:
    pid = _product(admin)
    firmware = tmp_path / "firmware.bin"
    data = bytes(range(256)) * 10 + pid.encode()
    firmware.write_bytes(data)
    package = _json(admin("package", "upload", str(firmware), "--pid", pid, "--type", "fota",
                          "--target", "1.0.1", "--manuf", "001", "--json"))  # fmt: skip
    assert package["size"] == len(data)
    assert package["md5"] == hashlib.md5(data).hexdigest()
    assert package["file_name"] == "firmware.bin"
    listed = admin("package", "list", "--pid", pid)
    assert "firmware.bin" in listed.stdout
    assert "package" in admin("package", "delete", str(package["id"])).stdout
    gone = admin("package", "show", str(package["id"]), ok=False)
    assert gone.exit_code == 1
    assert "(HTTP 404)" in gone.stderr


def test_oversized_upload_is_refused(admin: Admin, tmp_path: Path) -> None:
    pid = _product(admin)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 10_001)
    result = admin("package", "upload", str(big), "--pid", pid, "--type", "sota",
                   "--target", "2", ok=False)  # fmt: skip
    assert result.exit_code == 1
    assert "exceeds 10000 bytes" in result.stderr


def test_task_commands(admin: Admin, tmp_path: Path) -> None:
    pid = _product(admin)
    a = _json(admin("device", "add", "--pid", pid, "--name", "a", "--json"))["dev_id"]
    b = _json(admin("device", "add", "--pid", pid, "--name", "b", "--json"))["dev_id"]
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"task firmware " + pid.encode())
    package_id = _json(admin("package", "upload", str(firmware), "--pid", pid, "--type", "fota",
                             "--target", "2.0", "--json"))["id"]  # fmt: skip
    created = _json(admin("task", "create", "--package", str(package_id), "--dev-id", str(a),
                          "--dev-id", str(b), "--retry", "3", "--deadline",
                          "2099-01-01T00:00:00Z", "--json"))  # fmt: skip
    assert created["total"] == 2
    assert created["deadline"] == 4070908800
    task_id = str(created["id"])
    assert "to_be_upgraded=2" in admin("task", "list", "--pid", pid).stdout
    assert "2 device task(s) changed" in admin("task", "pause", task_id).stdout
    resumed = _json(admin("task", "resume", task_id, "--dev-id", str(a), "--json"))
    assert resumed["state"] == "to_be_upgraded"
    shown = admin("task", "show", task_id)
    assert "paused" in shown.stdout
    assert str(a) in shown.stdout
    cancelled = _json(admin("task", "cancel", task_id, "--json"))
    assert cancelled["counts"]["cancelled"] == 2
    again = admin("task", "cancel", task_id, ok=False)
    assert again.exit_code == 1
    assert "(HTTP 409)" in again.stderr


def test_task_show_names_result_codes(admin: Admin, server: str, tmp_path: Path) -> None:
    pid, dev_id, _, task_id = _device_task(admin, tmp_path, b"result code firmware")
    config = DeviceConfig(
        credentials=Credentials.from_access_key(pid, K1), dev_id=str(dev_id), version="1.0"
    )
    with OtaClient(config, base_url=server) as device:  # the device fails its download
        token = device.check_task().token
        device.check_token(token)
        device.report_status(token, StatusCode.DOWNLOAD_NO_SPACE)
    shown = admin("task", "show", str(task_id)).stdout
    assert "102 download no space (download failed: not enough space)" in shown
    (row,) = _json(admin("task", "show", str(task_id), "--json"))["devices"]
    assert row["result_code"] == 102  # --json stays machine-readable


def test_device_and_product_delete(admin: Admin, tmp_path: Path) -> None:
    pid, dev, _, task_id = _device_task(admin, tmp_path, b"delete firmware ")

    busy = admin("device", "delete", str(dev), ok=False)
    assert busy.exit_code == 1
    assert busy.stderr == (
        f"error: device {dev} has an open task: task {task_id} (to_be_upgraded);"
        " cancel it first (HTTP 409)\n"
    )
    in_use = admin("product", "delete", pid, ok=False)
    assert in_use.exit_code == 1
    assert in_use.stderr == (
        f"error: product {pid} still has 1 device, 1 package, 1 task; delete them first"
        " (HTTP 409)\n"
    )

    admin("task", "cancel", str(task_id))
    assert admin("device", "delete", str(dev)).stdout == f"device {dev} deleted\n"
    gone = admin("device", "show", str(dev), ok=False)
    assert (gone.exit_code, gone.stderr) == (1, f"error: device {dev} not found (HTTP 404)\n")
    again = admin("device", "delete", str(dev), ok=False)
    assert (again.exit_code, again.stderr) == (1, f"error: device {dev} not found (HTTP 404)\n")

    empty = _product(admin)
    assert _json(admin("product", "delete", empty, "--json")) == {"deleted": empty}
    missing = admin("product", "delete", empty, ok=False)
    assert (missing.exit_code, missing.stdout) == (1, "")
    assert missing.stderr == f"error: product {empty} not found (HTTP 404)\n"


def test_device_delete_json(admin: Admin) -> None:
    pid = _product(admin)
    dev = _json(admin("device", "add", "--pid", pid, "--name", "a", "--json"))["dev_id"]
    assert _json(admin("device", "delete", str(dev), "--json")) == {"deleted": dev}
    assert admin("product", "delete", pid).stdout == f"product {pid} deleted\n"


def test_task_delete(admin: Admin, tmp_path: Path) -> None:
    _, dev, package_id, task_id = _device_task(admin, tmp_path, b"task delete firmware ")

    busy = admin("task", "delete", str(task_id), ok=False)
    assert (busy.exit_code, busy.stdout) == (1, "")
    assert busy.stderr == (
        f"error: task {task_id} has 1 open device task: {dev} (to_be_upgraded);"
        " cancel the task first (HTTP 409)\n"
    )
    in_use = admin("package", "delete", str(package_id), ok=False)
    assert in_use.stderr == f"error: package {package_id} is used by 1 task(s) (HTTP 409)\n"

    admin("task", "cancel", str(task_id))
    assert admin("task", "delete", str(task_id)).stdout == f"task {task_id} deleted\n"
    gone = admin("task", "show", str(task_id), ok=False)
    assert (gone.exit_code, gone.stderr) == (1, f"error: task {task_id} not found (HTTP 404)\n")
    again = admin("task", "delete", str(task_id), "--json", ok=False)
    assert (again.exit_code, again.stdout) == (1, "")
    assert again.stderr == f"error: task {task_id} not found (HTTP 404)\n"
    assert _json(admin("device", "show", str(dev), "--json"))["tasks"] == []
    admin("package", "delete", str(package_id))  # no task uses it any more


def test_task_delete_json(admin: Admin, tmp_path: Path) -> None:
    pid, _, _, task_id = _device_task(admin, tmp_path, b"task delete json ")
    admin("task", "cancel", str(task_id), "--json")
    assert _json(admin("task", "delete", str(task_id), "--json")) == {"deleted": task_id}
    assert _json(admin("task", "list", "--pid", pid, "--json"))["items"] == []


def test_task_create_needs_targets_and_dates(admin: Admin) -> None:
    result = admin("task", "create", "--package", "1", ok=False)
    assert result.exit_code == 1
    assert "--dev-id or --from-version" in result.stderr
    result = admin("task", "create", "--package", "1", "--dev-id", "1", "--deadline", "soon",
                   ok=False)  # fmt: skip
    assert result.exit_code == 1
    assert "ISO 8601" in result.stderr


def test_wrong_token_and_unreachable_server(admin: Admin) -> None:
    result = admin("product", "list", "--admin-token", "wrong-token-wrong-token", ok=False)
    assert result.exit_code == 1
    assert "ONENET_OTA_ADMIN_TOKEN" in result.stderr
    result = admin("product", "list", "--server", "http://127.0.0.1:9", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach http://127.0.0.1:9")
    result = admin("product", "list", "--server", "ftp://x", ok=False)
    assert result.exit_code == 1
    assert "http://" in result.stderr
    assert "Traceback" not in result.output


def test_not_an_onenet_ota_server(admin: Admin, server: str) -> None:
    # The device API answers /elsewhere with an empty 404: no JSON error, still a clear message.
    result = admin("product", "list", "--server", server + "/elsewhere", ok=False)
    assert result.exit_code == 1
    assert "is this an onenet-ota server?" in result.stderr


def test_device_history_and_finished_task(admin: Admin, server: str, tmp_path: Path) -> None:
    pid, dev_id, _, task_id = _device_task(admin, tmp_path, b"history firmware")
    config = DeviceConfig(
        credentials=Credentials.from_access_key(pid, K1), dev_id=str(dev_id), version="1.0"
    )
    assert _json(admin("task", "show", str(task_id), "--json"))["status"] == "active"
    with OtaClient(config, base_url=server) as device:  # the package fails its MD5 check
        token = device.check_task().token
        device.check_task()  # polling again adds nothing to the timeline
        device.check_token(token)
        device.report_status(token, StatusCode.DOWNLOADED)
        device.report_status(token, StatusCode.UPGRADE_MD5_MISMATCH)
    shown = admin("device", "history", str(dev_id)).stdout
    lines = shown.splitlines()
    assert lines[0].split() == ["ID", "TIME", "TASK", "KIND", "VIA", "CODE", "CHANGE", "NOTE"]
    kinds = ["offered", "version", "state", "report", "report"]  # E3 records the version
    assert [line.split()[4] for line in lines[1:]] == kinds
    assert "classic/E3" in lines[1]
    assert "f_version=1.0" in lines[2]
    assert "to_be_upgraded -> downloading" in lines[3]
    assert "classic/E5" in lines[3]
    assert "101 downloaded" in lines[4]
    assert "205 md5 mismatch" in lines[5]
    assert "upgrading -> failed" in lines[5]
    assert "upgrade failed: MD5 check failed" in lines[5]
    page = _json(admin("device", "history", str(dev_id), "--task", str(task_id), "--json"))
    last = page["items"][-1]
    assert (last["code"], last["status_name"]) == (205, "md5 mismatch")
    assert (last["from_state"], last["to_state"], last["endpoint"]) == ("upgrading", "failed", "E7")
    # Every device of the task has ended: the task shows finished everywhere.
    assert _json(admin("task", "show", str(task_id), "--json"))["status"] == "finished"
    listed = admin("task", "list", "--pid", pid, "--status", "finished").stdout
    assert "finished" in listed
    assert str(task_id) in listed
    assert "(none)" in admin("task", "list", "--pid", pid, "--status", "active").stdout
    (row,) = _json(admin("task", "show", str(task_id), "--json"))["devices"]
    assert (row["status_name"], row["status_text"]) == (
        "md5 mismatch",
        "upgrade failed: MD5 check failed",
    )
    device_shown = admin("device", "show", str(dev_id)).stdout
    assert "205 md5 mismatch (upgrade failed: MD5 check failed)" in device_shown

"""Logs of a real ``onenet-ota serve``: the access log, JSON lines, and no secret in any line."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest

from onenet_ota import auth
from onenet_ota.server.logs import JsonFormatter, configure_logging, redact
from tests.server.serve_process import ServerProcess

TOKEN = "admin-token-for-log-tests-0123456"
METRICS_TOKEN = "metrics-token-for-log-tests-0123"
PID = "123123"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1
DEVICE_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
QUERY_SIGN = "QuerySignNobodyMayLog0123456789"
QUERY_TOKEN = "QueryTokenNobodyMayLog012345678"


def _wait_until_serving(url: str) -> None:
    for _ in range(100):  # workers start after the socket listens
        try:
            httpx2.get(url + "/healthz")
            return
        except httpx2.TransportError:
            time.sleep(0.1)


def _traffic(url: str, data_dir: Path) -> list[str]:
    """Requests carrying every kind of secret, in headers, queries, paths and bodies, some of
    them failing inside the server; returns the secrets sent."""
    admin = httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert admin.post("/api/v1/products", json={"pid": PID, "access_key": K1}).is_success
    reply = admin.post(
        "/api/v1/devices", json={"pid": PID, "name": "dev01", "device_key": DEVICE_KEY}
    )
    assert reply.status_code == 201, reply.text
    dev_id = reply.json()["dev_id"]
    upload = admin.post(
        "/api/v1/packages",
        params={"pid": PID, "type": "fota", "target": "2.0", "file_name": "fw.bin"},
        content=b"firmware" * 100,
    )
    body = {"package_id": upload.json()["id"], "dev_ids": [dev_id]}
    assert admin.post("/api/v1/tasks", json=body).status_code == 201
    product_token = auth.build_token(PID, K1)
    device_token = auth.build_token(PID, DEVICE_KEY, device_name="dev01")
    fuse_token = auth.build_token(PID, DEVICE_KEY, device_name="dev01", version=auth.VERSION_2022)
    sdk = {"Authorization": product_token}
    check = httpx2.get(
        url + "/ota/south/check",
        params={
            "dev_id": dev_id, "type": 1, "version": "1.0", "sign": QUERY_SIGN, "token": QUERY_TOKEN,
        },
        headers=sdk,
    )  # fmt: skip
    download_token = check.json()["data"]["token"]
    quoted = quote(download_token, safe="")
    httpx2.get(f"{url}/ota/south/download/{quoted}/check", params={"dev_id": dev_id}, headers=sdk)
    httpx2.get(f"{url}/ota/south/download/{quoted}", headers={"Range": "0-9"})
    httpx2.get(f"{url}/ota/south/download/{quoted}/x/y")  # unmatched, token still in the path
    httpx2.post(
        f"{url}/ota/south/device/download/{quoted}/progress",
        params={"dev_id": dev_id},
        json={"step": 10},
        headers={"Authorization": device_token},
    )
    httpx2.get(f"{url}/fuse-ota/{PID}/dev01/check", params={"type": 1, "version": "1.0"},
               headers={"Authorization": fuse_token})  # fmt: skip
    httpx2.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    httpx2.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}-wrong"})
    httpx2.get(url + "/api/v1/products", headers={"Authorization": f"Bearer {TOKEN}-wrong"})
    # The database fails under the requests now: tracebacks are logged.
    with sqlite3.connect(data_dir / "onenet-ota.db") as db:
        db.execute("ALTER TABLE device_tasks RENAME TO device_tasks_gone")
    httpx2.post(
        url + "/ota/south/report",
        params={"dev_id": dev_id, "token": download_token},
        json={"result": 201},
        headers=sdk,
    )
    httpx2.get(f"{url}/ota/south/download/{quoted}/check", params={"dev_id": dev_id}, headers=sdk)
    admin.get(f"/api/v1/tasks?dev_id={dev_id}")
    admin.close()
    secrets = [TOKEN, METRICS_TOKEN, K1, DEVICE_KEY, QUERY_SIGN, QUERY_TOKEN, download_token]
    for authorization in (product_token, device_token, fuse_token):
        secrets.append(authorization)
        sign = auth.parse_any_token(authorization).sign  # as sent (percent-encoded) and decoded
        secrets += [sign, quote(sign, safe="")]
    return secrets + [quote(s, safe="") for s in (K1, DEVICE_KEY, download_token)]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_any_log_line(tmp_path: Path, log_format: str) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(
        data_dir, "--admin-token", TOKEN, "--access-log", "--log-format", log_format,
        "--log-level", "debug", "--metrics", "token",
        env={"ONENET_OTA_METRICS_TOKEN": METRICS_TOKEN},
    )  # fmt: skip
    try:
        url = server.url()
        _wait_until_serving(url)
        secrets = _traffic(url, data_dir)
    finally:
        assert server.stop() == 0
    lines = server.lines
    assert any("Traceback" in line or "exception" in line for line in lines)  # failures logged
    for secret in secrets:
        assert len(secret) >= 16
        leaking = [line for line in lines if secret in line]
        assert not leaking, f"{secret!r} logged: {leaking[:3]}"


def test_access_log_lines_are_json_with_every_field(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(
        data_dir, "--admin-token", TOKEN, "--access-log", "--log-format", "json",
    )  # fmt: skip
    try:
        url = server.url()
        _wait_until_serving(url)
        httpx2.get(url + "/ota/south/check", params={"dev_id": 1, "token": QUERY_TOKEN})
        httpx2.head(url + "/healthz")
        httpx2.get(url + "/nowhere/at-all")
    finally:
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message", "process"} <= set(entry)
    access = [e for e in entries if e["logger"] == "onenet_ota.access"]
    check = next(e for e in access if e["endpoint"] == "E3")
    assert check["path"] == "/ota/south/check"  # never the query
    assert check["method"] == "GET"
    assert check["status"] == 200
    assert check["dialect"] == "classic"
    assert check["client"] == "127.0.0.1"
    assert check["bytes"] > 0
    assert check["duration_ms"] >= 0
    health = next(e for e in access if e["endpoint"] == "healthz" and e["method"] == "HEAD")
    assert health["bytes"] == 0  # HEAD: no body sent
    nowhere = next(e for e in access if e["endpoint"] == "unmatched")
    assert nowhere["status"] == 404
    assert nowhere["path"] == "/nowhere/at-all"


def test_access_log_is_off_by_default(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--admin-token", TOKEN)
    try:
        url = server.url()
        _wait_until_serving(url)
        httpx2.get(url + "/ota/south/check")
    finally:
        assert server.stop() == 0
    assert not [line for line in server.lines if "onenet_ota.access" in line]
    assert any("listening on" in line for line in server.lines)  # text lines, as before


@pytest.mark.parametrize(
    ("line", "secret", "kept"),
    [
        ("GET /ota/south/download/abc%2Fdef/check", "abc%2Fdef", "/ota/south/download/***/check"),
        ("/ota/south/device/download/tok123/progress", "tok123", "/download/***/progress"),
        ("Authorization: Bearer abc.def", "abc.def", "Authorization: "),
        ("res=products%2F1&et=1&method=sha1&sign=a%2Bb", "a%2Bb", "res=products%2F1&et=1"),
        ('{"access_key": "MHEo/Py2="}', "MHEo/Py2=", '{"access_key": "***"}'),
        ("report ?dev_id=1&token=abcdef", "abcdef", "dev_id=1&token=***"),
    ],
)
def test_redact_blanks_credentials(line: str, secret: str, kept: str) -> None:
    shown = redact(line)
    assert secret not in shown
    assert kept in shown


def test_configuring_leaves_logging_set_up_by_someone_else_alone() -> None:
    """As ``logging.basicConfig``: a process whose logging is already set up (an application
    embedding the server, a test runner) keeps its handlers and level."""
    root = logging.getLogger()
    theirs = logging.NullHandler()
    saved = (root.level, list(root.handlers))
    root.addHandler(theirs)
    root.setLevel(logging.WARNING)
    try:
        configure_logging(logging.DEBUG, "json")
        assert root.level == logging.WARNING
        assert theirs in root.handlers
        assert not [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]

"""Studio (§12) and fuse (§13) devices upgrading against the real platform (``create_app``) on
loopback, SQLite and PostgreSQL. Setup and verdicts go through the management API only: the
tasks are the ones it creates (S10, F14), and the server's record is what counts.

The devices here are plain HTTP clients speaking each dialect as §12.2 and §13.1 write it (the
device SDK's own dialect support is tested with the SDK)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx2
import pytest

from onenet_ota import auth
from tests.integration.conftest import CURRENT, TARGET, Platform, World
from tests.server.seed import FIRMWARE

CHUNK = 4096


def _flow(platform: Platform, world: World, prefix: str, authorization: str) -> bytes:
    """check, task status, ranged download, reports 101 and 201; returns the bytes served.
    Business answers are read through the dialect's envelope key (errno or code)."""
    key = "errno" if prefix == "/ota" else "code"
    base = f"{prefix}/{world.pid}/{world.name}"
    headers = {"Authorization": authorization}
    with httpx2.Client(base_url=platform.api.url, headers=headers, timeout=30) as http:

        def ok(reply: httpx2.Response) -> dict[str, Any]:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body[key] == 0, body
            return dict(body)

        ok(http.post(f"{base}/version", json={"f_version": CURRENT}))
        data = ok(http.get(f"{base}/check", params={"type": 1, "version": CURRENT}))["data"]
        assert (data["target"], data["size"], data["status"]) == (TARGET, len(FIRMWARE), 1)
        tid = data["tid"]
        assert ok(http.get(f"{base}/{tid}/check"))["data"] == {"status": 2}
        received = bytearray()
        while len(received) < data["size"]:
            end = min(len(received) + CHUNK, data["size"]) - 1
            reply = http.get(
                f"{base}/{tid}/download/", headers={"Range": f"bytes={len(received)}-{end}"}
            )
            assert reply.status_code == 206
            assert reply.headers.get("Ota-Errno", "0") == "0"
            received += reply.content
        ok(http.post(f"{base}/{tid}/status", json={"step": 101}))
        ok(http.post(f"{base}/{tid}/status", json={"step": 201}))
    return bytes(received)


@pytest.mark.parametrize(
    ("prefix", "version"),
    [("/ota", auth.VERSION), ("/fuse-ota", auth.VERSION_2022)],
    ids=["studio", "fuse"],
)
def test_device_token_upgrade_ends_succeeded(platform: Platform, prefix: str, version: str) -> None:
    world = platform.world()
    token = auth.build_token(world.pid, world.access_key, device_name=world.name, version=version)
    assert _flow(platform, world, prefix, token) == FIRMWARE
    assert platform.state(world) == "succeeded"
    assert platform.device(world)["f_version"] == TARGET


def test_fuse_account_token_upgrade_and_revocation(platform: Platform) -> None:
    """F2, F12: the owning account's userid token upgrades any device of its products; after a
    key rotation the old token gets 10403 at once."""
    world = platform.world(own_product=True)
    uid = str(secrets.randbelow(10**12) + 10**12)
    account = platform.call("POST", "/accounts", json={"uid": uid, "name": "e2e"}, expect=201)
    platform.call("PUT", f"/products/{world.pid}/account", json={"uid": uid})
    token = auth.build_user_token(uid, account["access_key"])
    assert _flow(platform, world, "/fuse-ota", token) == FIRMWARE
    assert platform.state(world) == "succeeded"
    platform.call("POST", f"/accounts/{uid}/rotate-key", json={})
    reply = httpx2.get(
        f"{platform.api.url}/fuse-ota/{world.pid}/{world.name}/version",
        headers={"Authorization": token},
    )
    assert reply.json()["code"] == 10403


def test_switching_dialect_mid_task_shares_the_task(platform: Platform) -> None:
    """S10, F14: classic E3 issues a token, Studio checks the tid, fuse downloads and reports;
    the management API sees one task end."""
    world = platform.world()
    product_token = auth.build_token(world.pid, world.access_key)
    with httpx2.Client(
        base_url=platform.api.url, headers={"Authorization": product_token}, timeout=30
    ) as http:
        classic = http.get(
            "/ota/south/check",
            params={"dev_id": world.dev_id, "type": 1, "version": CURRENT},
        ).json()
        assert classic["errno"] == 0
        studio = http.get(
            f"/ota/{world.pid}/{world.name}/check", params={"type": 1, "version": CURRENT}
        ).json()
        tid = studio["data"]["tid"]
        assert http.get(f"/ota/{world.pid}/{world.name}/{tid}/check").json()["data"] == {
            "status": 2
        }
        e5 = http.get(
            f"/ota/south/download/{classic['data']['token']}/check",
            params={"dev_id": world.dev_id},
        ).json()
        assert e5["errno"] == 0  # the same task, already downloading
        fuse = f"/fuse-ota/{world.pid}/{world.name}/{tid}"
        reply = http.get(f"{fuse}/download")
        assert (reply.status_code, reply.content) == (200, FIRMWARE)
        assert http.post(f"{fuse}/status", json={"step": 101}).json()["code"] == 0
        assert http.post(f"{fuse}/status", json={"step": 201}).json()["code"] == 0
    assert platform.state(world) == "succeeded"

"""Staged campaigns end to end: 1,000 simulated devices running the real upgrader against the
real platform (SQLite and PostgreSQL), with the campaign evaluator running on the server's loop.

A defective package (a fraction of devices report 205 or 206) pauses the campaign at its first
stage's ceiling and no device of a later stage is ever activated; a clean package runs through
every stage to finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from pydantic import SecretStr

from onenet_ota.management import ManagementClient
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.sim import FleetConfig
from onenet_ota.sim.fleet import Fleet, Phase
from onenet_ota.sim.provision import FleetTarget
from tests.server.seed import DB_PARAMS, module_database
from tests.serverthread import ServerThread

TOKEN = "campaign-fleet-admin-token"
DEVICES = 1000
PACKAGE = bytes(range(256)) * 16  # 4 KiB: one chunk


@pytest.fixture(scope="module", params=DB_PARAMS)
def admin(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ManagementClient, str]]:
    """The platform with its campaign evaluator running, and a management client."""
    with module_database(request, tmp_path_factory) as engine:
        settings = Settings(
            db=engine.url.render_as_string(hide_password=False),
            data_dir=tmp_path_factory.mktemp("campaign-platform"),
            admin_token=SecretStr(TOKEN),
        )
        handler, resources = create_app(settings)
        try:
            with ServerThread(handler) as server:
                evaluator: Future[None] = asyncio.run_coroutine_threadsafe(
                    resources.evaluator.run_forever(), server.loop
                )
                client = ManagementClient(server.url, TOKEN)
                try:
                    yield client, server.url
                finally:
                    client.close()
                    server.loop.call_soon_threadsafe(evaluator.cancel)
        finally:
            asyncio.run(resources.aclose())


_NAMES: dict[int, str] = {}
"""Every created device's name by dev_id (the fleet's devices carry their names)."""


def _setup(client: ManagementClient, name: str) -> tuple[str, str, int, list[int]]:
    product = client.request("POST", "/products", json_body={"name": name})
    body = {"pid": product["pid"], "devices": [{"name": f"{name}-{i:04d}"} for i in range(DEVICES)]}
    created = client.request("POST", "/devices/import", json_body=body)
    package = client.request(
        "POST",
        "/packages",
        params={"pid": product["pid"], "type": "fota", "target": "2.0.0", "file_name": "fw.bin"},
        content=iter([PACKAGE]),
        headers={"Content-Type": "application/octet-stream"},
    )
    dev_ids = [int(item["dev_id"]) for item in created["items"]]
    _NAMES.update({int(item["dev_id"]): str(item["name"]) for item in created["items"]})
    return product["pid"], product["access_key"], int(package["id"]), dev_ids


def _members(client: ManagementClient, package_id: int) -> set[int]:
    """Every device that has a device task of the package (what the campaign activated)."""
    found: set[int] = set()
    tasks = client.request("GET", "/tasks", params={"package_id": package_id, "limit": 1000})
    for task in tasks["items"]:
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after is not None:
                params["after"] = after
            page = client.request("GET", f"/tasks/{task['id']}/devices", params=params)
            found.update(int(item["dev_id"]) for item in page["items"])
            after = page["next"]
            if after is None:
                break
    return found


def _run(url: str, pid: str, key: str, dev_ids: set[int], **faults: Any) -> list[Phase]:
    config = FleetConfig(
        devices=len(dev_ids),
        concurrency=min(len(dev_ids), 128),
        version="1.0.0",
        target="2.0.0",
        chunk_size=4096,
        retry_interval=0.02,
        seed=11,
        **faults,
    )
    target = FleetTarget(
        pid=pid,
        access_key=key,
        task_id=0,
        dev_ids=tuple(sorted(dev_ids)),
        names=tuple(_NAMES[dev_id] for dev_id in sorted(dev_ids)),
        task_type=TaskType.FOTA,
        version="1.0.0",
        target="2.0.0",
        size=len(PACKAGE),
        md5=hashlib.md5(PACKAGE, usedforsecurity=False).hexdigest(),
        created=True,
    )
    state = asyncio.run(Fleet(config, target, url).run())
    return [record.phase for record in state.devices]


def _wait_for(client: ManagementClient, campaign_id: int, states: set[str]) -> dict[str, Any]:
    # The evaluator acts within a fraction of a second; the bound only stops a broken run.
    deadline = time.monotonic() + 60
    while True:
        campaign: dict[str, Any] = client.request("GET", f"/campaigns/{campaign_id}")
        if campaign["state"] in states or time.monotonic() > deadline:
            return campaign
        time.sleep(0.05)


# A thousand real upgrades on a machine shared with other work: more than the default limit.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_defective_package_pauses_at_the_first_ceiling(admin: tuple[ManagementClient, str]) -> None:
    client, url = admin
    pid, key, package_id, dev_ids = _setup(client, "defective")
    stages = [
        {"count": 100, "min_executed": 20, "max_failed_percent": 10, "success_percent": 90},
        {"percent": 50, "max_failed_percent": 10},
        {"rest": True},
    ]
    spec = {"package_id": package_id, "selector": {}, "stages": stages}
    preview = client.request("POST", "/campaigns/preview", json_body=spec)
    assert [s["devices"] for s in preview["stages"]] == [100, 400, 500]
    campaign = client.request("POST", "/campaigns", json_body=spec)
    client.request("POST", f"/campaigns/{campaign['id']}/start")
    first = _members(client, package_id)
    assert len(first) == 100

    phases = _run(url, pid, key, first, defective_rate=0.3)
    assert Phase.FAILED in phases
    campaign = _wait_for(client, campaign["id"], {"paused", "aborted", "finished"})
    assert campaign["state"] == "paused"
    assert campaign["stage"] == 0
    (decision,) = [e for e in campaign["events"] if e["actor"] == "auto"]
    assert decision["action"] == "pause"
    assert decision["numbers"]["failed_package"] * 100 >= 10 * decision["numbers"]["executed"]

    # Every other device checks in: none of them has a task, and none is ever activated.
    rest = set(dev_ids) - first
    assert set(_run(url, pid, key, rest)) == {Phase.NO_TASK}
    assert _members(client, package_id) == first
    detail = client.request("GET", f"/campaigns/{campaign['id']}")
    assert [s["counts"]["targeted"] for s in detail["stages"]] == [100, 0, 0]
    assert detail["state"] == "paused"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clean_package_runs_through_every_stage(admin: tuple[ManagementClient, str]) -> None:
    client, url = admin
    pid, key, package_id, dev_ids = _setup(client, "clean")
    stages = [
        {"count": 50, "success_percent": 95, "min_executed": 10},
        {"percent": 30, "success_percent": 95},
        {"rest": True, "success_percent": 95},
    ]
    spec = {"package_id": package_id, "selector": {}, "stages": stages}
    campaign = client.request("POST", "/campaigns", json_body=spec)
    client.request("POST", f"/campaigns/{campaign['id']}/start")
    done: set[int] = set()
    members = _members(client, package_id)
    for _ in range(len(stages)):
        assert set(_run(url, pid, key, members - done)) == {Phase.SUCCEEDED}
        done |= members
        # The evaluator advances (new members) or finishes; the bound only stops a broken run.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            campaign = client.request("GET", f"/campaigns/{campaign['id']}")
            members = _members(client, package_id)
            if campaign["state"] != "running" or members != done:
                break
            time.sleep(0.05)
        if campaign["state"] != "running":
            break
    assert campaign["state"] == "finished"
    assert done == set(dev_ids)
    counts = [s["counts"] for s in campaign["stages"]]
    assert [c["targeted"] for c in counts] == [50, 250, 700]
    assert all(c["succeeded"] == c["targeted"] for c in counts)
    actions = [(e["actor"], e["action"]) for e in reversed(campaign["events"])]
    assert actions == [
        ("operator", "start"),
        ("auto", "advance"),
        ("auto", "advance"),
        ("auto", "finish"),
    ]

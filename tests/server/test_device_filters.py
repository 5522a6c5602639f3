"""The device list's filters over the management API: ``state`` (idle, or the open task's
state), ``label``, product, version and name, alone and together, with the clear 422 of a bad
value. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, update

from onenet_ota.protocol.states import TaskState
from onenet_ota.server.admin_api import AdminApi
from onenet_ota.server.admin_service import DEVICE_STATES, AdminService
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import device_tasks
from tests.serverthread import ServerThread

ADMIN = "first-admin-secret-for-filter-tests"


@pytest.fixture
def client(engine: Engine, tmp_path: Path) -> Iterator[httpx2.Client]:
    service = AdminService(engine, BlobStore(tmp_path / "packages"))
    api = AdminApi(service, admin_token=ADMIN, max_upload_bytes=1 << 20)
    with (
        ServerThread(api.handle) as srv,
        httpx2.Client(
            base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as c,
    ):
        yield c


def ids(client: httpx2.Client, **params: Any) -> list[int]:
    reply = client.get("/devices", params=params)
    assert reply.status_code == 200, reply.text
    return [d["dev_id"] for d in reply.json()["items"]]


def test_devices_filter_by_state_and_labels(client: httpx2.Client, engine: Engine) -> None:
    assert client.post("/products", json={"pid": "p1"}).status_code == 201
    made = client.post(
        "/devices/import",
        json={"pid": "p1", "devices": [{"dev_id": n, "name": f"d{n}"} for n in range(1, 6)]},
    )
    assert made.status_code == 201, made.text
    package = client.post(
        "/packages",
        params={"pid": "p1", "type": "fota", "target": "2.0", "file_name": "fw.bin"},
        content=b"firmware",
    ).json()
    task = client.post("/tasks", json={"package_id": package["id"], "dev_ids": [1, 2, 3, 4]})
    assert task.status_code == 201, task.text
    task_id = task.json()["id"]
    assert client.post(f"/tasks/{task_id}/devices/2/pause").status_code == 200
    assert client.post(f"/tasks/{task_id}/devices/4/cancel").status_code == 200
    # Device 3 downloads: the device API's doing, written here as it writes it.
    with engine.begin() as conn:
        conn.execute(
            update(device_tasks)
            .where(device_tasks.c.dev_id == 3)
            .values(state=int(TaskState.DOWNLOADING))
        )
    assert client.put("/devices/1/labels", json={"labels": {"site": "north"}}).status_code == 200
    assert client.put("/devices/5/labels", json={"labels": {"site": "north"}}).status_code == 200

    assert ids(client, state="idle") == [4, 5]  # a cancelled task is no longer open
    assert ids(client, state="to_be_upgraded") == [1]
    assert ids(client, state="paused") == [2]
    assert ids(client, state="downloading") == [3]
    assert ids(client, state="upgrading") == []
    assert ids(client, label="site=north") == [1, 5]
    assert ids(client, label="site=north", state="idle") == [5]
    assert ids(client, label="site=south") == []
    assert ids(client, state="idle", q="d4", pid="p1") == [4]
    assert set(DEVICE_STATES) == {"idle", "to_be_upgraded", "downloading", "upgrading", "paused"}
    # Pages follow the filter.
    first = client.get("/devices", params={"state": "idle", "limit": 1}).json()
    assert [d["dev_id"] for d in first["items"]] == [4]
    assert ids(client, state="idle", limit=1, after=first["next"]) == [5]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"state": "asleep"}, "state"),
        ({"label": "no-equals-sign"}, "label"),
        ({"pid": "bad pid!"}, "pid"),
    ],
)
def test_a_bad_filter_is_a_clear_422(
    client: httpx2.Client, params: dict[str, str], words: str
) -> None:
    reply = client.get("/devices", params=params)
    assert reply.status_code == 422, reply.text
    assert words in reply.json()["error"]["message"]

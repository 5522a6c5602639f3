"""The audit log (server/audit.py): one row per management action, named for the token that
asked, with before and after and every secret redacted, written in the action's own
transaction; ``GET /api/v1/audit`` with its filters and pages. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, func, select

from onenet_ota.server import audit, changes
from onenet_ota.server.admin_api import AdminApi
from onenet_ota.server.admin_service import AdminService, KeyRotate, ProductCreate
from onenet_ota.server.api_tokens import ApiTokenCreate
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import audit_log, products
from tests.serverthread import ServerThread

ADMIN = "first-admin-secret-for-audit-tests"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
K3 = "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY="


@dataclass
class Setup:
    engine: Engine
    service: AdminService
    operator: httpx2.Client
    viewer: httpx2.Client
    admin: httpx2.Client
    operator_secret: str


@pytest.fixture
def setup(engine: Engine, tmp_path: Path) -> Iterator[Setup]:
    """A management API on a fresh database (conftest's engine) with an operator named ``ops``,
    a viewer named ``auditor`` and the first start's ``admin``."""
    service = AdminService(engine, BlobStore(tmp_path / "packages"))
    api = AdminApi(service, admin_token=ADMIN, max_upload_bytes=1 << 20)
    ops = api.tokens.create(ApiTokenCreate(name="ops", role="operator"))
    auditor = api.tokens.create(ApiTokenCreate(name="auditor", role="viewer"))
    with ServerThread(api.handle) as srv:

        def client(secret: str) -> httpx2.Client:
            return httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {secret}"})

        with (
            client(ops.secret) as operator,
            client(auditor.secret) as viewer,
            client(ADMIN) as admin,
        ):
            yield Setup(engine, service, operator, viewer, admin, ops.secret)


def entries(client: httpx2.Client, **params: Any) -> list[dict[str, Any]]:
    """Every audit entry matching ``params``, following the pages."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        reply = client.get("/api/v1/audit", params={**params, "limit": 3, "after": after})
        assert reply.status_code == 200, reply.text
        page = reply.json()
        found.extend(page["items"])
        after = page["next"]
        if after is None:
            return found


def ok(reply: httpx2.Response, status: int = 200) -> Any:
    assert reply.status_code == status, reply.text
    return reply.json() if reply.content else None


def test_every_management_action_is_recorded_with_before_and_after(setup: Setup) -> None:
    c = setup.operator
    ok(c.post("/api/v1/accounts", json={"uid": "4242", "access_key": K1}), 201)
    ok(c.post("/api/v1/products", json={"pid": "p1", "access_key": K2, "name": "one"}), 201)
    ok(c.put("/api/v1/products/p1/account", json={"uid": "4242"}))
    ok(c.post("/api/v1/products/p1/rotate-key", json={"access_key": K3}))
    ok(c.delete("/api/v1/products/p1/account"))
    ok(c.post("/api/v1/accounts/4242/rotate-key", json={}))
    dev = ok(c.post("/api/v1/devices", json={"pid": "p1", "name": "d1", "device_key": K1}), 201)
    dev_id = dev["dev_id"]
    ok(c.post("/api/v1/devices/import", json={"pid": "p1", "devices": [{"name": "d2"}]}), 201)
    ok(c.post(f"/api/v1/devices/{dev_id}/rotate-key", json={"device_key": K2}))
    package = ok(
        c.post(
            "/api/v1/packages",
            params={"pid": "p1", "type": "fota", "target": "2.0", "file_name": "fw.bin"},
            content=b"firmware",
        ),
        201,
    )
    task = ok(c.post("/api/v1/tasks", json={"package_id": package["id"], "dev_ids": [dev_id]}), 201)
    ok(c.post(f"/api/v1/tasks/{task['id']}/pause"))
    ok(c.post(f"/api/v1/tasks/{task['id']}/devices/{dev_id}/resume"))
    ok(c.post(f"/api/v1/tasks/{task['id']}/cancel"))
    ok(c.delete(f"/api/v1/tasks/{task['id']}"), 204)
    ok(c.delete(f"/api/v1/packages/{package['id']}"), 204)
    ok(c.delete(f"/api/v1/devices/{dev_id}"), 204)
    token = ok(setup.admin.post("/api/v1/tokens", json={"name": "ci"}), 201)
    ok(setup.admin.delete(f"/api/v1/tokens/{token['id']}"), 204)

    log = entries(setup.viewer)
    by_ops = [(e["action"], e["target"]) for e in log if e["actor"] == "ops"]
    assert by_ops == [
        ("account.create", "account:4242"),
        ("product.create", "product:p1"),
        ("product.set_account", "product:p1"),
        ("product.rotate_key", "product:p1"),
        ("product.clear_account", "product:p1"),
        ("account.rotate_key", "account:4242"),
        ("device.create", f"device:{dev_id}"),
        ("device.import", "product:p1"),
        ("device.rotate_key", f"device:{dev_id}"),
        ("package.create", f"package:{package['id']}"),
        ("task.create", f"task:{task['id']}"),
        ("task.pause", f"task:{task['id']}"),
        ("task.device_resume", f"task:{task['id']}/device:{dev_id}"),
        ("task.cancel", f"task:{task['id']}"),
        ("task.delete", f"task:{task['id']}"),
        ("package.delete", f"package:{package['id']}"),
        ("device.delete", f"device:{dev_id}"),
    ]
    by_admin = [(e["action"], e["target"]) for e in log if e["actor"] == "admin"]
    assert by_admin == [("token.create", f"token:{token['id']}")] * 1 + [
        ("token.revoke", f"token:{token['id']}")
    ]
    ids = [e["id"] for e in log]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)

    def one(action: str) -> dict[str, Any]:
        return next(e for e in log if e["action"] == action)

    assigned = one("product.set_account")
    assert assigned["before"]["account_uid"] is None
    assert assigned["after"]["account_uid"] == "4242"
    created = one("product.create")
    assert created["before"] is None
    assert created["after"]["name"] == "one"
    assert one("device.delete")["after"] is None
    assert one("device.delete")["before"]["name"] == "d1"
    assert one("device.import")["after"]["devices"][0]["name"] == "d2"
    paused = one("task.pause")
    assert paused["before"]["status"] == "active"
    assert paused["after"]["status"] == "paused"
    assert paused["detail"] == "1 device task(s) changed"
    revoked = one("token.revoke")
    assert revoked["before"]["revoked_at"] is None
    assert revoked["after"]["revoked_at"] is not None

    # No key, secret or hash anywhere in the log; a key's presence shows as "(redacted)".
    text = json.dumps(log)
    for secret in (K1, K2, K3, token["secret"], setup.operator_secret, ADMIN):
        assert secret not in text
    rotated = one("product.rotate_key")
    assert rotated["before"]["access_key"] == audit.REDACTED
    assert rotated["after"]["access_key"] == audit.REDACTED
    assert one("device.rotate_key")["after"]["device_key"] == audit.REDACTED


def test_filters_and_pages(setup: Setup) -> None:
    c = setup.operator
    start = int(time.time())
    for pid in ("f1", "f2", "f3"):
        ok(c.post("/api/v1/products", json={"pid": pid}), 201)
    ok(c.delete("/api/v1/products/f2"), 204)
    assert [e["target"] for e in entries(setup.viewer, action="product.create")] == [
        "product:f1", "product:f2", "product:f3"
    ]  # fmt: skip
    assert [e["action"] for e in entries(setup.viewer, target="product:f2")] == [
        "product.create", "product.delete"
    ]  # fmt: skip
    assert len(entries(setup.viewer, actor="ops")) == 4
    assert entries(setup.viewer, actor="nobody") == []
    assert len(entries(setup.viewer, since=start, until=int(time.time()) + 1, actor="ops")) == 4
    assert entries(setup.viewer, since=int(time.time()) + 3600) == []
    reply = setup.viewer.get("/api/v1/audit", params={"limit": 0})
    assert reply.status_code == 422
    reply = setup.viewer.get("/api/v1/audit", params={"since": "yesterday"})
    assert reply.status_code == 422
    assert setup.viewer.get("/api/v1/audit", headers={"Authorization": ""}).status_code == 401


def test_a_failed_action_leaves_no_audit_row(setup: Setup) -> None:
    c = setup.operator
    ok(c.post("/api/v1/products", json={"pid": "busy"}), 201)
    ok(c.post("/api/v1/devices", json={"pid": "busy", "name": "d"}), 201)
    before = entries(setup.viewer)
    assert c.delete("/api/v1/products/busy").status_code == 409  # it has a device
    assert c.post("/api/v1/products", json={"pid": "busy"}).status_code == 409
    assert setup.viewer.post("/api/v1/products", json={"pid": "v"}).status_code == 403
    assert entries(setup.viewer) == before


def test_the_audit_row_is_rolled_back_with_its_change(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is written inside the change's transaction: a failure after it (here the change
    feed's insert, which follows it in rotate_product_key) takes both back."""
    setup.service.create_product(ProductCreate(pid="rb", access_key=K1))
    count = _audit_rows(setup.engine)

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(changes, "publish", broken)  # admin_service calls changes.publish
    with pytest.raises(RuntimeError):
        setup.service.rotate_product_key("rb", KeyRotate(access_key=K2))
    assert _audit_rows(setup.engine) == count
    with setup.engine.connect() as conn:
        key = conn.execute(select(products.c.access_key).where(products.c.pid == "rb")).scalar()
    assert key == K1


def test_record_commits_and_rolls_back_with_the_callers_transaction(engine: Engine) -> None:
    count = _audit_rows(engine)

    def record_then_fail() -> None:
        with engine.begin() as conn:
            audit.record(
                conn, actor="system:test", action="x.y", target="x:1", before=None, after={}
            )
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        record_then_fail()
    assert _audit_rows(engine) == count
    with engine.begin() as conn:
        audit.record(
            conn, actor="system:campaigns", action="campaign.pause", target="campaign:1",
            before={"state": "running"}, after={"state": "paused"},
            detail="paused: 7/40 = 17.5 % > 10 % after 20 executed",
        )  # fmt: skip
    page = audit.list_entries(engine, actor="system:campaigns")
    assert page.items[-1].detail == "paused: 7/40 = 17.5 % > 10 % after 20 executed"
    assert page.items[-1].after == {"state": "paused"}


def test_direct_service_calls_name_their_actor(engine: Engine, tmp_path: Path) -> None:
    service = AdminService(engine, BlobStore(tmp_path))
    service.create_product(ProductCreate(pid="direct"))
    with audit.acting_as("maintenance-script"):
        service.create_product(ProductCreate(pid="named"))
    actors = {e.target: e.actor for e in audit.list_entries(engine).items}
    assert actors["product:direct"] == audit.DIRECT_ACTOR
    assert actors["product:named"] == "maintenance-script"


def test_redaction_reaches_every_depth() -> None:
    state = {
        "pid": "1", "access_key": "k", "device_key": None,
        "nested": [{"secret": "s", "current_token": "t", "secret_hash": "h", "signal": 3}],
    }  # fmt: skip
    assert audit.redact(state) == {
        "pid": "1", "access_key": audit.REDACTED, "device_key": None,
        "nested": [{"secret": audit.REDACTED, "current_token": audit.REDACTED,
                    "secret_hash": audit.REDACTED, "signal": 3}],
    }  # fmt: skip


def _audit_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())

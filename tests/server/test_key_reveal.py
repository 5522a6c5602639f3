"""The audited key reveal of the management API: ``POST /products/{pid}/reveal-key`` and
``POST /accounts/{uid}/reveal-key`` answer the access key and record who was shown it, never the
key itself, in the audit log. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import Engine

from onenet_ota.server.admin_api import AdminApi
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.api_tokens import ApiTokenCreate
from onenet_ota.server.blobs import BlobStore
from tests.serverthread import ServerThread

ADMIN = "first-admin-secret-for-reveal-tests"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


@dataclass
class Clients:
    operator: httpx2.Client
    viewer: httpx2.Client


@pytest.fixture
def clients(engine: Engine, tmp_path: Path) -> Iterator[Clients]:
    service = AdminService(engine, BlobStore(tmp_path / "packages"))
    api = AdminApi(service, admin_token=ADMIN, max_upload_bytes=1 << 20)
    ops = api.tokens.create(ApiTokenCreate(name="ops", role="operator"))
    auditor = api.tokens.create(ApiTokenCreate(name="auditor", role="viewer"))
    with ServerThread(api.handle) as srv:

        def client(secret: str) -> httpx2.Client:
            return httpx2.Client(
                base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {secret}"}
            )

        with client(ops.secret) as operator, client(auditor.secret) as viewer:
            yield Clients(operator, viewer)


def test_a_reveal_answers_the_key_and_audits_who_saw_it(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    op = clients.operator
    assert op.post("/accounts", json={"uid": "4242", "access_key": K1}).status_code == 201
    assert op.post("/products", json={"pid": "p1", "access_key": K2}).status_code == 201
    product = op.post("/products/p1/reveal-key")
    assert product.status_code == 200, product.text
    assert product.json()["access_key"] == K2
    account = op.post("/accounts/4242/reveal-key")
    assert account.status_code == 200, account.text
    assert account.json()["access_key"] == K1

    log = clients.viewer.get("/audit", params={"action": "product.reveal_key"}).json()["items"]
    assert [(e["actor"], e["target"], e["detail"]) for e in log] == [
        ("ops", "product:p1", "access key shown")
    ]
    log += clients.viewer.get("/audit", params={"action": "account.reveal_key"}).json()["items"]
    assert [(e["actor"], e["target"]) for e in log[1:]] == [("ops", "account:4242")]
    everything = json.dumps(clients.viewer.get("/audit").json())
    assert K1 not in everything
    assert K2 not in everything
    assert K1 not in caplog.text
    assert K2 not in caplog.text


def test_a_viewer_is_refused_and_nothing_is_recorded(clients: Clients) -> None:
    assert clients.operator.post("/products", json={"pid": "p2"}).status_code == 201
    assert clients.operator.post("/accounts", json={"uid": "77"}).status_code == 201
    for path in ("/products/p2/reveal-key", "/accounts/77/reveal-key"):
        reply = clients.viewer.post(path)
        assert reply.status_code == 403, path
        assert "access_key" not in reply.text
    assert clients.viewer.get("/audit", params={"action": "product.reveal_key"}).json() == {
        "items": [],
        "next": None,
    }


def test_revealing_an_unknown_object_is_404_and_unrecorded(clients: Clients) -> None:
    assert clients.operator.post("/products/nope/reveal-key").status_code == 404
    assert clients.operator.post("/accounts/999/reveal-key").status_code == 404
    assert clients.viewer.get("/audit", params={"target": "product:nope"}).json()["items"] == []

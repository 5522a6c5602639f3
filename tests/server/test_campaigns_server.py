"""Campaigns through the real server (``create_app`` on loopback, its evaluator on the server's
loop): SQLite's locking under concurrent writers, dynamic membership and rate-limited dispatch,
on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from onenet_ota.management import ManagementClient
from onenet_ota.server import db
from onenet_ota.server.app import AppResources, create_app
from onenet_ota.server.config import Settings
from tests.serverthread import ServerThread

TOKEN = "campaign-server-admin-token"


@dataclass
class Platform:
    """A running server with its evaluator, a management client and an engine on its database."""

    client: ManagementClient
    engine: Engine
    resources: AppResources
    url: str


@contextlib.contextmanager
def _platform(engine: Engine, data: Path) -> Iterator[Platform]:
    url = engine.url.render_as_string(hide_password=False)
    settings = Settings(db=url, data_dir=data, admin_token=SecretStr(TOKEN))
    handler, resources = create_app(settings)
    try:
        with ServerThread(handler) as server:
            evaluator: Future[None] = asyncio.run_coroutine_threadsafe(
                resources.evaluator.run_forever(), server.loop
            )
            client = ManagementClient(server.url, TOKEN)
            try:
                yield Platform(client, engine, resources, url)
            finally:
                client.close()
                server.loop.call_soon_threadsafe(evaluator.cancel)
    finally:
        asyncio.run(resources.aclose())


# ---------------------------------------------------------------------------- SQLite locking


@pytest.fixture
def sqlite_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    # A short busy timeout: a read that waits for the write lock fails in a second instead of
    # ten (the fault below), and a correct read never waits for it at all.
    monkeypatch.setattr(db, "_BUSY_TIMEOUT_MS", 1000)
    engine = db.create_engine(f"sqlite:///{tmp_path / 'ota.db'}")
    db.migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def test_sqlite_reads_answer_while_another_writer_holds_the_write_lock(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    """A read-only request (a campaign, the campaign list) and the evaluator's look at a running
    campaign must not need SQLite's write lock: a writer elsewhere (a bulk import, a device's
    report, the bench's own reports) would hold them off, and a reader polling often starves the
    writers in turn until one gives up with "database is locked"."""
    with _platform(sqlite_engine, tmp_path / "data") as platform:
        client = platform.client
        product = client.request("POST", "/products", json_body={"name": "locks"})
        body = {"pid": product["pid"], "devices": [{"name": f"d{i}"} for i in range(20)]}
        client.request("POST", "/devices/import", json_body=body)
        package = client.request(
            "POST",
            "/packages",
            params={"pid": product["pid"], "type": "fota", "target": "2.0", "file_name": "f"},
            content=iter([b"firmware"]),
            headers={"Content-Type": "application/octet-stream"},
        )
        spec = {"package_id": package["id"], "selector": {}, "stages": [{"rest": True}]}
        campaign = client.request("POST", "/campaigns", json_body=spec)
        client.request("POST", f"/campaigns/{campaign['id']}/start")
        assert sqlite_engine.url.database is not None
        writer = sqlite3.connect(sqlite_engine.url.database, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another process's write transaction, open
            seen = client.request("GET", f"/campaigns/{campaign['id']}")
            listed = client.request("GET", "/campaigns")
            running = platform.resources.evaluator.service.running()
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    assert seen["state"] == "running"
    assert [c["id"] for c in listed["items"]] == [campaign["id"]]
    assert running == [campaign["id"]]

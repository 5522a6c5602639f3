"""Campaigns through the real server (``create_app`` on loopback, its evaluator on the server's
loop): SQLite's locking under concurrent writers, dynamic membership and rate-limited dispatch,
on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------- rate and dynamic mode


class MovableClock:
    """Unix seconds that move only when the test says so (the evaluator's due times follow)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def _clocked_platform(engine: Engine, data: Path, clock: MovableClock) -> Iterator[Platform]:
    url = engine.url.render_as_string(hide_password=False)
    settings = Settings(db=url, data_dir=data, admin_token=SecretStr(TOKEN))
    handler, resources = create_app(settings, clock=clock)
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


def _until(what: str, check: Callable[[], Any]) -> Any:
    """Wait for the evaluator to do something (a failsafe bound, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"the evaluator never did it: {what}")


def _setup(client: ManagementClient, n: int, labels: dict[str, str] | None) -> tuple[str, int]:
    product = client.request("POST", "/products", json_body={"name": "campaigns"})
    devices = [{"name": f"d{i:03d}", "labels": labels or {}} for i in range(n)]
    client.request("POST", "/devices/import", json_body={"pid": product["pid"], "devices": devices})
    package = client.request(
        "POST",
        "/packages",
        params={"pid": product["pid"], "type": "fota", "target": "2.0", "file_name": "f"},
        content=iter([b"firmware"]),
        headers={"Content-Type": "application/octet-stream"},
    )
    return str(product["pid"]), int(package["id"])


def _stage_counts(client: ManagementClient, campaign_id: int) -> list[dict[str, int]]:
    shown = client.request("GET", f"/campaigns/{campaign_id}")
    return [stage["counts"] for stage in shown["stages"]]


def test_rate_limited_activation_through_the_server(engine: Engine, tmp_path: Path) -> None:
    clock = MovableClock()
    with _clocked_platform(engine, tmp_path / "data", clock) as platform:
        client = platform.client
        _, package_id = _setup(client, 20, None)
        spec = {
            "package_id": package_id,
            "selector": {},
            "stages": [{"count": 10}, {"rest": True}],
            "rate": {"per_minute": 6},  # one at once, then one every 10 s of the clock
        }
        campaign = client.request("POST", "/campaigns", json_body=spec)
        path = f"/campaigns/{campaign['id']}"
        client.request("POST", f"{path}/start")
        counts = _stage_counts(client, campaign["id"])[0]
        assert (counts["targeted"], counts["pending"]) == (1, 9)
        clock.now += 10
        _until("the second slot", lambda: _stage_counts(client, campaign["id"])[0]["targeted"] == 2)
        clock.now += 50  # A(60 s) = 6: seven in all
        _until("the batch", lambda: _stage_counts(client, campaign["id"])[0]["targeted"] == 7)
        client.request("POST", f"{path}/pause")
        counts = _stage_counts(client, campaign["id"])[0]
        events = client.request("GET", f"{path}/events")["items"]
    # Never more than the rate allows, and no event per batch.
    assert (counts["targeted"], counts["pending"]) == (7, 3)
    assert [(e["action"], e["by"]) for e in events] == [("start", "admin"), ("pause", "admin")]


def test_dynamic_join_through_the_server(engine: Engine, tmp_path: Path) -> None:
    clock = MovableClock()
    with _clocked_platform(engine, tmp_path / "data", clock) as platform:
        client = platform.client
        pid, package_id = _setup(client, 10, {"region": "eu"})
        spec = {
            "package_id": package_id,
            "selector": {"labels": {"region": "eu"}},
            "stages": [{"percent": 50}, {"rest": True}],
            "dynamic": True,
        }
        campaign = client.request("POST", "/campaigns", json_body=spec)
        client.request("POST", f"/campaigns/{campaign['id']}/start")
        assert _stage_counts(client, campaign["id"])[0]["targeted"] == 5
        # Ten devices created with the label: the first stage's share of 20 is 10.
        devices = [{"name": f"late{i}", "labels": {"region": "eu"}} for i in range(10)]
        client.request("POST", "/devices/import", json_body={"pid": pid, "devices": devices})
        _until("the join", lambda: _stage_counts(client, campaign["id"])[0]["targeted"] == 10)
        # A device of no region relabelled into the selector: 21 devices, a share of 11.
        other = client.request(
            "POST", "/devices/import", json_body={"pid": pid, "devices": [{"name": "us"}]}
        )
        dev_id = other["items"][0]["dev_id"]
        client.request("PATCH", f"/devices/{dev_id}/labels", json_body={"labels": {"region": "eu"}})
        _until("the relabel", lambda: _stage_counts(client, campaign["id"])[0]["targeted"] == 11)
        shown = client.request("GET", f"/campaigns/{campaign['id']}")
        events = client.request("GET", f"/campaigns/{campaign['id']}/events")["items"]
    assert shown["population"] == 21
    assert shown["stage"] == 0
    assert [s["counts"]["targeted"] for s in shown["stages"]] == [11, 0]
    assert [e["action"] for e in events] == ["start"]

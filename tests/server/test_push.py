"""server/push.py: task-push notifications (§11, D24) to a real HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from onenet_ota.server.admin_service import CreatedTask, StateCounts, TaskCreated
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.http import Request, Response
from onenet_ota.server.push import ATTEMPTS, TaskPusher, push_signature
from tests.serverthread import ServerThread

TOKEN = "12ghZU97OERxCnp7n5lnsjgf7NlLHe"
UID = 34268
SIGNATURE = "3783bdc4ccdf08f1189d21871edd9df5"  # Appendix B.2


@dataclass
class Receiver:
    """A push receiver: answers from a script, records what it got."""

    statuses: list[int] = field(default_factory=list)  # for POSTs, in order; then 200
    verify_body: bytes = b"PASSED"
    got: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        body = await request.body(1 << 20)
        self.got.append((request.method, dict(request.query), body))
        if request.method == "GET":
            ok = request.query.get("signature") == SIGNATURE
            text = self.verify_body if ok else b"FAILED"
            return Response(200, [("Content-Length", str(len(text)))], text)
        status = self.statuses.pop(0) if self.statuses else 200
        return Response.empty(status)

    @property
    def posts(self) -> list[dict[str, Any]]:
        return [json.loads(body) for method, _, body in self.got if method == "POST"]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with ServerThread(rec.handle) as srv:
        yield rec, srv.url + "/ota/receive"


def _created(dev_ids: list[int]) -> CreatedTask:
    task = TaskCreated(
        id=7, pid="123123", package_id=1, module_type=1, target="1.0.1", signal=0, power=0,
        retry=0, interval=0, start_time=1_800_000_000, deadline=None, status="active",
        created_at=1_800_000_000, total=len(dev_ids), counts=StateCounts(), skipped=[],
        cancelled=[],
    )  # fmt: skip
    return CreatedTask(task=task, dev_ids=dev_ids)


def test_signature_vector() -> None:
    assert push_signature(TOKEN, UID) == SIGNATURE


def test_verification_and_push_body(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver

    async def scenario() -> bool:
        pusher = TaskPusher(url, TOKEN, UID, clock=lambda: 1_800_000_123.456, retry_delay=0)
        try:
            assert await pusher.verify()
            return await pusher.deliver(_created([987654321, 5]))
        finally:
            await pusher.aclose()

    assert asyncio.run(scenario())
    assert rec.got[0][:2] == ("GET", {"signature": SIGNATURE})
    assert rec.posts == [
        {
            "info": {"uid": UID, "date": 1_800_000_123_456},
            "signature": SIGNATURE,
            "msg": {"dids": [987654321, 5], "startTime": 1_800_000_000_000, "version": "1.0.1"},
        }
    ]


@pytest.mark.parametrize("answer", [b"FAILED", b"", b"passed"])
def test_a_receiver_that_does_not_pass_gets_no_pushes(
    receiver: tuple[Receiver, str], answer: bytes
) -> None:
    rec, url = receiver
    rec.verify_body = answer

    async def scenario() -> None:
        pusher = TaskPusher(url, TOKEN, UID, retry_delay=0)
        try:
            assert not await pusher.verify()
            pusher.notify(_created([1]))
            await asyncio.sleep(0)
        finally:
            await pusher.aclose()

    asyncio.run(scenario())
    assert rec.posts == []


def test_wrong_token_fails_verification(receiver: tuple[Receiver, str]) -> None:
    _, url = receiver

    async def scenario() -> bool:
        pusher = TaskPusher(url, "another token", UID)
        try:
            return await pusher.verify()
        finally:
            await pusher.aclose()

    assert not asyncio.run(scenario())


def test_retries_until_a_2xx(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.statuses = [500, 503]

    async def scenario() -> bool:
        pusher = TaskPusher(url, TOKEN, UID, retry_delay=0)
        try:
            return await pusher.deliver(_created([1]))
        finally:
            await pusher.aclose()

    assert asyncio.run(scenario())
    assert len(rec.posts) == 3


def test_gives_up_after_three_attempts(
    receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    rec, url = receiver
    rec.statuses = [500] * 10

    async def scenario() -> bool:
        pusher = TaskPusher(url, TOKEN, UID, retry_delay=0)
        try:
            return await pusher.deliver(_created([1]))
        finally:
            await pusher.aclose()

    assert not asyncio.run(scenario())
    assert len(rec.posts) == ATTEMPTS
    assert "given up" in caplog.text
    assert TOKEN not in caplog.text


def test_unreachable_receiver_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    async def scenario() -> tuple[bool, bool]:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(refuse))
        pusher = TaskPusher("http://push.invalid/r?key=secret", TOKEN, UID, client=client,
                            retry_delay=0)  # fmt: skip
        try:
            return await pusher.verify(), await pusher.deliver(_created([1]))
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == (False, False)
    assert "secret" not in caplog.text  # the URL's query is not logged


def test_task_creation_through_the_app_pushes(
    receiver: tuple[Receiver, str], engine: Engine, db_url: str, tmp_path: Path
) -> None:
    rec, url = receiver
    admin = "push-admin-token-0123456789"
    settings = Settings(db=db_url, data_dir=tmp_path, admin_token=SecretStr(admin))
    pusher = TaskPusher(url, TOKEN, UID, retry_delay=0)
    pusher.verified = True  # run() verifies once at start-up
    handler, resources = create_app(settings, pusher=pusher)
    try:
        with (
            ServerThread(handler) as srv,
            httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}) as c,
        ):
            c.post("/api/v1/products", json={"pid": "123123"}).raise_for_status()
            dev = c.post("/api/v1/devices", json={"pid": "123123", "name": "d"}).json()["dev_id"]
            package = c.post(
                "/api/v1/packages",
                params={"pid": "123123", "type": "fota", "target": "1.0.1", "file_name": "f"},
                content=b"firmware",
            ).json()
            reply = c.post("/api/v1/tasks", json={"package_id": package["id"], "dev_ids": [dev]})
            assert reply.status_code == 201
            for _ in range(400):
                if rec.posts:
                    break
                time.sleep(0.05)
            # The push client lives on the server's loop: close it there.
            asyncio.run_coroutine_threadsafe(resources.aclose(), srv.loop).result(30)
    finally:
        asyncio.run(resources.aclose())  # a no-op once closed; closes after a failed start
    assert [post["msg"]["dids"] for post in rec.posts] == [[dev]]
    assert rec.posts[0]["msg"]["version"] == "1.0.1"

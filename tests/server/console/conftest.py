"""The console's test platform: the project's server with a console whose token directory
holds one token per role, and helpers that set up tasks through the management API."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr

from onenet_ota.server.admin_api import PREFIX as API
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.console import PREFIX
from onenet_ota.server.db import create_engine, migrate
from tests.serverthread import ServerThread

ADMIN = "admin-secret-0123456789abcdefghij"
KEY = "A" * 43 + "="
_names = itertools.count()


@dataclass
class Platform:
    url: str
    api: httpx2.Client
    operator: str  # the secrets of an operator's and a viewer's token
    viewer: str
    token_ids: dict[str, int]  # by secret
    clients: list[httpx2.Client] = field(default_factory=list)

    def browser(self) -> httpx2.Client:
        client = httpx2.Client(base_url=self.url, timeout=10)
        self.clients.append(client)
        return client

    def signed_in(self, secret: str) -> tuple[httpx2.Client, str]:
        client = self.browser()
        reply = client.post(f"{PREFIX}/login", data={"token": secret, "next": f"{PREFIX}/"})
        assert reply.status_code == 303, reply.text
        page = client.get(f"{PREFIX}/")
        assert page.status_code == 200
        match = re.search(r'data-csrf="([^"]+)"', page.text)
        assert match is not None
        return client, match.group(1)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform with its console, and three API tokens: ADMIN (the first start's admin
    token), OPERATOR and VIEWER (created through the management API)."""
    settings = Settings(
        data_dir=tmp_path / "data", admin_token=SecretStr(ADMIN), max_upload_bytes=4096
    )
    settings.data_dir.mkdir()
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    try:
        with (
            ServerThread(handler) as srv,
            httpx2.Client(
                base_url=srv.url + API, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
            ) as api,
        ):
            ids = {ADMIN: api.get("/tokens").json()["items"][0]["id"]}
            made: dict[str, str] = {}
            for role in ("operator", "viewer"):
                reply = api.post("/tokens", json={"name": f"{role}-token", "role": role})
                assert reply.status_code == 201, reply.text
                made[role] = reply.json()["secret"]
                ids[made[role]] = reply.json()["id"]
            platform = Platform(srv.url, api, made["operator"], made["viewer"], ids)
            yield platform
            for client in platform.clients:
                client.close()
    finally:
        asyncio.run(resources.aclose())


def product(api: httpx2.Client, name: str = "meters") -> str:
    reply = api.post("/products", json={"access_key": KEY, "name": name})
    assert reply.status_code == 201, reply.text
    pid: str = reply.json()["pid"]
    return pid


def task(api: httpx2.Client, pid: str, devices: int = 3) -> tuple[int, list[int]]:
    dev_ids = [
        api.post("/devices", json={"pid": pid, "name": f"dev{next(_names)}"}).json()["dev_id"]
        for _ in range(devices)
    ]
    package = api.post(
        "/packages",
        params={"pid": pid, "type": "1", "target": "2.0", "file_name": "fw.bin"},
        content=b"firmware",
    )
    assert package.status_code == 201, package.text
    task = api.post("/tasks", json={"package_id": package.json()["id"], "dev_ids": dev_ids})
    assert task.status_code == 201, task.text
    return task.json()["id"], dev_ids

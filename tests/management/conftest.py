"""Fixtures for the management client's tests: the real server, and clients of both flavours.

The server is ``create_app`` on a migrated SQLite file, served on loopback by the project's HTTP
server in a thread (:class:`~tests.serverthread.ServerThread`). Every client test runs twice, with
:class:`ManagementClient` and with :class:`AsyncManagementClient`, through :class:`Driver`, which
awaits a call when the client is async and simply makes it otherwise (the server runs in its own
thread, so a blocking call is fine).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from onenet_ota.management import AsyncManagementClient, ManagementClient
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.db import create_engine, migrate
from tests.serverthread import ServerThread

TOKEN = "management-client-token-0123456789"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
K2 = "WQKxMwy6nYHzsdnRpYzAYbeKRsm8VYfQZdTlTXFcd1o="
MAX_UPLOAD = 10_000
_numbers = itertools.count(7000)


def fresh_pid() -> str:
    """A pid no other test of the session uses."""
    return str(next(_numbers))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test server's data directory (database and package files)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[str]:
    """The platform's base URL; its admin token is :data:`TOKEN`."""
    data = data_dir
    settings = Settings(data_dir=data, admin_token=SecretStr(TOKEN), max_upload_bytes=MAX_UPLOAD)
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    try:
        with ServerThread(handler) as srv:
            yield srv.url
    finally:
        asyncio.run(resources.aclose())


def public_methods(cls: type) -> set[str]:
    """The names of a client class's public methods."""
    return {name for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")}


class Driver:
    """One interface over a sync or an async client: ``await api("get_product", pid)``.

    ``used`` collects the operations called, so a test can check it called every one.
    """

    def __init__(self, client: ManagementClient | AsyncManagementClient) -> None:
        self.client = client
        self.used: set[str] = set()

    @property
    def is_async(self) -> bool:
        """Whether the client is the async one."""
        return isinstance(self.client, AsyncManagementClient)

    async def __call__(self, operation: str, /, *args: Any, **kwargs: Any) -> Any:
        self.used.add(operation)
        result = getattr(self.client, operation)(*args, **kwargs)
        if inspect.isawaitable(result):
            return await result
        return result

    async def collect(self, operation: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """Every item of an ``iter_*`` helper, as a list."""
        self.used.add(operation)
        items = getattr(self.client, operation)(*args, **kwargs)
        if isinstance(items, AsyncIterator):
            return [item async for item in items]
        return list(items)

    async def close(self) -> None:
        """``close()`` or ``aclose()``."""
        if isinstance(self.client, AsyncManagementClient):
            await self.client.aclose()
        else:
            self.client.close()


def make_client(flavour: str, url: str, token: str | None = TOKEN) -> Driver:
    """A client of ``flavour`` ("sync" or "async") for ``url``."""
    if flavour == "async":
        return Driver(AsyncManagementClient(url, token))
    return Driver(ManagementClient(url, token))


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Which client this run of the test uses."""
    value: str = request.param
    return value


@pytest.fixture
async def api(flavour: str, server: str) -> AsyncIterator[Driver]:
    """A client of this run's flavour for the test server, closed afterwards."""
    driver = make_client(flavour, server)
    try:
        yield driver
    finally:
        await driver.close()

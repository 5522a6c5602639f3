"""The real platform for fleet tests: ``create_app`` over a migrated database (SQLite and
PostgreSQL), served on loopback by the project's HTTP server in a thread. The recording
platform also keeps every device request as the server received it (:class:`Seen`), so that a
test can check what the clients sent, and over which connections, without trusting the
simulator's own counters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
from pydantic import SecretStr

from onenet_ota.management import ManagementClient
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.http import Handler, Request, Response
from tests.server.seed import DB_PARAMS, module_database
from tests.serverthread import ServerThread

ADMIN_TOKEN = "simulator-tests-admin-token"
_KEEP_BODY = 1024  # report bodies are a few bytes


@dataclass(frozen=True)
class Seen:
    """One device request as the server received it, and the status it answered.

    ``peer`` is the client's address and port: one connection. ``body`` is kept for small
    bodies (reports), empty otherwise.
    """

    method: str
    path: str
    query: str
    peer: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    status: int

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


@dataclass(frozen=True)
class Platform:
    """Where the platform listens, and its management token. ``seen`` lists the device
    requests of a recording platform (empty otherwise)."""

    url: str
    admin_token: str
    seen: list[Seen] = field(default_factory=list)

    def admin(self) -> ManagementClient:
        """A management client (close it after use)."""
        return ManagementClient(self.url, self.admin_token)


@pytest.fixture(scope="module", params=DB_PARAMS)
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The platform on a fresh database of each kind, for the whole module."""
    with module_database(request, tmp_path_factory) as engine:
        settings = Settings(
            db=engine.url.render_as_string(hide_password=False),
            data_dir=tmp_path_factory.mktemp("platform"),
            admin_token=SecretStr(ADMIN_TOKEN),
        )
        handler, resources = create_app(settings)
        try:
            with ServerThread(handler) as server:
                yield Platform(server.url, ADMIN_TOKEN)
        finally:
            asyncio.run(resources.aclose())


@pytest.fixture(scope="module")
def sqlite_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The platform on SQLite only (for tests whose subject is not the database)."""
    from onenet_ota.server.db import create_engine, migrate

    data = tmp_path_factory.mktemp("sqlite-platform")
    settings = Settings(data_dir=data, admin_token=SecretStr(ADMIN_TOKEN))
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    try:
        with ServerThread(handler) as server:
            yield Platform(server.url, ADMIN_TOKEN)
    finally:
        asyncio.run(resources.aclose())


def _recorder(handler: Handler, seen: list[Seen]) -> Handler:
    """``handler``, keeping every device request (the management API's are left out)."""

    async def handle(request: Request) -> Response:
        if request.path.startswith("/api/"):
            return await handler(request)
        body = b""
        length = request.content_length
        if length is not None and 0 < length <= _KEEP_BODY:
            body = await request.body(_KEEP_BODY)
            replayed = [body]

            async def read_again() -> bytes:
                return replayed.pop() if replayed else b""

            request = replace(request, _read_chunk=read_again)
        response = await handler(request)
        seen.append(
            Seen(
                request.method,
                request.path,
                request.query_string,
                request.peer,
                tuple(request.headers),
                body,
                response.status,
            )
        )
        return response

    return handle


@pytest.fixture(scope="module")
def recording_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The platform on SQLite, recording every device request in ``seen``."""
    from onenet_ota.server.db import create_engine, migrate

    data = tmp_path_factory.mktemp("recording-platform")
    settings = Settings(data_dir=data, admin_token=SecretStr(ADMIN_TOKEN))
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    seen: list[Seen] = []
    try:
        with ServerThread(_recorder(handler, seen)) as server:
            yield Platform(server.url, ADMIN_TOKEN, seen)
    finally:
        asyncio.run(resources.aclose())

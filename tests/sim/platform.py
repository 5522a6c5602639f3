"""The real platform for fleet tests: ``create_app`` over a migrated database (SQLite and
PostgreSQL), served on loopback by the project's HTTP server in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from onenet_ota.management import ManagementClient
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from tests.server.seed import DB_PARAMS, module_database
from tests.serverthread import ServerThread

ADMIN_TOKEN = "simulator-tests-admin-token"


@dataclass(frozen=True)
class Platform:
    """Where the platform listens, and its management token."""

    url: str
    admin_token: str

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

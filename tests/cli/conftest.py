"""Fixtures of the ``onenet-ota admin`` tests: the real server (create_app on a migrated SQLite
file, served on loopback in a thread, one per test module) and the CLI pointed at it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from onenet_ota.cli.main import cli
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.db import create_engine, migrate
from tests.serverthread import ServerThread

TOKEN = "cli-admin-token-0123456789"
MAX_UPLOAD = 10_000

Admin = Callable[..., Result]
"""``admin("device", "list", ok=True)``: runs ``onenet-ota admin device list``; with ``ok``, the
command must succeed."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL; its admin token is :data:`TOKEN`, its upload limit
    :data:`MAX_UPLOAD` bytes."""
    data = tmp_path_factory.mktemp("data")
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


@pytest.fixture
def admin(server: str, monkeypatch: pytest.MonkeyPatch) -> Admin:
    """``onenet-ota admin`` with ``--server`` and ``--admin-token`` from the environment."""
    monkeypatch.setenv("ONENET_OTA_SERVER", server)
    monkeypatch.setenv("ONENET_OTA_ADMIN_TOKEN", TOKEN)
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(cli, ["admin", *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run

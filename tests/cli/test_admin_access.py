"""``onenet-ota admin token`` and ``onenet-ota admin audit`` against a real server (create_app on a
SQLite file, over loopback HTTP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from onenet_ota.cli.main import cli
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.db import create_engine, migrate
from tests.serverthread import ServerThread

TOKEN = "cli-access-admin-token-0123456789"

Admin = Callable[..., Result]


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    settings = Settings(data_dir=tmp_path, admin_token=SecretStr(TOKEN))
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    monkeypatch.setenv("ONENET_OTA_ADMIN_TOKEN", TOKEN)
    runner = CliRunner()
    try:
        with ServerThread(handler) as srv:
            monkeypatch.setenv("ONENET_OTA_SERVER", srv.url)

            def run(*args: str, ok: bool = True, token: str | None = None) -> Result:
                env = {"ONENET_OTA_ADMIN_TOKEN": token} if token is not None else None
                result = runner.invoke(cli, ["admin", *args], env=env, catch_exceptions=False)
                if ok:
                    assert result.exit_code == 0, result.output
                return result

            yield run
    finally:
        asyncio.run(resources.aclose())


def test_token_create_list_revoke(admin: Admin) -> None:
    created = admin("token", "create", "deploy", "--role", "operator")
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("oota_")
    assert "shown only now" in created.stdout
    listing = admin("token", "list").stdout
    assert "deploy" in listing
    assert "operator" in listing
    assert secret not in listing
    assert admin("product", "list", token=secret).exit_code == 0
    tokens = json.loads(admin("token", "list", "--json").stdout)["items"]
    deploy = next(t for t in tokens if t["name"] == "deploy")
    assert admin("token", "revoke", str(deploy["id"])).stdout.strip() == (
        f"token {deploy['id']} revoked"
    )
    refused = admin("product", "list", token=secret, ok=False)
    assert refused.exit_code == 1
    assert "revoked" in refused.stderr


def test_a_viewer_is_told_it_may_not(admin: Admin) -> None:
    secret = admin("token", "create", "watcher").stdout.strip().splitlines()[-1]
    refused = admin("product", "create", "--id", "77", token=secret, ok=False)
    assert refused.exit_code == 1
    assert "operator role" in refused.stderr
    assert "HTTP 403" in refused.stderr
    assert admin("token", "list", token=secret, ok=False).exit_code == 1
    taken = admin("token", "create", "watcher", ok=False)
    assert "never reused" in taken.stderr


def test_audit_shows_who_did_what(admin: Admin) -> None:
    admin("product", "create", "--id", "4711", "--name", "first")
    admin("token", "create", "ci")
    out = admin("audit").stdout
    assert "product.create" in out
    assert "product:4711" in out
    assert "token.create" in out
    assert "admin" in out
    only = json.loads(admin("audit", "--action", "product.create", "--json").stdout)["items"]
    assert [e["target"] for e in only] == ["product:4711"]
    assert only[0]["actor"] == "admin"
    assert only[0]["after"]["access_key"] == "(redacted)"
    later = json.loads(admin("audit", "--since", "2999-01-01", "--json").stdout)
    assert later["items"] == []
    bad = admin("audit", "--since", "someday", ok=False)
    assert bad.exit_code == 1

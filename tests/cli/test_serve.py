"""``onenet-ota serve``: settings from flags and environment, start-up errors, a generated admin
token, and TLS (D25), with real server processes where serving is involved."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trustme
from click.testing import CliRunner, Result

from onenet_ota.cli.main import cli
from tests.server.serve_process import ServerProcess

TOKEN = "serve-admin-token-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ONENET_OTA_"):
            monkeypatch.delenv(name)


def _serve_in_process(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["serve", *args], env=env, catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "--port / ONENET_OTA_PORT"),
        ([], {"ONENET_OTA_WORKERS": "0"}, "--workers / ONENET_OTA_WORKERS"),
        (["--public-address", "far-too-long-host-name.example.com:8080"], {},
         "--public-address / ONENET_OTA_PUBLIC_ADDRESS"),
        (["--tls-cert", "cert.pem"], {}, "tls_cert and tls_key must be given together"),
        (["--admin-token", "short"], {}, "at least 16 characters"),
    ],
)  # fmt: skip
def test_invalid_settings_are_reported(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = _serve_in_process("--data-dir", str(tmp_path), *args, env=env)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _serve_in_process(
            "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
            "--admin-token", TOKEN,
        )  # fmt: skip
    assert result.exit_code == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr


def test_missing_tls_files(tmp_path: Path) -> None:
    result = _serve_in_process(
        "--data-dir", str(tmp_path), "--admin-token", TOKEN,
        "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "key.pem"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "missing.pem" in result.stderr


def test_unreachable_database_is_reported_without_password(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]  # nothing answers PostgreSQL there once it is closed
    result = _serve_in_process(
        "--data-dir", str(tmp_path), "--admin-token", TOKEN,
        "--db", f"postgresql://ota:hunter2@127.0.0.1:{port}/ota",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "database postgresql://ota:***@127.0.0.1" in result.stderr
    assert "Connection refused" in result.stderr
    assert "hunter2" not in result.output


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.kill()


def test_generated_token_is_printed_once_and_kept_across_restarts(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """The first start on an empty token table creates the admin token and prints its secret
    once, to stdout and never to the log; a restart creates nothing and the secret still
    works; the database holds its hash only."""
    server = ServerProcess(tmp_path / "data")
    processes.append(server)
    url = server.url()
    assert server.process.stdout is not None
    assert server.process.stdout.readline().startswith("Created the management API's admin")
    token = server.process.stdout.readline().strip()
    assert token.startswith("oota_")
    reply = httpx2.get(url + "/api/v1/products", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200
    assert server.stop(signal.SIGINT) == 0
    assert token not in "".join(server.lines)  # never in the log
    assert server.process.stdout.read() == ""  # printed once
    database = tmp_path / "data" / "onenet-ota.db"
    assert token.encode() not in database.read_bytes() + _wal(database)

    again = ServerProcess(tmp_path / "data")
    processes.append(again)
    url = again.url()
    reply = httpx2.get(url + "/api/v1/tokens", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200
    assert [t["name"] for t in reply.json()["items"]] == ["admin"]  # not regenerated
    assert again.stop() == 0
    assert again.process.stdout is not None
    assert again.process.stdout.read() == ""


def _wal(database: Path) -> bytes:
    wal = database.with_name(database.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_settings_from_the_environment(tmp_path: Path, processes: list[ServerProcess]) -> None:
    server = ServerProcess(
        tmp_path / "unused",
        env={"ONENET_OTA_ADMIN_TOKEN": TOKEN, "ONENET_OTA_DB": f"sqlite:///{tmp_path / 'x.db'}",
             "ONENET_OTA_PUBLIC_ADDRESS": "ota.example.net:80"},
    )  # fmt: skip
    processes.append(server)
    url = server.url()
    reply = httpx2.get(url + "/api/v1/products", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200
    assert server.stop() == 0
    assert server.process.stdout is not None
    assert server.process.stdout.read() == ""  # a configured token is not printed
    assert (tmp_path / "x.db").is_file()


def test_tls_listener_accepts_the_c_sdk_handshake(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = ServerProcess(
        tmp_path / "data", "--admin-token", TOKEN, "--tls-cert", str(cert_file),
        "--tls-key", str(key_file),
    )  # fmt: skip
    processes.append(server)
    port = server.url().rsplit(":", 1)[1]
    # §2.2: TLS 1.2 only, static-RSA AES-CBC suites, no SNI.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA")
    with (
        socket.create_connection(("127.0.0.1", int(port)), timeout=30) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert tls.cipher()[0] == "AES256-SHA256"  # type: ignore[index]
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost:ota.heclouds.com\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    assert server.stop() == 0


def test_serves_on_loopback_by_default_and_says_how_to_open_up(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tmp_path / "data", "--admin-token", TOKEN, host=None)
    processes.append(server)
    port = int(server.wait_for(r"listening on http://127\.0\.0\.1:(\d+) ").group(1))
    hint = server.wait_for(r"only this machine can connect.*").group(0)
    assert f"127.0.0.1:{port}" in hint
    assert "--host 0.0.0.0" in hint
    assert "ONENET_OTA_HOST" in hint
    reply = httpx2.get(f"http://127.0.0.1:{port}/api/v1/health")
    assert reply.status_code == 200
    assert server.stop() == 0


def test_says_when_it_is_reachable_from_the_network(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tmp_path / "data", "--admin-token", TOKEN, host="0.0.0.0")
    processes.append(server)
    port = int(server.wait_for(r"listening on http://0\.0\.0\.0:(\d+) ").group(1))
    hint = server.wait_for(r"reachable from the network.*").group(0)
    assert f"0.0.0.0:{port}" in hint
    assert "--host 127.0.0.1" in hint
    # Every interface includes loopback. (A request also means the server is past start-up.)
    assert httpx2.get(f"http://127.0.0.1:{port}/api/v1/health").status_code == 200
    assert server.stop() == 0


@pytest.mark.parametrize(("args", "status"), [((), 200), (("--no-console",), 404)])
def test_the_console_is_served_unless_turned_off(
    tmp_path: Path, processes: list[ServerProcess], args: tuple[str, ...], status: int
) -> None:
    server = ServerProcess(tmp_path / "data", *args, env={"ONENET_OTA_ADMIN_TOKEN": TOKEN})
    processes.append(server)
    reply = httpx2.get(server.url() + "/console/login")
    assert reply.status_code == status
    assert server.stop() == 0

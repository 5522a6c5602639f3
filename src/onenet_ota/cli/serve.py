"""``onenet-ota serve``: run the platform (device API and management API on one port).

Every flag has an ``ONENET_OTA_*`` environment variable (``--db`` is ``ONENET_OTA_DB``,
``--data-dir`` is ``ONENET_OTA_DATA_DIR``, and so on); a flag wins over its variable. See
:mod:`onenet_ota.server.config` for defaults.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in error["loc"])
        where = f"--{name.replace('_', '-')} / ONENET_OTA_{name.upper()}" if name else "settings"
        lines.append(f"{where}: {error['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


@click.command()
@click.option(
    "--db",
    "db",
    metavar="URL",
    help="sqlite:///FILE or postgresql://USER@HOST/DB "
    "[default: a SQLite file in the data directory]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="where the database file and package files live [default: ./data]",
)
@click.option(
    "--host",
    help="address to listen on; 0.0.0.0 for every IPv4 interface, :: for IPv6 "
    "[default: 127.0.0.1, this machine only]",
)
@click.option("--port", type=int, help="port to listen on [default: 8080]")
@click.option(
    "--public-address",
    metavar="HOST[:PORT]",
    help="download address handed to devices asking with cdn=true (ipPort, D10)",
)
@click.option(
    "--admin-token",
    metavar="TOKEN",
    help="secret of the admin API token the first start creates (ignored once tokens exist); "
    "prefer ONENET_OTA_ADMIN_TOKEN, since arguments are visible to other users "
    "[default: generated and printed once]",
)
@click.option("--workers", type=int, help="worker processes sharing the port [default: 1]")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM certificate (chain): serve HTTPS (D25: use an RSA key for C-SDK devices)",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key of --tls-cert",
)
@click.option("--max-upload-bytes", type=int, help="largest package upload [default: 256 MiB]")
@click.option("--idle-timeout", type=float, help="seconds an idle connection stays open")
@click.option("--header-timeout", type=float, help="seconds for a whole request head [default: 10]")
@click.option(
    "--body-timeout",
    type=float,
    help="seconds for a request body, plus its length at 500 B/s [default: 20]",
)
@click.option("--handshake-timeout", type=float, help="seconds for a TLS handshake [default: 10]")
@click.option(
    "--max-connections",
    type=int,
    help="connections per process at once [default: from the descriptor limit]",
)
@click.option("--sweep-interval", type=float, help="seconds between deadline sweeps")
@click.option(
    "--cache-ttl",
    type=float,
    help="longest a cached device-API entry lives, 0 for no caching [default: 30]",
)
@click.option("--push-url", help="task-push receiver URL (spec §11)")
@click.option("--push-token", help="task-push token (spec §11); prefer ONENET_OTA_PUSH_TOKEN")
@click.option("--push-uid", type=int, help="account uid in task pushes (spec §11)")
@click.option(
    "--metrics",
    type=click.Choice(["off", "loopback", "token", "public"]),
    help="who may read /metrics: this machine only, holders of --metrics-token, anyone, or "
    "nobody [default: loopback]",
)
@click.option(
    "--metrics-token",
    metavar="TOKEN",
    help="bearer token for /metrics with --metrics token; prefer ONENET_OTA_METRICS_TOKEN",
)
@click.option(
    "--console/--no-console",
    default=None,
    help="serve the web console at /console [default: on]",
)
@click.option(
    "--access-log/--no-access-log",
    default=None,
    help="log one line per request (path without query; never headers) [default: off]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="log lines as text, or as one JSON object each [default: text]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(log_level: str, **options: Any) -> None:  # fmt: skip
    """Run the OTA platform: OneNET's device API, the /api/v1 management API and the web
    console at /console."""
    from onenet_ota.server.app import run
    from onenet_ota.server.config import Settings
    from onenet_ota.server.logs import configure_logging

    level = getattr(logging, log_level.upper())
    configure_logging(level, "json" if options.get("log_format") == "json" else "text")
    given = {name: value for name, value in options.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise click.ClickException(_settings_error(exc)) from None
    configure_logging(level, settings.log_format)  # ONENET_OTA_LOG_FORMAT may have said json
    try:
        run(settings, ready=_announce)
    except ssl.SSLError as exc:
        raise click.ClickException(f"TLS certificate or key unusable: {exc}") from None
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        message = str(orig) if orig is not None else str(exc)
        url = _redacted(settings.database_url)
        raise click.ClickException(f"database {url}: {message}") from None
    except OSError as exc:
        if exc.filename is not None:
            raise click.ClickException(f"{exc.filename}: {exc.strerror or exc}") from None
        raise click.ClickException(
            f"cannot serve on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _announce(sock: socket.socket) -> None:
    """Say who can reach the server, and how to change it (the address is a choice to make)."""
    host, port = sock.getsockname()[:2]
    log = logging.getLogger(__name__)
    if ipaddress.ip_address(host).is_loopback:
        log.info(
            "only this machine can connect (%s:%d); to serve devices on the network, use "
            "--host 0.0.0.0 or ONENET_OTA_HOST=0.0.0.0",
            host,
            port,
        )
    else:
        log.info(
            "reachable from the network on %s:%d; --host 127.0.0.1 or "
            "ONENET_OTA_HOST=127.0.0.1 limits it to this machine",
            host,
            port,
        )


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"

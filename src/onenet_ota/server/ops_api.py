"""Operations endpoints on the device listener: ``/healthz``, ``/readyz`` and ``/metrics``.

- ``GET /healthz``: liveness. 200 ``{"status":"ok"}`` whenever the process serves HTTP; it
  touches no database, so a slow database never gets a healthy process restarted.
- ``GET /readyz``: readiness. 200 ``{"status":"ready"}`` when the database answers and its
  schema is at this version's Alembic head; otherwise 503 ``{"status":"unready","reason":...}``
  (no database details: the reason is one of three fixed sentences, the details go to the log).
- ``GET /metrics``: the Prometheus text exposition (:mod:`.metrics`). Who may read it is the
  ``metrics`` setting: ``loopback`` (the default: clients on this machine only, others get 403),
  ``token`` (``Authorization: Bearer <metrics_token>`` from anywhere, else 401), ``public``
  (anyone) or ``off`` (404, as for any unknown path).

Each answers GET and HEAD (as GET); other methods get 405 with ``Allow``. None of these paths
can be a device path: every device path starts with ``/ota/`` or ``/fuse-ota/`` (§4.1, §12.2,
§13.1). The management API's ``/api/v1/health`` stays as it is.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
from typing import Final, Literal

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from onenet_ota.server.db import MIGRATIONS_DIR
from onenet_ota.server.http import Request, Response
from onenet_ota.server.metrics import Metrics

__all__ = ["OPS_PATHS", "MetricsAccess", "OpsApi", "schema_heads"]

log = logging.getLogger(__name__)

MetricsAccess = Literal["off", "loopback", "token", "public"]

OPS_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
READY_TIMEOUT: Final = 5.0  # seconds a readiness check waits for the database

_JSON: Final = ("Content-Type", "application/json")
_ALLOW: Final = ("Allow", "GET, HEAD")


@functools.cache  # the migrations shipped with the code never change while it runs
def schema_heads() -> frozenset[str]:
    """The Alembic head revision(s) of this version's migrations (read once)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    return frozenset(ScriptDirectory.from_config(config).get_heads())


def _json(
    status: int, payload: dict[str, str], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, [_JSON, *headers, ("Content-Length", str(len(body)))], body)


_HEALTHY: Final = _json(200, {"status": "ok"})
_READY: Final = _json(200, {"status": "ready"})


class OpsApi:
    """The three operations endpoints over one app's ``metrics`` and ``engine``."""

    def __init__(
        self,
        metrics: Metrics,
        engine: Engine,
        *,
        access: MetricsAccess = "loopback",
        token: str | None = None,
    ) -> None:
        if access == "token" and not token:
            raise ValueError("metrics access 'token' needs a metrics token")
        self._metrics = metrics
        self._engine = engine
        self._access = access
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None

    async def handle(self, request: Request) -> Response:
        """Answer one request on :data:`OPS_PATHS`."""
        path = request.path
        if path == "/metrics" and self._access == "off":
            return Response.empty(404)
        if request.method not in ("GET", "HEAD"):
            return Response.empty(405, [_ALLOW])
        if path == "/healthz":
            return _HEALTHY
        if path == "/readyz":
            return await self._ready()
        denied = self._check_metrics_access(request)
        if denied is not None:
            return denied
        body = await asyncio.to_thread(self._metrics.render)
        return Response(
            200,
            [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))],
            body,
        )

    def _check_metrics_access(self, request: Request) -> Response | None:
        if self._access == "public":
            return None
        if self._access == "loopback":
            return None if _is_loopback(request.peer) else Response.empty(403)
        value = request.header("Authorization") or ""
        scheme, _, given = value.partition(" ")
        digest = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
        assert self._token_digest is not None
        # Compared in constant time whatever the scheme, as the management API does.
        if hmac.compare_digest(digest, self._token_digest) and scheme.lower() == "bearer":
            return None
        return Response.empty(401, [("WWW-Authenticate", "Bearer")])

    async def _ready(self) -> Response:
        try:
            reason = await asyncio.wait_for(asyncio.to_thread(self._readiness), READY_TIMEOUT)
        except TimeoutError:
            reason = "the database did not answer in time"
        if reason is None:
            return _READY
        return _json(503, {"status": "unready", "reason": reason}, (("Retry-After", "5"),))

    def _readiness(self) -> str | None:
        """None when ready, else why not (blocking)."""
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            log.warning("readiness: cannot connect to the database: %s", exc.__class__.__name__)
            return "the database is unreachable"
        try:
            with conn:
                found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
                revisions = frozenset(str(r) for r in found)
        except SQLAlchemyError as exc:
            log.warning("readiness: cannot read the schema version: %s", exc.__class__.__name__)
            return "the database schema is not migrated"
        if revisions != schema_heads():
            return "the database schema is not migrated"
        return None


def _is_loopback(peer: str) -> bool:
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a Unix socket or an unknown peer: not known to be this machine
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback

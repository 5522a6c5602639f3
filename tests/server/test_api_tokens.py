"""Named API tokens with roles (server/api_tokens.py) and their enforcement by the management API's
route table, over real HTTP on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, select

from onenet_ota.server.admin_api import ROUTES, AdminApi, Route, openapi_document
from onenet_ota.server.admin_service import AdminService, Conflict
from onenet_ota.server.api_tokens import (
    ROLES,
    ApiTokenCreate,
    TokenStore,
    hash_secret,
)
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.schema import api_tokens, audit_log
from tests.server.seed import DB_PARAMS, module_database
from tests.serverthread import ServerThread

ADMIN = "first-admin-secret-for-token-tests"
_names = itertools.count(1)


def fresh(prefix: str) -> str:
    """A token name not used before in this module's database (names are never reused)."""
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@dataclass
class Server:
    url: str
    engine: Engine
    tokens: TokenStore

    def client(self, secret: str | None) -> httpx2.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        return httpx2.Client(base_url=self.url, headers=headers)

    def secret(self, role: str) -> str:
        """The secret of a new token with ``role``."""
        spec = ApiTokenCreate.model_validate({"name": fresh(role), "role": role})
        return self.tokens.create(spec).secret


def _serve(engine: Engine, blobs: BlobStore) -> tuple[AdminApi, ServerThread]:
    api = AdminApi(AdminService(engine, blobs), admin_token=ADMIN, max_upload_bytes=1024)
    return api, ServerThread(api.handle)


@pytest.fixture
def server(engine: Engine, tmp_path: Path) -> Iterator[Server]:
    api, thread = _serve(engine, BlobStore(tmp_path / "packages"))
    with thread as srv:
        yield Server(srv.url, engine, api.tokens)


def _error(reply: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code
    return error


# ------------------------------------------------------------------------------ the role matrix


def _example_path(route: Route) -> str:
    """The route's path with values that follow its rules but name nothing that exists (so an
    allowed call changes nothing: it ends in 404, 409 or 422, never in a change)."""
    path = route.path
    for param in route.path_params:
        value = str(param.maximum) if param.type == "integer" else "987654329"
        path = path.replace("{" + param.name + "}", value)
    return "/api/v1" + path


_GUARDED = [r for r in ROUTES if not r.public]
# The order of the roles, spelled out here rather than taken from the module under test.
_RANK = {"viewer": 0, "operator": 1, "admin": 2}


def allowed(role: str, needed: str) -> bool:
    return _RANK[role] >= _RANK[needed]


@pytest.mark.parametrize("route", _GUARDED, ids=lambda r: f"{r.method} {r.path}")
def test_every_route_lets_in_exactly_the_roles_it_declares(server: Server, route: Route) -> None:
    """Derived from the route table: a route added later is covered without a new test."""
    path = _example_path(route)
    assert route.min_role is not None
    with server.client(None) as anonymous:
        reply = anonymous.request(route.method, path)
        _error(reply, 401, "unauthorized")
        assert reply.headers["www-authenticate"] == "Bearer"
    for role in ROLES:
        with server.client(server.secret(role)) as client:
            reply = client.request(route.method, path)
            if allowed(role, route.min_role):
                assert reply.status_code not in (401, 403), (role, reply.text)
                assert reply.status_code < 500, (role, reply.text)
            else:
                error = _error(reply, 403, "forbidden")
                assert route.min_role in error["message"]
            if route.method == "GET":
                head = client.head(path)
                assert (head.status_code == 403) == (not allowed(role, route.min_role))


def test_roles_default_by_method_so_new_routes_are_safe() -> None:
    assert Route("GET", "/x", "x", "", "t").min_role == "viewer"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert Route(method, "/x", "x", "", "t").min_role == "operator"
    assert Route("GET", "/x", "x", "", "t", public=True).min_role is None
    assert Route("GET", "/x", "x", "", "t", role="admin").min_role == "admin"
    # No route in the table lets a viewer change anything.
    for route in _GUARDED:
        if route.method != "GET":
            assert route.min_role in ("operator", "admin"), route.path
        if route.tag == "tokens":
            assert route.min_role == "admin", route.path


def test_a_viewer_cannot_read_keys(server: Server) -> None:
    with server.client(server.secret("admin")) as admin:
        pid = admin.post("/api/v1/products", json={}).json()["pid"]
    with server.client(server.secret("viewer")) as viewer:
        assert viewer.get("/api/v1/products").status_code == 200  # lists carry no keys
        shown = viewer.get(f"/api/v1/products/{pid}")  # nor does one product
        assert (shown.status_code, shown.json()["access_key"]) == (200, None)
        _error(viewer.post(f"/api/v1/products/{pid}/reveal-key"), 403, "forbidden")
        _error(viewer.post("/api/v1/products", json={}), 403, "forbidden")


def test_openapi_shows_security_and_roles() -> None:
    document = openapi_document()
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for route in ROUTES:
        operation = document["paths"]["/api/v1" + route.path][route.method.lower()]
        if route.public:
            assert operation["security"] == []
            continue
        assert operation["security"] == [{"bearerAuth": []}]
        assert operation["x-required-role"] == route.min_role
        assert {"401", "403"} <= set(operation["responses"])


# ------------------------------------------------------------------------------ tokens


def test_token_lifecycle_through_the_api(server: Server) -> None:
    name = fresh("ci")
    with server.client(server.secret("admin")) as admin:
        reply = admin.post("/api/v1/tokens", json={"name": name, "role": "operator"})
        assert reply.status_code == 201, reply.text
        created = reply.json()
        secret = created["secret"]
        assert secret.startswith("oota_")
        assert len(secret) == 48
        assert created["prefix"] == secret[:11]
        listed = admin.get("/api/v1/tokens", params={"limit": 1000}).json()["items"]
        mine = next(t for t in listed if t["id"] == created["id"])
        assert "secret" not in mine
        assert mine["role"] == "operator"
        assert mine["revoked_at"] is None
        assert not any(secret in str(t) for t in listed)
        with server.client(secret) as ci:
            assert ci.get("/api/v1/products").status_code == 200
            assert admin.delete(f"/api/v1/tokens/{created['id']}").status_code == 204
            _error(ci.get("/api/v1/products"), 401, "unauthorized")
        # Revoking again changes nothing; the name stays taken, the id is not handed out again.
        assert admin.delete(f"/api/v1/tokens/{created['id']}").status_code == 204
        _error(admin.post("/api/v1/tokens", json={"name": name}), 409, "conflict")
        again = admin.post("/api/v1/tokens", json={"name": fresh("ci")}).json()
        assert again["id"] > created["id"]
        assert again["role"] == "viewer"
        _error(admin.delete("/api/v1/tokens/2147483647"), 404, "not_found")
        for bad in ({"name": "system:campaigns"}, {"name": ""}, {"name": "x", "role": "root"}):
            _error(admin.post("/api/v1/tokens", json=bad), 422, "invalid")


def test_the_last_active_admin_cannot_be_revoked(db_url: str) -> None:
    """Nobody could manage tokens any more. A database of its own (conftest's db_url): only the
    first start's admin exists there."""
    alone = create_engine(db_url)
    try:
        migrate(alone)
        store = TokenStore(alone)
        assert store.bootstrap(None) is not None
        first = store.list().items[0]
        with pytest.raises(Conflict, match="last active admin"):
            store.revoke(first.id)
        store.create(ApiTokenCreate(name="viewer", role="viewer"))
        with pytest.raises(Conflict, match="last active admin"):
            store.revoke(first.id)  # a viewer cannot manage tokens either
        second = store.create(ApiTokenCreate(name="second", role="admin"))
        store.revoke(first.id)
        with pytest.raises(Conflict, match="last active admin"):
            store.revoke(second.id)
    finally:
        alone.dispose()


def test_only_hashes_are_stored(server: Server) -> None:
    with server.client(server.secret("admin")) as admin:
        created = admin.post("/api/v1/tokens", json={"name": fresh("h")}).json()
    secret = created["secret"]
    with server.engine.connect() as conn:
        row = conn.execute(select(api_tokens).where(api_tokens.c.id == created["id"])).one()
        audit_rows = conn.execute(select(audit_log)).all()
    assert row.secret_hash == hash_secret(secret)
    assert len(row.secret_hash) == 64
    assert secret not in str(tuple(row))
    assert not any(secret in str(tuple(r)) for r in audit_rows)
    assert not any(row.secret_hash in str(tuple(r)) for r in audit_rows)


def test_a_revoked_token_is_refused_by_another_server_at_once(
    engine: Engine, tmp_path: Path
) -> None:
    """Two servers (own engines, own HTTP servers) on one database, as two workers: a token
    that the first just accepted is refused there on the very next request after the second
    revoked it."""
    other_engine = create_engine(engine.url.render_as_string(hide_password=False))
    blobs = BlobStore(tmp_path / "packages")
    first_api, first_thread = _serve(engine, blobs)
    second_api, second_thread = _serve(other_engine, blobs)
    try:
        with first_thread as first, second_thread as second:
            victim = first_api.tokens.create(ApiTokenCreate(name=fresh("victim"), role="admin"))
            admin = second_api.tokens.create(ApiTokenCreate(name=fresh("revoker"), role="admin"))
            with (
                httpx2.Client(
                    base_url=first.url, headers={"Authorization": f"Bearer {victim.secret}"}
                ) as here,
                httpx2.Client(
                    base_url=second.url, headers={"Authorization": f"Bearer {admin.secret}"}
                ) as there,
            ):
                for _ in range(3):
                    assert here.get("/api/v1/tokens").status_code == 200
                assert there.delete(f"/api/v1/tokens/{victim.id}").status_code == 204
                _error(here.get("/api/v1/tokens"), 401, "unauthorized")
                _error(here.post("/api/v1/products", json={}), 401, "unauthorized")
    finally:
        other_engine.dispose()


def test_first_start_bootstrap_runs_once(engine: Engine) -> None:
    """The module's servers bootstrapped the table already: nothing is created again, with or
    without a configured secret, and the configured secret stays the admin's."""
    store = TokenStore(engine)
    before = store.count()
    assert before >= 1
    assert store.bootstrap(None) is None
    assert store.bootstrap("another-secret-0123456789") is None
    assert store.count() == before
    principal = store.verify(ADMIN, touch=False)
    assert principal is not None
    assert principal.name == "admin"
    assert principal.role == "admin"
    assert store.verify("another-secret-0123456789") is None


def test_last_use_is_written_at_most_once_a_minute(engine: Engine) -> None:
    """Not a write per request: uses within a minute of the recorded one leave it alone."""
    now = [1_900_000_000.0]
    store = TokenStore(engine, clock=lambda: now[0])
    created = store.create(ApiTokenCreate(name=fresh("used"), role="viewer"))

    def last_used() -> int | None:
        deadline = time.monotonic() + 10
        while store._touching and time.monotonic() < deadline:  # the writer thread
            time.sleep(0.01)
        with engine.connect() as conn:
            value = conn.execute(
                select(api_tokens.c.last_used_at).where(api_tokens.c.id == created.id)
            ).scalar_one()
        return None if value is None else int(value)

    assert last_used() is None
    assert store.verify(created.secret) is not None
    assert last_used() == 1_900_000_000
    now[0] += 59
    for _ in range(5):
        assert store.verify(created.secret) is not None
    assert last_used() == 1_900_000_000
    now[0] += 1
    assert store.verify(created.secret) is not None
    assert last_used() == 1_900_000_060

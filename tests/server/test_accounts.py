"""Accounts for ``userid/{uid}`` tokens (spec §13.3, F2, F12) and reserved pids (S1): the
management service on SQLite and PostgreSQL, and the management API over real HTTP.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, delete, select, update

from onenet_ota import auth
from onenet_ota.protocol import dialects
from onenet_ota.server import schema
from onenet_ota.server.admin_api import AdminApi, openapi_document
from onenet_ota.server.admin_service import (
    RESERVED_PIDS,
    AccountCreate,
    AdminService,
    Conflict,
    DeviceCreate,
    Invalid,
    KeyRotate,
    NotFound,
    ProductCreate,
)
from onenet_ota.server.blobs import BlobStore
from tests.server.races import Outcome, wait_until_blocked
from tests.server.seed import DB_PARAMS, module_database
from tests.serverthread import ServerThread

NOW = 1_800_000_000
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
TOKEN = "admin-token-for-account-tests-0123"
UID_MAX = str(2**63 - 1)


# ------------------------------------------------------------------------------ service


@pytest.fixture
def service(engine: Engine, tmp_path: Path) -> AdminService:
    return AdminService(engine, BlobStore(tmp_path / "packages"), clock=lambda: float(NOW))


def _feed(engine: Engine) -> list[int | None]:
    """The change feed's device ids, oldest first (None: anything may have changed)."""
    with engine.connect() as conn:
        feed = schema.cache_changes
        return list(conn.execute(select(feed.c.dev_id).order_by(feed.c.id)).scalars())


def _owner(engine: Engine, pid: str) -> str | None:
    with engine.connect() as conn:
        query = select(schema.products.c.account_uid).where(schema.products.c.pid == pid)
        owner: str | None = conn.execute(query).scalar_one()
        return owner


def test_account_with_onenet_uid_and_key(service: AdminService) -> None:
    created = service.create_account(AccountCreate(uid="4242", access_key=K1, name="moved"))
    assert (created.uid, created.access_key, created.name, created.created_at) == (
        "4242", K1, "moved", NOW
    )  # fmt: skip
    shown = service.get_account("4242")
    assert (shown.access_key, shown.product_count) == (None, 0)
    assert service.reveal_account_key("4242").access_key == K1
    # The largest uid a userid token can carry is a uid an account can have.
    assert service.create_account(AccountCreate(uid=UID_MAX)).uid == UID_MAX


def test_generated_account(service: AdminService) -> None:
    created = service.create_account(AccountCreate())
    assert auth.is_user_id(created.uid)
    assert created.access_key is not None
    assert len(auth.decode_key(created.access_key)) == 32
    assert service.reveal_account_key(created.uid).access_key == created.access_key


def test_duplicate_account_is_a_conflict(service: AdminService) -> None:
    service.create_account(AccountCreate(uid="7", access_key=K1))
    with pytest.raises(Conflict, match="account 7 already exists"):
        service.create_account(AccountCreate(uid="7", access_key=K2))
    assert service.reveal_account_key("7").access_key == K1


@pytest.mark.parametrize(
    "uid", ["0", "007", "-1", "+1", "1.0", "1e3", "", " 1", "١٢", str(2**63), "9" * 19, "9" * 20]
)
def test_uids_outside_the_token_grammar_are_refused(uid: str) -> None:
    # Exactly the uids a userid token can name (auth.user_resource), each with one spelling.
    with pytest.raises(ValidationError):
        AccountCreate(uid=uid)
    with pytest.raises(ValueError, match="invalid user id"):
        auth.user_resource(uid)


@pytest.mark.parametrize("key", ["", "not base64!", "QUJ", "A" * 129, "a\x00b"])
def test_account_keys_follow_the_product_key_rules(key: str) -> None:
    with pytest.raises(ValidationError):
        AccountCreate(uid="1", access_key=key)
    with pytest.raises(ValidationError):
        ProductCreate(pid="1", access_key=key)


def test_account_key_rotation_is_published(service: AdminService, engine: Engine) -> None:
    service.create_account(AccountCreate(uid="11", access_key=K1))
    before = len(_feed(engine))
    rotated = service.rotate_account_key("11", KeyRotate(access_key=K2))
    assert rotated.access_key == K2
    assert service.reveal_account_key("11").access_key == K2
    generated = service.rotate_account_key("11", KeyRotate())
    assert generated.access_key not in (None, K1, K2)
    # Every worker's device API must drop what it verified with the old key.
    assert _feed(engine)[before:] == [None, None]
    with pytest.raises(NotFound, match="account 12 not found"):
        service.rotate_account_key("12", KeyRotate())
    assert len(_feed(engine)) == before + 2


def test_products_belong_to_one_account_at_a_time(service: AdminService, engine: Engine) -> None:
    service.create_account(AccountCreate(uid="21"))
    service.create_account(AccountCreate(uid="22"))
    service.create_product(ProductCreate(pid="p1", access_key=K1))
    service.create_product(ProductCreate(pid="p2", access_key=K1))
    before = len(_feed(engine))

    assert service.set_product_account("p1", "21").account_uid == "21"
    assert service.set_product_account("p2", "21").account_uid == "21"
    assert service.get_account("21").product_count == 2
    moved = service.set_product_account("p1", "22")  # moving is one step
    assert (moved.account_uid, _owner(engine, "p1")) == ("22", "22")
    assert service.get_product("p1").account_uid == "22"
    assert {p.pid: p.account_uid for p in service.list_products().items} == {
        "p1": "22", "p2": "21"
    }  # fmt: skip
    assert len(_feed(engine)) == before + 3
    service.set_product_account("p1", "22")  # no change: nothing to drop anywhere
    assert len(_feed(engine)) == before + 3
    cleared = service.set_product_account("p1", None)
    assert (cleared.account_uid, _owner(engine, "p1")) == (None, None)
    assert _feed(engine)[before:] == [None] * 4
    service.set_product_account("p1", None)
    assert len(_feed(engine)) == before + 4


def test_assigning_unknown_objects_changes_nothing(service: AdminService, engine: Engine) -> None:
    service.create_account(AccountCreate(uid="31"))
    service.create_product(ProductCreate(pid="p3", access_key=K1))
    service.set_product_account("p3", "31")
    before = len(_feed(engine))
    with pytest.raises(NotFound, match="account 32 not found"):
        service.set_product_account("p3", "32")
    with pytest.raises(NotFound, match="product p4 not found"):
        service.set_product_account("p4", "31")
    with pytest.raises(NotFound, match="product p4 not found"):
        service.set_product_account("p4", None)
    assert _owner(engine, "p3") == "31"
    assert len(_feed(engine)) == before


def test_an_account_with_products_is_not_deleted(service: AdminService, engine: Engine) -> None:
    service.create_account(AccountCreate(uid="41"))
    for pid in ("b", "a", "c"):
        service.create_product(ProductCreate(pid=pid, access_key=K1))
        service.set_product_account(pid, "41")
    before = len(_feed(engine))
    with pytest.raises(Conflict, match="account 41 still owns products a, b, c;") as excinfo:
        service.delete_account("41")
    assert excinfo.value.details == [{"products": ["a", "b", "c"], "product_count": 3}]
    assert service.get_account("41").product_count == 3
    assert len(_feed(engine)) == before
    for pid in ("a", "b"):
        service.set_product_account(pid, None)
    with pytest.raises(Conflict, match="account 41 still owns product c;"):
        service.delete_account("41")
    service.set_product_account("c", None)
    before = len(_feed(engine))
    service.delete_account("41")
    assert _feed(engine)[before:] == [None]
    with pytest.raises(NotFound, match="account 41 not found"):
        service.get_account("41")
    with pytest.raises(NotFound, match="account 41 not found"):
        service.delete_account("41")
    assert [p.pid for p in service.list_products().items] == ["a", "b", "c"]


def test_assigning_to_an_account_being_deleted_is_404(
    service: AdminService, engine: Engine
) -> None:
    # The delete holds the account's row when the assignment arrives: the assignment waits,
    # then finds no account (404), never a database error, and the product stays unowned.
    service.create_account(AccountCreate(uid="61"))
    service.create_product(ProductCreate(pid="p61", access_key=K1))
    with engine.begin() as conn:
        accounts = schema.accounts
        conn.execute(select(accounts).where(accounts.c.uid == "61").with_for_update())
        assign = Outcome(lambda: service.set_product_account("p61", "61")).start()
        wait_until_blocked(engine, assign.thread)
        conn.execute(delete(accounts).where(accounts.c.uid == "61"))
    assign.join()
    assert isinstance(assign.error, NotFound), assign.error
    assert _owner(engine, "p61") is None


def test_deleting_an_account_that_just_got_a_product_is_409(
    service: AdminService, engine: Engine
) -> None:
    # The assignment holds the account's row when the delete arrives: the delete waits, then
    # sees the product and refuses (409), never a dangling owner or a database error.
    service.create_account(AccountCreate(uid="71"))
    service.create_product(ProductCreate(pid="p71", access_key=K1))
    with engine.begin() as conn:
        accounts, products = schema.accounts, schema.products
        conn.execute(select(accounts).where(accounts.c.uid == "71").with_for_update())
        conn.execute(update(products).where(products.c.pid == "p71").values(account_uid="71"))
        remove = Outcome(lambda: service.delete_account("71")).start()
        wait_until_blocked(engine, remove.thread)
    remove.join()
    assert isinstance(remove.error, Conflict), remove.error
    assert "still owns product p71" in remove.error.message
    assert service.get_account("71").product_count == 1


def test_deleting_a_product_frees_its_account(service: AdminService) -> None:
    service.create_account(AccountCreate(uid="51"))
    service.create_product(ProductCreate(pid="gone", access_key=K1))
    service.set_product_account("gone", "51")
    service.delete_product("gone")
    service.delete_account("51")


def test_accounts_are_listed_in_numeric_order(service: AdminService) -> None:
    uids = ["9", "10", "100", "11", "2", UID_MAX, "999999999999999999"]
    for uid in uids:
        service.create_account(AccountCreate(uid=uid, access_key=K1))
    expected = sorted(uids, key=int)
    seen: list[str] = []
    after = None
    while True:
        page = service.list_accounts(limit=2, after=after)
        assert all(item.access_key is None for item in page.items)
        seen += [item.uid for item in page.items]
        if page.next is None:
            break
        after = page.next
    assert seen == expected
    assert [a.uid for a in service.list_accounts(after="10").items] == expected[3:]
    for bad in ["x", "01", "0", ""]:
        with pytest.raises(Invalid, match="after must be"):
            service.list_accounts(after=bad)


@pytest.mark.parametrize("pid", sorted(RESERVED_PIDS))
def test_reserved_pids_are_refused(service: AdminService, pid: str) -> None:
    # S1: /ota/south/..., /ota/device/version and /ota/devInfo are classic paths, which win
    # over Studio's /ota/{pid}/...: such a product's Studio devices could not be served.
    with pytest.raises(ValidationError, match=f"pid {pid} is reserved"):
        ProductCreate(pid=pid, access_key=K1)


def test_reserved_pids_are_the_ones_studio_paths_never_take() -> None:
    assert {"south", "device", "devInfo"} == RESERVED_PIDS
    for pid in RESERVED_PIDS:
        assert not dialects.STUDIO_PID.accepts(pid)


@pytest.mark.parametrize("pid", ["South", "SOUTH", "Device", "devinfo", "DEVINFO", "south1"])
def test_other_spellings_are_ordinary_pids(service: AdminService, pid: str) -> None:
    # Pids and paths are case-sensitive (§1): /ota/South/... is no classic path, so a Studio
    # device of product South is reachable.
    assert dialects.STUDIO_PID.accepts(pid)
    assert service.create_product(ProductCreate(pid=pid, access_key=K1)).pid == pid
    service.create_device(DeviceCreate(pid=pid, name="d"))


# ------------------------------------------------------------------------------ API

_uids = itertools.count(1_000)


@pytest.fixture(scope="module", params=DB_PARAMS)
def module_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@pytest.fixture
def client(module_engine: Engine, tmp_path: Path) -> Iterator[httpx2.Client]:
    handler = AdminApi(
        AdminService(module_engine, BlobStore(tmp_path / "packages")),
        admin_token=TOKEN,
        max_upload_bytes=1024,
    )
    with (
        ServerThread(handler.handle) as server,
        httpx2.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        yield http


def _error(reply: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert "Traceback" not in reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code
    return error


def _uid() -> str:
    return str(next(_uids))


def _product(client: httpx2.Client) -> str:
    pid = f"acc{next(_uids)}"
    assert client.post("/api/v1/products", json={"pid": pid, "access_key": K1}).status_code == 201
    return pid


def test_account_lifecycle_over_http(client: httpx2.Client) -> None:
    uid = _uid()
    created = client.post("/api/v1/accounts", json={"uid": uid, "access_key": K1, "name": "n"})
    assert created.status_code == 201, created.text
    assert created.json() == {
        "uid": uid, "name": "n", "access_key": K1, "created_at": created.json()["created_at"],
        "product_count": None,
    }  # fmt: skip
    _error(client.post("/api/v1/accounts", json={"uid": uid}), 409, "conflict")
    shown = client.get(f"/api/v1/accounts/{uid}").json()
    assert (shown["access_key"], shown["product_count"]) == (None, 0)  # only reveal-key shows it
    revealed = client.post(f"/api/v1/accounts/{uid}/reveal-key").json()
    assert revealed["access_key"] == K1
    listed = client.get("/api/v1/accounts", params={"limit": 1000}).json()
    mine = [a for a in listed["items"] if a["uid"] == uid]
    assert mine
    assert mine[0]["access_key"] is None
    # rotate-key: an empty body (generated key) or a given key, as a product's rotate-key.
    generated = client.post(f"/api/v1/accounts/{uid}/rotate-key")
    assert generated.status_code == 200, generated.text
    assert generated.json()["access_key"] not in (None, K1)
    given = client.post(f"/api/v1/accounts/{uid}/rotate-key", json={"access_key": K2})
    assert given.json()["access_key"] == K2
    assert client.delete(f"/api/v1/accounts/{uid}").status_code == 204
    _error(client.get(f"/api/v1/accounts/{uid}"), 404, "not_found")
    _error(client.delete(f"/api/v1/accounts/{uid}"), 404, "not_found")
    generated_account = client.post("/api/v1/accounts", json={})
    assert generated_account.status_code == 201
    assert auth.is_user_id(generated_account.json()["uid"])


def test_product_account_over_http(client: httpx2.Client) -> None:
    uid, pid = _uid(), _product(client)
    assert client.post("/api/v1/accounts", json={"uid": uid}).status_code == 201
    assert client.get(f"/api/v1/products/{pid}").json()["account_uid"] is None
    put = client.put(f"/api/v1/products/{pid}/account", json={"uid": uid})
    assert put.status_code == 200, put.text
    assert put.json()["account_uid"] == uid
    assert "access_key" not in put.json() or put.json()["access_key"] is None
    assert client.get(f"/api/v1/products/{pid}").json()["account_uid"] == uid
    assert client.get(f"/api/v1/accounts/{uid}").json()["product_count"] == 1
    refused = _error(client.delete(f"/api/v1/accounts/{uid}"), 409, "conflict")
    assert pid in refused["message"]
    assert refused["details"] == [{"products": [pid], "product_count": 1}]
    cleared = client.delete(f"/api/v1/products/{pid}/account")
    assert cleared.status_code == 200
    assert cleared.json()["account_uid"] is None
    assert client.delete(f"/api/v1/accounts/{uid}").status_code == 204


def test_unknown_objects_are_404(client: httpx2.Client) -> None:
    uid, pid = _uid(), _product(client)
    for method, path, body in [
        ("GET", f"/api/v1/accounts/{uid}", None),
        ("DELETE", f"/api/v1/accounts/{uid}", None),
        ("POST", f"/api/v1/accounts/{uid}/rotate-key", {}),
        ("PUT", f"/api/v1/products/{pid}/account", {"uid": uid}),  # the account is unknown
        ("PUT", "/api/v1/products/nothere/account", {"uid": uid}),
        ("DELETE", "/api/v1/products/nothere/account", None),
    ]:
        error = _error(client.request(method, path, json=body), 404, "not_found")
        assert "not found" in error["message"], (method, path)
    assert client.get(f"/api/v1/products/{pid}").json()["account_uid"] is None


def test_uid_bounds_and_bad_uids(client: httpx2.Client) -> None:
    past = str(2**63)
    # In a path, a uid outside the grammar or past 2^63-1 names nothing: 404.
    for uid in ["0", "01", "-1", "x", past, "9" * 20, "1%00"]:
        _error(client.get(f"/api/v1/accounts/{uid}"), 404, "not_found")
        _error(client.delete(f"/api/v1/accounts/{uid}"), 404, "not_found")
    _error(client.get(f"/api/v1/accounts/{UID_MAX}"), 404, "not_found")  # in range, absent
    # In a body it breaks a rule: 422, and nothing is created.
    pid = _product(client)
    bad: list[object] = ["0", "01", " 1", "1 ", past, "9" * 19, "", "a\x00", 12, True]
    for value in bad:
        error = _error(client.post("/api/v1/accounts", json={"uid": value}), 422, "invalid")
        assert error["message"].startswith("uid: "), error
        reply = client.put(f"/api/v1/products/{pid}/account", json={"uid": value})
        _error(reply, 422, "invalid")
    for body in [{}, {"uid": None}]:
        _error(client.put(f"/api/v1/products/{pid}/account", json=body), 422, "invalid")
    _error(client.put(f"/api/v1/products/{pid}/account", content=b""), 400, "bad_request")
    _error(client.get("/api/v1/accounts", params={"after": "01"}), 422, "invalid")
    _error(client.get("/api/v1/accounts", params={"limit": "0"}), 422, "invalid")
    ok = client.post("/api/v1/accounts", json={"uid": UID_MAX})
    assert ok.status_code in (201, 409)  # the module's database is shared by both runs of it


def test_bad_account_keys_and_fields_are_422(client: httpx2.Client) -> None:
    uid = _uid()
    for body in [
        {"uid": uid, "access_key": "not base64!"},
        {"uid": uid, "access_key": ""},
        {"uid": uid, "access_key": "QUJD\x00"},
        {"uid": uid, "access_key": "A" * 129},
        {"uid": uid, "name": "a\x00b"},
        {"uid": uid, "name": "n" * 129},
        {"uid": uid, "extra": 1},
    ]:
        _error(client.post("/api/v1/accounts", json=body), 422, "invalid")
    _error(client.get(f"/api/v1/accounts/{uid}"), 404, "not_found")
    assert client.post("/api/v1/accounts", json={"uid": uid}).status_code == 201
    for body in [{"access_key": "!!"}, {"access_key": 5}, {"key": K1}]:
        reply = client.post(f"/api/v1/accounts/{uid}/rotate-key", json=body)
        _error(reply, 422, "invalid")
    _error(client.post(f"/api/v1/accounts/{uid}/rotate-key", content=b"{"), 400, "bad_request")


@pytest.mark.parametrize("pid", ["south", "device", "devInfo"])
def test_reserved_pids_are_422_over_http(client: httpx2.Client, pid: str) -> None:
    error = _error(client.post("/api/v1/products", json={"pid": pid}), 422, "invalid")
    assert error["message"].startswith(f"pid: Value error, pid {pid} is reserved")
    assert error["details"][0]["field"] == "pid"
    assert "S1" in error["message"]
    _error(client.get(f"/api/v1/products/{pid}"), 404, "not_found")


def test_openapi_documents_the_account_routes() -> None:
    paths = openapi_document()["paths"]
    expected = {
        ("post", "/api/v1/accounts"): {"201", "400", "401", "408", "409", "413", "422", "503"},
        ("get", "/api/v1/accounts"): {"200", "401", "422", "503"},
        ("get", "/api/v1/accounts/{uid}"): {"200", "401", "404", "503"},
        ("delete", "/api/v1/accounts/{uid}"): {"204", "401", "404", "409", "503"},
        ("post", "/api/v1/accounts/{uid}/rotate-key"): {
            "200", "400", "401", "404", "408", "413", "422", "503"
        },
        ("put", "/api/v1/products/{pid}/account"): {
            "200", "400", "401", "404", "408", "409", "413", "422", "503"
        },
        ("delete", "/api/v1/products/{pid}/account"): {"200", "401", "404", "503"},
    }  # fmt: skip
    for (method, path), statuses in expected.items():
        # Every route behind a token may also answer 403: a token whose role is too low.
        assert set(paths[path][method]["responses"]) == statuses | {"403"}, (method, path)
    uid = next(p for p in paths["/api/v1/accounts/{uid}"]["get"]["parameters"])
    assert uid["schema"] == {"type": "string", "pattern": f"^(?:{auth.USER_ID_RE.pattern})$"}
    rotate = paths["/api/v1/accounts/{uid}/rotate-key"]["post"]["requestBody"]
    assert rotate["required"] is False

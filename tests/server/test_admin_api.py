"""server/admin_api.py over real HTTP (ServerThread), on SQLite and PostgreSQL.

One migrated database per flavour serves the module; each test works in its own products (unique
pids), with its own package directory and server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from onenet_ota.protocol.download import DownloadError, decode_error_body
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.status import TaskType
from onenet_ota.server import admin_api, schema
from onenet_ota.server import blobs as blobs_module
from onenet_ota.server.admin_api import ROUTES, AdminApi, openapi_document
from onenet_ota.server.admin_service import AdminService, CreatedTask, column_max
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.http import Limits
from tests.server.seed import DB_PARAMS, module_database, product_auth
from tests.serverthread import ServerThread
from tests.tmpfs import small_tmpfs

TOKEN = "admin-token-for-tests-0123456789"
LIMIT = 64 * 1024
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
_pids = itertools.count(1000)


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@dataclass
class Api:
    client: httpx2.Client
    blobs: BlobStore
    engine: Engine
    url: str
    created: list[CreatedTask]

    def pid(self) -> str:
        """A fresh product in this database."""
        pid = str(next(_pids))
        reply = self.client.post("/api/v1/products", json={"pid": pid, "access_key": K1})
        assert reply.status_code == 201, reply.text
        return pid

    def device(self, pid: str, name: str, **extra: Any) -> int:
        reply = self.client.post("/api/v1/devices", json={"pid": pid, "name": name, **extra})
        assert reply.status_code == 201, reply.text
        dev_id: int = reply.json()["dev_id"]
        return dev_id

    def upload(self, pid: str, data: bytes = b"firmware", **params: str) -> httpx2.Response:
        query = {"pid": pid, "type": "fota", "target": "1.0.1", "file_name": "fw.bin", **params}
        return self.client.post("/api/v1/packages", params=query, content=data)

    def package(self, pid: str, data: bytes = b"firmware", **params: str) -> int:
        reply = self.upload(pid, data, **params)
        assert reply.status_code == 201, reply.text
        package_id: int = reply.json()["id"]
        return package_id

    def stored_files(self) -> list[Path]:
        return [p for p in self.blobs.root.rglob("*") if p.is_file()]

    def rows(self, table: Any, **where: Any) -> int:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


@pytest.fixture
def api(engine: Engine, tmp_path: Path) -> Iterator[Api]:
    blobs = BlobStore(tmp_path / "packages")
    created: list[CreatedTask] = []
    handler = AdminApi(
        AdminService(engine, blobs),
        admin_token=TOKEN,
        max_upload_bytes=LIMIT,
        on_task_created=created.append,
    )
    with (
        ServerThread(handler.handle) as srv,
        httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        yield Api(client, blobs, engine, srv.url, created)


def _error(reply: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code
    assert "Traceback" not in reply.text
    return error


# ------------------------------------------------------------------------------ auth, routing


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", f"Token {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
def test_management_needs_the_bearer_token(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = httpx2.get(api.url + "/api/v1/products", headers=headers)
    _error(reply, 401, "unauthorized")
    assert reply.headers["www-authenticate"] == "Bearer"


def test_the_right_token_is_accepted_with_any_scheme_case(api: Api) -> None:
    reply = httpx2.get(api.url + "/api/v1/products", headers={"Authorization": f"bearer {TOKEN}"})
    assert reply.status_code == 200


def test_openapi_and_health_are_public(api: Api) -> None:
    assert httpx2.get(api.url + "/api/v1/health").json()["status"] == "ok"
    document = httpx2.get(api.url + "/api/v1/openapi.json").json()
    assert document["openapi"] == "3.1.0"


def test_unknown_paths_and_methods(api: Api) -> None:
    _error(api.client.get("/api/v1/nothing"), 404, "not_found")
    _error(api.client.get("/api/v2/products"), 404, "not_found")
    reply = api.client.put("/api/v1/products")
    _error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD, POST"
    _error(api.client.get("/api/v1/devices/not-a-number"), 404, "not_found")
    _error(api.client.get(f"/api/v1/devices/{2**63}"), 404, "not_found")


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_request"),
        (b"\xff\xfe", 400, "bad_request"),
        (b"[1, 2]", 422, "invalid"),
        (b'{"pid": 123}', 422, "invalid"),  # strict: a number is not a string
        (b'{"pid": "12 3"}', 422, "invalid"),
        (b'{"pid": "1", "unknown": 1}', 422, "invalid"),
        (b'{"access_key": "not base64!"}', 422, "invalid"),
    ],
)
def test_malformed_bodies_get_4xx(api: Api, body: bytes, status: int, code: str) -> None:
    error = _error(api.client.post("/api/v1/products", content=body), status, code)
    assert error["message"]


def test_booleans_are_not_integers(api: Api) -> None:
    pid = api.pid()
    reply = api.client.post("/api/v1/devices", json={"pid": pid, "name": "d", "dev_id": True})
    error = _error(reply, 422, "invalid")
    assert error["details"][0]["field"] == "dev_id"


def test_json_body_limit(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_api, "MAX_JSON_BODY", 100)
    reply = api.client.post("/api/v1/products", json={"name": "x" * 200})
    _error(reply, 413, "payload_too_large")


def test_bad_query_values(api: Api) -> None:
    _error(api.client.get("/api/v1/products", params={"limit": "0"}), 422, "invalid")
    _error(api.client.get("/api/v1/products", params={"limit": "many"}), 422, "invalid")
    _error(api.client.get("/api/v1/devices", params={"after": "x"}), 422, "invalid")
    _error(api.client.get("/api/v1/tasks", params={"status": "done"}), 422, "invalid")
    _error(api.client.get("/api/v1/packages", params={"type": "3"}), 422, "invalid")


def _task(api: Api) -> tuple[str, int, int, int]:
    """A product with one device, one package and one task of both: (pid, dev_id, package, task)."""
    pid = api.pid()
    dev_id = api.device(pid, "d")
    package_id = api.package(pid)
    reply = api.client.post("/api/v1/tasks", json={"package_id": package_id, "dev_ids": [dev_id]})
    assert reply.status_code == 201, reply.text
    return pid, dev_id, package_id, int(reply.json()["id"])


# Digits that str.isdigit() and int() take but the API's integers are not written in.
FOREIGN_DIGITS = ["²", "١٢", "１", "𝟙", "1²"]


@pytest.mark.parametrize("digits", FOREIGN_DIGITS)
def test_non_ascii_digits_in_integer_parameters_are_422(api: Api, digits: str) -> None:
    _, dev_id, _, task_id = _task(api)
    for path, name in [
        ("/api/v1/products", "limit"),
        ("/api/v1/devices", "limit"),
        ("/api/v1/devices", "after"),
        ("/api/v1/packages", "after"),
        ("/api/v1/tasks", "after"),
        ("/api/v1/tasks", "package_id"),
        (f"/api/v1/tasks/{task_id}", "after"),
        (f"/api/v1/tasks/{task_id}/devices", "after"),
        (f"/api/v1/tasks/{task_id}/devices", "limit"),
    ]:
        error = _error(api.client.get(path, params={name: digits}), 422, "invalid")
        assert name in error["message"], (path, name)
    _error(api.client.get(f"/api/v1/devices/{digits}"), 404, "not_found")
    _error(api.client.get(f"/api/v1/tasks/{task_id}/devices/{dev_id}{digits}"), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"name": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
    ],
)
def test_json_nested_too_deep_is_400(api: Api, body: bytes) -> None:
    error = _error(api.client.post("/api/v1/products", content=body), 400, "bad_request")
    assert "deep" in error["message"]


def test_integers_past_the_conversion_limit_are_422(api: Api) -> None:
    body = b'{"package_id": 1' + b"0" * 5000 + b', "dev_ids": [1]}'
    error = _error(api.client.post("/api/v1/tasks", content=body), 422, "invalid")
    assert "digits" in error["message"]
    assert "set_int_max_str_digits" not in error["message"]  # Python's advice is not the API's


def test_ids_are_bounded_by_their_columns(api: Api) -> None:
    # Packages and tasks have 32-bit ids (PostgreSQL's INTEGER), devices 63-bit ones.
    _, dev_id, package_id, task_id = _task(api)
    past_int32, past_int63 = 2**31, 2**63
    for path in [
        f"/api/v1/packages/{past_int32}",
        f"/api/v1/tasks/{past_int32}",
        f"/api/v1/tasks/{past_int32}/devices",
        f"/api/v1/tasks/{task_id}/devices/{past_int63}/pause",
    ]:
        method = "POST" if path.endswith("pause") else "GET"
        _error(api.client.request(method, path), 404, "not_found")
    for method, path in [
        ("DELETE", f"/api/v1/packages/{past_int32}"),
        ("DELETE", f"/api/v1/tasks/{past_int32}"),
        ("POST", f"/api/v1/tasks/{past_int32}/cancel"),
        ("POST", f"/api/v1/tasks/{past_int32}/devices/{dev_id}/resume"),
    ]:
        _error(api.client.request(method, path), 404, "not_found")
    for path, params in [
        ("/api/v1/tasks", {"package_id": str(past_int32)}),
        ("/api/v1/tasks", {"after": str(past_int32)}),
        ("/api/v1/packages", {"after": str(past_int32)}),
        ("/api/v1/devices", {"after": str(past_int63)}),
        (f"/api/v1/tasks/{task_id}/devices", {"after": str(past_int63)}),
    ]:
        _error(api.client.get(path, params=params), 422, "invalid")
    reply = api.client.post("/api/v1/tasks", json={"package_id": past_int32, "dev_ids": [dev_id]})
    assert _error(reply, 422, "invalid")["details"][0]["field"] == "package_id"
    # The largest ids are still in range: not found, no error.
    _error(api.client.get(f"/api/v1/packages/{2**31 - 1}"), 404, "not_found")
    _error(api.client.get(f"/api/v1/devices/{2**63 - 1}"), 404, "not_found")
    page = api.client.get("/api/v1/tasks", params={"package_id": str(2**31 - 1)})
    assert page.json() == {"items": [], "next": None}
    assert api.client.get("/api/v1/tasks", params={"package_id": package_id}).status_code == 200


@pytest.mark.parametrize(
    "field",
    ["pid", "name", "access_key"],
)
def test_nul_in_product_strings_is_422(api: Api, field: str) -> None:
    pid = str(next(_pids))
    body = {"pid": pid, field: "a\x00b"}
    error = _error(api.client.post("/api/v1/products", json=body), 422, "invalid")
    assert error["details"][0]["field"] == field
    assert api.rows(schema.products, pid=pid) == 0


@pytest.mark.parametrize("field", ["name", "auth_info", "device_key"])
def test_nul_in_device_strings_is_422(api: Api, field: str) -> None:
    pid = api.pid()
    body = {"pid": pid, "name": "d", field: "x\x00"}
    error = _error(api.client.post("/api/v1/devices", json=body), 422, "invalid")
    assert error["details"][0]["field"] == field
    batch = {"pid": pid, "devices": [{"name": "e"}, {"name": "f", field: "\x00"}]}
    error = _error(api.client.post("/api/v1/devices/import", json=batch), 422, "invalid")
    assert error["details"][0]["field"] == f"devices.1.{field}"
    assert api.rows(schema.devices, pid=pid) == 0


def test_nul_and_lone_surrogates_anywhere_in_a_body_are_422(api: Api) -> None:
    for body in [
        b'{"pid": "1", "unknown\\u0000": 1}',
        b'{"name": "\\ud800"}',
        b'{"pid": "1", "name": "a\\udfff"}',
    ]:
        _error(api.client.post("/api/v1/products", content=body), 422, "invalid")
    pid = api.pid()
    rotate = f"/api/v1/products/{pid}/rotate-key"
    _error(api.client.post(rotate, json={"access_key": K1 + "\x00"}), 422, "invalid")
    task = {"package_id": 1, "from_versions": ["1.0\x00"]}
    _error(api.client.post("/api/v1/tasks", json=task), 422, "invalid")


def test_nul_in_query_and_path_strings_is_refused(api: Api) -> None:
    pid, _, _, task_id = _task(api)
    for path, params in [
        ("/api/v1/products", {"after": "1\x00"}),
        ("/api/v1/devices", {"pid": "1\x00"}),
        ("/api/v1/devices", {"f_version": "1\x00"}),
        ("/api/v1/devices", {"s_version": "\x00"}),
        ("/api/v1/devices", {"q": "d\x00"}),
        ("/api/v1/packages", {"pid": "\x00"}),
        ("/api/v1/tasks", {"pid": "\x00"}),
        ("/api/v1/tasks", {"status": "active\x00"}),
        (f"/api/v1/tasks/{task_id}", {"state": "\x00"}),
        (f"/api/v1/tasks/{task_id}/devices", {"state": "paused\x00"}),
    ]:
        _error(api.client.get(path, params=params), 422, "invalid")
    upload = api.upload(pid, target="1\x00")
    _error(upload, 422, "invalid")
    _error(api.upload(pid, file_name="fw\x00.bin"), 422, "invalid")
    _error(api.upload(pid, manuf="\x00"), 422, "invalid")
    for method, path in [
        ("GET", f"/api/v1/products/{pid}%00"),
        ("DELETE", f"/api/v1/products/{pid}%00"),
        ("POST", f"/api/v1/products/{pid}%00/rotate-key"),
    ]:
        _error(api.client.request(method, path), 404, "not_found")
    assert api.client.get(f"/api/v1/products/{pid}").status_code == 200


# ------------------------------------------------------------------------------ HEAD


def _get_paths(api: Api) -> list[str]:
    """A concrete path of every GET route, addressing objects that exist."""
    pid, dev_id, package_id, task_id = _task(api)
    uid = str(next(_pids))
    assert api.client.post("/api/v1/accounts", json={"uid": uid}).status_code == 201
    concrete = {"{pid}": pid, "{dev_id}": str(dev_id), "{id}": str(task_id), "{uid}": uid}
    paths = []
    for route in ROUTES:
        if route.method != "GET":
            continue
        path = route.path
        if path.startswith("/packages/"):
            path = path.replace("{id}", str(package_id))
        for placeholder, value in concrete.items():
            path = path.replace(placeholder, value)
        paths.append("/api/v1" + path)
    return paths


def test_head_answers_like_get_on_every_get_route(api: Api) -> None:
    # RFC 9110 §9.3.2: HEAD is GET without the content. One connection per HEAD request: the
    # HTTP layer decides whether the body is sent, and the client then reads none.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    paths = _get_paths(api)
    assert len(paths) == sum(r.method == "GET" for r in ROUTES)
    for path in [*paths, "/api/v1/products/none", "/api/v1/nothing"]:
        got = api.client.get(path)
        head = httpx2.request("HEAD", api.url + path, headers=headers)
        assert head.status_code == got.status_code, path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["content-length"] == got.headers["content-length"], path
    unauthenticated = httpx2.request("HEAD", api.url + "/api/v1/products")
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"] == "Bearer"


def test_allow_names_head_where_get_is_allowed(api: Api) -> None:
    reply = api.client.put("/api/v1/products")
    _error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD, POST"
    head = httpx2.request("HEAD", api.url + "/api/v1/tasks/1/pause")
    assert head.status_code == 405
    assert head.headers["allow"] == "POST"


# ------------------------------------------------------------------------------ products, devices


def test_product_and_key_rotation(api: Api) -> None:
    created = api.client.post("/api/v1/products", json={})
    assert created.status_code == 201
    pid = created.json()["pid"]
    key = created.json()["access_key"]
    rotated = api.client.post(f"/api/v1/products/{pid}/rotate-key")  # no body: generate
    assert rotated.status_code == 200
    assert rotated.json()["access_key"] != key
    assert api.client.get(f"/api/v1/products/{pid}").json()["access_key"] is None
    assert (
        api.client.post(f"/api/v1/products/{pid}/reveal-key").json()["access_key"]
        == (rotated.json()["access_key"])
    )
    _error(api.client.post("/api/v1/products/nope/rotate-key", json={}), 404, "not_found")


def test_device_key_rotation(api: Api) -> None:
    pid = api.pid()
    dev_id = api.device(pid, "rotating", device_key=K1)
    rotated = api.client.post(f"/api/v1/devices/{dev_id}/rotate-key")  # no body: generate
    assert rotated.status_code == 200, rotated.text
    key = rotated.json()["device_key"]
    assert key != K1
    assert len(key) == 44
    assert api.client.get(f"/api/v1/devices/{dev_id}").json()["device_key"] == key
    given = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    reply = api.client.post(f"/api/v1/devices/{dev_id}/rotate-key", json={"device_key": given})
    assert (reply.status_code, reply.json()["device_key"]) == (200, given)
    plain = api.device(pid, "plain")  # signs with the product key until it gets one
    assert api.client.post(f"/api/v1/devices/{plain}/rotate-key", json={}).status_code == 200
    bad = api.client.post(f"/api/v1/devices/{dev_id}/rotate-key", json={"device_key": "no!"})
    _error(bad, 422, "invalid")
    unknown = api.client.post(f"/api/v1/devices/{dev_id}/rotate-key", json={"access_key": given})
    _error(unknown, 422, "invalid")  # the product route's field, not this one's
    assert api.client.get(f"/api/v1/devices/{dev_id}").json()["device_key"] == given
    _error(api.client.post("/api/v1/devices/999999999/rotate-key"), 404, "not_found")
    _error(api.client.post("/api/v1/devices/nope/rotate-key"), 404, "not_found")


def test_rotate_key_bodies_are_documented_as_optional() -> None:
    """Both rotate-key routes generate a key when the body is left out, and say so."""
    paths = openapi_document()["paths"]
    for path in ("/api/v1/products/{pid}/rotate-key", "/api/v1/devices/{dev_id}/rotate-key"):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is False, path
    assert paths["/api/v1/devices"]["post"]["requestBody"]["required"] is True
    rotate = paths["/api/v1/devices/{dev_id}/rotate-key"]["post"]
    assert rotate["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeviceKeyRotate"
    }
    assert rotate["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Device"
    }
    assert {"404", "422"} <= set(rotate["responses"])


def test_fleet_moved_from_onenet_keeps_its_ids(api: Api) -> None:
    pid = str(next(_pids))
    product = api.client.post("/api/v1/products", json={"pid": pid, "access_key": K1})
    assert product.json()["access_key"] == K1
    reply = api.client.post(
        "/api/v1/devices/import",
        json={
            "pid": pid,
            "devices": [
                {"name": "dev01", "dev_id": 9_000_000_000 + int(pid), "device_key": K1},
                {"name": "dev02", "auth_info": "861234567890123"},
            ],
        },
    )
    assert reply.status_code == 201, reply.text
    first, second = reply.json()["items"]
    assert first["dev_id"] == 9_000_000_000 + int(pid)
    assert first["device_key"] == K1
    assert second["auth_info"] == "861234567890123"
    shown = api.client.get(f"/api/v1/devices/{first['dev_id']}").json()
    assert shown["name"] == "dev01"
    assert shown["tasks"] == []


def test_device_list_pages(api: Api) -> None:
    pid = api.pid()
    for i in range(5):
        api.device(pid, f"d{i}")
    seen: list[int] = []
    params: dict[str, Any] = {"pid": pid, "limit": 2}
    while True:
        page = api.client.get("/api/v1/devices", params=params).json()
        seen += [d["dev_id"] for d in page["items"]]
        if page["next"] is None:
            break
        params["after"] = page["next"]
    assert len(seen) == 5
    assert seen == sorted(seen)


def _concurrently(count: int, call: Callable[[], httpx2.Response]) -> list[int]:
    barrier = threading.Barrier(count)
    statuses: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        status = call().status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(statuses)


def test_concurrent_duplicate_creates(api: Api) -> None:
    pid = str(next(_pids))

    def create_product() -> httpx2.Response:
        with httpx2.Client(base_url=api.url, headers=api.client.headers) as client:
            return client.post("/api/v1/products", json={"pid": pid})

    assert _concurrently(6, create_product) == [201] + [409] * 5
    assert api.rows(schema.products, pid=pid) == 1

    def create_device() -> httpx2.Response:
        with httpx2.Client(base_url=api.url, headers=api.client.headers) as client:
            return client.post("/api/v1/devices", json={"pid": pid, "name": "same"})

    assert _concurrently(6, create_device) == [201] + [409] * 5
    assert api.rows(schema.devices, pid=pid) == 1


def test_concurrent_tasks_for_one_device(api: Api) -> None:
    pid = api.pid()
    dev = api.device(pid, "d")
    package_id = api.package(pid)

    def create_task() -> httpx2.Response:
        with httpx2.Client(base_url=api.url, headers=api.client.headers) as client:
            return client.post("/api/v1/tasks", json={"package_id": package_id, "dev_ids": [dev]})

    assert _concurrently(5, create_task) == [201] + [409] * 4
    assert api.rows(schema.device_tasks, dev_id=dev) == 1
    assert api.rows(schema.tasks, package_id=package_id) == 1


# ------------------------------------------------------------------------------ packages


def test_upload_is_measured_and_stored_by_content(api: Api) -> None:
    pid = api.pid()
    data = bytes(range(256)) * 40
    reply = api.upload(pid, data, manuf="001", model="00108")
    assert reply.status_code == 201, reply.text
    package = reply.json()
    assert package["size"] == len(data)
    assert package["md5"] == hashlib.md5(data).hexdigest()
    assert package["sha256"] == hashlib.sha256(data).hexdigest()
    assert (package["manuf"], package["model"], package["module_type"]) == ("001", "00108", 1)
    assert api.blobs.path(package["sha256"]).read_bytes() == data
    listed = api.client.get("/api/v1/packages", params={"pid": pid, "type": "fota"}).json()
    assert [p["id"] for p in listed["items"]] == [package["id"]]


def test_chunked_upload(api: Api) -> None:
    pid = api.pid()

    def chunks() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000

    reply = api.client.post(
        "/api/v1/packages",
        params={"pid": pid, "type": "sota", "kind": "diff", "from_version": "1.0",
                "target": "1.1", "file_name": "app.patch"},
        content=chunks(),
    )  # fmt: skip
    assert reply.status_code == 201, reply.text
    assert (reply.json()["size"], reply.json()["kind"]) == (2000, 2)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _RecordedHash:
    """A hashlib object that notes whether each update ran on an event loop."""

    def __init__(self, real: Any, calls: list[tuple[str, bool]]) -> None:
        self._real = real
        self._calls = calls

    def update(self, data: bytes) -> None:
        self._calls.append(("hash", _on_event_loop()))
        self._real.update(data)

    def hexdigest(self) -> str:
        digest: str = self._real.hexdigest()
        return digest


def test_upload_hashing_writing_and_fsync_run_off_the_event_loop(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop that receives an upload also serves devices: hashing, writing and syncing a large
    # package on it would stall every device request meanwhile.
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        blobs_module,
        "hashlib",
        types.SimpleNamespace(
            sha256=lambda: _RecordedHash(hashlib.sha256(), calls),
            md5=lambda **kw: _RecordedHash(hashlib.md5(**kw), calls),
        ),
    )
    for name in ("fsync", "replace"):
        real = getattr(os, name)

        def recorded(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append((_name, _on_event_loop()))
            return _real(*args)

        monkeypatch.setattr(os, name, recorded)
    pid = api.pid()
    chunks = [bytes([n]) * 4096 for n in range(12)]
    reply = api.client.post(
        "/api/v1/packages",
        params={"pid": pid, "type": "fota", "target": "1", "file_name": "fw.bin"},
        content=iter(chunks),
    )
    monkeypatch.undo()
    assert reply.status_code == 201, reply.text
    assert reply.json()["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert {what for what, _ in calls} == {"hash", "fsync", "replace"}
    assert [call for call in calls if call[1]] == []


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_upload_leaves_nothing_behind(api: Api, chunked: bool) -> None:
    pid = api.pid()
    data = b"x" * (LIMIT + 1)
    content: Any = data
    if chunked:
        content = iter([data[:LIMIT], data[LIMIT:]])
    reply = api.client.post(
        "/api/v1/packages",
        params={"pid": pid, "type": "fota", "target": "1", "file_name": "big.bin"},
        content=content,
    )
    _error(reply, 413, "payload_too_large")
    assert api.stored_files() == []
    assert api.rows(schema.packages, pid=pid) == 0
    # The server still answers on a new connection.
    assert api.client.get("/api/v1/health").status_code == 200


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


@pytest.mark.parametrize(("how", "status"), [("cut off", 400), ("stalled", 408)])
@pytest.mark.parametrize("what", ["upload", "json"])
def test_a_body_cut_off_or_stalled_is_4xx_and_leaves_nothing_behind(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    how: str, status: int, what: str,
) -> None:  # fmt: skip
    # The client stops sending mid-body: it shuts its side (cut off) or goes quiet past the idle
    # timeout (stalled). Its mistake, so no 5xx and no logged traceback, and nothing is kept.
    blobs = BlobStore(tmp_path / "packages")
    handler = AdminApi(AdminService(engine, blobs), admin_token=TOKEN, max_upload_bytes=LIMIT)
    # A short idle timeout makes the stall quick; the cut-off variant must not meet it.
    idle_timeout = 0.3 if how == "stalled" else 60.0
    pid = str(next(_pids))
    with ServerThread(handler.handle, limits=Limits(idle_timeout=idle_timeout)) as srv:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        created = httpx2.post(srv.url + "/api/v1/products", json={"pid": pid, "access_key": K1},
                              headers=headers)  # fmt: skip
        assert created.status_code == 201
        if what == "upload":
            target = f"/api/v1/packages?pid={pid}&type=fota&target=1&file_name=fw.bin"
            body = b"x" * 4096
        else:
            target = "/api/v1/devices"
            body = json.dumps({"pid": pid, "name": "half"}).encode()
        head = (
            f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n"
        ).encode()
        with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
            sock.sendall(head + body)
            if what == "upload":
                for _ in range(600):  # a bound for a hung test, not a timing expectation
                    if any((blobs.root / "tmp").glob("upload-*")):
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("the upload never reached the store")
            if how == "cut off":
                sock.shutdown(socket.SHUT_WR)
            answer = _answer(sock)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert b"Traceback" not in answer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    assert [p for p in blobs.root.rglob("*") if p.is_file()] == []
    with engine.connect() as conn:
        for table in (schema.packages, schema.devices):
            rows = conn.execute(select(func.count()).select_from(table).where(table.c.pid == pid))
            assert rows.scalar_one() == 0


def test_a_full_disk_is_507_and_leaves_nothing_behind(engine: Engine, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        blobs = BlobStore(disk / "packages")
        handler = AdminApi(AdminService(engine, blobs), admin_token=TOKEN, max_upload_bytes=2**22)
        with (
            ServerThread(handler.handle) as srv,
            httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
        ):
            api = Api(client, blobs, engine, srv.url, [])
            pid = api.pid()
            error = _error(api.upload(pid, os.urandom(1024 * 1024)), 507, "insufficient_storage")
            assert error["message"] == "the server has no space left for the package"
            assert api.stored_files() == []  # the partial file too
            assert api.rows(schema.packages, pid=pid) == 0
            api.package(pid, b"a small package still fits")  # and the server goes on


@pytest.mark.parametrize(
    "file_name",
    ["../../etc/passwd", 'a"b', "a\\b", "line\r\nX-Evil: 1", "ünïcode.bin", "x" * 65, "", ".."],
)
def test_hostile_file_names_are_refused(api: Api, file_name: str) -> None:
    pid = api.pid()
    reply = api.upload(pid, b"data", file_name=file_name)
    _error(reply, 422, "invalid")
    assert api.stored_files() == []
    assert api.rows(schema.packages, pid=pid) == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"type": "xota"}, "type"),
        ({"kind": "diff"}, "from_version"),
        ({"target": "1.0 beta"}, "target"),
        ({"pid": "999999999999"}, "does not exist"),
        ({"manuf": "x" * 40}, "manuf"),
    ],
)
def test_bad_upload_metadata_is_refused_before_the_body(
    api: Api, params: dict[str, str], message: str
) -> None:
    query = {"pid": api.pid(), **params}
    error = _error(api.upload(query.pop("pid"), b"data", **query), 422, "invalid")
    assert message in json.dumps(error)
    assert api.stored_files() == []


def test_empty_upload_is_refused(api: Api) -> None:
    pid = api.pid()
    _error(api.upload(pid, b""), 422, "invalid")
    assert api.stored_files() == []


def test_package_delete(api: Api) -> None:
    pid = api.pid()
    package_id = api.package(pid, f"unique to {pid}".encode())  # no other package shares it
    assert api.client.delete(f"/api/v1/packages/{package_id}").status_code == 204
    assert api.stored_files() == []
    _error(api.client.get(f"/api/v1/packages/{package_id}"), 404, "not_found")
    _error(api.client.delete(f"/api/v1/packages/{package_id}"), 404, "not_found")


# ------------------------------------------------------------------------------ tasks


def test_task_lifecycle(api: Api) -> None:
    pid = api.pid()
    a = api.device(pid, "a")
    b = api.device(pid, "b")
    package_id = api.package(pid)
    reply = api.client.post(
        "/api/v1/tasks",
        json={"package_id": package_id, "dev_ids": [a, b], "retry": 3, "interval": 1,
              "signal": 10, "power": 20},
    )  # fmt: skip
    assert reply.status_code == 201, reply.text
    task = reply.json()
    assert task["counts"]["to_be_upgraded"] == 2
    assert (task["retry"], task["signal"], task["power"]) == (3, 10, 20)
    assert [c.task.id for c in api.created] == [task["id"]]
    assert sorted(api.created[0].dev_ids) == sorted([a, b])

    base = f"/api/v1/tasks/{task['id']}"
    assert api.client.post(base + "/pause").json()["counts"]["paused"] == 2
    _error(api.client.post(base + "/pause"), 409, "conflict")
    device_reply = api.client.post(f"{base}/devices/{a}/resume")
    assert device_reply.json()["state"] == "to_be_upgraded"
    paused_only = api.client.get(base + "/devices", params={"state": "paused"}).json()
    assert [d["dev_id"] for d in paused_only["items"]] == [b]
    assert api.client.post(base + "/resume").json()["changed"] == 1
    cancelled = api.client.post(base + "/cancel").json()
    assert (cancelled["status"], cancelled["counts"]["cancelled"]) == ("cancelled", 2)
    _error(api.client.post(f"{base}/devices/{a}/pause"), 409, "conflict")

    listed = api.client.get("/api/v1/tasks", params={"pid": pid}).json()
    assert [t["id"] for t in listed["items"]] == [task["id"]]
    shown = api.client.get(base).json()
    assert {d["dev_id"] for d in shown["devices"]} == {a, b}
    history = api.client.get(f"/api/v1/devices/{a}").json()["tasks"]
    assert history[0]["state"] == "cancelled"
    _error(api.client.get("/api/v1/tasks/99999999"), 404, "not_found")


def test_task_conflicts_and_validation(api: Api) -> None:
    pid = api.pid()
    dev = api.device(pid, "a")
    package_id = api.package(pid)
    body = {"package_id": package_id, "dev_ids": [dev]}
    assert api.client.post("/api/v1/tasks", json=body).status_code == 201
    error = _error(api.client.post("/api/v1/tasks", json=body), 409, "conflict")
    assert error["details"] == [{"dev_id": dev}]
    _error(api.client.post("/api/v1/tasks", json={"package_id": package_id}), 422, "invalid")
    _error(
        api.client.post("/api/v1/tasks", json={**body, "on_open": "skip", "deadline": 1}),
        422,
        "invalid",
    )


# ------------------------------------------------------------------------------ deleting


def _device_rows(api: Api, dev_id: int) -> tuple[int, int, int]:
    """(device rows, device task rows, download tokens) of one device."""
    dt, tok = schema.device_tasks, schema.tokens
    with api.engine.connect() as conn:
        tokens = conn.execute(
            select(func.count())
            .select_from(tok.join(dt, dt.c.id == tok.c.device_task_id))
            .where(dt.c.dev_id == dev_id)
        ).scalar_one()
    return api.rows(schema.devices, dev_id=dev_id), api.rows(dt, dev_id=dev_id), int(tokens)


def test_device_delete(api: Api) -> None:
    pid = api.pid()
    dev = api.device(pid, "d")
    other = api.device(pid, "other")
    task = api.client.post(
        "/api/v1/tasks", json={"package_id": api.package(pid), "dev_ids": [dev, other]}
    ).json()
    error = _error(api.client.delete(f"/api/v1/devices/{dev}"), 409, "conflict")
    assert error["message"] == (
        f"device {dev} has an open task: task {task['id']} (to_be_upgraded); cancel it first"
    )
    assert error["details"] == [{"task_id": task["id"], "state": "to_be_upgraded"}]
    assert _device_rows(api, dev) == (1, 1, 0)
    api.client.post(f"/api/v1/tasks/{task['id']}/cancel").raise_for_status()

    reply = api.client.delete(f"/api/v1/devices/{dev}")
    assert (reply.status_code, reply.content) == (204, b"")
    assert _device_rows(api, dev) == (0, 0, 0)
    assert _device_rows(api, other) == (1, 1, 0)
    _error(api.client.get(f"/api/v1/devices/{dev}"), 404, "not_found")
    assert _error(api.client.delete(f"/api/v1/devices/{dev}"), 404, "not_found")["message"] == (
        f"device {dev} not found"
    )
    _error(api.client.delete("/api/v1/devices/not-a-number"), 404, "not_found")
    assert api.client.get(f"/api/v1/tasks/{task['id']}").json()["total"] == 1


def test_device_delete_needs_the_token(api: Api) -> None:
    dev = api.device(api.pid(), "d")
    _error(httpx2.delete(f"{api.url}/api/v1/devices/{dev}"), 401, "unauthorized")
    assert api.rows(schema.devices, dev_id=dev) == 1


def test_product_delete(api: Api) -> None:
    pid = api.pid()
    dev = api.device(pid, "d")
    package_id = api.package(pid, f"only in {pid}".encode())
    error = _error(api.client.delete(f"/api/v1/products/{pid}"), 409, "conflict")
    assert error["message"] == f"product {pid} still has 1 device, 1 package; delete them first"
    assert error["details"] == [{"devices": 1, "packages": 1, "tasks": 0}]
    assert api.client.delete(f"/api/v1/devices/{dev}").status_code == 204
    assert api.client.delete(f"/api/v1/packages/{package_id}").status_code == 204

    reply = api.client.delete(f"/api/v1/products/{pid}")
    assert (reply.status_code, reply.content) == (204, b"")
    assert api.rows(schema.products, pid=pid) == 0
    _error(api.client.get(f"/api/v1/products/{pid}"), 404, "not_found")
    _error(api.client.delete(f"/api/v1/products/{pid}"), 404, "not_found")


def test_delete_device_while_a_task_is_created_for_it(api: Api) -> None:
    # Whichever commits first wins; the other gets a 4xx and nothing is left half-done.
    pid = api.pid()
    package_id = api.package(pid)
    for round_ in range(4):
        dev = api.device(pid, f"d{round_}")

        def delete(dev: int = dev) -> httpx2.Response:
            with httpx2.Client(base_url=api.url, headers=api.client.headers) as client:
                return client.delete(f"/api/v1/devices/{dev}")

        def create(dev: int = dev) -> httpx2.Response:
            with httpx2.Client(base_url=api.url, headers=api.client.headers) as client:
                body = {"package_id": package_id, "dev_ids": [dev]}
                return client.post("/api/v1/tasks", json=body)

        statuses = _run_together([delete, create])
        if statuses[0] == 204:
            assert statuses[1] in (409, 422)
            assert _device_rows(api, dev) == (0, 0, 0)
        else:
            assert statuses == [409, 201]
            assert _device_rows(api, dev) == (1, 1, 0)
    assert api.rows(schema.tasks, package_id=package_id) == sum(
        api.rows(schema.device_tasks, dev_id=d["dev_id"])
        for d in api.client.get("/api/v1/devices", params={"pid": pid}).json()["items"]
    )


def _run_together(calls: list[Callable[[], httpx2.Response]]) -> list[int]:
    return [reply.status_code for reply in _results_together(calls)]


@dataclass
class _Platform:
    """The management API and device APIs over one database, each on its own server."""

    client: httpx2.Client  # the management API, authorised
    api: Api
    device_apis: list[tuple[DeviceApi, str]]  # (device API, its URL)


@contextlib.contextmanager
def _platform(
    engine: Engine, tmp_path: Path, feed_intervals: tuple[float, ...]
) -> Iterator[_Platform]:
    """One device API per feed interval. The first is wired to the management service's
    on_change (like the device API of the same process); the others learn of changes only from
    the change feed (like other workers)."""
    blobs = BlobStore(tmp_path / "packages")
    device_apis = [DeviceApi(engine, blobs, feed_interval=i) for i in feed_intervals]
    service = AdminService(engine, blobs, on_change=device_apis[0].service.invalidate)
    handler = AdminApi(service, admin_token=TOKEN, max_upload_bytes=LIMIT)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with contextlib.ExitStack() as stack:
            admin_server = stack.enter_context(ServerThread(handler.handle))
            urls = [stack.enter_context(ServerThread(d.handle)).url for d in device_apis]
            client = stack.enter_context(httpx2.Client(base_url=admin_server.url, headers=headers))
            api = Api(client, blobs, engine, admin_server.url, [])
            yield _Platform(client, api, list(zip(device_apis, urls, strict=True)))
    finally:
        for device_api in device_apis:
            device_api.close()


def test_a_deleted_device_is_unknown_to_device_apis_that_had_cached_it(
    engine: Engine, tmp_path: Path
) -> None:
    # The first device API learns of the delete from on_change alone (its change feed is read
    # once an hour); the other one, like another worker, from the change feed alone.
    with _platform(engine, tmp_path, (3600, 0)) as platform:
        client, api, device_apis = platform.client, platform.api, platform.device_apis
        pid = api.pid()
        dev = api.device(pid, "d")
        body = {"package_id": api.package(pid), "dev_ids": [dev]}
        task = client.post("/api/v1/tasks", json=body).json()
        auth = product_auth(pid, K1)

        def poll(url: str) -> int:
            query: dict[str, Any] = {"dev_id": dev, "type": 1, "version": "1.0.0"}
            reply = httpx2.get(
                url + "/ota/south/check", params=query, headers={"Authorization": auth}
            )
            errno: int = reply.json()["errno"]
            return errno

        for _, url in device_apis:
            assert poll(url) == Errno.SUCC  # issues a download token
        client.post(f"/api/v1/tasks/{task['id']}/cancel").raise_for_status()
        for device_api, url in device_apis:
            assert [poll(url), poll(url)] == [Errno.NO_TASK, Errno.NO_TASK]
            cached = device_api.service.caches.check_task(dev, TaskType.FOTA, "1.0.0")
            assert cached == (Errno.NO_TASK, None)
        assert _device_rows(api, dev) == (1, 1, 1)  # the second E3 got the same token

        assert client.delete(f"/api/v1/devices/{dev}").status_code == 204

        assert _device_rows(api, dev) == (0, 0, 0)
        for _, url in device_apis:
            assert poll(url) == Errno.AUTH_FAILED  # §4.2 P3: unknown device


def _task_rows(api: Api, task_id: int) -> tuple[int, int, int]:
    """(task rows, device task rows, download tokens) of one task."""
    dt, tok = schema.device_tasks, schema.tokens
    with api.engine.connect() as conn:
        tokens = conn.execute(
            select(func.count())
            .select_from(tok.join(dt, dt.c.id == tok.c.device_task_id))
            .where(dt.c.task_id == task_id)
        ).scalar_one()
    return api.rows(schema.tasks, id=task_id), api.rows(dt, task_id=task_id), int(tokens)


def test_task_delete(api: Api) -> None:
    pid = api.pid()
    a, b = api.device(pid, "a"), api.device(pid, "b")
    package_id = api.package(pid)
    body = {"package_id": package_id, "dev_ids": [a, b]}
    task = api.client.post("/api/v1/tasks", json=body).json()
    error = _error(api.client.delete(f"/api/v1/tasks/{task['id']}"), 409, "conflict")
    first, second = sorted([a, b])
    assert error["message"] == (
        f"task {task['id']} has 2 open device tasks: {first} (to_be_upgraded), {second}"
        " (to_be_upgraded); cancel the task first"
    )
    assert error["details"] == [
        {"dev_id": first, "state": "to_be_upgraded"},
        {"dev_id": second, "state": "to_be_upgraded"},
    ]
    assert _task_rows(api, task["id"]) == (1, 2, 0)
    api.client.post(f"/api/v1/tasks/{task['id']}/cancel").raise_for_status()
    other = api.client.post("/api/v1/tasks", json={**body, "dev_ids": [a]}).json()

    reply = api.client.delete(f"/api/v1/tasks/{task['id']}")
    assert (reply.status_code, reply.content) == (204, b"")
    assert _task_rows(api, task["id"]) == (0, 0, 0)
    assert api.rows(schema.devices, pid=pid) == 2  # devices, package and other tasks stay
    assert api.client.get(f"/api/v1/packages/{package_id}").status_code == 200
    assert api.client.get(f"/api/v1/tasks/{other['id']}").json()["total"] == 1
    assert [t["task_id"] for t in api.client.get(f"/api/v1/devices/{a}").json()["tasks"]] == [
        other["id"]
    ]
    _error(api.client.get(f"/api/v1/tasks/{task['id']}"), 404, "not_found")
    missing = _error(api.client.delete(f"/api/v1/tasks/{task['id']}"), 404, "not_found")
    assert missing["message"] == f"task {task['id']} not found"
    _error(api.client.delete("/api/v1/tasks/not-a-number"), 404, "not_found")
    _error(api.client.post(f"/api/v1/tasks/{task['id']}/resume"), 404, "not_found")


def test_task_delete_needs_the_token(api: Api) -> None:
    pid = api.pid()
    body = {"package_id": api.package(pid), "dev_ids": [api.device(pid, "d")]}
    task = api.client.post("/api/v1/tasks", json=body).json()
    api.client.post(f"/api/v1/tasks/{task['id']}/cancel").raise_for_status()
    _error(httpx2.delete(f"{api.url}/api/v1/tasks/{task['id']}"), 401, "unauthorized")
    assert _task_rows(api, task["id"]) == (1, 1, 0)


def test_package_and_product_can_go_once_their_task_is_deleted(api: Api) -> None:
    pid = api.pid()
    dev = api.device(pid, "d")
    package_id = api.package(pid, f"only for {pid}".encode())
    body = {"package_id": package_id, "dev_ids": [dev]}
    task = api.client.post("/api/v1/tasks", json=body).json()
    api.client.post(f"/api/v1/tasks/{task['id']}/cancel").raise_for_status()
    assert api.client.delete(f"/api/v1/devices/{dev}").status_code == 204
    in_use = _error(api.client.delete(f"/api/v1/packages/{package_id}"), 409, "conflict")
    assert in_use["message"] == f"package {package_id} is used by 1 task(s)"
    left = _error(api.client.delete(f"/api/v1/products/{pid}"), 409, "conflict")
    assert left["details"] == [{"devices": 0, "packages": 1, "tasks": 1}]

    assert api.client.delete(f"/api/v1/tasks/{task['id']}").status_code == 204

    assert api.client.delete(f"/api/v1/packages/{package_id}").status_code == 204
    assert api.stored_files() == []
    assert api.client.delete(f"/api/v1/products/{pid}").status_code == 204
    assert api.rows(schema.products, pid=pid) == 0


class _Device:
    """One device speaking the classic API (E3, E5, E6, E7) to one device API."""

    def __init__(self, url: str, dev_id: int, auth: str) -> None:
        self.url = url
        self.dev_id = dev_id
        self.auth = auth

    def _errno(self, method: str, path: str, **kw: Any) -> int:
        reply = httpx2.request(
            method,
            self.url + path,
            params={"dev_id": self.dev_id, **kw.pop("params", {})},
            headers={"Authorization": self.auth},
            **kw,
        )
        errno: int = reply.json()["errno"]
        return errno

    def check(self) -> tuple[int, str | None]:
        reply = httpx2.get(
            self.url + "/ota/south/check",
            params={"dev_id": self.dev_id, "type": 1, "version": "1.0.0"},
            headers={"Authorization": self.auth},
        ).json()
        return reply["errno"], (reply.get("data") or {}).get("token")

    def e5(self, token: str) -> int:
        return self._errno("GET", f"/ota/south/download/{token}/check")

    def e7(self, token: str, step: int) -> int:
        return self._errno(
            "POST", f"/ota/south/device/download/{token}/progress", json={"step": step}
        )

    def e6(self, token: str) -> DownloadError | None:
        reply = httpx2.get(f"{self.url}/ota/south/download/{token}")
        return decode_error_body(reply.content) if "content-length" not in reply.headers else None

    def upgrade(self) -> str:
        """A whole successful upgrade (E3, E5, E7 201); returns the token."""
        errno, token = self.check()
        assert (errno, token is not None) == (Errno.SUCC, True)
        assert token is not None
        assert self.e5(token) == Errno.SUCC  # T9: downloading
        assert self.e7(token, 201) == Errno.SUCC  # T15: succeeded
        return token


def test_a_deleted_task_is_forgotten_by_device_apis_that_had_cached_it(
    engine: Engine, tmp_path: Path
) -> None:
    # The first device API learns of the delete from on_change alone (its change feed is read
    # once an hour); the other one, like another worker, from the change feed alone.
    with _platform(engine, tmp_path, (3600, 0)) as platform:
        client, api = platform.client, platform.api
        pid = api.pid()
        dev = api.device(pid, "d")
        body = {"package_id": api.package(pid), "dev_ids": [dev]}
        task = client.post("/api/v1/tasks", json=body).json()
        auth = product_auth(pid, K1)
        same, same_url = platform.device_apis[0]
        token = _Device(same_url, dev, auth).upgrade()
        device_apis = [(d, _Device(url, dev, auth)) for d, url in platform.device_apis]
        for device_api, device in device_apis:
            assert [device.check(), device.check()] == [(Errno.NO_TASK, None)] * 2
            cached = device_api.service.caches.check_task(dev, TaskType.FOTA, "1.0.0")
            assert cached == (Errno.NO_TASK, None)
            assert device.e6(token) == DownloadError.INVALID_TOKEN  # §6.6.4: not active
            assert device_api.service.caches.grant(token) is not None
            assert device.e5(token) == Errno.TASK_FINISHED  # §5.4
            assert device.e7(token, 201) == Errno.TASK_FINISHED  # §5.5
        assert _task_rows(api, task["id"]) == (1, 1, 1)

        assert client.delete(f"/api/v1/tasks/{task['id']}").status_code == 204

        assert _task_rows(api, task["id"]) == (0, 0, 0)
        # on_change: this process's device API dropped what it had cached, before any request.
        assert same.service.caches.grant(token) is None
        assert same.service.caches.check_task(dev, TaskType.FOTA, "1.0.0") is None
        for device_api, device in device_apis:
            assert device.check() == (Errno.NO_TASK, None)  # reads the feed first
            assert device_api.service.caches.grant(token) is None
            # §5.6: the tokens of a task that is no longer kept are unknown.
            assert device.e5(token) == Errno.NO_VALID_TOKEN
            assert device.e7(token, 201) == Errno.AUTH_FAILED
            assert device.e6(token) == DownloadError.INVALID_TOKEN
            assert device.check() == (Errno.NO_TASK, None)


def test_device_requests_racing_with_task_deletes(engine: Engine, tmp_path: Path) -> None:
    # Late reports, E5 with old tokens and polls while the task is deleted: the delete never
    # fails, the devices get the finished task's answers or the unknown token's, never a 500.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with _platform(engine, tmp_path, (0.1,)) as platform:
        client, api = platform.client, platform.api
        pid = api.pid()
        auth = product_auth(pid, K1)
        devices = [
            _Device(platform.device_apis[0][1], api.device(pid, f"d{i}"), auth) for i in range(3)
        ]
        package_id = api.package(pid)
        for _ in range(3):
            body = {"package_id": package_id, "dev_ids": [d.dev_id for d in devices]}
            task = client.post("/api/v1/tasks", json=body).json()
            tokens = [device.upgrade() for device in devices]

            def delete(task_id: int = task["id"]) -> Any:
                with httpx2.Client(base_url=api.url, headers=headers) as own:
                    return own.delete(f"/api/v1/tasks/{task_id}").status_code

            calls: list[Callable[[], Any]] = [delete]
            for device, token in zip(devices, tokens, strict=True):
                calls += [
                    functools.partial(device.e7, token, 201),
                    functools.partial(device.e5, token),
                    device.check,
                ]
            results = _results_together(calls)
            assert results[0] == 204
            for i in range(len(devices)):
                late_report, old_token, poll = results[1 + 3 * i : 4 + 3 * i]
                assert late_report in (Errno.TASK_FINISHED, Errno.AUTH_FAILED)
                assert old_token in (Errno.TASK_FINISHED, Errno.NO_VALID_TOKEN)
                assert poll == (Errno.NO_TASK, None)
            assert _task_rows(api, task["id"]) == (0, 0, 0)
            for device, token in zip(devices, tokens, strict=True):
                assert device.e7(token, 201) == Errno.AUTH_FAILED
        assert api.rows(schema.devices, pid=pid) == 3


def _results_together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads released at once; their results in call order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# ------------------------------------------------------------------------------ OpenAPI


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_document_matches_the_routes() -> None:
    document = openapi_document()
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert documented == {(r.method, "/api/v1" + r.path) for r in ROUTES}
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"]["/api/v1" + path][method]
    return operation


def _param_schema(operation: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = next(p["schema"] for p in operation["parameters"] if p["name"] == name)
    return schema


def test_openapi_states_parameter_bounds() -> None:
    document = openapi_document()
    limit = _param_schema(_operation(document, "get", "/products"), "limit")
    assert limit == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
    int32, int63 = 2**31 - 1, 2**63 - 1
    for method, path, name, maximum in [
        ("get", "/packages/{id}", "id", int32),
        ("delete", "/tasks/{id}", "id", int32),
        ("get", "/devices/{dev_id}", "dev_id", int63),
        ("post", "/tasks/{id}/devices/{dev_id}/pause", "dev_id", int63),
        ("get", "/tasks", "package_id", int32),
        ("get", "/tasks", "after", int32),
        ("get", "/packages", "after", int32),
        ("get", "/devices", "after", int63),
    ]:
        assert _param_schema(_operation(document, method, path), name)["maximum"] == maximum
    pid = _param_schema(_operation(document, "get", "/products/{pid}"), "pid")
    assert pid == {"type": "string", "pattern": "^(?:[A-Za-z0-9]{1,32})$"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            parameters = operation.get("parameters", [])
            in_path = [p["name"] for p in parameters if p["in"] == "path"]
            assert in_path == re.findall(r"{(\w+)}", path)
            for parameter in parameters:
                schema = parameter["schema"]
                if schema["type"] == "integer":
                    assert {"minimum", "maximum"} <= schema.keys(), (path, parameter)
                elif "enum" not in schema:
                    # JSON Schema searches for a pattern: only an anchored one is a rule.
                    assert schema["pattern"].startswith("^"), (path, parameter)
                    assert schema["pattern"].endswith("$"), (path, parameter)


def test_integer_inputs_fit_the_columns_they_are_stored_in() -> None:
    # PostgreSQL refuses a value past a column's range with an error, not a 4xx: every
    # documented maximum is one the column holds.
    document = openapi_document()
    schemas = document["components"]["schemas"]
    t, d = schema.tasks.c, schema.devices.c
    for model, field, column in [
        ("TaskCreate", "package_id", t.package_id),
        ("TaskCreate", "signal", t.signal),
        ("TaskCreate", "power", t.power),
        ("TaskCreate", "retry", t.retry),
        ("TaskCreate", "interval", t.interval),
        ("DeviceImportItem", "dev_id", d.dev_id),
    ]:
        prop = schemas[model]["properties"][field]
        bounds = prop.get("anyOf", [prop])[0]
        assert bounds["maximum"] <= column_max(column), (model, field)
    start = schemas["TaskCreate"]["properties"]["start_time"]["anyOf"][0]
    assert start["maximum"] <= column_max(t.start_time)
    dev_ids = schemas["TaskCreate"]["properties"]["dev_ids"]["anyOf"][0]["items"]
    assert dev_ids["maximum"] <= column_max(schema.device_tasks.c.dev_id)
    columns = {
        "/packages/{id}": schema.packages.c.id,
        "/tasks/{id}": schema.tasks.c.id,
        "/devices/{dev_id}": d.dev_id,
    }
    for path, column in columns.items():
        for operation in document["paths"]["/api/v1" + path].values():
            (parameter,) = [p for p in operation["parameters"] if p["in"] == "path"]
            assert parameter["schema"]["maximum"] == column_max(column), path


def test_openapi_rotate_key_body_is_optional() -> None:
    document = openapi_document()
    body = _operation(document, "post", "/products/{pid}/rotate-key")["requestBody"]
    assert body["required"] is False
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyRotate"
    }
    assert _operation(document, "post", "/products")["requestBody"]["required"] is True


def test_openapi_lists_every_error_status() -> None:
    document = openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = {int(code) for code in operation["responses"] if int(code) >= 400}
            where = (method, path)
            content = operation.get("requestBody", {}).get("content", {})
            json_body = "application/json" in content
            # Only a body can be malformed or cut off (400), or stop arriving (408).
            assert (400 in codes) == bool(content), where
            assert (408 in codes) == bool(content), where
            if json_body:
                assert {413, 422} <= codes, where
            if any(p["in"] == "query" for p in operation.get("parameters", [])):
                assert 422 in codes, where
            if "{" in path:
                assert 404 in codes, where
            if operation.get("security") != []:
                assert {401, 503} <= codes, where
                assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]
            else:
                assert codes == set(), where


def test_every_documented_operation_is_served(api: Api) -> None:
    # Placeholders reach each route's handler: anything but "no such endpoint" and 405 proves it.
    document = httpx2.get(api.url + "/api/v1/openapi.json").json()
    for path, operations in document["paths"].items():
        concrete = path
        for placeholder in ("{pid}", "{id}", "{dev_id}", "{uid}"):
            concrete = concrete.replace(placeholder, "1")
        for method in operations:
            reply = api.client.request(method.upper(), concrete, content=b"{}")
            assert reply.status_code != 405, (method, path)
            if reply.status_code == 404:
                assert reply.json()["error"]["message"] != "no such endpoint", (method, path)


# ------------------------------------------------------------------------------ error paths


class _BrokenService(AdminService):
    def __init__(self, exc: Exception, blobs: BlobStore, engine: Engine) -> None:
        self.exc = exc
        self.blobs = blobs
        self.engine = engine  # where the API's tokens are

    def list_products(self, **_kwargs: Any) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RuntimeError("secret internals"), 500, "internal"),
        (OperationalError("SELECT", {}, Exception("database is locked")), 503, "unavailable"),
    ],
)
def test_unexpected_failures_send_no_internals(
    tmp_path: Path, engine: Engine, exc: Exception, status: int, code: str
) -> None:
    handler = AdminApi(
        _BrokenService(exc, BlobStore(tmp_path), engine), admin_token=TOKEN, max_upload_bytes=10
    )
    with ServerThread(handler.handle) as srv:
        reply = httpx2.get(
            srv.url + "/api/v1/products", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    error = _error(reply, status, code)
    assert "secret" not in reply.text
    assert "locked" not in error["message"]

"""Every device endpoint E1-E9 over real HTTP, with every errno each can produce (spec §4-§6).

One server per database flavour serves the whole module; each test seeds its own product, device
and task, so the tests stay independent without a database per test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, update

from onenet_ota.protocol.states import TaskState
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.schema import packages, tasks
from tests.server.seed import (
    DB_PARAMS,
    FIRMWARE,
    HOUR,
    K2,
    SDK_AUTH,
    T0,
    TOKEN_LIFE,
    FakeClock,
    Seeder,
    World,
    module_database,
    product_auth,
    raw_exchange,
    running_api,
)
from tests.serverthread import ServerThread

S = TaskState


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@pytest.fixture(scope="module")
def env(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Seeder, DeviceApi, ServerThread]]:
    clock = FakeClock()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    seeder = Seeder(engine, blobs, clock)
    with running_api(engine, blobs, clock, public_address="ota.example.net:80") as (api, srv):
        yield seeder, api, srv


@pytest.fixture
def seeder(env: tuple[Seeder, DeviceApi, ServerThread]) -> Iterator[Seeder]:
    seeder = env[0]
    seeder.clock.now = T0
    yield seeder
    seeder.clock.now = T0


@pytest.fixture
def api(env: tuple[Seeder, DeviceApi, ServerThread]) -> DeviceApi:
    return env[1]


@pytest.fixture
def client(env: tuple[Seeder, DeviceApi, ServerThread]) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=env[2].url, timeout=10) as c:
        yield c


def call(
    client: httpx2.Client,
    method: str,
    path: str,
    *,
    auth: str | None,
    params: dict[str, Any] | None = None,
    body: Any = None,
    content: bytes | None = None,
) -> dict[str, Any]:
    """A JSON endpoint call; asserts the canonical envelope (§2.5, §4.3) and returns it."""
    headers = {} if auth is None else {"Authorization": auth}
    if body is not None:
        content = json.dumps(body).encode()
    response = client.request(method, path, params=params, headers=headers, content=content)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert len(response.content) <= 512
    reply = response.json()
    assert isinstance(reply["errno"], int)
    assert reply["error"]
    return dict(reply)


def errno_of(client: httpx2.Client, method: str, path: str, **kw: Any) -> int:
    return int(call(client, method, path, **kw)["errno"])


def check(client: httpx2.Client, w: World, **params: Any) -> dict[str, Any]:
    query = {"dev_id": w.dev_id, "type": 1, "version": "1.0.0", **params}
    return call(client, "GET", "/ota/south/check", auth=w.auth, params=query)


def token_of(client: httpx2.Client, w: World, **params: Any) -> str:
    reply = check(client, w, **params)
    assert reply["errno"] == 0, reply
    return str(reply["data"]["token"])


def e5(client: httpx2.Client, w: World, token: str) -> int:
    path = f"/ota/south/download/{token}/check"
    return errno_of(client, "GET", path, auth=w.auth, params={"dev_id": w.dev_id})


def e7(client: httpx2.Client, w: World, token: str, body: Any) -> int:
    path = f"/ota/south/device/download/{token}/progress"
    return errno_of(client, "POST", path, auth=w.auth, params={"dev_id": w.dev_id}, body=body)


def e8(client: httpx2.Client, w: World, token: str | None, body: Any = None, **kw: Any) -> int:
    params: dict[str, Any] = {"dev_id": w.dev_id}
    if token is not None:
        params["token"] = token
    return errno_of(
        client, "POST", "/ota/south/report", auth=w.auth, params=params, body=body, **kw
    )


def download(client: httpx2.Client, token: str, **headers: str) -> httpx2.Response:
    return client.get(f"/ota/south/download/{token}", headers=headers)


def error_byte(response: httpx2.Response) -> int | None:
    """The D7 error code of an E6 reply, or None for a successful download."""
    if "Content-Length" in response.headers:
        return None
    assert response.status_code == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert len(response.content) == 1
    return response.content[0]


def break_db(monkeypatch: pytest.MonkeyPatch, api: DeviceApi, name: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(api.service, name, fail)


# ---------------------------------------------------------------------------------------------
# Transport (§4.3, D20)


def test_unknown_path_is_404(client: httpx2.Client) -> None:
    for path in ("/", "/ota", "/ota/south", "/ota/south/download/", "/api/v1/x"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.content == b""
        assert response.headers["Content-Length"] == "0"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/ota/device/version", "GET, POST"),
        ("POST", "/ota/south/check", "GET"),
        ("HEAD", "/ota/south/check", "GET"),
        ("DELETE", "/ota/south/tasking", "GET"),
        ("POST", "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa", "GET"),
        ("HEAD", "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa", "GET"),
        ("GET", "/ota/south/device/download/ota_aaaaaaaaaaaaaaaaaaaa/progress", "POST"),
        ("GET", "/ota/south/report", "POST"),
        ("PATCH", "/ota/devInfo", "GET, POST"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: httpx2.Client, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow
    assert response.content == b""


def test_body_over_4096_bytes_is_413(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    big = b'{"f_version":"1.0.0","pad":"' + b"x" * 4100 + b'"}'
    response = client.post(
        "/ota/device/version",
        params={"dev_id": w.dev_id},
        headers={"Authorization": w.auth},
        content=big,
    )
    assert response.status_code == 413
    assert response.content == b""
    # Exactly 4096 is still fine: the envelope answers, here errno 2 (unknown padding only).
    exact = b'{"pad":"' + b"x" * (4096 - 10) + b'"}'
    assert len(exact) == 4096
    reply = call(
        client,
        "POST",
        "/ota/device/version",
        auth=w.auth,
        params={"dev_id": w.dev_id},
        content=exact,
    )
    assert reply["errno"] == 2


def test_chunked_body_over_4096_bytes_is_413(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b" " * 1000

    response = client.post(
        "/ota/device/version",
        params={"dev_id": w.dev_id},
        headers={"Authorization": w.auth},
        content=chunks(),
    )
    assert response.status_code == 413


def test_trailing_slash_and_host_are_tolerated(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    reply = call(
        client,
        "GET",
        "/ota/device/version/",
        auth=w.auth,
        params={"dev_id": w.dev_id},
    )
    assert reply == {"errno": 0, "error": "succ", "data": {}}
    response = client.get(
        "/ota/device/version",
        params={"dev_id": w.dev_id},
        headers={"Authorization": w.auth, "Host": "elsewhere.example"},
    )
    assert response.json()["errno"] == 0


# ---------------------------------------------------------------------------------------------
# P1-P3 on every JSON endpoint (§4.2)

JSON_CALLS = [
    ("POST", "/ota/device/version", {}, {"f_version": "1.0.0"}),
    ("GET", "/ota/device/version", {}, None),
    ("GET", "/ota/south/check", {"type": 1, "version": "1.0.0"}, None),
    ("GET", "/ota/south/tasking", {"type": 1}, None),
    ("GET", "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa/check", {}, None),
    ("POST", "/ota/south/device/download/ota_aaaaaaaaaaaaaaaaaaaa/progress", {}, {"step": 1}),
    ("POST", "/ota/south/report", {"token": "ota_aaaaaaaaaaaaaaaaaaaa"}, {"result": 101}),
]


@pytest.mark.parametrize(("method", "path", "params", "body"), JSON_CALLS)
def test_pre_checks_in_order(
    client: httpx2.Client,
    seeder: Seeder,
    method: str,
    path: str,
    params: dict[str, Any],
    body: Any,
) -> None:
    w = seeder.world()
    other = seeder.world()

    def errno(auth: str | None, dev_id: Any) -> int:
        query = dict(params)
        if dev_id is not None:
            query["dev_id"] = dev_id
        return errno_of(client, method, path, auth=auth, params=query, body=body)

    assert errno(None, w.dev_id) == 1  # P1: missing
    assert errno("", w.dev_id) == 1
    assert errno(w.auth + "x", w.dev_id) == 1  # P1: bad sign
    assert errno(None, None) == 1  # P1 before P2
    assert errno(w.auth, None) == 2  # P2: missing
    for bad in ("", "abc", "0", "-1", "1.5", "12345678901234567890", "9223372036854775808"):
        assert errno(w.auth, bad) == 2, bad
    assert errno(w.auth, 424242424242) == 1  # P3: unknown device
    assert errno(w.auth, other.dev_id) == 1  # P3: another product's device
    device_level = product_auth(w.pid, device_name=other.name)
    assert errno(device_level, w.dev_id) == 1  # P1: no device of that name in w's product


@pytest.mark.parametrize(("method", "path", "params", "body"), JSON_CALLS)
def test_unexpected_failure_is_errno_7(
    client: httpx2.Client,
    seeder: Seeder,
    api: DeviceApi,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    params: dict[str, Any],
    body: Any,
) -> None:
    w = seeder.world()
    for name in (
        "report_version",
        "query_version",
        "check_task",
        "tasking",
        "check_token",
        "report",
    ):
        break_db(monkeypatch, api, name)
    reply = call(
        client, method, path, auth=w.auth, params={"dev_id": w.dev_id, **params}, body=body
    )
    assert reply == {"errno": 7, "error": "internal error"}


def test_auth_failure_in_database_is_errno_7(
    client: httpx2.Client, seeder: Seeder, api: DeviceApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = seeder.world()
    break_db(monkeypatch, api, "authenticate")
    reply = call(client, "GET", "/ota/device/version", auth=w.auth, params={"dev_id": w.dev_id})
    assert reply["errno"] == 7


# ---------------------------------------------------------------------------------------------
# E1 / E2 (§6.1, §6.2, D16)


def test_e1_stores_versions_and_e2_reads_them(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    q = {"dev_id": w.dev_id}
    assert call(client, "GET", "/ota/device/version", auth=w.auth, params=q)["data"] == {}
    body = {"f_version": "1.0.0", "s_version": "2.0-b_1"}
    reply = call(client, "POST", "/ota/device/version", auth=w.auth, params=q, body=body)
    assert reply == {"errno": 0, "error": "succ"}  # no data (§6.1)
    assert call(client, "GET", "/ota/device/version", auth=w.auth, params=q)["data"] == body
    # Only the key sent changes.
    call(client, "POST", "/ota/device/version", auth=w.auth, params=q, body={"s_version": "3"})
    assert seeder.versions(w.dev_id) == ("1.0.0", "3")


def test_e2_lists_only_known_versions(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    q = {"dev_id": w.dev_id}
    call(client, "POST", "/ota/device/version", auth=w.auth, params=q, body={"s_version": "9"})
    reply = call(client, "GET", "/ota/device/version", auth=w.auth, params=q)
    assert reply == {"errno": 0, "error": "succ", "data": {"s_version": "9"}}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"null",
        b"[]",
        b'"1.0.0"',
        b"{}",
        b'{"other":"1.0.0"}',
        b'{"f_version":null}',
        b'{"f_version":1}',
        b'{"f_version":true}',
        b'{"f_version":""}',
        b'{"f_version":"1 0"}',
        b'{"f_version":"123456789012345678901"}',
        b'{"f_version":"1.0.0","s_version":null}',
        b'{"f_version":"1.0.0"',
        b"\xff\xfe",
        b"[" * 2000 + b"]" * 2000,  # deeper than the JSON parser recurses
    ],
)
def test_e1_bad_body_is_errno_2_and_stores_nothing(
    client: httpx2.Client, seeder: Seeder, content: bytes
) -> None:
    w = seeder.world()
    errno = errno_of(
        client,
        "POST",
        "/ota/device/version",
        auth=w.auth,
        params={"dev_id": w.dev_id},
        content=content,
    )
    assert errno == 2
    assert seeder.versions(w.dev_id) == (None, None)


def test_e1_target_version_completes_open_task_t6(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    body = {"f_version": "1.0.1", "s_version": "1.0.1"}
    assert (
        errno_of(
            client,
            "POST",
            "/ota/device/version",
            auth=w.auth,
            params={"dev_id": w.dev_id},
            body=body,
        )
        == 0
    )
    assert w.state() is S.SUCCEEDED


def test_e1_other_version_or_other_type_leaves_task(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()  # FOTA task to 1.0.1
    q = {"dev_id": w.dev_id}
    call(client, "POST", "/ota/device/version", auth=w.auth, params=q, body={"f_version": "1.0.2"})
    call(client, "POST", "/ota/device/version", auth=w.auth, params=q, body={"s_version": "1.0.1"})
    assert w.state() is S.TO_BE_UPGRADED


def test_e1_completes_a_paused_task(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    seeder.set_state(w.task_id, S.PAUSED, S.TO_BE_UPGRADED)
    call(
        client,
        "POST",
        "/ota/device/version",
        auth=w.auth,
        params={"dev_id": w.dev_id},
        body={"f_version": "1.0.1"},
    )
    assert w.state() is S.SUCCEEDED  # D16: a paused task included


def test_e1_does_not_touch_unstarted_or_expired_tasks(
    client: httpx2.Client, seeder: Seeder
) -> None:
    later = seeder.world(start_time=T0 + HOUR)
    gone = seeder.world(deadline=T0 - 1)
    for w in (later, gone):
        call(
            client,
            "POST",
            "/ota/device/version",
            auth=w.auth,
            params={"dev_id": w.dev_id},
            body={"f_version": "1.0.1"},
        )
    assert later.state() is S.TO_BE_UPGRADED
    assert gone.state() is S.FAILED  # the deadline (T5) came first


# ---------------------------------------------------------------------------------------------
# E3 (§6.3, D10, D11, D17)


def test_e3_answers_task_data_and_records_version(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    reply = check(client, w, version="0.9")
    assert reply["errno"] == 0
    data = reply["data"]
    assert list(data) == [
        "target",
        "token",
        "size",
        "md5",
        "signal",
        "power",
        "retry",
        "interval",
        "type",
    ]
    assert data["target"] == "1.0.1"
    assert data["size"] == len(FIRMWARE)
    assert data["md5"] == "000e87c6dfb9c77108f320f7c27a64ea"
    assert (data["signal"], data["power"], data["retry"], data["interval"]) == (10, 10, 3, 1)
    assert data["type"] == 1
    assert re.fullmatch(r"ota_[A-Za-z0-9]{20}", data["token"])  # D13
    assert seeder.versions(w.dev_id) == ("0.9", None)
    assert w.state() is S.TO_BE_UPGRADED  # a successful E3 changes no state


def test_e3_ip_port_only_with_cdn_true(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    assert check(client, w, cdn="true")["data"]["ipPort"] == "ota.example.net:80"
    assert check(client, w, cdn="TRUE")["data"]["ipPort"] == "ota.example.net:80"
    assert "ipPort" not in check(client, w, cdn="false")["data"]
    assert "ipPort" not in check(client, w)["data"]


def test_e3_replies_of_one_task_share_one_cached_body_each_with_its_own_token(
    client: httpx2.Client, seeder: Seeder, api: DeviceApi
) -> None:
    """A fleet polling one task: the encoded reply is cached once per task (and cdn), not once
    per device, and every device still gets its own token, never another device's."""
    pid = seeder.product("811311")
    dev_ids = [seeder.device(8_113_110 + i, pid, f"fleet{i}") for i in range(6)]
    _, dt_ids = seeder.task(seeder.package(pid, target="3.1.4"), dev_ids, pid=pid)
    auth = product_auth(pid)
    bodies = api.service.caches.task_bodies
    held, hits = len(bodies), bodies.hits
    for cdn in ("false", "true"):
        for dev_id, dt_id in zip(dev_ids, dt_ids, strict=True):
            query = {"dev_id": dev_id, "type": 1, "version": "1.0.0", "cdn": cdn}
            reply = call(client, "GET", "/ota/south/check", auth=auth, params=query)
            assert reply["errno"] == 0, reply
            assert reply["data"]["target"] == "3.1.4"
            assert [reply["data"]["token"]] == seeder.tokens(dt_id)  # its own, and only
            assert ("ipPort" in reply["data"]) is (cdn == "true")
    assert len(bodies) - held == 2  # one per cdn value, whatever the number of devices
    assert bodies.hits - hits == 2 * (len(dev_ids) - 1)


def test_e3_without_public_address_never_sends_ip_port(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    clock = FakeClock()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    w = Seeder(engine, blobs, clock).world()
    with running_api(engine, blobs, clock) as (_, srv), httpx2.Client(base_url=srv.url) as c:
        assert "ipPort" not in check(c, w, cdn="true")["data"]


def test_public_address_is_validated() -> None:
    with pytest.raises(ValueError, match="public_address"):
        DeviceApi(None, None, public_address="a" * 32)  # type: ignore[arg-type]


def test_e3_same_token_while_valid_fresh_after_expiry(
    client: httpx2.Client, seeder: Seeder
) -> None:
    w = seeder.world()
    first = token_of(client, w)
    seeder.clock.advance(TOKEN_LIFE - 1)
    assert token_of(client, w) == first
    seeder.clock.advance(1)  # valid while now < t + 48 h
    second = token_of(client, w)
    assert second != first
    assert seeder.tokens(w.task_id) == [first, second]  # all remembered
    assert w.state() is S.TO_BE_UPGRADED


@pytest.mark.parametrize(
    ("params", "errno"),
    [
        ({"type": None}, 2),
        ({"type": "3"}, 2),
        ({"type": "01"}, 2),
        ({"type": ""}, 2),
        ({"version": None}, 2),
        ({"version": ""}, 27),
        ({"version": "1.0.0 beta"}, 27),
        ({"version": "v" * 21}, 27),
        ({"version": "1.0.0", "cdn": "yes"}, 2),
        ({"type": "x", "version": "bad version"}, 2),  # type is checked before version
        ({"version": "bad version", "cdn": "x"}, 27),  # version before cdn
    ],
)
def test_e3_parameter_errors(
    client: httpx2.Client, seeder: Seeder, params: dict[str, Any], errno: int
) -> None:
    w = seeder.world()
    query = {"dev_id": w.dev_id, "type": "1", "version": "1.0.0", **params}
    query = {k: v for k, v in query.items() if v is not None}
    assert errno_of(client, "GET", "/ota/south/check", auth=w.auth, params=query) == errno
    assert seeder.versions(w.dev_id) == (None, None)  # nothing recorded before step 5
    assert w.state() is S.TO_BE_UPGRADED


def test_e3_no_task_is_11_and_still_records_version(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    assert check(client, w, version="7")["errno"] == 11
    assert seeder.versions(w.dev_id) == ("7", None)
    sota = seeder.world(module_type=2)
    assert check(client, sota, type=1)["errno"] == 11  # a task of the other type
    assert check(client, sota, type=2)["errno"] == 0


@pytest.mark.parametrize("state", [S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_e3_inactive_task_is_11(client: httpx2.Client, seeder: Seeder, state: TaskState) -> None:
    w = seeder.world()
    seeder.set_state(w.task_id, state, S.TO_BE_UPGRADED if state is S.PAUSED else None)
    assert check(client, w)["errno"] == 11
    assert w.state() is state


@pytest.mark.parametrize("state", [S.DOWNLOADING, S.UPGRADING])
def test_e3_running_task_is_offered(
    client: httpx2.Client, seeder: Seeder, state: TaskState
) -> None:
    w = seeder.world()
    seeder.set_state(w.task_id, state)
    assert check(client, w)["errno"] == 0
    assert w.state() is state


def test_e3_start_time_hides_the_task(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(start_time=T0 + 60)
    assert check(client, w)["errno"] == 11
    seeder.clock.advance(60)
    assert check(client, w)["errno"] == 0


def test_e3_deadline_fails_the_task(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(deadline=T0 + 60)
    assert check(client, w)["errno"] == 0
    seeder.clock.advance(60)
    assert check(client, w)["errno"] == 11
    assert w.state() is S.FAILED  # T5, applied lazily


@pytest.mark.parametrize(
    ("package", "params", "errno"),
    [
        ({"manuf": "001"}, {"manuf": "1"}, 8),  # exact strings: "001" != "1" (D11)
        ({"model": "00108"}, {"model": "00107"}, 8),
        ({"manuf": "001", "model": "00108"}, {"manuf": "001", "model": "00109"}, 8),
        ({"manuf": "001"}, {"manuf": "001"}, 0),
        ({"manuf": "001"}, {}, 0),  # not sent: not checked (the C SDK never sends it)
        ({}, {"manuf": "001", "model": "x"}, 0),  # not declared by the package
        ({"kind": 2, "from_version": "1.0.0"}, {"version": "0.9"}, 9),
        ({"kind": 2, "from_version": "1.0.0"}, {"version": "1.0.0"}, 0),
        ({"kind": 2, "from_version": "1.0.0", "manuf": "5"}, {"version": "0.9", "manuf": "6"}, 8),
    ],
)
def test_e3_preflight_checks(
    client: httpx2.Client,
    seeder: Seeder,
    package: dict[str, Any],
    params: dict[str, Any],
    errno: int,
) -> None:
    w = seeder.world(package_options=package)
    reply = check(client, w, **params)
    assert reply["errno"] == errno
    if errno:
        assert "data" not in reply
        assert w.state() is S.FAILED  # T7 / T8
        assert seeder.tokens(w.task_id) == []
        assert check(client, w, **params)["errno"] == 11
    else:
        assert reply["data"]["type"] == package.get("kind", 1)
        assert w.state() is S.TO_BE_UPGRADED
    assert seeder.versions(w.dev_id)[0] == params.get("version", "1.0.0")


def test_e3_preflight_only_while_to_be_upgraded(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(package_options={"kind": 2, "from_version": "1.0.0", "model": "m"})
    token_of(client, w)
    assert e5(client, w, token_of(client, w)) == 0  # downloading
    # D11: after flashing, the device reports the new version; no pre-flight failure.
    assert check(client, w, version="1.0.1", model="other")["errno"] == 0
    assert w.state() is S.DOWNLOADING


# ---------------------------------------------------------------------------------------------
# E4 (§6.4, D18)


def tasking(client: httpx2.Client, w: World, **params: Any) -> dict[str, Any]:
    query = {"dev_id": w.dev_id, "type": 1, **params}
    return call(client, "GET", "/ota/south/tasking", auth=w.auth, params=query)


def test_e4_returns_running_task_without_changes(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    assert tasking(client, w)["errno"] == 4  # to-be-upgraded counts as none
    token = token_of(client, w)
    assert tasking(client, w)["errno"] == 4
    assert e5(client, w, token) == 0
    reply = tasking(client, w, cdn="true")
    assert reply["errno"] == 0
    assert reply["data"]["token"] == token
    assert reply["data"]["ipPort"] == "ota.example.net:80"
    seeder.set_state(w.task_id, S.UPGRADING)
    assert tasking(client, w)["data"] == check(client, w)["data"] | {"token": token}
    assert w.state() is S.UPGRADING


@pytest.mark.parametrize(
    ("params", "errno"),
    [({"type": None}, 2), ({"type": "0"}, 2), ({"cdn": "1"}, 2)],
)
def test_e4_parameter_errors(
    client: httpx2.Client, seeder: Seeder, params: dict[str, Any], errno: int
) -> None:
    w = seeder.world()
    query = {k: v for k, v in ({"dev_id": w.dev_id, "type": 1} | params).items() if v is not None}
    assert errno_of(client, "GET", "/ota/south/tasking", auth=w.auth, params=query) == errno


@pytest.mark.parametrize("state", [S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_e4_inactive_task_is_4(client: httpx2.Client, seeder: Seeder, state: TaskState) -> None:
    w = seeder.world()
    token_of(client, w)
    seeder.set_state(w.task_id, state, S.DOWNLOADING if state is S.PAUSED else None)
    assert tasking(client, w)["errno"] == 4


def test_e4_expired_token_is_12_and_issues_none(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    token = token_of(client, w)
    assert e5(client, w, token) == 0
    seeder.clock.advance(TOKEN_LIFE)
    assert tasking(client, w)["errno"] == 12
    assert seeder.tokens(w.task_id) == [token]


# ---------------------------------------------------------------------------------------------
# E5 (§6.5, §5.4)


def test_e5_moves_to_downloading_t9_t10(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    token = token_of(client, w)
    assert e5(client, w, token) == 0
    assert w.state() is S.DOWNLOADING
    assert e5(client, w, token) == 0
    assert w.state() is S.DOWNLOADING


def test_e5_unknown_or_foreign_token_is_4(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    other = seeder.world()
    foreign = token_of(client, other)
    for token in ("ota_aaaaaaaaaaaaaaaaaaaa", foreign, "abc123", "x" * 300):
        assert e5(client, w, token) == 4
    assert other.state() is S.TO_BE_UPGRADED


@pytest.mark.parametrize(
    ("state", "expired", "errno"),
    [
        (S.CANCELLED, True, 22),
        (S.SUCCEEDED, True, 20),
        (S.FAILED, False, 20),
        (S.TO_BE_UPGRADED, True, 12),
        (S.DOWNLOADING, True, 12),
        (S.PAUSED, True, 12),
        (S.PAUSED, False, 17),
        (S.UPGRADING, False, 17),
    ],
)
def test_e5_state_table(
    client: httpx2.Client, seeder: Seeder, state: TaskState, expired: bool, errno: int
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    seeder.set_state(w.task_id, state, S.TO_BE_UPGRADED if state is S.PAUSED else None)
    if expired:
        seeder.clock.advance(TOKEN_LIFE)
    assert e5(client, w, token) == errno
    assert w.state() is state


def test_e5_old_token_is_12_after_reissue(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    old = token_of(client, w)
    seeder.clock.advance(TOKEN_LIFE)
    new = token_of(client, w)
    assert e5(client, w, old) == 12
    assert e5(client, w, new) == 0


# ---------------------------------------------------------------------------------------------
# E6 (§6.6, D5-D8)


def test_e6_serves_without_authorization_and_changes_nothing(
    client: httpx2.Client, seeder: Seeder
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    whole = download(client, token)
    assert whole.status_code == 200
    assert whole.content == FIRMWARE
    assert list(whole.headers.keys()) == [
        "content-type",
        "content-length",
        "content-disposition",
    ]
    assert whole.headers["Content-Disposition"] == 'attachment; filename="firmware.bin"'
    part = download(client, token, Range="bytes=10-19", Authorization="ignored")
    assert part.status_code == 206
    assert part.content == FIRMWARE[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(FIRMWARE)}"
    assert w.state() is S.TO_BE_UPGRADED  # no E5 needed, no state change (D6)


@pytest.mark.parametrize("state", [S.TO_BE_UPGRADED, S.DOWNLOADING, S.UPGRADING])
def test_e6_serves_active_tasks(client: httpx2.Client, seeder: Seeder, state: TaskState) -> None:
    w = seeder.world()
    token = token_of(client, w)
    seeder.set_state(w.task_id, state)
    assert error_byte(download(client, token)) is None


@pytest.mark.parametrize("state", [S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_e6_inactive_task_is_byte_3(
    client: httpx2.Client, seeder: Seeder, state: TaskState
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    seeder.set_state(w.task_id, state, S.DOWNLOADING if state is S.PAUSED else None)
    assert error_byte(download(client, token)) == 3


def test_e6_token_errors_are_byte_3(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(deadline=T0 + TOKEN_LIFE + 10)
    assert error_byte(download(client, "ota_aaaaaaaaaaaaaaaaaaaa")) == 3
    assert error_byte(download(client, "abc123")) == 3
    old = token_of(client, w)
    seeder.clock.advance(TOKEN_LIFE)
    assert error_byte(download(client, old)) == 3  # expired
    new = token_of(client, w)
    assert error_byte(download(client, new)) is None
    assert error_byte(download(client, old)) == 3  # superseded
    seeder.clock.advance(10)
    assert error_byte(download(client, new)) == 3  # deadline passed
    assert w.state() is S.TO_BE_UPGRADED  # E6 writes nothing, not even T5


def test_e6_missing_file_is_byte_1(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(package_options={"data": b"never stored", "store": False})
    assert error_byte(download(client, token_of(client, w))) == 1


def test_e6_size_mismatch_is_byte_2(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(package_options={"data": b"twelve bytes", "size": 13})
    assert error_byte(download(client, token_of(client, w))) == 2


def test_e6_read_failure_is_byte_4(client: httpx2.Client, seeder: Seeder) -> None:
    # A directory where the file should be: stat works (its size is made to match), the read
    # fails with EISDIR in the HTTP layer, before any header was written.
    data = b"directory stands in for this"
    w = seeder.world(package_options={"data": data, "store": False})
    path = seeder.blobs.path(hashlib.sha256(data).hexdigest())
    path.mkdir(parents=True)
    with seeder.engine.begin() as conn:
        conn.execute(
            update(packages).where(packages.c.id == w.package_id).values(size=os.stat(path).st_size)
        )
    assert error_byte(download(client, token_of(client, w))) == 4


def test_e6_unexpected_failure_is_byte_4(
    client: httpx2.Client, seeder: Seeder, api: DeviceApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    break_db(monkeypatch, api, "download_grant")
    assert error_byte(download(client, token)) == 4


@pytest.mark.parametrize(("s_id", "byte"), [("", 5), ("12a", 5), ("1" * 20, 5), ("460001", None)])
def test_e6_s_id_is_validated_first(
    client: httpx2.Client, seeder: Seeder, s_id: str, byte: int | None
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    response = client.get(f"/ota/south/download/{token}", params={"s_id": s_id})
    assert error_byte(response) == byte
    bad_token = client.get("/ota/south/download/nope", params={"s_id": s_id})
    assert error_byte(bad_token) == (byte or 3)


def test_e6_hostile_file_name_cannot_inject_headers(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(package_options={"file_name": 'a"b\\c\r\nX-Evil: 1'})
    response = download(client, token_of(client, w))
    assert response.status_code == 200
    assert "X-Evil" not in response.headers
    assert response.headers["Content-Disposition"] == 'attachment; filename="abcX-Evil: 1"'


# ---------------------------------------------------------------------------------------------
# E7 / E8 (§6.7, §6.8, §5.5)


def started(client: httpx2.Client, seeder: Seeder, **options: Any) -> tuple[World, str]:
    """A world whose task is downloading, and its token."""
    w = seeder.world(**options)
    token = token_of(client, w)
    assert e5(client, w, token) == 0
    return w, token


def test_e7_progress_then_complete(client: httpx2.Client, seeder: Seeder) -> None:
    w, token = started(client, seeder)
    assert e7(client, w, token, {"step": 42}) == 0
    row = seeder.device_task(w.task_id)
    assert (row.state, row.progress) == (S.DOWNLOADING, 42)
    assert e7(client, w, token, {"step": 100}) == 0  # T12
    row = seeder.device_task(w.task_id)
    assert (row.state, row.progress) == (S.UPGRADING, 100)
    assert e7(client, w, token, {"step": 101}) == 21  # 100 and 101 mean the same
    assert e7(client, w, token, {"step": 201}) == 0  # T15
    row = seeder.device_task(w.task_id)
    assert (row.state, row.result_code) == (S.SUCCEEDED, 201)
    assert seeder.versions(w.dev_id) == ("1.0.1", None)  # the device's version := target
    assert e7(client, w, token, {"step": 201}) == 20


def test_e7_failure_codes(client: httpx2.Client, seeder: Seeder) -> None:
    w, token = started(client, seeder)
    assert e7(client, w, token, {"step": 104}) == 0  # T14
    row = seeder.device_task(w.task_id)
    assert (row.state, row.result_code) == (S.FAILED, 104)
    w, token = started(client, seeder)
    assert e7(client, w, token, {"step": 101}) == 0
    assert e7(client, w, token, {"step": 205}) == 0  # T16
    row = seeder.device_task(w.task_id)
    assert (row.state, row.result_code) == (S.FAILED, 205)
    assert seeder.versions(w.dev_id) == ("1.0.0", None)


@pytest.mark.parametrize(
    "body",
    [None, [], {"step": None}, {"step": "101"}, {"step": 101.0}, {"step": True}, {"steps": 1}],
)
def test_e7_bad_body_is_errno_2(client: httpx2.Client, seeder: Seeder, body: Any) -> None:
    w, token = started(client, seeder)
    assert e7(client, w, token, body) == 2
    assert w.state() is S.DOWNLOADING


@pytest.mark.parametrize("step", [-1, 108, 150, 200, 209, 2**40])
def test_e7_invalid_step_is_errno_2_in_every_state(
    client: httpx2.Client, seeder: Seeder, step: int
) -> None:
    w, token = started(client, seeder)
    assert e7(client, w, token, {"step": step}) == 2
    seeder.set_state(w.task_id, S.CANCELLED)
    assert e7(client, w, token, {"step": step}) == 2  # validity before state (§5.5)


def test_e7_token_errors_are_errno_1(client: httpx2.Client, seeder: Seeder) -> None:
    w, _ = started(client, seeder)
    _, foreign = started(client, seeder)
    for token in ("ota_aaaaaaaaaaaaaaaaaaaa", foreign, "abc123"):
        assert e7(client, w, token, {"step": 101}) == 1
        assert e7(client, w, token, None) == 1  # the token is resolved before the body


def test_e7_e8_accept_old_and_expired_tokens(client: httpx2.Client, seeder: Seeder) -> None:
    w, old = started(client, seeder)
    seeder.clock.advance(TOKEN_LIFE)
    token_of(client, w)  # a fresh token; the old one is expired and superseded
    assert e7(client, w, old, {"step": 50}) == 0
    assert e8(client, w, old, {"result": 101}) == 0
    assert e7(client, w, old, {"step": 201}) == 0
    assert w.state() is S.SUCCEEDED


@pytest.mark.parametrize(
    ("state", "step", "errno"),
    [
        (S.TO_BE_UPGRADED, 50, 17),
        (S.TO_BE_UPGRADED, 201, 21),
        (S.UPGRADING, 100, 17),
        (S.UPGRADING, 107, 21),
        (S.PAUSED, 10, 17),
        (S.PAUSED, 101, 21),
        (S.PAUSED, 201, 21),
        (S.SUCCEEDED, 50, 20),
        (S.FAILED, 201, 20),
        (S.CANCELLED, 101, 22),
    ],
)
def test_e7_refusals_change_nothing(
    client: httpx2.Client, seeder: Seeder, state: TaskState, step: int, errno: int
) -> None:
    w, token = started(client, seeder)
    seeder.set_state(w.task_id, state, S.DOWNLOADING if state is S.PAUSED else None)
    before = seeder.device_task(w.task_id)
    assert e7(client, w, token, {"step": step}) == errno
    assert seeder.device_task(w.task_id) == before


def test_e8_reports_status(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    token = token_of(client, w)
    assert e8(client, w, token, {"result": 101}) == 0  # T13 from to-be-upgraded
    assert w.state() is S.UPGRADING
    assert e8(client, w, token, {"result": 101}) == 21
    assert e8(client, w, token, {"result": 201}) == 0
    assert w.state() is S.SUCCEEDED
    assert e8(client, w, token, {"result": 202}) == 20
    w = seeder.world()
    token = token_of(client, w)
    assert e8(client, w, token, {"result": 106}) == 0  # T14
    assert w.state() is S.FAILED


@pytest.mark.parametrize(
    ("body", "errno"),
    [
        (None, 24),
        ([], 24),
        ({}, 24),
        ({"result": "101"}, 24),
        ({"result": None}, 24),
        ({"result": False}, 24),
        ({"result": 101.5}, 24),
        ({"result": 50}, 2),  # progress values are not accepted by E8 (D15)
        ({"result": 100}, 2),
        ({"result": 209}, 2),
    ],
)
def test_e8_body_errors(client: httpx2.Client, seeder: Seeder, body: Any, errno: int) -> None:
    w = seeder.world()
    token = token_of(client, w)
    assert e8(client, w, token, body) == errno
    assert w.state() is S.TO_BE_UPGRADED


def test_e8_token_errors_are_errno_1(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    other = seeder.world()
    foreign = token_of(client, other)
    for token in (None, "", "ota_aaaaaaaaaaaaaaaaaaaa", foreign):
        assert e8(client, w, token, {"result": 101}) == 1
        assert e8(client, w, token, None) == 1  # token before body


@pytest.mark.parametrize(
    ("state", "result", "errno"),
    [
        (S.CANCELLED, 101, 22),
        (S.FAILED, 101, 20),
        (S.PAUSED, 201, 21),
        (S.TO_BE_UPGRADED, 201, 21),
    ],
)
def test_e8_refusals(
    client: httpx2.Client, seeder: Seeder, state: TaskState, result: int, errno: int
) -> None:
    w = seeder.world()
    token = token_of(client, w)
    seeder.set_state(w.task_id, state, S.TO_BE_UPGRADED if state is S.PAUSED else None)
    assert e8(client, w, token, {"result": result}) == errno
    assert w.state() is state


def test_deadline_refuses_reports_with_errno_20(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(deadline=T0 + 100)
    token = token_of(client, w)
    assert e5(client, w, token) == 0
    seeder.clock.advance(100)
    assert e7(client, w, token, {"step": 101}) == 20
    assert e5(client, w, token) == 20
    assert w.state() is S.FAILED


# ---------------------------------------------------------------------------------------------
# E9 (§6.9, D18)


def dev_info(
    client: httpx2.Client, w: World, body: Any, *, method: str = "POST", auth: str | None = None
) -> dict[str, Any]:
    return call(client, method, "/ota/devInfo", auth=auth or w.auth, body=body)


def test_e9_finds_dev_id_by_auth_info(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    reply = dev_info(client, w, {"pid": int(w.pid), "authInfo": w.name})
    assert reply == {"errno": 0, "error": "succ", "data": {"dev_id": str(w.dev_id)}}
    assert dev_info(client, w, {"pid": w.pid, "authInfo": w.name}, method="GET") == reply
    device_level = product_auth(w.pid, device_name=w.name)
    assert dev_info(client, w, {"pid": w.pid, "authInfo": w.name}, auth=device_level) == reply


def test_e9_matches_auth_info_exactly(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    seeder.device(7_000_001, w.pid, "imei-device", auth_info="861234567890123")
    reply = dev_info(client, w, {"pid": w.pid, "authInfo": "861234567890123"})
    assert reply["data"] == {"dev_id": "7000001"}
    assert dev_info(client, w, {"pid": w.pid, "authInfo": "imei-device"})["errno"] == 1


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"authInfo": "x"},
        {"pid": None, "authInfo": "x"},
        {"pid": 1.5, "authInfo": "x"},
        {"pid": True, "authInfo": "x"},
        {"pid": "12-a", "authInfo": "x"},  # §1: a pid is [A-Za-z0-9]
        {"pid": "", "authInfo": "x"},
        {"pid": "1" * 33, "authInfo": "x"},
        {"pid": 10**32, "authInfo": "x"},  # 33 digits
        {"pid": -1, "authInfo": "x"},
        {"pid": 1},
        {"pid": 1, "authInfo": 5},
    ],
)
def test_e9_bad_body_is_errno_2(client: httpx2.Client, seeder: Seeder, body: Any) -> None:
    w = seeder.world(task=False)
    assert dev_info(client, w, body)["errno"] == 2


def test_e9_auth_errors(
    client: httpx2.Client, seeder: Seeder, api: DeviceApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = seeder.world(task=False)
    other = seeder.world(task=False)
    body = {"pid": w.pid, "authInfo": w.name}
    assert call(client, "POST", "/ota/devInfo", auth=None, body=body)["errno"] == 1
    assert dev_info(client, w, body, auth=other.auth)["errno"] == 1  # pid differs from res
    assert dev_info(client, w, {"pid": w.pid, "authInfo": other.name})["errno"] == 1
    assert dev_info(client, w, {"pid": w.pid, "authInfo": "nobody"})["errno"] == 1
    seeder.device(7_000_002, w.pid, "second")
    second_level = product_auth(w.pid, device_name="second")
    assert dev_info(client, w, body, auth=second_level)["errno"] == 1  # found another device
    break_db(monkeypatch, api, "dev_info")
    assert dev_info(client, w, body)["errno"] == 7


def test_e9_accepts_an_alphanumeric_pid(client: httpx2.Client, seeder: Seeder) -> None:
    # §1: a pid is 1-32 characters [A-Za-z0-9]; only classic OneNET's happen to be decimal.
    pid = "Ab3xYz9"
    seeder.product(pid)
    seeder.device(7_000_010, pid, "alnum-dev")
    body = {"pid": pid, "authInfo": "alnum-dev"}
    reply = call(client, "POST", "/ota/devInfo", auth=product_auth(pid), body=body)
    assert reply == {"errno": 0, "error": "succ", "data": {"dev_id": "7000010"}}
    w = seeder.world(task=False)
    assert dev_info(client, w, {"pid": "Ab3xYz8", "authInfo": w.name})["errno"] == 1  # step 3


@pytest.mark.parametrize(
    ("auth_info", "errno"),
    [
        # Not a string of characters: it cannot be UTF-8 (§2.4), so step 2's errno 2.
        ("\\ud800", 2),
        ("a\\udfffb", 2),
        # A string, but no device has it (PostgreSQL cannot even store it): step 4's errno 1.
        ("\\u0000", 1),
        ("dev\\u0000", 1),
    ],
)
def test_e9_unstorable_auth_info_gets_its_errno_without_a_traceback(
    client: httpx2.Client,
    seeder: Seeder,
    caplog: pytest.LogCaptureFixture,
    auth_info: str,
    errno: int,
) -> None:
    w = seeder.world(task=False)
    content = b'{"pid": "%s", "authInfo": "%s"}' % (w.pid.encode(), auth_info.encode())
    caplog.set_level(logging.DEBUG)
    assert call(client, "POST", "/ota/devInfo", auth=w.auth, content=content)["errno"] == errno
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert dev_info(client, w, {"pid": w.pid, "authInfo": w.name})["errno"] == 0


def test_e9_ambiguous_auth_info_finds_nothing(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(task=False)
    seeder.device(7_000_003, w.pid, "twin-a", auth_info="shared")
    seeder.device(7_000_004, w.pid, "twin-b", auth_info="shared")
    assert dev_info(client, w, {"pid": w.pid, "authInfo": "shared"})["errno"] == 1


# ---------------------------------------------------------------------------------------------
# Keys (§3.4, D4)


def test_device_key_verifies_device_level_tokens(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world(device_key=K2)
    q = {"dev_id": w.dev_id}
    with_device_key = product_auth(w.pid, K2, device_name=w.name)
    assert errno_of(client, "GET", "/ota/device/version", auth=with_device_key, params=q) == 0
    with_product_key = product_auth(w.pid, device_name=w.name)
    assert errno_of(client, "GET", "/ota/device/version", auth=with_product_key, params=q) == 1
    product_level_k2 = product_auth(w.pid, K2)
    assert errno_of(client, "GET", "/ota/device/version", auth=product_level_k2, params=q) == 1


def test_task_start_time_update_is_seen(client: httpx2.Client, seeder: Seeder) -> None:
    w = seeder.world()
    with seeder.engine.begin() as conn:
        conn.execute(update(tasks).values(start_time=T0 + 10).where(tasks.c.pid == w.pid))
    assert check(client, w)["errno"] == 11


# ---------------------------------------------------------------------------------------------
# Caches (see device_service: how stale answers may be towards other processes)


def test_cached_answers_until_invalidated(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    clock = FakeClock()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    seeder = Seeder(engine, blobs, clock)
    w = seeder.world()
    with (
        running_api(engine, blobs, clock, cache_ttl=60) as (api, srv),
        httpx2.Client(base_url=srv.url) as c,
    ):
        token = token_of(c, w)
        assert e5(c, w, token) == 0
        assert e5(c, w, token) == 0  # T10: now cached
        assert check(c, w)["errno"] == 0
        assert error_byte(download(c, token)) is None
        # Another process pauses the task: this one keeps its answers for up to cache_ttl ...
        seeder.set_state(w.task_id, S.PAUSED, S.DOWNLOADING)
        assert check(c, w)["errno"] == 0
        assert e5(c, w, token) == 0
        assert error_byte(download(c, token)) is None
        # ... unless told (the management API in the same process calls invalidate()).
        api.service.invalidate()
        assert check(c, w)["errno"] == 11
        assert e5(c, w, token) == 17
        assert error_byte(download(c, token)) == 3
        # This process's own transitions are seen at once.
        seeder.set_state(w.task_id, S.DOWNLOADING)
        api.service.invalidate()
        assert e5(c, w, token) == 0
        assert e5(c, w, token) == 0
        assert error_byte(download(c, token)) is None
        assert e7(c, w, token, {"step": 107}) == 0
        assert e5(c, w, token) == 20
        assert error_byte(download(c, token)) == 3
        assert check(c, w)["errno"] == 11


def test_a_new_range_of_a_cached_grant_is_read_while_the_file_is_the_grants(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """E6 with the caches on, one device's own download (every range new): a range not cached
    yet is read from the open package file only while its path still names it with the
    grant's size (D6 steps 3-4) and the token is usable (step 2)."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    seeder = Seeder(engine, blobs, clock)
    w = seeder.world()
    path = blobs.path(hashlib.sha256(FIRMWARE).hexdigest())
    with (
        running_api(engine, blobs, clock, cache_ttl=3600) as (_, srv),
        httpx2.Client(base_url=srv.url) as c,
    ):
        token = token_of(c, w)
        assert download(c, token, Range="0-9").content == FIRMWARE[:10]  # grant cached, opened
        for start in (10, 20):
            part = download(c, token, Range=f"{start}-{start + 9}")
            assert part.content == FIRMWARE[start : start + 10]
        path.unlink()  # the package file is gone (deleted, or replaced by another inode)
        assert error_byte(download(c, token, Range="30-39")) == 1
        assert error_byte(download(c, token, Range="10-19")) == 1
        path.write_bytes(FIRMWARE[:-1])  # a file of another size at its path
        assert error_byte(download(c, token, Range="40-49")) == 2
        path.write_bytes(FIRMWARE)
        assert download(c, token, Range="50-59").content == FIRMWARE[50:60]
        clock.advance(TOKEN_LIFE)  # the token expires: no byte of a range cached or not
        assert error_byte(download(c, token, Range="60-69")) == 3
        assert error_byte(download(c, token, Range="50-59")) == 3


def test_memoised_replies_end_with_what_they_rest_on(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A repeated E3/E5 is answered from a memo only while the answer, the device row and the
    verified Authorization value behind it are all still what the service would use."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    seeder = Seeder(engine, blobs, clock)
    w = seeder.world()
    short_auth = product_auth(w.pid, et=T0 + 30)  # expires long before the token
    with (
        running_api(engine, blobs, clock, cache_ttl=3600) as (api, srv),
        httpx2.Client(base_url=srv.url) as c,
    ):
        token = token_of(c, w)
        assert token_of(c, w) == token  # cached, and now memoised
        assert token_of(c, w) == token
        assert e5(c, w, token) == 0  # T9: a write, not memoised
        assert e5(c, w, token) == 0  # T10: cached and memoised
        assert e5(c, w, token) == 0
        # The same question with another Authorization value is another memo.
        query = {"dev_id": w.dev_id, "type": 1, "version": "1.0.0"}
        call_short = {"auth": short_auth, "params": query}
        assert errno_of(c, "GET", "/ota/south/check", **call_short) == 0
        assert errno_of(c, "GET", "/ota/south/check", **call_short) == 0
        # That Authorization value expires: its memo ends with it (P1), the other one holds.
        clock.advance(31)
        assert errno_of(c, "GET", "/ota/south/check", **call_short) == 1
        assert token_of(c, w) == token
        # The token expires: the memo ends and E3 issues a fresh one (D13).
        clock.advance(TOKEN_LIFE)
        fresh = token_of(c, w)
        assert fresh != token
        assert e5(c, w, token) == 12
        # This process's own transition is seen at once, memo or not.
        assert e5(c, w, fresh) == 0
        assert e5(c, w, fresh) == 0
        assert e7(c, w, fresh, {"step": 107}) == 0
        assert e5(c, w, fresh) == 20
        assert check(c, w)["errno"] == 11
        # An invalidation (the management API in this process) ends every memo.
        seeder.set_state(w.task_id, S.DOWNLOADING)
        assert check(c, w)["errno"] == 11  # still the cached answer: nobody said otherwise
        api.service.invalidate()
        assert token_of(c, w) == fresh


def test_cached_chunks_still_check_the_file(client: httpx2.Client, seeder: Seeder) -> None:
    """E6 replies are reused per (file, range), but steps 3 and 4 are checked on every use."""
    data = bytes(range(256)) * 40  # 10240 bytes: three 4 KiB chunks
    w = seeder.world(package_options={"data": data, "file_name": "chunks.bin"})
    other = seeder.world(package_options={"data": data, "file_name": "chunks.bin"})
    token, other_token = token_of(client, w), token_of(client, other)
    first = download(client, token, Range="4096-8191")
    assert first.status_code == 206
    assert first.content == data[4096:8192]
    again = download(client, other_token, Range="4096-8191")  # another device, the same chunk
    assert again.content == first.content
    assert again.headers["Content-Range"] == "bytes 4096-8191/10240"
    whole = download(client, token)  # no Range: the whole file, 200
    assert whole.status_code == 200
    assert whole.content == data
    # The file is replaced by one of another size, then removed: byte 2, then byte 1, at once.
    path = seeder.blobs.path(hashlib.sha256(data).hexdigest())
    path.write_bytes(data + b"!")
    assert error_byte(download(client, token, Range="4096-8191")) == 2
    path.unlink()
    assert error_byte(download(client, token, Range="4096-8191")) == 1
    assert error_byte(download(client, token)) == 1
    path.write_bytes(data)
    assert download(client, token, Range="4096-8191").content == data[4096:8192]
    # A token that stops being usable gets byte 3 even though its chunk is cached.
    seeder.set_state(w.task_id, S.PAUSED, S.DOWNLOADING)
    assert error_byte(download(client, token, Range="4096-8191")) == 3
    assert download(client, other_token, Range="4096-8191").content == data[4096:8192]


def test_a_chunk_is_kept_from_its_second_read(
    client: httpx2.Client, seeder: Seeder, api: DeviceApi
) -> None:
    """One device's own download reads every chunk once: none of them is kept (weighing and
    storing them would cost every chunk, and push out the chunks a fleet shares). A chunk read
    again, by another device, is kept, and its next readers get the same bytes."""
    data = bytes(range(256)) * 48  # 12288 bytes: three 4 KiB chunks
    w = seeder.world(package_options={"data": data, "file_name": "kept.bin"})
    other = seeder.world(package_options={"data": data, "file_name": "kept.bin"})
    token, other_token = token_of(client, w), token_of(client, other)
    sha256 = hashlib.sha256(data).hexdigest()
    chunks = api.service.caches.chunks
    ranges = [f"{start}-{start + 4095}" for start in range(0, len(data), 4096)]
    for value in ranges:  # the first device, chunk after chunk, as the C SDK's loop
        reply = download(client, token, Range=value)
        assert reply.status_code == 206
        start = int(value.split("-")[0])
        assert reply.content == data[start : start + 4096]
    assert not any((sha256, len(data), "kept.bin", v, "classic") in chunks for v in ranges)
    again = download(client, other_token, Range=ranges[1])  # the same chunk, read again
    assert again.content == data[4096:8192]
    assert again.headers["Content-Range"] == "bytes 4096-8191/12288"
    assert (sha256, len(data), "kept.bin", ranges[1], "classic") in chunks
    third = download(client, token, Range=ranges[1])
    assert (third.status_code, third.headers, third.content) == (
        again.status_code,
        again.headers,
        again.content,
    )
    assert (sha256, len(data), "kept.bin", ranges[0], "classic") not in chunks


# ---------------------------------------------------------------------------------------------
# Hostile input: whatever arrives, an errno reply or a 4xx, never a 5xx

_PATHS = st.sampled_from(
    [
        "/ota/device/version",
        "/ota/south/check",
        "/ota/south/tasking",
        "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa",
        "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa/check",
        "/ota/south/device/download/x/progress",
        "/ota/south/report",
        "/ota/devInfo",
        "/ota/south/download/%00%ff/check",
        "/ota/south/download/../../etc/passwd",
        "/ota//device/version",
    ]
)
_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30
)  # printable, no spaces: the request line stays parseable
_QUERY = st.lists(
    st.tuples(
        st.sampled_from(["dev_id", "type", "version", "cdn", "token", "s_id", "manuf", "x"]),
        st.one_of(_TEXT, st.sampled_from(["1", "2", "987654321", "%ff%fe", "+", "true"])),
    ),
    max_size=5,
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [b'{"step":101}', b'{"result":201}', b'{"f_version":"1"}', b'{"pid":1,"authInfo":"a"}']
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]),
    path=_PATHS,
    query=_QUERY,
    authorization=st.one_of(st.none(), _TEXT, st.just(SDK_AUTH)),
    range_value=st.one_of(st.none(), _TEXT),
    body=_BODIES,
)
def test_hostile_requests_never_get_a_5xx(
    env: tuple[Seeder, DeviceApi, ServerThread],
    method: str,
    path: str,
    query: list[tuple[str, str]],
    authorization: str | None,
    range_value: str | None,
    body: bytes,
) -> None:
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    lines = [f"{method} {target} HTTP/1.1", "Host:x"]
    if authorization is not None:
        lines.append(f"Authorization:{authorization}")
    if range_value is not None:
        lines.append(f"Range:{range_value}")
    lines.append(f"Content-Length:{len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    reply = raw_exchange(env[2].port, request)
    assert reply.status in (200, 206, 400, 404, 405, 413), reply.raw[:200]
    if reply.header("Content-Type") == "application/json":
        assert len(reply.raw) <= 512
        assert isinstance(json.loads(reply.body)["errno"], int)
    assert b"Traceback" not in reply.raw

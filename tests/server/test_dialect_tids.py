"""S11: a ``tid`` keeps the classic value limits (§4.5, §12.2: decimal, 1 <= tid <= 2^31-1) on
every Studio and fuse endpoint that takes one (S-T, S-D, S-R, F-T, F-D, F-R), whatever method
and Authorization come with it. A tid outside the grammar names no endpoint: 404 (§4.3,
docs/dialects.md decision 7), never a 5xx and never another device's task; a well-formed tid that
is not this device's task gets its dialect's "unknown task" answer (S6-S8, F7-F9). And a task
the server cannot name within the limit is never offered with its out-of-range tid. Real HTTP on
loopback, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import DBAPIError

from onenet_ota import auth
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import device_tasks
from tests.server.seed import (
    DB_PARAMS,
    DEV_ID,
    K1,
    PID,
    FakeClock,
    RawReply,
    Seeder,
    module_database,
    raw_exchange,
    running_api,
)
from tests.serverthread import ServerThread

TID = 4242
STUDIO_AUTH = auth.build_token(PID, K1, device_name="dev01")
FUSE_AUTH = auth.build_token(PID, K1, device_name="dev01", version=auth.VERSION_2022)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
# Each tid endpoint's path prefix, its Authorization, and its suffix.
ENDPOINTS = {
    "S-T": ("/ota/123123/dev01/", STUDIO_AUTH, "/check"),
    "S-D": ("/ota/123123/dev01/", STUDIO_AUTH, "/download"),
    "S-R": ("/ota/123123/dev01/", STUDIO_AUTH, "/status"),
    "F-T": ("/fuse-ota/123123/dev01/", FUSE_AUTH, "/check"),
    "F-D": ("/fuse-ota/123123/dev01/", FUSE_AUTH, "/download"),
    "F-R": ("/fuse-ota/123123/dev01/", FUSE_AUTH, "/status"),
}
BAD_TIDS = [
    "2147483648",  # 2^31: one past the limit
    "4294971538",  # 2^32 + 4242: wraps to this device's task in 32 bits
    "4294971539",  # 2^32 + 4243: wraps to the other device's task in 32 bits
    "9223372036854775807",  # 2^63 - 1: a database integer, not a tid
    "99999999999999999999",
    "0",
    "-1",
    "-4242",
    "+4242",
    "04242",
    "4242.0",
    "4e3",
    "0x1092",
    "4242abc",
    "abc",
    "%34242",  # an escaped digit: paths are matched as sent
    "%EF%BC%94%EF%BC%92%EF%BC%94%EF%BC%92",  # fullwidth digits, escaped
    "",
]
# Digits int() would read as 4242, sent as raw UTF-8: no valid request target (RFC 9112 allows
# only ASCII there), so the HTTP layer refuses them (400) before any route is looked up.
RAW_NON_ASCII_TIDS = ["\uff14\uff12\uff14\uff12", "\u0664\u0662\u0664\u0662"]


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


World = tuple[Seeder, ServerThread]


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> Iterator[World]:
    """Product 123123 (K1): device dev01 with firmware.bin to 1.0.1 as device task 4242, and
    device dev02 with task 4243."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    seeder = Seeder(engine, blobs, clock)
    with engine.begin() as conn:
        for table in ("tokens", "device_tasks", "tasks", "packages", "devices", "products"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        conn.exec_driver_sql("DELETE FROM accounts")
    dt_id = seeder.capture_world()
    seeder.device(DEV_ID + 1, PID, "dev02")
    other = seeder.task(seeder.package(), (DEV_ID + 1,))[1][0]
    with engine.begin() as conn:
        conn.execute(update(device_tasks).where(device_tasks.c.id == dt_id).values(id=TID))
        conn.execute(update(device_tasks).where(device_tasks.c.id == other).values(id=TID + 1))
    with running_api(engine, blobs, clock, cache_ttl=30) as (_, srv):
        yield seeder, srv


def request(method: str, target: str, authorization: str | None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: iot-api.heclouds.com"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    if method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def send(srv: ServerThread, raw: bytes) -> RawReply:
    reply = raw_exchange(srv.port, raw)
    assert reply.status < 500, reply.raw
    return reply


@pytest.mark.parametrize("label", sorted(ENDPOINTS))
def test_s11_a_tid_outside_its_grammar_is_404_on_every_endpoint(world: World, label: str) -> None:
    """S11: every malformed tid, with every method, with and without Authorization and with a
    trailing slash, is a 404; nothing reaches a task (the tasks' states are unchanged)."""
    seeder, srv = world
    prefix, authorization, suffix = ENDPOINTS[label]
    for tid in BAD_TIDS:
        for method in ("GET", "POST", "HEAD", "PUT"):
            for sent_auth in (authorization, None):
                for path in (prefix + tid + suffix, prefix + tid + suffix + "/"):
                    raw = request(method, path, sent_auth, b'{"step":201}')
                    assert send(srv, raw).raw == NOT_FOUND, (method, path)
    for tid in RAW_NON_ASCII_TIDS:
        raw = request("GET", prefix + tid + suffix, authorization)
        assert send(srv, raw).status in (400, 404)
    assert seeder.state(TID).value == 1
    assert seeder.state(TID + 1).value == 1


def errno_is(expected: int) -> Callable[[RawReply], bool]:
    return lambda reply: bool(json.loads(reply.body)["errno"] == expected)


def code_is(expected: int) -> Callable[[RawReply], bool]:
    return lambda reply: bool(json.loads(reply.body)["code"] == expected)


def ota_errno_is(expected: int) -> Callable[[RawReply], bool]:
    return lambda reply: reply.header("Ota-Errno") == str(expected)


# The answer to a well-formed tid that is not this device's task (S6, S7, S8, F7, F8, F9).
UNKNOWN_TASK: dict[str, tuple[str, Callable[[RawReply], bool]]] = {
    "S-T": ("GET", errno_is(4)),
    "S-R": ("POST", errno_is(4)),
    "S-D": ("GET", ota_errno_is(5)),
    "F-T": ("GET", code_is(12012)),
    "F-R": ("POST", code_is(12012)),
    "F-D": ("GET", ota_errno_is(1)),
}


@pytest.mark.parametrize("label", sorted(ENDPOINTS))
@pytest.mark.parametrize("tid", [2**31 - 1, 1, TID + 1])
def test_s11_a_well_formed_tid_of_no_task_of_this_device_is_unknown(
    world: World, label: str, tid: int
) -> None:
    """S11 at the limit: 2^31-1 and 1 (no task) and the other device's task get the dialect's
    "unknown task" answer, never a 5xx, and the other device's task is untouched."""
    seeder, srv = world
    prefix, authorization, suffix = ENDPOINTS[label]
    method, judged = UNKNOWN_TASK[label]
    reply = send(srv, request(method, f"{prefix}{tid}{suffix}", authorization, b'{"step":201}'))
    assert reply.status == 200
    assert judged(reply), reply.raw
    assert seeder.state(TID + 1).value == 1


def test_s11_a_task_whose_id_passes_the_limit_is_never_offered(
    world: World, engine: Engine
) -> None:
    """S11 on the way out: SQLite's integer keys go past 2^31-1 (PostgreSQL's column cannot), and
    a device storing such a tid in 32 bits would name another task (2^32 + 4243 wraps to dev02's
    4243). S-C and F-C answer an internal error instead of offering it, and nothing moves."""
    seeder, srv = world
    wide = 2**32 + TID + 1
    if engine.dialect.name != "sqlite":
        # PostgreSQL's integer column refuses such an id: there S11 holds by the schema.
        with pytest.raises(DBAPIError, match="out of range"), engine.begin() as conn:
            conn.execute(update(device_tasks).where(device_tasks.c.id == TID).values(id=wide))
        return
    with engine.begin() as conn:
        conn.execute(update(device_tasks).where(device_tasks.c.id == TID).values(id=wide))
    studio = request("GET", "/ota/123123/dev01/check?type=1&version=1.0.0", STUDIO_AUTH)
    reply = send(srv, studio)
    assert json.loads(reply.body) == {"errno": 7, "error": "internal error"}
    fuse = request("GET", "/fuse-ota/123123/dev01/check?type=1&version=1.0.0", FUSE_AUTH)
    assert json.loads(send(srv, fuse).body)["code"] == 7
    assert seeder.state(wide).value == 1
    assert seeder.state(TID + 1).value == 1

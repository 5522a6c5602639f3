"""The Studio "things-model" dialect (spec §12) served on the classic listener: the official C
SDK's things-model captures replayed byte for byte, golden reply bytes for every endpoint, and
each decision S1-S12 by name. Real HTTP on loopback, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from onenet_ota import auth
from onenet_ota.protocol.states import TaskState
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import device_tasks, packages
from tests.server.seed import (
    DB_PARAMS,
    DEV_ID,
    FIRMWARE,
    FIRMWARE_MD5,
    K1,
    K2,
    PID,
    FakeClock,
    RawReply,
    Seeder,
    module_database,
    raw_exchange,
    running_api,
    sdk_request,
)
from tests.serverthread import ServerThread

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "c-sdk-captures-things-model"
REQUESTS = sorted(CAPTURES.glob("*.request.bin"))
TID = 4242  # the captured run's task (README there)
# The captures' Authorization: device level, sha1, et 2524579200, signed with K1.
DEVICE_AUTH = auth.build_token(PID, K1, device_name="dev01")
CANONICAL_NAMES = {
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Range-Start",
    "Content-Range-End",
    "Content-Disposition",
    "Transfer-Encoding",
    "Ota-Errno",
    "Connection",
    "Allow",
}
STATUS_LINE = re.compile(r"HTTP/1\.1 [0-9]{3} [A-Za-z][A-Za-z ]*")
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def golden_json(body: bytes) -> bytes:
    return JSON_HEAD % len(body) + body


JSON_OK = golden_json(b'{"errno":0,"error":"succ"}')
AUTH_FAILED = golden_json(b'{"errno":1,"error":"auth failed"}')
INVALID_PARAMETER = golden_json(b'{"errno":2,"error":"invalid parameter"}')
NO_VALID_TOKEN = golden_json(b'{"errno":4,"error":"no valid token"}')


def ota_error(code: int) -> bytes:
    """S7, §12.3: status 200, Ota-Errno and the same code as the one-byte chunked body."""
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Ota-Errno: %d\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"1\r\n%c\r\n0\r\n\r\n"
    ) % (code, code)


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


World = tuple[Seeder, ServerThread]


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> Iterator[World]:
    """The things-model capture run's data: product 123123 (K1), device dev01, firmware.bin to
    1.0.1 as device task 4242, and a second device dev02 with a task of its own."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    seeder = Seeder(engine, blobs, clock)
    with engine.begin() as conn:
        for table in ("tokens", "device_tasks", "tasks", "packages", "devices", "products"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    dt_id = seeder.capture_world()
    seeder.device(DEV_ID + 1, PID, "dev02")
    other = seeder.task(seeder.package(), (DEV_ID + 1,))[1][0]
    with engine.begin() as conn:
        conn.execute(update(device_tasks).where(device_tasks.c.id == dt_id).values(id=TID))
        conn.execute(update(device_tasks).where(device_tasks.c.id == other).values(id=TID + 1))
    with running_api(engine, blobs, clock) as (_, srv):
        yield seeder, srv


def assert_wire_constraints(reply: RawReply) -> None:
    """§12.1: every rule of §8.2 applies (status line, exact casing, <= 10 headers, JSON
    replies <= 512 bytes and compact)."""
    assert STATUS_LINE.fullmatch(reply.status_line), reply.status_line
    assert reply.status < 500
    assert len(reply.headers) <= 10
    for name, _ in reply.headers:
        assert name in CANONICAL_NAMES, name
    if reply.header("Content-Type") == "application/json":
        assert len(reply.raw) <= 512
        assert reply.header("Content-Length") == str(len(reply.body))
        compact = json.dumps(json.loads(reply.body), separators=(",", ":"), ensure_ascii=False)
        assert reply.body == compact.encode()


def replay(srv: ServerThread, request: bytes) -> RawReply:
    reply = raw_exchange(srv.port, request)
    assert_wire_constraints(reply)
    return reply


def studio(
    method: str,
    target: str,
    *,
    authorization: str = DEVICE_AUTH,
    body: bytes | None = None,
    extra: tuple[str, ...] = (),
) -> bytes:
    return sdk_request(method, target, authorization=authorization, body=body, extra=extra)


def capture(name: str) -> bytes:
    return next(p for p in REQUESTS if p.name.startswith(name)).read_bytes()


def test_things_model_upgrade_replayed_byte_for_byte(world: World) -> None:
    seeder, srv = world
    downloaded = bytearray()
    for path in REQUESTS:
        reply = replay(srv, path.read_bytes())
        step = path.name
        if "download" in step:
            start, end = map(int, re.findall(r"(\d+)-(\d+)", step)[0])
            served_end = min(end, len(FIRMWARE) - 1)
            assert reply.raw.startswith(
                b"HTTP/1.1 206 Partial Content\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n"
                b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
                b"Content-Range-Start: %d\r\n"
                b"Content-Range-End: %d\r\n"
                b"Content-Range: bytes %d-%d/10000\r\n"
                b"\r\n" % (served_end - start + 1, start, served_end, start, served_end)
            )
            assert reply.body == FIRMWARE[start : served_end + 1]
            assert len(reply.raw) <= (end - start + 1) + 512  # §8.2 item 5
            downloaded += reply.body
        elif "check_task" in step:
            body = (
                b'{"errno":0,"error":"succ","data":{"target":"1.0.1","tid":4242,"size":10000,'
                b'"md5":"%s","status":1,"type":1}}' % FIRMWARE_MD5.encode()
            )
            assert reply.raw == golden_json(body)
        elif "check_token" in step:  # S-T: downloading after the first (T9)
            assert reply.raw == golden_json(b'{"errno":0,"error":"succ","data":{"status":2}}')
        else:
            assert reply.raw == JSON_OK, step
    assert bytes(downloaded) == FIRMWARE
    assert seeder.state(TID) is TaskState.SUCCEEDED
    assert seeder.versions(DEV_ID) == ("1.0.1", "1.0.0")  # S-V sent both, T15 set f


def test_download_error_arrives_with_its_headers_in_one_write(world: World) -> None:
    """S7, §12.3: Ota-Errno and the one-byte chunk, in the same segment as the headers."""
    seeder, srv = world
    request = capture("04_download")
    seeder.set_state(TID, TaskState.CANCELLED)
    reply = replay(srv, request)
    assert reply.raw == ota_error(5)
    assert reply.first_segment == ota_error(5)


@pytest.mark.parametrize(
    ("request_bytes", "golden"),
    [
        pytest.param(
            studio("POST", "/ota/123123/dev01/version", body=b'{"f_version":"1.0.0"}'),
            JSON_OK,
            id="S-V ok",
        ),
        pytest.param(
            studio("POST", "/ota/123123/dev01/version", body=b'{"x":"1"}'),
            INVALID_PARAMETER,
            id="S-V neither version (S9)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/version"),
            golden_json(b'{"errno":0,"error":"succ","data":{}}'),
            id="S-Q ok, nothing known",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/check?type=1"),
            INVALID_PARAMETER,
            id="S-C no version (S4)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/check?type=3&version=1.0.0"),
            INVALID_PARAMETER,
            id="S-C bad type (S4)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/check?type=1&version=" + "v" * 21),
            golden_json(b'{"errno":27,"error":"invalid version format"}'),
            id="S-C bad version format (S4)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/check?type=2&version=1.0.0"),
            golden_json(b'{"errno":10,"error":"no task"}'),
            id="S-C no task: errno 10 (S4)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4242/check"),
            golden_json(b'{"errno":0,"error":"succ","data":{"status":2}}'),
            id="S-T ok moves to downloading (S6)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4243/check"),
            NO_VALID_TOKEN,
            id="S-T another device's tid: 4 (S6)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/9999/check"),
            NO_VALID_TOKEN,
            id="S-T unknown tid: 4 (S6)",
        ),
        pytest.param(
            studio("POST", "/ota/123123/dev01/4243/status", body=b'{"step":101}'),
            NO_VALID_TOKEN,
            id="S-R another device's tid: 4 (S8)",
        ),
        pytest.param(
            studio("POST", "/ota/123123/dev01/4242/status", body=b'{"step":300}'),
            INVALID_PARAMETER,
            id="S-R bad step (S8)",
        ),
        pytest.param(
            studio("POST", "/ota/123123/dev01/4242/status", body=b'{"step":50}'),
            golden_json(b'{"errno":17,"error":"invalid state"}'),
            id="S-R progress while to-be-upgraded: 17 (S8)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4243/download/", extra=("Range:0-9",)),
            ota_error(5),
            id="S-D another device's tid: 5 (S7)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4242/download", authorization="x", extra=()),
            ota_error(6),
            id="S-D bad Authorization: 6 (S2)",
        ),
        pytest.param(
            b"GET /ota/123123/dev01/4242/download HTTP/1.1\r\nHost:x\r\nRange:0-9\r\n\r\n",
            ota_error(6),
            id="S-D no Authorization: 6 (S2)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4242/download", extra=("Range:0-9",)),
            b"HTTP/1.1 206 Partial Content\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 10\r\n"
            b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
            b"Content-Range-Start: 0\r\n"
            b"Content-Range-End: 9\r\n"
            b"Content-Range: bytes 0-9/10000\r\n"
            b"\r\n" + FIRMWARE[:10],
            id="S-D ok (§12.3)",
        ),
        pytest.param(
            studio("GET", "/ota/123123/dev01/4242/check", authorization="version=x"),
            AUTH_FAILED,
            id="S-T bad Authorization: 1 (S2)",
        ),
    ],
)
def test_golden_replies(world: World, request_bytes: bytes, golden: bytes) -> None:
    """S12: every endpoint's reply is canonical (D26), byte for byte: compact JSON with
    ``Content-Type: application/json`` and an exact ``Content-Length``, within §8.2's limits
    (``replay`` checks those on every reply)."""
    _, srv = world
    assert replay(srv, request_bytes).raw == golden


def test_download_moves_to_downloading_and_errors_by_file(world: World, engine: Engine) -> None:
    """S7: a successful download of a to-be-upgraded task moves it to downloading; a stored
    size that the file does not have is 4, a missing package file 2, an ended task 5."""
    seeder, srv = world
    request = studio("GET", "/ota/123123/dev01/4242/download/", extra=("Range:0-4095",))
    assert replay(srv, request).status == 206
    assert seeder.state(TID) is TaskState.DOWNLOADING
    with engine.begin() as conn:
        conn.execute(update(packages).values(size=10001))
    assert replay(srv, request).raw == ota_error(4)
    with engine.begin() as conn:
        conn.execute(update(packages).values(size=10000, sha256="0" * 64))
    assert replay(srv, request).raw == ota_error(2)
    seeder.set_state(TID, TaskState.SUCCEEDED)
    assert replay(srv, request).raw == ota_error(5)


def test_state_check_answers_as_e5_by_state(world: World) -> None:
    """S6: 22 cancelled, 20 finished, 17 paused or upgrading."""
    seeder, srv = world
    request = studio("GET", "/ota/123123/dev01/4242/check")
    for state, errno in [
        (TaskState.UPGRADING, 17),
        (TaskState.PAUSED, 17),
        (TaskState.SUCCEEDED, 20),
        (TaskState.FAILED, 20),
        (TaskState.CANCELLED, 22),
    ]:
        seeder.set_state(TID, state)
        envelope = json.loads(replay(srv, request).body)
        assert envelope["errno"] == errno, state


def test_check_returns_the_open_task_and_never_issues(world: World) -> None:
    """S5: S-C returns the open task's tid and state; S10: the task classic sees, one task."""
    seeder, srv = world
    check = studio("GET", "/ota/123123/dev01/check?type=1&version=1.0.0")
    assert json.loads(replay(srv, check).body)["data"]["status"] == 1
    assert seeder.tokens(TID) == []  # nothing issued
    replay(srv, studio("GET", "/ota/123123/dev01/4242/check"))
    data = json.loads(replay(srv, check).body)["data"]
    assert (data["tid"], data["status"]) == (TID, 2)
    # Classic sees the same task in the same state and reports on it.
    classic = sdk_request("GET", f"/ota/south/tasking?dev_id={DEV_ID}&type=1&cdn=false")
    assert json.loads(raw_exchange(srv.port, classic).body)["errno"] == 12  # no token yet
    seeder.set_state(TID, TaskState.PAUSED)
    assert json.loads(replay(srv, check).body)["errno"] == 10


def test_unknown_product_or_device_answers_as_a_bad_signature(world: World) -> None:
    """S3: errno 1, byte for byte as a bad signature, so that names cannot be probed; S2: the
    token must name the path's product and device."""
    _, srv = world
    bad_sign = DEVICE_AUTH.replace("sign=", "sign=A")
    product = auth.build_token(PID, K1)
    other_product = auth.build_token("999", K1)
    cases = [
        studio("GET", "/ota/123123/dev01/version", authorization=bad_sign),
        studio("GET", "/ota/123123/nobody/version", authorization=product),
        studio("GET", "/ota/999/dev01/version", authorization=other_product),
        studio("GET", "/ota/999/dev01/version"),  # device token of another product
        studio("GET", "/ota/123123/dev02/version"),  # device token of another device
        studio("GET", "/ota/123123/dev01/version", authorization=auth.build_token(PID, K2)),
    ]
    for request in cases:
        assert replay(srv, request).raw == AUTH_FAILED


def test_both_token_versions_and_levels_are_accepted(world: World) -> None:
    """S2: device and product level, 2018-10-31 and 2022-05-01; classic keeps refusing
    2022-05-01 (D3) even after Studio has accepted the same value."""
    _, srv = world
    for version in auth.VERSIONS:
        for device_name in ("dev01", None):
            token = auth.build_token(PID, K1, device_name=device_name, version=version)
            reply = replay(srv, studio("GET", "/ota/123123/dev01/version", authorization=token))
            assert reply.raw == golden_json(b'{"errno":0,"error":"succ","data":{}}')
    token_2022 = auth.build_token(PID, K1, version=auth.VERSION_2022)
    classic = sdk_request("GET", f"/ota/device/version?dev_id={DEV_ID}", authorization=token_2022)
    assert raw_exchange(srv.port, classic).raw == AUTH_FAILED


@pytest.mark.parametrize(
    "target",
    [
        "/ota/123123/dev01/2147483648/check",  # tid > 2^31-1
        "/ota/123123/dev01/99999999999999999999/download",
        "/ota/123123/dev01/0/check",
        "/ota/123123/dev01/-1/status",
        "/ota/123123/dev01/04242/check",
        "/ota/123123/dev01/abc/check",
        "/ota/123123/dev01/4242/",
        "/ota/123123/dev%2001/version",
        "/ota/123123//version",
        "/ota/south/dev01/version",  # S1: a reserved pid stays a classic 404
        "/ota/device/dev01/check",
        "/ota/devInfo/dev01/check",
        "/ota/123123/dev01/4242/download//",
    ],
)
def test_malformed_paths_are_404_never_5xx(world: World, target: str) -> None:
    _, srv = world
    reply = replay(srv, studio("GET", target))
    assert reply.raw == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def test_methods_and_classic_routes_win(world: World) -> None:
    """S1: classic's fixed paths keep their answers; Studio paths answer 405 with Allow for a
    method they do not take; a trailing slash is taken everywhere (docs/dialects.md)."""
    _, srv = world
    reply = replay(srv, studio("DELETE", "/ota/123123/dev01/version"))
    assert reply.raw == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nAllow: GET, POST\r\n\r\n"
    )
    classic = replay(srv, sdk_request("GET", f"/ota/device/version?dev_id={DEV_ID}"))
    assert classic.raw == golden_json(b'{"errno":0,"error":"succ","data":{}}')
    reply = replay(srv, studio("GET", "/ota/123123/dev01/4242/check/"))
    assert json.loads(reply.body)["errno"] == 0
    reply = replay(srv, studio("POST", "/ota/123123/dev01/version", body=b"{" * 4097))
    assert reply.status_line == "HTTP/1.1 413 Payload Too Large"


def test_report_flow_reaches_success_by_tid(world: World) -> None:
    """S8: the E7 table keyed by tid: 101 downloaded, 201 upgraded, then 20 for anything."""
    seeder, srv = world
    replay(srv, studio("GET", "/ota/123123/dev01/4242/check"))
    for step, errno in [(50, 0), (101, 0), (201, 0), (201, 20)]:
        body = b'{"step":%d}' % step
        reply = replay(srv, studio("POST", "/ota/123123/dev01/4242/status", body=body))
        assert json.loads(reply.body)["errno"] == errno, step
    assert seeder.state(TID) is TaskState.SUCCEEDED


def test_a_2022_token_verified_for_studio_never_passes_classic_from_the_cache(
    world: World, engine: Engine
) -> None:
    """D3 and S2 together, with the caches on: the principal cache is shared by the dialects,
    so a value only Studio accepts must not be kept where classic's P1 would find it."""
    seeder, _ = world
    token = auth.build_token(PID, K1, version=auth.VERSION_2022)
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (_, srv):
        studio_reply = replay(srv, studio("GET", "/ota/123123/dev01/version", authorization=token))
        assert json.loads(studio_reply.body)["errno"] == 0
        classic = sdk_request("GET", f"/ota/device/version?dev_id={DEV_ID}", authorization=token)
        assert raw_exchange(srv.port, classic).raw == AUTH_FAILED
        # A classic-acceptable value, cached by classic, serves Studio too.
        product = auth.build_token(PID, K1)
        classic = sdk_request("GET", f"/ota/device/version?dev_id={DEV_ID}", authorization=product)
        assert json.loads(raw_exchange(srv.port, classic).body)["errno"] == 0
        reply = replay(srv, studio("GET", "/ota/123123/dev01/version", authorization=product))
        assert json.loads(reply.body)["errno"] == 0


def test_the_studio_sdks_request_style_is_served(world: World) -> None:
    """§12.1: the Studio SDK sends ``authorization:`` in lower case, ``Connection: keep-alive``
    and an exact Content-Length, and keeps one connection open."""
    _, srv = world
    body = b'{"f_version":"1.0.0"}'
    request = (
        b"POST /ota/123123/dev01/version HTTP/1.1\r\n"
        b"Host: studio-ota.heclouds.com\r\n"
        b"authorization: " + DEVICE_AUTH.encode() + b"\r\n"
        b"Connection: keep-alive\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    assert replay(srv, request).raw == JSON_OK


def test_state_check_before_every_chunk_is_answered_from_the_cache(
    world: World, engine: Engine
) -> None:
    """S6 with the caches on: S-T, which the C SDK sends before every chunk, uses classic E5's
    cache. A check that changed nothing (T10) is answered from the cache while it holds, so a
    change nobody announced is not seen; this worker's own transitions and an invalidation (the
    management API, the change feed) are seen at once."""
    seeder, _ = world
    check = studio("GET", "/ota/123123/dev01/4242/check")
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (api, srv):
        assert json.loads(replay(srv, check).body)["data"] == {"status": 2}  # T9: a write
        assert json.loads(replay(srv, check).body)["data"] == {"status": 2}  # T10: cached now
        # Another process pauses the task without telling this one: the cached answer stands.
        seeder.set_state(TID, TaskState.PAUSED, paused_from=TaskState.DOWNLOADING)
        assert json.loads(replay(srv, check).body)["errno"] == 0
        api.service.invalidate()
        assert json.loads(replay(srv, check).body)["errno"] == 17  # §5.4: paused
        assert json.loads(replay(srv, check).body)["errno"] == 17  # refusals are not cached
        seeder.set_state(TID, TaskState.DOWNLOADING)
        assert json.loads(replay(srv, check).body)["errno"] == 0
        assert json.loads(replay(srv, check).body)["errno"] == 0
        # This worker's own transition (S8: 101 moves to upgrading) drops the answer.
        report = studio("POST", "/ota/123123/dev01/4242/status", body=b'{"step":101}')
        assert json.loads(replay(srv, report).body)["errno"] == 0
        assert json.loads(replay(srv, check).body)["errno"] == 17  # §5.4: upgrading
        report = studio("POST", "/ota/123123/dev01/4242/status", body=b'{"step":201}')
        assert json.loads(replay(srv, report).body)["errno"] == 0
        assert json.loads(replay(srv, check).body)["errno"] == 20  # finished


def test_a_memoised_state_check_ends_with_its_authorization(world: World, engine: Engine) -> None:
    """S2 with the caches on: a repeated S-T is memoised, but only while the Authorization
    value behind it is within its ``et``."""
    seeder, _ = world
    short = auth.build_token(PID, K1, device_name="dev01", et=int(seeder.clock()) + 30)
    check = studio("GET", "/ota/123123/dev01/4242/check", authorization=short)
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=3600) as (_, srv):
        for _ in range(3):
            assert json.loads(replay(srv, check).body)["errno"] == 0
        seeder.clock.advance(31)
        assert replay(srv, check).raw == AUTH_FAILED

"""The fuse-ota dialect (spec §13) served on the classic listener: golden reply bytes for every
endpoint (success and error), the auth table of F2/F4 with account tokens (F12), Range forms
and headers (F10, F11), the state rules F6-F9, and one task shared with the other dialects
(F14). Real HTTP on loopback, SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from onenet_ota import auth
from onenet_ota.protocol.states import Action, TaskState
from onenet_ota.server.admin_service import (
    AccountCreate,
    AdminService,
    DeviceCreate,
    KeyRotate,
    TaskCreate,
)
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import (
    device_task_bytes,
    device_task_events,
    device_tasks,
    devices,
    packages,
)
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
)
from tests.serverthread import ServerThread

TID = 4242
UID = "7700001"
OTHER_UID = "7700002"
DEVICE_AUTH = auth.build_token(PID, K1, device_name="dev01", version=auth.VERSION_2022)
REQUEST_ID = re.compile(rb'"request_id":"([0-9a-f]{32})"')
CANONICAL_NAMES = {
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Range-Start",  # Studio's, where a test crosses dialects
    "Content-Range-End",
    "Content-Disposition",
    "Ota-Errno",
    "Connection",
    "Allow",
}
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: %d\r\n\r\n"
)
ZERO_ID = b"0" * 32


def golden(code: int, msg: str, data: bytes | None = None) -> bytes:
    """A fuse envelope reply (§13.2, F11) with the request_id written as 32 zeros."""
    body = b'{"code":%d,"msg":"%s","request_id":"%s"' % (code, msg.encode(), ZERO_ID)
    body += b"}" if data is None else b',"data":' + data + b"}"
    return JSON_HEAD % len(body) + body


def download_error(code: int, msg: str) -> bytes:
    """F8: status 200, Content-Length, Ota-Errno N and a fuse envelope with code N."""
    body = b'{"code":%d,"msg":"%s","request_id":"%s"}' % (code, msg.encode(), ZERO_ID)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json;charset=UTF-8\r\n"
        b"Content-Length: %d\r\nOta-Errno: %d\r\n\r\n" % (len(body), code)
    ) + body


OK = golden(0, "succ")
AUTH_FAILED = golden(10403, "auth failed")


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


World = tuple[Seeder, ServerThread, AdminService]


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> Iterator[World]:
    """Product 123123 (K1) owned by account 7700001 (K2), device dev01 with firmware.bin to
    1.0.1 as device task 4242; device dev02 with task 4243; account 7700002 owning nothing."""
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
    admin = AdminService(engine, blobs, clock=clock)
    admin.create_account(AccountCreate(uid=UID, access_key=K2, name="owner"))
    admin.create_account(AccountCreate(uid=OTHER_UID, access_key=K1, name="other"))
    admin.set_product_account(PID, UID)
    with running_api(engine, blobs, clock) as (_, srv):
        yield seeder, srv, admin


def assert_wire(reply: RawReply) -> None:
    assert reply.status < 500
    assert len(reply.headers) <= 10
    for name, _ in reply.headers:
        assert name in CANONICAL_NAMES, name


def send(srv: ServerThread, request: bytes) -> RawReply:
    reply = raw_exchange(srv.port, request)
    assert_wire(reply)
    return reply


def normalised(reply: RawReply) -> bytes:
    """The reply with its request_id (random per response, §13.2) written as 32 zeros."""
    return REQUEST_ID.sub(b'"request_id":"' + ZERO_ID + b'"', reply.raw)


def fuse(
    method: str,
    target: str,
    *,
    authorization: str | None = DEVICE_AUTH,
    body: bytes | None = None,
    extra: tuple[str, ...] = (),
) -> bytes:
    """A request as the field's fuse clients write it (§13.1)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: iot-api.heclouds.com"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    lines.extend(extra)
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def code(srv: ServerThread, request: bytes) -> int:
    return int(json.loads(send(srv, request).body)["code"])


TASK_DATA = (
    b'{"target":"1.0.1","tid":4242,"size":10000,"md5":"%s","status":1,"type":1}'
    % FIRMWARE_MD5.encode()
)
BASE = "/fuse-ota/123123/dev01"


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        pytest.param(
            fuse("POST", f"{BASE}/version", body=b'{"s_version":"V1.0","f_version":"1.0.0"}'),
            OK,
            id="F-V ok",
        ),
        pytest.param(
            fuse("POST", f"{BASE}/version", body=b"{}"),
            golden(2, "invalid parameter"),
            id="F-V neither version (F5)",
        ),
        pytest.param(fuse("GET", f"{BASE}/version"), golden(0, "succ", b"{}"), id="F-Q ok"),
        pytest.param(
            fuse("GET", f"{BASE}/check?type=1&version=1.0.0"),
            golden(0, "succ", TASK_DATA),
            id="F-C ok",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/check?type=2&version=1.0.0"),
            golden(12012, "not exist"),
            id="F-C no task: 12012 (F6)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/check?type=1"),
            golden(2, "invalid parameter"),
            id="F-C no version",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/check?type=1&version=" + "v" * 21),
            golden(27, "invalid version format"),
            id="F-C bad version format (F3)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/4242/check"),
            golden(0, "succ", b'{"status":2}'),
            id="F-T ok moves to downloading (F7)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/4243/check"),
            golden(12012, "not exist"),
            id="F-T another device's tid: 12012 (F7)",
        ),
        pytest.param(
            fuse("POST", f"{BASE}/4243/status", body=b'{"step":101}'),
            golden(12012, "not exist"),
            id="F-R another device's tid: 12012 (F9)",
        ),
        pytest.param(
            fuse("POST", f"{BASE}/4242/status", body=b'{"step":50}'),
            golden(17, "invalid state"),
            id="F-R progress while to-be-upgraded: 17 (F9)",
        ),
        pytest.param(
            fuse("POST", f"{BASE}/4242/status", body=b'{"step":true}'),
            golden(2, "invalid parameter"),
            id="F-R bad step (F9)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/version", authorization=None),
            AUTH_FAILED,
            id="no Authorization: 10403 (F2)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/4243/download", extra=("Range: bytes=0-9",)),
            download_error(1, "device not found"),
            id="F-D another device's tid: 1 (F8)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/4242/download", authorization="x"),
            download_error(6, "authentication failed"),
            id="F-D bad Authorization: 6 (F2)",
        ),
        pytest.param(
            fuse("GET", f"{BASE}/4242/download", extra=("Range: bytes=0-9",)),
            b"HTTP/1.1 206 Partial Content\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 10\r\n"
            b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
            b"Ota-Errno: 0\r\n"
            b"Content-Range: bytes 0-9/10000\r\n"
            b"\r\n" + FIRMWARE[:10],
            id="F-D ok (F11)",
        ),
    ],
)
def test_golden_replies(world: World, request_bytes: bytes, expected: bytes) -> None:
    _, srv, _ = world
    assert normalised(send(srv, request_bytes)) == expected


def test_request_id_is_random_per_response(world: World) -> None:
    _, srv, _ = world
    ids = set()
    for _ in range(3):
        found = REQUEST_ID.search(send(srv, fuse("GET", f"{BASE}/version")).raw)
        assert found is not None
        ids.add(found.group(1))
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("range_line", "status", "start", "end"),
    [
        ("Range: bytes=0-511", 206, 0, 511),
        ("Range: 1024-2047", 206, 1024, 2047),
        ("Range: bytes=9990-20000", 206, 9990, 9999),
        ("Range: -10", 206, 9990, 9999),
        (None, 200, 0, 9999),
    ],
)
def test_range_forms_and_no_range(
    world: World, range_line: str | None, status: int, start: int, end: int
) -> None:
    """F10: bytes= and bare ranges clamp as classic's; no Range is 200 with the whole file."""
    _, srv, _ = world
    extra = () if range_line is None else (range_line,)
    reply = send(srv, fuse("GET", f"{BASE}/4242/download", extra=extra))
    assert reply.status == status
    assert reply.header("Ota-Errno") == "0"
    assert reply.body == FIRMWARE[start : end + 1]
    names = [name for name, _ in reply.headers]
    assert names[:4] == ["Content-Type", "Content-Length", "Content-Disposition", "Ota-Errno"]
    if status == 206:
        assert reply.header("Content-Range") == f"bytes {start}-{end}/10000"
        assert names[-1] == "Content-Range"


def test_download_errors_by_task_and_file(world: World, engine: Engine) -> None:
    """F8: success moves to-be-upgraded to downloading; 4 size mismatch, 2 package missing,
    5 for a paused or ended task."""
    seeder, srv, _ = world
    request = fuse("GET", f"{BASE}/4242/download", extra=("Range: bytes=0-9",))
    assert send(srv, request).status == 206
    assert seeder.state(TID) is TaskState.DOWNLOADING
    seeder.set_state(TID, TaskState.PAUSED, paused_from=TaskState.DOWNLOADING)
    assert normalised(send(srv, request)) == download_error(
        5, "task expired or no longer downloadable"
    )
    seeder.set_state(TID, TaskState.DOWNLOADING)
    with engine.begin() as conn:
        conn.execute(update(packages).values(size=10001))
    assert normalised(send(srv, request)) == download_error(4, "size mismatch")
    with engine.begin() as conn:
        conn.execute(update(packages).values(size=10000, sha256="0" * 64))
    assert normalised(send(srv, request)) == download_error(2, "file not found")


def test_status_query_answers_every_state(world: World) -> None:
    """F7: code 0 with the status for every task, terminal ones included; a paused task shows
    paused_from."""
    seeder, srv, _ = world
    request = fuse("GET", f"{BASE}/4242/check")
    for state, paused_from, status in [
        (TaskState.UPGRADING, None, 3),
        (TaskState.PAUSED, TaskState.DOWNLOADING, 2),
        (TaskState.PAUSED, TaskState.TO_BE_UPGRADED, 1),
        (TaskState.SUCCEEDED, None, 4),
        (TaskState.FAILED, None, 5),
        (TaskState.CANCELLED, None, 6),
    ]:
        seeder.set_state(TID, state, paused_from=paused_from)
        envelope = json.loads(send(srv, request).body)
        assert (envelope["code"], envelope["data"]) == (0, {"status": status}), state


def test_check_after_success_is_12013_and_a_paused_task_is_not_offered(world: World) -> None:
    """F6: 12013 when the latest task succeeded with this target, 12012 otherwise."""
    seeder, srv, _ = world
    seeder.set_state(TID, TaskState.PAUSED, paused_from=TaskState.TO_BE_UPGRADED)
    assert code(srv, fuse("GET", f"{BASE}/check?type=1&version=1.0.0")) == 12012
    seeder.set_state(TID, TaskState.SUCCEEDED)
    assert code(srv, fuse("GET", f"{BASE}/check?type=1&version=1.0.1")) == 12013
    assert code(srv, fuse("GET", f"{BASE}/check?type=1&version=1.0.0")) == 12012


def test_auth_table(world: World) -> None:
    """F2: device and product level with both versions, and the owning account's token;
    F4: unknown product or device answers as a bad signature; an account that does not own
    the product is refused."""
    _, srv, _ = world
    accepted = [
        auth.build_token(PID, K1, device_name="dev01", version=version) for version in auth.VERSIONS
    ] + [auth.build_token(PID, K1, version=version) for version in auth.VERSIONS]
    accepted += [auth.build_user_token(UID, K2, version=v) for v in auth.VERSIONS]
    for token in accepted:
        assert code(srv, fuse("GET", f"{BASE}/version", authorization=token)) == 0, token
    refused = [
        (BASE, DEVICE_AUTH.replace("sign=", "sign=A")),
        (BASE, auth.build_user_token(OTHER_UID, K1)),  # owns nothing
        (BASE, auth.build_user_token(UID, K1)),  # wrong key
        (BASE, auth.build_token(PID, K1, device_name="dev02")),  # another device
        ("/fuse-ota/123123/nobody", auth.build_token(PID, K1)),  # unknown device
        ("/fuse-ota/999/dev01", auth.build_user_token(UID, K2)),  # unknown product
    ]
    for base, token in refused:
        reply = send(srv, fuse("GET", f"{base}/version", authorization=token))
        assert normalised(reply) == AUTH_FAILED, token


def test_revoked_account_key_and_moved_product_stop_at_once_on_every_worker(
    world: World, engine: Engine
) -> None:
    """F2, F12: two workers with their caches on; a rotated account key and a product moved to
    another account are refused by both from the next request."""
    seeder, _, admin = world
    token = auth.build_user_token(UID, K2)
    request = fuse("GET", f"{BASE}/4242/check", authorization=token)
    with (
        running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (_, one),
        running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (_, two),
    ):
        assert code(one, request) == 0
        assert code(two, request) == 0
        admin.rotate_account_key(UID, KeyRotate(access_key=K1))
        assert code(one, request) == 10403
        assert code(two, request) == 10403
        new_token = auth.build_user_token(UID, K1)
        moved = fuse("GET", f"{BASE}/4242/check", authorization=new_token)
        assert code(one, moved) == 0
        admin.set_product_account(PID, OTHER_UID)
        assert code(one, moved) == 10403
        assert code(two, moved) == 10403


def test_one_task_across_dialects(world: World) -> None:
    """F14, S10: a device switching dialect mid-task shares the task's state."""
    seeder, srv, _ = world
    studio_auth = auth.build_token(PID, K1, device_name="dev01")
    studio_check = fuse("GET", "/ota/123123/dev01/4242/check", authorization=studio_auth)
    assert json.loads(send(srv, studio_check).body) == {
        "errno": 0,
        "error": "succ",
        "data": {"status": 2},
    }
    assert seeder.state(TID) is TaskState.DOWNLOADING
    report = fuse("POST", f"{BASE}/4242/status", body=b'{"step":101}')
    assert code(srv, report) == 0
    assert seeder.state(TID) is TaskState.UPGRADING
    studio_report = fuse(
        "POST", "/ota/123123/dev01/4242/status", authorization=studio_auth, body=b'{"step":201}'
    )
    assert json.loads(send(srv, studio_report).body)["errno"] == 0
    assert seeder.state(TID) is TaskState.SUCCEEDED
    assert code(srv, fuse("GET", f"{BASE}/check?type=1&version=1.0.1")) == 12013


@pytest.mark.parametrize(
    "target",
    [
        f"{BASE}/2147483648/check",
        f"{BASE}/0/download",
        f"{BASE}/x1/status",
        "/fuse-ota/123123/dev01",
        "/fuse-ota/bad-pid/dev01/version",
        "/fuse-ota/123123/dev01/4242/download//",
    ],
)
def test_malformed_paths_are_404_never_5xx(world: World, target: str) -> None:
    _, srv, _ = world
    reply = send(srv, fuse("GET", target))
    assert reply.raw == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def test_a_deleted_and_recreated_device_name_is_read_again_from_the_feed(
    world: World, engine: Engine
) -> None:
    """The (pid, name) -> dev_id cache of the path dialects is dropped with its device: a device
    deleted by another process and created again under the same name with a new dev_id is the
    one answered once this worker has read the change feed."""
    seeder, _, admin = world
    request = fuse("GET", "/fuse-ota/123123/dev02/version", authorization=auth.build_token(PID, K1))
    # feed_interval 0: the feed is read before every request, as it is 0.1 s after a change.
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30, feed_interval=0) as (
        _,
        srv,
    ):
        assert normalised(send(srv, request)) == golden(0, "succ", b"{}")
        seeder.set_state(TID + 1, TaskState.CANCELLED)  # delete refuses an open task
        admin.delete_device(DEV_ID + 1)
        admin.create_device(DeviceCreate(pid=PID, name="dev02", dev_id=DEV_ID + 2))
        with engine.begin() as conn:
            conn.execute(
                update(devices).where(devices.c.dev_id == DEV_ID + 2).values(f_version="9.9")
            )
        expected = golden(0, "succ", b'{"f_version":"9.9"}')
        assert normalised(send(srv, request)) == expected


def test_cached_check_and_download_answers_follow_the_task(world: World, engine: Engine) -> None:
    """With the caches on, F-C and F-D's task lookups are cached per device and dropped when
    the task changes: by this worker's own transition (F-T's T9), or by another process's
    change read from the feed (a cancel)."""
    seeder, _, admin = world
    check = fuse("GET", f"{BASE}/check?type=1&version=1.0.0")
    download = fuse("GET", f"{BASE}/4242/download", extra=("Range: bytes=0-9",))
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30, feed_interval=0) as (
        _,
        srv,
    ):
        for _ in range(2):
            assert json.loads(send(srv, check).body)["data"]["status"] == 1
        assert code(srv, fuse("GET", f"{BASE}/4242/check")) == 0  # T9
        assert json.loads(send(srv, check).body)["data"]["status"] == 2
        for _ in range(2):
            assert send(srv, download).status == 206
        task_id = seeder.device_task(TID).task_id
        admin.act_on_task(task_id, Action.CANCEL)
        assert code(srv, check) == 12012
        assert send(srv, download).header("Ota-Errno") == "5"


def test_a_cached_chunk_keeps_each_dialects_framing(world: World) -> None:
    """Small download replies are cached per (file, range, dialect): the same range asked over
    Studio, fuse and Studio again is framed for each (§12.3, F11)."""
    _, srv, _ = world
    studio_auth = auth.build_token(PID, K1, device_name="dev01")
    studio = fuse(
        "GET",
        "/ota/123123/dev01/4242/download/",
        authorization=studio_auth,
        extra=("Range: bytes=0-9",),
    )
    ours = fuse("GET", f"{BASE}/4242/download", extra=("Range: bytes=0-9",))
    for request, extra in [(studio, "Content-Range-Start"), (ours, "Ota-Errno")] * 2:
        reply = send(srv, request)
        assert reply.body == FIRMWARE[:10]
        names = [name for name, _ in reply.headers]
        assert extra in names
        assert ("Ota-Errno" in names) is (extra == "Ota-Errno")


def test_memoised_polls_get_a_fresh_request_id_and_follow_the_task(
    world: World, engine: Engine
) -> None:
    """§13.2 with the caches on: a repeated F-C or F-T is answered from a memo, yet every reply
    carries its own request_id; the memo ends with the task's change (this worker's own, or an
    invalidation from the management side)."""
    seeder, _, admin = world
    check = fuse("GET", f"{BASE}/check?type=1&version=1.0.0")
    state = fuse("GET", f"{BASE}/4242/check")
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (api, srv):
        replies = [send(srv, check) for _ in range(4)]
        assert {normalised(reply) for reply in replies} == {golden(0, "succ", TASK_DATA)}
        ids = {found.group(1) for reply in replies if (found := REQUEST_ID.search(reply.raw))}
        assert len(ids) == 4
        assert normalised(send(srv, state)) == golden(0, "succ", b'{"status":2}')  # T9
        for _ in range(3):
            assert normalised(send(srv, state)) == golden(0, "succ", b'{"status":2}')
        assert json.loads(send(srv, check).body)["data"]["status"] == 2
        assert code(srv, fuse("POST", f"{BASE}/4242/status", body=b'{"step":101}')) == 0
        assert normalised(send(srv, state)) == golden(0, "succ", b'{"status":3}')
        admin.act_on_task(seeder.device_task(TID).task_id, Action.CANCEL)
        api.service.invalidate()  # as the management API of this process does
        assert normalised(send(srv, state)) == golden(0, "succ", b'{"status":6}')
        assert code(srv, check) == 12012


def test_already_on_target_is_cached_like_the_check(world: World, engine: Engine) -> None:
    """F6 with the caches on: the 12013 answer (most of a fleet's polling once a rollout is
    done) is cached with the device's other answers, and dropped with them."""
    seeder, _, _ = world
    seeder.set_state(TID, TaskState.SUCCEEDED)
    done = fuse("GET", f"{BASE}/check?type=1&version=1.0.1")
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30) as (api, srv):
        assert code(srv, done) == 12013
        assert code(srv, done) == 12013
        seeder.set_state(TID, TaskState.FAILED)  # nobody tells this worker
        assert code(srv, done) == 12013
        api.service.invalidate()
        assert code(srv, done) == 12012


def test_a_memoised_download_ends_with_its_authorization(world: World, engine: Engine) -> None:
    """F2 with the caches on: chunk after chunk on one path and Authorization rest on cached
    checks, which end with the token's ``et`` (Ota-Errno 6) and with the task (5)."""
    seeder, _, admin = world
    short = auth.build_token(
        PID, K1, device_name="dev01", version=auth.VERSION_2022, et=int(seeder.clock()) + 30
    )
    chunk = fuse("GET", f"{BASE}/4242/download", authorization=short, extra=("Range: bytes=0-9",))
    # feed_interval 0: the feed is read before every request, as it is 0.1 s after a change.
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=3600, feed_interval=0) as (
        _,
        srv,
    ):
        for _ in range(3):
            assert send(srv, chunk).body == FIRMWARE[:10]
        seeder.clock.advance(31)
        assert normalised(send(srv, chunk)) == download_error(6, "authentication failed")
        ours = fuse("GET", f"{BASE}/4242/download", extra=("Range: bytes=0-9",))
        for _ in range(2):
            assert send(srv, ours).body == FIRMWARE[:10]
        admin.act_on_task(seeder.device_task(TID).task_id, Action.PAUSE)
        assert send(srv, ours).header("Ota-Errno") == "5"


def served_bytes(engine: Engine, dt_id: int) -> int:
    with engine.connect() as conn:
        found = conn.execute(
            select(device_task_bytes.c.served).where(device_task_bytes.c.device_task_id == dt_id)
        ).scalar()
    return int(found or 0)


def test_chunks_answered_from_the_caches_count_their_bytes_and_the_first_moves_the_task(
    world: World, engine: Engine
) -> None:
    """F8 with the caches on: the first chunk of a to-be-upgraded task moves it to downloading
    (an event named F-D, though the request before it on the connection was an F-C); the
    repeats, answered from the memoised grant and the cached chunk without matching the path,
    each count their bytes served, in both framings of the one file (fuse, Studio)."""
    seeder, _, _ = world
    check_path, chunk_path = f"{BASE}/check?type=1&version=1.0.0", f"{BASE}/4242/download"
    chunk = fuse("GET", chunk_path, extra=("Range: bytes=0-9",))
    studio_auth = auth.build_token(PID, K1, device_name="dev01")
    studio = fuse(
        "GET",
        "/ota/123123/dev01/4242/download",
        authorization=studio_auth,
        extra=("Range: bytes=10-29",),
    )
    # Earlier tests' device task 4242 left its bytes and events too.
    before = served_bytes(engine, TID)
    with engine.connect() as conn:
        last_event = conn.execute(select(func.max(device_task_events.c.id))).scalar() or 0
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=3600) as (api, srv):
        connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        try:  # one connection: F-C, then F-D
            for path, expected, range_value in [(check_path, 200, None), (chunk_path, 206, "0-9")]:
                headers = {"Authorization": DEVICE_AUTH}
                if range_value is not None:
                    headers["Range"] = f"bytes={range_value}"
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                assert response.status == expected
        finally:
            connection.close()
        assert seeder.device_task(TID).state == TaskState.DOWNLOADING
        for _ in range(4):
            assert send(srv, chunk).body == FIRMWARE[:10]
        for _ in range(3):
            assert send(srv, studio).body == FIRMWARE[10:30]
        api.flush_served()
    with engine.connect() as conn:
        moves = conn.execute(
            select(device_task_events.c.dialect, device_task_events.c.endpoint).where(
                device_task_events.c.device_task_id == TID,
                device_task_events.c.kind == "state",
                device_task_events.c.id > last_event,
            )
        ).all()
    assert served_bytes(engine, TID) - before == 5 * 10 + 3 * 20
    assert [tuple(move) for move in moves] == [("fuse", "F-D")]


def test_f1_prefix_with_any_host_a_trailing_slash_and_http_1_0(world: World) -> None:
    """F1: fuse lives under /fuse-ota/, whatever the Host says (D20), and takes the classic
    listener's tolerance: one trailing slash, and HTTP/1.0."""
    _, srv, _ = world
    expected = golden(0, "succ", TASK_DATA)
    other_host = fuse("GET", f"{BASE}/check?type=1&version=1.0.0").replace(
        b"Host: iot-api.heclouds.com", b"Host: example.org"
    )
    assert normalised(send(srv, other_host)) == expected
    assert normalised(send(srv, fuse("GET", f"{BASE}/check/?type=1&version=1.0.0"))) == expected
    http_1_0 = fuse("GET", f"{BASE}/check?type=1&version=1.0.0").replace(
        b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1
    )
    reply = send(srv, http_1_0)
    assert (reply.status, json.loads(reply.body)["code"]) == (200, 0)
    # Without its prefix a fuse path is nobody's.
    reply = send(srv, fuse("GET", "/fuse/123123/dev01/check?type=1&version=1.0.0"))
    assert reply.status == 404


def test_f13_without_notices_a_new_task_is_found_by_the_next_poll(
    world: World, engine: Engine
) -> None:
    """F13: no MQTT inform notice is sent, so a device learns of a new task only by polling
    F-C; with the caches on, the poll after the task's creation (by the management side, in
    another process: the change feed) offers it, never the "no task" cached before."""
    seeder, _, admin = world
    seeder.set_state(TID, TaskState.SUCCEEDED)
    poll = fuse("GET", f"{BASE}/check?type=1&version=1.0.1")
    # feed_interval 0: the feed is read before every request, as it is 0.1 s after a change.
    with running_api(engine, seeder.blobs, seeder.clock, cache_ttl=30, feed_interval=0) as (
        _,
        srv,
    ):
        assert code(srv, poll) == 12013
        assert code(srv, poll) == 12013  # answered from the cache now
        package = seeder.package(target="1.0.2")
        created = admin.create_task(TaskCreate(package_id=package, dev_ids=[DEV_ID]))
        envelope = json.loads(send(srv, poll).body)
        assert envelope["code"] == 0
        assert envelope["data"]["target"] == "1.0.2"
        assert envelope["data"]["tid"] != TID
        assert created.dev_ids == [DEV_ID]

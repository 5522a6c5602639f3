"""Conformance with the official C SDK: its captured requests replayed byte for byte over raw
sockets (Appendix C), and every reply checked against the wire constraints of §2.5 and §8.2.

The captures carry the test server's token ``abc123``; the replay substitutes the token this
server issued in E3, and changes nothing else.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from onenet_ota.protocol.states import TaskState
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import packages
from tests.captures import CAPTURES
from tests.server.seed import (
    DB_PARAMS,
    DEV_ID,
    FIRMWARE,
    FIRMWARE_MD5,
    FakeClock,
    RawReply,
    Seeder,
    module_database,
    raw_exchange,
    running_api,
    sdk_request,
)
from tests.serverthread import ServerThread

REQUESTS = sorted(CAPTURES.glob("*.request.bin"))
CANONICAL_NAMES = {
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Disposition",
    "Transfer-Encoding",
    "Connection",
    "Allow",
}
STATUS_LINE = re.compile(r"HTTP/1\.1 [0-9]{3} [A-Za-z][A-Za-z ]*")
JSON_OK = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 26\r\n"
    b"\r\n"
    b'{"errno":0,"error":"succ"}'
)
# §6.6.4, exactly (98 bytes for code 3).
ERROR_3 = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"1\r\n\x03\r\n0\r\n\r\n"
)


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> Iterator[tuple[Seeder, int, ServerThread]]:
    """The capture run's data (product 123123, K1, device 987654321, firmware.bin) on a server
    with ``cdn`` answered by a public address, as in the captured run."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    seeder = Seeder(engine, blobs, clock)
    with engine.begin() as conn:  # the capture ids are fixed: start from an empty database
        for table in ("tokens", "device_tasks", "tasks", "packages", "devices", "products"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    dt_id = seeder.capture_world()
    with running_api(engine, blobs, clock, public_address="ota.example.net:80") as (_, srv):
        yield seeder, dt_id, srv


def assert_wire_constraints(reply: RawReply) -> None:
    """§2.5 and §8.2 items 1-4 and 6 for any reply."""
    assert STATUS_LINE.fullmatch(reply.status_line), reply.status_line
    assert len(reply.headers) <= 10
    for name, _ in reply.headers:
        assert name in CANONICAL_NAMES, name
    if reply.header("Content-Type") == "application/json":
        assert len(reply.raw) <= 512
        assert reply.header("Content-Length") == str(len(reply.body))
        compact = json.dumps(json.loads(reply.body), separators=(",", ":"), ensure_ascii=False)
        assert reply.body == compact.encode()  # no spaces, no newline (§2.5)
    if reply.header("Transfer-Encoding") is not None:
        assert reply.header("Transfer-Encoding") == "chunked"
        assert reply.header("Content-Length") is None


def replay(srv: ServerThread, request: bytes) -> RawReply:
    reply = raw_exchange(srv.port, request)
    assert_wire_constraints(reply)
    return reply


def test_full_upgrade_replayed_byte_for_byte(
    world: tuple[Seeder, int, ServerThread],
) -> None:
    seeder, dt_id, srv = world
    token: bytes | None = None
    downloaded = bytearray()
    for path in REQUESTS:
        request = path.read_bytes()
        if b"abc123" in request:
            assert token is not None
            request = request.replace(b"abc123", token)
        reply = replay(srv, request)
        step = path.name
        if "download" in step:
            assert reply.status_line == "HTTP/1.1 206 Partial Content"
            assert [name for name, _ in reply.headers] == [
                "Content-Type",
                "Content-Length",
                "Content-Disposition",
                "Content-Range",
            ]
            start, end = map(int, re.findall(r"(\d+)-(\d+)", step)[0])
            served_end = min(end, len(FIRMWARE) - 1)
            assert reply.header("Content-Range") == f"bytes {start}-{served_end}/{len(FIRMWARE)}"
            assert reply.body == FIRMWARE[start : served_end + 1]
            # §8.2 item 5: at most requested size + 512 bytes.
            assert len(reply.raw) <= (end - start + 1) + 512
            downloaded += reply.body
        else:
            assert reply.status == 200
            envelope = json.loads(reply.body)
            assert envelope["errno"] == 0, (step, envelope)
            if "check_task" in step:
                data = envelope["data"]
                assert data["size"] == 10000
                assert data["md5"] == FIRMWARE_MD5
                assert data["ipPort"] == "ota.example.net:80"  # cdn=true in the capture
                token = data["token"].encode()
            else:
                assert reply.raw == JSON_OK  # golden bytes (§2.5)
    assert bytes(downloaded) == FIRMWARE
    assert seeder.state(dt_id) is TaskState.SUCCEEDED
    assert seeder.versions(DEV_ID) == ("1.0.1", "1.0.0")


def test_last_chunk_past_eof_yields_1808_bytes(world: tuple[Seeder, int, ServerThread]) -> None:
    _, _, srv = world
    token = check_token(srv)
    request = (CAPTURES / "08_download_8192-12287.request.bin").read_bytes()
    reply = replay(srv, request.replace(b"abc123", token))
    assert reply.header("Content-Length") == "1808"
    assert reply.header("Content-Range") == "bytes 8192-9999/10000"
    assert reply.raw.startswith(
        b"HTTP/1.1 206 Partial Content\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: 1808\r\n"
        b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
        b"Content-Range: bytes 8192-9999/10000\r\n"
        b"\r\n"
    )


def check_token(srv: ServerThread) -> bytes:
    reply = replay(srv, (CAPTURES / "02_check_task.request.bin").read_bytes())
    return str(json.loads(reply.body)["data"]["token"]).encode()


def test_error_byte_arrives_with_the_headers(world: tuple[Seeder, int, ServerThread]) -> None:
    seeder, dt_id, srv = world
    request = (CAPTURES / "04_download_0-4095.request.bin").read_bytes()
    # The capture's own token was never issued here: byte 3, exactly as §6.6.4 prints it.
    reply = replay(srv, request)
    assert reply.raw == ERROR_3
    assert reply.first_segment == ERROR_3  # one write, one segment (§8.2 item 7)
    token = check_token(srv)
    seeder.set_state(dt_id, TaskState.CANCELLED)
    reply = replay(srv, request.replace(b"abc123", token))
    assert reply.first_segment == ERROR_3


def test_errno_replies_are_canonical(world: tuple[Seeder, int, ServerThread]) -> None:
    _, _, srv = world
    request = (CAPTURES / "03_check_token.request.bin").read_bytes()  # token abc123: unknown
    reply = replay(srv, request)
    body = b'{"errno":4,"error":"no valid token"}'
    assert reply.raw == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n" + body
    )


def test_transport_errors_are_canonical(world: tuple[Seeder, int, ServerThread]) -> None:
    _, _, srv = world
    reply = replay(srv, sdk_request("GET", "/ota/nowhere"))
    assert reply.raw == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    reply = replay(srv, sdk_request("HEAD", "/ota/device/version"))
    assert reply.raw == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nAllow: GET, POST\r\n\r\n"
    )
    reply = replay(srv, sdk_request("POST", "/ota/device/version", body=b" " * 4097))
    assert reply.status_line == "HTTP/1.1 413 Payload Too Large"
    assert reply.header("Content-Length") == "0"


def test_largest_check_reply_fits_512_bytes_with_connection_close(
    engine: Engine, tmp_path: Path
) -> None:
    """D21's limits at their maxima, with ``Connection: close``: the spec computes 388 bytes."""
    clock = FakeClock()
    seeder = Seeder(engine, BlobStore(tmp_path / "blobs"), clock)
    limit = 2**31 - 1
    w = seeder.world(
        package_options={"target": "T" * 20},
        signal=-(2**31),
        power=-(2**31),
        retry=-(2**31),
        interval=-(2**31),
    )
    # A size that does not exist is fine: E3 does not read the file.
    with engine.begin() as conn:
        conn.execute(update(packages).where(packages.c.id == w.package_id).values(size=limit))
    address = "a" * 25 + ":65535"
    with running_api(engine, seeder.blobs, clock, public_address=address) as (_, srv):
        request = sdk_request(
            "GET",
            f"/ota/south/check?type=1&version={'v' * 20}&cdn=true&dev_id={w.dev_id}",
            authorization=w.auth,
            extra=("Connection:close",),
        )
        reply = replay(srv, request)
    assert reply.header("Connection") == "close"
    assert json.loads(reply.body)["data"]["ipPort"] == address
    assert len(reply.raw) == 388  # the spec's own count (§6.3)


def test_keep_alive_client_runs_the_whole_flow_on_one_connection(
    world: tuple[Seeder, int, ServerThread],
) -> None:
    """D19: our own client reuses connections; the same bytes work pipelined on one socket."""
    seeder, dt_id, srv = world
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def exchange(request: bytes) -> bytes:
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += reader.read(1)
            length = re.search(rb"Content-Length: (\d+)", head)
            assert length is not None
            body = reader.read(int(length.group(1)))
            assert b"Connection" not in head  # nobody is closing
            return head + body

        token: bytes | None = None
        for path in REQUESTS:
            request = path.read_bytes()
            if token is not None:
                request = request.replace(b"abc123", token)
            raw = exchange(request)
            if "check_task" in path.name:
                token = json.loads(raw.split(b"\r\n\r\n", 1)[1])["data"]["token"].encode()
    assert seeder.state(dt_id) is TaskState.SUCCEEDED


@pytest.mark.parametrize("path", REQUESTS, ids=lambda p: p.name.split(".")[0])
def test_each_capture_alone_meets_the_wire_constraints(
    world: tuple[Seeder, int, ServerThread], path: Path
) -> None:
    """Every captured request, even out of order (errno replies and byte 3), stays canonical."""
    _, _, srv = world
    reply = replay(srv, path.read_bytes())
    assert reply.status == 200

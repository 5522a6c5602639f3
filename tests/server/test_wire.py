"""Canonical device-API responses (spec §2.5, §6.6.3, §6.6.4; D7, D26): the builders, and their
exact bytes as the project's HTTP layer writes them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol import values
from onenet_ota.protocol.download import DownloadError, decode_error_body
from onenet_ota.protocol.errno import Errno
from onenet_ota.server import wire
from onenet_ota.server.http import FileSegment, Request, Response
from onenet_ota.server.http.encoding import encode_head
from tests.server.seed import raw_exchange
from tests.serverthread import ServerThread

# -- builders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("errno", list(Errno))
def test_envelope_for_every_errno(errno: Errno) -> None:
    response = wire.envelope(errno)
    body = f'{{"errno":{int(errno)},"error":"{errno.text}"}}'.encode()
    assert response.status == 200
    assert response.headers == [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    assert response.body == body


def test_envelope_with_data_is_compact_and_ordered() -> None:
    response = wire.envelope(Errno.SUCC, {"b": 1, "a": "x y"})
    assert response.body == b'{"errno":0,"error":"succ","data":{"b":1,"a":"x y"}}'


def test_envelope_bodies_are_not_shared_mutable_state() -> None:
    first = wire.envelope(Errno.AUTH_FAILED)
    first.headers.append(("X", "y"))
    assert wire.envelope(Errno.AUTH_FAILED).headers[-1] == ("Content-Length", "33")


# Status line 17 + Content-Type 32 + "Content-Length: NNN" 21 + the longer Connection line
# ("Connection: keep-alive", for HTTP/1.0 clients) 24 + blank 2.
OVERHEAD = 96


def test_json_reply_allows_exactly_512_bytes_with_a_connection_line() -> None:
    response = wire.json_reply(b"x" * (512 - OVERHEAD))
    assert wire.response_size(response, closing=True) == 512
    with pytest.raises(wire.WireLimitError, match="512"):
        wire.json_reply(b"x" * (513 - OVERHEAD))


def test_download_206_headers_in_order_with_content_range_last() -> None:
    response = wire.download(
        file_name="fw.bin", length=10000, start=8192, end=9999, partial=True, body=b"\0" * 1808
    )
    assert response.status == 206
    assert response.headers == [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", "1808"),
        ("Content-Disposition", 'attachment; filename="fw.bin"'),
        ("Content-Range", "bytes 8192-9999/10000"),
    ]


def test_download_200_is_whole_file_without_content_range() -> None:
    segment = FileSegment("/nonexistent", 0, 100)
    response = wire.download(
        file_name="fw.bin", length=100, start=0, end=99, partial=False, body=segment
    )
    assert response.status == 200
    assert [name for name, _ in response.headers] == [
        "Content-Type",
        "Content-Length",
        "Content-Disposition",
    ]
    assert response.body is segment


def test_download_refuses_inconsistent_arguments() -> None:
    with pytest.raises(wire.WireLimitError):
        wire.download(file_name="f", length=100, start=0, end=9, partial=True, body=b"short")
    with pytest.raises(wire.WireLimitError, match="whole file"):
        wire.download(file_name="f", length=100, start=0, end=9, partial=False, body=b"0" * 10)


@pytest.mark.parametrize("code", list(DownloadError))
def test_download_error_is_one_raw_byte_in_one_chunk(code: DownloadError) -> None:
    response = wire.download_error(code)
    assert response.status == 200
    assert response.headers == [
        ("Content-Type", "application/octet-stream"),
        ("Transfer-Encoding", "chunked"),
    ]
    assert response.body == b"1\r\n" + bytes([code]) + b"\r\n0\r\n\r\n"
    assert isinstance(response.body, bytes)
    assert decode_error_body(response.body[3:4]) is code


def test_empty_replies() -> None:
    assert wire.empty(404) == Response(404, [("Content-Length", "0")])
    assert wire.empty(405, allow="GET") == Response(
        405, [("Content-Length", "0"), ("Allow", "GET")]
    )
    for status in (400, 413):
        assert wire.empty(status).body == b""
    with pytest.raises(ValueError, match="Allow"):
        wire.empty(405)
    with pytest.raises(ValueError, match="Allow"):
        wire.empty(404, allow="GET")
    with pytest.raises(ValueError, match="transport error"):
        wire.empty(500)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("firmware.bin", "firmware.bin"),
        ("a b~!.bin", "a b~!.bin"),
        ('a"b.bin', "ab.bin"),
        ("a\\b.bin", "ab.bin"),
        ("evil\r\nX: 1", "evilX: 1"),
        ("固件.bin", ".bin"),
        ("x" * 70, "x" * 64),
        ("", "package.bin"),
        ('"""', "package.bin"),
        ("   ", "   "),  # printable ASCII: valid per §4.5
        ("\t\n", "package.bin"),
    ],
)
def test_safe_file_name(name: str, safe: str) -> None:
    assert wire.safe_file_name(name) == safe


@given(st.text(max_size=100))
def test_safe_file_name_always_fits_the_format(name: str) -> None:
    assert values.is_file_name(wire.safe_file_name(name))


def test_header_count_keeps_room_for_connection() -> None:
    wire._check_header_count([("H", "v")] * 9)
    with pytest.raises(wire.WireLimitError):
        wire._check_header_count([("H", "v")] * 10)


# -- on the wire, through the project's HTTP layer -----------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """A server whose handler returns the wire builder named by the path."""
    path = tmp_path_factory.mktemp("wire") / "file.bin"
    data = bytes(range(256)) * 40
    path.write_bytes(data)

    async def handler(request: Request) -> Response:
        if request.path == "/json512":
            return wire.json_reply(b"x" * (512 - OVERHEAD))
        if request.path.startswith("/error/"):
            return wire.download_error(DownloadError(int(request.path[7:])))
        if request.path == "/range":
            return wire.download(
                file_name="file.bin",
                length=len(data),
                start=8192,
                end=len(data) - 1,
                partial=True,
                body=FileSegment(str(path), 8192, len(data) - 8192),
            )
        if request.path == "/errno":
            return wire.envelope(Errno.SUCC)
        return wire.empty(404)

    with ServerThread(handler) as srv:
        yield srv, path


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host:x", *extra]) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("request_bytes", "size"),
    [
        (get("/json512", "Connection: close"), 507),
        (b"GET /json512 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 512),  # the longest
    ],
    ids=["close", "http10-keep-alive"],
)
def test_512_byte_reply_with_a_connection_line_on_the_wire(
    server: tuple[ServerThread, Path], request_bytes: bytes, size: int
) -> None:
    srv, _ = server
    reply = raw_exchange(srv.port, request_bytes)
    assert len(reply.raw) == size
    assert [name for name, _ in reply.headers] == ["Content-Type", "Content-Length", "Connection"]


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6])
def test_error_byte_leaves_in_the_headers_segment(
    server: tuple[ServerThread, Path], code: int
) -> None:
    srv, _ = server
    reply = raw_exchange(srv.port, get(f"/error/{code}"))
    expected = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"1\r\n" + bytes([code]) + b"\r\n0\r\n\r\n"
    )
    assert len(expected) == 98
    assert reply.raw == expected
    assert reply.first_segment == expected


def test_error_reply_keeps_the_connection_usable(server: tuple[ServerThread, Path]) -> None:
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(get("/error/3") + get("/errno"))
        received = b""
        while not received.endswith(b'{"errno":0,"error":"succ"}'):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2


def test_connection_close_goes_before_content_range(server: tuple[ServerThread, Path]) -> None:
    srv, path = server
    reply = raw_exchange(srv.port, get("/range", "Connection: close"))
    assert [name for name, _ in reply.headers] == [
        "Content-Type",
        "Content-Length",
        "Content-Disposition",
        "Connection",
        "Content-Range",
    ]
    assert reply.body == path.read_bytes()[8192:]


@given(
    file_name=st.text(min_size=1, max_size=80),
    length=st.integers(min_value=1, max_value=10**12),
    data=st.data(),
)
def test_a_read_chunks_head_is_the_one_the_http_layer_encodes(
    file_name: str, length: int, data: st.DataObject
) -> None:
    """A partial download reply read now carries its keep-alive head, built from a per-file
    start and its Content-Range line: byte for byte what the HTTP layer would encode."""
    start = data.draw(st.integers(min_value=0, max_value=length - 1))
    end = data.draw(st.integers(min_value=start, max_value=min(length - 1, start + 300)))
    body = bytes(end - start + 1)
    reply = wire.download(
        file_name=file_name, length=length, start=start, end=end, partial=True, body=body
    )
    assert reply.keep_alive_head == encode_head(reply, len(body), False)[0]
    whole = wire.download(
        file_name=file_name,
        length=length,
        start=0,
        end=length - 1,
        partial=False,
        body=FileSegment("/x", 0, length),
    )
    assert whole.keep_alive_head is None  # encoded by the layer (once, if sent again)


@given(
    body=st.binary(max_size=400),
    content_type=st.sampled_from(["application/json", "application/json;charset=UTF-8"]),
)
def test_a_json_replys_head_is_the_one_the_http_layer_encodes(
    body: bytes, content_type: str
) -> None:
    """Every JSON reply carries its keep-alive head, cached by type and length: byte for byte
    what the HTTP layer would encode for it."""
    reply = wire.json_reply(body, content_type)
    assert reply.keep_alive_head == encode_head(reply, len(body), False)[0]

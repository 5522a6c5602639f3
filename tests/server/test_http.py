"""The HTTP/1.1 layer over real loopback sockets: exact bytes, framing, connections, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import resource
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx2
import pytest
import trustme
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onenet_ota.server import http, wire
from onenet_ota.server.http import (
    C_SDK_CIPHERS,
    BodyTooLarge,
    FileSegment,
    HttpServer,
    Limits,
    Request,
    RequestAborted,
    Response,
    Stream,
    make_server_ssl_context,
    serve,
)
from onenet_ota.server.http.connection import TRANSITIONS, Connection, State, StateError
from onenet_ota.server.http.encoding import encode_head
from onenet_ota.server.http.models import parse_query
from tests.captures import CAPTURES, FIRMWARE
from tests.serverthread import ServerThread

CANONICAL_JSON = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 26\r\n"
    b"\r\n"
    b'{"errno":0,"error":"succ"}'
)
# §6.6.4: the exact 98 bytes of the code-3 download error (D7)
ERROR_3 = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"1\r\n\x03\r\n0\r\n\r\n"
)
LAST_CHUNK = (
    b"HTTP/1.1 206 Partial Content\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Length: 1808\r\n"
    b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
    b"Content-Range: bytes 8192-9999/10000\r\n"
    b"\r\n"
)
ERROR_3_RESPONSE = Response(
    200,
    [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    b"1\r\n\x03\r\n0\r\n\r\n",
)


def json_response(payload: object, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body
    )


def download_response(segment: FileSegment, size: int = 10000) -> Response:
    last = segment.offset + segment.length - 1
    return Response(
        206,
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(segment.length)),
            ("Content-Disposition", 'attachment; filename="firmware.bin"'),
            ("Content-Range", f"bytes {segment.offset}-{last}/{size}"),
        ],
        segment,
    )


@dataclass
class Recorder:
    """What the handler saw, for assertions from the test thread."""

    requests: list[Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)


# One object for every request to /shared, as the device API returns its memoised replies.
SHARED_JSON = Response(
    200,
    [("Content-Type", "application/json"), ("Content-Length", "26")],
    b'{"errno":0,"error":"succ"}',
)


async def app(request: Request, rec: Recorder) -> Response:
    """The test application: one behaviour per path."""
    rec.requests.append(request)
    path = request.path
    if path == "/json":
        return Response(
            200,
            [("Content-Type", "application/json"), ("Content-Length", "26")],
            b'{"errno":0,"error":"succ"}',
        )
    if path == "/error3":
        return ERROR_3_RESPONSE
    if path == "/shared":
        return SHARED_JSON
    if path == "/last-chunk":
        return download_response(FileSegment(str(FIRMWARE), 8192, 1808))
    if path == "/headers":
        # the response headers come from the query, in order and casing: ?h=Name:value&h=...
        headers = [
            (item.split(":", 1)[0], item.split(":", 1)[1])
            for key, item in parse_qsl(request.query_string)
            if key == "h"
        ]
        return Response(200, [*headers, ("Content-Length", "2")], b"ok")
    if path == "/exact":  # every response header from the query, in order: ?h=Name:value
        headers = [
            (item.split(":", 1)[0], item.split(":", 1)[1])
            for key, item in parse_qsl(request.query_string)
            if key == "h"
        ]
        return Response(200, headers, b"ok")
    if path == "/echo":
        body = await request.body(1 << 20)
        rec.bodies.append(body)
        return json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": request.headers,
                "length": len(body),
                "content_length": request.content_length,
            }
        )
    if path == "/limited":  # the 413 path of a JSON endpoint (§4.3)
        if request.content_length is not None and request.content_length > 4096:
            return Response.empty(413)
        try:
            body = await request.body(4096)
        except BodyTooLarge:
            return Response.empty(413)
        return json_response({"length": len(body)})
    if path == "/refuse-later":  # an early 413, once released, without reading the body
        rec.entered.set()
        await asyncio.to_thread(rec.release.wait, 30)
        return Response.empty(413)
    if path == "/ignore-body":
        return json_response({"i": request.query.get("i")})
    if path == "/stream":
        rec.entered.set()
        await asyncio.to_thread(rec.release.wait, 30)
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
        return json_response({"size": size, "sha256": digest.hexdigest(), "chunks": chunks})
    if path == "/boom":
        raise RuntimeError("secret-detail-from-the-handler")
    if path == "/not-a-response":
        return None  # type: ignore[return-value]
    if path == "/injection":
        return Response(200, [("X-Evil", "a\r\nSet-Cookie: x"), ("Content-Length", "0")])
    if path == "/bad-status":
        return Response(42, [("Content-Length", "0")])
    if path == "/bad-length":
        return Response(200, [("Content-Length", "5")], b"abc")
    if path == "/close-delimited":
        return Response(200, [("Content-Type", "text/plain")], b"until-eof")
    if path == "/file":
        offset = int(request.query.get("offset", "0"))
        length = int(request.query.get("length", "0"))
        file = request.query.get("path", str(FIRMWARE))
        fallback = ERROR_3_RESPONSE if request.query.get("fallback") else None
        return download_response(FileSegment(file, offset, length, fallback), size=length)
    if path == "/slow":
        rec.entered.set()
        await asyncio.to_thread(rec.release.wait, 30)
        return json_response({"slow": True})
    if path == "/forever":
        rec.entered.set()
        await asyncio.Event().wait()
    return Response.empty(404)


def make_handler(rec: Recorder) -> Callable[[Request], object]:
    async def handler(request: Request) -> Response:
        return await app(request, rec)

    return handler


@pytest.fixture(scope="module")
def module_server() -> Iterator[tuple[ServerThread, Recorder]]:
    rec = Recorder()
    with ServerThread(make_handler(rec)) as server:  # type: ignore[arg-type]
        yield server, rec


@pytest.fixture(scope="module")
def shared(module_server: tuple[ServerThread, Recorder]) -> ServerThread:
    """The module's server alone (hypothesis prints its arguments; keep them short)."""
    return module_server[0]


@pytest.fixture
def server(module_server: tuple[ServerThread, Recorder]) -> ServerThread:
    module_server[1].requests.clear()
    module_server[1].bodies.clear()
    return module_server[0]


@pytest.fixture
def rec(module_server: tuple[ServerThread, Recorder]) -> Recorder:
    return module_server[1]


# ---------------------------------------------------------------------------------------------
# A raw client that reads responses off a socket without hiding anything


@dataclass
class Parsed:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes


class RawClient:
    def __init__(self, server: ServerThread, *, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection((server.host, server.port), timeout=10)
        self.buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed after {self.buffer!r}")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before {marker!r} in {self.buffer!r}")
            self.buffer += chunk
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def response(self) -> Parsed:
        """One framed response (Content-Length or chunked), parsed strictly."""
        head = self.read_until(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, code, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        assert reason
        headers = []
        for line in lines:
            name, sep, value = line.partition(": ")
            assert sep, f"not canonical: {line!r}"
            headers.append((name, value))
        fields = {name.lower(): value for name, value in headers}
        if "content-length" in fields:
            body = self.read_exact(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.read_until(b"\r\n")[:-2], 16)
                body += self.read_exact(size)
                assert self.read_exact(2) == b"\r\n"
                if size == 0:
                    break
        else:
            raise AssertionError(f"unframed response: {head!r}")
        raw = head + (body if "content-length" in fields else _chunked(body))
        return Parsed(int(code), headers, body, raw)

    def closed(self) -> bool:
        """True once the server has closed (reads EOF; a reset counts as closed)."""
        if self.buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def _chunked(body: bytes) -> bytes:
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost:ota.heclouds.com\r\n{extra}\r\n".encode()


def header_names(parsed: Parsed) -> list[str]:
    return [name for name, _ in parsed.headers]


header_name = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1
).filter(lambda n: n.lower() not in {"content-length", "transfer-encoding", "connection", "expect"})
header_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=30
)
spaces = st.text(alphabet=" \t", max_size=4)


# ---------------------------------------------------------------------------------------------
# Exact response bytes (§2.5, D26)


def test_canonical_json_response_bytes(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(get("/json"))  # and the connection stays usable
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_download_response_bytes_keep_content_range_last(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/last-chunk"))
        assert client.read_exact(len(LAST_CHUNK)) == LAST_CHUNK
        assert client.read_exact(1808) == FIRMWARE.read_bytes()[8192:]


def test_connection_close_goes_before_content_range(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/last-chunk", "Connection: close\r\n"))
        expected = (
            LAST_CHUNK.replace(b"Content-Range:", b"Connection: close\r\nContent-Range:")
            + FIRMWARE.read_bytes()[8192:]
        )
        assert client.read_exact(len(expected)) == expected
        assert client.closed()


def test_connection_close_goes_last_without_content_range(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/json", "Connection: close\r\n"))
        expected = CANONICAL_JSON.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        assert client.read_exact(len(expected)) == expected
        assert client.closed()


def with_connection(response: bytes, value: bytes) -> bytes:
    """``response`` with ``Connection: <value>`` where the layer puts it (before Content-Range)."""
    line = b"Connection: " + value + b"\r\n"
    if b"\r\nContent-Range:" in response:
        return response.replace(b"\r\nContent-Range:", b"\r\n" + line + b"Content-Range:", 1)
    return response.replace(b"\r\n\r\n", b"\r\n" + line + b"\r\n", 1)


def test_http10_without_keep_alive_closes(server: ServerThread) -> None:
    # §8.2 item 1: HTTP/1.1 in the status line, whatever the peer speaks
    expected = with_connection(CANONICAL_JSON, b"close")
    with RawClient(server) as client:
        client.send(b"GET /json HTTP/1.0\r\n\r\n")
        assert client.read_exact(len(expected)) == expected
        assert client.closed()


@pytest.mark.parametrize("token", ["keep-alive", "Keep-Alive"])
def test_http10_keep_alive_is_announced_and_kept(server: ServerThread, token: str) -> None:
    """RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only if the response says so."""
    expected = with_connection(CANONICAL_JSON, b"keep-alive")
    with RawClient(server) as client:
        for _ in range(2):  # the second request is answered on the same connection
            client.send(f"GET /json HTTP/1.0\r\nConnection: {token}\r\n\r\n".encode())
            assert client.read_exact(len(expected)) == expected
        client.send(b"GET /json HTTP/1.0\r\n\r\n")  # and without keep-alive, it closes
        closing = with_connection(CANONICAL_JSON, b"close")
        assert client.read_exact(len(closing)) == closing
        assert client.closed()


def test_http10_keep_alive_goes_before_content_range(server: ServerThread) -> None:
    """§6.6.3/D8: whatever the layer adds, Content-Range stays the last header."""
    with RawClient(server) as client:
        for _ in range(2):
            client.send(b"GET /last-chunk HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            expected = with_connection(LAST_CHUNK, b"keep-alive") + FIRMWARE.read_bytes()[8192:]
            assert client.read_exact(len(expected)) == expected
            assert expected.index(b"Connection: keep-alive\r\nContent-Range: ") > 0


def test_a_response_sent_again_keeps_its_bytes_in_every_mode(server: ServerThread) -> None:
    """One Response object returned for many requests (as the device API's memoised replies and
    cached chunks are) has its keep-alive HTTP/1.1 head encoded once and remembered; the other
    modes (HTTP/1.0 keep-alive, closing) still get their Connection header, and the remembered
    head never carries one."""
    with RawClient(server) as client:
        for _ in range(2):
            client.send(get("/shared"))
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        assert (
            SHARED_JSON.keep_alive_head == CANONICAL_JSON[: CANONICAL_JSON.index(b"\r\n\r\n") + 4]
        )
        kept = with_connection(CANONICAL_JSON, b"keep-alive")
        client.send(b"GET /shared HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert client.read_exact(len(kept)) == kept
        client.send(get("/shared"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        closing = with_connection(CANONICAL_JSON, b"close")
        client.send(get("/shared", "Connection: close\r\n"))
        assert client.read_exact(len(closing)) == closing
        assert client.closed()


def test_http11_is_unchanged_by_keep_alive_requests(server: ServerThread) -> None:
    """HTTP/1.1 is persistent by default: no Connection header is added (D26)."""
    with RawClient(server) as client:
        client.send(get("/json", "Connection: keep-alive\r\n"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(get("/last-chunk", "Connection: keep-alive\r\n"))
        assert client.read_exact(len(LAST_CHUNK)) == LAST_CHUNK
        assert client.read_exact(1808) == FIRMWARE.read_bytes()[8192:]


def test_http10_keep_alive_with_a_chunked_body_closes(server: ServerThread) -> None:
    """HTTP/1.0 has no chunked coding: such a client can only find the end at the close."""
    with RawClient(server) as client:
        client.send(b"GET /error3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while chunk := client.sock.recv(4096):
            data += chunk
        assert data == with_connection(ERROR_3, b"close")


def test_http10_keep_alive_respects_a_handler_connection_header(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(
            b"GET /headers?h=Connection:keep-alive HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        assert client.response().headers == [("Connection", "keep-alive"), ("Content-Length", "2")]
        client.send(b"GET /json HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert client.response().body == b'{"errno":0,"error":"succ"}'


def test_http10_keep_alive_json_reply_stays_within_512_bytes() -> None:
    """§8.2 item 4: the largest JSON reply wire.json_reply allows, plus the keep-alive line."""
    largest = next(n for n in range(512, 0, -1) if _json_reply_fits(n))

    async def handler(request: Request) -> Response:
        return wire.json_reply(b"x" * largest)

    with ServerThread(handler) as srv, RawClient(srv) as client:
        for request in (
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
        ):
            client.send(request)
            response = client.response()
            assert len(response.raw) <= 512
    assert largest > 400  # real replies (at most 388 bytes, §6.3) still fit with room to spare


def _json_reply_fits(size: int) -> bool:
    try:
        wire.json_reply(b"x" * size)
    except wire.WireLimitError:
        return False
    return True


def test_header_casing_and_order_are_kept(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/headers?h=x-lower:1&h=X-UPPER:2&h=Content-Type:a/b&h=x-lower:3"))
        response = client.response()
        assert response.headers == [
            ("x-lower", "1"),
            ("X-UPPER", "2"),
            ("Content-Type", "a/b"),
            ("x-lower", "3"),
            ("Content-Length", "2"),
        ]
        assert b"Date" not in response.raw
        assert b"Server" not in response.raw


response_header_name = st.one_of(
    st.sampled_from(["Content-Type", "Content-Range", "content-range", "X-Ota", "Allow"]),
    header_name,
)
response_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20
).map(str.strip)


def _parse_qsl_first(query: str) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        parsed.setdefault(key, value)
    return parsed


@settings(max_examples=300, deadline=None)
@given(query=st.text(alphabet="ab=&%+2041;é ", max_size=24))
def test_query_parse_is_parse_qsl_with_the_first_value_winning(query: str) -> None:
    """Request.query splits a query without escapes itself: the same parameters as parse_qsl
    (blank values kept, empty fields skipped, ``;`` no separator), the first name winning."""
    assert parse_query(query) == _parse_qsl_first(query)


@pytest.mark.parametrize(
    "query",
    ["", "&", "a", "a=", "=b", "a=1&a=2", "a=1&&b", "a==1", "a=1;b=2", "a=%41", "a+b=c+d", "x=%"],
)
def test_query_parse_examples(query: str) -> None:
    assert parse_query(query) == _parse_qsl_first(query)


# (request version, the request's Connection header or None)
CLIENT_KINDS = [("1.1", None), ("1.1", "close"), ("1.0", None), ("1.0", "keep-alive")]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(response_header_name, response_header_value), max_size=8),
    length_at=st.integers(min_value=0, max_value=8),
    kind=st.sampled_from(CLIENT_KINDS),
)
def test_serialisation_model(
    shared: ServerThread,
    headers: list[tuple[str, str]],
    length_at: int,
    kind: tuple[str, str | None],
) -> None:
    """D26 as a property: the status line, then the handler's headers verbatim and in order,
    then nothing added but ``Connection: close`` when closing or ``Connection: keep-alive``
    when an HTTP/1.0 connection stays open, placed before the (last) Content-Range and Studio's
    Content-Range-Start/End right before it (§12.3), or else at the end; then the body, in one
    piece. A kept connection answers the next request."""
    version, connection = kind
    close = connection == "close" or (version == "1.0" and connection is None)
    headers = list(headers)
    headers.insert(min(length_at, len(headers)), ("Content-Length", "2"))
    query = "&".join("h=" + quote(f"{name}:{value}", safe="") for name, value in headers)
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    added = "close" if close else "keep-alive" if version == "1.0" else None
    if added is not None:
        ranges = [i for i, (name, _) in enumerate(headers) if name.lower() == "content-range"]
        at = ranges[-1] if ranges else len(lines)
        prefix = ("content-range-start", "content-range-end")  # Studio's, §12.3
        while ranges and at > 0 and headers[at - 1][0].lower() in prefix:
            at -= 1
        lines.insert(at, f"Connection: {added}\r\n")
    expected = ("HTTP/1.1 200 OK\r\n" + "".join(lines) + "\r\n").encode() + b"ok"
    extra = "" if connection is None else f"Connection: {connection}\r\n"
    with RawClient(shared) as client:
        client.send(f"GET /exact?{query} HTTP/{version}\r\n{extra}\r\n".encode())
        assert client.read_exact(len(expected)) == expected
        if close:
            assert client.closed()
        else:
            client.send(f"GET /json HTTP/{version}\r\n{extra}\r\n".encode())
            assert client.response().body == b'{"errno":0,"error":"succ"}'


def test_one_write_delivers_headers_and_error_byte(server: ServerThread) -> None:
    """D7: the code byte must be in the first segment; read what one recv() returns."""
    for _ in range(20):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(get("/error3"))
            assert sock.recv(4096) == ERROR_3


def test_one_write_is_one_transport_write(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same property without a race: count the layer's writes."""
    writes: list[bytes] = []
    original = Connection.write

    def spy(self: Connection, data: bytes) -> None:
        writes.append(data)
        original(self, data)

    monkeypatch.setattr(Connection, "write", spy)
    with RawClient(server) as client:
        for path, expected in [
            ("/error3", ERROR_3),
            ("/json", CANONICAL_JSON),
            ("/last-chunk", LAST_CHUNK + FIRMWARE.read_bytes()[8192:]),
        ]:
            writes.clear()
            client.send(get(path))
            assert client.read_exact(len(expected)) == expected
            assert writes == [expected]


def test_content_length_mismatch_becomes_500(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/bad-length"))
        response = client.response()
        assert response.raw == b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("path", ["/not-a-response", "/injection", "/bad-status"])
def test_unusable_handler_response_becomes_500(server: ServerThread, path: str) -> None:
    with RawClient(server) as client:
        client.send(get(path))
        response = client.response()
        assert response.raw == b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
        client.send(get("/json"))  # the connection survives
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_close_delimited_body_closes_the_connection(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/close-delimited"))
        data = b""
        while chunk := client.sock.recv(4096):
            data += chunk
        assert data == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil-eof"
        )


# ---------------------------------------------------------------------------------------------
# Request parsing (§2.4, §8.1)


@pytest.mark.parametrize("capture", sorted(CAPTURES.glob("*.request.bin")), ids=lambda p: p.name)
def test_c_sdk_capture_parses(server: ServerThread, rec: Recorder, capture: Path) -> None:
    raw = capture.read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode().split("\r\n")
    method, target, _ = request_line.split(" ")
    expected_headers = [
        (line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in header_lines
    ]
    with RawClient(server) as client:
        client.send(raw)
        assert client.response().status == 404  # the test app knows none of these paths
    request = rec.requests[-1]
    assert request.method == method
    assert request.target == target
    assert request.path == target.partition("?")[0]
    assert request.query_string == target.partition("?")[2]
    assert request.headers == expected_headers
    assert request.header("authorization") == request.header("Authorization")
    assert request.http_version == "1.1"
    assert request.content_length == (len(body) if method == "POST" else None)
    if "?" in target:
        assert request.query["dev_id"] == "987654321"


def test_c_sdk_capture_body_is_read(server: ServerThread, rec: Recorder) -> None:
    raw = (CAPTURES / "01_post_version.request.bin").read_bytes()
    raw = raw.replace(b"/ota/device/version", b"/echo", 1)
    with RawClient(server) as client:
        client.send(raw)
        seen = json.loads(client.response().body)
    assert seen["length"] == 41
    assert seen["content_length"] == 41  # from the padded "Content-Length:     41"
    assert rec.bodies == [b'{"f_version":"1.0.0","s_version":"1.0.0"}']


def test_c_sdk_one_request_per_connection(server: ServerThread) -> None:
    """§2.3: the C SDK sends one request per connection and closes after the response."""
    for capture in sorted(CAPTURES.glob("*.request.bin")):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(capture.read_bytes())
            assert sock.recv(4096).startswith(b"HTTP/1.1 404 Not Found\r\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(header_name, spaces, header_value, spaces), max_size=8),
    content_length_padding=st.text(alphabet=" ", max_size=8),
    body=st.binary(max_size=64),
)
def test_tolerant_header_forms(
    shared: ServerThread,
    headers: list[tuple[str, str, str, str]],
    content_length_padding: str,
    body: bytes,
) -> None:
    """§2.4: ``Name:value``, extra spaces, padded Content-Length; values come out stripped."""
    server = shared
    lines = "".join(f"{name}:{pre}{value}{post}\r\n" for name, pre, value, post in headers)
    raw = (
        f"POST /echo?a=1 HTTP/1.1\r\n{lines}"
        f"Content-Length:{content_length_padding}{len(body)}\r\n\r\n"
    ).encode() + body
    with RawClient(server) as client:
        client.send(raw)
        seen = json.loads(client.response().body)
    assert seen["headers"][:-1] == [[name, value] for name, _, value, _ in headers]
    assert seen["length"] == seen["content_length"] == len(body)


def test_absolute_form_target(server: ServerThread, rec: Recorder) -> None:
    with RawClient(server) as client:
        client.send(get("http://ota.heclouds.com/json?x=1"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    assert rec.requests[-1].path == "/json"
    assert rec.requests[-1].query == {"x": "1"}


# ---------------------------------------------------------------------------------------------
# Transport-level errors (§4.3)

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",  # head over max_header_bytes
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n",  # more than max_headers
    ],
    ids=["words", "tls", "bad-length", "two-lengths", "no-colon", "huge-head", "many-headers"],
)
def test_invalid_http_is_400_and_close(server: ServerThread, garbage: bytes) -> None:
    with RawClient(server) as client:
        client.send(garbage)
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


def test_requests_before_garbage_are_answered_first(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/json") + b"garbage\r\n\r\n")
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


def test_broken_chunked_body_is_400(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
        )
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


def test_handler_exception_is_500_without_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="onenet_ota.server.http")
    with RawClient(server) as client:
        client.send(get("/boom"))
        response = client.response()
        assert response.raw == b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
        client.send(get("/json"))  # the connection survives
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    assert any(
        record.exc_info and "secret-detail" in str(record.exc_info[1]) for record in caplog.records
    ), "the traceback is logged server-side"


def test_download_tokens_are_masked_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        raise RuntimeError("boom")

    caplog.set_level(logging.ERROR, logger="onenet_ota.server.http")
    with ServerThread(handler) as srv, RawClient(srv) as client:
        client.send(get("/ota/south/download/ota_3fQ9cZr0LmT7wXa2bN5k/check?dev_id=1"))
        assert client.response().status == 500
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/ota/south/download/***/check" in text
    assert "ota_3fQ9cZr0LmT7wXa2bN5k" not in text


# ---------------------------------------------------------------------------------------------
# Bodies: limits, draining, streaming with flow control


PAYLOAD_TOO_LARGE = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


def test_413_before_reading_closes_when_much_is_left(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(b"POST /limited HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        response = client.response()
        assert response.raw == PAYLOAD_TOO_LARGE
        assert client.closed()


class _Sender(threading.Thread):
    """Sends up to ``size`` bytes on ``sock`` from a thread until stopped; records how far it
    got and how it ended. It never blocks for long, so :meth:`pause` returns promptly."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.size = size
        self.sent = 0
        self.error: OSError | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        block = memoryview(b"u" * (64 * 1024))
        try:
            while self.sent < self.size and not self._halt.is_set():
                _, writable, _ = select.select([], [self.sock], [], 0.05)
                if writable:
                    self.sent += self.sock.send(block[: self.size - self.sent])
        except OSError as exc:  # the server stopped reading and closed
            self.error = exc

    def wait_sent(self, amount: int) -> None:
        for _ in range(1000):
            if self.sent >= amount or not self.is_alive():
                break
            time.sleep(0.01)
        assert self.sent >= amount, f"only {self.sent} bytes sent ({self.error})"

    def pause(self) -> None:
        self._halt.set()
        self.join(10)


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything until end-of-file; a reset fails the test with what had arrived."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            raise AssertionError(f"reset instead of end-of-file after {data!r}") from None
        if not chunk:
            return data
        data += chunk


def test_413_is_read_whole_while_the_client_is_still_sending(
    server: ServerThread, rec: Recorder
) -> None:
    """The lingering close: the server half-closes after an early 413 and drops what still
    comes, so the client reads the response and a clean end-of-file, never a reset.

    The upload fills the socket buffers (the handler reads nothing, so the layer stops reading
    past buffer_limit) before the 413 is released: unread bytes sit in the server's socket,
    where a plain close sends a reset instead of end-of-file. The sender then holds still, as
    a client blocked mid-body does, because on Linux a concurrent send can take the reset's
    error and leave the reader a plain end-of-file.
    """
    size = 64 * 1024 * 1024
    rec.release.clear()
    rec.entered.clear()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /refuse-later HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
        sender = _Sender(sock, size)
        sender.start()
        try:
            assert rec.entered.wait(10)
            sender.wait_sent(1024 * 1024)  # several times buffer_limit: the rest is unread
            sender.pause()
            assert sender.error is None
            rec.release.set()
            assert _read_to_eof(sock) == PAYLOAD_TOO_LARGE
        finally:
            rec.release.set()
            sender.pause()


def test_lingering_is_bounded() -> None:
    """A client that never stops sending is cut off after LINGER_BYTES (or LINGER_SECONDS):
    its upload fails long before the end, after it could read the whole 413."""
    size = 256 * 1024 * 1024  # far past LINGER_BYTES plus every socket buffer on the way

    async def handler(request: Request) -> Response:
        return Response.empty(413)

    with (
        ServerThread(handler) as srv,
        socket.create_connection((srv.host, srv.port), timeout=30) as sock,
    ):
        sock.sendall(b"PUT /up HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
        sender = _Sender(sock, size)
        sender.start()
        sender.join(60)
        assert not sender.is_alive()
        assert isinstance(sender.error, (BrokenPipeError, ConnectionResetError))
        assert sender.sent < size // 2
        assert sock.recv(4096) == PAYLOAD_TOO_LARGE


def test_endless_header_line_is_400(server: ServerThread) -> None:
    """max_header_bytes holds for a header line that never ends (httptools keeps an unfinished
    line in memory and reports it only at its end), and the 400 reaches the still-sending
    client, followed by end-of-file."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Endless: ")
        sender = _Sender(sock, 8 * 1024 * 1024)
        sender.start()
        try:
            assert _read_to_eof(sock) == BAD_REQUEST
        finally:
            sender.pause()


def test_unread_small_body_is_drained_and_connection_reused(server: ServerThread) -> None:
    with RawClient(server) as client:
        body = b"y" * 5000
        client.send(b"POST /limited HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + body)
        assert client.response().raw == (
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"
        )
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_chunked_body_over_limit_raises_body_too_large(server: ServerThread) -> None:
    chunk = b"z" * 1000
    chunks = b"".join(b"3e8\r\n" + chunk + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    with RawClient(server) as client:
        client.send(b"POST /limited HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        assert client.response().status == 413


def test_chunked_body_is_decoded(server: ServerThread, rec: Recorder) -> None:
    with RawClient(server) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        seen = json.loads(client.response().body)
    assert seen["content_length"] is None
    assert rec.bodies == [b"hello world"]


def test_expect_100_continue(server: ServerThread, rec: Recorder) -> None:
    with RawClient(server) as client:
        client.send(b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert client.read_exact(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"data")
        assert client.response().status == 200
    assert rec.bodies == [b"data"]


def test_large_upload_streams_with_flow_control(server: ServerThread, rec: Recorder) -> None:
    """While the handler does not read, the server stops reading: the client's sends stall.

    Without flow control the server would buffer the whole upload and the client could send
    all of it before the handler reads a byte.
    """
    total = 32 * 1024 * 1024  # the stall comes after about 5 MiB of kernel and server buffers
    block = os.urandom(1024 * 1024)
    rec.release.clear()
    rec.entered.clear()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    try:
        sock.sendall(f"POST /stream HTTP/1.1\r\nContent-Length: {total}\r\n\r\n".encode())
        assert rec.entered.wait(10)
        sock.setblocking(False)
        sent = 0
        view = memoryview(block)
        while sent < total:
            _, writable, _ = select.select([], [sock], [], 1.0)
            if not writable:
                break  # stalled: the server stopped reading
            try:
                sent += sock.send(view[sent % len(block) :])
            except BlockingIOError:
                continue
        stalled_at = sent
        assert stalled_at < total // 2
        rec.release.set()
        sock.setblocking(True)
        digest = hashlib.sha256()
        digest.update(block * (total // len(block)))
        while sent < total:
            start = sent % len(block)
            sock.sendall(block[start:])
            sent += len(block) - start
        client = RawClient(server, sock=sock)
        result = json.loads(client.response().body)
    finally:
        sock.close()
        rec.release.set()
    assert result["size"] == total
    assert result["sha256"] == digest.hexdigest()
    assert result["chunks"] > 1  # consumed chunk by chunk, never as one buffer


# ---------------------------------------------------------------------------------------------
# Connections: keep-alive, pipelining, limits, timeouts


def test_keep_alive_reuses_one_connection(server: ServerThread, rec: Recorder) -> None:
    with httpx2.Client(base_url=server.url) as client:
        for _ in range(5):
            assert client.get("/json").json() == {"errno": 0, "error": "succ"}
    assert len({request.peer for request in rec.requests}) == 1


def test_pipelined_requests_are_answered_in_order(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(b"".join(get(f"/ignore-body?i={i}") for i in range(10)))
        for i in range(10):
            assert json.loads(client.response().body) == {"i": str(i)}


@dataclass
class Wire:
    """What one server-side connection received and wrote, call by call."""

    reads: int = 0
    writes: list[bytes] = field(default_factory=list)


class _CountedWrites:
    """A transport that records each write, then hands everything to the real one."""

    def __init__(self, transport: asyncio.Transport, wire: Wire) -> None:
        self._transport = transport
        self._wire = wire

    def write(self, data: bytes) -> None:
        self._wire.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def watch_one_connection(srv: ServerThread, sock: socket.socket) -> Wire:
    """Count the reads (data_received) and transport writes of the server's only connection,
    ``sock``'s: wrapped on the server's loop before the client sends anything."""
    assert srv.server is not None
    wire = Wire()
    ready = threading.Event()

    def install() -> None:
        assert srv.server is not None
        if not srv.server.connections:
            srv.loop.call_later(0.01, install)  # connection_made has not run yet
            return
        (conn,) = srv.server.connections
        transport = conn._transport
        assert transport is not None
        received = conn.data_received

        def counted_read(data: bytes) -> None:
            wire.reads += 1
            received(data)

        conn.data_received = counted_read  # type: ignore[method-assign]
        # The connection's own reference is replaced: uvloop's transports are C objects whose
        # methods cannot be patched.
        conn._transport = _CountedWrites(transport, wire)  # type: ignore[assignment]
        ready.set()

    assert sock.getpeername()  # connected
    srv.loop.call_soon_threadsafe(install)
    assert ready.wait(10)
    return wire


def test_pipelined_responses_answered_in_one_read_leave_in_one_write() -> None:
    """Responses to pipelined requests answered within one read of the socket are gathered
    and sent together (one send, one wake-up of the client), complete and in order."""
    rec = Recorder()
    # On asyncio's loop: the reads are counted by replacing the protocol's data_received, which
    # uvloop calls through a reference it took when the connection was made. The gathering is
    # the layer's own, the same on either loop.
    server = ServerThread(make_handler(rec), loop_factory=asyncio.new_event_loop)  # type: ignore[arg-type]
    with server as srv, RawClient(srv) as client:
        wire = watch_one_connection(srv, client.sock)
        client.send(b"".join(get(f"/ignore-body?i={i}") for i in range(10)))
        for i in range(10):
            assert json.loads(client.response().body) == {"i": str(i)}
        client.send(get("/json"))  # and a lone request after them
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    assert 2 <= len(wire.writes) <= wire.reads
    assert len(wire.writes) < 11


def test_pipelined_responses_around_a_sendfile_segment_arrive_complete_and_in_order(
    tmp_path: Path,
) -> None:
    """A large file segment (sent with sendfile, past the gathered writes) between small
    responses: every byte arrives, in request order."""
    big = tmp_path / "big.bin"
    data = os.urandom(300 * 1024)
    big.write_bytes(data)
    rec = Recorder()
    segment = f"/file?path={quote(str(big))}&offset=1000&length={200 * 1024}"
    small = "/file?offset=0&length=100"
    requests = [get("/ignore-body?i=0"), get(small), get(segment), get("/ignore-body?i=3")]
    requests += [get(segment), get("/json")]
    with ServerThread(make_handler(rec)) as srv, RawClient(srv) as client:  # type: ignore[arg-type]
        client.send(b"".join(requests))
        assert json.loads(client.response().body) == {"i": "0"}
        assert client.response().body == FIRMWARE.read_bytes()[:100]
        assert client.response().body == data[1000 : 1000 + 200 * 1024]
        assert json.loads(client.response().body) == {"i": "3"}
        assert client.response().body == data[1000 : 1000 + 200 * 1024]
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_pipelined_responses_reach_a_client_that_half_closes_after_sending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that sends its pipelined requests and shuts its sending side gets every
    response, gathered, then the end of the stream; one that resets the connection after its
    first response costs the server nothing but the connection."""
    rec = Recorder()
    with ServerThread(make_handler(rec)) as srv:  # type: ignore[arg-type]
        with RawClient(srv) as client:
            client.send(b"".join(get(f"/ignore-body?i={i}") for i in range(5)))
            client.sock.shutdown(socket.SHUT_WR)
            for i in range(5):
                assert json.loads(client.response().body) == {"i": str(i)}
            assert client.closed()
        with RawClient(srv) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            many = [get("/file?offset=0&length=9000") for _ in range(50)]
            client.send(b"".join(many))
            assert client.response().body == FIRMWARE.read_bytes()[:9000]
        # closed with a reset, most responses unread
        with RawClient(srv) as client:
            client.send(get("/json"))
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_response_gathered_before_an_aborted_one_still_arrives() -> None:
    """A response that fails after its head (an invalid streamed response) aborts the
    connection; the pipelined response answered before it, in the same read, arrives whole."""

    async def handler(request: Request) -> Response:
        if request.path == "/bad-stream":

            async def chunks() -> AsyncIterator[bytes]:
                yield b"never"

            return Response(200, [("X-Evil", "a\r\nb")], Stream(chunks()))
        return Response(200, [("Content-Length", "2")], b"ok")

    with ServerThread(handler) as srv, RawClient(srv) as client:
        client.send(get("/first") + get("/bad-stream"))
        assert client.response().body == b"ok"
        assert client.closed()


def test_connection_closes_after_1000_requests(server: ServerThread) -> None:
    """D19: the 1000th response carries Connection: close; nothing after it is answered."""
    with RawClient(server) as client:
        client.send(get("/json") * 1001)
        for _ in range(999):
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        last = CANONICAL_JSON.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        assert client.read_exact(len(last)) == last
        assert client.closed()


def test_max_requests_option() -> None:
    async def handler(request: Request) -> Response:
        return Response.empty(204)

    with ServerThread(handler, limits=Limits(max_requests=2)) as srv, RawClient(srv) as client:
        client.send(get("/") * 2)
        assert client.response().headers == [("Content-Length", "0")]
        assert client.response().headers == [("Content-Length", "0"), ("Connection", "close")]
        assert client.closed()


def test_idle_keep_alive_connection_is_closed() -> None:
    rec = Recorder()
    with ServerThread(make_handler(rec), limits=Limits(idle_timeout=0.2)) as srv:  # type: ignore[arg-type]
        with RawClient(srv) as client:
            client.send(get("/json"))
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
            assert client.closed()  # blocks until the idle timeout closes it
        with RawClient(srv) as client:
            assert client.closed()  # a connection that never sends anything, too


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("partial", [b"G", b"GET /json HTTP/1.1\r\nHost: x\r\n"])
def test_slow_request_head_is_408_then_close(partial: bytes) -> None:
    rec = Recorder()
    with (
        ServerThread(make_handler(rec), limits=Limits(header_timeout=0.2)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        client.send(partial)
        assert client.read_exact(len(REQUEST_TIMEOUT)) == REQUEST_TIMEOUT
        assert client.closed()
    assert rec.requests == []


def test_slow_head_after_a_response_is_408() -> None:
    rec = Recorder()
    with (
        ServerThread(make_handler(rec), limits=Limits(header_timeout=0.2)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(b"GET /json HT")
        assert client.read_exact(len(REQUEST_TIMEOUT)) == REQUEST_TIMEOUT
        assert client.closed()


def _wait_for_connection_state(srv: ServerThread, attribute: str) -> None:
    """Block until the server's only connection has ``attribute`` set (its timeout fired)."""
    assert srv.server is not None
    for _ in range(1000):
        if any(getattr(conn, attribute) for conn in list(srv.server.connections)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no connection reached {attribute}")


def test_slow_pipelined_head_behind_an_unsent_response_closes_it() -> None:
    """The head times out before the response in flight is written: that response carries
    ``Connection: close`` and nothing follows it."""
    rec = Recorder()
    with (
        ServerThread(make_handler(rec), limits=Limits(header_timeout=0.2)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        try:
            client.send(get("/slow") + b"GET /json HTTP/1.1\r\nHo")
            assert rec.entered.wait(10)
            _wait_for_connection_state(srv, "timed_out_head")
        finally:
            rec.release.set()
        response = client.response()
        assert json.loads(response.body) == {"slow": True}
        assert response.headers[-1] == ("Connection", "close")
        assert client.closed()
    assert [request.path for request in rec.requests] == ["/slow"]


def test_slow_pipelined_head_behind_a_response_being_sent_is_408(tmp_path: Path) -> None:
    """The response in flight already went out as keep-alive (a large file the client does not
    read yet): it is finished, then the cut-off head gets its 408."""
    big = tmp_path / "big.bin"
    size = 64 * 1024 * 1024  # more than the socket buffers hold, so the send waits on the client
    with big.open("wb") as file:
        file.truncate(size)  # sparse: no disk cost
    rec = Recorder()
    with (
        ServerThread(make_handler(rec), limits=Limits(header_timeout=0.2)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        client.send(get(f"/file?path={quote(str(big))}&offset=0&length={size}") + b"GET /js")
        _wait_for_connection_state(srv, "timed_out_head")
        head = client.read_until(b"\r\n\r\n")
        assert b"Connection" not in head
        assert b"Content-Length: %d\r\n" % size in head
        remaining = size - len(client.buffer)
        client.buffer = b""
        while remaining > 0:  # counted, not kept: only the bytes after the body matter
            chunk = client.sock.recv(min(1 << 20, remaining))
            assert chunk, f"closed with {remaining} bytes of the body missing"
            remaining -= len(chunk)
        assert client.read_exact(len(REQUEST_TIMEOUT)) == REQUEST_TIMEOUT
        assert client.closed()


def test_stalled_body_is_cut_off() -> None:
    rec = Recorder()
    with (
        ServerThread(make_handler(rec), limits=Limits(idle_timeout=0.2)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        client.send(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


REQUEST_SPEC = st.tuples(
    st.booleans(),  # the handler reads the body
    st.sampled_from([0, 10, 5000, 70000]),  # body size; 70000 > drain_limit (64 KiB)
    st.booleans(),  # the client sends Connection: close
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(REQUEST_SPEC, min_size=1, max_size=6))
def test_pipeline_state_machine(shared: ServerThread, specs: list[tuple[bool, int, bool]]) -> None:
    """Responses come in order; the connection closes exactly after the first request that
    asks for it or leaves more unread body than the layer drains, with ``Connection: close``
    on that response only."""
    server = shared
    payload = b"".join(
        (
            f"POST /{'echo' if consume else 'ignore-body'}?i={i} HTTP/1.1\r\n"
            f"Content-Length: {size}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}"
            "\r\n"
        ).encode()
        + b"b" * size
        for i, (consume, size, close) in enumerate(specs)
    )
    closing_at = next(
        (
            i
            for i, (consume, size, close) in enumerate(specs)
            if close or (not consume and size > 64 * 1024)
        ),
        None,
    )
    with RawClient(server) as client:
        sender = threading.Thread(target=_send_ignoring_resets, args=(client.sock, payload))
        sender.start()
        try:
            last = len(specs) - 1 if closing_at is None else closing_at
            for i in range(last + 1):
                response = client.response()
                seen = json.loads(response.body)
                assert seen.get("i", dict(parse_qsl(seen.get("query", ""))).get("i")) == str(i)
                assert ("Connection" in header_names(response)) == (i == closing_at)
            if closing_at is not None:
                assert client.closed()
        finally:
            with contextlib.suppress(OSError):  # already reset by the server
                client.sock.shutdown(socket.SHUT_RDWR)
            sender.join(10)


def _send_ignoring_resets(sock: socket.socket, payload: bytes) -> None:
    with contextlib.suppress(OSError):  # the server closed as expected, or the test finished
        sock.sendall(payload)


# ---------------------------------------------------------------------------------------------
# Files


def test_large_file_segment_is_sent_whole(server: ServerThread, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with RawClient(server) as client:
        for offset, length in [(0, len(data)), (100, 70000), (5, 64 * 1024)]:
            client.send(get(f"/file?path={path}&offset={offset}&length={length}"))
            response = client.response()
            assert response.status == 206
            assert response.body == data[offset : offset + length]


@pytest.mark.parametrize("length", [100, 200000], ids=["small", "large"])
def test_unreadable_file_sends_fallback(server: ServerThread, tmp_path: Path, length: int) -> None:
    missing = tmp_path / "missing.bin"
    with RawClient(server) as client:
        client.send(get(f"/file?path={missing}&offset=0&length={length}&fallback=1"))
        assert client.read_exact(len(ERROR_3)) == ERROR_3
        client.send(get(f"/file?path={missing}&offset=0&length={length}"))
        assert client.response().status == 500
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_short_file_sends_fallback(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(get("/file?offset=9000&length=2000&fallback=1"))  # firmware.bin: 10000 B
        assert client.read_exact(len(ERROR_3)) == ERROR_3


# ---------------------------------------------------------------------------------------------
# Lifecycle: shutdown, startup, shared sockets


def test_graceful_shutdown_finishes_the_response_in_flight() -> None:
    rec = Recorder()
    srv = ServerThread(make_handler(rec))  # type: ignore[arg-type]
    srv.start()
    client = RawClient(srv)
    try:
        client.send(get("/slow"))
        assert rec.entered.wait(10)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        while srv.server is not None and not srv.server.closing:
            time.sleep(0.01)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection((srv.host, srv.port), timeout=2).close()
        rec.release.set()
        response = client.response()
        assert json.loads(response.body) == {"slow": True}
        assert header_names(response)[-1] == "Connection"
        assert client.closed()
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        rec.release.set()
        client.sock.close()
        srv.stop()


def test_exit_does_not_hang_on_a_stuck_handler() -> None:
    rec = Recorder()
    srv = ServerThread(make_handler(rec), shutdown_timeout=0.2)  # type: ignore[arg-type]
    srv.start()
    thread = srv._thread
    assert thread is not None
    with RawClient(srv) as client:
        client.send(get("/forever"))
        assert rec.entered.wait(10)
        srv.stop()  # pytest-timeout fails the test if this hangs
        assert client.closed()  # aborted after the grace period, without a response
    assert not thread.is_alive()


def test_startup_error_is_raised_in_the_caller() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def handler(request: Request) -> Response:
            return Response.empty(204)

        with pytest.raises(OSError, match="in use"), ServerThread(handler, port=port):
            pass


def test_pre_bound_socket_is_served() -> None:
    async def handler(request: Request) -> Response:
        return Response.empty(204)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with ServerThread(handler, sock=listener) as srv, RawClient(srv) as client:
        assert srv.port == listener.getsockname()[1]
        client.send(get("/"))
        assert client.response().status == 204


def test_serve_coroutine_runs_until_cancelled() -> None:
    async def handler(request: Request) -> Response:
        return Response.empty(204)

    async def main() -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        ready: asyncio.Future[HttpServer] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(handler, sock=listener, ready=ready.set_result))
        server = await ready
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/"))
        line = await reader.readline()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the rest of the response, then EOF: the shutdown closed the idle connection
        assert await reader.read() == b"Content-Length: 0\r\n\r\n"
        writer.close()
        return int(line.split()[1])

    assert asyncio.run(main()) == 204


# ---------------------------------------------------------------------------------------------
# TLS (§2.2, D25)


@pytest.fixture(scope="module")
def rsa_ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.RSA)


def c_sdk_client_context(ca: trustme.CA) -> ssl.SSLContext:
    """What the C SDK offers: TLS 1.2 only, four static-RSA AES-CBC suites, no SNI."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the SDK does not check the host name (§2.2)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(C_SDK_CIPHERS)
    ca.configure_trust(context)
    return context


def tls_server_context(ca: trustme.CA, tmp_path: Path, *, c_sdk_compatible: bool) -> ssl.SSLContext:
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(certfile)
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(certfile, append=True)
    cert.private_key_pem.write_to_path(keyfile)
    return make_server_ssl_context(certfile, keyfile, c_sdk_compatible=c_sdk_compatible)


def test_tls_c_sdk_handshake_and_request(rsa_ca: trustme.CA, tmp_path: Path) -> None:
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    client_context = c_sdk_client_context(rsa_ca)
    capture = (CAPTURES / "04_download_0-4095.request.bin").read_bytes()
    capture = capture.replace(b"/ota/south/download/abc123", b"/last-chunk")
    with (
        ServerThread(make_handler(rec), ssl=context) as srv,  # type: ignore[arg-type]
        socket.create_connection((srv.host, srv.port), timeout=10) as raw,
        client_context.wrap_socket(raw, server_hostname=None) as tls,
    ):
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None
        assert cipher[0] in C_SDK_CIPHERS.split(":")
        tls.sendall(capture)
        client = RawClient(srv, sock=tls)
        assert client.read_exact(len(LAST_CHUNK)) == LAST_CHUNK
        assert client.read_exact(1808) == FIRMWARE.read_bytes()[8192:]
    assert rec.requests[0].header("Host") == "ota.heclouds.com"


def test_tls_large_file_and_modern_client(rsa_ca: trustme.CA, tmp_path: Path) -> None:
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    with ServerThread(make_handler(rec), ssl=context) as srv:  # type: ignore[arg-type]
        assert srv.url.startswith("https://")
        verify = ssl.create_default_context()
        rsa_ca.configure_trust(verify)
        with httpx2.Client(base_url=srv.url, verify=verify) as client:
            path = tmp_path / "big.bin"
            response = client.get(f"/file?path={path}&offset=0&length={len(data)}")
            assert response.content == data
            assert client.get("/json").json() == {"errno": 0, "error": "succ"}


def test_tls_early_413_closes_without_lingering(rsa_ca: trustme.CA, tmp_path: Path) -> None:
    """TLS has no half-close in asyncio: the connection closes once the 413 is written."""
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    with (
        ServerThread(make_handler(rec), ssl=context) as srv,  # type: ignore[arg-type]
        socket.create_connection((srv.host, srv.port), timeout=10) as raw,
        c_sdk_client_context(rsa_ca).wrap_socket(raw, server_hostname=None) as tls,
    ):
        tls.sendall(b"POST /limited HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        client = RawClient(srv, sock=tls)
        assert client.response().raw == PAYLOAD_TOO_LARGE
        with contextlib.suppress(ssl.SSLError):  # a close without close_notify counts too
            assert client.closed()


def test_tls_without_c_sdk_mode_refuses_the_c_sdk(rsa_ca: trustme.CA, tmp_path: Path) -> None:
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=False)
    with (
        ServerThread(make_handler(rec), ssl=context) as srv,  # type: ignore[arg-type]
        socket.create_connection((srv.host, srv.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        c_sdk_client_context(rsa_ca).wrap_socket(raw, server_hostname=None)


# ---------------------------------------------------------------------------------------------
# Unit checks of the types


def test_request_body_respects_declared_length_before_reading() -> None:
    async def never() -> bytes:
        raise AssertionError("read although the declared length is over the limit")

    request = Request("POST", "/", "/", "", [], "peer", never, content_length=5000)

    async def main() -> None:
        with pytest.raises(BodyTooLarge):
            await request.body(4096)

    asyncio.run(main())


def test_request_stream_propagates_abort() -> None:
    async def aborted() -> bytes:
        raise RequestAborted("the client disconnected")

    request = Request("POST", "/", "/", "", [], "peer", aborted)

    async def main() -> None:
        with pytest.raises(RequestAborted):
            await request.body(10)

    asyncio.run(main())


def test_response_empty_is_canonical() -> None:
    assert Response.empty(405, [("Allow", "GET")]) == Response(
        405, [("Allow", "GET"), ("Content-Length", "0")]
    )


def test_a_client_that_stops_reading_pauses_its_connection_until_it_reads() -> None:
    """Flow control: a response larger than the transport's buffer waits for the client, and
    the pipelined request behind it is not even handled meanwhile (memory stays bounded)."""
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB, far above any socket and transport buffer
    handled: list[str] = []

    async def handler(request: Request) -> Response:
        handled.append(request.path)
        if request.path == "/big":
            return Response(200, headers=[("Content-Length", str(len(big)))], body=big)
        return wire.json_reply(b'{"errno":0}')

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with ServerThread(handler) as srv:
        sock.settimeout(10)
        sock.connect((srv.host, srv.port))
        with RawClient(srv, sock=sock) as client:
            client.send(get("/big") + get("/json"))
            _wait_for_connection_state(srv, "_write_paused")
            assert handled == ["/big"]
            head = client.read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            body = bytearray(len(big))  # read in place: the 8 MiB come in 4 KiB pieces
            view, got = memoryview(body), len(client.buffer)
            view[:got], client.buffer = client.buffer, b""
            while got < len(big):
                n = sock.recv_into(view[got:])
                assert n, f"closed after {got} bytes"
                got += n
            assert body == big
            assert json.loads(client.response().body) == {"errno": 0}
            assert handled == ["/big", "/json"]
            assert not any(conn._write_paused for conn in list(srv.server.connections))  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Transfer codings other than chunked (RFC 9112 §6.1, §6.3)

NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "codings",
    [
        [b"gzip, chunked"],
        [b"deflate,chunked"],
        [b"gzip", b"chunked"],  # two header lines: one list, chunked last
        [b"x-custom ,  chunked"],
    ],
    ids=["gzip", "deflate", "two-lines", "unknown"],
)
def test_unsupported_transfer_coding_is_501_and_close(
    server: ServerThread, rec: Recorder, codings: list[bytes]
) -> None:
    """RFC 9112 §6.1: a coding the server does not understand gets 501; the handler never sees
    the request (it would read a still-gzipped body as if it were plain)."""
    lines = b"".join(b"Transfer-Encoding: " + value + b"\r\n" for value in codings)
    with RawClient(server) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        assert client.read_exact(len(NOT_IMPLEMENTED)) == NOT_IMPLEMENTED
        assert client.closed()
    assert rec.requests == []


@pytest.mark.parametrize("value", [b"gzip", b"chunked, gzip"], ids=["gzip-only", "chunked-first"])
def test_transfer_coding_without_final_chunked_is_400(server: ServerThread, value: bytes) -> None:
    """RFC 9112 §6.3: chunked not final leaves the body length unknown -> 400 and close."""
    with RawClient(server) as client:
        client.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\nhello")
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


def test_plain_chunked_in_any_case_is_still_read(server: ServerThread, rec: Recorder) -> None:
    with RawClient(server) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        assert json.loads(client.response().body)["length"] == 5
    assert rec.bodies == [b"hello"]


# ---------------------------------------------------------------------------------------------
# HEAD (RFC 9110 §9.3.2): the handler answers as for GET; the layer sends the head only


def head(path: str) -> bytes:
    return f"HEAD {path} HTTP/1.1\r\nHost:ota.heclouds.com\r\n\r\n".encode()


def test_head_gets_the_get_headers_without_the_body(server: ServerThread, rec: Recorder) -> None:
    with RawClient(server) as client:
        client.send(head("/json") + get("/json"))
        # the head as for GET, Content-Length included, and then straight the next response
        assert client.read_exact(len(CANONICAL_JSON) - 26) == CANONICAL_JSON[:-26]
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    assert [request.method for request in rec.requests] == ["HEAD", "GET"]


def test_head_of_a_file_segment_never_reads_the_file(server: ServerThread, tmp_path: Path) -> None:
    """The segment's file does not exist: a GET would send the fallback, a HEAD sends the head
    it would have sent for the file, since it reads nothing."""
    missing = tmp_path / "missing.bin"
    with RawClient(server) as client:
        for length in (100, 200000):  # small (read before writing) and large (sendfile)
            client.send(head(f"/file?path={missing}&offset=0&length={length}&fallback=1"))
            response = client.read_until(b"\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 206 Partial Content\r\n")
            assert b"Content-Length: %d\r\n" % length in response
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


def test_head_of_a_chunked_reply_keeps_the_connection(server: ServerThread) -> None:
    with RawClient(server) as client:
        client.send(head("/error3") + head("/close-delimited") + get("/json"))
        error3_head = ERROR_3[: ERROR_3.index(b"\r\n\r\n") + 4]
        assert client.read_exact(len(error3_head)) == error3_head
        close_delimited = client.read_until(b"\r\n\r\n")
        assert close_delimited.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection" not in close_delimited  # no body follows, so nothing to delimit
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON


# ---------------------------------------------------------------------------------------------
# Holding connections: deadlines, the connection cap, TLS handshakes, descriptor exhaustion


class _Trickler(threading.Thread):
    """Sends ``data`` one byte at a time until done, stopped, or the server closes."""

    def __init__(self, sock: socket.socket, data: bytes, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.pause = sock, data, pause
        self.stop = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(OSError):
            for index in range(len(self.data)):
                if self.stop.wait(self.pause):
                    return
                self.sock.sendall(self.data[index : index + 1])


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_trickled_body_is_cut_at_the_body_deadline(framing: str) -> None:
    """A body sent a byte at a time never lets the idle timeout fire, but cannot outlive the
    body deadline: the handler's read fails and the client gets 400 and the close."""
    rec = Recorder()
    if framing == "chunked":
        head = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"1\r\nx\r\n" for _ in range(2000)) + b"0\r\n\r\n"
    else:
        head = b"POST /echo HTTP/1.1\r\nContent-Length: 2000\r\n\r\n"
        body = b"x" * 2000  # 40 s at one byte per 20 ms; the socket times out after 10
    with (
        ServerThread(make_handler(rec), limits=Limits(body_timeout=0.3)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        client.send(head)
        trickler = _Trickler(client.sock, body)
        trickler.start()
        try:
            assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
            assert client.closed()
        finally:
            trickler.stop.set()
            trickler.join(10)
    assert rec.bodies == []


def test_trickled_head_is_cut_at_the_head_deadline() -> None:
    rec = Recorder()
    head = get("/json", "X-Pad: " + "p" * 2000 + "\r\n")
    with (
        ServerThread(make_handler(rec), limits=Limits(header_timeout=0.3)) as srv,  # type: ignore[arg-type]
        RawClient(srv) as client,
    ):
        trickler = _Trickler(client.sock, head)
        trickler.start()
        try:
            assert client.read_exact(len(REQUEST_TIMEOUT)) == REQUEST_TIMEOUT
            assert client.closed()
        finally:
            trickler.stop.set()
            trickler.join(10)
    assert rec.requests == []


def _served(srv: ServerThread, client: RawClient) -> bool:
    """Whether ``client``'s connection is served: a request gets its response."""
    try:
        client.send(get("/json"))
        return client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
    except (AssertionError, OSError):  # closed or reset by the server
        return False


def test_connection_cap_closes_the_connection_over_it_and_frees_slots() -> None:
    rec = Recorder()
    with ServerThread(make_handler(rec), limits=Limits(max_connections=2)) as srv:  # type: ignore[arg-type]
        first, second = RawClient(srv), RawClient(srv)
        try:
            assert _served(srv, first)
            assert _served(srv, second)
            with RawClient(srv) as third:
                assert third.closed()  # closed at once, without a response
            assert _served(srv, first)  # the two held connections are unaffected
            assert _served(srv, second)
            first.sock.close()
            # the server notices the close on its own time: try until the slot is free again
            for _ in range(200):
                with RawClient(srv) as fourth:
                    if _served(srv, fourth):
                        break
                time.sleep(0.02)
            else:
                raise AssertionError("the freed slot was never reused")
        finally:
            first.sock.close()
            second.sock.close()


def test_tls_client_without_client_hello_is_closed_after_the_handshake_timeout(
    rsa_ca: trustme.CA, tmp_path: Path
) -> None:
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    with (
        ServerThread(make_handler(rec), ssl=context, limits=Limits(handshake_timeout=0.3)) as srv,  # type: ignore[arg-type]
        socket.create_connection((srv.host, srv.port), timeout=10) as raw,
    ):
        assert RawClient(srv, sock=raw).closed()  # socket timeout 10 s: asyncio's default is 60


def test_tls_handshakes_count_against_the_connection_cap(
    rsa_ca: trustme.CA, tmp_path: Path
) -> None:
    """A client that connects and stays silent holds a slot during its handshake, so silent
    TLS clients cannot exceed the cap either."""
    rec = Recorder()
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    with (
        ServerThread(make_handler(rec), ssl=context, limits=Limits(max_connections=1)) as srv,  # type: ignore[arg-type]
        socket.create_connection((srv.host, srv.port), timeout=10) as silent,
        socket.create_connection((srv.host, srv.port), timeout=10) as second,
    ):
        assert RawClient(srv, sock=second).closed()
        assert silent.fileno() >= 0


def test_log_throttle_reports_once_per_interval_with_the_count() -> None:
    now = [0.0]
    throttle = http.LogThrottle(10.0, clock=lambda: now[0])
    reports = []
    for step in range(100_000):  # 100,000 failed accepts over 100 s
        now[0] = step / 1000
        count = throttle.hit()
        if count is not None:
            reports.append(count)
    assert len(reports) == 10
    assert reports[0] == 1  # the first occurrence is reported at once
    assert sum(reports) == 90_001  # every event up to the last report; its interval is open


_LOW_LIMIT_SERVER = """
import logging, resource, sys
from onenet_ota.server.http import Limits, Response
from tests.serverthread import ServerThread

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
async def handler(request):
    return Response.empty(204)

# a cap over the descriptor limit, so that accepting itself fails
with ServerThread(handler, limits=Limits(max_connections=10_000)) as srv:
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(srv.port, flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_descriptor_exhaustion_is_logged_boundedly_and_recovers(tmp_path: Path) -> None:
    """At the descriptor limit every accept fails: the log gets a warning per interval with a
    count, no traceback, and once descriptors are free the server serves again."""
    log = tmp_path / "server.log"
    with log.open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LOW_LIMIT_SERVER],
            cwd=Path(__file__).parents[2],  # where "tests" is importable
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        port = int(proc.stdout.readline())
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
        for _ in range(300):  # until the server has met the limit
            if b"cannot accept" in log.read_bytes():
                break
            time.sleep(0.01)
        time.sleep(2.5)  # a few accept pauses' worth of retries at the limit
        for sock in held:
            sock.close()
        for _ in range(500):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
                contextlib.suppress(OSError),
            ):
                sock.sendall(get("/"))
                if sock.recv(64).startswith(b"HTTP/1.1 204 "):
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the server did not recover")
        proc.stdin.close()
        proc.wait(20)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert 1 <= text.count("cannot accept connections") <= 2, text[:2000]


# ---------------------------------------------------------------------------------------------
# The connection's states


def test_connection_states_move_only_along_the_table() -> None:
    async def handler(request: Request) -> Response:
        return Response.empty(204)

    async def main() -> None:
        server = HttpServer(handler)
        await server.start()
        try:
            conn = Connection(server)
            assert conn.state is State.IDLE
            with pytest.raises(StateError, match="can't go to LINGER in state IDLE"):
                conn._to(State.LINGER)
            conn._to(State.RECV_HEAD)
            conn._to(State.MUST_CLOSE)
            with pytest.raises(StateError, match="can't go to RECV_HEAD in state MUST_CLOSE"):
                conn._to(State.RECV_HEAD)
        finally:
            await server.close()

    asyncio.run(main())
    # every state but CLOSED can be lost; none comes back from CLOSED
    assert all(State.CLOSED in TRANSITIONS[state] for state in State if state is not State.CLOSED)
    assert TRANSITIONS[State.CLOSED] == frozenset()


def test_limits_are_one_validated_value() -> None:
    limits = Limits(idle_timeout=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.idle_timeout = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_requests must be at least 1"):
        Limits(max_requests=0)
    with pytest.raises(ValueError, match="body_timeout must be positive"):
        Limits(body_timeout=0)
    assert 1 <= Limits().max_connections < resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.parametrize(
    ("range_headers", "expected"),
    [
        # Classic (§6.6.3/D8): Content-Range stays last.
        ([("Content-Range", "bytes 0-3/10")], ["Connection", "Content-Range"]),
        # Studio (§12.3): its two headers stay next to Content-Range, the group last.
        (
            [
                ("Content-Range-Start", "0"),
                ("Content-Range-End", "3"),
                ("Content-Range", "bytes 0-3/10"),
            ],
            ["Connection", "Content-Range-Start", "Content-Range-End", "Content-Range"],
        ),
    ],
)
def test_the_layers_connection_header_goes_before_the_range_group(
    range_headers: list[tuple[str, str]], expected: list[str]
) -> None:
    response = Response(206, [("Content-Length", "4"), *range_headers], b"abcd")
    head, close = encode_head(response, 4, close=True)
    assert close
    names = [line.split(b":")[0].decode() for line in head.split(b"\r\n")[1:] if line]
    assert names == ["Content-Length", *expected]


# ---------------------------------------------------------------------------------------------
# Event loops: `serve` runs on uvloop when it is installed (http.new_event_loop), else on
# asyncio's own loop. Their transports differ (uvloop's implement asyncio.Transport without
# subclassing it; their sendfile and TLS are their own), so the layer's essentials run on both.

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_each_event_loop_serves_the_layer(loop: str, rsa_ca: trustme.CA, tmp_path: Path) -> None:
    firmware = FIRMWARE.read_bytes()
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(3 * 1024 * 1024))  # beyond SMALL_SEGMENT: the sendfile path
    file_query = f"/file?path={quote(str(large))}&offset=1000&length={2 * 1024 * 1024}"
    plain = ServerThread(make_handler(Recorder()), loop_factory=LOOPS[loop])  # type: ignore[arg-type]
    with plain as srv, RawClient(srv) as client:
        # keep-alive, then three requests pipelined in one write, answered in order
        client.send(get("/json"))
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(get("/error3") + get("/last-chunk") + get("/json"))
        assert client.read_exact(len(ERROR_3)) == ERROR_3
        assert client.read_exact(len(LAST_CHUNK) + 1808) == LAST_CHUNK + firmware[8192:]
        assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(get(file_query))
        head = client.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206 ")
        assert (
            client.read_exact(2 * 1024 * 1024) == large.read_bytes()[1000 : 1000 + 2 * 1024 * 1024]
        )
    context = tls_server_context(rsa_ca, tmp_path, c_sdk_compatible=True)
    secure = ServerThread(make_handler(Recorder()), ssl=context, loop_factory=LOOPS[loop])  # type: ignore[arg-type]
    with (
        secure as srv,
        socket.create_connection((srv.host, srv.port), timeout=10) as raw,
        c_sdk_client_context(rsa_ca).wrap_socket(raw, server_hostname=None) as tls,
    ):
        tls.sendall(get("/last-chunk"))
        client = RawClient(srv, sock=tls)
        assert client.read_exact(len(LAST_CHUNK) + 1808) == LAST_CHUNK + firmware[8192:]


# ---------------------------------------------------------------------------------------------
# The head's bounds at their exact edges, and requests without a body


HEAD_BUDGET = 300  # max_header_bytes of the server below
HEAD_LINES = 5  # max_headers


@pytest.fixture(scope="module")
def tight_server() -> Iterator[ServerThread]:
    limits = Limits(max_header_bytes=HEAD_BUDGET, max_headers=HEAD_LINES)
    with ServerThread(make_handler(Recorder()), limits=limits) as server:  # type: ignore[arg-type]
        yield server


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    padding=st.integers(min_value=0, max_value=320),
    lines=st.lists(
        st.tuples(
            st.text(alphabet="abcXYZ-", min_size=1, max_size=12),
            st.text(alphabet="xyz019", min_size=0, max_size=80),
        ),
        max_size=HEAD_LINES + 2,
    ),
)
def test_head_bounds_hold_at_their_exact_edge(
    tight_server: ServerThread, padding: int, lines: list[tuple[str, str]]
) -> None:
    """A head is counted as its URL plus, per header line, name, value and 4 (": ", CRLF), one
    budget of max_header_bytes for both, and at most max_headers lines: a head within both is
    served, a head one byte or one line over either is 400 and closed, whichever bound it
    crosses first."""
    url = "/json?" + "q" * padding
    size = len(url) + sum(len(name) + len(value) + 4 for name, value in lines)
    head = f"GET {url} HTTP/1.1\r\n" + "".join(f"{n}:{v}\r\n" for n, v in lines) + "\r\n"
    with RawClient(tight_server) as client:
        client.send(head.encode())
        if size <= HEAD_BUDGET and len(lines) <= HEAD_LINES:
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        else:
            assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
            assert client.closed()


@pytest.mark.parametrize("over", ["url", "header", "lines"])
def test_head_one_over_its_bound_is_400(tight_server: ServerThread, over: str) -> None:
    """The exact edges, for each bound: the largest head allowed is served, one more is not."""
    if over == "url":
        # the URL alone fills the budget
        fits = f"GET /json?{'q' * (HEAD_BUDGET - 6)} HTTP/1.1\r\n\r\n"
        fails = f"GET /json?{'q' * (HEAD_BUDGET - 5)} HTTP/1.1\r\n\r\n"
    elif over == "header":
        value = "v" * (HEAD_BUDGET - len("/json") - len("X") - 4)
        fits = f"GET /json HTTP/1.1\r\nX:{value}\r\n\r\n"
        fails = f"GET /json HTTP/1.1\r\nX:{value}v\r\n\r\n"
    else:
        fits = "GET /json HTTP/1.1\r\n" + "X:y\r\n" * HEAD_LINES + "\r\n"
        fails = "GET /json HTTP/1.1\r\n" + "X:y\r\n" * (HEAD_LINES + 1) + "\r\n"
    with RawClient(tight_server) as client:
        for _ in range(2):  # on one connection: each head has the whole budget
            client.send(fits.encode())
            assert client.read_exact(len(CANONICAL_JSON)) == CANONICAL_JSON
        client.send(fails.encode())
        assert client.read_exact(len(BAD_REQUEST)) == BAD_REQUEST
        assert client.closed()


def _echoed(client: RawClient) -> tuple[int, int | None, bool]:
    """The body length and Content-Length /echo saw, and whether the response closes."""
    response = client.response()
    assert response.status == 200
    seen = json.loads(response.body)
    return seen["length"], seen["content_length"], ("Connection", "close") in response.headers


def test_requests_without_a_body_are_alike_on_every_connection() -> None:
    """Requests that declare no body (every device GET) share what the layer knows of their
    body, one object for all: nothing done to it on one connection (a client that leaves with
    such requests queued) shows on another, and a body, a zero Content-Length or an Expect
    between them is served as ever (no 100 Continue for no body)."""
    rec = Recorder()
    post = b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    expect = get("/echo", "Content-Length: 0\r\nExpect: 100-continue\r\n")
    with ServerThread(make_handler(rec)) as srv:  # type: ignore[arg-type]
        with RawClient(srv) as held:
            held.send(get("/slow") + get("/echo") + expect)  # queued behind the held handler
            assert rec.entered.wait(10)
            with RawClient(srv) as client:
                client.send(get("/echo") + expect + post + get("/echo"))
                seen = [_echoed(client) for _ in range(4)]
                assert seen == [(0, None, False), (0, 0, False), (5, 5, False), (0, None, False)]
            # the held client leaves with a reset: the requests it queued fail with it
            held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rec.release.set()
        with RawClient(srv) as client:
            client.send(get("/echo") + post + expect + get("/echo"))
            seen = [_echoed(client) for _ in range(4)]
            assert seen == [(0, None, False), (5, 5, False), (0, 0, False), (0, None, False)]
            assert client.buffer == b""  # no 100 Continue anywhere

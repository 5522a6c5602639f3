"""The server's HTTP/1.1 layer: request and response types, the asyncio server, TLS helper.

The device API needs exact control of the bytes on the wire (spec §2.5, §8.2): header-name casing,
header order, at most 10 headers, no Date/Server, and the one-byte download error in the same write
as the headers. No ASGI server offers that (spec §8.4), so the project owns this layer: httptools
parses, and responses are serialised here.

Theory of operation
-------------------
One :class:`asyncio.Protocol` per connection feeds received bytes to an httptools parser. Each
parsed request head becomes a :class:`Request` queued on its connection; a worker task, alive only
while the queue is non-empty, calls the handler for each request in order (pipelining is answered
in order) and writes the :class:`Response`:

* The status line is ``HTTP/1.1 <code> <reason>``; headers go out in the given order and casing.
  The layer adds nothing but a ``Connection`` header when the handler set none: ``close`` when the
  connection closes after this response, or ``keep-alive`` when an HTTP/1.0 client asked to keep
  it and it stays open (an HTTP/1.0 client closes unless told otherwise, RFC 9112 §9.3). It goes
  before ``Content-Range`` if there is one (which must stay last, §6.6.3/D8), else last. The layer
  never adds ``keep-alive`` to HTTP/1.1 (persistent by default; D26); a chunked body to an
  HTTP/1.0 client closes the connection, since such a client cannot find the end of it.
* The header block and a ``bytes`` body leave in ONE ``transport.write`` (D7: the one-byte download
  error must share its TCP segment with the headers). A :class:`FileSegment` of at most 64 KiB is
  read with ``os.pread`` *before* anything is written and goes out in the same single write; a
  larger one is written with ``loop.sendfile`` after the headers.
* If a file segment cannot be read before anything is sent, the segment's ``fallback`` response is
  sent instead (the device API passes its byte-4 reply, §6.6 step 6); without a fallback the layer
  answers 500. If a large segment fails after the headers went out, the connection is aborted, so
  the client sees a body shorter than ``Content-Length``.

The request body is pulled by the handler (:meth:`Request.stream`, :meth:`Request.body`). Body bytes
are buffered per connection up to ``buffer_limit``; past it the layer stops reading the socket
until the handler consumes (flow control), so an upload never sits in memory whole. A body the
handler leaves unread is discarded before the next request if at most ``drain_limit`` bytes remain;
otherwise the response carries ``Connection: close`` and the connection closes.

What the layer itself answers (canonical form, §2.5, §4.3): invalid HTTP, an oversized head, or a
broken body framing -> ``400`` with ``Content-Length: 0`` and ``Connection: close``; a request head
not complete within ``header_timeout`` -> ``408``, same form (after the response in flight, if
any; when that one already announced the close, nothing more); a handler exception -> ``500`` with
an empty body (the traceback is logged, never sent).

Connections close after ``max_requests`` requests (1000, like OneNET, D19), when the client asks
(``Connection: close``, HTTP/1.0 without keep-alive), after ``idle_timeout`` seconds of quiet
between requests or while a body is awaited (silently when nothing of a next request has
arrived), and when a request head takes longer than ``header_timeout``.

Closing while the client may still be sending (a body left unread, as in an early ``413``; a head
or bytes that will not be parsed) would make the kernel answer those bytes with a reset, which can
destroy the final response before the client reads it. Such a connection closes lingering: the
write side is shut down after the response (the client sees it and then end-of-file), incoming
bytes are read and dropped unbuffered for up to :data:`LINGER_SECONDS` or :data:`LINGER_BYTES`,
and the connection closes when the client closes or either bound is reached. TLS cannot shut down
one direction (asyncio has no ``write_eof`` there), so a TLS connection just closes once written.
:meth:`HttpServer.close` stops accepting, lets in-flight responses finish (with ``Connection:
close``) for up to ``grace`` seconds, then aborts what is left.

Entry points: :class:`HttpServer` (start / serve_forever / close), :func:`serve` (one coroutine,
for worker processes sharing a pre-bound socket), :class:`ServerThread` (a server in a background
thread, for tests and tools) and :func:`make_server_ssl_context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import socket
import ssl as _ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl

import httptools

__all__ = [
    "REASONS",
    "BodyTooLarge",
    "FileSegment",
    "Handler",
    "HttpServer",
    "Request",
    "RequestAborted",
    "RequestTimedOut",
    "Response",
    "ServerThread",
    "make_server_ssl_context",
    "new_event_loop",
    "serve",
]

logger = logging.getLogger(__name__)

REASONS: dict[int, str] = {
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}

SMALL_SEGMENT: Final = 64 * 1024
"""File segments up to this size are read before writing and leave with the headers in one write."""

_LARGE_CHUNK: Final = 1024 * 1024  # manual copy loop when sendfile is unavailable (style.md: 1 MiB)

LINGER_SECONDS: Final = 2.0
"""Longest time a closing connection keeps reading (and dropping) what the client still sends.

Long enough for a client on a slow link to read the final response and stop sending; short enough
that a client which never stops cannot hold the connection for long."""

LINGER_BYTES: Final = 1024 * 1024
"""Most bytes a closing connection reads and drops before it closes anyway (a client streaming a
huge upload past a ``413`` gets its reset after this much)."""


class BodyTooLarge(Exception):
    """The request body exceeds the limit the handler asked for."""


class RequestAborted(Exception):
    """The request body cannot be read to its end.

    The client disconnected, stayed quiet past the idle timeout, or sent a body whose framing is
    invalid. Handlers need not catch it: the layer answers 400 and closes if the client is still
    there, and drops the request otherwise.
    """


class RequestTimedOut(RequestAborted):
    """The client sent nothing more of the body within the idle timeout (a stalled body)."""


@dataclass(slots=True)
class FileSegment:
    """A response body served from a file: ``length`` bytes at ``offset`` of ``path``.

    ``fallback`` is sent instead if the file cannot be opened or read (or is shorter than the
    segment) before anything has been written; without one the layer answers 500.
    """

    path: str
    offset: int
    length: int
    fallback: Response | None = None


@dataclass(slots=True)
class Response:
    """A response, serialised exactly: headers in the given order and casing, nothing added
    except ``Connection: close`` when the connection is about to close (D26), or ``Connection:
    keep-alive`` when an HTTP/1.0 client's connection stays open.

    The handler frames the body itself: a ``Content-Length`` header that matches the body, or
    ``Transfer-Encoding: chunked`` with an already chunk-encoded body (as in the D7 download
    error). A body with neither is close-delimited, so the connection closes after it. A
    ``Content-Length`` that differs from the body is a handler bug and turns into a 500.

    The layer never modifies a response, so a handler may return one object for many requests
    (the device API does, for memoised replies and cached chunks); it must then not change it.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileSegment = b""
    reason: str | None = None

    @classmethod
    def empty(cls, status: int, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """The canonical empty-bodied response (§4.3): ``headers`` then ``Content-Length: 0``."""
        return cls(status, [*headers, ("Content-Length", "0")])


BodyReader = Callable[[], Awaitable[bytes]]


@dataclass(slots=True)
class Request:
    """A parsed request. The body is pulled by the handler, so uploads can stream to disk."""

    method: str
    target: str  # the raw request target: path and query
    path: str
    query_string: str
    headers: list[tuple[str, str]]  # as received; names keep their casing, values are stripped
    peer: str
    _read_chunk: BodyReader
    _query: dict[str, str] | None = None
    content_length: int | None = None  # the declared Content-Length; None if absent or chunked
    chunked: bool = False  # Transfer-Encoding names chunked: a body of unknown length follows
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def header_count(self, name: str) -> int:
        """How many times header ``name`` occurs."""
        lowered = name.lower()
        return sum(1 for key, _ in self.headers if key.lower() == lowered)

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, percent-decoded; the first occurrence wins (spec §2.4)."""
        if self._query is None:
            parsed: dict[str, str] = {}
            for key, value in parse_qsl(self.query_string, keep_blank_values=True):
                parsed.setdefault(key, value)
            self._query = parsed
        return self._query

    async def stream(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, as it arrives; raises :class:`RequestAborted` if cut off."""
        while chunk := await self._read_chunk():
            yield chunk

    async def body(self, limit: int) -> bytes:
        """The whole body; raises :class:`BodyTooLarge` past ``limit`` bytes."""
        if self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge(limit)
        parts: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            parts.append(chunk)
        return b"".join(parts)


Handler = Callable[[Request], Awaitable[Response]]


# ---------------------------------------------------------------------------------------------
# Serialisation


class _InvalidResponse(Exception):
    """The handler returned a response that cannot be framed (a bug in the handler)."""


_BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES: Final = frozenset({204, 304})


def _reason(response: Response) -> str:
    if response.reason:
        return response.reason
    reason = REASONS.get(response.status)
    if reason is not None:
        return reason
    try:
        return HTTPStatus(response.status).phrase
    except ValueError:
        return "Unknown"  # §8.2 item 1: the reason phrase must never be empty


def _encode_head(
    response: Response, body_length: int, close: bool, http10: bool = False
) -> tuple[bytes, bool]:
    """The status line and header block, and whether the connection must close after them.

    When the handler sent no Connection header, adds ``Connection: close`` when closing, or
    ``Connection: keep-alive`` for an HTTP/1.0 request (``http10``) whose connection stays open:
    before ``Content-Range`` (which stays last, §6.6.3/D8), else at the end.
    """
    status = response.status
    if not 100 <= status <= 999:
        raise _InvalidResponse(f"status {status} is not a 3-digit code")
    lines = [f"HTTP/1.1 {status} {_reason(response)}\r\n"]
    framed = False
    connection: str | None = None
    range_index = -1
    for name, value in response.headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
            raise _InvalidResponse(f"header {name!r} contains a line break or colon")
        lowered = name.lower()
        if lowered == "content-length":
            if value.strip() != str(body_length):
                raise _InvalidResponse(
                    f"Content-Length {value!r} but the body has {body_length} bytes"
                )
            framed = True
        elif lowered == "transfer-encoding":
            framed = True  # the handler chunk-encoded the body itself (D7)
            if http10:
                close = True  # HTTP/1.0 has no chunked coding: its client reads to the close
        elif lowered == "connection":
            connection = value.lower()
        elif lowered == "content-range":
            range_index = len(lines)
        lines.append(f"{name}: {value}\r\n")
    if not framed and status not in _NO_BODY_STATUSES and not 100 <= status < 200:
        close = True  # close-delimited body: only the end of the connection frames it
    if connection is not None:
        if "close" in connection:
            close = True
    elif close or http10:
        # RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only if the response says so.
        line = "Connection: close\r\n" if close else "Connection: keep-alive\r\n"
        if range_index >= 0:
            lines.insert(range_index, line)
        else:
            lines.append(line)
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1"), close
    except UnicodeEncodeError as exc:
        raise _InvalidResponse("a header is not latin-1") from exc


def _read_segment(segment: FileSegment) -> bytes:
    """The whole segment, read with pread; OSError if it cannot be read in full.

    The file is opened per request: measured here, open + pread + close of 4 KiB costs about
    6.5 us against 1.2 us for pread on a cached descriptor, some 2% of a download request, while
    a descriptor cache would need its own invalidation when packages are deleted or replaced.
    Blocking reads on the loop are acceptable at this size (the page cache serves them).
    """
    fd = os.open(segment.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        data = os.pread(fd, segment.length, segment.offset)
        while len(data) < segment.length:
            more = os.pread(fd, segment.length - len(data), segment.offset + len(data))
            if not more:
                raise OSError(f"{segment.path} ends before byte {segment.offset + segment.length}")
            data += more
        return data
    finally:
        os.close(fd)


_TOKEN_IN_PATH: Final = re.compile(r"(/download/)[^/?]+")


def _loggable(path: str) -> str:
    """The path with any download token masked: tokens are credentials (§4.1, D5)."""
    return _TOKEN_IN_PATH.sub(r"\1***", path)


# ---------------------------------------------------------------------------------------------
# Connections


class _Body:
    """One request's body: chunks from the parser, pulled by the handler."""

    __slots__ = (
        "chunks",
        "complete",
        "conn",
        "continue_pending",
        "declared",
        "discarding",
        "error",
        "received",
        "timed_out",
        "waiter",
    )

    def __init__(self, conn: _Connection, declared: int | None, expect_continue: bool) -> None:
        self.conn = conn
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.declared = declared
        self.received = 0
        self.error: str | None = None
        self.timed_out = False
        self.discarding = False
        self.continue_pending = expect_continue
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        self.chunks.append(data)
        self.conn.buffered += len(data)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, reason: str, *, timed_out: bool = False) -> None:
        if not self.complete and self.error is None:
            self.error = reason
            self.timed_out = timed_out
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def unread(self) -> int | None:
        """Body bytes the handler has not read (buffered or still to come); None if unknown."""
        buffered = sum(map(len, self.chunks))
        if self.complete:
            return buffered
        if self.declared is None:
            return None
        return buffered + self.declared - self.received

    def drop_buffered(self) -> None:
        """Release what is buffered; anything that still arrives is dropped too."""
        self.discarding = True
        while self.chunks:
            self.conn.buffered -= len(self.chunks.popleft())
        self.conn.maybe_resume_reading()

    async def read(self) -> bytes:
        conn = self.conn
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                conn.buffered -= len(chunk)
                conn.maybe_resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise (RequestTimedOut if self.timed_out else RequestAborted)(self.error)
            if self.continue_pending:
                self.continue_pending = False
                conn.write(_CONTINUE)
            self.waiter = conn.loop.create_future()
            generation = conn.arm_timer(conn.server.idle_timeout)
            conn.maybe_resume_reading()
            try:
                await self.waiter
            finally:
                self.waiter = None
                # a pipelined head may have armed its own timer meanwhile: leave that one
                conn.cancel_timer(generation)

    async def discard(self) -> None:
        """Drop what is buffered and what is still to come; RequestAborted if cut off."""
        self.continue_pending = False
        self.drop_buffered()
        while await self.read():
            pass


# len(b"expect"), len(b"content-length"), len(b"transfer-encoding"): a cheap pre-filter
_FRAMING_NAME_LENGTHS: Final = frozenset({6, 14, 17})


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing the rest of the received bytes."""


_Pending = tuple[Request, _Body, bool] | None  # (request, body, keep-alive); None = bad request


class _Connection(asyncio.Protocol):
    """One client connection: parser callbacks, the request queue, writes, timers."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.buffered = 0
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_received = 0  # bytes received while a head was incomplete; see data_received
        self._in_head = False
        self._body: _Body | None = None
        self._queue: deque[_Pending] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._requests = 0
        self._stop_parsing = False  # no further request will be parsed on this connection
        self._lost = False
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._generation = 0
        self._closed = asyncio.Event()
        self._tls = False
        self._declared: int | None = None
        self._chunked = False
        self._expect = False
        self._eof = False  # the client closed its sending side
        self._dropped_input = False  # bytes arrived that will never be parsed
        self._head_timed_out = False  # a request head was cut off by header_timeout
        self._closing = False  # _close ran: nothing more is written
        self._linger_left = 0  # bytes still to drop while lingering; see _close
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self._peer = str(peer)
        self.server.connections.add(self)
        if self.server.closing:
            transport.close()
            return
        self.arm_timer(self.server.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._body is not None:
            self._body.fail("the client disconnected")
        for item in self._queue:
            if item is not None:
                item[1].fail("the client disconnected")
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.server.connections.discard(self)
        self._closed.set()
        self.server.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            self._linger_left -= len(data)  # dropped unbuffered: only the count is kept
            if self._linger_left <= 0:
                self._end_linger()
            return
        if self._stop_parsing and self._body is None:
            self._dropped_input = True
            self._pause_reading()  # nothing more will be parsed; stop receiving
            return
        if self._in_head:
            self._head_received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade/CONNECT request is answered as an ordinary request; the parser cannot
            # continue after it, so the connection closes after the response.
            self._stop_parsing = True
            self._dropped_input = True
        except httptools.HttpParserError:
            if not self._stop_parsing:
                self._bad_request()
            # else: a callback stopped the parse on purpose (request limit, shutdown)
            self._dropped_input = True
        if self._in_head and self._head_received > self.server.max_header_bytes:
            # httptools reports a header only once its line ends and keeps the unfinished line
            # in memory meanwhile, so on_header alone cannot bound an endless line. Counted
            # from the second read of a head on: the bound is off by one read at most.
            self._bad_request()
        if self.buffered > self.server.buffer_limit or len(self._queue) > self.server.max_pipeline:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._linger_timer is not None:
            return None  # the client has stopped sending: the transport closes now
        # A half-closed client still gets its pending responses; the worker closes after them.
        self._stop_parsing = True
        if self._body is not None:
            self._body.fail("the client closed its side before the end of the body")
        if self._in_head:
            self._in_head = False
        if self._worker is None and not self._queue:
            self._close()
        # Keeping the write side open is only possible without TLS (asyncio ignores it there).
        return None if self._tls else True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._stop_parsing:
            raise _StopParsing
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_received = 0
        self._declared = None
        self._chunked = False
        self._expect = False
        self.arm_timer(self.server.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        if len(self._headers) >= self.server.max_headers:
            raise _StopParsing  # -> 400
        # latin-1 maps every byte, so nothing a client sends can fail to decode
        key = name.decode("latin-1")
        text = value.decode("latin-1").strip(" \t")
        self._headers.append((key, text))
        if len(name) in _FRAMING_NAME_LENGTHS:
            lowered = key.lower()
            if lowered == "content-length":
                if self._declared is None:
                    try:
                        self._declared = int(text)  # §2.4: padded values are fine
                    except ValueError:
                        raise _StopParsing from None  # -> 400
            elif lowered == "transfer-encoding":
                self._chunked = self._chunked or "chunked" in text.lower()
            elif lowered == "expect":
                self._expect = text.lower() == "100-continue"

    def _grow_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.server.max_header_bytes:
            raise _StopParsing  # -> 400

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self.cancel_timer()
        headers = self._headers
        declared = None if self._chunked else self._declared
        expect = self._expect
        url = self._url
        target = url.decode("latin-1")
        if target.startswith("/"):
            path, _, query = target.partition("?")
            query = query.partition("#")[0]
        elif target == "*":
            path, query = "*", ""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _StopParsing from None  # -> 400
            path = (parsed.path or b"/").decode("latin-1")
            query = (parsed.query or b"").decode("latin-1")
        body = _Body(self, declared, expect)
        request = Request(
            method=parser.get_method().decode("ascii", "replace"),
            target=target,
            path=path,
            query_string=query,
            headers=headers,
            peer=self._peer,
            _read_chunk=body.read,
            content_length=declared,
            chunked=self._chunked,
            http_version=parser.get_http_version(),
        )
        self._body = body
        self._requests += 1
        keep_alive = parser.should_keep_alive() and self._requests < self.server.max_requests
        self._queue.append((request, body, keep_alive))
        if self._worker is None:
            self._worker = self.loop.create_task(self._work())

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.finish()
            self._body = None
        if self._requests >= self.server.max_requests or self.server.closing:
            self._stop_parsing = True  # D19: the 1000th request is the last one read

    # -- flow control and timers ------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None and not self._lost:
            self._read_paused = True
            self._transport.pause_reading()

    def maybe_resume_reading(self) -> None:
        if (
            self._read_paused
            and not self._lost
            and self.buffered <= self.server.buffer_limit // 2
            and len(self._queue) <= self.server.max_pipeline
            and (not self._stop_parsing or self._body is not None)
            and self._transport is not None
        ):
            self._read_paused = False
            self._transport.resume_reading()

    # One lazily moved timer per connection: arming only records a deadline, and the timer
    # handle is replaced only when the new deadline is earlier. Re-arming twice per request
    # with call_later cost about 6% of a keep-alive request (measured with bench/server_bench).

    def arm_timer(self, delay: float) -> int:
        """Start the connection's timeout; returns its generation for :meth:`cancel_timer`."""
        deadline = self.loop.time() + delay
        self._deadline = deadline
        self._generation += 1
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
        return self._generation

    def cancel_timer(self, generation: int | None = None) -> None:
        """Stop the timeout; with ``generation``, only if no later one was armed since."""
        if generation is None or generation == self._generation:
            self._deadline = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._lost:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self._lost or self._closing or self._transport is None:
            return
        current = self._queue[0] if self._queue else None
        waiting = self._body_waited_on()
        if waiting is not None:
            waiting.fail("no body data within the idle timeout", timed_out=True)
            self._stop_parsing = True
        elif self._worker is not None or current is not None:
            # A slow pipelined head: finish the current response, then 408 (see _work).
            self._stop_parsing = True
            self._head_timed_out = self._in_head
            self._in_head = False
        elif self._in_head:
            self._head_timed_out = True
            self._stop_parsing = True
            self.write(_REQUEST_TIMEOUT)
            self._close()
        else:
            self._transport.close()  # idle between requests: nothing to answer

    def _body_waited_on(self) -> _Body | None:
        body = self._body
        if body is not None and body.waiter is not None:
            return body
        return None

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self._lost and not self._closing and self._transport is not None:
            self._transport.write(data)

    async def _drain(self) -> None:
        while self._write_paused and not self._lost:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def _close(self) -> None:
        """Close once what is written has gone; linger first if the client may be sending."""
        transport = self._transport
        if transport is None or self._lost or self._closing:
            return
        self._closing = True
        self.cancel_timer()
        if not self._client_may_send() or not transport.can_write_eof():
            transport.close()  # TLS cannot shut down one direction: close once flushed
            return
        # Closing a socket with unread input sends a reset, and a reset can make the client's
        # stack drop the response it has not read yet (RFC 9112 §9.6). Half-close instead, so
        # the client reads the response and then end-of-file, and drop what it still sends.
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (a reset raced the shutdown)
            transport.close()
            return
        self._linger_left = LINGER_BYTES
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._end_linger)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _client_may_send(self) -> bool:
        """Whether request bytes may still arrive that this connection will not read."""
        if self._eof:
            return False
        body = self._body
        return (
            self._dropped_input
            or self._in_head
            or self._head_timed_out
            or (body is not None and not body.complete)
        )

    def _end_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._transport is not None and not self._lost:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now (shutdown grace exceeded)."""
        self._abort_transport()
        if self._worker is not None:
            self._worker.cancel()

    def _abort_transport(self) -> None:
        self._closing = True
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def shutdown(self) -> None:
        """Graceful close: finish the response in flight, then close."""
        self._stop_parsing = True
        if self._worker is None and not self._queue:
            self._close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- the worker -------------------------------------------------------------------------

    async def _work(self) -> None:
        try:
            await self._work_queue()
        except Exception:  # a bug in this layer: never leave the client hanging
            logger.exception("HTTP connection failed; closing it")
            self._abort_transport()
            self._queue.clear()
        finally:
            self._worker = None
        if self._lost or self._closing:
            return
        if self._stop_parsing and self._body is None:
            if self._head_timed_out:
                # The last response kept the connection open, so the client awaits an answer
                # to the head cut off meanwhile.
                self.write(_REQUEST_TIMEOUT)
            self._close()
        elif not self._in_head and self._body is None:
            self.arm_timer(self.server.idle_timeout)

    async def _work_queue(self) -> None:
        while self._queue and not self._lost:
            item = self._queue[0]
            if item is None:
                self._queue.clear()
                self.write(_BAD_REQUEST)  # §4.3: invalid HTTP -> 400, empty body, close
                self._close()
                return
            request, body, keep_alive = item
            if not await self._serve_one(request, body, keep_alive):
                self._queue.clear()
                self._close()
                return
            self._queue.popleft()
            self.maybe_resume_reading()

    async def _serve_one(self, request: Request, body: _Body, keep_alive: bool) -> bool:
        """Handle one request and write its response; False when the connection must close."""
        try:
            response = await self.server.handler(request)
        except RequestAborted:
            if not self._lost:
                self.write(_BAD_REQUEST)
            return False
        except Exception:
            logger.exception(
                "handler failed on %s %s from %s",
                request.method,
                _loggable(request.path),
                request.peer,
            )
            response = Response.empty(500)
        if not isinstance(response, Response):
            logger.error(
                "handler returned %s, not a Response, on %s %s",
                type(response).__name__,
                request.method,
                _loggable(request.path),
            )
            response = Response.empty(500)
        if self._lost:
            return False
        close = (
            not keep_alive
            or self.server.closing
            or body.error is not None
            or (self._stop_parsing and len(self._queue) <= 1 and self._body in (None, body))
        )
        # The handler may leave part of the body unread. What has arrived is dropped; what is
        # still to come is read and dropped before the next request, unless the unread total
        # is over drain_limit (or unknown): then a new connection is cheaper.
        unread = body.unread()
        if unread is None or unread > self.server.drain_limit:
            close = True
        elif body.continue_pending and body.received == 0 and not body.complete:
            close = True  # the client still waits for 100-continue: it may never send
        drain = not close and not body.complete
        if close:
            self._stop_parsing = True  # nothing after this response is answered
        if close or not drain:
            body.drop_buffered()
        try:
            close = await self._send(response, close, request.http_version == "1.0")
        except _AbortConnection:
            self._abort_transport()
            return False
        if close:
            return False
        if drain:
            try:
                await body.discard()
            except RequestAborted:
                return False
        return True

    async def _send(self, response: Response, close: bool, http10: bool) -> bool:
        """Write ``response``; returns whether the connection must close after it.

        ``http10``: the request was HTTP/1.0 (see :func:`_encode_head`).
        """
        payload = response.body
        try:
            if isinstance(payload, FileSegment):
                return await self._send_file(response, payload, close, http10)
            head, close = _encode_head(response, len(payload), close, http10)
        except _InvalidResponse as exc:
            logger.error("invalid response (%s); answering 500", exc)
            head, close = _encode_head(Response.empty(500), 0, close, http10)
            payload = b""
        if len(payload) <= SMALL_SEGMENT:
            self.write(head + payload)  # D7: headers and body in one write
        else:
            self.write(head)
            self.write(payload)
        await self._drain()
        return close

    async def _send_file(
        self, response: Response, segment: FileSegment, close: bool, http10: bool
    ) -> bool:
        head, close = _encode_head(response, segment.length, close, http10)
        if segment.length <= SMALL_SEGMENT:
            try:
                data = _read_segment(segment)
            except OSError as exc:
                return await self._fallback(segment, exc, close, http10)
            self.write(head + data)  # D7: the small range shares the write with the headers
            await self._drain()
            return close
        try:
            # os.open: no buffered reader needed, sendfile reads the descriptor itself
            file = os.fdopen(os.open(segment.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), "rb")
        except OSError as exc:
            return await self._fallback(segment, exc, close, http10)
        with file:
            try:
                size = os.fstat(file.fileno()).st_size
            except OSError as exc:
                return await self._fallback(segment, exc, close, http10)
            if size < segment.offset + segment.length:
                return await self._fallback(
                    segment, OSError(f"{segment.path} has {size} bytes only"), close, http10
                )
            self.write(head)
            await self._sendfile(file, segment)
        return close

    async def _fallback(
        self, segment: FileSegment, exc: OSError, close: bool, http10: bool
    ) -> bool:
        logger.error("cannot read file segment: %s", exc)
        fallback = segment.fallback
        if fallback is None or isinstance(fallback.body, FileSegment):
            fallback = Response.empty(500)
        return await self._send(fallback, close, http10)

    async def _sendfile(self, file: Any, segment: FileSegment) -> None:
        transport = self._transport
        if transport is None or self._lost:
            raise _AbortConnection
        try:
            sent = await self.loop.sendfile(transport, file, segment.offset, segment.length)
        except (NotImplementedError, RuntimeError, TypeError):
            sent = await self._copy_file(file, segment)  # e.g. uvloop without sendfile
        except (OSError, ConnectionError) as exc:
            logger.warning("file send failed after the headers: %s", exc)
            raise _AbortConnection from exc
        if sent != segment.length:
            logger.error("file shrank while being sent: %d of %d bytes", sent, segment.length)
            raise _AbortConnection

    async def _copy_file(self, file: Any, segment: FileSegment) -> int:
        fd = file.fileno()
        sent = 0
        while sent < segment.length and not self._lost:
            try:
                data = os.pread(fd, min(_LARGE_CHUNK, segment.length - sent), segment.offset + sent)
            except OSError as exc:
                raise _AbortConnection from exc
            if not data:
                break
            self.write(data)
            sent += len(data)
            await self._drain()
        return sent

    def _bad_request(self) -> None:
        self._stop_parsing = True
        self._dropped_input = True  # the rest of the stream is not parsed
        self._in_head = False
        self.cancel_timer()
        if self._body is not None:
            self._body.fail("invalid body framing")
            self._body = None
        else:
            self._queue.append(None)
            if self._worker is None:
                self._worker = self.loop.create_task(self._work())


class _AbortConnection(Exception):
    """The response cannot be completed; the connection is aborted."""


# ---------------------------------------------------------------------------------------------
# Servers


class HttpServer:
    """An HTTP/1.1 server running ``handler`` on the current event loop.

    Use ``await server.start(host=..., port=...)`` (or ``sock=`` for a pre-bound listening
    socket shared by worker processes), then ``await server.serve_forever()``; ``await
    server.close()`` shuts down gracefully. Options:

    - ``max_requests``: requests per connection before it closes (D19; OneNET closes at 1000).
    - ``idle_timeout``: seconds a keep-alive connection may stay quiet between requests, and the
      longest wait for body bytes the handler is reading.
    - ``header_timeout``: seconds from the first byte of a request to the end of its head;
      past it -> 408 and close.
    - ``max_header_bytes`` / ``max_headers``: limits on the head; past them -> 400.
    - ``buffer_limit``: unread body bytes per connection before reading pauses.
    - ``drain_limit``: unread body bytes discarded to keep a connection alive; more -> close.
    - ``max_pipeline``: queued pipelined requests per connection before reading pauses.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_requests: int = 1000,
        idle_timeout: float = 15.0,
        header_timeout: float = 10.0,
        max_header_bytes: int = 16 * 1024,
        max_headers: int = 64,
        buffer_limit: int = 256 * 1024,
        drain_limit: int = 64 * 1024,
        max_pipeline: int = 32,
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.handler = handler
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.buffer_limit = buffer_limit
        self.drain_limit = drain_limit
        self.max_pipeline = max_pipeline
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_closed: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on (set by :meth:`start`)."""
        if self._loop is None:
            raise RuntimeError("the server has not been started")
        return self._loop

    async def start(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        ssl: _ssl.SSLContext | None = None,
        backlog: int = 1024,
    ) -> None:
        """Start listening: on ``host``/``port``, or on the already bound socket ``sock``."""
        self._loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._stopped = asyncio.Event()
        if sock is not None:
            if host is not None or port is not None:
                raise ValueError("pass either sock or host/port, not both")
            self._server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, ssl=ssl, backlog=backlog
            )
        else:
            self._server = await self._loop.create_server(
                lambda: _Connection(self),
                host=host or "127.0.0.1",
                port=port or 0,
                ssl=ssl,
                backlog=backlog,
                reuse_address=True,
            )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        if self._server is None:
            return ()
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        for sock in self.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("the server is not listening")

    async def serve_forever(self) -> None:
        """Run until :meth:`close` is called; on cancellation, close gracefully first."""
        if self._stopped is None:
            raise RuntimeError("call start() first")
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight responses finish within ``grace`` s, abort the rest."""
        if self._server is None or self._all_closed is None:
            return
        self.closing = True
        self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        if self.connections:
            for conn in list(self.connections):
                conn.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._stopped is not None:
            self._stopped.set()

    def connection_closed(self) -> None:
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


async def serve(
    handler: Handler,
    *,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    ssl: _ssl.SSLContext | None = None,
    ready: Callable[[HttpServer], object] | None = None,
    **options: Any,
) -> None:
    """Serve ``handler`` until cancelled, then shut down gracefully.

    ``sock`` is a bound, listening socket (several worker processes may share one); otherwise
    ``host``/``port`` are bound here. ``ready(server)`` is called once the server listens.
    ``options`` are :class:`HttpServer`'s keyword options.
    """
    server = HttpServer(handler, **options)
    await server.start(host=host, port=port, sock=sock, ssl=ssl)
    if ready is not None:
        ready(server)
    await server.serve_forever()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if installed (optional, not a dependency), else asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ServerThread:
    """A server running in a background thread with its own event loop; a context manager.

    ``with ServerThread(handler) as srv: httpx2.get(srv.url + "/path")``. ``sock`` is an
    optional bound, listening socket to serve on instead of ``host``/``port``. Entering returns once
    the socket listens (startup errors, such as a port in use, are raised there); leaving closes
    gracefully for up to ``shutdown_timeout`` seconds, then aborts connections, and never waits
    on the thread longer than that. ``options`` are :class:`HttpServer`'s keyword options.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: _ssl.SSLContext | None = None,
        *,
        sock: socket.socket | None = None,
        shutdown_timeout: float = 5.0,
        startup_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        self.host = host
        self.port = port
        self._sock = sock
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
        self._handler = handler
        self._ssl = ssl
        self._options = options
        self._shutdown_timeout = shutdown_timeout
        self._startup_timeout = startup_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.server: HttpServer | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server thread's event loop (for ``call_soon_threadsafe``)."""
        if self._loop is None:
            raise RuntimeError("the server thread is not running")
        return self._loop

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (``https`` with TLS), without a trailing slash."""
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> None:
        """Start the thread and wait until the server listens."""
        self._thread = threading.Thread(target=self._run, name="onenet-ota-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._startup_timeout):
            raise RuntimeError("the HTTP server did not start in time")
        if self._error is not None:
            self._thread.join(self._shutdown_timeout)
            raise self._error

    def stop(self) -> None:
        """Shut down and join the thread (bounded by ``shutdown_timeout`` + a little)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(self._shutdown_timeout + 2.0)
            if self._thread.is_alive():
                logger.error("the HTTP server thread did not stop in time; leaving it behind")
            self._thread = None

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported to the starting thread, or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                logger.exception("the HTTP server thread failed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = HttpServer(self._handler, **self._options)
        if self._sock is not None:
            await server.start(sock=self._sock, ssl=self._ssl)
        else:
            await server.start(host=self.host, port=self.port, ssl=self._ssl)
        self.server = server
        self.port = server.port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.close(grace=self._shutdown_timeout)


# ---------------------------------------------------------------------------------------------
# TLS

# §2.2/D25: the C SDK offers only these four static-RSA AES-CBC suites, over TLS 1.2 only.
C_SDK_CIPHERS: Final = "AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA"
_MODERN_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES"


def make_server_ssl_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    c_sdk_compatible: bool,
) -> _ssl.SSLContext:
    """A server TLS context for ``certfile``/``keyfile`` (PEM).

    With ``c_sdk_compatible`` it also accepts the official C SDK's handshake (§2.2, D25): TLS 1.2
    with the four RSA AES-CBC suites, which need an RSA certificate. Modern suites stay
    preferred, so other clients still get forward secrecy. Without it: TLS 1.2+ with Python's
    default suites, which the C SDK cannot negotiate.
    """
    context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if c_sdk_compatible:
        context.set_ciphers(f"{_MODERN_CIPHERS}:{C_SDK_CIPHERS}")
        context.options |= _ssl.OP_CIPHER_SERVER_PREFERENCE
    return context

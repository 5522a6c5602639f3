"""A scripted HTTP/1.1 server on loopback for the device client tests.

It records every request exactly as received (raw bytes, then parsed) and answers each one with
the next canned action of its script: raw response bytes written in one ``sendall`` (optionally in
several timed pieces), a connection closed without a reply, or a request left hanging. Connections
are kept alive unless an action says otherwise, so connection reuse is exercised too.

A request that arrives when the script is empty is answered with a 599 and remembered in
``unexpected``; the ``server`` fixture fails the test if that list is not empty. A test that needs
a platform with state instead sets ``handler``: it answers every request the script does not
(tests/device/dialect_platform.py is one).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from onenet_ota.protocol import messages
from onenet_ota.protocol.codes import REPLY_TEXTS, Dialect
from onenet_ota.protocol.dialects import DIALECTS
from onenet_ota.protocol.envelopes import FUSE_ENVELOPE
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.framing import error_reply, success_reply
from onenet_ota.protocol.ranges import format_content_range

REASONS = {200: "OK", 206: "Partial Content", 404: "Not Found", 500: "Internal Server Error"}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived: ``raw`` is every byte of it, head and body."""

    raw: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    port: int  # the server port it arrived on
    # Whole in the server's buffer before the server answered the request before it on the
    # connection: the client wrote it without waiting for that reply (pipelining).
    queued: bool = False

    @property
    def path(self) -> str:
        """The path without the query."""
        return urlsplit(self.target).path

    @property
    def query(self) -> list[tuple[str, str]]:
        """The query parameters in order."""
        return parse_qsl(urlsplit(self.target).query, keep_blank_values=True)

    @property
    def query_string(self) -> str:
        """The raw query string."""
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def header_names(self) -> list[str]:
        """Header names as sent (casing kept)."""
        return [k for k, _ in self.headers]


@dataclass(frozen=True)
class Reply:
    """Send ``data`` in one write; then each of ``more`` after ``gap`` seconds; maybe close.

    ``after_next``: first wait until the client has written the next request on this
    connection (a pipelining client does so without waiting for this reply); if it has not
    within :attr:`ScriptedServer.after_next_wait` seconds, reply anyway and count it in
    :attr:`ScriptedServer.waited_in_vain`.
    """

    data: bytes
    close: bool = False
    more: tuple[bytes, ...] = ()
    gap: float = 0.0
    after_next: bool = False
    # With close: close the way RFC 9112 §9.6 asks, sending FIN first and reading what the
    # client still sends until it closes too; an abrupt close with unread requests makes the
    # server's kernel reset the connection, and the client may lose the replies already sent.
    linger: bool = False


@dataclass(frozen=True)
class Drop:
    """Close the connection without replying."""


@dataclass(frozen=True)
class Hang:
    """Never reply; the connection stays open until the server stops."""


Action = Reply | Drop | Hang


def raw_response(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    content_length: bool = True,
) -> bytes:
    """Response bytes: status line, headers in the given order, then Content-Length and body."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_reply(body: bytes | dict[str, Any], *, status: int = 200, close: bool = False) -> Reply:
    """A JSON reply with an exact Content-Length (§2.5's canonical form)."""
    data = body if isinstance(body, bytes) else messages.dumps(body)
    return Reply(raw_response(status, data, [("Content-Type", "application/json")]), close=close)


def envelope(errno: int | Errno = 0, error: str | None = None, data: Any = None) -> Reply:
    """``{"errno":N,"error":"text"[,"data":...]}``; the text defaults to the project's (D2)."""
    if error is None:
        error = Errno(errno).text if errno in Errno._value2member_map_ else "error"
    body: dict[str, Any] = {"errno": int(errno), "error": error}
    if data is not None:
        body["data"] = data
    return json_reply(body)


def download_reply(data: bytes, start: int, end: int, total: int) -> Reply:
    """A canonical 206 (§6.6.3) with Content-Range last."""
    return Reply(
        raw_response(
            206,
            data,
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Disposition", 'attachment; filename="firmware.bin"'),
                ("Content-Range", format_content_range(start, end, total)),
            ],
        )
    )


def whole_file_reply(data: bytes) -> Reply:
    """A 200 without Content-Range: the whole file (§6.6.3)."""
    return Reply(raw_response(200, data, [("Content-Type", "application/octet-stream")]))


def error_byte_reply(code: bytes, *, chunked: bool = True) -> Reply:
    """The one-byte download error (§6.6.4): 200, no Content-Length, chunked or close-delimited."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    if chunked:
        size = f"{len(code):x}".encode()
        return Reply(
            head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + code + b"\r\n0\r\n\r\n"
        )
    return Reply(head + b"Connection: close\r\n\r\n" + code, close=True)


@dataclass
class _Conn:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


class ScriptedServer:
    """The server; use as a context manager (or ``start``/``stop``)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.requests: list[RecordedRequest] = []
        self.unexpected: list[RecordedRequest] = []
        self.connections = 0
        self.waited_in_vain = 0
        self.after_next_wait = 5.0
        self._script: deque[Action] = deque()
        self.handler: Callable[[RecordedRequest], Action] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS)."""
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``, as an ``ipPort`` value."""
        return f"127.0.0.1:{self.port}"

    def add(self, *actions: Action) -> None:
        """Append actions to the script."""
        with self._lock:
            self._script.extend(actions)

    @property
    def pending(self) -> int:
        """Actions not yet used."""
        with self._lock:
            return len(self._script)

    def start(self) -> ScriptedServer:
        """Start accepting connections."""
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close every socket and join every thread."""
        self._stopping.set()
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(sock)
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(_Conn(sock),), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: _Conn) -> None:
        try:
            if self._ssl_context is not None:
                conn.sock = self._ssl_context.wrap_socket(conn.sock, server_side=True)
                with self._lock:
                    self._socks.append(conn.sock)  # so that stop() can shut it down
            while not self._stopping.is_set():
                request = self._read_request(conn)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                    action = self._script.popleft() if self._script else None
                if action is None and self.handler is not None:
                    action = self.handler(request)
                if action is None:
                    self.unexpected.append(request)
                    conn.sock.sendall(raw_response(599, b"no scripted reply"))
                    continue
                if isinstance(action, Drop):
                    return
                if isinstance(action, Hang):
                    self._stopping.wait()
                    return
                if action.after_next:
                    self._wait_for_next(conn)
                conn.sock.sendall(action.data)
                for piece in action.more:
                    time.sleep(action.gap)
                    conn.sock.sendall(piece)
                if action.close:
                    if action.linger:
                        self._linger(conn)
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _linger(self, conn: _Conn) -> None:
        conn.sock.shutdown(socket.SHUT_WR)
        conn.sock.settimeout(self.after_next_wait)
        with contextlib.suppress(OSError):
            while conn.sock.recv(65536):
                pass

    def _wait_for_next(self, conn: _Conn) -> None:
        conn.sock.settimeout(self.after_next_wait)
        try:
            while b"\r\n\r\n" not in conn.buffer:
                if not self._fill(conn):
                    break
        except TimeoutError:
            with self._lock:
                self.waited_in_vain += 1
        finally:
            conn.sock.settimeout(None)

    def _read_request(self, conn: _Conn) -> RecordedRequest | None:
        queued = True
        while b"\r\n\r\n" not in conn.buffer:
            queued = False
            if not self._fill(conn):
                return None
        head_end = conn.buffer.index(b"\r\n\r\n") + 4
        head = bytes(conn.buffer[:head_end]).decode("latin-1")
        request_line, *header_lines = head[:-4].split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = []
        for line in header_lines:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        while len(conn.buffer) < head_end + length:
            queued = False
            if not self._fill(conn):
                return None
        raw = bytes(conn.buffer[: head_end + length])
        del conn.buffer[: head_end + length]
        return RecordedRequest(raw, method, target, headers, raw[head_end:], self.port, queued)

    @staticmethod
    def _fill(conn: _Conn) -> bool:
        data = conn.sock.recv(65536)
        if not data:
            return False
        conn.buffer += data
        return True


# -- Studio and fuse (§12, §13) --------------------------------------------------------------
# Replies are rendered by the protocol core's own encoders (envelopes, framing), the ones the
# server will use, so these tests also check that the SDK reads what the core writes.


def fuse_envelope(code: int = 0, msg: str | None = None, data: Any = None) -> Reply:
    """``{"code":N,"msg":"text","request_id":"..."[,"data":...]}`` (§13.2)."""
    text = msg if msg is not None else REPLY_TEXTS[Dialect.FUSE].get(code, "error")
    body = FUSE_ENVELOPE.encode(code, text, data, request_id="0123456789abcdef0123456789abcdef")
    return Reply(raw_response(200, body, [("Content-Type", FUSE_ENVELOPE.content_type)]))


def dialect_download(
    dialect: Dialect, data: bytes, start: int, end: int, total: int, *, partial: bool = True
) -> Reply:
    """A successful Studio/fuse download as the protocol core frames it (§12.3, §13.4)."""
    reply = success_reply(
        DIALECTS[dialect].framing,
        file_name="firmware.bin",
        length=total,
        start=start,
        end=end,
        partial=partial,
        body=data,
    )
    return Reply(reply.to_bytes())


def dialect_download_error(dialect: Dialect, code: int) -> Reply:
    """A Studio/fuse download error carrying ``Ota-Errno: code`` (§12.3, F8), status 200."""
    return Reply(error_reply(DIALECTS[dialect].framing, code).to_bytes())

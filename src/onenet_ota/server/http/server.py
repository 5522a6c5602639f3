"""The server: listening sockets, the accept loop with its connection cap, and the lifecycle
(start, serve forever, graceful close); :func:`serve` for worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import socket
import ssl as _ssl
import time
from collections.abc import Callable
from typing import Final

from onenet_ota.server.http.connection import Connection
from onenet_ota.server.http.models import Handler, Limits

__all__ = [
    "ACCEPT_LOG_INTERVAL",
    "ACCEPT_PAUSE_SECONDS",
    "HttpServer",
    "LogThrottle",
    "new_event_loop",
    "serve",
]

logger = logging.getLogger(__name__)


class HttpServer:
    """An HTTP/1.1 server running ``handler`` on the current event loop.

    Use ``await server.start(host=..., port=...)`` (or ``sock=`` for a pre-bound listening
    socket shared by worker processes), then ``await server.serve_forever()``; ``await
    server.close()`` shuts down gracefully. ``limits`` bounds what clients may do (default:
    :class:`Limits`'s defaults).
    """

    def __init__(self, handler: Handler, limits: Limits | None = None) -> None:
        self.handler = handler
        self.limits = limits if limits is not None else Limits()
        self.connections: set[Connection] = set()
        self.closing = False
        self._listeners: list[socket.socket] = []
        self._ssl: _ssl.SSLContext | None = None
        self._backlog = 1024
        self._accepting = False
        self._active = 0  # accepted connections not yet closed, handshaking ones included
        self._connecting: set[asyncio.Task[None]] = set()
        self._accept_errors = LogThrottle(ACCEPT_LOG_INTERVAL)
        self._refusals = LogThrottle(ACCEPT_LOG_INTERVAL)
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
        self._ssl = ssl
        self._backlog = backlog
        if sock is not None:
            if host is not None or port is not None:
                raise ValueError("pass either sock or host/port, not both")
            sock.setblocking(False)
            self._listeners = [sock]
        else:
            self._listeners = _bind(host or "127.0.0.1", port or 0, backlog)
        self._resume_accepting()

    # The accept loop is the layer's own rather than asyncio's create_server: asyncio counts no
    # connections against a limit, logs a traceback for every failed accept at the descriptor
    # limit, and hands a TLS connection to the protocol only after its handshake, so a
    # handshaking client would be invisible to a connection cap.

    def _resume_accepting(self) -> None:
        if self._accepting or self.closing:
            return
        self._accepting = True
        for listener in self._listeners:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for listener in self._listeners:
            if listener.fileno() >= 0:
                self.loop.remove_reader(listener.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):  # as asyncio does: at most a backlog per wake-up
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker process took it, or the backlog is empty
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Every retry would fail the same way until descriptors are released:
                    # pause instead of spinning, and say so once per interval.
                    count = self._accept_errors.hit()
                    if count is not None:
                        logger.warning(
                            "cannot accept connections: %s (%d time(s) since the last report; "
                            "%d connection(s) open); pausing accepts for %.1f s",
                            exc.strerror or exc,
                            count,
                            self._active,
                            ACCEPT_PAUSE_SECONDS,
                        )
                    self._pause_accepting()
                    self.loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume_accepting)
                    return
                continue  # the client went away before the accept (ECONNABORTED and kin)
            if self._active >= self.limits.max_connections or self.closing:
                # Closing costs one system call and no memory; the client may retry later.
                conn.close()
                count = self._refusals.hit()
                if count is not None and not self.closing:
                    logger.warning(
                        "connection limit (%d) reached: closed %d new connection(s) since the "
                        "last report",
                        self.limits.max_connections,
                        count,
                    )
                continue
            conn.setblocking(False)
            self._active += 1
            task = self.loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        """Make ``conn`` a transport with its :class:`Connection` (after a TLS handshake)."""
        protocol = Connection(self)
        try:
            await self.loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=(
                    self.limits.handshake_timeout if self._ssl is not None else None
                ),
            )
        except BaseException as exc:
            if not protocol.made:  # else connection_lost releases the slot
                conn.close()
                self._release()
            if not isinstance(exc, Exception):
                raise
            # A failed or timed-out TLS handshake: nothing to answer, nobody to tell.
            logger.debug("connection setup failed: %r", exc)

    def _release(self) -> None:
        self._active -= 1

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(sock for sock in self._listeners if sock.fileno() >= 0)

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
        if self._all_closed is None or self._stopped is None:
            return
        if self.closing:  # another caller is closing: wait for it
            await self._stopped.wait()
            return
        self._pause_accepting()
        self.closing = True
        for listener in self._listeners:
            listener.close()
        for task in list(self._connecting):
            task.cancel()
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
        if self._connecting:
            await asyncio.wait(list(self._connecting), timeout=1.0)
        if self._stopped is not None:
            self._stopped.set()

    def connection_closed(self) -> None:
        """A connection that was made is gone: its slot is free."""
        self._release()
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ACCEPT_PAUSE_SECONDS: Final = 1.0
"""How long accepting pauses when the process or system is out of descriptors (as asyncio's own
accept loop does), so that the loop does not spin on an accept that cannot succeed."""

ACCEPT_LOG_INTERVAL: Final = 10.0
"""At most one warning per this many seconds for failed accepts, and one for refused ones."""


class LogThrottle:
    """Counts a repeating event and says when to report it: at most once per ``interval``.

    A flood of one condition (accepts failing at the descriptor limit, thousands a second) then
    makes one log line per interval carrying the count, instead of one line (and traceback)
    each.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._count = 0

    def hit(self) -> int | None:
        """Count one event; the events to report now (this one included), or None for quiet."""
        self._count += 1
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + self.interval
        count, self._count = self._count, 0
        return count


def _bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's create_server)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(
    handler: Handler,
    *,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    ssl: _ssl.SSLContext | None = None,
    ready: Callable[[HttpServer], object] | None = None,
    limits: Limits | None = None,
) -> None:
    """Serve ``handler`` until cancelled, then shut down gracefully.

    ``sock`` is a bound, listening socket (several worker processes may share one); otherwise
    ``host``/``port`` are bound here. ``ready(server)`` is called once the server listens.
    ``limits``: see :class:`HttpServer`.
    """
    server = HttpServer(handler, limits)
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

"""A server of the project's HTTP layer in a background thread with its own event loop: the
tests' (and the benchmarks') way to run one next to blocking clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as _ssl
import threading
from collections.abc import Callable
from types import TracebackType

from onenet_ota.server.http import Handler, HttpServer, Limits, new_event_loop

__all__ = ["ServerThread"]

logger = logging.getLogger(__name__)


class ServerThread:
    """A server running in a background thread with its own event loop; a context manager.

    ``with ServerThread(handler) as srv: httpx2.get(srv.url + "/path")``. ``sock`` is an
    optional bound, listening socket to serve on instead of ``host``/``port``. Entering returns once
    the socket listens (startup errors, such as a port in use, are raised there); leaving closes
    gracefully for up to ``shutdown_timeout`` seconds, then aborts connections, and never waits
    on the thread longer than that. ``limits``: see :class:`HttpServer`. ``loop_factory``: the
    server's event loop (default: what ``onenet-ota serve`` runs on).
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
        limits: Limits | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
    ) -> None:
        self.host = host
        self.port = port
        self._sock = sock
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
        self._handler = handler
        self._ssl = ssl
        self._limits = limits
        self._loop_factory = loop_factory
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
            with asyncio.Runner(loop_factory=self._loop_factory) as runner:
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
        server = HttpServer(self._handler, self._limits)
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

"""The device SDK's own HTTP/1.1 transport: plain sockets (sync) and an asyncio protocol (async).

Theory of operation. A client hands its transport a list of :class:`~onenet_ota.device._core.Call`
objects; the transport answers each one's :class:`~onenet_ota.device._http.Result` (an outcome or
a failure carrying the SDK's error). Framing and judging are sans-IO
(:class:`~onenet_ota.device._http.Exchange` over llhttp, and the calls themselves); the two
classes here only connect, write, read, watch the clock and map socket errors, one with blocking
sockets and one with an asyncio protocol. They share :class:`_Plan`, which decides what to send on
which connection and what to retry.

- **Keep-alive.** An idle connection per origin is kept (up to :data:`MAX_IDLE` per origin) unless
  ``keep_alive`` is False, in which case every request says ``Connection: close`` and gets a
  connection of its own (a field device that cannot keep sockets open).
- **Reconnection** (§10). A request whose reply did not begin when the connection ended (a kept
  connection the server closed while idle, a reset) is sent once more on a new connection. A
  reply byte, or a timeout, rules that out, so nothing is ever done twice on the client's word.
- **Pipelining.** With ``pipeline=True`` consecutive calls to one origin are written back to back
  before their replies are read (RFC 9112 §9.3.2). A server that answers the first and closes
  (one that does not pipeline) leaves the rest unanswered: they are sent again, one at a time,
  and the transport stops pipelining for the rest of its life. Each call's result is final once
  its reply arrived, so no reply is reported twice.
- **A window.** :meth:`SyncTransport.start` with ``after`` writes its calls behind an earlier
  flight whose replies are still unread, on that flight's connection: several flights in
  flight on one connection, finished in the order they were started. The connection goes back
  to the pool once none is unread. When it ends early (the server closed after a reply, or an
  earlier flight was dropped), the flights behind find their replies unanswered and are sent
  again, one at a time if the server had answered before it closed (it does not pipeline).
  Only the caller decides what is safe to send ahead: the upgrader sends token checks and
  downloads, never a report.
- **Sent ahead.** :meth:`SyncTransport.start` sends (the first batch of) the calls and returns;
  :meth:`SyncTransport.finish` reads their replies later, so the caller works while the server
  answers (the upgrader writes and hashes a chunk while the next one is in flight);
  :meth:`SyncTransport.abandon` closes the connection of calls whose replies are not wanted.
  :meth:`SyncTransport.exchange` is the two at once.
- **Time.** Each call's whole exchange (connect, write, read) is bounded by its
  :class:`~onenet_ota.device.config.Timeout`; the connect alone by ``connect_ms``.
- **TLS** with verification (the system's CA store, or a CA file) or without it.
- **Size.** A reply head is at most :data:`~onenet_ota.device._http.MAX_HEAD` bytes; a body at
  most what its call allows (the core's body reader refuses the rest without reading it).

The async transport needs an asyncio event loop (AnyIO on asyncio included); inject an
``httpx2.AsyncClient`` for trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, cast
from urllib.parse import urlsplit

from onenet_ota.device._core import Call, WireRequest
from onenet_ota.device._http import Exchange, Failure, ReplyParser, Result, encode_request
from onenet_ota.device.errors import OtaError, RequestTimeout, TransportError

MAX_IDLE: Final = 4
"""Idle connections kept per origin (an async client may run several calls at once)."""
READ_SIZE: Final = 256 * 1024
# Encoded requests and split URLs kept per transport (see _Base._encoded and _Base._target): a
# task's token check and download, an E7 or two.
_ENCODED_MAX: Final = 16
# While pipelined replies are outstanding the client has nothing to send, so its ACKs are
# delayed (up to 40 ms on Linux); a server whose socket keeps Nagle's algorithm then holds the
# next reply until that ACK comes. Measured: 46 ms per pipelined pair without quick ACKs, under
# 1.5 ms with them. Linux only; elsewhere the option does not exist and nothing is set.
_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
# How far short of a deadline a blocking socket's timeout is set (see _SyncConn).
_TIMEOUT_SLACK: Final = 1.0


class Origin(NamedTuple):
    """Where a request goes: scheme, host and port."""

    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        """The ``Host`` value: the port only when it is not the scheme's default."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _split(url: str) -> tuple[Origin, str, str]:
    """The URL's origin, request target and ``Host`` value, as :func:`urlsplit` reads it.

    Each transport keeps the URLs it split (:meth:`_Base._target`): a device sends the same few
    over and over (a task's token check and download), so the parse is paid once per URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    origin = Origin(scheme, parts.hostname or "", port)
    return origin, target, origin.host_header


def _connect_error(call: Call[Any], origin: Origin, exc: BaseException) -> OtaError:
    if isinstance(exc, TimeoutError | socket.timeout):
        return RequestTimeout(
            f"timed out after {call.request.timeout.ms} ms (connecting)", endpoint=call.endpoint
        )
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        return TransportError(f"TLS with {origin.host} failed: {reason}", endpoint=call.endpoint)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TransportError(
        f"cannot connect to {origin.host}:{origin.port}: {detail}", endpoint=call.endpoint
    )


def _io_error(call: Call[Any], exc: BaseException, *, got_head: bool) -> OtaError:
    if isinstance(exc, TimeoutError | socket.timeout):
        if got_head:
            return call.timeout_error()
        return RequestTimeout(
            f"timed out after {call.request.timeout.ms} ms (waiting for the reply)",
            endpoint=call.endpoint,
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"TLS failed: {exc.reason or exc}", endpoint=call.endpoint)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TransportError(f"the connection failed: {detail}", endpoint=call.endpoint)


class _Plan:
    """What to send next and what to retry; shared by the sync and the async transport.

    Each call may be sent once more after its reply failed to begin (§10); a call left
    unanswered because the server closed after answering an earlier pipelined one does not use
    that chance up, since the server demonstrably stopped reading before it.
    """

    __slots__ = (
        "calls",
        "deadlines",
        "pipeline",
        "refused_pipelining",
        "results",
        "retried",
        "targets",
    )

    def __init__(
        self,
        calls: Sequence[Call[Any]],
        pipeline: bool,
        split: Callable[[str], tuple[Origin, str, str]] = _split,
    ) -> None:
        self.calls = calls = list(calls)
        self.pipeline = pipeline
        self.results: list[Result | None] = [None] * len(calls)
        self.retried = [False] * len(calls)
        now = time.monotonic()
        if len(calls) == 1:  # most calls go alone: no comprehensions
            request = calls[0].request
            self.targets = [split(request.url)]
            self.deadlines = [now + request.timeout.ms / 1000]
        else:
            requests = [call.request for call in calls]
            self.targets = [split(request.url) for request in requests]
            self.deadlines = [now + request.timeout.ms / 1000 for request in requests]
        self.refused_pipelining = False

    def next_batch(self) -> list[int]:
        """The indices of the calls to send together on one connection; empty when done."""
        results = self.results
        # By identity: an outcome compared with None would run its dataclass's __eq__.
        for first, result in enumerate(results):  # noqa: B007 - the loop finds first
            if result is None:
                break
        else:
            return []
        if not self.pipeline:
            return [first]
        targets = self.targets
        origin = targets[first][0]
        batch = []
        for index in range(first, len(results)):
            if results[index] is not None:
                continue
            if targets[index][0] != origin:
                break
            batch.append(index)
        return batch

    def settle(
        self,
        batch: list[int],
        exchange: Exchange,
        *,
        chained: bool = False,
        answered_before: bool = False,
    ) -> None:
        """Record the batch's results, leaving out the calls that may be sent again.

        ``chained``: the batch was written behind other unread flights on its connection
        (:meth:`SyncTransport.start` with ``after``); ``answered_before``: the server had
        answered some of those before this batch's turn.
        """
        pipelined = len(batch) > 1 or chained
        for index, result in zip(batch, exchange.results, strict=True):
            unanswered = type(result) is Failure and result.unanswered
            if unanswered:
                if answered_before and pipelined:
                    self.refused_pipelining = True  # closed after an earlier pipelined reply
                    self.pipeline = False
                    continue
                if not self.retried[index] and time.monotonic() < self.deadlines[index]:
                    self.retried[index] = True
                    if pipelined:
                        # Sent again one at a time: a server that does not pipeline and closes
                        # with requests still unread resets the connection, and its replies
                        # can be lost before the client reads them, so no reply proves it.
                        self.pipeline = False
                    continue
            self.results[index] = result
            answered_before = answered_before or not unanswered

    def finished(self) -> list[Result]:
        """Every call's result, in order; asked once :meth:`next_batch` found none missing."""
        return cast(list[Result], self.results)


class _Pool:
    """Idle connections by origin, at most :data:`MAX_IDLE` each."""

    def __init__(self) -> None:
        self._idle: dict[Origin, list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, origin: Origin) -> Any | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def give(self, origin: Origin, conn: Any) -> bool:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) >= MAX_IDLE:
                return False
            idle.append(conn)
            return True

    def drain(self) -> list[Any]:
        with self._lock:
            conns = [conn for idle in self._idle.values() for conn in idle]
            self._idle.clear()
            return conns


def _chain(plan: _Plan, batch: list[int], after: InFlight | None) -> Any | None:
    """The connection of ``after`` if ``batch`` may be pipelined behind its unread replies."""
    if after is None or not plan.pipeline or after.sent is None:
        return None
    sent = after.sent
    if sent.origin != plan.targets[batch[0]][0] or not sent.conn.chainable:
        return None
    return sent.conn


class _Base:
    # What a client asks of its sender before each call (an injected httpx2 client may be
    # closed under it); never true here. A class attribute: asking for a missing one raises
    # and catches an AttributeError inside getattr on every call.
    http_closed: Final = False

    def __init__(
        self, tls: ssl.SSLContext | None, *, user_agent: str, keep_alive: bool = True
    ) -> None:
        self._tls = tls
        self._keep_alive = keep_alive
        # Connection: close comes with the request (the core adds it for keep_alive False).
        self._extra: tuple[tuple[str, str], ...] = (("User-Agent", user_agent),)
        self._pool = _Pool()
        self._encodings: dict[int, tuple[WireRequest, bytes]] = {}
        # URLs split (see _target): the few a device sends over and over.
        self._split_urls: dict[str, tuple[Origin, str, str]] = {}
        self._local = threading.local()  # per thread: a sync client may be shared by threads
        self._no_pipelining = False
        self.closed = False

    @property
    def pipelining(self) -> bool:
        """False once a server has shown that it does not pipeline."""
        return not self._no_pipelining

    def _plan(self, calls: Sequence[Call[Any]], pipeline: bool) -> _Plan:
        return _Plan(calls, pipeline and not self._no_pipelining, self._target)

    def _target(self, url: str) -> tuple[Origin, str, str]:
        """:func:`_split` of ``url``, kept for the few URLs a client sends again and again (a
        task's token check and download): bounded, and only this client's own URLs (clients
        in one process never send each other's URLs: the dev_id is in the query)."""
        split_urls = self._split_urls
        found = split_urls.get(url)
        if found is None:
            if len(split_urls) >= _ENCODED_MAX:
                split_urls.clear()
            found = split_urls[url] = _split(url)
        return found

    def _payload(self, plan: _Plan, batch: list[int]) -> bytes:
        if len(batch) == 1:
            return self._encoded(plan.calls[batch[0]], plan.targets[batch[0]])
        return b"".join(self._encoded(plan.calls[i], plan.targets[i]) for i in batch)

    def _encoded(self, call: Call[Any], target: tuple[Origin, str, str]) -> bytes:
        """The call's request as bytes; kept for the few requests a client sends over and
        over unchanged (the core hands out the same request object for each chunk's token
        check), under the object's identity, which the kept entry holds alive. A download's
        request is new for every chunk (its Range): never kept."""
        request = call.request
        if call.fresh_requests:
            return encode_request(request, target[1], target[2], self._extra)
        key = id(request)
        found = self._encodings.get(key)
        if found is not None and found[0] is request:
            return found[1]
        data = encode_request(request, target[1], target[2], self._extra)
        if len(self._encodings) >= _ENCODED_MAX:
            self._encodings.clear()
        self._encodings[key] = (request, data)
        return data

    def _settle(self, plan: _Plan, sent: _Sent, answered_before: bool, *, completed: bool) -> None:
        """Record a flight's results; pool or close its connection once nothing on it is
        unread. ``completed`` is False when reading was cancelled mid-reply."""
        conn, exchange = sent.conn, sent.exchange
        conn.unread -= 1
        if completed:
            conn.answered = answered_before or exchange.answered
            plan.settle(sent.batch, exchange, chained=sent.behind, answered_before=answered_before)
        keep = completed and exchange.reusable and self._keep_alive and not self.closed
        keep = keep and not conn.spoilt and not conn.dead
        if not keep or (conn.unread == 0 and not self._pool.give(sent.origin, conn)):
            conn.close()

    def _tls_for(self, origin: Origin, call: Call[Any]) -> ssl.SSLContext | None:
        if origin.scheme != "https":
            return None
        if self._tls is None:
            raise TransportError("TLS is not configured", endpoint=call.endpoint)
        return self._tls


class _Conn:
    """What the sync and async connections share: the reply parser, and the flights written on
    the connection whose replies are not read yet (``unread``; the connection goes back to the
    pool only when none is left). ``answered`` is True once a reply to the current run of
    chained flights was read on it; ``dead`` once it was closed (the flights still unread on it
    then fail as unanswered)."""

    __slots__ = ("answered", "dead", "parser", "spoilt", "unread")

    def __init__(self) -> None:
        self.parser = ReplyParser()
        self.unread = 0
        self.answered = False
        self.dead = False
        self.spoilt = False  # a write failed: take no more requests, close once read

    @property
    def chainable(self) -> bool:
        """Whether more requests may be pipelined behind the unread ones."""
        parser = self.parser
        return not (self.dead or self.spoilt or parser.broken or parser.closed) and (
            parser.keep_alive
        )


class _SyncConn(_Conn):
    """A blocking socket whose operations are bounded by deadlines.

    The socket's timeout is set only when the one it has could outlast the deadline at hand:
    each ``settimeout`` is a system call (``ioctl``), and a device's calls mostly have the same
    limit, so a timeout set a little short of one call's deadline serves the next ones too. An
    operation that times out before its deadline (the socket's timeout was shorter) is simply
    tried again, so a call still fails exactly when its deadline passes, never before it.
    """

    __slots__ = ("plain", "sock", "timeout")

    def __init__(self, sock: socket.socket, *, plain: bool = False) -> None:
        super().__init__()
        self.sock = sock
        self.timeout: float | None = None  # what the socket's timeout was last set to
        # A plain TCP socket (not TLS) on POSIX: send() writes its descriptor directly.
        self.plain = plain and os.name == "posix"

    def _arm(self, deadline: float) -> None:
        """Bound the next operation by ``deadline`` (:class:`TimeoutError` once it passed)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        timeout = self.timeout
        if timeout is None or timeout > remaining:
            # Short of the deadline by up to a second: the next call's deadline (about as far
            # away) then finds it short enough, and keeps it.
            timeout = remaining - _TIMEOUT_SLACK if remaining > 2 * _TIMEOUT_SLACK else remaining
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def send(self, data: bytes, deadline: float) -> None:
        """Write all of ``data`` by ``deadline`` (:class:`TimeoutError` after it)."""
        sock = self.sock
        sent = 0
        if self.plain and self.timeout is not None:
            # A socket with a timeout is non-blocking underneath, and polls before every
            # write; a request nearly always fits the send buffer, so it is written at once,
            # and only what does not fit waits (as below) for room until the deadline.
            try:
                sent = os.write(sock.fileno(), data)  # -1 once closed: EBADF, as send
            except BlockingIOError:
                pass  # no room at all: wait for it
            else:
                if sent >= len(data):
                    return
        while True:
            self._arm(deadline)
            try:
                sent += sock.send(data[sent:] if sent else data)
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue  # the socket's timeout was short of the deadline: nothing was sent
                raise
            if sent >= len(data):
                return

    def recv_into(self, buffer: bytearray, deadline: float) -> int:
        """Read what arrived into ``buffer``, waiting for it until ``deadline``."""
        while True:
            self._arm(deadline)
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue  # the socket's timeout was short of the deadline: nothing was read
                raise

    def close(self) -> None:
        self.dead = True
        with contextlib.suppress(OSError):
            self.sock.close()


class _Sent:
    """A batch written on its connection whose replies are still to be read."""

    __slots__ = ("batch", "behind", "conn", "exchange", "origin")

    def __init__(
        self, batch: list[int], origin: Origin, conn: Any, exchange: Exchange, behind: bool
    ) -> None:
        self.batch = batch
        self.origin = origin
        self.conn = conn
        self.exchange = exchange
        self.behind = behind  # written behind other unread flights on the same connection
        conn.unread += 1


class InFlight:
    """Calls a transport has sent (:meth:`SyncTransport.start`) and not yet read the replies
    of; :meth:`SyncTransport.finish` reads them, :meth:`SyncTransport.abandon` drops them."""

    __slots__ = ("plan", "sent")

    def __init__(self, plan: _Plan, sent: _Sent | None) -> None:
        self.plan = plan
        self.sent = sent


class SyncTransport(_Base):
    """Blocking sockets. ``tls`` is the context for ``https`` origins (None: refuse them)."""

    def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        """Send ``calls`` and read their replies; their results in order (never raises an
        :class:`OtaError`: each call's error is in its result)."""
        return self.finish(self.start(calls, pipeline=pipeline))

    def start(
        self,
        calls: Sequence[Call[Any]],
        *,
        pipeline: bool = False,
        after: InFlight | None = None,
    ) -> InFlight:
        """Send the first batch of ``calls`` (all of them when pipelining) without reading.

        The caller does other work while the server answers, then :meth:`finish` reads the
        replies (and sends what could not go in the first batch). Never raises an
        :class:`OtaError`: a failure to connect or write is the result :meth:`finish` gives.

        ``after`` (with ``pipeline``): a flight whose replies are still unread; the calls are
        pipelined behind it on its connection when that connection can take more (a window of
        several flights on one connection). Flights chained so are finished in the order they
        were started. Without keep-alive every request closes its connection: nothing is
        chained.
        """
        plan = self._plan(calls, pipeline)
        batch = [0] if len(plan.calls) == 1 else plan.next_batch()  # a lone call goes first
        if not batch:
            return InFlight(plan, None)
        chain = _chain(plan, batch, after) if after is not None and self._keep_alive else None
        return InFlight(plan, self._send(plan, batch, chain))

    def finish(self, flight: InFlight) -> list[Result]:
        """Read the replies of what :meth:`start` sent; every call's result, in order."""
        plan, sent = flight.plan, flight.sent
        flight.sent = None
        if sent is not None:
            self._receive(plan, sent)
            results = plan.results
            if len(results) == 1 and results[0] is not None and not plan.refused_pipelining:
                return plan.finished()  # a lone call answered (or failed for good) at once
        while batch := plan.next_batch():
            sent = self._send(plan, batch, None, fresh=plan.retried[batch[0]])
            if sent is not None:
                self._receive(plan, sent)
        if plan.refused_pipelining:
            self._no_pipelining = True
        return plan.finished()

    def abandon(self, flight: InFlight) -> None:
        """Drop what :meth:`start` sent: its connection is closed without reading the replies
        (a reply half read could not be told from the next one); flights chained behind it
        on that connection then fail as unanswered, or are dropped too."""
        sent, flight.sent = flight.sent, None
        if sent is not None:
            sent.conn.close()

    def _send(
        self, plan: _Plan, batch: list[int], conn: _SyncConn | None, *, fresh: bool = False
    ) -> _Sent | None:
        """Write ``batch`` on ``conn`` (chained), a kept connection, or a new one (``fresh``:
        a call sent again after its connection ended gets a new one, not another kept
        connection the server may have closed as well)."""
        first = plan.calls[batch[0]]
        origin = plan.targets[batch[0]][0]
        behind = conn is not None
        if conn is None and self._keep_alive and not fresh:
            conn = self._pool.take(origin)
        if conn is None:
            try:
                conn = self._connect(origin, first, plan.deadlines[batch[0]])
            except OtaError as error:
                plan.results[batch[0]] = Failure(error, cause=error.__cause__)
                return None
        if not behind:
            # A refusal to pipeline shows as a close after a reply to this run of flights; a
            # reply from before it (the connection idle in the pool since) proves nothing.
            conn.answered = False
        calls = plan.calls
        exchange = Exchange(
            [calls[batch[0]]] if len(batch) == 1 else [calls[i] for i in batch], conn.parser
        )
        try:
            # A deadline already past still gets its request written (as a socket timeout
            # of a millisecond would): the reply's wait reports the timeout.
            deadline = max(plan.deadlines[batch[0]], time.monotonic() + 0.001)
            conn.send(self._payload(plan, batch), deadline)
            if len(batch) > 1 and _TCP_QUICKACK is not None:
                # The replies may arrive before the caller reads them (start, then other
                # work): acknowledge them at once all the same (see _TCP_QUICKACK).
                with contextlib.suppress(OSError):
                    conn.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError as exc:
            # Nothing of this batch's replies was read yet: a kept connection the server had
            # closed fails here too.
            timed_out = isinstance(exc, TimeoutError | socket.timeout)
            problem = _io_error(first, exc, got_head=False)
            exchange.fail(problem, unanswered=not timed_out, cause=exc, fresh=behind)
            conn.spoilt = True
        return _Sent(batch, origin, conn, exchange, behind)

    def _receive(self, plan: _Plan, sent: _Sent) -> None:
        batch, conn, exchange = sent.batch, sent.conn, sent.exchange
        sock = conn.sock
        answered_before = conn.answered
        quickack = _TCP_QUICKACK if len(batch) > 1 or conn.unread > 1 else None
        buffer, view = self._read_buffer()
        events = conn.parser.events
        while not exchange.done:
            if events:  # parsed already (read with an earlier reply, or just now)
                exchange.advance()
                if exchange.done:
                    break
            if conn.dead:
                # Closed before this flight's turn: after an earlier reply said so, or an
                # earlier flight on it was dropped. What was not answered may go again.
                exchange.orphan("the connection was closed before this reply")
                break
            deadline = plan.deadlines[batch[len(exchange.results)]]
            try:
                if quickack is not None:  # see _TCP_QUICKACK
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                received = conn.recv_into(buffer, deadline)
            except OSError as exc:
                call = exchange.current
                problem = _io_error(call, exc, got_head=exchange.got_head)
                timed_out = isinstance(exc, TimeoutError | socket.timeout)
                exchange.fail(problem, unanswered=not timed_out, cause=exc)
                break
            if received:
                conn.parser.feed(view[:received])  # llhttp copies what it keeps
            else:
                conn.parser.feed_eof()
        self._settle(plan, sent, answered_before, completed=True)

    def _read_buffer(self) -> tuple[bytearray, memoryview]:
        """This thread's read buffer, reused by every read. ``recv`` of :data:`READ_SIZE`
        allocates that much for each read however little arrives (measured: 31 µs per small
        reply, against 7 µs reading into a kept buffer)."""
        local = self._local
        found: tuple[bytearray, memoryview] | None = getattr(local, "buffer", None)
        if found is None:
            buffer = bytearray(READ_SIZE)
            found = local.buffer = (buffer, memoryview(buffer))
        return found

    def _connect(self, origin: Origin, call: Call[Any], deadline: float) -> _SyncConn:
        tls = self._tls_for(origin, call)
        limit = min(call.request.timeout.connect_seconds, max(deadline - time.monotonic(), 0.001))
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=limit)
        except OSError as exc:
            raise _connect_error(call, origin, exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=origin.host)
        except (OSError, ssl.CertificateError) as exc:
            sock.close()
            raise _connect_error(call, origin, exc) from exc
        return _SyncConn(sock, plain=tls is None)

    def close(self) -> None:
        """Close every idle connection; further exchanges open new ones."""
        self.closed = True
        for conn in self._pool.drain():
            conn.close()


class _AsyncConn(_Conn, asyncio.Protocol):
    """A connection as an asyncio protocol: the task reading a reply waits on one future,
    woken when bytes, the end or an error arrive, under one timer per connection, and writes
    wait only when the transport's buffer is full (a stream reader and writer with a timeout
    context per read cost several futures, handles and context managers per request).

    The timer is armed lazily: a wait whose deadline is later than the armed timer's leaves
    the timer alone, and a timer that fires before the current deadline arms itself again for
    it. Each request's deadline is later than the one before, so a busy connection schedules
    a timer about once per timeout instead of once per wait (a handle, a heap push and a
    cancelled entry for the event loop to sweep, per wait). Disarming between exchanges only
    forgets the deadline; :meth:`close` cancels the timer.
    """

    __slots__ = (
        "_deadline",
        "_eof",
        "_error",
        "_expired",
        "_loop",
        "_paused",
        "_pending",
        "_timer",
        "_timer_deadline",
        "_tls",
        "_waiter",
        "lost",
        "sock",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None
        self.lost = False  # connection_lost was called: nothing more arrives or goes out
        self._error: BaseException | None = None  # how the connection failed, once it did
        self._pending: list[bytes] = []  # arrived, not yet handed to the parser
        self._eof = False  # the server's end arrived (after what is pending)
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # the transport asked to stop writing and has not resumed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None  # the deadline the timer was armed for
        self._deadline: float | None = None  # the current wait's deadline (time.monotonic())
        self._expired = False  # the current deadline passed
        self._tls = False

    # -- asyncio's callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance-checked: uvloop's transports have asyncio.Transport's methods without
        # subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")
        self._tls = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        self._pending.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Half-closed, as a stream reader leaves it: the transport is closed with the
        # connection. A TLS transport closes either way (and warns when asked not to).
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is None:
            self._eof = True
        elif self._error is None:
            self._error = exc
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # -- for the transport --------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether the transport asked to stop writing (its buffer is over the high-water
        mark) and has not asked to resume."""
        return self._paused

    async def write(self, data: bytes, deadline: float) -> None:
        """Write ``data``, and wait only when the transport's buffer is above its high-water
        mark (until ``deadline``: :class:`TimeoutError`). Raises as a stream writer's drain
        does when the connection is gone: a kept connection the server closed shows here or
        as a reply that never begins, and the request is sent again on a new one."""
        transport = self.transport
        assert transport is not None
        transport.write(data)  # a transport that is closing drops it
        if self._error is not None:
            raise self._error
        if transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as a stream writer's drain does
        if self.lost:
            raise ConnectionResetError("Connection lost")
        while self._paused and not self.lost:
            await self._wait(deadline)
        if self.lost:
            raise ConnectionResetError("Connection lost")

    async def receive(self, deadline: float) -> None:
        """Hand what arrived to the parser, waiting for it until ``deadline`` if nothing did
        (:class:`TimeoutError`); raises the connection's error once it failed. The parser sees
        bytes only when a reply is being read, as from a stream reader: what it has seen
        decides whether the connection can be reused or pipelined on, and whether a request
        that failed on it may be sent again."""
        if not (self._pending or self._eof or self._error is not None):
            await self._wait(deadline)
        if self._error is not None:
            raise self._error
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.parser.feed(data)
        elif self._eof:
            self.parser.feed_eof()

    async def _wait(self, deadline: float) -> None:
        """Until something happens on the connection (bytes, the end, an error, writing may
        resume) or ``deadline`` passes (:class:`TimeoutError`)."""
        if deadline != self._deadline:
            self._deadline = deadline
            self._expired = False
            armed = self._timer_deadline
            if self._timer is None or armed is None or armed > deadline:
                self._arm(deadline)
        if self._expired:
            raise TimeoutError
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _arm(self, deadline: float) -> None:
        """Schedule the timer for ``deadline`` (replacing one armed for a later one)."""
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        when = loop.time() + (deadline - time.monotonic())
        self._timer = loop.call_at(when, self._expire)
        self._timer_deadline = deadline

    def _expire(self) -> None:
        self._timer = None
        self._timer_deadline = None
        deadline = self._deadline
        if deadline is None:
            return  # disarmed since: nothing waits under a deadline
        if deadline > time.monotonic():
            self._arm(deadline)  # armed for an earlier deadline than the current one
            return
        self._expired = True
        waiter = self._waiter  # only a future being awaited: its exception is always read
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def disarm(self) -> None:
        """Forget the deadline (the exchange is over, or has another deadline). The timer
        stays scheduled, for the next wait to reuse; see the class documentation."""
        self._deadline = None
        self._expired = False

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._timer_deadline = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.dead = True
        self.disarm()
        self._cancel_timer()
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                transport.close()


class AsyncTransport(_Base):
    """An asyncio protocol per connection; the async twin of :class:`SyncTransport`."""

    async def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        """See :meth:`SyncTransport.exchange`."""
        return await self.finish(await self.start(calls, pipeline=pipeline))

    async def start(
        self,
        calls: Sequence[Call[Any]],
        *,
        pipeline: bool = False,
        after: InFlight | None = None,
    ) -> InFlight:
        """See :meth:`SyncTransport.start`."""
        plan = self._plan(calls, pipeline)
        batch = [0] if len(plan.calls) == 1 else plan.next_batch()  # a lone call goes first
        if not batch:
            return InFlight(plan, None)
        chain = _chain(plan, batch, after) if after is not None and self._keep_alive else None
        return InFlight(plan, await self._send(plan, batch, chain))

    async def finish(self, flight: InFlight) -> list[Result]:
        """See :meth:`SyncTransport.finish`."""
        plan, sent = flight.plan, flight.sent
        flight.sent = None
        if sent is not None:
            await self._receive(plan, sent)
            results = plan.results
            if len(results) == 1 and results[0] is not None and not plan.refused_pipelining:
                return plan.finished()  # see SyncTransport.finish
        while batch := plan.next_batch():
            sent = await self._send(plan, batch, None, fresh=plan.retried[batch[0]])
            if sent is not None:
                await self._receive(plan, sent)
        if plan.refused_pipelining:
            self._no_pipelining = True
        return plan.finished()

    def abandon(self, flight: InFlight) -> None:
        """See :meth:`SyncTransport.abandon`."""
        sent, flight.sent = flight.sent, None
        if sent is not None:
            sent.conn.close()

    async def _send(
        self, plan: _Plan, batch: list[int], conn: _AsyncConn | None, *, fresh: bool = False
    ) -> _Sent | None:
        """See :meth:`SyncTransport._send`."""
        first = plan.calls[batch[0]]
        origin = plan.targets[batch[0]][0]
        behind = conn is not None
        if conn is None and self._keep_alive and not fresh:
            conn = self._pool.take(origin)
        if conn is None:
            try:
                conn = await self._connect(origin, first, plan.deadlines[batch[0]])
            except OtaError as error:
                plan.results[batch[0]] = Failure(error, cause=error.__cause__)
                return None
        if not behind:
            conn.answered = False  # see SyncTransport._send
        exchange = Exchange([plan.calls[i] for i in batch], conn.parser)
        sent = False
        try:
            try:
                try:
                    await conn.write(self._payload(plan, batch), plan.deadlines[batch[0]])
                finally:
                    conn.disarm()
                sock = conn.sock
                if len(batch) > 1 and _TCP_QUICKACK is not None and sock is not None:
                    with contextlib.suppress(OSError):  # see SyncTransport._send
                        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except (OSError, TimeoutError) as exc:
                problem = _io_error(first, exc, got_head=False)
                unanswered = not isinstance(exc, TimeoutError)
                exchange.fail(problem, unanswered=unanswered, cause=exc, fresh=behind)
                conn.spoilt = True
            sent = True
        finally:
            if not sent:  # cancelled mid-write: the connection cannot be reused
                conn.close()
        return _Sent(batch, origin, conn, exchange, behind)

    async def _receive(self, plan: _Plan, sent: _Sent) -> None:
        batch, conn, exchange = sent.batch, sent.conn, sent.exchange
        completed = False
        answered_before = conn.answered
        pipelined = len(batch) > 1 or conn.unread > 1
        sock = conn.sock if pipelined else None
        quickack = _TCP_QUICKACK if sock is not None else None
        try:
            while not exchange.done:
                exchange.advance()
                if exchange.done:
                    break
                if conn.dead:  # see SyncTransport._receive
                    exchange.orphan("the connection was closed before this reply")
                    break
                deadline = plan.deadlines[batch[len(exchange.results)]]
                if quickack is not None and sock is not None:  # see _TCP_QUICKACK
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                try:
                    await conn.receive(deadline)
                except (OSError, TimeoutError) as exc:
                    problem = _io_error(exchange.current, exc, got_head=exchange.got_head)
                    timed_out = isinstance(exc, TimeoutError)
                    exchange.fail(problem, unanswered=not timed_out, cause=exc)
                    break
            completed = True
        finally:
            conn.disarm()
            # A cancelled call leaves its connection mid-reply: it cannot be reused.
            self._settle(plan, sent, answered_before, completed=completed)

    async def _connect(self, origin: Origin, call: Call[Any], deadline: float) -> _AsyncConn:
        tls = self._tls_for(origin, call)
        limit = min(call.request.timeout.connect_seconds, max(deadline - time.monotonic(), 0.001))
        loop = asyncio.get_running_loop()
        conn = _AsyncConn(loop)
        try:
            async with asyncio.timeout(limit):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except (OSError, TimeoutError, ssl.CertificateError) as exc:
            conn.close()
            raise _connect_error(call, origin, exc) from exc
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def aclose(self) -> None:
        """Close every idle connection."""
        self.closed = True
        for conn in self._pool.drain():
            conn.close()

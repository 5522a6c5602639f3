"""One client connection: the :class:`asyncio.Protocol` that feeds bytes to the parser, queues
each parsed request, runs the handler for each in order and writes the responses.

Where a connection is in its life is one named :class:`State`, moved only along the table
:data:`TRANSITIONS`; a move the table does not allow raises :class:`StateError` (a bug here, never
a client's doing). The states follow the receiving side, since the parser drives them; the worker
that answers requests runs alongside (pipelining) and moves the state when it finishes.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import os
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from onenet_ota.server.http.encoding import (
    BAD_REQUEST,
    CONTINUE,
    NOT_IMPLEMENTED,
    REQUEST_TIMEOUT,
    InvalidResponse,
    encode_head,
    loggable,
)
from onenet_ota.server.http.models import (
    FileSegment,
    Request,
    RequestAborted,
    RequestTimedOut,
    Response,
    Stream,
)

if TYPE_CHECKING:
    from onenet_ota.server.http.server import HttpServer

__all__ = [
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "SMALL_SEGMENT",
    "TRANSITIONS",
    "Connection",
    "State",
    "StateError",
]

logger = logging.getLogger(__name__)

SMALL_SEGMENT: Final = 64 * 1024
"""File segments up to this size are read before writing and leave with the headers in one write."""

_LARGE_CHUNK: Final = 1024 * 1024  # read size of the copy loop when sendfile is unavailable

LINGER_SECONDS: Final = 2.0
"""Longest time a closing connection keeps reading (and dropping) what the client still sends.

Long enough for a client on a slow link to read the final response and stop sending; short enough
that a client which never stops cannot hold the connection for long."""

LINGER_BYTES: Final = 1024 * 1024
"""Most bytes a closing connection reads and drops before it closes anyway (a client streaming a
huge upload past a ``413`` gets its reset after this much)."""


class State(enum.IntEnum):
    """Where a connection is in its life, in the order it goes through them.

    An int enum so that "still reading requests" is ``state < MUST_CLOSE`` and "may still write"
    is ``state < LINGER``: these checks run on every request.
    """

    IDLE = 0
    """Between requests, nothing of the next one received: the idle timer runs."""
    RECV_HEAD = 1
    """A request head is arriving: the header timer runs."""
    RECV_BODY = 2
    """The head is queued and its body is arriving (pulled by the handler)."""
    HANDLING = 3
    """The last request arrived whole; its response is still owed. No timer: the handler owns
    the time."""
    MUST_CLOSE = 4
    """No further request is read (a body still arriving is, for its handler); the responses
    owed go out, then the connection closes."""
    LINGER = 5
    """Written and half-closed; what the client still sends is dropped, within bounds."""
    CLOSED = 6
    """Closed or lost: nothing more is read or written."""


# Module-level names for the states: attribute access on an enum class costs about as much as a
# whole transition, and the states are checked several times per request.
IDLE, RECV_HEAD, RECV_BODY, HANDLING, MUST_CLOSE, LINGER, CLOSED = State

TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    IDLE: frozenset({RECV_HEAD, MUST_CLOSE, CLOSED}),
    RECV_HEAD: frozenset({RECV_BODY, MUST_CLOSE, CLOSED}),
    RECV_BODY: frozenset({HANDLING, MUST_CLOSE, CLOSED}),
    HANDLING: frozenset({IDLE, RECV_HEAD, MUST_CLOSE, CLOSED}),
    MUST_CLOSE: frozenset({LINGER, CLOSED}),
    LINGER: frozenset({CLOSED}),
    CLOSED: frozenset(),
}
"""The legal moves: from each state, the states it may go to. Any state may be lost (CLOSED);
closing always passes MUST_CLOSE, so that nothing is read after the decision to close."""

_ALLOWED: Final = tuple(TRANSITIONS[state] for state in State)  # indexed by the state's value


class StateError(RuntimeError):
    """A move the :data:`TRANSITIONS` table does not allow: a bug in the layer."""


class _Inline:
    """The worker while it runs inside a callback (see ``Connection._start_worker``): nothing
    to cancel, since nothing else runs meanwhile."""

    def cancel(self) -> bool:
        return False


_INLINE: Final = _Inline()


async def _finish(work: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Run ``work`` to its end as a task would, after it was started outside one and stopped
    to wait for ``waiting`` (the future it yielded, or None for a bare yield).

    A task waits for the future and resumes the coroutine, which then reads the future's
    outcome itself; cancelled, a task cancels the future it waits for and the coroutine sees
    CancelledError. This does the same.
    """
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # as a task resets it
                await asyncio.wait((waiting,))
        except asyncio.CancelledError as exc:
            if waiting is not None:
                waiting.cancel()
            try:
                waiting = work.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = work.send(None)
        except StopIteration:
            return


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
        "started",
        "timed_out",
        "waiter",
    )

    def __init__(self, conn: Connection, declared: int | None, expect_continue: bool) -> None:
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
        self.started: float | None = None  # when the layer first waited for body bytes

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
                conn.write(CONTINUE)
            self.waiter = conn.loop.create_future()
            generation = conn.arm_timer(self._wait_limit())
            conn.maybe_resume_reading()
            try:
                await self.waiter
            finally:
                self.waiter = None
                # a pipelined head may have armed its own timer meanwhile: leave that one
                conn.cancel_timer(generation)

    def _wait_limit(self) -> float:
        """How long the next wait for body bytes may last: the idle timeout, but never past the
        body's deadline.

        The deadline is ``body_timeout`` from the first wait plus the time the body needs at
        ``body_min_rate`` bytes/s: its declared length, fixed up front, so nothing the client
        does moves it; for a chunked body (length unknown) what has arrived so far, so a trickle
        below the rate runs out while a slow but steady upload does not. Only waits are bounded:
        a handler that is busy before it reads costs the client nothing.
        """
        limits = self.conn.limits
        now = self.conn.loop.time()
        if self.started is None:
            self.started = now
        size = self.declared if self.declared is not None else self.received
        deadline = self.started + limits.body_timeout + size / limits.body_min_rate
        return max(0.0, min(limits.idle_timeout, deadline - now))

    async def discard(self) -> None:
        """Drop what is buffered and what is still to come; RequestAborted if cut off."""
        self.continue_pending = False
        self.drop_buffered()
        while await self.read():
            pass


class _NoBody(_Body):
    """The body of every request that declares none (no Content-Length, or 0, and not
    chunked): every GET a device sends. Complete from the start, nothing is ever fed to it,
    buffered in it or waited for, so one instance serves every such request of every
    connection, unchanged; no connection is attached."""

    __slots__ = ()

    def __init__(self) -> None:
        # _Body's own fields, so that one added there is here too; no connection (None): every
        # method that would use one is overridden below.
        super().__init__(cast("Connection", None), 0, False)
        self.complete = True
        self.discarding = True

    def feed(self, data: bytes) -> None:
        raise AssertionError("a request without a body was fed body bytes")

    def finish(self) -> None:
        pass

    def fail(self, reason: str, *, timed_out: bool = False) -> None:
        pass  # complete already: as for any finished body, nothing to fail

    def unread(self) -> int:
        return 0

    def drop_buffered(self) -> None:
        pass

    async def read(self) -> bytes:
        return b""

    async def discard(self) -> None:
        pass


_NO_BODY: Final = _NoBody()
_READ_NO_BODY: Final = _NO_BODY.read  # one bound method for every request without a body


# len(b"expect"), len(b"content-length"), len(b"transfer-encoding"): a cheap pre-filter
_FRAMING_NAME_LENGTHS: Final = frozenset({6, 14, 17})


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing the rest of the received bytes."""


class _AbortConnection(Exception):
    """The response cannot be completed; the connection is aborted."""


# (request, body, keep-alive), or the canned error response that ends the connection
_Pending = tuple[Request, _Body, bool] | bytes


class Connection(asyncio.Protocol):
    """One client connection: parser callbacks, the request queue, writes, timers."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        limits = self.limits = server.limits
        # The bounds checked on every read and every header, kept here: one attribute load
        # each rather than two (the limits are frozen).
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._buffer_limit = limits.buffer_limit
        self._max_pipeline = limits.max_pipeline
        self.loop = server.loop
        self.state = IDLE
        self.buffered = 0
        self.made = False  # connection_made ran: connection_lost will run too
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._tls = False
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_left = 0  # bytes the head may still take (URL and header lines)
        self._headers_left = 0  # header lines the head may still have
        self._head_received = 0  # bytes received while a head was incomplete; see data_received
        self._declared: int | None = None
        self._chunked = False
        self._other_coding = False  # a transfer coding other than chunked was named
        self._expect = False
        self._reject = BAD_REQUEST  # the answer to a request the parse stopped at
        # requests and their answers
        self._body: _Body | None = None  # the body arriving now, if any
        self._queue: deque[_Pending] = deque()
        self._worker: asyncio.Task[None] | _Inline | None = None
        # Responses written while the worker runs inside a callback, sent together when it
        # returns or first waits (see _start_worker); None while writes go straight out.
        self._out: list[bytes] | None = None
        self._out_bytes = 0
        self._requests = 0
        self._owed: bytes | None = None  # written once the queue is done (408 for a cut head)
        # the client's side
        self._eof = False  # the client closed its sending side
        self._input_left = False  # bytes arrived, or may arrive, that will never be parsed
        # flow control
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # timers
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._generation = 0
        self._linger_left = 0  # bytes still to drop while lingering; see _close
        self._linger_timer: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()

    def _to(self, new: State) -> None:
        """Move to state ``new``; :class:`StateError` if :data:`TRANSITIONS` forbids it."""
        if new not in _ALLOWED[self.state]:
            raise StateError(f"can't go to {new.name} in state {self.state.name}")
        self.state = new

    def _must_close(self) -> None:
        """Read no further request: the responses owed go out, then the connection closes."""
        state = self.state
        if state < MUST_CLOSE:
            if state is RECV_HEAD:
                self._input_left = True  # the rest of this head will not be parsed
            self._to(MUST_CLOSE)

    @property
    def timed_out_head(self) -> bool:
        """Whether a request head was cut off by ``header_timeout`` while responses were owed
        (a 408 follows them unless one of them already announced the close)."""
        return self._owed is not None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self._peer = str(peer)
        self.server.connections.add(self)
        if self.server.closing:
            self._close()
            return
        self.arm_timer(self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not CLOSED:
            self._to(CLOSED)
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
            if not isinstance(item, bytes):
                item[1].fail("the client disconnected")
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.server.connections.discard(self)
        self._closed.set()
        self.server.connection_closed()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state >= MUST_CLOSE:
            if state is LINGER:
                self._linger_left -= len(data)  # dropped unbuffered: only the count is kept
                if self._linger_left <= 0:
                    self._end_linger()
                return
            if self._body is None or state is CLOSED:
                self._input_left = True
                self._pause_reading()  # nothing more will be parsed; stop receiving
                return
            # else: the last body is still arriving, for its handler
        elif state is RECV_HEAD:
            self._head_received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade/CONNECT request is answered as an ordinary request; the parser cannot
            # continue after it, so the connection closes after the response.
            self._must_close()
            self._input_left = True
        except httptools.HttpParserError:
            if self.state < MUST_CLOSE:
                self._bad_request()
            # else: a callback stopped the parse on purpose (request limit, shutdown)
            self._input_left = True
        if self.state is RECV_HEAD and self._head_received > self._max_header_bytes:
            # httptools reports a header only once its line ends and keeps the unfinished line
            # in memory meanwhile, so on_header alone cannot bound an endless line. Counted
            # from the second read of a head on: the bound is off by one read at most.
            self._bad_request()
        if self.buffered > self._buffer_limit or len(self._queue) > self._max_pipeline:
            self._pause_reading()
        if self._worker is None and self._queue:
            self._start_worker()

    def eof_received(self) -> bool | None:
        self._eof = True
        state = self.state
        if state >= LINGER:
            return None  # the client has stopped sending: the transport closes now
        # A half-closed client still gets its pending responses; the worker closes after them.
        self._must_close()
        if self._body is not None:
            self._body.fail("the client closed its side before the end of the body")
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
        if self.state >= MUST_CLOSE:
            raise _StopParsing
        self._to(RECV_HEAD)
        self._url = b""
        self._headers = []
        self._head_left = self._max_header_bytes
        self._headers_left = self._max_headers
        self._head_received = 0
        self._declared = None
        self._chunked = False
        self._other_coding = False
        self._expect = False
        self.arm_timer(self.limits.header_timeout)

    # The head's bounds are budgets counted down, so each callback pays one subtraction and
    # one comparison per bound; the URL and every header line draw on the same byte budget.

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_left -= len(url)
        if self._head_left < 0:
            raise _StopParsing  # -> 400

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        self._head_left -= size + len(value) + 4  # ": " and CRLF
        self._headers_left -= 1
        if self._head_left < 0 or self._headers_left < 0:
            raise _StopParsing  # -> 400
        # latin-1 maps every byte, so nothing a client sends can fail to decode
        key = name.decode("latin-1")
        text = value.decode("latin-1").strip(" \t")
        self._headers.append((key, text))
        if size in _FRAMING_NAME_LENGTHS:
            lowered = key.lower()
            if lowered == "content-length":
                if self._declared is None:
                    try:
                        self._declared = int(text)  # §2.4: padded values are fine
                    except ValueError:
                        raise _StopParsing from None  # -> 400
            elif lowered == "transfer-encoding":
                codings = [coding.strip(" \t") for coding in text.lower().split(",")]
                # Several lines form one list (RFC 9110 §5.3): only the last line's last coding
                # decides whether the body is chunked, i.e. whether its end can be found.
                self._chunked = codings[-1] == "chunked"
                if any(coding != "chunked" for coding in codings):
                    self._other_coding = True
            elif lowered == "expect":
                self._expect = text.lower() == "100-continue"

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.cancel_timer()
        if self._other_coding:
            # RFC 9112 §6.1: a coding the layer cannot decode (gzip, ...) -> 501; but when chunked
            # is not the final coding the body's end cannot be found at all -> 400 (§6.3).
            self._reject = NOT_IMPLEMENTED if self._chunked else BAD_REQUEST
            raise _StopParsing
        headers = self._headers
        declared = None if self._chunked else self._declared
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
        self._to(RECV_BODY)
        if declared or self._chunked:
            body = self._body = _Body(self, declared, self._expect)
            read = body.read
        else:
            # No body follows the head: the parser completes the message right after this
            # callback, and there is nothing to feed, buffer, drain or time out.
            body, read = _NO_BODY, _READ_NO_BODY
        # positional: the order of Request's fields (a dataclass); keywords cost a third more
        request = Request(
            parser.get_method().decode("ascii", "replace"),
            target,
            path,
            query,
            headers,
            self._peer,
            read,
            None,
            declared,
            self._chunked,
            parser.get_http_version(),
        )
        self._requests += 1
        keep_alive = parser.should_keep_alive() and self._requests < self.limits.max_requests
        self._queue.append((request, body, keep_alive))  # answered when the feed returns

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.finish()
            self._body = None
        if self.state is RECV_BODY:
            if self._requests >= self.limits.max_requests or self.server.closing:
                self._to(MUST_CLOSE)  # D19: the 1000th request is the last one read
            else:
                self._to(HANDLING)

    # -- flow control and timers ------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None and self.state is not CLOSED:
            self._read_paused = True
            self._transport.pause_reading()

    def maybe_resume_reading(self) -> None:
        """Resume reading the socket once buffers and the queue are below their bounds."""
        if not self._read_paused:
            return
        state = self.state
        if (
            (state < MUST_CLOSE or (state is MUST_CLOSE and self._body is not None))
            and self.buffered <= self.limits.buffer_limit // 2
            and len(self._queue) <= self.limits.max_pipeline
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
        if deadline is None or self.state is CLOSED:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        state = self.state
        if state >= LINGER or self._transport is None:
            return
        waiting = self._body_waited_on()
        if waiting is not None:
            waiting.fail("the body did not arrive in time", timed_out=True)
            self._must_close()
        elif self._worker is not None or self._queue:
            # A slow pipelined head: finish the current response, then 408 (see _work).
            if state is RECV_HEAD:
                self._owed = REQUEST_TIMEOUT
            self._must_close()
        elif state is RECV_HEAD:
            self._must_close()
            self.write(REQUEST_TIMEOUT)
            self._close()
        else:
            self._close()  # idle between requests: nothing to answer

    def _body_waited_on(self) -> _Body | None:
        body = self._body
        if body is not None and body.waiter is not None:
            return body
        return None

    # -- writing and closing ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data`` unless the connection is closing.

        While the worker answers pipelined requests inside a callback, writes are gathered and
        leave as one (see :meth:`_start_worker`), up to :data:`SMALL_SEGMENT` bytes at a time.
        """
        if self.state < LINGER and self._transport is not None:
            out = self._out
            if out is None:
                self._transport.write(data)
                return
            out.append(data)
            self._out_bytes += len(data)
            if self._out_bytes > SMALL_SEGMENT:
                self._flush()  # bounded: flow control (pause_writing) sees the rest at once

    def _flush(self) -> None:
        """Send what :meth:`write` gathered, in one write."""
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        if self.state < CLOSED and self._transport is not None:
            self._transport.write(data)

    async def _drain(self) -> None:
        while self._write_paused and self.state is not CLOSED:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def _close(self) -> None:
        """Close once what is written has gone; linger first if the client may be sending."""
        transport = self._transport
        if transport is None or self.state >= LINGER:
            return
        self._flush()  # the responses gathered go before the end of the stream
        self._must_close()
        self.cancel_timer()
        if not self._client_may_send() or not transport.can_write_eof():
            self._to(CLOSED)
            transport.close()  # TLS cannot shut down one direction: close once flushed
            return
        # Closing a socket with unread input sends a reset, and a reset can make the client's
        # stack drop the response it has not read yet (RFC 9112 §9.6). Half-close instead, so
        # the client reads the response and then end-of-file, and drop what it still sends.
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (a reset raced the shutdown)
            self._to(CLOSED)
            transport.close()
            return
        self._to(LINGER)
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
        return self._input_left or (body is not None and not body.complete)

    def _end_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.state is LINGER:
            self._to(CLOSED)
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        """Drop the connection now (shutdown grace exceeded)."""
        self._abort_transport()
        if self._worker is not None:
            self._worker.cancel()

    def _abort_transport(self) -> None:
        self._flush()  # complete responses gathered before the failure still leave
        if self.state is not CLOSED:
            self._to(CLOSED)
        if self._transport is not None:
            self._transport.abort()  # a no-op on a transport already lost

    def shutdown(self) -> None:
        """Graceful close: finish the response in flight, then close."""
        self._must_close()
        if self._worker is None and not self._queue:
            self._close()

    async def wait_closed(self) -> None:
        """Wait until the connection is lost."""
        await self._closed.wait()

    # -- the worker -------------------------------------------------------------------------

    def _start_worker(self) -> None:
        """Answer the queued requests now, in this callback, as far as they go without waiting;
        a task finishes the rest only if the worker has to wait (a body, a full socket buffer, a
        file sent with sendfile).

        Most requests are answered without waiting: a task per request would cost its creation
        and one more turn of the event loop (a wake-up and a poll) before anything is written,
        which one device fetching chunk after chunk on one connection pays on every request.
        The worker runs in its own copy of the context, as a task's would.
        """
        context = contextvars.copy_context()
        work = self._work()
        self._worker = _INLINE
        # Pipelined requests answered here leave in one write (one send, one wake-up of the
        # client) rather than one each; nothing is held back past this callback, when the
        # loop would send them anyway.
        self._out = []
        try:
            waiting = context.run(work.send, None)
        except StopIteration:
            return  # done: _work has cleared self._worker
        except BaseException:
            self._worker = None
            raise
        finally:
            self._flush()
            self._out = None
        self._worker = self.loop.create_task(_finish(work, waiting), context=context)

    async def _work(self) -> None:
        try:
            await self._work_queue()
        except Exception:  # a bug in this layer: never leave the client hanging
            logger.exception("HTTP connection failed; closing it")
            self._abort_transport()
            self._queue.clear()
        finally:
            self._worker = None
        state = self.state
        if state is HANDLING:
            self._to(IDLE)
            self.arm_timer(self.limits.idle_timeout)
        elif state is MUST_CLOSE and self._body is None:
            if self._owed is not None:
                # The last response kept the connection open, so the client awaits an answer
                # to the head cut off meanwhile.
                self.write(self._owed)
            self._close()
        # RECV_HEAD: the next head's timer runs; LINGER, CLOSED: nothing more to do

    async def _work_queue(self) -> None:
        while self._queue and self.state < LINGER:
            item = self._queue[0]
            if isinstance(item, bytes):
                self._queue.clear()
                self.write(item)  # §4.3: invalid HTTP -> 400 (or 501), empty body, close
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
            self.write(BAD_REQUEST)
            return False
        except Exception:
            logger.exception(
                "handler failed on %s %s from %s",
                request.method,
                loggable(request.path),
                request.peer,
            )
            response = Response.empty(500)
        if not isinstance(response, Response):
            logger.error(
                "handler returned %s, not a Response, on %s %s",
                type(response).__name__,
                request.method,
                loggable(request.path),
            )
            response = Response.empty(500)
        if self.state >= LINGER:
            return False
        close = (
            not keep_alive
            or self.server.closing
            or body.error is not None
            or (self.state >= MUST_CLOSE and len(self._queue) <= 1 and self._body in (None, body))
        )
        # The handler may leave part of the body unread. What has arrived is dropped; what is
        # still to come is read and dropped before the next request, unless the unread total
        # is over drain_limit (or unknown): then a new connection is cheaper.
        unread = body.unread()
        if unread is None or unread > self.limits.drain_limit:
            close = True
        elif body.continue_pending and body.received == 0 and not body.complete:
            close = True  # the client still waits for 100-continue: it may never send
        drain = not close and not body.complete
        if close:
            self._must_close()  # nothing after this response is answered
        if close or not drain:
            body.drop_buffered()
        try:
            close = await self._send(
                response, close, request.http_version == "1.0", request.method == "HEAD"
            )
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

    async def _send(
        self, response: Response, close: bool, http10: bool, head_only: bool = False
    ) -> bool:
        """Write ``response``; returns whether the connection must close after it.

        ``http10``: the request was HTTP/1.0 (see :func:`encode_head`). ``head_only``: the
        request was HEAD (RFC 9110 §9.3.2): the head goes out as for GET, Content-Length
        included, and the body never does (a file segment is not even opened).
        """
        payload = response.body
        if isinstance(payload, Stream):
            return await self._send_stream(response, payload, http10, head_only)
        try:
            if head_only:
                length = payload.length if isinstance(payload, FileSegment) else len(payload)
                head, close = encode_head(response, length or None, close, http10, True)
                payload = b""
            elif isinstance(payload, FileSegment):
                return await self._send_file(response, payload, close, http10)
            elif close or http10:
                head, close = encode_head(response, len(payload), close, http10)
            else:
                # The common case, keep-alive HTTP/1.1: a response returned for many requests
                # (a memoised reply, a cached chunk) is encoded once; its bytes do not change.
                memo = response.keep_alive_head
                if memo is not None:
                    head = memo
                else:
                    head, close = encode_head(response, len(payload), False, False)
                    if not close:  # a head that closes (Connection: close) is encoded each time
                        response.keep_alive_head = head
        except InvalidResponse as exc:
            logger.error("invalid response (%s); answering 500", exc)
            head, close = encode_head(Response.empty(500), 0, close, http10)
            payload = b""
        if len(payload) <= SMALL_SEGMENT:
            self.write(head + payload)  # D7: headers and body in one write
        else:
            self.write(head)
            self.write(payload)
        await self._drain()
        return close

    async def _send_stream(
        self, response: Response, stream: Stream, http10: bool, head_only: bool
    ) -> bool:
        chunks = stream.chunks
        try:
            head, _ = encode_head(response, None, True, http10, head_only)
            self.write(head)
            await self._drain()
            if head_only:
                return True
            async for chunk in chunks:
                if self.state is CLOSED or self.server.closing:
                    break  # the client left, or the server stops: an empty chunk gets here
                if chunk:
                    self.write(chunk)
                    await self._drain()
        except InvalidResponse as exc:
            logger.error("invalid streamed response (%s); closing", exc)
            raise _AbortConnection from exc
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return True  # close-delimited: the end of the connection ends the body

    async def _send_file(
        self, response: Response, segment: FileSegment, close: bool, http10: bool
    ) -> bool:
        head, close = encode_head(response, segment.length, close, http10)
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
        self._flush()  # sendfile writes to the socket itself: what was gathered goes first
        transport = self._transport
        if transport is None or self.state is CLOSED:
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
        while sent < segment.length and self.state is not CLOSED:
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
        self._must_close()
        self._input_left = True  # the rest of the stream is not parsed
        self.cancel_timer()
        if self._body is not None:
            self._body.fail("invalid body framing")
            self._body = None
        else:
            self._queue.append(self._reject)  # answered when the feed returns

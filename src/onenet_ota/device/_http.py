"""HTTP/1.1 framing for the device SDK's own transport, without I/O (sans-IO).

Theory of operation. A connection's replies are parsed by :class:`ReplyParser`, a thin layer over
``httptools`` (llhttp, the parser of Node.js): this module never parses HTTP itself. It turns the
parser's callbacks into a queue of events (:class:`Head`, body bytes, :data:`END`,
:class:`Broken`) in wire order, so that several replies on one connection (keep-alive and
pipelining) come out one after the other, each belonging to the request sent in the same place.

:class:`Exchange` is one batch of requests written back to back on one connection (one request,
or a token check and its download pipelined) and their replies: it hands each reply's head to its
:class:`~onenet_ota.device._core.Call`, feeds the call's body reader, and records each call's
:class:`~onenet_ota.device._core.Outcome` or error. The I/O drivers (:mod:`.transport`) only
move bytes, watch the clock and map socket errors.

Framing rules that llhttp leaves to its caller (RFC 9112 §6.3):

- A reply with neither Content-Length nor chunked Transfer-Encoding ends when the server closes
  the connection (OneNET's one-byte download errors do this, §6.6.4); an EOF anywhere else in a
  reply is an error.
- A reply's head may hold at most :data:`MAX_HEAD` bytes: llhttp has no limit of its own.
- 1xx interim replies are skipped, as every HTTP client does.

Bytes after a complete reply stay queued for the next request on the connection: like the C SDK,
the client stops at Content-Length (§8.2 item 5), and surplus bytes break the next reply read from
that connection, which is then dropped (see :class:`Broken`).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import httptools

from onenet_ota.device._core import Call, Head, Outcome, WireRequest, index_header
from onenet_ota.device.errors import OtaError, ProtocolError, TransportError, endpoint_label

logger = logging.getLogger("onenet_ota.device")

MAX_HEAD: Final = 16 * 1024
"""Largest reply head (status line and headers) the client reads; a OneNET head is ~300 bytes."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The reply stream cannot be read any further: not HTTP, or closed early.

    ``closed`` is True when the server closed the connection (``detail`` says where).
    """

    detail: str
    closed: bool = False


class _HeadTooLong(Exception):
    """Raised inside llhttp's header callback to stop it at :data:`MAX_HEAD`."""


class _End:
    """The end of one reply."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()
Event = Head | bytes | _End | Broken


class ReplyParser:
    """The replies of one connection, parsed by llhttp, as a queue of events in wire order."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max_head = max_head
        self.events: deque[Event] = deque()
        self._headers: list[tuple[str, str]] = []
        self._index: dict[str, list[str]] = {}  # the values by lower-case name (Head's index)
        self._in_reply = False  # between a reply's first byte and its end
        self._in_head = False
        self._head_bytes = 0
        self._interim = False
        self._close_delimited = False
        self._broken = False
        self._received = False  # any byte at all since the last complete reply
        self._header_bytes = 0
        self._head_too_long = False
        self.closed = False  # the server closed the connection
        self.keep_alive = True  # the last complete reply allows another request

    # -- llhttp's callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_reply = True
        self._in_head = True
        self._headers = []
        self._index = {}
        self._header_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_head:
            self._head_too_long = True
            raise _HeadTooLong  # stops llhttp; feed() reports it
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        self._headers.append((key, text))
        index_header(self._index, key, text)  # the Head takes it whole (Head.indexed)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        status: int = self._parser.get_status_code()
        self._interim = 100 <= status <= 199
        if self._interim:
            return
        index = self._index
        self._index = {}  # the head keeps this one
        head = Head.indexed(status, tuple(self._headers), index)
        encoding = index.get("transfer-encoding")
        chunked = encoding is not None and encoding[0].strip().lower().endswith("chunked")
        bodiless = status in (204, 304)
        self._close_delimited = not (chunked or bodiless or "content-length" in index)
        self.events.append(head)

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self._in_reply = False
        self._received = False
        # Connection: close, or HTTP/1.0 without keep-alive: this reply is the connection's last.
        self.keep_alive = self.keep_alive and bool(self._parser.should_keep_alive())
        if not self._interim:
            self.events.append(END)
        self._interim = False

    # -- input --------------------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        """Whether the stream has ended (error or EOF): nothing more can be read from it."""
        return self._broken

    @property
    def idle(self) -> bool:
        """Whether no byte of a next reply has arrived (the connection may be reused)."""
        return not self._received and not self._broken

    def feed(self, data: bytes | memoryview) -> None:
        """Parse ``data`` from the connection; events go to :attr:`events` (body pieces as
        bytes of their own: ``data`` may be a view of a buffer the caller reuses)."""
        if self._broken or not data:
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break("the server switched protocols")
            return
        except httptools.HttpParserError as exc:
            if self._head_too_long:
                self._break(f"reply head longer than {self._max_head} bytes")
            else:
                self._break(str(exc) or type(exc).__name__)
            return
        if self._in_head:
            # A head still incomplete: bound what is buffered of it (llhttp has no limit).
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._break(f"reply head longer than {self._max_head} bytes")

    def feed_eof(self) -> None:
        """The server closed the connection."""
        self.closed = True
        if self._broken:
            return
        if self._in_reply and not self._in_head and self._close_delimited:
            self.on_message_complete()  # the body ran to the close, as its framing said
            # Nothing can follow on this connection: a request pipelined behind gets no reply
            # (an event, so that its reader stops instead of reading the end again and again).
            self._break("the server closed the connection without replying", closed=True)
            return
        if self._in_reply:
            where = "in the reply head" if self._in_head else "mid-body"
            self._break(f"the server closed the connection {where}", closed=True)
        elif self._received:
            self._break("the server closed the connection mid-reply", closed=True)
        else:
            self._break("the server closed the connection without replying", closed=True)

    def _break(self, detail: str, *, closed: bool = False) -> None:
        self._broken = True
        self.events.append(Broken(detail, closed))


_REQUEST_LINE_TAIL: Final = " HTTP/1.1\r\n"


def encode_request(
    request: WireRequest, target: str, host: str, extra: tuple[tuple[str, str], ...]
) -> bytes:
    """The request's bytes: request line, ``Host``, ``extra`` headers, the call's, and the body.

    The core has already refused every value that could break a line (it builds the headers
    from validated values), so this only writes them; a CR or LF would be a bug, not input.
    """
    lines = [request.method, " ", target, _REQUEST_LINE_TAIL, "Host: ", host, "\r\n"]
    for name, value in extra:
        lines += (name, ": ", value, "\r\n")
    for name, value in request.headers:
        lines += (name, ": ", value, "\r\n")
    body = request.body
    if body is not None:
        lines += ("Content-Length: ", str(len(body)), "\r\n")
    elif request.method == "POST":
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    if "\n" in head[:-2].replace("\r\n", ""):  # pragma: no cover - the core validates values
        raise ValueError("a request header holds a line break")
    data = head.encode("latin-1")
    return data + body if body else data


@dataclass(slots=True)
class Failure:
    """Why a call of an :class:`Exchange` has no outcome.

    ``error`` is the SDK's error to raise. ``unanswered`` is True when not one byte of the
    call's reply arrived before the connection ended: the server may never have read the
    request, so it may be sent once more on a new connection (§10).
    """

    error: OtaError
    unanswered: bool = False
    cause: BaseException | None = None


Result = Outcome[Any] | Failure


class Exchange:
    """Requests written back to back on one connection, and their replies, in order.

    Feed it the connection's events with :meth:`advance`; :attr:`results` fills with each call's
    :class:`Outcome` or :class:`Failure` as its reply completes. :attr:`done` is True once every
    call has one, or the connection broke (the rest then fail as ``unanswered``, or with the
    connection's error when their reply had begun).
    """

    def __init__(self, calls: list[Call[Any]], parser: ReplyParser) -> None:
        self.calls = calls
        self.parser = parser
        self.results: list[Result] = []
        self._reader: Any = None  # the current call's BodyReader, once its head is accepted
        self._head: Head | None = None
        self._skip: OtaError | None = None  # the current reply failed: read past its body
        self.reusable = True  # whether the connection may carry another request
        # Whether at least one call had a reply (of any kind) from the server.
        self.answered = False
        # Whether every call has its result: an attribute, not a property, as it is asked
        # several times per reply (the client's CPU per request counts).
        self.done = not calls

    @property
    def got_head(self) -> bool:
        """Whether the current call's reply head has arrived."""
        return self._head is not None

    @property
    def current(self) -> Call[Any]:
        """The call whose reply is being read."""
        return self.calls[len(self.results)]

    def advance(self) -> None:
        """Consume the parser's queued events."""
        events = self.parser.events
        while events and not self.done:
            event = events.popleft()
            if type(event) is bytes:
                if self._skip is None:
                    try:
                        self._reader.feed(event)
                    except OtaError as exc:
                        # An oversized body: the call has its answer and the rest of this body
                        # is not worth reading; the connection cannot be reused.
                        self._finish_current(Failure(exc))
                        self._abandon("the connection was dropped after an oversized reply")
            elif type(event) is Head:
                call = self.calls[len(self.results)]
                if logger.isEnabledFor(logging.DEBUG):  # the label costs more than the rest
                    logger.debug("%s: HTTP %s", endpoint_label(call.endpoint), event.status)
                self._head = event
                try:
                    self._reader = call.begin(event)
                except OtaError as exc:
                    self._skip = exc
            elif event is END:
                if self._skip is not None:
                    self._finish_current(Failure(self._skip))
                else:
                    try:
                        self._finish_current(self._reader.finish())
                    except OtaError as exc:
                        self._finish_current(Failure(exc))
            else:
                assert isinstance(event, Broken)
                self._broken(event)
        if self.done:
            # A reply that says the server closes (or HTTP/1.0) ends the connection's use. Bytes
            # that cannot start a reply stay queued: they fail the next call on the connection.
            self.reusable = self.reusable and not self.parser.closed and self.parser.keep_alive

    def _finish_current(self, result: Result) -> None:
        results = self.results
        results.append(result)
        if not (type(result) is Failure and result.unanswered):
            self.answered = True
        self.done = len(results) == len(self.calls)
        self._head = None
        self._reader = None
        self._skip = None

    def _broken(self, event: Broken) -> None:
        self.reusable = False
        call = self.current
        if self._head is not None:
            # The status and headers arrived, the body did not match its framing: typically a
            # Content-Length larger than the bytes sent before the server closed.
            error: OtaError = ProtocolError(
                f"reply body does not match its framing: {event.detail}", endpoint=call.endpoint
            )
            self._finish_current(Failure(error))
        elif event.closed and event.detail.endswith("without replying"):
            error = TransportError(
                "the server closed the connection without replying", endpoint=call.endpoint
            )
            self._finish_current(Failure(error, unanswered=True))
        else:
            error = ProtocolError(
                f"reply is not valid HTTP/1.1: {event.detail}", endpoint=call.endpoint
            )
            self._finish_current(Failure(error))
        self._abandon("the server closed the connection without replying")

    def _abandon(self, detail: str) -> None:
        """The connection is done for: every call still waiting gets no reply on it."""
        self.reusable = False
        while not self.done:
            error = TransportError(detail, endpoint=self.current.endpoint)
            self._finish_current(Failure(error, unanswered=True))

    def orphan(self, detail: str) -> None:
        """The connection was closed before the rest of the replies arrived (by an earlier
        exchange on it): a reply already begun is an error, the calls after it are
        unanswered."""
        self.reusable = False
        if not self.done and self._head is not None:
            error = TransportError(detail, endpoint=self.current.endpoint)
            self._finish_current(Failure(error))
        self._abandon(detail)

    def fail(
        self,
        error: OtaError,
        *,
        unanswered: bool = False,
        cause: BaseException | None = None,
        fresh: bool = False,
    ) -> None:
        """The connection failed (a socket error, a timeout): the current call gets ``error``
        (``unanswered`` when the caller knows the server never read it), the calls after it are
        unanswered. ``fresh``: no byte read on the connection can belong to this exchange yet
        (its requests were written behind others whose replies are unread)."""
        self.reusable = False
        if not self.done:
            idle = fresh or self.parser.idle
            unanswered = unanswered and self._head is None and idle
            self._finish_current(Failure(error, unanswered=unanswered, cause=cause))
        self._abandon("the connection failed before this reply")

"""The values a handler deals in: :class:`Request`, :class:`Response`, :class:`FileSegment`, the
errors a body read raises, and :class:`Limits`, the layer's bounds as one value."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

__all__ = [
    "BodyReader",
    "BodyTooLarge",
    "FileSegment",
    "Handler",
    "Limits",
    "Request",
    "RequestAborted",
    "Response",
    "Stream",
    "default_max_connections",
    "parse_query",
]


class BodyTooLarge(Exception):
    """The request body exceeds the limit the handler asked for."""


class RequestAborted(Exception):
    """The request body cannot be read to its end.

    The client disconnected, stayed quiet past the idle timeout, or sent a body whose framing is
    invalid. Handlers need not catch it: the layer answers 400 and closes if the client is still
    there, and drops the request otherwise.
    """


class RequestTimedOut(RequestAborted):
    """The body stopped arriving: nothing more came within the idle timeout, or the body's
    deadline passed (a stalled or trickled body), as opposed to a client that left or broke the
    framing. The management API answers it with 408."""


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
class Stream:
    """A response body produced over time, such as Server-Sent Events.

    Each chunk is written as the iterator yields it. The body is close-delimited (RFC 9112
    §6.3): the connection closes after the last chunk, so a stream never holds a keep-alive
    connection's later requests hostage. The layer stops the iterator (closes it at its next
    ``yield``) when the client goes away or the server begins to stop, so an iterator that waits
    long between chunks should yield an empty chunk now and then to be checked.
    """

    chunks: AsyncIterator[bytes]


@dataclass(slots=True)
class Response:
    """A response, serialised exactly: headers in the given order and casing, nothing added
    except ``Connection: close`` when the connection is about to close (D26), or ``Connection:
    keep-alive`` when an HTTP/1.0 client's connection stays open.

    The handler frames the body itself: a ``Content-Length`` header that matches the body, or
    ``Transfer-Encoding: chunked`` with an already chunk-encoded body (as in the D7 download
    error). A body with neither is close-delimited, so the connection closes after it. A
    ``Content-Length`` that differs from the body is a handler bug and turns into a 500.

    The layer never modifies what a response says, so a handler may return one object for many
    requests (the device API does, for memoised replies and cached chunks); it must then not
    change it. The layer only remembers on it, in :attr:`keep_alive_head`, the head it encoded
    for a keep-alive HTTP/1.1 answer, so that a response sent again and again is encoded once.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileSegment | Stream = b""
    reason: str | None = None
    # The status line and header block for an HTTP/1.1 request whose connection stays open
    # (nothing added to the headers), set by the layer when it first sends this response so.
    keep_alive_head: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, status: int, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """The canonical empty-bodied response (§4.3): ``headers`` then ``Content-Length: 0``."""
        return cls(status, [*headers, ("Content-Length", "0")])


BodyReader = Callable[[], Awaitable[bytes]]


def parse_query(query_string: str) -> dict[str, str]:
    """The parameters of ``query_string``, percent-decoded, the first occurrence of a name
    winning (spec §2.4); blank values kept.

    What :func:`urllib.parse.parse_qsl` with ``keep_blank_values`` gives. A query without ``%``
    or ``+`` (every device's poll) decodes to itself, so it is split here directly: a quarter
    of parse_qsl's cost, on a path where each device's query is its own (its dev_id) and so
    parsed anew on every cold poll.
    """
    parsed: dict[str, str] = {}
    if "%" in query_string or "+" in query_string:
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            parsed.setdefault(key, value)
        return parsed
    for pair in query_string.split("&"):
        if pair:
            key, _, value = pair.partition("=")
            if key not in parsed:
                parsed[key] = value
    return parsed


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
            self._query = parse_query(self.query_string)
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


def default_max_connections() -> int:
    """The default connection cap: half of what the descriptor limit leaves after a reserve.

    Each connection holds a socket, and one more descriptor while a large file segment is sent;
    the reserve of 64 keeps room for the listening sockets, the database, the log and the
    package files being written, so that legitimate work never meets ``EMFILE``.
    """
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 65536
    return max(1, (soft - 64) // 2)


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the layer enforces on a client, as one immutable value.

    Sizes are in bytes, times in seconds. What happens past each bound is in the package's
    theory of operation (:mod:`onenet_ota.server.http`).
    """

    max_requests: int = 1000
    """Requests per connection; the last one's response carries ``Connection: close`` (D19:
    OneNET closes at 1000)."""
    idle_timeout: float = 15.0
    """Quiet allowed between requests, and the longest single wait for body bytes."""
    header_timeout: float = 10.0
    """From the first byte of a request to the end of its head, in total; past it -> 408."""
    body_timeout: float = 20.0
    """The body's deadline (from the first wait for it), before :attr:`body_min_rate` adds the
    time its length needs; past it -> 400."""
    body_min_rate: float = 500.0
    """Bytes/s the body deadline allows for: declared length / rate is added to it."""
    max_header_bytes: int = 16 * 1024
    """Size of a request head; past it -> 400."""
    max_headers: int = 64
    """Header lines in a request head; past it -> 400."""
    buffer_limit: int = 256 * 1024
    """Unread body bytes per connection before reading the socket pauses (flow control)."""
    drain_limit: int = 64 * 1024
    """Unread body bytes still read and dropped to keep a connection; more -> close."""
    max_pipeline: int = 32
    """Queued pipelined requests per connection before reading the socket pauses."""
    max_connections: int = field(default_factory=default_max_connections)
    """Connections open at once, TLS ones in their handshake included; one more is closed at
    once. The default stays below the descriptor limit, see :func:`default_max_connections`."""
    handshake_timeout: float = 10.0
    """Time a TLS client has to complete its handshake."""

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_headers", "max_connections", "max_pipeline"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "idle_timeout",
            "header_timeout",
            "body_timeout",
            "body_min_rate",
            "handshake_timeout",
            "max_header_bytes",
            "buffer_limit",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.drain_limit < 0:
            raise ValueError("drain_limit must not be negative")

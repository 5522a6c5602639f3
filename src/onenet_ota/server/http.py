"""The server's HTTP/1.1 layer: request and response types.

The device API needs exact control of the bytes on the wire (spec §2.5, §8.2): header-name casing,
header order, at most 10 headers, no Date/Server, and the one-byte download error in the same write
as the headers. No ASGI server offers that (spec §8.4), so the project owns this layer: httptools
parses, and responses are serialised here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

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
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BodyTooLarge(Exception):
    """The request body exceeds the limit the handler asked for."""


@dataclass(slots=True)
class FileSegment:
    """A response body served from a file: ``length`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    length: int


@dataclass(slots=True)
class Response:
    """A response, serialised exactly: headers in the given order and casing, nothing added
    except ``Connection: close`` when the connection is about to close (D26).
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileSegment = b""
    reason: str | None = None


BodyReader = Callable[[], Awaitable[bytes]]


@dataclass(slots=True)
class Request:
    """A parsed request. The body is pulled by the handler, so uploads can stream to disk."""

    method: str
    target: str  # the raw request target: path and query
    path: str
    query_string: str
    headers: list[tuple[str, str]]  # as received; names keep their casing
    peer: str
    _read_chunk: BodyReader
    _query: dict[str, str] | None = None

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
        """The body, chunk by chunk, as it arrives."""
        while chunk := await self._read_chunk():
            yield chunk

    async def body(self, limit: int) -> bytes:
        """The whole body; raises :class:`BodyTooLarge` past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            parts.append(chunk)
        return b"".join(parts)


Handler = Callable[[Request], Awaitable[Response]]

"""Response serialisation: the status line and header block, byte for byte (spec §2.5, §8.2),
the reason phrases, and the canned answers the layer gives by itself."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from onenet_ota.server.http.models import Response

__all__ = [
    "BAD_REQUEST",
    "CONTINUE",
    "NOT_IMPLEMENTED",
    "REASONS",
    "REQUEST_TIMEOUT",
    "InvalidResponse",
    "encode_head",
    "loggable",
    "reason_phrase",
]

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
    501: "Not Implemented",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class InvalidResponse(Exception):
    """The handler returned a response that cannot be framed (a bug in the handler)."""


# The layer's own answers (§4.3): canonical, empty-bodied, and ending the connection.
BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
NOT_IMPLEMENTED: Final = (
    b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES: Final = frozenset({204, 304})


def reason_phrase(response: Response) -> str:
    """The response's own reason, else the standard phrase, never empty (§8.2 item 1)."""
    if response.reason:
        return response.reason
    reason = REASONS.get(response.status)
    if reason is not None:
        return reason
    try:
        return HTTPStatus(response.status).phrase
    except ValueError:
        return "Unknown"


# The headers that may stand right before the final Content-Range as one group; the layer's
# Connection header goes before the whole group, which stays together and last (§6.6.3, §12.3).
_RANGE_PREFIX: Final = frozenset({"content-range-start", "content-range-end"})


def encode_head(
    response: Response,
    body_length: int | None,
    close: bool,
    http10: bool = False,
    head_only: bool = False,
) -> tuple[bytes, bool]:
    """The status line and header block, and whether the connection must close after them.

    When the handler sent no Connection header, adds ``Connection: close`` when closing, or
    ``Connection: keep-alive`` for an HTTP/1.0 request (``http10``) whose connection stays open:
    before the range group (``Content-Range``, which stays last, §6.6.3/D8, and Studio's
    ``Content-Range-Start/End`` just before it, §12.3), else at the end. ``head_only``: the
    answer to HEAD, whose body is never sent; ``body_length`` None: a HEAD handler left the body
    out, so ``Content-Length`` is taken as it is.
    """
    status = response.status
    if not 100 <= status <= 999:
        raise InvalidResponse(f"status {status} is not a 3-digit code")
    lines = [f"HTTP/1.1 {status} {reason_phrase(response)}\r\n"]
    framed = False
    connection: str | None = None
    range_index = -1
    for name, value in response.headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
            raise InvalidResponse(f"header {name!r} contains a line break or colon")
        lowered = name.lower()
        if lowered == "content-length":
            if body_length is not None and value.strip() != str(body_length):
                raise InvalidResponse(
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
    if not framed and not head_only and status not in _NO_BODY_STATUSES and not 100 <= status < 200:
        close = True  # close-delimited body: only the end of the connection frames it
    if connection is not None:
        if "close" in connection:
            close = True
    elif close or http10:
        # RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only if the response says so.
        line = "Connection: close\r\n" if close else "Connection: keep-alive\r\n"
        if range_index >= 0:
            # Studio's Content-Range-Start/End right before it belong to the group (§12.3).
            while lines[range_index - 1].split(":", 1)[0].lower() in _RANGE_PREFIX:
                range_index -= 1
            lines.insert(range_index, line)
        else:
            lines.append(line)
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1"), close
    except UnicodeEncodeError as exc:
        raise InvalidResponse("a header is not latin-1") from exc


_TOKEN_IN_PATH: Final = re.compile(r"(/download/)[^/?]+")


def loggable(path: str) -> str:
    """The path with any download token masked: tokens are credentials (§4.1, D5)."""
    return _TOKEN_IN_PATH.sub(r"\1***", path)

"""Download framing of the three dialects (spec §6.6.3-§6.6.4, §12.3, §13.4, D7, D8, F8, F11).

Rules:

1. Success, every dialect: 206 with ``Content-Range: bytes s-e/L`` when a Range was parsed (even
   if the clamp gave the whole file), else 200 with the whole file (D8, F10). Headers start
   ``Content-Type: application/octet-stream``, ``Content-Length``, ``Content-Disposition``;
   ``Content-Range`` is always last (§6.6.3: byte-searching clients).
2. Studio adds ``Content-Range-Start: s`` and ``Content-Range-End: e`` just before
   ``Content-Range`` (§12.3): the Studio SDK accepts a chunk only when they equal its request.
   They are sent only with ``Content-Range`` (a 200 answers no range, so there is nothing to
   compare; docs/dialects.md).
3. Fuse adds ``Ota-Errno: 0`` after ``Content-Disposition`` (§13.4, F11).
4. Errors. Classic: status 200, no ``Content-Length``, the code as one raw byte in one lower-case
   chunk (D7, §6.6.4). Studio: the same body **and** ``Ota-Errno: N`` (§12.3: the C SDK decodes
   the byte, the Studio SDK reads the header). Fuse: status 200, ``Ota-Errno: N`` and a fuse JSON
   envelope with ``code`` N and a ``Content-Length`` (F8).
5. An error reply goes out in one write with its headers (§8.2 item 7):
   :meth:`DownloadReply.to_bytes` renders the whole reply as one byte string.
6. ``Connection: close``, when the server closes, goes after the other headers but before the
   range group (``Content-Range-Start``/``-End``/``Content-Range``), so that the group stays last.
7. At most 10 header lines (§8.2 item 3); the longest reply here (Studio 206 closing) has 8.

Theory of operation. The server picks its dialect's :class:`DownloadFraming` and calls
:func:`success_reply` (the body is the served bytes, possibly written by the HTTP layer from a
file) or :func:`error_reply`. A client calls :func:`read_error` on any download reply: a code
means failure whatever the status (§13.7); then :func:`served_range` tells where the bytes go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from onenet_ota.protocol.codes import OtaErrno
from onenet_ota.protocol.download import decode_error_body
from onenet_ota.protocol.envelopes import FUSE_ENVELOPE, new_request_id
from onenet_ota.protocol.messages import WireFormatError
from onenet_ota.protocol.ranges import format_content_range, parse_content_range

MAX_HEADERS: Final = 10  # §8.2 item 3
OCTET_STREAM: Final = "application/octet-stream"
REASONS: Final = {200: "OK", 206: "Partial Content"}
_RANGE_GROUP: Final = frozenset({"Content-Range-Start", "Content-Range-End", "Content-Range"})


class ErrorBody(Enum):
    """How a download error carries its code in the body."""

    RAW_BYTE_CHUNK = "raw_byte_chunk"  # D7: b"1\r\n" + code byte + b"\r\n0\r\n\r\n"
    FUSE_JSON = "fuse_json"  # F8: {"code":N,"msg":...,"request_id":...}


@dataclass(frozen=True, slots=True)
class DownloadFraming:
    """What one dialect adds to the classic download reply."""

    served_range_headers: bool  # Content-Range-Start/End (§12.3)
    ota_errno_on_error: bool  # Ota-Errno: N on errors (§12.3, §13.4)
    ota_errno_on_success: bool  # Ota-Errno: 0 on success (§13.4, F11)
    error_body: ErrorBody


CLASSIC_FRAMING: Final = DownloadFraming(False, False, False, ErrorBody.RAW_BYTE_CHUNK)
STUDIO_FRAMING: Final = DownloadFraming(True, True, False, ErrorBody.RAW_BYTE_CHUNK)
FUSE_FRAMING: Final = DownloadFraming(False, True, True, ErrorBody.FUSE_JSON)


@dataclass(frozen=True, slots=True)
class DownloadReply:
    """A download reply: status, headers in wire order (without ``Connection``), body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_bytes(self, *, closing: bool = False) -> bytes:
        """The whole reply as sent (one write, §8.2 item 7), canonical per D26."""
        lines = [f"HTTP/1.1 {self.status} {REASONS[self.status]}"]
        placed = not closing
        for name, value in self.headers:
            if not placed and name in _RANGE_GROUP:
                lines.append("Connection: close")
                placed = True
            lines.append(f"{name}: {value}")
        if not placed:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def raw_byte_chunk(code: int) -> bytes:
    """The one-byte chunked error body (D7): a raw byte 0x01-0x06, lower-case hex size."""
    if not 1 <= code <= 6:
        raise ValueError(f"download error code {code} is not 1-6")
    return b"1\r\n" + bytes([code]) + b"\r\n0\r\n\r\n"


def success_reply(
    framing: DownloadFraming,
    *,
    file_name: str,
    length: int,
    start: int,
    end: int,
    partial: bool,
    body: bytes = b"",
) -> DownloadReply:
    """A successful download serving bytes ``start``..``end`` (inclusive) of ``length``.

    ``partial`` is whether a Range was parsed (206) or not (200, the whole file, D8). ``body`` may
    be left empty when the HTTP layer sends the bytes itself; when given it must be the range.
    ``file_name`` must already be fit for the header (§4.5).
    """
    if not 0 <= start <= end < length:
        raise ValueError(f"range {start}-{end} is not inside a {length}-byte file")
    if not partial and (start, end) != (0, length - 1):
        raise ValueError("a 200 download carries the whole file (§6.6.3)")
    served = end - start + 1
    if body and len(body) != served:
        raise ValueError(f"body of {len(body)} bytes for a range of {served}")
    headers = [
        ("Content-Type", OCTET_STREAM),
        ("Content-Length", str(served)),
        ("Content-Disposition", f'attachment; filename="{file_name}"'),
    ]
    if framing.ota_errno_on_success:
        headers.append(("Ota-Errno", "0"))  # §13.4
    if partial:
        if framing.served_range_headers:  # §12.3: the served, clamped start and end
            headers.append(("Content-Range-Start", str(start)))
            headers.append(("Content-Range-End", str(end)))
        headers.append(("Content-Range", format_content_range(start, end, length)))  # last
    return DownloadReply(206 if partial else 200, tuple(headers), body)


def error_reply(
    framing: DownloadFraming, code: int, *, request_id: str | None = None
) -> DownloadReply:
    """A download error carrying ``code`` (a classic byte or an ``Ota-Errno``, see
    :data:`onenet_ota.protocol.codes.DOWNLOAD_CODES`). Status 200 in every dialect."""
    if framing.error_body is ErrorBody.RAW_BYTE_CHUNK:
        headers = [("Content-Type", OCTET_STREAM)]
        if framing.ota_errno_on_error:
            headers.append(("Ota-Errno", str(code)))  # §12.3: the header the Studio SDK reads
        headers.append(("Transfer-Encoding", "chunked"))
        return DownloadReply(200, tuple(headers), raw_byte_chunk(code))
    ota = OtaErrno(code)
    if ota is OtaErrno.OK:
        raise ValueError("Ota-Errno 0 is not an error")
    body = FUSE_ENVELOPE.encode(int(ota), ota.text, request_id=request_id or new_request_id())
    headers = [
        ("Content-Type", FUSE_ENVELOPE.content_type),
        ("Content-Length", str(len(body))),
        ("Ota-Errno", str(code)),  # F8
    ]
    return DownloadReply(200, tuple(headers), body)


def read_error(
    framing: DownloadFraming, *, status: int, headers: Mapping[str, str], body: bytes
) -> int | None:
    """The error code of a download reply, or None for data (§10, §13.7).

    ``headers`` has lower-case names; ``body`` is the payload (chunked framing removed). A
    non-zero ``Ota-Errno`` is an error whatever the status (§13.7); a 2xx without
    ``Content-Length`` carries its code as its single body byte (§6.6.4).
    Raises :class:`WireFormatError` for a reply that is neither.
    """
    value = headers.get("ota-errno")
    if framing.ota_errno_on_error and value is not None:
        if not value.strip().isdigit() or not value.strip().isascii():
            raise WireFormatError(f"Ota-Errno {value!r} is not a number")
        if int(value) != 0:
            return int(value)
    if 200 <= status < 300 and "content-length" not in headers:
        code = decode_error_body(body)
        if code is None:
            raise WireFormatError("a download without Content-Length is not an error byte")
        return int(code)
    return None


def served_range(headers: Mapping[str, str]) -> tuple[int, int] | None:
    """The served start and end: ``Content-Range-Start``/``-End`` when both are present
    (§12.3), else ``Content-Range`` (§6.6.3); None when neither is. ``headers`` has lower-case
    names. Raises :class:`WireFormatError` for a malformed or contradictory value."""
    start, end = headers.get("content-range-start"), headers.get("content-range-end")
    content_range = headers.get("content-range")
    parsed = parse_content_range(content_range) if content_range is not None else None
    if content_range is not None and parsed is None:
        raise WireFormatError(f"malformed Content-Range {content_range!r}")
    if start is not None and end is not None:
        if not (start.isdigit() and start.isascii() and end.isdigit() and end.isascii()):
            raise WireFormatError("Content-Range-Start/End are not numbers")
        pair = (int(start), int(end))
        if parsed is not None and pair != parsed[:2]:
            raise WireFormatError("Content-Range-Start/End contradict Content-Range")
        return pair
    return None if parsed is None else (parsed[0], parsed[1])

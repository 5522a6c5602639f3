"""Canonical device-API responses (spec §2.5, §6.6.3, §6.6.4, decision D26).

Every response the classic device API sends is built here, so header names, their order and their
count are fixed in one place:

- JSON replies: ``Content-Type``, ``Content-Length``, compact body; the whole response, including a
  ``Connection`` header the HTTP layer may add, stays within 512 bytes (§8.2 item 4).
- Downloads: ``Content-Type``, ``Content-Length``, ``Content-Disposition`` [, ``Connection``],
  ``Content-Range`` last (§6.6.3); the HTTP layer inserts ``Connection: close`` before
  ``Content-Range`` when it closes.
- The one-byte download error (§6.6.4, D7): status 200, no ``Content-Length``, the byte framed here
  as a single lower-case chunk so that headers and byte leave in one write.
- Transport errors 400/404/405/413 with an empty body (§4.3).

The HTTP layer adds nothing but ``Connection: close``; see :class:`onenet_ota.server.http.Response`.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from onenet_ota.protocol import values
from onenet_ota.protocol.download import DownloadError
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import MAX_JSON_RESPONSE, encode_envelope
from onenet_ota.protocol.ranges import format_content_range
from onenet_ota.server.http import REASONS, FileSegment, Response, Stream
from onenet_ota.server.http.encoding import encode_head

__all__ = [
    "MAX_HEADERS",
    "WireLimitError",
    "download",
    "download_error",
    "empty",
    "envelope",
    "json_reply",
    "response_size",
    "safe_file_name",
]

# §8.2 item 3: the C SDK corrupts its heap with 11 or more response header lines.
MAX_HEADERS: Final = 10
CONNECTION_CLOSE: Final = ("Connection", "close")
# The longer of the two lines the HTTP layer may add ("close", or "keep-alive" for HTTP/1.0).
_CLOSE_LINE_LEN: Final = len("Connection: keep-alive\r\n")

_JSON_TYPE: Final = ("Content-Type", "application/json")
_OCTET_TYPE: Final = ("Content-Type", "application/octet-stream")
_CHUNKED: Final = ("Transfer-Encoding", "chunked")
_FALLBACK_FILE_NAME: Final = "package.bin"


class WireLimitError(ValueError):
    """A response that would break a device's limits (§8.2): a bug in the caller, never sent."""


def response_size(response: Response, *, closing: bool = True) -> int:
    """Bytes on the wire for ``response`` (status line, headers, blank line, body).

    ``closing`` counts the ``Connection`` line the HTTP layer may add, in its longer form.
    """
    reason = response.reason or REASONS[response.status]
    size = len(f"HTTP/1.1 {response.status} {reason}\r\n") + 2
    size += sum(len(name) + len(value) + 4 for name, value in response.headers)
    if closing and all(name != "Connection" for name, _ in response.headers):
        size += _CLOSE_LINE_LEN
    body = response.body
    if isinstance(body, Stream):
        raise TypeError("a device reply is never a stream")
    size += body.length if isinstance(body, FileSegment) else len(body)
    return size


def _check_header_count(headers: list[tuple[str, str]]) -> None:
    # One slot is kept for the Connection header the HTTP layer may add.
    if len(headers) + 1 > MAX_HEADERS:
        raise WireLimitError(f"{len(headers)} headers leave no room for Connection (§8.2 item 3)")


def json_reply(body: bytes, content_type: str = "application/json") -> Response:
    """A 200 JSON reply with ``body`` (already compact JSON, §2.5). ``content_type`` replaces
    ``application/json`` (fuse: §13.2, F11).

    Raises :class:`WireLimitError` if the response, with a ``Connection`` line, would exceed the
    C SDK's 512-byte receive buffer (§8.2 item 4). Value limits (D21) keep real replies far below.
    """
    custom = content_type != _JSON_TYPE[1]
    kind = ("Content-Type", content_type) if custom else _JSON_TYPE
    response = Response(200, [kind, ("Content-Length", str(len(body)))], body)
    # Short bodies cannot reach the limit: skip the exact count on the hot path (a longer
    # Content-Type leaves that much less room).
    short = _SHORT_JSON_BODY - (len(content_type) - len(_JSON_TYPE[1]) if custom else 0)
    if len(body) > short and response_size(response, closing=True) > MAX_JSON_RESPONSE:
        raise WireLimitError(f"JSON reply of {len(body)} bytes exceeds 512 bytes on the wire")
    # Most replies are built for one request (a cold poll's): their head comes from a few
    # cached ones (by type and length) rather than being encoded header by header.
    response.keep_alive_head = _json_head(content_type, len(body))
    return response


@functools.lru_cache(maxsize=1024)
def _json_head(content_type: str, length: int) -> bytes:
    # The keep-alive HTTP/1.1 head of json_reply's response, as the HTTP layer encodes it. A
    # reply is at most 512 bytes and the content types are the dialects' few constants: this
    # holds a few hundred entries at most.
    response = Response(200, [("Content-Type", content_type), ("Content-Length", str(length))])
    return encode_head(response, length, False)[0]


# Status line 17 + Content-Type 32 + "Content-Length: NNNN" 22 + Connection line + blank 2.
_SHORT_JSON_BODY: Final = MAX_JSON_RESPONSE - 73 - _CLOSE_LINE_LEN

# Errno-only replies are the most common answers; their bodies are built once.
_ENVELOPES: Final = {errno: encode_envelope(errno) for errno in Errno}


def envelope(errno: Errno, data: dict[str, Any] | None = None) -> Response:
    """``{"errno":N,"error":"text"[,"data":{...}]}`` as a canonical JSON reply (§4.3, D1, D2)."""
    body = _ENVELOPES[errno] if data is None else encode_envelope(errno, data)
    return json_reply(body)


def safe_file_name(file_name: str) -> str:
    """A name fit for ``Content-Disposition`` (§4.5): printable ASCII without ``"`` or ``\\``.

    Upload validation already enforces this; the check here keeps a bad row from ever injecting
    header text (CR, LF) or breaking the quoted string.
    """
    if values.is_file_name(file_name):
        return file_name
    cleaned = "".join(ch for ch in file_name if " " <= ch <= "~" and ch not in '"\\')[:64]
    return cleaned if cleaned.strip() else _FALLBACK_FILE_NAME


@functools.lru_cache(maxsize=1024)
def _disposition(file_name: str) -> tuple[str, str]:
    # Built once per name: every 4 KiB chunk of a download repeats it.
    return ("Content-Disposition", f'attachment; filename="{safe_file_name(file_name)}"')


def download(
    *,
    file_name: str,
    length: int,
    start: int,
    end: int,
    partial: bool,
    body: bytes | FileSegment,
) -> Response:
    """A successful E6 reply serving bytes ``start``..``end`` (inclusive) of a ``length``-byte file.

    ``partial`` is whether a Range header was parsed: then 206 with ``Content-Range`` as the last
    header, even when the clamp produced the whole file (D8); otherwise 200 with the whole file.
    """
    served = end - start + 1
    body_len = body.length if isinstance(body, FileSegment) else len(body)
    if body_len != served:
        raise WireLimitError(f"body of {body_len} bytes for a range of {served}")
    if not partial and (start, end) != (0, length - 1):
        raise WireLimitError("a 200 download must carry the whole file (§6.6.3)")
    headers = [_OCTET_TYPE, ("Content-Length", str(served)), _disposition(file_name)]
    if not partial:
        _check_header_count(headers)
        return Response(200, headers, body)
    # §6.6.3: last, because third-party clients find the body by searching for "Range".
    content_range = format_content_range(start, end, length)
    headers.append(("Content-Range", content_range))
    _check_header_count(headers)
    response = Response(206, headers, body)
    if isinstance(body, bytes):
        # A chunk read now (one device's own download reads every chunk once): its keep-alive
        # head is the file's head so far and the Content-Range line, with no encoding per chunk.
        response.keep_alive_head = b"%sContent-Range: %s\r\n\r\n" % (
            _partial_head_start(file_name, served),
            content_range.encode("latin-1"),
        )
    return response


@functools.lru_cache(maxsize=256)
def _partial_head_start(file_name: str, served: int) -> bytes:
    # The keep-alive HTTP/1.1 head of a 206 serving ``served`` bytes of ``file_name`` up to its
    # Content-Range line, as the HTTP layer encodes it: the same for every full chunk of a file.
    response = Response(
        206, [_OCTET_TYPE, ("Content-Length", str(served)), _disposition(file_name)]
    )
    head, _ = encode_head(response, served, False)
    return head[:-2]  # without the empty line that ends the head


# §6.6.4 / D7: the code as a raw byte (never an ASCII digit) in one lower-case chunk, so that the
# C SDK (which treats a 2xx without Content-Length as an error and returns the first body byte)
# receives headers and byte in one segment. The body is framed here; the HTTP layer writes the
# head and this body in a single write.
_ERROR_BODIES: Final = {code: b"1\r\n" + bytes([code]) + b"\r\n0\r\n\r\n" for code in DownloadError}


def download_error(code: DownloadError) -> Response:
    """The E6 error reply carrying ``code`` (98 bytes for any code, §6.6.4)."""
    return Response(200, [_OCTET_TYPE, _CHUNKED], _ERROR_BODIES[code])


def empty(status: int, *, allow: str | None = None) -> Response:
    """A transport error with ``Content-Length: 0`` (§4.3): 400, 404, 405 (with Allow), 413."""
    if status not in (400, 404, 405, 413):
        raise ValueError(f"status {status} is not a transport error of the device API")
    if (status == 405) != (allow is not None):
        raise ValueError("Allow goes with 405 and only with 405")
    headers = [("Content-Length", "0")]
    if allow is not None:
        headers.append(("Allow", allow))
    return Response(status, headers)

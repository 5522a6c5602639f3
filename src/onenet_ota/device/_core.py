"""The device client's sans-IO core: every protocol decision of the client, made once.

Theory of operation. Each operation is a :class:`Call`. :class:`ClientCore` builds it from the
configuration and the arguments, validating them first, so that bad input fails before anything is
sent. A call holds a :class:`WireRequest`: method, URL (query in the C SDK's order), headers and
body, as plain data. A driver (``client.py``, sync or async) sends that request, hands the reply's
status and headers to :meth:`Call.begin`, which checks them and answers with a :class:`BodyReader`
that knows how many bytes the body may have. The driver feeds the body to the reader as it arrives
and calls :meth:`BodyReader.finish`, which decodes the reply into the call's result and the event
to report, or raises the error from :mod:`onenet_ota.device.errors`.

No I/O and no httpx2 here: the drivers only move bytes and map transport exceptions.

Dialects (§13.7). The configuration's ``dialect`` picks the API. Classic keeps its own request
forms (query strings with ``dev_id``, download tokens). Studio (§12) and fuse (§13) take their
paths from :mod:`onenet_ota.protocol.dialects`, their envelope from
:mod:`onenet_ota.protocol.envelopes` and the meaning of their codes from
:mod:`onenet_ota.protocol.codes`; a task is named by its ``tid``. Their downloads send
``Range: bytes=s-e`` with the end clamped to the package's last byte, accept a chunk only when the
served start and end equal the request, and read a non-zero ``Ota-Errno`` as an error whatever
the status (:func:`onenet_ota.protocol.framing.read_error`, ``served_range``).

Field clients (§13.1). Two configuration switches shape the requests as some clients in the field
do, in every dialect: ``keep_alive=False`` adds ``Connection: close`` to every request (the
AT-command modules), and ``range_for_whole_file=False`` sends a download of the whole package
from byte 0 without a Range (the ESP32 clients that stream the file in one GET).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

from onenet_ota.auth import redact
from onenet_ota.device.config import DeviceConfig, Timeout
from onenet_ota.device.errors import (
    AnyEndpoint,
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    OtaError,
    ProtocolError,
    RequestTimeout,
    endpoint_label,
    platform_error,
)
from onenet_ota.device.events import (
    DownloadedChunk,
    OtaEvent,
    PackageDownloaded,
    StatusReported,
    TaskChecked,
    TokenChecked,
    VersionPosted,
)
from onenet_ota.protocol import framing, messages, ranges, values
from onenet_ota.protocol.codes import Dialect, Operation, OtaErrno
from onenet_ota.protocol.dialects import DIALECTS, EndpointSpec
from onenet_ota.protocol.dialects import endpoint as dialect_endpoint
from onenet_ota.protocol.download import decode_error_body
from onenet_ota.protocol.endpoints import Endpoint, path_for
from onenet_ota.protocol.envelopes import EnvelopeCodec
from onenet_ota.protocol.messages import (
    Envelope,
    TaskInfo,
    TidTaskInfo,
    WireFormatError,
    parse_status_data,
)
from onenet_ota.protocol.status import TaskType, classify_result, classify_step

T = TypeVar("T")
AnyTask = TaskInfo | TidTaskInfo
"""What a task check returns: classic's :class:`TaskInfo` (a download token) or Studio's and
fuse's :class:`TidTaskInfo` (a ``tid``)."""
TaskRef = str | int
"""How a request names its task: a classic download token (str) or a Studio/fuse tid (int)."""

# The protocol keeps JSON replies within 512 bytes (§8.2 item 4). This client is more lenient than
# the C SDK, but a reply beyond 64 KiB is not a OneNET reply: refuse it without reading it all.
MAX_JSON_REPLY = 64 * 1024
# Largest range one call may ask for: a whole package (§4.5).
MAX_RANGE_SIZE = values.PACKAGE_SIZE_MAX
# OneNET advises devices to fetch at least 2 bytes per request (§6.6.1, §10).
MIN_RANGE_SIZE = 2
_MAX_TOKEN_LEN = 64
_BUILT_MAX = 16  # requests kept by ClientCore._cached: a few per task, a task or two at a time
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,64}")
# What ClientCore._built keeps, by kind: plain objects, since an Enum's hash is a Python call.
_KEY_CHECK_TOKEN: Final = object()
_KEY_DOWNLOAD: Final = object()
_KEY_TASK_STATUS: Final = object()
_KEY_TID_DOWNLOAD: Final = object()


def index_header(index: dict[str, list[str]], name: str, value: str) -> None:
    """Add one header to a :class:`Head`'s index: the values by lower-case name, in order.

    A reply parser calls this as each header arrives and hands the index to
    :meth:`Head.indexed`; a head built from a header list calls it itself.
    """
    found = index.get(lowered := name.lower())
    if found is None:
        index[lowered] = [value]
    else:
        found.append(value)


@dataclass(frozen=True, slots=True)
class Head:
    """A reply's status code and headers (names as received; lookups ignore case)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    # The values by lower-case name, built once: every reply is looked up several times
    # (framing, Content-Length, Content-Range...), and the client's CPU per request counts.
    _index: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index_header(index, key, value)
        object.__setattr__(self, "_index", index)

    @classmethod
    def indexed(
        cls, status: int, headers: tuple[tuple[str, str], ...], index: dict[str, list[str]]
    ) -> Head:
        """A head whose ``index`` (the values by lower-case name, in order) its reader built
        while the headers arrived; the caller hands it over and keeps no reference."""
        head = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(head, "status", status)
        setattr_(head, "headers", headers)
        setattr_(head, "_index", index)
        return head

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``."""
        return list(self._index.get(name.lower(), ()))

    def get(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        found = self._index.get(name.lower())
        return found[0] if found else None

    def first_values(self) -> dict[str, str]:
        """The first value of each header, stripped, by lower-case name (as framing reads them)."""
        return {name: values[0].strip() for name, values in self._index.items()}


@dataclass(frozen=True, slots=True, repr=False)
class WireRequest:
    """One HTTP request, as plain data. ``url`` is absolute; ``headers`` keep order and casing."""

    endpoint: AnyEndpoint
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    timeout: Timeout

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def __repr__(self) -> str:  # the Authorization value is a credential
        headers = [(k, redact(v) if k.lower() == "authorization" else v) for k, v in self.headers]
        return f"WireRequest({endpoint_label(self.endpoint)} {self.method} {self.url} {headers})"


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What a finished call produced: its result and the event to report (if any)."""

    value: T
    event: OtaEvent | None = None


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """The versions E2 reports as stored on the platform (either may be unknown)."""

    f_version: str | None
    s_version: str | None


class BodyReader(Generic[T]):
    """Collects one reply body, refusing more than the call allows, then decodes it."""

    def __init__(
        self, call: Call[T], head: Head, limit: int, overflow: str, length: int | None
    ) -> None:
        self._call = call
        self._head = head
        self._limit = limit
        self._overflow = overflow
        self._length = length  # the head's Content-Length, as the call's begin() read it
        # The pieces as they came, joined once at the end: a chunk's bytes are copied once
        # here, not once per piece and again into the result.
        self._pieces: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Add body bytes; raises :class:`ProtocolError` once they exceed the limit."""
        self._size += len(data)
        if self._size > self._limit:
            raise self._call.protocol_error(self._overflow)
        self._pieces.append(data)

    def finish(self) -> Outcome[T]:
        """Decode the complete body."""
        # A body that came in one piece is that piece itself (bytes.join does not copy one).
        return self._call._complete(self._head, b"".join(self._pieces), self._length)


class Call(ABC, Generic[T]):
    """One operation: its request, and how to judge and decode its reply."""

    # Whether each call of this kind has a request of its own (a download's Range), never the
    # same request object as an earlier call: a transport then keeps no encoding of it. A
    # class attribute: an isinstance check against this ABC's subclasses costs a Python call.
    fresh_requests: bool = False

    def __init__(self, request: WireRequest) -> None:
        self.request = request
        self._known_length: tuple[Head, int | None] | None = None

    @property
    def endpoint(self) -> AnyEndpoint:
        """The endpoint the call goes to."""
        return self.request.endpoint

    def protocol_error(self, message: str) -> ProtocolError:
        """A :class:`ProtocolError` naming this call's endpoint."""
        return ProtocolError(message, endpoint=self.endpoint)

    def timeout_error(self) -> RequestTimeout:
        """The error for a call that ran out of time while reading its reply."""
        return RequestTimeout(
            f"no complete reply within {self.request.timeout.ms} ms", endpoint=self.endpoint
        )

    def begin(self, head: Head) -> BodyReader[T]:
        """Judge the status and headers; the reader to feed the body to."""
        if not 200 <= head.status <= 299:
            # Non-2xx is a transport-level answer (§4.3, §10); the C SDK returns the status.
            raise HTTPStatusError(head.status, endpoint=self.endpoint)
        found = head._index.get("content-encoding")
        encoding = found[0] if found else None
        if encoding is not None and encoding.strip().lower() != "identity":
            raise self.protocol_error(f"reply is compressed ({encoding}); OneNET never does that")
        length = self._content_length(head)
        limit, overflow = self._body_limit(head, length)
        return BodyReader(self, head, limit, overflow, length)

    def finish(self, head: Head, body: bytes) -> Outcome[T]:
        """Decode a complete reply body (its head already accepted by :meth:`begin`)."""
        return self._complete(head, body, self._content_length(head))

    def _complete(self, head: Head, body: bytes, length: int | None) -> Outcome[T]:
        """:meth:`finish` with the head's Content-Length already read."""
        if length is not None and len(body) != length:
            raise self.protocol_error(
                f"reply body has {len(body)} bytes but Content-Length says {length}"
            )
        return self._decode(head, body, length)

    def _content_length(self, head: Head) -> int | None:
        known = self._known_length
        if known is not None and known[0] is head:  # begin() and finish() read the same head
            return known[1]
        length = self._parse_content_length(head)
        self._known_length = (head, length)
        return length

    def _parse_content_length(self, head: Head) -> int | None:
        values = head._index.get("content-length")
        if values is None:
            return None
        found = {values[0].strip()} if len(values) == 1 else {value.strip() for value in values}
        if len(found) > 1:
            raise self.protocol_error("reply has conflicting Content-Length headers")
        (text,) = found
        if not text.isdigit() or len(text) > 19:
            raise self.protocol_error(f"reply has an invalid Content-Length {text!r}")
        return int(text)

    @abstractmethod
    def _body_limit(self, head: Head, length: int | None) -> tuple[int, str]:
        """The most body bytes to accept and the message for exceeding it; may raise."""

    @abstractmethod
    def _decode(self, head: Head, body: bytes, length: int | None) -> Outcome[T]:
        """The result of a complete, length-checked body."""


class JsonCall(Call[T]):
    """A call to a JSON endpoint: ``{"errno","error"[,"data"]}`` replies (§4.3), or the
    dialect's envelope when ``codec`` is given (fuse's ``{"code","msg","request_id"}``, §13.2)."""

    def __init__(
        self,
        request: WireRequest,
        on_success: Callable[[Envelope, bytes], Outcome[T]],
        codec: EnvelopeCodec | None = None,
    ):
        super().__init__(request)
        self._on_success = on_success
        self._codec = codec

    def _body_limit(self, head: Head, length: int | None) -> tuple[int, str]:
        too_large = f"reply is larger than {MAX_JSON_REPLY} bytes"
        if length is not None and length > MAX_JSON_REPLY:
            raise self.protocol_error(f"{too_large} (Content-Length {length})")
        return MAX_JSON_REPLY, too_large

    def _decode(self, head: Head, body: bytes, length: int | None) -> Outcome[T]:
        try:
            if self._codec is None:
                envelope = _decode_envelope(body)
            else:
                reply = self._codec.decode(body)
                envelope = Envelope(errno=reply.code, error=reply.text, data=reply.data)
        except WireFormatError as exc:
            raise self.protocol_error(str(exc)) from None
        if envelope.errno < 0:
            raise self.protocol_error(f"reply has a negative errno {envelope.errno}")
        if envelope.errno != 0:
            raise platform_error(
                envelope.errno, envelope.error, endpoint=self.endpoint, data=envelope.data
            )
        try:
            return self._on_success(envelope, body)
        except WireFormatError as exc:
            raise self.protocol_error(str(exc)) from None


# The same few short replies come back over and over (``{"errno":0,"error":"succ"}`` to every
# token check, report and version post): their decoded envelopes are kept, if they carry no
# data (an Envelope is frozen; a data dict could be changed by whoever reads it). Bounded, and
# only replies this short.
_ENVELOPES: dict[bytes, Envelope] = {}
_ENVELOPES_MAX = 16
_ENVELOPE_KEPT_SIZE = 128


def _decode_envelope(body: bytes) -> Envelope:
    """:func:`messages.decode_envelope`, keeping the envelopes of short replies without data."""
    found = _ENVELOPES.get(body)
    if found is not None:
        return found
    envelope = messages.decode_envelope(body)
    if envelope.data is None and len(body) <= _ENVELOPE_KEPT_SIZE:
        if len(_ENVELOPES) >= _ENVELOPES_MAX:
            _ENVELOPES.clear()
        _ENVELOPES[body] = envelope
    return envelope


class DownloadCall(Call[DownloadedChunk]):
    """E6: a Range request and the interpretation of its reply (spec §10, §6.6).

    - 2xx with Content-Length: data. With Content-Range ``bytes s-e/L``, the served range must be
      exactly OneNET's clamp of the requested one (§6.6.2) and the body ``e-s+1`` bytes. Without
      Content-Range (200 only), the body is the whole file, placed at offset 0.
    - 2xx without Content-Length: a one-byte error code, raw or ASCII (§6.6.4); anything else
      is a protocol error.
    - Never more than ``range_size`` bytes are accepted.
    """

    fresh_requests = True

    def __init__(
        self,
        request: WireRequest,
        *,
        token: str,
        start: int,
        size: int,
        known_total: int | None,
        exact_start: bool,
    ) -> None:
        super().__init__(request)
        self.token = token
        self.start = start
        self.size = size
        self.known_total = known_total
        self.exact_start = exact_start
        self._known_served: tuple[Head, tuple[int, int, int, bool]] | None = None

    @property
    def end(self) -> int:
        """The requested last byte (inclusive)."""
        return self.start + self.size - 1

    def _body_limit(self, head: Head, length: int | None) -> tuple[int, str]:
        if length is None:
            # §6.6.4: no Content-Length means an error reply of one byte; never read further.
            return 1, "download reply without Content-Length is not a one-byte error code"
        if length > self.size:
            raise self.protocol_error(
                f"server announced {length} bytes for a {self.size}-byte range "
                f"{self.start}-{self.end}"
            )
        self._served(head, length)  # reject a bad Content-Range before reading the body
        return length, f"reply body is longer than its Content-Length {length}"

    def _served(self, head: Head, length: int) -> tuple[int, int, int, bool]:
        """(start, end, total, partial) that the head announces, checked against the request."""
        known = self._known_served
        if known is not None and known[0] is head:  # checked in _body_limit, used in _decode
            return known[1]
        served = self._check_served(head, length)
        self._known_served = (head, served)
        return served

    def _check_served(self, head: Head, length: int) -> tuple[int, int, int, bool]:
        content_range = head.get("Content-Range")
        if content_range is None:
            if head.status == 206:
                raise self.protocol_error("206 reply without Content-Range")
            # §10: a 200 without Content-Range is the whole file.
            if length < 1:
                raise self.protocol_error("download reply is empty")
            self._check_total(length)
            return 0, length - 1, length, False
        parsed = ranges.parse_content_range(content_range)
        if parsed is None:
            raise self.protocol_error(f"malformed Content-Range {content_range!r}")
        start, end, total = parsed
        if total is None:
            raise self.protocol_error("Content-Range does not give the package size")
        self._check_total(total)
        # §6.6.2: the served range is OneNET's clamp of the requested one, never anything else.
        # The start it gives may be 0 when the request started past EOF; §10 places bytes there.
        expected = ranges.RangeSpec(first=self.start, last=self.end, suffix=None).clamp(total)
        if (start, end) != expected:
            raise self.protocol_error(
                f"server served {start}-{end} of {total} bytes for the range "
                f"{self.start}-{self.end}; OneNET's clamp gives {expected[0]}-{expected[1]}"
            )
        if end - start + 1 != length:
            raise self.protocol_error(
                f"Content-Range {start}-{end} is {end - start + 1} bytes "
                f"but Content-Length says {length}"
            )
        return start, end, total, True

    def _check_total(self, total: int) -> None:
        if self.known_total is not None and total != self.known_total:
            raise self.protocol_error(
                f"the package has {total} bytes, but E3/E4 gave its size as {self.known_total}"
            )

    def _decode(self, head: Head, body: bytes, length: int | None) -> Outcome[DownloadedChunk]:
        if length is None:
            code = decode_error_body(body)
            if code is None:
                raise self.protocol_error(
                    f"download reply without Content-Length is not a one-byte error code "
                    f"(got {len(body)} bytes)"
                )
            raise DownloadError(code, endpoint=self.endpoint)
        start, end, total, partial = self._served(head, length)
        if self.exact_start and start != self.start:
            raise self.protocol_error(
                f"server served bytes from {start}, not from the requested {self.start}; "
                "use download_range to accept a restarted range"
            )
        chunk = DownloadedChunk(data=body, start=start, end=end, total=total, partial=partial)
        return Outcome(chunk, PackageDownloaded(self.endpoint, self.token, chunk))


class TidDownloadCall(Call[DownloadedChunk]):
    """S-D / F-D: a ``bytes=s-e`` Range request and its reply (§12.3, §13.4, §13.7).

    - A non-zero ``Ota-Errno`` is an error whatever the HTTP status: :class:`DownloadError`.
    - Otherwise a non-2xx status is an :class:`HTTPStatusError`; a 2xx without Content-Length is
      Studio's one-byte error body (the same code, §12.3).
    - Data is accepted only when the served start and end (``Content-Range-Start``/``-End``, or
      ``Content-Range``) equal the request, whose end the client already clamped to the
      package's last byte; a 200 without a range is accepted only if the request was the whole
      package.
    """

    fresh_requests = True

    def __init__(
        self,
        request: WireRequest,
        *,
        dialect: Dialect,
        tid: int,
        start: int,
        end: int,
        known_total: int | None,
    ) -> None:
        super().__init__(request)
        self.framing = DIALECTS[dialect].framing
        self.tid = tid
        self.start = start
        self.end = end
        self.known_total = known_total

    def begin(self, head: Head) -> BodyReader[DownloadedChunk]:
        """Judge ``Ota-Errno`` first (§13.4: only it tells the truth), then the status."""
        headers = _lower(head)
        if "ota-errno" in headers:
            try:
                # Status 0 makes read_error judge the header alone: the body is not read yet.
                code = framing.read_error(self.framing, status=0, headers=headers, body=b"")
            except WireFormatError as exc:
                raise self.protocol_error(str(exc)) from None
            if code is not None:
                raise self._error(code)
        return super().begin(head)

    def _error(self, code: int) -> OtaError:
        try:
            return DownloadError(OtaErrno(code), endpoint=self.endpoint)
        except ValueError:
            return self.protocol_error(f"unknown Ota-Errno {code} (§13.5 has 0-6)")

    def _body_limit(self, head: Head, length: int | None) -> tuple[int, str]:
        if length is None:
            # §12.3: an error's one code byte in a chunked body; never read further.
            return 1, "download reply without Content-Length is not a one-byte error code"
        size = self.end - self.start + 1
        if length > size:
            raise self.protocol_error(
                f"server announced {length} bytes for the {size}-byte range {self.start}-{self.end}"
            )
        self._served(head, length)
        return length, f"reply body is longer than its Content-Length {length}"

    def _served(self, head: Head, length: int) -> tuple[int, bool]:
        """(total, partial) once the served range is checked against the request."""
        headers = _lower(head)
        try:
            served = framing.served_range(headers)
        except WireFormatError as exc:
            raise self.protocol_error(str(exc)) from None
        total: int | None = None
        content_range = headers.get("content-range")
        if content_range is not None:
            parsed = ranges.parse_content_range(content_range)
            total = parsed[2] if parsed is not None else None
        if total is not None and self.known_total is not None and total != self.known_total:
            raise self.protocol_error(
                f"the package has {total} bytes, but the task check gave {self.known_total}"
            )
        if served is None:
            # §13.4: a 200 without a range is the whole file; it answers this request only if
            # the request was for the whole package.
            whole = (0, length - 1)
            if (
                head.status == 200
                and (self.start, self.end) == whole
                and (self.known_total in (None, length))
            ):
                return length, False
            raise self.protocol_error(
                f"the reply names no served range for the request {self.start}-{self.end}"
            )
        if served != (self.start, self.end):
            raise self.protocol_error(
                f"server served {served[0]}-{served[1]} for the request {self.start}-{self.end}; "
                "a chunk is accepted only when they are equal (§13.7)"
            )
        if served[1] - served[0] + 1 != length:
            raise self.protocol_error(
                f"the served range {served[0]}-{served[1]} is {served[1] - served[0] + 1} bytes "
                f"but Content-Length says {length}"
            )
        if total is None:
            total = self.known_total if self.known_total is not None else self.end + 1
        return total, True

    def _decode(self, head: Head, body: bytes, length: int | None) -> Outcome[DownloadedChunk]:
        if length is None:
            try:
                code = framing.read_error(
                    self.framing, status=head.status, headers=_lower(head), body=body
                )
            except WireFormatError as exc:
                raise self.protocol_error(str(exc)) from None
            if code is None:  # pragma: no cover - read_error answers a code or raises here
                raise self.protocol_error("download reply without Content-Length")
            raise self._error(code)
        total, partial = self._served(head, length)
        chunk = DownloadedChunk(
            data=body, start=self.start, end=self.end, total=total, partial=partial
        )
        return Outcome(chunk, PackageDownloaded(self.endpoint, "", chunk, tid=self.tid))


def _lower(head: Head) -> dict[str, str]:
    """The head's headers by lower-case name (the first value of each), as framing reads them."""
    return head.first_values()


def _data(envelope: Envelope) -> dict[str, Any]:
    if envelope.data is None:
        raise WireFormatError("reply has no 'data' object")
    return envelope.data


def _parse_versions(envelope: Envelope) -> VersionInfo:
    data = _data(envelope)
    found: dict[str, str | None] = {}
    for key in ("f_version", "s_version"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise WireFormatError(f"'{key}' is not a non-empty string")
        found[key] = value
    return VersionInfo(f_version=found["f_version"], s_version=found["s_version"])


def _parse_dev_id(envelope: Envelope) -> str:
    value = _data(envelope).get("dev_id")
    # §6.9: dev_id is a string in E9's reply.
    if not isinstance(value, str) or values.parse_dev_id(value) is None:
        raise WireFormatError("'dev_id' is missing or not a string of 1-19 digits")
    return value


class ClientCore:
    """Builds the calls of one device client; remembers the last task E3/E4 returned.

    ``base_url`` is ``http(s)://host[:port][/prefix]``; the default is OneNET's (§2.1).
    """

    def __init__(self, config: DeviceConfig, *, base_url: str, timeout: Timeout) -> None:
        if not isinstance(config, DeviceConfig):
            raise InvalidArgumentError("config must be a DeviceConfig")
        if not isinstance(timeout, Timeout):
            raise InvalidArgumentError("timeout must be a Timeout")
        self.config = config
        self.timeout = timeout
        self.scheme, self.origin, self.prefix = _split_base_url(base_url)
        self.last_task: AnyTask | None = None
        # Requests that are the same every time they are built (a chunk's token check, the URL
        # and fixed headers of its download), kept for the few tasks a device works on: an
        # upgrade asks for them thousands of times. Bounded, and filled only by the device's
        # own calls.
        self._built: dict[tuple[Any, ...], Any] = {}
        self._valid_token: str | None = None  # the last download token found valid
        # What a download's headers end with, after its Range.
        self._download_tail: tuple[tuple[str, str], ...] = (
            ("Accept-Encoding", "identity"),
            *self._connection_header(),
        )
        self._json_head: tuple[tuple[str, str], ...] = (
            # The C SDK's order and casing; Content-Type even on GETs (§8.1).
            ("Content-Type", "application/json"),
            ("Authorization", config.credentials.authorization),
            # This client reads raw bytes (download lengths are checked against them), so it
            # asks for no content coding.
            ("Accept-Encoding", "identity"),
            *(() if config.keep_alive else (("Connection", "close"),)),
        )

    @property
    def dialect(self) -> Dialect:
        """The device API this client speaks (§13.7)."""
        return self.config.dialect

    # -- request building ------------------------------------------------------------------

    def _json_headers(self) -> tuple[tuple[str, str], ...]:
        return self._json_head

    def _cached(self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        """``build()``'s value, kept under ``key`` (see ``_built``)."""
        found: T | None = self._built.get(key)
        if found is None:
            if len(self._built) >= _BUILT_MAX:
                self._built.clear()
            found = self._built[key] = build()
        return found

    def _connection_header(self) -> tuple[tuple[str, str], ...]:
        """``Connection: close`` when the configuration asks for a connection per request."""
        return () if self.config.keep_alive else (("Connection", "close"),)

    def _ranged(self, range_start: int, range_size: int, total: int | None) -> bool:
        """Whether a download sends Range: always, unless the configuration streams a request
        for the whole package in one GET without it (``range_for_whole_file``, §13.1)."""
        whole = range_start == 0 and total is not None and range_size >= total
        return self.config.range_for_whole_file or not whole

    def _dev_id(self, endpoint: Endpoint) -> str:
        if self.config.dev_id is None:
            raise InvalidArgumentError(
                "dev_id is not configured (look it up with dev_info first)", endpoint=endpoint
            )
        return self.config.dev_id

    def _request(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: object | None,
        timeout_ms: int | None,
    ) -> WireRequest:
        # The values are validated formats that need no percent-encoding (§2.4); tokens are
        # quoted. The order is the C SDK's, dev_id last (§8.1).
        url = f"{self.origin}{self.prefix}{path}"
        if query:
            url += "?" + "&".join(f"{name}={value}" for name, value in query)
        return WireRequest(
            endpoint=endpoint,
            method=method,
            url=url,
            headers=self._json_headers(),
            body=None if body is None else messages.dumps(body),
            timeout=self._timeout(timeout_ms, endpoint),
        )

    def _timeout(self, timeout_ms: int | None, endpoint: AnyEndpoint) -> Timeout:
        try:
            return self.timeout.with_ms(timeout_ms)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(exc.message, endpoint=endpoint) from None

    # -- Studio and fuse (§12, §13) -----------------------------------------------------------

    def _spec(self, operation: Operation) -> EndpointSpec:
        return dialect_endpoint(self.dialect, operation)

    def _tid_request(
        self,
        operation: Operation,
        method: str,
        body: object | None,
        timeout_ms: int | None,
        *,
        tid: int | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> tuple[EndpointSpec, WireRequest]:
        spec = self._spec(operation)
        values_: dict[str, str | int] = {
            "pid": self.config.product_id or "",
            "name": self.config.device_name or "",
        }
        if tid is not None:
            values_["tid"] = tid
        path = spec.path(**values_)  # the config validated pid and name; tid was checked
        url = f"{self.origin}{self.prefix}{path}"
        if query:
            url += "?" + "&".join(f"{name}={value}" for name, value in query)
        request = WireRequest(
            endpoint=spec,
            method=method,
            url=url,
            headers=self._json_headers(),
            body=None if body is None else messages.dumps(body),
            timeout=self._timeout(timeout_ms, spec),
        )
        return spec, request

    def _json_call(
        self, request: WireRequest, done: Callable[[Envelope, bytes], Outcome[T]]
    ) -> JsonCall[T]:
        return JsonCall(request, done, DIALECTS[self.dialect].envelope)

    def _tid(self, task: TaskRef, endpoint: AnyEndpoint) -> int:
        """A Studio/fuse task reference: a tid (§12.2)."""
        if not _is_int(task) or not 1 <= int(task) <= messages.TID_MAX:
            raise InvalidArgumentError(
                f"the {self.dialect.value} dialect names a task by its tid, an integer from 1 to "
                f"{messages.TID_MAX}",
                endpoint=endpoint,
            )
        return int(task)

    def _token(self, task: TaskRef, endpoint: Endpoint) -> str:
        if not isinstance(task, str):
            raise InvalidArgumentError(
                "the classic dialect names a task by its download token (a string)",
                endpoint=endpoint,
            )
        _check_token(task, endpoint)
        return task

    def _classic_only(self, endpoint: Endpoint, instead: str) -> None:
        if self.dialect is not Dialect.CLASSIC:
            raise InvalidArgumentError(
                f"the {self.dialect.value} dialect has no such endpoint; {instead}",
                endpoint=endpoint,
            )

    def task_status(self, tid: int, timeout_ms: int | None = None) -> Call[int]:
        """S-T / F-T: the state (1-6, §5.1) of task ``tid``; validates the tid and moves a
        to-be-upgraded task to downloading (S6, F7). Studio and fuse only (classic: E5)."""
        if self.dialect is Dialect.CLASSIC:
            raise InvalidArgumentError(
                "the classic dialect has no task status; check the token with check_token (E5)",
                endpoint=Endpoint.CHECK_TOKEN,
            )
        spec = self._spec(Operation.CHECK_STATE)
        tid = self._tid(tid, spec)
        spec, request = self._cached(
            (_KEY_TASK_STATUS, tid, timeout_ms),
            lambda: self._tid_request(Operation.CHECK_STATE, "GET", None, timeout_ms, tid=tid),
        )

        def done(envelope: Envelope, body: bytes) -> Outcome[int]:
            status = parse_status_data(envelope.data)
            return Outcome(status, TokenChecked(spec, body, "", tid=tid, status=status))

        return self._json_call(request, done)

    def check_tid_task(self, timeout_ms: int | None = None) -> Call[TidTaskInfo]:
        """S-C / F-C: check for a task of the configured type (§12.2, §13.1). Studio and fuse
        only (classic: :meth:`check_task`, whose task carries a download token)."""
        if self.dialect is Dialect.CLASSIC:
            raise InvalidArgumentError(
                "the classic dialect's task has a download token: use check_task (E3)",
                endpoint=Endpoint.CHECK_TASK,
            )
        query = [("type", str(int(self.config.type))), ("version", self.config.version)]
        spec, request = self._tid_request(
            Operation.CHECK_TASK, "GET", None, timeout_ms, query=query
        )

        def found(envelope: Envelope, body: bytes) -> Outcome[TidTaskInfo]:
            task = TidTaskInfo.from_data(_data(envelope))
            self.last_task = task
            return Outcome(task, TaskChecked(spec, body, task))

        return self._json_call(request, found)

    # -- operations --------------------------------------------------------------------------

    def post_version(
        self, timeout_ms: int | None = None, *, version: str | None = None
    ) -> Call[None]:
        """E1: report the configured version(s) (§6.1).

        ``version`` replaces the configured version of the client's type, e.g. to report the
        target after installing it (which completes the task, T6); ``other_version`` is kept.
        """
        endpoint = Endpoint.POST_VERSION
        if version is not None and not values.is_version(version):
            raise InvalidArgumentError(
                f"version must be 1-20 characters of [A-Za-z0-9_.-] (spec §4.5), got {version!r}",
                endpoint=endpoint,
            )
        f_version, s_version = self.config.f_version, self.config.s_version
        if version is not None and self.config.type is TaskType.FOTA:
            f_version = version
        elif version is not None:
            s_version = version
        if self.dialect is not Dialect.CLASSIC:  # S-V, F-V: the same body, no query
            spec, tid_request = self._tid_request(
                Operation.REPORT_VERSION,
                "POST",
                messages.version_body(f_version, s_version),
                timeout_ms,
            )
            return self._json_call(
                tid_request,
                lambda envelope, body: Outcome(
                    None, VersionPosted(spec, body, f_version, s_version)
                ),
            )
        request = self._request(
            endpoint,
            "POST",
            path_for(endpoint),
            [("dev_id", self._dev_id(endpoint))],
            messages.version_body(f_version, s_version),
            timeout_ms,
        )

        def done(envelope: Envelope, body: bytes) -> Outcome[None]:
            return Outcome(None, VersionPosted(endpoint, body, f_version, s_version))

        return JsonCall(request, done)

    def query_version(self, timeout_ms: int | None = None) -> Call[VersionInfo]:
        """E2: the versions the platform has stored for this device (§6.2)."""
        endpoint = Endpoint.QUERY_VERSION
        if self.dialect is not Dialect.CLASSIC:  # S-Q, F-Q
            _, tid_request = self._tid_request(Operation.QUERY_VERSION, "GET", None, timeout_ms)
            return self._json_call(
                tid_request, lambda envelope, body: Outcome(_parse_versions(envelope))
            )
        request = self._request(
            endpoint,
            "GET",
            path_for(endpoint),
            [("dev_id", self._dev_id(endpoint))],
            None,
            timeout_ms,
        )
        return JsonCall(request, lambda envelope, body: Outcome(_parse_versions(envelope)))

    def check_task(self, timeout_ms: int | None = None) -> Call[TaskInfo]:
        """E3: check for a task of the configured type (§6.3). Classic only: Studio and fuse
        answer a task without a token (:meth:`check_tid_task`)."""
        endpoint = Endpoint.CHECK_TASK
        config = self.config
        self._classic_only(endpoint, "check with check_tid_task")
        query = [
            ("type", str(int(config.type))),
            ("version", config.version),
            # The C SDK always sends cdn, true or false (§8.1, captures).
            ("cdn", "true" if config.cdn else "false"),
        ]
        # D11: optional; the C SDK never sends them.
        if config.manuf is not None:
            query.append(("manuf", config.manuf))
        if config.model is not None:
            query.append(("model", config.model))
        query.append(("dev_id", self._dev_id(endpoint)))
        request = self._request(endpoint, "GET", path_for(endpoint), query, None, timeout_ms)
        return JsonCall(request, self._task_reply(endpoint))

    def tasking(self, timeout_ms: int | None = None) -> Call[TaskInfo]:
        """E4: the task already downloading or upgrading, to recover after a reboot (§6.4).
        Classic only (Studio and fuse: task_status with the tid)."""
        endpoint = Endpoint.TASKING
        self._classic_only(endpoint, "ask task_status with the tid")
        query = [
            ("type", str(int(self.config.type))),
            ("cdn", "true" if self.config.cdn else "false"),
            ("dev_id", self._dev_id(endpoint)),
        ]
        request = self._request(endpoint, "GET", path_for(endpoint), query, None, timeout_ms)
        return JsonCall(request, self._task_reply(endpoint))

    def _task_reply(self, endpoint: Endpoint) -> Callable[[Envelope, bytes], Outcome[TaskInfo]]:
        def done(envelope: Envelope, body: bytes) -> Outcome[TaskInfo]:
            task = TaskInfo.from_data(_data(envelope))
            self.last_task = task
            return Outcome(task, TaskChecked(endpoint, body, task))

        return done

    def check_token(self, token: str, timeout_ms: int | None = None) -> Call[None]:
        """E5: check the download token; moves the task to downloading (§6.5).
        Classic only (Studio and fuse: :meth:`task_status`)."""
        endpoint = Endpoint.CHECK_TOKEN
        # Kept, with its reply's decoder, once the token was validated (the key holds the
        # token only after that): every chunk checks the same token.
        key = (_KEY_CHECK_TOKEN, token, timeout_ms)
        found: tuple[WireRequest, Callable[[Envelope, bytes], Outcome[None]]] | None
        found = self._built.get(key) if type(token) is str else None
        if found is None:
            self._classic_only(endpoint, "check the tid with task_status")
            _check_token(token, endpoint)

            def done(envelope: Envelope, body: bytes) -> Outcome[None]:
                return Outcome(None, TokenChecked(endpoint, body, token))

            found = self._cached(
                key,
                lambda: (
                    self._request(
                        endpoint,
                        "GET",
                        path_for(endpoint, token),
                        [("dev_id", self._dev_id(endpoint))],
                        None,
                        timeout_ms,
                    ),
                    done,
                ),
            )
        return JsonCall(found[0], found[1])

    def download(
        self,
        token: TaskRef,
        range_start: int,
        range_size: int,
        timeout_ms: int | None = None,
        *,
        exact_start: bool = False,
        package_size: int | None = None,
    ) -> Call[DownloadedChunk]:
        """E6: bytes ``range_start .. range_start + range_size - 1`` of the package (§6.6, §10).

        When the last E3/E4 reply for this token gave an ``ipPort``, the request goes there (D10).

        Studio and fuse (S-D, F-D): ``token`` is the tid; the end is clamped to the package's
        last byte (``package_size``, or the size the last task check gave for this tid) and the
        reply must serve exactly the requested range (§13.7).
        """
        endpoint = Endpoint.DOWNLOAD
        if self.dialect is not Dialect.CLASSIC:
            return self._tid_download(token, range_start, range_size, timeout_ms, package_size)
        if token is not self._valid_token:  # every chunk of a task names the same token
            token = self._valid_token = self._token(token, endpoint)
        if type(range_start) is not int or not 0 <= range_start < values.PACKAGE_SIZE_MAX:
            raise InvalidArgumentError(
                f"range_start must be an integer from 0 to {values.PACKAGE_SIZE_MAX - 1}",
                endpoint=endpoint,
            )
        if type(range_size) is not int or not MIN_RANGE_SIZE <= range_size <= MAX_RANGE_SIZE:
            raise InvalidArgumentError(
                f"range_size must be an integer from {MIN_RANGE_SIZE} to {MAX_RANGE_SIZE} "
                "(OneNET advises at least 2 bytes; the server clamps the end at EOF)",
                endpoint=endpoint,
            )
        last = self.last_task
        task = last if isinstance(last, TaskInfo) and last.token == token else None
        url, authorization = self._cached(
            (_KEY_DOWNLOAD, token, None if task is None else task.ip_port),
            lambda: self._download_target(token, task),
        )
        known_total = task.size if task is not None else None
        tail = self._download_tail
        if self._ranged(range_start, range_size, known_total):
            # The unit-less form OneNET documents and the C SDK sends (§10); no Content-Type
            # (§6.6).
            range_ = ranges.format_request_range(range_start, range_start + range_size - 1)
            headers = (*authorization, ("Range", range_), *tail)
        else:
            headers = (*authorization, *tail)
        request = WireRequest(
            endpoint=endpoint,
            method="GET",
            url=url,
            headers=headers,
            body=None,
            timeout=self.timeout if timeout_ms is None else self._timeout(timeout_ms, endpoint),
        )
        return DownloadCall(
            request,
            token=token,
            start=range_start,
            size=range_size,
            known_total=known_total,
            exact_start=exact_start,
        )

    def _download_target(
        self, token: str, task: TaskInfo | None
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """E6's URL for ``token`` and the Authorization header it carries (if any)."""
        path = path_for(Endpoint.DOWNLOAD, token)
        if task is not None and task.ip_port is not None:
            # D10: download from ipPort with the API's scheme. The Authorization value is not
            # sent to that other host: E6 is authenticated by its path token alone (D5).
            return f"{self.scheme}://{task.ip_port}{path}", ()
        # The C SDK sends Authorization on E6; the server ignores it (D5, §8.1).
        authorization = ("Authorization", self.config.credentials.authorization)
        return f"{self.origin}{self.prefix}{path}", (authorization,)

    def report_status(self, token: TaskRef, code: int, timeout_ms: int | None = None) -> Call[None]:
        """E7: report progress 0-100 or a status code 101-107/201-208 (§6.7); S-R / F-R with
        the tid on Studio and fuse (§12.2, §13.1)."""
        endpoint = Endpoint.REPORT_PROGRESS
        spec = None if self.dialect is Dialect.CLASSIC else self._spec(Operation.REPORT_STATUS)
        tid = None if spec is None else self._tid(token, spec)
        token = "" if spec is not None else self._token(token, endpoint)
        if not _is_int(code) or classify_step(code) is None:
            raise InvalidArgumentError(
                f"status code must be 0-100, 101-107 or 201-208, got {code!r}",
                endpoint=spec or endpoint,
            )
        step = int(code)
        if tid is not None:
            spec, tid_request = self._tid_request(
                Operation.REPORT_STATUS, "POST", {"step": step}, timeout_ms, tid=tid
            )
            return self._json_call(
                tid_request,
                lambda envelope, body: Outcome(None, StatusReported(spec, body, "", step, tid=tid)),
            )
        request = self._request(
            endpoint,
            "POST",
            path_for(endpoint, token),
            [("dev_id", self._dev_id(endpoint))],
            {"step": step},
            timeout_ms,
        )

        def done(envelope: Envelope, body: bytes) -> Outcome[None]:
            return Outcome(None, StatusReported(endpoint, body, token, step))

        return JsonCall(request, done)

    def report_result(self, token: str, code: int, timeout_ms: int | None = None) -> Call[None]:
        """E8: the older report form, ``{"result": code}``; status codes only (§6.8, D15).
        Classic only."""
        endpoint = Endpoint.REPORT_RESULT
        self._classic_only(endpoint, "report with report_status and the tid")
        _check_token(token, endpoint)
        if not _is_int(code) or classify_result(code) is None:
            raise InvalidArgumentError(
                f"result must be 101-107 or 201-208, got {code!r}", endpoint=endpoint
            )
        result = int(code)
        query = [("token", quote(token, safe="")), ("dev_id", self._dev_id(endpoint))]
        request = self._request(
            endpoint, "POST", path_for(endpoint), query, {"result": result}, timeout_ms
        )

        def done(envelope: Envelope, body: bytes) -> Outcome[None]:
            return Outcome(None, StatusReported(endpoint, body, token, result))

        return JsonCall(request, done)

    def dev_info(
        self,
        auth_info: str,
        *,
        product_id: str | None = None,
        method: Literal["GET", "POST"] = "POST",
        timeout_ms: int | None = None,
    ) -> Call[str]:
        """E9: look up the device's ``dev_id`` from its identifier (§6.9).

        ``product_id`` defaults to the product named in the Authorization value. OneNET documents
        GET with a body, third-party clients use POST; both are accepted by the server (D18).
        """
        endpoint = Endpoint.DEV_INFO
        self._classic_only(endpoint, "the device is named by product_id and device_name")
        if not isinstance(auth_info, str) or not auth_info:
            raise InvalidArgumentError("auth_info must be a non-empty string", endpoint=endpoint)
        if method not in ("GET", "POST"):
            raise InvalidArgumentError("method must be 'GET' or 'POST'", endpoint=endpoint)
        pid = product_id if product_id is not None else self.config.credentials.product_id
        if not isinstance(pid, str) or not pid.isdigit() or not pid.isascii() or len(pid) > 18:
            raise InvalidArgumentError(
                "E9 needs a decimal product id (pass product_id, or use a product's token)",
                endpoint=endpoint,
            )
        request = self._request(
            endpoint,
            method,
            path_for(endpoint),
            [],
            {"pid": int(pid), "authInfo": auth_info},
            timeout_ms,
        )
        return JsonCall(request, lambda envelope, body: Outcome(_parse_dev_id(envelope)))

    def _tid_download(
        self,
        task: TaskRef,
        range_start: int,
        range_size: int,
        timeout_ms: int | None,
        package_size: int | None,
    ) -> TidDownloadCall:
        spec = self._spec(Operation.DOWNLOAD)
        tid = self._tid(task, spec)
        last = self.last_task
        if package_size is None and isinstance(last, TidTaskInfo) and last.tid == tid:
            package_size = last.size
        if package_size is not None and (
            not _is_int(package_size) or not 1 <= package_size <= values.PACKAGE_SIZE_MAX
        ):
            raise InvalidArgumentError(
                f"package_size must be an integer from 1 to {values.PACKAGE_SIZE_MAX}",
                endpoint=spec,
            )
        limit = values.PACKAGE_SIZE_MAX if package_size is None else package_size
        if type(range_start) is not int or not 0 <= range_start < limit:
            raise InvalidArgumentError(
                f"range_start must be an integer from 0 to {limit - 1}", endpoint=spec
            )
        if type(range_size) is not int or not MIN_RANGE_SIZE <= range_size <= MAX_RANGE_SIZE:
            raise InvalidArgumentError(
                f"range_size must be an integer from {MIN_RANGE_SIZE} to {MAX_RANGE_SIZE}",
                endpoint=spec,
            )
        # §13.7: the end is clamped to size-1, so the served range can equal the request.
        end = min(range_start + range_size, limit) - 1
        _, json_request = self._cached(
            (_KEY_TID_DOWNLOAD, tid, timeout_ms),
            lambda: self._tid_request(Operation.DOWNLOAD, "GET", None, timeout_ms, tid=tid),
        )
        # §13.7: the bytes= form; ranges.format_request_range gives the unit-less value.
        range_ = ("Range", "bytes=" + ranges.format_request_range(range_start, end))
        headers = (
            ("Authorization", self.config.credentials.authorization),  # S2, F2: required
            *((range_,) if self._ranged(range_start, range_size, package_size) else ()),
            ("Accept-Encoding", "identity"),
            *self._connection_header(),
        )
        request = WireRequest(
            endpoint=spec,
            method="GET",
            url=json_request.url,
            headers=headers,
            body=None,
            timeout=json_request.timeout,
        )
        return TidDownloadCall(
            request,
            dialect=self.dialect,
            tid=tid,
            start=range_start,
            end=end,
            known_total=package_size,
        )


def _is_int(value: object) -> bool:
    # bool is an int in Python but never on this wire (§2.4).
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token(token: object, endpoint: Endpoint) -> None:
    if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None or "/" in token:
        raise InvalidArgumentError(
            f"the download token must be 1-{_MAX_TOKEN_LEN} printable characters without '/'",
            endpoint=endpoint,
        )


def _split_base_url(base_url: str) -> tuple[str, str, str]:
    """(scheme, ``scheme://host[:port]``, path prefix without trailing ``/``)."""
    if not isinstance(base_url, str):
        raise InvalidArgumentError("base_url must be a string")
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidArgumentError(f"invalid base_url {base_url!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError(f"base_url must be http(s)://host[:port], got {base_url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidArgumentError("base_url must not have a query, fragment or user info")
    if any(ch.isspace() for ch in base_url):
        raise InvalidArgumentError("base_url must not contain spaces")
    return scheme, f"{scheme}://{parts.netloc}", parts.path.rstrip("/")

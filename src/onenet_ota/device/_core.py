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
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

from onenet_ota.auth import redact
from onenet_ota.device.config import DeviceConfig, Timeout
from onenet_ota.device.errors import (
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    ProtocolError,
    RequestTimeout,
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
from onenet_ota.protocol import messages, ranges, values
from onenet_ota.protocol.download import decode_error_body
from onenet_ota.protocol.endpoints import Endpoint, path_for
from onenet_ota.protocol.messages import Envelope, TaskInfo, WireFormatError
from onenet_ota.protocol.status import TaskType, classify_result, classify_step

T = TypeVar("T")

# The protocol keeps JSON replies within 512 bytes (§8.2 item 4). This client is more lenient than
# the C SDK, but a reply beyond 64 KiB is not a OneNET reply: refuse it without reading it all.
MAX_JSON_REPLY = 64 * 1024
# Largest range one call may ask for: a whole package (§4.5).
MAX_RANGE_SIZE = values.PACKAGE_SIZE_MAX
# OneNET advises devices to fetch at least 2 bytes per request (§6.6.1, §10).
MIN_RANGE_SIZE = 2
_MAX_TOKEN_LEN = 64
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,64}")


@dataclass(frozen=True, slots=True)
class Head:
    """A reply's status code and headers (names as received; lookups ignore case)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def get(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        found = self.get_all(name)
        return found[0] if found else None


@dataclass(frozen=True, slots=True, repr=False)
class WireRequest:
    """One HTTP request, as plain data. ``url`` is absolute; ``headers`` keep order and casing."""

    endpoint: Endpoint
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
        return f"WireRequest({self.endpoint.value} {self.method} {self.url} {headers})"


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

    def __init__(self, call: Call[T], head: Head, limit: int, overflow: str) -> None:
        self._call = call
        self._head = head
        self._limit = limit
        self._overflow = overflow
        self._body = bytearray()

    def feed(self, data: bytes) -> None:
        """Add body bytes; raises :class:`ProtocolError` once they exceed the limit."""
        self._body += data
        if len(self._body) > self._limit:
            raise self._call.protocol_error(self._overflow)

    def finish(self) -> Outcome[T]:
        """Decode the complete body."""
        return self._call.finish(self._head, bytes(self._body))


class Call(ABC, Generic[T]):
    """One operation: its request, and how to judge and decode its reply."""

    def __init__(self, request: WireRequest) -> None:
        self.request = request

    @property
    def endpoint(self) -> Endpoint:
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
        encoding = head.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            raise self.protocol_error(f"reply is compressed ({encoding}); OneNET never does that")
        limit, overflow = self._body_limit(head, self._content_length(head))
        return BodyReader(self, head, limit, overflow)

    def finish(self, head: Head, body: bytes) -> Outcome[T]:
        """Decode a complete reply body (its head already accepted by :meth:`begin`)."""
        length = self._content_length(head)
        if length is not None and len(body) != length:
            raise self.protocol_error(
                f"reply body has {len(body)} bytes but Content-Length says {length}"
            )
        return self._decode(head, body, length)

    def _content_length(self, head: Head) -> int | None:
        found = {value.strip() for value in head.get_all("Content-Length")}
        if not found:
            return None
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
    """A call to a JSON endpoint: ``{"errno","error"[,"data"]}`` replies (§4.3)."""

    def __init__(self, request: WireRequest, on_success: Callable[[Envelope, bytes], Outcome[T]]):
        super().__init__(request)
        self._on_success = on_success

    def _body_limit(self, head: Head, length: int | None) -> tuple[int, str]:
        too_large = f"reply is larger than {MAX_JSON_REPLY} bytes"
        if length is not None and length > MAX_JSON_REPLY:
            raise self.protocol_error(f"{too_large} (Content-Length {length})")
        return MAX_JSON_REPLY, too_large

    def _decode(self, head: Head, body: bytes, length: int | None) -> Outcome[T]:
        try:
            envelope = messages.decode_envelope(body)
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


class DownloadCall(Call[DownloadedChunk]):
    """E6: a Range request and the interpretation of its reply (spec §10, §6.6).

    - 2xx with Content-Length: data. With Content-Range ``bytes s-e/L``, the served range must be
      exactly OneNET's clamp of the requested one (§6.6.2) and the body ``e-s+1`` bytes. Without
      Content-Range (200 only), the body is the whole file, placed at offset 0.
    - 2xx without Content-Length: a one-byte error code, raw or ASCII (§6.6.4); anything else
      is a protocol error.
    - Never more than ``range_size`` bytes are accepted.
    """

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
        self.last_task: TaskInfo | None = None

    # -- request building ------------------------------------------------------------------

    def _json_headers(self) -> tuple[tuple[str, str], ...]:
        # The C SDK's order and casing; Content-Type even on GETs (§8.1).
        return (
            ("Content-Type", "application/json"),
            ("Authorization", self.config.credentials.authorization),
            # This client reads raw bytes (download lengths are checked against them), so it asks
            # for no content coding.
            ("Accept-Encoding", "identity"),
        )

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

    def _timeout(self, timeout_ms: int | None, endpoint: Endpoint) -> Timeout:
        try:
            return self.timeout.with_ms(timeout_ms)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(exc.message, endpoint=endpoint) from None

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
        """E3: check for a task of the configured type (§6.3)."""
        endpoint = Endpoint.CHECK_TASK
        config = self.config
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
        """E4: the task already downloading or upgrading, to recover after a reboot (§6.4)."""
        endpoint = Endpoint.TASKING
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
        """E5: check the download token; moves the task to downloading (§6.5)."""
        endpoint = Endpoint.CHECK_TOKEN
        _check_token(token, endpoint)
        request = self._request(
            endpoint,
            "GET",
            path_for(endpoint, token),
            [("dev_id", self._dev_id(endpoint))],
            None,
            timeout_ms,
        )

        def done(envelope: Envelope, body: bytes) -> Outcome[None]:
            return Outcome(None, TokenChecked(endpoint, body, token))

        return JsonCall(request, done)

    def download(
        self,
        token: str,
        range_start: int,
        range_size: int,
        timeout_ms: int | None = None,
        *,
        exact_start: bool = False,
    ) -> DownloadCall:
        """E6: bytes ``range_start .. range_start + range_size - 1`` of the package (§6.6, §10).

        When the last E3/E4 reply for this token gave an ``ipPort``, the request goes there (D10).
        """
        endpoint = Endpoint.DOWNLOAD
        _check_token(token, endpoint)
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
        task = self.last_task if self.last_task and self.last_task.token == token else None
        path = path_for(endpoint, token)
        headers: list[tuple[str, str]] = []
        if task is not None and task.ip_port is not None:
            # D10: download from ipPort with the API's scheme. The Authorization value is not
            # sent to that other host: E6 is authenticated by its path token alone (D5).
            url = f"{self.scheme}://{task.ip_port}{path}"
        else:
            url = f"{self.origin}{self.prefix}{path}"
            # The C SDK sends Authorization on E6; the server ignores it (D5, §8.1).
            headers.append(("Authorization", self.config.credentials.authorization))
        # The unit-less form OneNET documents and the C SDK sends (§10); no Content-Type (§6.6).
        headers.append(
            ("Range", ranges.format_request_range(range_start, range_start + range_size - 1))
        )
        headers.append(("Accept-Encoding", "identity"))
        request = WireRequest(
            endpoint=endpoint,
            method="GET",
            url=url,
            headers=tuple(headers),
            body=None,
            timeout=self._timeout(timeout_ms, endpoint),
        )
        return DownloadCall(
            request,
            token=token,
            start=range_start,
            size=range_size,
            known_total=task.size if task is not None else None,
            exact_start=exact_start,
        )

    def report_status(self, token: str, code: int, timeout_ms: int | None = None) -> Call[None]:
        """E7: report progress 0-100 or a status code 101-107/201-208 (§6.7)."""
        endpoint = Endpoint.REPORT_PROGRESS
        _check_token(token, endpoint)
        if not _is_int(code) or classify_step(code) is None:
            raise InvalidArgumentError(
                f"status code must be 0-100, 101-107 or 201-208, got {code!r}", endpoint=endpoint
            )
        step = int(code)
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
        """E8: the older report form, ``{"result": code}``; status codes only (§6.8, D15)."""
        endpoint = Endpoint.REPORT_RESULT
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

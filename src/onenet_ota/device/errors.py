"""Exceptions of the device SDK: one tree, every outcome the C SDK's functions return as an integer.

The C SDK's functions return ``0`` for success, ``< 0`` for a local error, ``< 100`` for a platform
errno and ``>= 100`` for an HTTP status. Every exception here carries that integer as ``code``, so
code ported from C maps 1:1, and ``endpoint``, the
:class:`~onenet_ota.protocol.endpoints.Endpoint` of the call (None when nothing was sent)::

    OtaError                         code, endpoint
    ├── LocalError                   code < 0: no usable answer came back
    │   ├── InvalidArgumentError     -2  bad argument or configuration; nothing sent (ValueError)
    │   ├── ProtocolError            -3  a reply that breaks the protocol: not JSON, too large, no
    │   │                                errno, wrong field types, wrong length, lying length
    │   ├── ClientClosedError        -5  the client was closed (the C SDK's ota_deinit)
    │   └── TransportError           -11 the connection failed (chains the transport's exception)
    │       └── RequestTimeout       -13 the call ran out of time
    ├── PlatformError                errno: the platform answered {"errno": N} with N != 0
    │   ├── AuthFailed                1   Authorization or dev_id refused: a configuration error
    │   ├── InvalidParameter          2   the platform refused a parameter
    │   ├── NoValidToken              4   E5: unknown download token; E4: nothing downloading
    │   ├── PlatformInternalError     7   server-side failure; try again later
    │   ├── ManufModelMismatch        8   E3: the task failed its manuf/model pre-flight check
    │   ├── VersionMismatch           9   E3: differential package for another version; task failed
    │   ├── NoTask                    11  E3: nothing to do
    │   ├── TokenExpired              12  run E3 again for a fresh token
    │   ├── InvalidState              17  E5: paused or not downloadable; retry later
    │   ├── TaskFinished              20  stop; do not report a failure
    │   ├── InvalidOperation          21  stop; the device is out of step with the platform
    │   ├── TaskCancelled             22  stop; do not report a failure
    │   └── InvalidVersionFormat      27  the configured version is not in the platform's format
    │   (24, 26, 32, 5116 and errnos this SDK does not know: PlatformError itself)
    ├── DownloadError                1-6: E6's one-byte error reply (spec §6.6.4), or the
    │                                    ``Ota-Errno`` of a Studio/fuse download (§12.3, §13.5)
    └── HTTPStatusError              >= 100: a non-2xx HTTP status

The negative codes are the C SDK's own (``err_def.h``: ERR_INVALID_PARAM, ERR_INVALID_DATA,
ERR_UNINITIALIZED, ERR_NETWORK, ERR_TIMEOUT). As in C, download error codes 1-6 share their numbers
with errnos 1-6, and errno 5116 is >= 100: tell them apart by class (or by ``endpoint``), not by
number. Messages read ``E3 check task: errno 11: no task``; they never contain the Authorization
value.

Studio and fuse (§12, §13). The same classes carry the dialect's own number: ``code`` and
``errno`` are what the reply said (Studio's 10 is a :class:`NoTask`; fuse's 12012 a
:class:`NoTask` on F-C and a :class:`NoValidToken` on F-T/F-R, 12013 a :class:`TaskSucceeded`,
10403 an :class:`AuthFailed`), chosen through the protocol's code tables
(:func:`onenet_ota.protocol.codes.verdict_of_code`). ``endpoint`` is then the dialect's
:class:`~onenet_ota.protocol.dialects.EndpointSpec` (``S-C``, ``F-D``, ...), and ``dialect`` says
which API answered. Messages read ``F-C check task: code 12012: not exist``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any, ClassVar, TypeAlias

from onenet_ota.protocol import codes
from onenet_ota.protocol.codes import Dialect, OtaErrno, Verdict
from onenet_ota.protocol.dialects import EndpointSpec
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.errno import ERRNO_TEXT, Errno

AnyEndpoint: TypeAlias = Endpoint | EndpointSpec
"""A classic :class:`Endpoint` or a Studio/fuse :class:`EndpointSpec`."""


def endpoint_label(endpoint: AnyEndpoint) -> str:
    """How messages name an endpoint: ``E3 check task``, ``S-C check task``."""
    if isinstance(endpoint, Endpoint):
        return endpoint.label
    return f"{endpoint.label} {endpoint.operation.name.lower().replace('_', ' ')}"


def dialect_of(endpoint: AnyEndpoint | None) -> Dialect:
    """The dialect an endpoint belongs to (classic when unknown)."""
    return endpoint.dialect if isinstance(endpoint, EndpointSpec) else Dialect.CLASSIC


class LocalCode(IntEnum):
    """The C SDK's local error codes (``err_def.h``) that this SDK produces."""

    INVALID_PARAM = -2
    INVALID_DATA = -3
    UNINITIALIZED = -5
    NETWORK = -11
    TIMEOUT = -13


class OtaError(Exception):
    """Base of every error the device SDK raises.

    ``code`` is the integer the C SDK's function would return; ``endpoint`` is the endpoint the
    call went to, or None; ``dialect`` the API it belongs to.
    """

    def __init__(self, message: str, *, code: int, endpoint: AnyEndpoint | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint

    @property
    def dialect(self) -> Dialect:
        """The dialect of the endpoint the call went to (classic when none)."""
        return dialect_of(self.endpoint)

    def __str__(self) -> str:
        if self.endpoint is None:
            return self.message
        return f"{endpoint_label(self.endpoint)}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code})"


class LocalError(OtaError):
    """No usable answer came back from the platform (``code < 0``)."""


class InvalidArgumentError(LocalError, ValueError):
    """An argument or configuration value is invalid. Raised before any request is sent."""

    def __init__(self, message: str, *, endpoint: AnyEndpoint | None = None) -> None:
        super().__init__(message, code=LocalCode.INVALID_PARAM, endpoint=endpoint)


class ProtocolError(LocalError):
    """A reply that does not have the form the protocol requires.

    Not JSON, too large, no integer ``errno``, a field of the wrong type, a download whose length
    differs from the requested (clamped) range, a Content-Length that lies, and the like.
    """

    def __init__(self, message: str, *, endpoint: AnyEndpoint | None = None) -> None:
        super().__init__(message, code=LocalCode.INVALID_DATA, endpoint=endpoint)


class ClientClosedError(LocalError):
    """The client was closed (``close()``, the C SDK's ``ota_deinit``) or its HTTP client was."""

    def __init__(
        self, message: str = "the client is closed", *, endpoint: AnyEndpoint | None = None
    ) -> None:
        super().__init__(message, code=LocalCode.UNINITIALIZED, endpoint=endpoint)


class TransportError(LocalError):
    """The connection failed: refused, reset, TLS failure, closed without a reply.

    The transport's exception (an :class:`OSError`, or httpx2's) is chained as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: AnyEndpoint | None = None,
        code: int = LocalCode.NETWORK,
    ) -> None:
        super().__init__(message, code=code, endpoint=endpoint)


class RequestTimeout(TransportError):
    """The call did not finish within its ``timeout_ms``."""

    def __init__(self, message: str, *, endpoint: AnyEndpoint | None = None) -> None:
        super().__init__(message, endpoint=endpoint, code=LocalCode.TIMEOUT)


class PlatformError(OtaError):
    """The platform refused the request: ``{"errno": N, "error": "text"}`` with ``N != 0``.

    ``errno`` is the number (``code`` too), ``text`` the platform's ``error`` text (never rely on
    it: spec D2), ``data`` the reply's ``data`` object if it had one.
    """

    errno_value: ClassVar[Errno | None] = None

    def __init__(
        self,
        errno: int,
        text: str,
        *,
        endpoint: AnyEndpoint | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        word = "code" if dialect_of(endpoint) is Dialect.FUSE else "errno"  # §13.2 vs §4.3
        super().__init__(f"{word} {errno}: {text}", code=errno, endpoint=endpoint)
        self.errno = errno
        self.text = text
        self.data = data


class AuthFailed(PlatformError):
    """errno 1: the Authorization, the dev_id or the token's resource was not accepted (§4.2)."""

    errno_value = Errno.AUTH_FAILED


class InvalidParameter(PlatformError):
    """errno 2: the platform refused a query parameter or body value."""

    errno_value = Errno.INVALID_PARAMETER


class NoValidToken(PlatformError):
    """errno 4: E5's token is unknown to the platform; E4: no task is downloading/upgrading."""

    errno_value = Errno.NO_VALID_TOKEN


class PlatformInternalError(PlatformError):
    """errno 7: a server-side failure; the request may succeed later."""

    errno_value = Errno.INTERNAL_ERROR


class ManufModelMismatch(PlatformError):
    """errno 8: E3's manuf/model differ from the package's; the task has failed (T7)."""

    errno_value = Errno.MANUF_MODEL_MISMATCH


class VersionMismatch(PlatformError):
    """errno 9: a differential package for another from-version; the task has failed (T8)."""

    errno_value = Errno.VERSION_MISMATCH


class NoTask(PlatformError):
    """errno 11: no task of this type that the device may run now. Nothing to do."""

    errno_value = Errno.NO_TASK


class TokenExpired(PlatformError):
    """errno 12: the download token is past its 48 h life; run E3 again for a fresh one."""

    errno_value = Errno.TOKEN_EXPIRED


class InvalidState(PlatformError):
    """errno 17: the task is paused or not in a state that allows this; retry later (§10)."""

    errno_value = Errno.INVALID_STATE


class TaskFinished(PlatformError):
    """errno 20: the task already succeeded or failed. Stop; do not report a failure."""

    errno_value = Errno.TASK_FINISHED


class InvalidOperation(PlatformError):
    """errno 21: the state machine refused the report. Stop: the device is out of step."""

    errno_value = Errno.INVALID_OPERATION


class TaskSucceeded(NoTask):
    """fuse code 12013 on F-C: the device already runs the target of its latest task (F6).
    Nothing to do, and nothing to report (§13.7)."""


class TaskCancelled(PlatformError):
    """errno 22: the task was cancelled. Stop; do not report a failure."""

    errno_value = Errno.TASK_CANCELLED


class InvalidVersionFormat(PlatformError):
    """errno 27: the reported version is not in the platform's version format."""

    errno_value = Errno.INVALID_VERSION_FORMAT


# Every errno the protocol knows (except 0) has an entry; the generic ones map to PlatformError.
ERRNO_EXCEPTIONS: Mapping[Errno, type[PlatformError]] = {
    Errno.AUTH_FAILED: AuthFailed,
    Errno.INVALID_PARAMETER: InvalidParameter,
    Errno.NO_VALID_TOKEN: NoValidToken,
    Errno.INTERNAL_ERROR: PlatformInternalError,
    Errno.MANUF_MODEL_MISMATCH: ManufModelMismatch,
    Errno.VERSION_MISMATCH: VersionMismatch,
    Errno.NO_TASK: NoTask,
    Errno.TOKEN_EXPIRED: TokenExpired,
    Errno.INVALID_STATE: InvalidState,
    Errno.TASK_FINISHED: TaskFinished,
    Errno.INVALID_OPERATION: InvalidOperation,
    Errno.TASK_CANCELLED: TaskCancelled,
    Errno.INVALID_RESULT: PlatformError,
    Errno.INVALID_DEV_ID: PlatformError,
    Errno.INVALID_VERSION_FORMAT: InvalidVersionFormat,
    Errno.NO_MATCHING_PACKAGE: PlatformError,
    Errno.QUOTA_EXCEEDED: PlatformError,
}


# Studio and fuse: the class for each verdict the protocol's code tables read from a code.
VERDICT_EXCEPTIONS: Mapping[Verdict, type[PlatformError]] = {
    Verdict.AUTH_FAILED: AuthFailed,
    Verdict.INVALID_PARAMETER: InvalidParameter,
    Verdict.INTERNAL_ERROR: PlatformInternalError,
    Verdict.FROM_VERSION_MISMATCH: VersionMismatch,
    Verdict.BAD_VERSION_FORMAT: InvalidVersionFormat,
    Verdict.NO_TASK: NoTask,
    Verdict.ALREADY_ON_TARGET: TaskSucceeded,
    Verdict.UNKNOWN_TASK: NoValidToken,
    Verdict.INVALID_STATE: InvalidState,
    Verdict.TASK_FINISHED: TaskFinished,
    Verdict.INVALID_OPERATION: InvalidOperation,
    Verdict.TASK_CANCELLED: TaskCancelled,
}


def _verdict_elsewhere(dialect: Dialect, code: int) -> Verdict | None:
    """The verdict ``code`` has on the dialect's other operations, if they all agree.

    A platform may answer a code where this project's table does not list it: §13.7 names 22 a
    terminal answer on fuse, and OneNET may send it on F-T, whose row here has no 22 (F7). The
    number keeps its meaning across the dialect's operations (F3), so it is read as there.
    """
    found = {
        verdict
        for operation in codes.REPLY_CODES[dialect]
        if (verdict := codes.verdict_of_code(dialect, operation, code)) is not None
    }
    return found.pop() if len(found) == 1 else None


def platform_error(
    errno: int,
    text: str,
    *,
    endpoint: AnyEndpoint | None = None,
    data: Mapping[str, Any] | None = None,
) -> PlatformError:
    """The exception for a non-zero errno: its named subclass, or :class:`PlatformError`.

    An empty ``text`` is replaced by this project's text for the errno (spec D2), if it has one.
    On a Studio or fuse endpoint the code is read with that dialect's table for the operation.
    """
    if isinstance(endpoint, EndpointSpec) and endpoint.dialect is not Dialect.CLASSIC:
        if not text:
            text = codes.REPLY_TEXTS[endpoint.dialect].get(errno, "")
        verdict = codes.verdict_of_code(endpoint.dialect, endpoint.operation, errno) or (
            _verdict_elsewhere(endpoint.dialect, errno)
        )
        # 10403 and the other common answers are in every operation's row (F2); a code the
        # dialect does not answer on this operation is still an error, just an unnamed one.
        cls = VERDICT_EXCEPTIONS.get(verdict, PlatformError) if verdict else PlatformError
        return cls(errno, text, endpoint=endpoint, data=data)
    try:
        known: Errno | None = Errno(errno)
    except ValueError:
        known = None
    if not text and known is not None:
        text = ERRNO_TEXT[known]
    cls = ERRNO_EXCEPTIONS.get(known, PlatformError) if known is not None else PlatformError
    return cls(errno, text, endpoint=endpoint, data=data)


class DownloadError(OtaError):
    """E6 answered with its one-byte error reply (2xx without Content-Length, spec §6.6.4), or
    a Studio/fuse download carried a non-zero ``Ota-Errno`` (§12.3, §13.4; whatever the status).

    ``reason`` is the decoded :class:`~onenet_ota.protocol.download.DownloadError` code (classic;
    both the raw byte and the ASCII digit are accepted, §10) or
    :class:`~onenet_ota.protocol.codes.OtaErrno` (Studio, fuse: the numbers mean other things,
    §13.5). OneNET asks devices to report 107 after one.
    """

    def __init__(
        self, reason: DownloadErrorCode | OtaErrno, *, endpoint: AnyEndpoint | None = None
    ) -> None:
        what = "Ota-Errno" if isinstance(reason, OtaErrno) else "download error"
        super().__init__(
            f"{what} {int(reason)}: {reason.text}", code=int(reason), endpoint=endpoint
        )
        self.reason = reason


class HTTPStatusError(OtaError):
    """The reply had a non-2xx HTTP status (``code`` and ``status_code`` are the status)."""

    def __init__(self, status_code: int, *, endpoint: AnyEndpoint | None = None) -> None:
        super().__init__(f"HTTP status {status_code}", code=status_code, endpoint=endpoint)
        self.status_code = status_code

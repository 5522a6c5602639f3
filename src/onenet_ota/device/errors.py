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
    │   └── TransportError           -11 the connection failed (wraps httpx2's exception)
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
    ├── DownloadError                1-6: E6's one-byte error reply (spec §6.6.4)
    └── HTTPStatusError              >= 100: a non-2xx HTTP status

The negative codes are the C SDK's own (``err_def.h``: ERR_INVALID_PARAM, ERR_INVALID_DATA,
ERR_UNINITIALIZED, ERR_NETWORK, ERR_TIMEOUT). As in C, download error codes 1-6 share their numbers
with errnos 1-6, and errno 5116 is >= 100: tell them apart by class (or by ``endpoint``), not by
number. Messages read ``E3 check task: errno 11: no task``; they never contain the Authorization
value.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any, ClassVar

from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.errno import ERRNO_TEXT, Errno


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
    call went to, or None.
    """

    def __init__(self, message: str, *, code: int, endpoint: Endpoint | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint

    def __str__(self) -> str:
        if self.endpoint is None:
            return self.message
        return f"{self.endpoint.label}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, code={self.code})"


class LocalError(OtaError):
    """No usable answer came back from the platform (``code < 0``)."""


class InvalidArgumentError(LocalError, ValueError):
    """An argument or configuration value is invalid. Raised before any request is sent."""

    def __init__(self, message: str, *, endpoint: Endpoint | None = None) -> None:
        super().__init__(message, code=LocalCode.INVALID_PARAM, endpoint=endpoint)


class ProtocolError(LocalError):
    """A reply that does not have the form the protocol requires.

    Not JSON, too large, no integer ``errno``, a field of the wrong type, a download whose length
    differs from the requested (clamped) range, a Content-Length that lies, and the like.
    """

    def __init__(self, message: str, *, endpoint: Endpoint | None = None) -> None:
        super().__init__(message, code=LocalCode.INVALID_DATA, endpoint=endpoint)


class ClientClosedError(LocalError):
    """The client was closed (``close()``, the C SDK's ``ota_deinit``) or its HTTP client was."""

    def __init__(
        self, message: str = "the client is closed", *, endpoint: Endpoint | None = None
    ) -> None:
        super().__init__(message, code=LocalCode.UNINITIALIZED, endpoint=endpoint)


class TransportError(LocalError):
    """The connection failed: refused, reset, TLS failure, closed without a reply.

    The httpx2 exception is chained as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: Endpoint | None = None,
        code: int = LocalCode.NETWORK,
    ) -> None:
        super().__init__(message, code=code, endpoint=endpoint)


class RequestTimeout(TransportError):
    """The call did not finish within its ``timeout_ms``."""

    def __init__(self, message: str, *, endpoint: Endpoint | None = None) -> None:
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
        endpoint: Endpoint | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"errno {errno}: {text}", code=errno, endpoint=endpoint)
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


def platform_error(
    errno: int,
    text: str,
    *,
    endpoint: Endpoint | None = None,
    data: Mapping[str, Any] | None = None,
) -> PlatformError:
    """The exception for a non-zero errno: its named subclass, or :class:`PlatformError`.

    An empty ``text`` is replaced by this project's text for the errno (spec D2), if it has one.
    """
    try:
        known: Errno | None = Errno(errno)
    except ValueError:
        known = None
    if not text and known is not None:
        text = ERRNO_TEXT[known]
    cls = ERRNO_EXCEPTIONS.get(known, PlatformError) if known is not None else PlatformError
    return cls(errno, text, endpoint=endpoint, data=data)


class DownloadError(OtaError):
    """E6 answered with its one-byte error reply (2xx without Content-Length, spec §6.6.4).

    ``reason`` is the decoded :class:`~onenet_ota.protocol.download.DownloadError` code; both the
    raw byte and the ASCII digit are accepted (§10). OneNET asks devices to report 107 after one.
    """

    def __init__(self, reason: DownloadErrorCode, *, endpoint: Endpoint | None = None) -> None:
        super().__init__(
            f"download error {int(reason)}: {reason.text}", code=int(reason), endpoint=endpoint
        )
        self.reason = reason


class HTTPStatusError(OtaError):
    """The reply had a non-2xx HTTP status (``code`` and ``status_code`` are the status)."""

    def __init__(self, status_code: int, *, endpoint: Endpoint | None = None) -> None:
        super().__init__(f"HTTP status {status_code}", code=status_code, endpoint=endpoint)
        self.status_code = status_code

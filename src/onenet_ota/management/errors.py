"""The management client's exceptions: one tree, so a script catches as broadly as it needs.

::

    ManagementError                 anything the client could not carry out
    ├── TransportError              no reply: the server is unreachable, the connection broke
    ├── ProtocolError               a reply that is not the management API's (not JSON, no
    │                               error body: another server, a proxy's page)
    └── ApiError                    the management API answered with an error (status, code)
        ├── BadRequest              400 malformed request, 408 a body that stopped arriving
        ├── Unauthorized            401 missing or wrong token
        ├── Forbidden               403 the token may not do this
        ├── NotFound                404 no such object (or endpoint)
        ├── Conflict                409 duplicate, an open task, an object still in use
        ├── PayloadTooLarge         413 a body or package past the server's limit
        ├── Invalid                 422 a value breaks a rule
        ├── Busy                    503 the database is busy or unreachable; retry later
        └── ServerError             any other 5xx (507: no space for a package)

Every :class:`ApiError` carries the HTTP ``status``, the API's stable ``code`` (``"not_found"``,
``"conflict"``, ``"invalid"``, ...) and its ``details`` (``[{"field": ..., "message": ...}]``).
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "ApiError",
    "BadRequest",
    "Busy",
    "Conflict",
    "Forbidden",
    "Invalid",
    "ManagementError",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "error_for_status",
]


class ManagementError(Exception):
    """A management call that could not be carried out; ``str()`` is one printable line."""

    status: int | None = None
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[dict[str, Any]] = []


class TransportError(ManagementError):
    """No reply: the server could not be reached, or the connection failed or timed out."""


class ProtocolError(ManagementError):
    """A reply that is not the management API's: not JSON, or an error without its error body.

    ``status`` is the reply's HTTP status.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiError(ManagementError):
    """An error reply of the management API: ``{"error": {"code", "message", "details"}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code!r})"


class BadRequest(ApiError):
    """400: the request was malformed (not JSON, a body cut off); 408: its body stopped arriving."""


class Unauthorized(ApiError):
    """401: the token is missing or wrong."""


class Forbidden(ApiError):
    """403: the token is valid but may not do this."""


class NotFound(ApiError):
    """404: the addressed account, product, device, package, task or endpoint does not exist."""


class Conflict(ApiError):
    """409: a duplicate, the one open task a device may have (D23), an object still in use."""


class PayloadTooLarge(ApiError):
    """413: the body or package exceeds the server's limit."""


class Invalid(ApiError):
    """422: a value breaks the spec's formats or the management rules; see ``details``."""


class Busy(ApiError):
    """503: the server's database is busy or unreachable. Idempotent calls were already retried
    after the server's ``Retry-After``; a create was not (its outcome is unknown: look first)."""


class ServerError(ApiError):
    """Any other 5xx, e.g. 507: the server has no space left for a package."""


_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: BadRequest,
    409: Conflict,
    413: PayloadTooLarge,
    422: Invalid,
    503: Busy,
}


def error_for_status(status: int) -> type[ApiError]:
    """The :class:`ApiError` subclass that stands for an error reply with ``status``."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ApiError

"""``onenet_ota.management``: the typed Python client of an onenet-ota server's management API.

:class:`ManagementClient` (blocking) and :class:`AsyncManagementClient` (asyncio) have the same
methods, one per operation of ``/api/v1`` (accounts, products, devices and their labels and
timelines, packages, tasks, device tasks, staged campaigns, API tokens, the audit log, health, the
OpenAPI document), written once for both and fully typed, each returning a model of
:mod:`onenet_ota.management.models`, the very classes the server answers with. ``iter_*`` helpers
follow page cursors; :meth:`ManagementClient.request` reaches any route without a typed method.
Failures raise the exceptions of :mod:`onenet_ota.management.errors`.

Needs pydantic besides httpx2: ``pip install 'onenet-ota[management]'``. Never imports the server.
"""

from onenet_ota.management._core import BUSY_ATTEMPTS, MAX_RETRY_AFTER_S
from onenet_ota.management.client import AsyncManagementClient, ManagementClient
from onenet_ota.management.errors import (
    ApiError,
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    Invalid,
    ManagementError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ServerError,
    TransportError,
    Unauthorized,
)

__all__ = [
    "BUSY_ATTEMPTS",
    "MAX_RETRY_AFTER_S",
    "ApiError",
    "AsyncManagementClient",
    "BadRequest",
    "Busy",
    "Conflict",
    "Forbidden",
    "Invalid",
    "ManagementClient",
    "ManagementError",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "ServerError",
    "TransportError",
    "Unauthorized",
]

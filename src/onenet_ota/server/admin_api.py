"""The management API: JSON over HTTP under ``/api/v1``, for operators and the ``admin`` CLI.

``AdminApi(service, admin_token=...).handle`` answers every ``/api/v1`` path. The routes are
data (:data:`ROUTES`): the dispatcher and the OpenAPI 3.1 document served at
``/api/v1/openapi.json`` are both built from that one table, so they cannot drift apart.

Conventions:

- Authentication: ``Authorization: Bearer <token>``, a named API token (:mod:`.api_tokens`).
  Only ``/api/v1/openapi.json`` and ``/api/v1/health`` are public. Each route needs a role
  (:attr:`Route.role`): by default viewer for GET and HEAD, operator for every other method;
  token management needs admin. No token, an unknown or revoked one: 401; a token whose role is
  too low: 403. The actor of every change in the audit log is the token's name.
- Errors: ``{"error":{"code":"...","message":"...","details":[...]}}`` with 400 (malformed JSON, a
  body cut off), 401, 403, 404, 405 (with ``Allow``), 408 (a body that stopped arriving for the idle
  timeout), 409 (duplicates, an open task, in use), 413 (body too large), 422 (a value breaks a
  rule), 503 (the database is busy; retry), 507 (no disk space for an upload). Never a traceback.
- Lists: ``?limit=`` (1-1000, default 100) and ``?after=`` (the ``next`` of the previous page);
  the reply is ``{"items":[...],"next":"..."|null}``.
- Parameters: each has one rule (:class:`Param`) that both parses it and documents it. A query
  value that breaks its rule is 422, an empty one is an absent one, unknown ones are ignored; a
  path value that breaks its rule names nothing (404). Integers are ASCII digits, and ids are
  bounded by the columns that store them. No string anywhere, JSON bodies included, may contain
  NUL or a lone surrogate (422).
- HEAD is answered wherever GET is, as GET (RFC 9110 §9.3.2).
- Package upload: ``POST /api/v1/packages?pid=..&type=fota|sota&kind=full|diff&target=..&
  file_name=..[&from_version=..][&manuf=..][&model=..]`` with the raw file as the body
  (``application/octet-stream``, Content-Length or chunked). The metadata is checked before a
  byte of the body is read; the body streams to the content-addressed store, is measured there
  (size, md5, sha256), and is refused with 413 past the configured limit, leaving nothing behind.
- Package download: ``GET /api/v1/packages/{id}/file`` answers the raw file (sendfile), its
  sha256 as the ``ETag``, so a client can check what it received.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError

import onenet_ota
from onenet_ota import auth
from onenet_ota.management.models import (
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    AccountPage,
    ApiTokenPage,
    CampaignEventList,
    CampaignPage,
    DeviceList,
    DevicePage,
    DeviceTaskPage,
    ErrorBody,
    Health,
    HistoryPage,
    PackagePage,
    ProductPage,
    TaskPage,
)
from onenet_ota.protocol import values
from onenet_ota.protocol.states import Action
from onenet_ota.server import admin_service as svc
from onenet_ota.server import audit
from onenet_ota.server import campaigns as camp
from onenet_ota.server.api_tokens import (
    TOKEN_ID_MAX,
    ApiTokenCreate,
    ApiTokenCreated,
    Principal,
    Role,
    TokenStore,
    role_allows,
)
from onenet_ota.server.blobs import BlobTooLarge
from onenet_ota.server.http import (
    BodyTooLarge,
    FileSegment,
    Request,
    RequestAborted,
    RequestTimedOut,
    Response,
)
from onenet_ota.server.schema import campaigns as campaigns_table
from onenet_ota.server.wire import safe_file_name

__all__ = ["PREFIX", "ROUTES", "AdminApi", "openapi_document"]

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX: Final = "/api/v1"
MAX_JSON_BODY: Final = 8 * 1024 * 1024  # a bulk import of 10 000 devices fits comfortably
_JSON: Final = ("Content-Type", "application/json")
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk, a full quota


# --------------------------------------------------------------------------------------------
# Replies


class ApiError(Exception):
    """An HTTP error reply with the JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or []


def _json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    # backslashreplace: a lone surrogate that reached a message is sent as its JSON escape.
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "backslashreplace"
    )
    return Response(status, [_JSON, ("Content-Length", str(len(body))), *(headers or [])], body)


def _error_response(error: ApiError) -> Response:
    payload: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.details:
        payload["details"] = error.details
    return _json_response(error.status, {"error": payload}, error.headers)


_SERVICE_STATUS: Final = {svc.NotFound: 404, svc.Conflict: 409, svc.Invalid: 422}


def _from_service(exc: svc.AdminError) -> ApiError:
    return ApiError(_SERVICE_STATUS.get(type(exc), 400), exc.code, exc.message, details=exc.details)


def _from_validation(exc: ValidationError) -> ApiError:
    details = []
    for item in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in item["loc"])
        details.append({"field": where, "message": item["msg"]})
    first = details[0] if details else {"field": "", "message": "invalid"}
    message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return ApiError(422, "invalid", message, details=details)


# --------------------------------------------------------------------------------------------
# Route table


def _whole(pattern: str) -> str:
    return f"^(?:{pattern})$"


def _any_case(words: tuple[str, ...]) -> str:
    """A pattern that matches ``words`` in any letter case (JSON Schema's enum cannot)."""
    spelled = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w) for w in words)
    return _whole("|".join(spelled))


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter: the rules it is parsed by and documented with.

    An empty query value means the parameter is absent. ``pattern`` is a regular expression the
    whole value must match (in a syntax Python and ECMAScript share; the document anchors it);
    ``enum`` values match exactly, or in any letter case with ``any_case``.
    """

    name: str
    type: Literal["string", "integer"] = "string"
    description: str = ""
    required: bool = False
    enum: tuple[str, ...] | None = None
    any_case: bool = False
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    default: int | None = None

    def schema(self) -> dict[str, Any]:
        """The parameter's JSON schema."""
        schema: dict[str, Any] = {"type": self.type}
        if self.type == "integer":
            schema["minimum"] = self.minimum
            schema["maximum"] = self.maximum
            if self.default is not None:
                schema["default"] = self.default
        elif self.enum and self.any_case:
            schema["pattern"] = _any_case(self.enum)
        elif self.enum:
            schema["enum"] = list(self.enum)
        else:  # JSON Schema searches for a pattern: anchored, it must match the whole value
            schema["pattern"] = _whole(self.pattern or "[^\\x00]*")
        return schema

    def parse(self, raw: str) -> int | str | None:
        """``raw`` if it follows the rules (as an int for an integer), else None."""
        if self.type == "integer":
            assert self.minimum is not None
            assert self.maximum is not None
            return svc.parse_int(raw, self.minimum, self.maximum)
        if "\x00" in raw:  # PostgreSQL cannot compare a string with NUL in it
            return None
        if self.enum and self.any_case:
            return raw if raw.lower() in self.enum else None
        if self.enum:
            return raw if raw in self.enum else None
        if self.pattern is not None and re.fullmatch(self.pattern, raw) is None:
            return None
        return raw

    def rule(self) -> str:
        """The rule in words, for error messages."""
        if self.type == "integer":
            return f"{self.name} must be an integer from {self.minimum} to {self.maximum}"
        if self.enum:
            return f"{self.name} must be one of {', '.join(self.enum)}"
        return f"{self.name} is not valid: {self.description}"


def _int(name: str, maximum: int, description: str, *, minimum: int = 1) -> Param:
    return Param(name, "integer", description, minimum=minimum, maximum=maximum)


def _page(after: Param) -> tuple[Param, ...]:
    return (
        Param(
            "limit", "integer", f"page size, 1-{svc.MAX_PAGE}", minimum=1, maximum=svc.MAX_PAGE,
            default=svc.DEFAULT_PAGE,
        ),
        after,
    )  # fmt: skip


_NEXT = "the 'next' value of the previous page"
_PACKAGE_PAGE = _page(_int("after", svc.PACKAGE_ID_MAX, _NEXT, minimum=0))
_DEV_PAGE = _page(_int("after", svc.DEV_ID_MAX, _NEXT, minimum=0))
_PID_RULE = "1-32 characters [A-Za-z0-9]"
_VERSION_RULE = "1-20 characters [A-Za-z0-9_.-]"
_CODE_RULE = "1-32 characters [A-Za-z0-9_.-] (spec Appendix A)"


def _pid(description: str, *, required: bool = False) -> Param:
    return Param(
        "pid", description=f"{description}: {_PID_RULE}", required=required,
        pattern=values.PID_RE.pattern,
    )  # fmt: skip


def _version(name: str, description: str, *, required: bool = False) -> Param:
    return Param(
        name, description=f"{description}: {_VERSION_RULE}", required=required,
        pattern=values.VERSION_RE.pattern,
    )  # fmt: skip


@dataclass(slots=True)
class Call:
    """One matched request: the route, its path and query parameters, and the request itself.

    ``path`` and ``query`` hold the route's parameters checked against their rules; integers
    are parsed already.
    """

    request: Request
    route: Route
    path: dict[str, Any]
    query: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: the dispatcher's entry and the OpenAPI document's source."""

    method: str
    path: str  # under PREFIX, with {name} parameters
    operation: str  # the AdminApi method that handles it, and the OpenAPI operationId
    summary: str
    tag: str
    status: int = 200
    body: type[BaseModel] | None = None  # a JSON request body
    body_optional: bool = False  # an empty body reads as {}
    upload: bool = False  # a raw file body
    download: bool = False  # answers with a raw file body
    response: type[BaseModel] | None = None  # None with status 204: no body
    query: tuple[Param, ...] = ()
    path_params: tuple[Param, ...] = ()  # a value that breaks its rule is 404
    errors: tuple[int, ...] = ()  # the handler's own error statuses; the rest are derived
    public: bool = False
    # The least role that may call it; None: viewer for GET (and HEAD), operator otherwise, so
    # that a route added without a thought for roles can never let a viewer change anything.
    role: Role | None = None

    @property
    def min_role(self) -> Role | None:
        """The role a token needs for this route (None: public)."""
        if self.public:
            return None
        if self.role is not None:
            return self.role
        return "viewer" if self.method in ("GET", "HEAD") else "operator"

    @property
    def segments(self) -> list[str]:
        return self.path.strip("/").split("/") if self.path != "/" else []

    def error_statuses(self) -> list[int]:
        """Every error status the route can answer with (see :meth:`AdminApi.handle`)."""
        codes = set(self.errors)
        if self.body is not None:
            codes |= {400, 413, 422}  # not JSON, too large, breaks the model
        if self.query or self.upload:
            codes.add(422)
        if self.body is not None or self.upload:
            codes |= {400, 408}  # a body cut off, or one that stopped arriving
        if self.path_params:
            codes.add(404)
        if not self.public:
            codes |= {401, 403, 503}  # the token, its role; the database
        return sorted(codes)


_PID = (_pid("the product"),)
_PID_AFTER = Param("after", description=f"{_NEXT}: a pid", pattern=values.PID_RE.pattern)
_UID_PATTERN = auth.USER_ID_RE.pattern
_UID = (Param("uid", description=f"the account: {svc.UID_RULE}", pattern=_UID_PATTERN),)
_UID_AFTER = Param("after", description=f"{_NEXT}: a uid", pattern=_UID_PATTERN)
_DEV_ID = _int("dev_id", svc.DEV_ID_MAX, "the device")
_PACKAGE = (_int("id", svc.PACKAGE_ID_MAX, "the package"),)
_TASK = (_int("id", svc.TASK_ID_MAX, "the task"),)
_TASK_DEVICE = (*_TASK, _DEV_ID)
_STATE_PARAM = Param(
    "state", description="only devices in this state", enum=tuple(svc.STATES_BY_NAME)
)
_TYPES = ("fota", "sota", "1", "2")
_CAMPAIGN_ID_MAX = svc.column_max(campaigns_table.c.id)
_CAMPAIGN = (_int("id", _CAMPAIGN_ID_MAX, "the campaign"),)
_IF_VERSION = _int(
    "if_version",
    2**31 - 1,
    "act only if the campaign is still at this version (409 otherwise)",
    minimum=0,
)
_LABELS_PARAM = Param(
    "label",
    description="only devices with every one of these labels: key=value, comma-separated",
    pattern=f"{LABEL_KEY_PATTERN}={LABEL_VALUE_PATTERN}"
    f"(?:,{LABEL_KEY_PATTERN}={LABEL_VALUE_PATTERN})*",
)

ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/openapi.json", "openapi", "This document", "meta", public=True),
    Route("GET", "/health", "health", "Liveness check", "meta", response=Health, public=True),
    Route(
        "POST", "/products", "create_product", "Create a product (given or generated pid and key)",
        "products", status=201, body=svc.ProductCreate, response=svc.Product, errors=(409,),
    ),
    Route(
        "GET", "/products", "list_products", "List products (without keys)", "products",
        response=ProductPage, query=_page(_PID_AFTER),
    ),
    Route(
        "GET", "/products/{pid}", "get_product",
        "Show a product with its device count; its access key only through reveal-key",
        "products", response=svc.Product, path_params=_PID,
    ),
    Route(
        "POST", "/products/{pid}/reveal-key", "reveal_product_key",
        "Show a product with its access key, recording the showing in the audit log",
        "products", response=svc.Product, path_params=_PID, role="operator",
    ),
    Route(
        "DELETE", "/products/{pid}", "delete_product",
        "Delete a product that has no devices, packages or tasks left", "products",
        status=204, path_params=_PID, errors=(409,),
    ),
    Route(
        "POST", "/products/{pid}/rotate-key", "rotate_key",
        "Replace the product's access key (given or generated)", "products",
        body=svc.KeyRotate, body_optional=True, response=svc.Product, path_params=_PID,
    ),
    Route(
        "PUT", "/products/{pid}/account", "set_product_account",
        "Make an account the product's owner: its userid tokens then speak for the product's"
        " devices", "products",
        body=svc.AccountAssign, response=svc.Product, path_params=_PID, errors=(409,),
    ),
    Route(
        "DELETE", "/products/{pid}/account", "clear_product_account",
        "Leave the product without an owning account", "products",
        response=svc.Product, path_params=_PID,
    ),
    Route(
        "POST", "/accounts", "create_account",
        "Create an account for userid tokens (given or generated uid and key)", "accounts",
        status=201, body=svc.AccountCreate, response=svc.Account, errors=(409,),
    ),
    Route(
        "GET", "/accounts", "list_accounts", "List accounts (without keys)", "accounts",
        response=AccountPage, query=_page(_UID_AFTER),
    ),
    Route(
        "GET", "/accounts/{uid}", "get_account",
        "Show an account with its product count; its access key only through reveal-key",
        "accounts", response=svc.Account, path_params=_UID,
    ),
    Route(
        "POST", "/accounts/{uid}/reveal-key", "reveal_account_key",
        "Show an account with its access key, recording the showing in the audit log",
        "accounts", response=svc.Account, path_params=_UID, role="operator",
    ),
    Route(
        "DELETE", "/accounts/{uid}", "delete_account", "Delete an account that owns no product",
        "accounts", status=204, path_params=_UID, errors=(409,),
    ),
    Route(
        "POST", "/accounts/{uid}/rotate-key", "rotate_account_key",
        "Replace the account's access key (given or generated); userid tokens signed with the"
        " old one stop working at once", "accounts",
        body=svc.KeyRotate, body_optional=True, response=svc.Account, path_params=_UID,
    ),
    Route(
        "POST", "/devices", "create_device", "Create a device (given or generated dev_id)",
        "devices", status=201, body=svc.DeviceCreate, response=svc.Device, errors=(409,),
    ),
    Route(
        "POST", "/devices/import", "import_devices",
        "Create many devices of one product, all or none", "devices", status=201,
        body=svc.DeviceImport, response=DeviceList, errors=(409,),
    ),
    Route(
        "GET", "/devices", "list_devices", "List devices", "devices", response=DevicePage,
        query=(
            _pid("only this product's devices"),
            _version("f_version", "only devices that reported this FOTA version"),
            _version("s_version", "only devices that reported this SOTA version"),
            Param("q", description="only devices whose name contains this; no NUL"),
            _LABELS_PARAM,
            Param("state", description="only devices in this state: idle (no open task) or"
                  " their open task's state", enum=svc.DEVICE_STATES),
            *_DEV_PAGE,
        ),
    ),
    *(
        Route(
            method, "/devices/{dev_id}/labels", f"{verb}_device_labels", summary, "devices",
            body=svc.LabelsSet, response=svc.DeviceLabels, path_params=(_DEV_ID,),
        )
        for method, verb, summary in (
            ("PUT", "put", "Replace every label of the device"),
            ("PATCH", "patch", "Set the given labels of the device (null removes one)"),
        )
    ),
    Route(
        "GET", "/devices/{dev_id}", "get_device",
        "Show a device with its reported versions and task history", "devices",
        response=svc.DeviceDetail, path_params=(_DEV_ID,),
    ),
    Route(
        "GET", "/devices/{dev_id}/history", "device_history",
        "A device's timeline: its tasks' state changes, reports (with the code's name and text),"
        " version reports and offers, oldest first", "devices", response=HistoryPage,
        path_params=(_DEV_ID,),
        query=(
            _int("task_id", svc.TASK_ID_MAX, "only this task's events"),
            *_page(_int("after", svc.EVENT_ID_MAX, _NEXT, minimum=0)),
        ),
    ),
    Route(
        "DELETE", "/devices/{dev_id}", "delete_device",
        "Delete a device without open tasks, with its upgrade history and download tokens",
        "devices", status=204, path_params=(_DEV_ID,), errors=(409,),
    ),
    Route(
        "POST", "/devices/{dev_id}/rotate-key", "rotate_device_key",
        "Replace the device's key (given or generated); tokens signed with the old one stop "
        "working at once", "devices",
        body=svc.DeviceKeyRotate, body_optional=True, response=svc.Device,
        path_params=(_DEV_ID,),
    ),
    Route(
        "POST", "/packages", "upload_package",
        "Upload a package file (raw body) with its metadata in the query", "packages",
        status=201, upload=True, response=svc.Package, errors=(409, 413, 507),
        query=(
            _pid("product id", required=True),
            Param("type", required=True, description="fota (1) or sota (2), any case",
                  enum=_TYPES, any_case=True),
            Param("kind", description="full (default) or diff, any case",
                  enum=("full", "diff", "differential", "1", "2"), any_case=True),
            _version("from_version", "differential packages: the version it applies to"),
            _version("target", "the version the package installs", required=True),
            Param("manuf", description=f"manufacturer code, {_CODE_RULE}",
                  pattern=values.MANUF_MODEL_RE.pattern),
            Param("model", description=f"module or chip code, {_CODE_RULE}",
                  pattern=values.MANUF_MODEL_RE.pattern),
            Param("file_name", required=True, pattern=svc.FILE_NAME_PATTERN,
                  description="1-64 printable ASCII characters other than '\"', '\\' and '/',"
                  " not only dots and spaces"),
        ),
    ),
    Route(
        "GET", "/packages", "list_packages", "List packages", "packages", response=PackagePage,
        query=(
            _pid("only this product's packages"),
            Param("type", description="only FOTA or SOTA packages, any case", enum=_TYPES,
                  any_case=True),
            *_PACKAGE_PAGE,
        ),
    ),
    Route(
        "GET", "/packages/{id}", "get_package", "Show a package", "packages",
        response=svc.Package, path_params=_PACKAGE,
    ),
    Route(
        "GET", "/packages/{id}/file", "download_package",
        "Download a package's file; its ETag is the file's sha256", "packages",
        path_params=_PACKAGE, download=True,
    ),
    Route(
        "DELETE", "/packages/{id}", "delete_package", "Delete a package no task uses",
        "packages", status=204, path_params=_PACKAGE, errors=(409,),
    ),
    Route(
        "POST", "/tasks", "create_task", "Create an upgrade task", "tasks", status=201,
        body=svc.TaskCreate, response=svc.TaskCreated, errors=(409,),
    ),
    Route(
        "GET", "/tasks", "list_tasks", "List tasks with per-state counts", "tasks",
        response=TaskPage,
        query=(
            _pid("only this product's tasks"),
            _int("package_id", svc.PACKAGE_ID_MAX, "only tasks of this package"),
            Param("status", description="only tasks with this status",
                  enum=svc.TASK_STATUSES),
            *_page(_int("after", svc.TASK_ID_MAX, _NEXT, minimum=0)),
        ),
    ),
    Route(
        "GET", "/tasks/{id}", "get_task",
        "Show a task with counts and the first page of its devices", "tasks",
        response=svc.TaskDetail, path_params=_TASK, query=(_STATE_PARAM, *_DEV_PAGE),
    ),
    Route(
        "DELETE", "/tasks/{id}", "delete_task",
        "Delete a task without open device tasks, with its device tasks and download tokens"
        " (the package stays)", "tasks", status=204, path_params=_TASK, errors=(409,),
    ),
    Route(
        "GET", "/tasks/{id}/devices", "list_task_devices",
        "List a task's devices with state and progress", "tasks", response=DeviceTaskPage,
        path_params=_TASK, query=(_STATE_PARAM, *_DEV_PAGE),
    ),
    *(
        Route(
            "POST", f"/tasks/{{id}}/{verb}", f"{verb}_task",
            f"{verb.capitalize()} every device of the task where the state machine allows it",
            "tasks", response=svc.TaskActionResult, path_params=_TASK, errors=(409,),
        )
        for verb in ("pause", "resume", "cancel")
    ),
    *(
        Route(
            "POST", f"/tasks/{{id}}/devices/{{dev_id}}/{verb}", f"{verb}_device_task",
            f"{verb.capitalize()} one device's part of the task", "tasks",
            response=svc.DeviceTaskView, path_params=_TASK_DEVICE, errors=(409,),
        )
        for verb in ("pause", "resume", "cancel")
    ),
    Route(
        "GET", "/tokens", "list_tokens", "List API tokens (never their secrets)", "tokens",
        response=ApiTokenPage, query=_page(_int("after", TOKEN_ID_MAX, _NEXT, minimum=0)),
        role="admin",
    ),
    Route(
        "POST", "/tokens", "create_token",
        "Create a named API token with a role; its secret is in this reply only", "tokens",
        status=201, body=ApiTokenCreate, response=ApiTokenCreated, errors=(409,), role="admin",
    ),
    Route(
        "DELETE", "/tokens/{id}", "revoke_token",
        "Revoke a token: every request with it fails from now on, on every server process",
        "tokens", status=204, path_params=(_int("id", TOKEN_ID_MAX, "the token"),),
        errors=(409,), role="admin",
    ),
    Route(
        "GET", "/audit", "list_audit",
        "The audit log, oldest first: who changed what, when, before and after", "audit",
        response=audit.AuditPage,
        query=(
            Param("actor", description="only this token name or system:<component>",
                  pattern=".{1,80}"),
            Param("action", description="only this action, e.g. product.create",
                  pattern=".{1,64}"),
            Param("target", description="only this object, e.g. product:123123 or task:7",
                  pattern=".{1,200}"),
            _int("since", 2**62, "only entries at or after this Unix time", minimum=0),
            _int("until", 2**62, "only entries at or before this Unix time", minimum=0),
            *_page(_int("after", 2**63 - 1, _NEXT, minimum=0)),
        ),
    ),
    Route(
        "POST", "/campaigns", "create_campaign",
        "Create a staged campaign (a draft; refused when its stages cannot be satisfied)",
        "campaigns", status=201, body=camp.CampaignCreate, response=camp.Campaign,
    ),
    Route(
        "POST", "/campaigns/preview", "preview_campaign_spec",
        "Dry run: each stage's members of a campaign, creating nothing", "campaigns",
        body=camp.CampaignCreate, response=camp.Preview,
    ),
    Route(
        "GET", "/campaigns", "list_campaigns", "List campaigns", "campaigns",
        response=CampaignPage,
        query=(
            Param("state", description="only campaigns in this state",
                  enum=("draft", "running", "paused", "finished", "aborted")),
            *_page(_int("after", _CAMPAIGN_ID_MAX, _NEXT, minimum=0)),
        ),
    ),
    Route(
        "GET", "/campaigns/{id}", "get_campaign",
        "Show a campaign with per-stage counters and its latest events", "campaigns",
        response=camp.CampaignDetail, path_params=_CAMPAIGN,
    ),
    Route(
        "DELETE", "/campaigns/{id}", "delete_campaign",
        "Delete a draft or ended campaign (its tasks stay)", "campaigns", status=204,
        path_params=_CAMPAIGN, errors=(409,),
    ),
    Route(
        "GET", "/campaigns/{id}/preview", "preview_campaign",
        "Dry run of a campaign over the devices it matches now", "campaigns",
        response=camp.Preview, path_params=_CAMPAIGN,
    ),
    Route(
        "GET", "/campaigns/{id}/events", "campaign_events",
        "Every decision and action of a campaign with its numbers, oldest first", "campaigns",
        response=CampaignEventList, path_params=_CAMPAIGN,
    ),
    *(
        Route(
            "POST", f"/campaigns/{{id}}/{verb}", f"{verb}_campaign", summary, "campaigns",
            response=camp.Campaign, path_params=_CAMPAIGN, errors=(409,), query=(_IF_VERSION,),
        )
        for verb, summary in (
            ("start", "Start a draft campaign: its first stage is activated"),
            ("pause", "Pause a running campaign and its device tasks"),
            ("resume", "Resume a paused campaign (refused if it would stop again at once)"),
            ("advance", "Advance to the next stage now (finish after the last)"),
            ("abort", "Abort the campaign and cancel its open device tasks"),
        )
    ),
    Route(
        "POST", "/campaigns/{id}/retry-failed", "retry_failed_campaign",
        "Give the failed members (of the given failure classes) a new task", "campaigns",
        body=camp.RetryFailed, body_optional=True, response=camp.Campaign,
        path_params=_CAMPAIGN, errors=(409,), query=(_IF_VERSION,),
    ),
    Route(
        "POST", "/campaigns/{id}/devices", "add_campaign_devices",
        "Add devices to the campaign (a running one activates them up to its stage's share)",
        "campaigns", body=camp.DevicesAdd, response=camp.Campaign, path_params=_CAMPAIGN,
        errors=(409,), query=(_IF_VERSION,),
    ),
)  # fmt: skip

# --------------------------------------------------------------------------------------------
# OpenAPI

_ROLE_NOTE: Final = {
    "viewer": "Needs a token with the viewer, operator or admin role.",
    "operator": "Needs a token with the operator or admin role.",
    "admin": "Needs a token with the admin role.",
}

_ERROR_HEADERS: Final = {
    401: ("WWW-Authenticate", "Bearer"),
    503: ("Retry-After", "seconds to wait before a retry"),
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES`."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_ref = ref(ErrorBody, "serialization")
    reasons = {
        400: "Malformed request",
        401: "No token, or an unknown or revoked one",
        403: "The token's role does not allow this",
        404: "Not found",
        409: "Conflict with existing state",
        408: "The request body stopped arriving",
        413: "Body too large",
        422: "A value breaks a rule",
        503: "Database busy; retry",
        507: "No space left for the upload",
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "operationId": route.operation,
            "summary": route.summary,
            "tags": [route.tag],
        }
        parameters: list[dict[str, Any]] = []
        for param in route.path_params:
            parameters.append(
                {
                    "name": param.name,
                    "in": "path",
                    "required": True,
                    "description": param.description,
                    "schema": param.schema(),
                }
            )
        for param in route.query:
            parameters.append(
                {
                    "name": param.name,
                    "in": "query",
                    "required": param.required,
                    "description": param.description,
                    "schema": param.schema(),
                    # An empty value is an absent one (see _query_values).
                    **({} if param.required else {"allowEmptyValue": True}),
                }
            )
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "required": not route.body_optional,
                "content": {"application/json": {"schema": ref(route.body, "validation")}},
            }
            if route.body_optional:
                operation["requestBody"]["description"] = "May be empty: the same as {}"
        if route.upload:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        responses: dict[str, Any] = {}
        if route.response is not None:
            responses[str(route.status)] = {
                "description": "Success",
                "content": {"application/json": {"schema": ref(route.response, "serialization")}},
            }
        elif route.download:
            responses[str(route.status)] = {
                "description": "The file",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "headers": {
                    "ETag": {
                        "description": "the file's sha256, quoted",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                },
            }
        elif route.operation == "openapi":
            responses["200"] = {
                "description": "The OpenAPI document",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        else:
            responses[str(route.status)] = {"description": "Success, no body"}
        for code in route.error_statuses():
            responses[str(code)] = {
                "description": reasons[code],
                "content": {"application/json": {"schema": error_ref}},
            }
            if code in _ERROR_HEADERS:
                name, description = _ERROR_HEADERS[code]
                responses[str(code)]["headers"] = {
                    name: {
                        "description": description,
                        "required": True,
                        "schema": {"type": "string"},
                    }
                }
        operation["responses"] = responses
        if route.public:
            operation["security"] = []
        else:
            role = route.min_role
            assert role is not None
            operation["security"] = [{"bearerAuth": []}]
            operation["x-required-role"] = role
            operation["description"] = _ROLE_NOTE[role]
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onenet-ota management API",
            "version": onenet_ota.__version__,
            "description": (
                "Accounts, products, devices, packages and upgrade tasks of a self-hosted OneNET"
                ' OTA platform. Errors are {"error":{"code","message","details"}}.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A named API token (onenet-ota admin token create); its role"
                    " (viewer < operator < admin) decides what it may do (x-required-role).",
                }
            },
        },
    }


def _match(route: Route, segments: list[str]) -> dict[str, str] | None:
    pattern = route.segments
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


# --------------------------------------------------------------------------------------------
# The handler


def _path_values(route: Route, raw: dict[str, str]) -> dict[str, Any]:
    """The path parameters by their rules; one that breaks its rule names nothing: 404."""
    parsed: dict[str, Any] = {}
    for param in route.path_params:
        value = param.parse(raw[param.name])
        if value is None:
            raise ApiError(404, "not_found", f"no {param.name} {_safe(raw[param.name])!r}")
        parsed[param.name] = value
    return parsed


def _query_values(route: Route, raw: dict[str, str]) -> dict[str, Any]:
    """The route's query parameters by their rules (422 for the first that breaks its rule);
    an empty value is an absent one, unknown parameters are ignored."""
    parsed: dict[str, Any] = {}
    for param in route.query:
        text = raw.get(param.name)
        if not text:
            continue
        value = param.parse(text)
        if value is None:
            raise ApiError(
                422,
                "invalid",
                param.rule(),
                details=[{"field": param.name, "message": param.rule()}],
            )
        parsed[param.name] = value
    return parsed


def _parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object whose strings a database can store, or an :class:`ApiError`.

    Checked before the body's model sees it, so that no string with NUL (which PostgreSQL cannot
    store) or with a lone surrogate (which has no UTF-8 form) reaches the database, whatever
    field it is in.
    """
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "bad_request", "the body is not JSON: nested too deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_request", f"the body is not JSON: {exc}") from None
    except ValueError:
        # Well-formed JSON, but an integer longer than Python converts (sys.int_info).
        digits = sys.get_int_max_str_digits()
        raise ApiError(422, "invalid", f"a number has more than {digits} digits") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:  # a loop, not recursion: json.loads nests deeper than Python recurses
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                field = f"{where}.{key}" if where else key
                _check_text(key, field)
                stack.append((value, field))
        elif isinstance(node, list):
            stack.extend((item, f"{where}.{i}") for i, item in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, where)
    return data


def _check_text(text: str, field: str) -> None:
    problem = None
    if "\x00" in text:
        problem = "must not contain NUL characters"
    elif _safe(text) != text:
        problem = "must be Unicode text (a lone surrogate is not)"
    if problem is not None:
        field = _safe(field)
        raise ApiError(
            422, "invalid", f"{field}: {problem}", details=[{"field": field, "message": problem}]
        )


def _safe(text: str) -> str:
    """``text`` with lone surrogates as backslash escapes: it can be sent as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _module_type(value: str | None, *, required: bool) -> int | None:
    if value is None or value == "":
        if required:
            raise ApiError(422, "invalid", "type is required: fota or sota")
        return None
    types = {"fota": 1, "1": 1, "sota": 2, "2": 2}
    lowered = value.lower()
    if lowered not in types:
        raise ApiError(422, "invalid", "type must be fota or sota")
    return types[lowered]


def _kind(value: str | None) -> int:
    kinds = {"full": 1, "1": 1, "diff": 2, "differential": 2, "2": 2}
    if value is None or value == "":
        return 1
    lowered = value.lower()
    if lowered not in kinds:
        raise ApiError(422, "invalid", "kind must be full or diff")
    return kinds[lowered]


class AdminApi:
    """The ``/api/v1`` handler over an :class:`~onenet_ota.server.admin_service.AdminService`.

    ``tokens`` holds the API tokens (default: those in the service's database). ``admin_token``,
    when given, is the first start's admin secret: on an empty token table it becomes the admin
    token named ``admin`` (:meth:`TokenStore.bootstrap`); otherwise it is ignored.
    ``max_upload_bytes`` limits package uploads (413 past it). ``on_task_created`` is called
    with every created task (the task push, §11); it must not block.
    """

    def __init__(
        self,
        service: svc.AdminService,
        *,
        admin_token: str | None = None,
        max_upload_bytes: int,
        on_task_created: Callable[[svc.CreatedTask], None] | None = None,
        tokens: TokenStore | None = None,
        campaigns: camp.CampaignService | None = None,
    ) -> None:
        self.service = service
        self.tokens = tokens if tokens is not None else TokenStore(service.engine)
        if admin_token:
            self.tokens.bootstrap(admin_token)
        self._campaigns = campaigns
        self._max_upload = max_upload_bytes
        self._on_task_created = on_task_created
        self._openapi_bytes: bytes | None = None
        self._handlers: dict[str, Callable[[Call], Awaitable[Any]]] = {
            route.operation: getattr(self, "_" + route.operation) for route in ROUTES
        }

    @property
    def campaigns(self) -> camp.CampaignService:
        """The campaign service (made over the management service's engine on first use)."""
        if self._campaigns is None:
            self._campaigns = camp.CampaignService(self.service.engine)
        return self._campaigns

    async def handle(self, request: Request) -> Response:
        """Answer one ``/api/v1`` request; never raises, never sends a traceback."""
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return _error_response(exc)
        except Exception:
            log.exception("management request %s %s failed", request.method, request.path)
            return _error_response(ApiError(500, "internal", "internal error"))

    async def handle_signed_in(self, request: Request, principal: Principal) -> Response:
        """Answer ``request`` for ``principal``, whom this process has signed in already (the
        web console), so the request carries no bearer token. Every other rule of the route
        applies as for :meth:`handle`: the role it needs, and the audit log's actor.
        """
        try:
            return await self._dispatch(request, principal=principal)
        except ApiError as exc:
            return _error_response(exc)
        except Exception:
            log.exception("management request %s %s failed", request.method, request.path)
            return _error_response(ApiError(500, "internal", "internal error"))

    async def _dispatch(self, request: Request, *, principal: Principal | None = None) -> Response:
        path = request.path
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            raise ApiError(404, "not_found", "no such endpoint")
        segments = [unquote(seg) for seg in path[len(PREFIX) :].strip("/").split("/") if seg]
        matched: list[tuple[Route, dict[str, str]]] = []
        for route in ROUTES:
            params = _match(route, segments)
            if params is not None:
                matched.append((route, params))
        if not matched:
            raise ApiError(404, "not_found", "no such endpoint")
        # RFC 9110 §9.3.2: HEAD is answered as GET is (the HTTP layer leaves out the content).
        method = "GET" if request.method == "HEAD" else request.method
        for route, params in matched:  # noqa: B007 - the match found is used below
            if route.method == method:
                break
        else:
            allowed = {r.method for r, _ in matched}
            if "GET" in allowed:
                allowed.add("HEAD")
            allow = ", ".join(sorted(allowed))
            raise ApiError(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here; use {allow}",
                headers=[("Allow", allow)],
            )
        if route.min_role is not None:
            if principal is None:
                principal = await self._authenticate(request)
            if not role_allows(principal.role, route.min_role):
                raise ApiError(
                    403,
                    "forbidden",
                    f"this needs the {route.min_role} role; token {principal.name} is"
                    f" {principal.role}",
                )
        call = Call(
            request=request,
            route=route,
            path=_path_values(route, params),
            query=_query_values(route, request.query),
        )
        if principal is None:
            result = await self._run(route, call)
        else:
            # The audit log's actor for whatever the handler changes (threads inherit it).
            with audit.acting_as(principal.name):
                result = await self._run(route, call)
        if route.status == 204:
            return Response.empty(204)
        if isinstance(result, Response):
            return result
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        return _json_response(route.status, payload)

    async def _authenticate(self, request: Request) -> Principal:
        value = request.header("Authorization") or ""
        scheme, _, token = value.partition(" ")
        token = token.strip()
        principal = None
        if scheme.lower() == "bearer" and token:
            try:
                principal = await self._db(self.tokens.verify, token)
            except OperationalError:
                log.warning("database unavailable to check a token for %s", request.path)
                raise ApiError(
                    503, "unavailable", "the database is busy or unavailable; retry",
                    headers=[("Retry-After", "1")],
                ) from None  # fmt: skip
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing, unknown or revoked API token (Authorization: Bearer <token>)",
                headers=[("WWW-Authenticate", "Bearer")],
            )
        return principal

    async def _run(self, route: Route, call: Call) -> Any:
        try:
            return await self._handlers[route.operation](call)
        except svc.AdminError as exc:
            raise _from_service(exc) from None
        except ValidationError as exc:
            raise _from_validation(exc) from None
        except BodyTooLarge:
            raise ApiError(413, "payload_too_large", "the request body is too large") from None
        except RequestTimedOut:
            # The client's doing, not the server's: no traceback. What was received is gone (an
            # upload's partial file is removed by the blob store) and nothing was recorded.
            log.info("%s %s: the body stopped arriving", call.request.method, call.request.path)
            raise ApiError(
                408, "request_timeout", "the request body stopped arriving; send it again"
            ) from None
        except RequestAborted:
            log.info("%s %s: the body was cut off", call.request.method, call.request.path)
            raise ApiError(
                400, "bad_request", "the request body was cut off; send it again"
            ) from None
        except OperationalError:
            # A lock wait ran out or the database is unreachable: the caller may retry.
            log.warning("database unavailable for %s %s", call.request.method, call.request.path)
            raise ApiError(
                503, "unavailable", "the database is busy or unavailable; retry",
                headers=[("Retry-After", "1")],
            ) from None  # fmt: skip

    @staticmethod
    async def _db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # Management calls can be long (bulk imports, fleet-wide tasks): keep them off the loop
        # that also serves devices.
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    @staticmethod
    async def _json_body(call: Call, model: type[BaseModel]) -> Any:
        raw = await call.request.body(MAX_JSON_BODY)
        if not raw.strip() and call.route.body_optional:
            raw = b"{}"
        _parse_json(raw)
        return model.model_validate_json(raw)

    @staticmethod
    def _page_args(call: Call) -> dict[str, Any]:
        after = call.query.get("after")
        return {"limit": call.query.get("limit"), "after": None if after is None else str(after)}

    # ---------------------------------------------------------------- meta

    async def _openapi(self, call: Call) -> Response:
        if self._openapi_bytes is None:
            document = openapi_document()
            self._openapi_bytes = json.dumps(document, separators=(",", ":")).encode()
        body = self._openapi_bytes
        return Response(200, [_JSON, ("Content-Length", str(len(body)))], body)

    async def _health(self, call: Call) -> Health:
        return Health(status="ok", version=onenet_ota.__version__)

    # ---------------------------------------------------------------- products

    async def _create_product(self, call: Call) -> svc.Product:
        spec = await self._json_body(call, svc.ProductCreate)
        return await self._db(self.service.create_product, spec)

    async def _list_products(self, call: Call) -> ProductPage:
        page = await self._db(self.service.list_products, **self._page_args(call))
        return ProductPage(items=page.items, next=page.next)

    async def _get_product(self, call: Call) -> svc.Product:
        return await self._db(self.service.get_product, call.path["pid"])

    async def _reveal_product_key(self, call: Call) -> svc.Product:
        return await self._db(self.service.reveal_product_key, call.path["pid"])

    async def _rotate_key(self, call: Call) -> svc.Product:
        spec = await self._json_body(call, svc.KeyRotate)
        return await self._db(self.service.rotate_product_key, call.path["pid"], spec)

    async def _delete_product(self, call: Call) -> None:
        await self._db(self.service.delete_product, call.path["pid"])

    async def _set_product_account(self, call: Call) -> svc.Product:
        spec = await self._json_body(call, svc.AccountAssign)
        return await self._db(self.service.set_product_account, call.path["pid"], spec.uid)

    async def _clear_product_account(self, call: Call) -> svc.Product:
        return await self._db(self.service.set_product_account, call.path["pid"], None)

    # ---------------------------------------------------------------- accounts

    async def _create_account(self, call: Call) -> svc.Account:
        spec = await self._json_body(call, svc.AccountCreate)
        return await self._db(self.service.create_account, spec)

    async def _list_accounts(self, call: Call) -> AccountPage:
        page = await self._db(self.service.list_accounts, **self._page_args(call))
        return AccountPage(items=page.items, next=page.next)

    async def _get_account(self, call: Call) -> svc.Account:
        return await self._db(self.service.get_account, call.path["uid"])

    async def _reveal_account_key(self, call: Call) -> svc.Account:
        return await self._db(self.service.reveal_account_key, call.path["uid"])

    async def _rotate_account_key(self, call: Call) -> svc.Account:
        spec = await self._json_body(call, svc.KeyRotate)
        return await self._db(self.service.rotate_account_key, call.path["uid"], spec)

    async def _delete_account(self, call: Call) -> None:
        await self._db(self.service.delete_account, call.path["uid"])

    # ---------------------------------------------------------------- devices

    async def _create_device(self, call: Call) -> svc.Device:
        spec = await self._json_body(call, svc.DeviceCreate)
        return await self._db(self.service.create_device, spec)

    async def _import_devices(self, call: Call) -> DeviceList:
        spec = await self._json_body(call, svc.DeviceImport)
        return DeviceList(items=await self._db(self.service.import_devices, spec))

    async def _list_devices(self, call: Call) -> DevicePage:
        q = call.query
        page = await self._db(
            self.service.list_devices,
            pid=q.get("pid") or None,
            f_version=q.get("f_version") or None,
            s_version=q.get("s_version") or None,
            name_contains=q.get("q") or None,
            labels=_labels(q.get("label")),
            state=q.get("state") or None,
            **self._page_args(call),
        )
        return DevicePage(items=page.items, next=page.next)

    async def _put_device_labels(self, call: Call) -> svc.DeviceLabels:
        spec = await self._json_body(call, svc.LabelsSet)
        if any(value is None for value in spec.labels.values()):
            raise ApiError(422, "invalid", "labels: null removes a label with PATCH only")
        return await self._db(
            self.service.set_device_labels, call.path["dev_id"], spec, replace=True
        )

    async def _patch_device_labels(self, call: Call) -> svc.DeviceLabels:
        spec = await self._json_body(call, svc.LabelsSet)
        return await self._db(
            self.service.set_device_labels, call.path["dev_id"], spec, replace=False
        )

    async def _get_device(self, call: Call) -> svc.DeviceDetail:
        return await self._db(self.service.get_device, call.path["dev_id"])

    async def _device_history(self, call: Call) -> HistoryPage:
        page = await self._db(
            self.service.device_history,
            call.path["dev_id"],
            task_id=call.query.get("task_id"),
            **self._page_args(call),
        )
        return HistoryPage(items=page.items, next=page.next)

    async def _rotate_device_key(self, call: Call) -> svc.Device:
        spec = await self._json_body(call, svc.DeviceKeyRotate)
        return await self._db(self.service.rotate_device_key, call.path["dev_id"], spec)

    async def _delete_device(self, call: Call) -> None:
        await self._db(self.service.delete_device, call.path["dev_id"])

    # ---------------------------------------------------------------- packages

    async def _upload_package(self, call: Call) -> svc.Package:
        q = call.query
        request = call.request
        # Everything about the metadata is checked before a byte of the body is read.
        spec = svc.PackageCreate.model_validate(
            {
                "pid": q.get("pid", ""),
                "module_type": _module_type(q.get("type"), required=True),
                "kind": _kind(q.get("kind")),
                "from_version": q.get("from_version") or None,
                "target": q.get("target", ""),
                "manuf": q.get("manuf") or None,
                "model": q.get("model") or None,
                "file_name": q.get("file_name", ""),
            }
        )
        if not await self._db(self._product_exists, spec.pid):
            raise ApiError(422, "invalid", f"product {spec.pid} does not exist")
        if request.content_length is not None and request.content_length > self._max_upload:
            raise ApiError(
                413, "payload_too_large", f"the package exceeds {self._max_upload} bytes"
            )
        if request.content_length == 0:
            raise ApiError(422, "invalid", "the package file is empty")
        try:
            blob = await self.service.blobs.put_stream(request.stream(), limit=self._max_upload)
        except BlobTooLarge:
            raise ApiError(
                413, "payload_too_large", f"the package exceeds {self._max_upload} bytes"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            # The partial file is gone already (the blob store's writer removes it).
            log.warning("no space for an upload of %s bytes", request.content_length or "?")
            raise ApiError(
                507, "insufficient_storage", "the server has no space left for the package"
            ) from None
        return await self._db(self.service.create_package, spec, blob)

    def _product_exists(self, pid: str) -> bool:
        try:
            self.service.get_product(pid)
        except svc.NotFound:
            return False
        return True

    async def _list_packages(self, call: Call) -> PackagePage:
        page = await self._db(
            self.service.list_packages,
            pid=call.query.get("pid") or None,
            module_type=_module_type(call.query.get("type"), required=False),
            **self._page_args(call),
        )
        return PackagePage(items=page.items, next=page.next)

    async def _get_package(self, call: Call) -> svc.Package:
        return await self._db(self.service.get_package, call.path["id"])

    async def _download_package(self, call: Call) -> Response:
        package: svc.Package = await self._db(self.service.get_package, call.path["id"])
        path = self.service.blobs.path(package.sha256)
        # A file the store lost is the server's fault: 500 before anything was sent, and the
        # HTTP layer logs it. Sent with sendfile, so a large package costs no memory.
        lost = _error_response(ApiError(500, "internal", "the package file cannot be read"))
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(package.size)),
            ("Content-Disposition", f'attachment; filename="{safe_file_name(package.file_name)}"'),
            ("ETag", f'"{package.sha256}"'),
        ]
        return Response(200, headers, FileSegment(str(path), 0, package.size, fallback=lost))

    async def _delete_package(self, call: Call) -> None:
        await self._db(self.service.delete_package, call.path["id"])

    # ---------------------------------------------------------------- tasks

    async def _create_task(self, call: Call) -> svc.TaskCreated:
        spec = await self._json_body(call, svc.TaskCreate)
        created: svc.CreatedTask = await self._db(self.service.create_task, spec)
        if self._on_task_created is not None:
            try:
                self._on_task_created(created)
            except Exception:  # the push is advisory (D24): it never fails the task
                log.exception("task push scheduling failed for task %d", created.task.id)
        return created.task

    async def _list_tasks(self, call: Call) -> TaskPage:
        q = call.query
        page = await self._db(
            self.service.list_tasks,
            pid=q.get("pid") or None,
            package_id=q.get("package_id"),
            status=q.get("status") or None,
            **self._page_args(call),
        )
        return TaskPage(items=page.items, next=page.next)

    async def _get_task(self, call: Call) -> svc.TaskDetail:
        return await self._db(
            self.service.get_task,
            call.path["id"],
            state=call.query.get("state") or None,
            **self._page_args(call),
        )

    async def _delete_task(self, call: Call) -> None:
        await self._db(self.service.delete_task, call.path["id"])

    async def _list_task_devices(self, call: Call) -> DeviceTaskPage:
        page = await self._db(
            self.service.list_task_devices,
            call.path["id"],
            state=call.query.get("state") or None,
            **self._page_args(call),
        )
        return DeviceTaskPage(items=page.items, next=page.next)

    async def _pause_task(self, call: Call) -> svc.TaskActionResult:
        return await self._act_on_task(call, Action.PAUSE)

    async def _resume_task(self, call: Call) -> svc.TaskActionResult:
        return await self._act_on_task(call, Action.RESUME)

    async def _cancel_task(self, call: Call) -> svc.TaskActionResult:
        return await self._act_on_task(call, Action.CANCEL)

    async def _pause_device_task(self, call: Call) -> svc.DeviceTaskView:
        return await self._act_on_device_task(call, Action.PAUSE)

    async def _resume_device_task(self, call: Call) -> svc.DeviceTaskView:
        return await self._act_on_device_task(call, Action.RESUME)

    async def _cancel_device_task(self, call: Call) -> svc.DeviceTaskView:
        return await self._act_on_device_task(call, Action.CANCEL)

    async def _act_on_task(self, call: Call, action: Action) -> svc.TaskActionResult:
        return await self._db(self.service.act_on_task, call.path["id"], action)

    async def _act_on_device_task(self, call: Call, action: Action) -> svc.DeviceTaskView:
        return await self._db(
            self.service.act_on_device_task,
            call.path["id"],
            call.path["dev_id"],
            action,
        )

    # ---------------------------------------------------------------- tokens and audit

    async def _list_tokens(self, call: Call) -> ApiTokenPage:
        page = await self._db(
            self.tokens.list,
            limit=call.query.get("limit") or svc.DEFAULT_PAGE,
            after=call.query.get("after"),
        )
        return ApiTokenPage(items=page.items, next=page.next)

    async def _create_token(self, call: Call) -> ApiTokenCreated:
        spec = await self._json_body(call, ApiTokenCreate)
        return await self._db(self.tokens.create, spec)

    async def _revoke_token(self, call: Call) -> None:
        await self._db(self.tokens.revoke, call.path["id"])

    async def _list_audit(self, call: Call) -> audit.AuditPage:
        q = call.query
        return await self._db(
            audit.list_entries,
            self.service.engine,
            actor=q.get("actor"),
            action=q.get("action"),
            target=q.get("target"),
            since=q.get("since"),
            until=q.get("until"),
            after=q.get("after"),
            limit=q.get("limit") or svc.DEFAULT_PAGE,
        )

    # ---------------------------------------------------------------- campaigns

    def _announce(self, applied: camp.Applied) -> camp.Campaign:
        """Push the tasks a campaign action created (§11), then answer with the campaign."""
        if self._on_task_created is not None:
            for created in applied.created:
                try:
                    self._on_task_created(created)
                except Exception:  # the push is advisory (D24)
                    log.exception("task push scheduling failed for task %d", created.task.id)
        return applied.campaign

    async def _create_campaign(self, call: Call) -> camp.Campaign:
        spec = await self._json_body(call, camp.CampaignCreate)
        return await self._db(self.campaigns.create, spec)

    async def _preview_campaign_spec(self, call: Call) -> camp.Preview:
        spec = await self._json_body(call, camp.CampaignCreate)
        return await self._db(self.campaigns.preview, spec)

    async def _list_campaigns(self, call: Call) -> CampaignPage:
        after = call.query.get("after")
        page = await self._db(
            self.campaigns.list_campaigns,
            state=call.query.get("state") or None,
            limit=call.query.get("limit"),
            after=after,
        )
        return CampaignPage(items=page.items, next=page.next)

    async def _get_campaign(self, call: Call) -> camp.CampaignDetail:
        return await self._db(self.campaigns.get, call.path["id"])

    async def _delete_campaign(self, call: Call) -> None:
        await self._db(self.campaigns.delete_draft, call.path["id"])

    async def _preview_campaign(self, call: Call) -> camp.Preview:
        return await self._db(self.campaigns.preview_campaign, call.path["id"])

    async def _campaign_events(self, call: Call) -> CampaignEventList:
        return CampaignEventList(items=await self._db(self.campaigns.events, call.path["id"]))

    async def _campaign_action(
        self, call: Call, action: str, body: BaseModel | None = None
    ) -> camp.Campaign:
        applied = await self._db(
            self.campaigns.act,
            call.path["id"],
            action,
            body,
            if_version=call.query.get("if_version"),
        )
        return self._announce(applied)

    async def _start_campaign(self, call: Call) -> camp.Campaign:
        return await self._campaign_action(call, "start")

    async def _pause_campaign(self, call: Call) -> camp.Campaign:
        return await self._campaign_action(call, "pause")

    async def _resume_campaign(self, call: Call) -> camp.Campaign:
        return await self._campaign_action(call, "resume")

    async def _advance_campaign(self, call: Call) -> camp.Campaign:
        return await self._campaign_action(call, "advance")

    async def _abort_campaign(self, call: Call) -> camp.Campaign:
        return await self._campaign_action(call, "abort")

    async def _retry_failed_campaign(self, call: Call) -> camp.Campaign:
        body = await self._json_body(call, camp.RetryFailed)
        return await self._campaign_action(call, "retry_failed", body)

    async def _add_campaign_devices(self, call: Call) -> camp.Campaign:
        body = await self._json_body(call, camp.DevicesAdd)
        return await self._campaign_action(call, "add_devices", body)


def _labels(text: str | None) -> list[tuple[str, str]]:
    """``?label=k=v,k2=v2`` as pairs (the parameter's pattern was checked already)."""
    if not text:
        return []
    pairs = [svc.parse_label(part) for part in text.split(",")]
    return [pair for pair in pairs if pair is not None]

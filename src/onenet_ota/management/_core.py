"""The management client's sans-IO core: every decision of the client, made once.

Theory of operation. Each operation is a :class:`Call`: a :class:`WireRequest` (method, URL,
query, headers and an encoded JSON body, as plain data) and a decoder for the successful reply.
:class:`ManagementCore` builds calls from typed arguments. A driver (``client.py``, sync or async)
sends the request, asks :meth:`Call.retry_delay` whether a 503 is worth another try, and hands the
final reply's status and body to :meth:`Call.judge`, which returns the decoded result or raises
the matching exception of :mod:`onenet_ota.management.errors`.

No I/O and no httpx2 here: the drivers only move bytes, sleep, and map transport exceptions.

Values are not checked here: the server is the one judge of them (a client-side copy of its rules
would be a second verdict, and a stale one against a newer server). A refused value comes back as
:class:`~onenet_ota.management.errors.Invalid` with the server's message and ``details``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, get_args
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ValidationError

from onenet_ota import __version__
from onenet_ota.management.errors import ApiError, ProtocolError, error_for_status
from onenet_ota.management.models import (
    MAX_PAGE,
    Account,
    AccountPage,
    ApiToken,
    ApiTokenCreated,
    ApiTokenPage,
    AuditEntry,
    AuditPage,
    Campaign,
    CampaignCreate,
    CampaignDetail,
    CampaignEvent,
    CampaignEventList,
    CampaignPage,
    Device,
    DeviceDetail,
    DeviceImportItem,
    DeviceLabels,
    DeviceList,
    DevicePage,
    DeviceTaskPage,
    DeviceTaskView,
    FailureClass,
    Health,
    HistoryEvent,
    HistoryPage,
    Package,
    PackagePage,
    Preview,
    Product,
    ProductPage,
    Role,
    StateName,
    Task,
    TaskActionResult,
    TaskCreated,
    TaskDetail,
    TaskPage,
)
from onenet_ota.protocol.status import PackageKind, TaskType

__all__ = [
    "API_PREFIX",
    "BUSY_ATTEMPTS",
    "DEFAULT_PAGE_SIZE",
    "MAX_RETRY_AFTER_S",
    "Action",
    "Call",
    "CampaignAction",
    "CampaignState",
    "Download",
    "DownloadReader",
    "LabelFilter",
    "ManagementCore",
    "PageLike",
    "Pages",
    "WireRequest",
    "next_cursor",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
M = TypeVar("M", bound=BaseModel)

API_PREFIX: Final = "/api/v1"
BUSY_ATTEMPTS: Final = 3
"""Tries of an idempotent call the server answered 503 (its database was busy or unreachable)."""
MAX_RETRY_AFTER_S: Final = 10.0
"""The longest ``Retry-After`` the client waits; a longer one is cut to this."""
# RFC 9110 §9.2.2. A POST is not repeated: a 503 for a connection lost during its COMMIT cannot
# say whether the commit happened, and a repeated create would make a second product or task.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_JSON_TYPE: Final = ("Content-Type", "application/json")
DEFAULT_PAGE_SIZE: Final = MAX_PAGE
"""The page size the ``iter_*`` helpers ask for: the largest, for the fewest round trips."""

ModuleType = Literal["fota", "sota"] | TaskType
"""A package's or task's type: ``"fota"`` (module firmware) or ``"sota"`` (application)."""
Kind = Literal["full", "diff"] | PackageKind
"""A package's kind: a full image or a differential one."""
TaskStatus = Literal["active", "paused", "cancelled"]
OnOpen = Literal["fail", "skip", "cancel"]
Action = Literal["pause", "resume", "cancel"]
"""What the task actions do to a task or to one device's part of it."""
CampaignAction = Literal["start", "pause", "resume", "advance", "abort"]
CampaignState = Literal["draft", "running", "paused", "finished", "aborted"]
FailureClassName = Literal["deferral", "environment", "package"]
LabelFilter = Mapping[str, str] | Iterable[tuple[str, str]]
"""Devices that have every one of these labels: a mapping, or ``(key, value)`` pairs (a key may
then be given twice, which no device matches)."""


class PageLike(Protocol[T_co]):
    """What every list reply has: its ``items`` and the cursor of the next page."""

    @property
    def items(self) -> Sequence[T_co]: ...

    @property
    def next(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class WireRequest:
    """One HTTP request as plain data. ``body`` is the encoded JSON body, if any; ``streamed``
    says the driver sends a body of its own (a package upload), which cannot be sent twice."""

    method: str
    url: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    streamed: bool = False

    def __repr__(self) -> str:  # the Authorization value is a credential
        shown = [(k, "***" if k.lower() == "authorization" else v) for k, v in self.headers]
        return f"WireRequest({self.method} {self.url} params={self.params} headers={shown})"


@dataclass(frozen=True, slots=True)
class Call(Generic[T_co]):
    """A request and how to read its reply. ``server`` names the server in error messages."""

    request: WireRequest
    decode: Callable[[bytes], T_co]
    server: str = field(default="")

    @property
    def attempts(self) -> int:
        """How many times the request may be sent when the server answers 503."""
        if self.request.streamed or self.request.method.upper() not in _IDEMPOTENT:
            return 1
        return BUSY_ATTEMPTS

    def retry_delay(self, status: int, retry_after: str | None, attempt: int) -> float | None:
        """Seconds to wait before sending the request again after try ``attempt`` (1-based)
        was answered with ``status``; None: do not send it again, judge this reply."""
        if status != 503 or attempt >= self.attempts:
            return None
        return parse_retry_after(retry_after)

    def error(self, status: int, reason: str, body: bytes) -> ApiError | ProtocolError:
        """The exception a non-2xx reply stands for."""
        return error_reply(status, reason, body, self.server)

    def judge(self, status: int, reason: str, body: bytes) -> T_co:
        """The decoded result of a final reply, or the exception it stands for."""
        if 200 <= status < 300:
            try:
                return self.decode(b"" if status == 204 else body)
            except (ValueError, ValidationError) as exc:  # ValidationError is a ValueError
                raise ProtocolError(
                    f"{self.server} sent a reply that is not the management API's: "
                    f"{_first_line(exc)}",
                    status=status,
                ) from None
        raise error_reply(status, reason, body, self.server)


@dataclass(frozen=True, slots=True)
class Pages(Generic[T_co]):
    """A paged list as data: ``page(after)`` is the call of the page after cursor ``after``
    (None: the first page). A driver sends them in turn until :func:`next_cursor` says the end."""

    page: Callable[[str | None], Call[PageLike[T_co]]]


_ETAG_SHA256: Final = re.compile(r'"([0-9a-f]{64})"')


class DownloadReader:
    """Checks a package file as it streams in: no byte past ``Content-Length``, and at the end
    exactly that many bytes whose sha256 is the ``ETag`` the server sent."""

    def __init__(self, length: int | None, sha256: str | None, server: str) -> None:
        self._length = length
        self._sha256 = sha256
        self._server = server
        self._digest = hashlib.sha256()
        self.received = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file."""
        self.received += len(chunk)
        if self._length is not None and self.received > self._length:
            raise ProtocolError(
                f"{self._server} sent more than the {self._length} bytes it announced"
            )
        self._digest.update(chunk)

    def finish(self) -> int:
        """The file's size, once it is known to be whole and unchanged."""
        if self._length is not None and self.received != self._length:
            raise ProtocolError(f"the download ended after {self.received} of {self._length} bytes")
        if self._sha256 is not None and self._digest.hexdigest() != self._sha256:
            raise ProtocolError("the downloaded file's sha256 differs from the server's ETag")
        return self.received


@dataclass(frozen=True, slots=True)
class Download:
    """A package download: ``call`` judges (and retries) the reply as any other call does;
    a 2xx reply's body is the file, checked by :meth:`reader`."""

    call: Call[None]

    def reader(self, content_length: str | None, etag: str | None) -> DownloadReader:
        """A checker for the body of a 2xx reply with these headers."""
        length = None
        if content_length is not None:
            if not content_length.isdigit():
                raise ProtocolError(f"{self.call.server} sent Content-Length {content_length!r}")
            length = int(content_length)
        found = _ETAG_SHA256.fullmatch(etag or "")
        return DownloadReader(length, found.group(1) if found else None, self.call.server)


def parse_retry_after(value: str | None) -> float:
    """A ``Retry-After`` in seconds, within 0..:data:`MAX_RETRY_AFTER_S`; 1 when absent or odd.

    Only the delay-seconds form: the server sends nothing else (RFC 9110 §10.2.3).
    """
    try:
        seconds = float(value if value is not None else "1")
    except ValueError:
        return 1.0
    if not math.isfinite(seconds):
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def error_reply(status: int, reason: str, body: bytes, server: str) -> ApiError | ProtocolError:
    """The exception an error reply stands for: the API's error body mapped to
    :mod:`~onenet_ota.management.errors`, or a :class:`ProtocolError` for any other reply."""
    try:
        payload = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "") or reason or f"HTTP {status}"
        details = error.get("details")
        return error_for_status(status)(
            message,
            status=status,
            code=str(error.get("code") or ""),
            details=[d for d in details if isinstance(d, dict)]
            if isinstance(details, list)
            else [],
        )
    return ProtocolError(
        f"HTTP {status} {reason} from {server} (is this an onenet-ota server?)".replace("  ", " "),
        status=status,
    )


def next_cursor(page: PageLike[object], after: str | None) -> str | None:
    """The cursor of the page after ``page`` (which was asked for with ``after``), None at the end.

    A cursor that does not move would make a pagination loop run forever: that reply is refused.
    """
    if page.next is None:
        return None
    if page.next == after or not page.items:
        raise ProtocolError(f"the server's page cursor does not advance (after={after!r})")
    return page.next


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _model(cls: type[M]) -> Callable[[bytes], M]:
    return cls.model_validate_json


def _nothing(body: bytes) -> None:
    return None


def _any_json(body: bytes) -> Any:
    """The escape hatch's decoder: the JSON value, None for an empty (204) reply."""
    if not body:
        return None
    return json.loads(body)


def _openapi(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("the OpenAPI document is not a JSON object")
    return document


def _device_list(body: bytes) -> list[Device]:
    return DeviceList.model_validate_json(body).items


def _device_labels(body: bytes) -> dict[str, str]:
    return DeviceDetail.model_validate_json(body).labels


def _campaign_events(body: bytes) -> list[CampaignEvent]:
    return CampaignEventList.model_validate_json(body).items


def _campaign_body(spec: CampaignCreate | Mapping[str, Any]) -> dict[str, Any]:
    """A campaign's JSON body: a model as the fields it was given, a mapping as it is (the
    server judges it)."""
    if isinstance(spec, CampaignCreate):
        return spec.model_dump(mode="json", exclude_unset=True)
    return dict(spec)


def _label_filter(labels: LabelFilter | None) -> str | None:
    """The ``label`` query parameter: ``key=value`` pairs, comma-separated."""
    if labels is None:
        return None
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return ",".join(f"{key}={value}" for key, value in pairs) or None


def _seg(value: str | int) -> str:
    """A path segment: a pid or uid with '/' in it must not name another route."""
    return quote(str(value), safe="")


def _module_type(value: ModuleType) -> str:
    if isinstance(value, TaskType):
        return "fota" if value is TaskType.FOTA else "sota"
    return value


def _kind(value: Kind) -> str:
    if isinstance(value, PackageKind):
        return "full" if value is PackageKind.FULL else "diff"
    return value


def _import_item(item: DeviceImportItem | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, DeviceImportItem):
        return item.model_dump(exclude_defaults=True)
    return dict(item)


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class ManagementCore:
    """Builds every call of the management API for ``server`` (``http://`` or ``https://``, the
    API under ``/api/v1``), authenticated with ``token`` (``Authorization: Bearer``).

    This class is the one list of the API's operations: each method takes an operation's typed
    arguments and returns its :class:`Call` (or, for the ``iter_*`` helpers, its :class:`Pages`).
    ``ManagementClient`` and ``AsyncManagementClient`` expose each of them under the same name,
    with the same parameters and this docstring, sending the call and returning its result.
    """

    def __init__(self, server: str, token: str | None) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the server must be an http:// or https:// URL, not {server!r}")
        self.server = server.rstrip("/")
        headers = [("Accept", "application/json"), ("User-Agent", f"onenet-ota/{__version__}")]
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        self._headers = tuple(headers)

    def __repr__(self) -> str:  # no token
        return f"ManagementCore({self.server!r})"

    # ---------------------------------------------------------------- building

    def call(
        self,
        method: str,
        path: str,
        decode: Callable[[bytes], T],
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        streamed: bool = False,
    ) -> Call[T]:
        """A call of ``method`` on ``path`` (under ``/api/v1``). ``params`` that are None are left
        out; ``json_body`` (unless None) is sent as JSON; ``streamed``: the driver sends a body."""
        query = tuple((k, _param(v)) for k, v in (params or {}).items() if v is not None)
        all_headers = list(self._headers)
        body = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
            all_headers.append(_JSON_TYPE)
        if headers:
            given = {k.lower() for k in headers}
            all_headers = [(k, v) for k, v in all_headers if k.lower() not in given]
            all_headers.extend(headers.items())
        request = WireRequest(
            method.upper(),
            self.server + API_PREFIX + path,
            query,
            tuple(all_headers),
            body,
            streamed,
        )
        return Call(request, decode, self.server)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        streamed: bool = False,
    ) -> Call[Any]:
        """The escape hatch: any route, the reply as decoded JSON (None for 204)."""
        return self.call(
            method,
            path,
            _any_json,
            json_body=json_body,
            params=params,
            headers=headers,
            streamed=streamed,
        )

    # ---------------------------------------------------------------- meta

    def health(self) -> Call[Health]:
        """Liveness and the server's version (``GET /health``; needs no token)."""
        return self.call("GET", "/health", _model(Health))

    def openapi(self) -> Call[dict[str, Any]]:
        """The API's OpenAPI 3.1 document (``GET /openapi.json``)."""
        return self.call("GET", "/openapi.json", _openapi)

    # ---------------------------------------------------------------- accounts

    def create_account(
        self, *, uid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Call[Account]:
        """Create an account for userid tokens (fuse dialect); uid and key generated if omitted
        (``POST /accounts``)."""
        body = _given(uid=uid, access_key=access_key, name=name)
        return self.call("POST", "/accounts", _model(Account), json_body=body)

    def list_accounts(
        self, *, limit: int | None = None, after: str | None = None
    ) -> Call[AccountPage]:
        """One page of accounts, without keys (``GET /accounts``)."""
        params = {"limit": limit, "after": after}
        return self.call("GET", "/accounts", _model(AccountPage), params=params)

    def iter_accounts(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Pages[Account]:
        """Every account, page after page."""
        return Pages(lambda after: self.list_accounts(limit=page_size, after=after))

    def get_account(self, uid: str) -> Call[Account]:
        """An account with its product count, without its key: see :meth:`reveal_account_key`
        (``GET /accounts/{uid}``)."""
        return self.call("GET", f"/accounts/{_seg(uid)}", _model(Account))

    def delete_account(self, uid: str) -> Call[None]:
        """Delete an account that owns no product (``DELETE /accounts/{uid}``)."""
        return self.call("DELETE", f"/accounts/{_seg(uid)}", _nothing)

    def rotate_account_key(self, uid: str, *, access_key: str | None = None) -> Call[Account]:
        """Replace an account's access key, generated if omitted
        (``POST /accounts/{uid}/rotate-key``)."""
        path = f"/accounts/{_seg(uid)}/rotate-key"
        return self.call("POST", path, _model(Account), json_body=_given(access_key=access_key))

    def reveal_account_key(self, uid: str) -> Call[Account]:
        """An account with its access key, the reveal written to the audit log under the calling
        token's name (``POST /accounts/{uid}/reveal-key``)."""
        return self.call("POST", f"/accounts/{_seg(uid)}/reveal-key", _model(Account))

    # ---------------------------------------------------------------- products

    def create_product(
        self, *, pid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Call[Product]:
        """Create a product; pid and access key generated if omitted (``POST /products``)."""
        body = _given(pid=pid, access_key=access_key, name=name)
        return self.call("POST", "/products", _model(Product), json_body=body)

    def list_products(
        self, *, limit: int | None = None, after: str | None = None
    ) -> Call[ProductPage]:
        """One page of products, without keys (``GET /products``)."""
        params = {"limit": limit, "after": after}
        return self.call("GET", "/products", _model(ProductPage), params=params)

    def iter_products(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Pages[Product]:
        """Every product, page after page."""
        return Pages(lambda after: self.list_products(limit=page_size, after=after))

    def get_product(self, pid: str) -> Call[Product]:
        """A product with its device count, without its key: see :meth:`reveal_product_key`
        (``GET /products/{pid}``)."""
        return self.call("GET", f"/products/{_seg(pid)}", _model(Product))

    def delete_product(self, pid: str) -> Call[None]:
        """Delete a product that has no devices, packages or tasks left
        (``DELETE /products/{pid}``)."""
        return self.call("DELETE", f"/products/{_seg(pid)}", _nothing)

    def rotate_product_key(self, pid: str, *, access_key: str | None = None) -> Call[Product]:
        """Replace a product's access key, generated if omitted
        (``POST /products/{pid}/rotate-key``)."""
        path = f"/products/{_seg(pid)}/rotate-key"
        return self.call("POST", path, _model(Product), json_body=_given(access_key=access_key))

    def reveal_product_key(self, pid: str) -> Call[Product]:
        """A product with its access key, the reveal written to the audit log under the calling
        token's name (``POST /products/{pid}/reveal-key``)."""
        return self.call("POST", f"/products/{_seg(pid)}/reveal-key", _model(Product))

    def set_product_account(self, pid: str, uid: str) -> Call[Product]:
        """Make account ``uid`` the product's owner: its userid tokens then speak for it
        (``PUT /products/{pid}/account``)."""
        path = f"/products/{_seg(pid)}/account"
        return self.call("PUT", path, _model(Product), json_body={"uid": uid})

    def clear_product_account(self, pid: str) -> Call[Product]:
        """Leave the product without an owning account (``DELETE /products/{pid}/account``)."""
        return self.call("DELETE", f"/products/{_seg(pid)}/account", _model(Product))

    # ---------------------------------------------------------------- devices

    def create_device(
        self,
        pid: str,
        name: str,
        *,
        dev_id: int | None = None,
        device_key: str | None = None,
        generate_device_key: bool = False,
        auth_info: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Call[Device]:
        """Create a device; dev_id generated if omitted (``POST /devices``)."""
        body = _given(
            pid=pid,
            name=name,
            dev_id=dev_id,
            device_key=device_key,
            generate_device_key=generate_device_key or None,
            auth_info=auth_info,
            labels=None if labels is None else dict(labels),
        )
        return self.call("POST", "/devices", _model(Device), json_body=body)

    def import_devices(
        self, pid: str, devices: Iterable[DeviceImportItem | Mapping[str, Any]]
    ) -> Call[list[Device]]:
        """Create many devices of product ``pid`` (at most 10,000), all or none
        (``POST /devices/import``)."""
        body = {"pid": pid, "devices": [_import_item(item) for item in devices]}
        return self.call("POST", "/devices/import", _device_list, json_body=body)

    def list_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        labels: LabelFilter | None = None,
        state: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[DevicePage]:
        """One page of devices, filtered: ``labels`` keeps the devices that have every one of
        these ``key: value`` labels; ``state`` is ``idle`` (no open task) or the open task's
        state (``to_be_upgraded``, ``downloading``, ``upgrading``, ``paused``)
        (``GET /devices``)."""
        params = {
            "pid": pid, "f_version": f_version, "s_version": s_version, "q": name_contains,
            "label": _label_filter(labels), "state": state, "limit": limit, "after": after,
        }  # fmt: skip
        return self.call("GET", "/devices", _model(DevicePage), params=params)

    def iter_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        labels: LabelFilter | None = None,
        state: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Pages[Device]:
        """Every device that passes the filters (see :meth:`list_devices`), page after page."""
        return Pages(
            lambda after: self.list_devices(
                pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
                labels=labels, state=state, limit=page_size, after=after,
            )
        )  # fmt: skip

    def get_device(self, dev_id: int) -> Call[DeviceDetail]:
        """A device with its labels, reported versions and task history
        (``GET /devices/{dev_id}``)."""
        return self.call("GET", f"/devices/{_seg(dev_id)}", _model(DeviceDetail))

    def delete_device(self, dev_id: int) -> Call[None]:
        """Delete a device without open tasks, with its upgrade history
        (``DELETE /devices/{dev_id}``)."""
        return self.call("DELETE", f"/devices/{_seg(dev_id)}", _nothing)

    def rotate_device_key(self, dev_id: int, *, device_key: str | None = None) -> Call[Device]:
        """Replace a device's key (generated if omitted); the old one stops working at once
        (``POST /devices/{dev_id}/rotate-key``)."""
        path = f"/devices/{_seg(dev_id)}/rotate-key"
        return self.call("POST", path, _model(Device), json_body=_given(device_key=device_key))

    def get_device_labels(self, dev_id: int) -> Call[dict[str, str]]:
        """A device's labels (read from ``GET /devices/{dev_id}``)."""
        return self.call("GET", f"/devices/{_seg(dev_id)}", _device_labels)

    def set_device_labels(
        self, dev_id: int, labels: Mapping[str, str | None], *, replace: bool = False
    ) -> Call[DeviceLabels]:
        """Set the given labels of a device, a None value removing its key
        (``PATCH /devices/{dev_id}/labels``); ``replace``: drop every label not given
        (``PUT``). At most 32 labels."""
        path = f"/devices/{_seg(dev_id)}/labels"
        body = {"labels": dict(labels)}
        return self.call("PUT" if replace else "PATCH", path, _model(DeviceLabels), json_body=body)

    def list_device_history(
        self,
        dev_id: int,
        *,
        task_id: int | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[HistoryPage]:
        """One page of a device's timeline, oldest first: its tasks' state changes, reports with
        their codes' names and texts, version reports and offers (``GET /devices/{dev_id}/history``;
        ``task_id``: only that task's events)."""
        params = {"task_id": task_id, "limit": limit, "after": after}
        path = f"/devices/{_seg(dev_id)}/history"
        return self.call("GET", path, _model(HistoryPage), params=params)

    def iter_device_history(
        self, dev_id: int, *, task_id: int | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Pages[HistoryEvent]:
        """A device's whole timeline (or one task's part of it), oldest first."""
        return Pages(
            lambda after: self.list_device_history(
                dev_id, task_id=task_id, limit=page_size, after=after
            )
        )

    # ---------------------------------------------------------------- packages

    def upload_package(
        self,
        *,
        pid: str,
        module_type: ModuleType,
        target: str,
        file_name: str,
        kind: Kind = "full",
        from_version: str | None = None,
        manuf: str | None = None,
        model: str | None = None,
        size: int | None = None,
    ) -> Call[Package]:
        """``POST /packages``: the driver streams the file as the body (never sent twice).
        ``size``: the file's length, sent as Content-Length (else the body is chunked)."""
        params = {
            "pid": pid, "type": _module_type(module_type), "target": target, "kind": _kind(kind),
            "from_version": from_version, "manuf": manuf, "model": model, "file_name": file_name,
        }  # fmt: skip
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        return self.call(
            "POST", "/packages", _model(Package), params=params, headers=headers, streamed=True
        )

    def list_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[PackagePage]:
        """One page of packages (``GET /packages``)."""
        kind = None if module_type is None else _module_type(module_type)
        params = {"pid": pid, "type": kind, "limit": limit, "after": after}
        return self.call("GET", "/packages", _model(PackagePage), params=params)

    def iter_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Pages[Package]:
        """Every package that passes the filters, page after page."""
        return Pages(
            lambda after: self.list_packages(
                pid=pid, module_type=module_type, limit=page_size, after=after
            )
        )

    def get_package(self, package_id: int) -> Call[Package]:
        """A package's metadata (``GET /packages/{id}``)."""
        return self.call("GET", f"/packages/{_seg(package_id)}", _model(Package))

    def download_package(self, package_id: int) -> Download:
        """``GET /packages/{id}/file``: the package's file, streamed by the driver."""
        call = self.call("GET", f"/packages/{_seg(package_id)}/file", _nothing)
        accept = tuple((k, v) for k, v in call.request.headers if k != "Accept")
        wire = WireRequest(call.request.method, call.request.url, (), accept)
        return Download(Call(wire, _nothing, self.server))

    def delete_package(self, package_id: int) -> Call[None]:
        """Delete a package no task uses (``DELETE /packages/{id}``)."""
        return self.call("DELETE", f"/packages/{_seg(package_id)}", _nothing)

    # ---------------------------------------------------------------- tasks

    def create_task(
        self,
        package_id: int,
        *,
        dev_ids: Sequence[int] | None = None,
        from_versions: Sequence[str] | None = None,
        signal: int = 0,
        power: int = 0,
        retry: int = 0,
        interval: int = 0,
        start_time: int | None = None,
        deadline: int | None = None,
        on_open: OnOpen = "fail",
    ) -> Call[TaskCreated]:
        """Create an upgrade task for ``dev_ids``, or for every device of the package's product
        at one of ``from_versions``. Times are Unix seconds (``POST /tasks``)."""
        body = _given(
            package_id=package_id,
            dev_ids=None if dev_ids is None else list(dev_ids),
            from_versions=None if from_versions is None else list(from_versions),
            signal=signal,
            power=power,
            retry=retry,
            interval=interval,
            start_time=start_time,
            deadline=deadline,
            on_open=on_open,
        )
        return self.call("POST", "/tasks", _model(TaskCreated), json_body=body)

    def list_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[TaskPage]:
        """One page of tasks with their per-state counts (``GET /tasks``)."""
        params = {
            "pid": pid, "package_id": package_id, "status": status, "limit": limit, "after": after,
        }  # fmt: skip
        return self.call("GET", "/tasks", _model(TaskPage), params=params)

    def iter_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Pages[Task]:
        """Every task that passes the filters, page after page."""
        return Pages(
            lambda after: self.list_tasks(
                pid=pid, package_id=package_id, status=status, limit=page_size, after=after
            )
        )

    def get_task(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[TaskDetail]:
        """A task with its counts and one page of its devices (``devices_next`` continues)
        (``GET /tasks/{id}``)."""
        params = {"state": state, "limit": limit, "after": after}
        return self.call("GET", f"/tasks/{_seg(task_id)}", _model(TaskDetail), params=params)

    def delete_task(self, task_id: int) -> Call[None]:
        """Delete a task without open device tasks; the package stays (``DELETE /tasks/{id}``)."""
        return self.call("DELETE", f"/tasks/{_seg(task_id)}", _nothing)

    def list_task_devices(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[DeviceTaskPage]:
        """One page of a task's devices with state and progress (``GET /tasks/{id}/devices``)."""
        params = {"state": state, "limit": limit, "after": after}
        path = f"/tasks/{_seg(task_id)}/devices"
        return self.call("GET", path, _model(DeviceTaskPage), params=params)

    def iter_task_devices(
        self, task_id: int, *, state: StateName | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Pages[DeviceTaskView]:
        """Every device of a task (in ``state``, if given), page after page."""
        return Pages(
            lambda after: self.list_task_devices(task_id, state=state, limit=page_size, after=after)
        )

    def act_on_task(self, task_id: int, action: Action) -> Call[TaskActionResult]:
        """Pause, resume or cancel every device of a task where the state machine allows it
        (``POST /tasks/{id}/{action}``)."""
        path = f"/tasks/{_seg(task_id)}/{_action(action)}"
        return self.call("POST", path, _model(TaskActionResult))

    def pause_task(self, task_id: int) -> Call[TaskActionResult]:
        """Pause every device of the task that is waiting or downloading (T2)."""
        return self.act_on_task(task_id, "pause")

    def resume_task(self, task_id: int) -> Call[TaskActionResult]:
        """Resume the task's paused devices (T3)."""
        return self.act_on_task(task_id, "resume")

    def cancel_task(self, task_id: int) -> Call[TaskActionResult]:
        """Cancel every open device of the task (T4)."""
        return self.act_on_task(task_id, "cancel")

    def act_on_device_task(self, task_id: int, dev_id: int, action: Action) -> Call[DeviceTaskView]:
        """Pause, resume or cancel one device's part of a task
        (``POST /tasks/{id}/devices/{dev_id}/{action}``)."""
        path = f"/tasks/{_seg(task_id)}/devices/{_seg(dev_id)}/{_action(action)}"
        return self.call("POST", path, _model(DeviceTaskView))

    def pause_device_task(self, task_id: int, dev_id: int) -> Call[DeviceTaskView]:
        """Pause one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "pause")

    def resume_device_task(self, task_id: int, dev_id: int) -> Call[DeviceTaskView]:
        """Resume one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "resume")

    def cancel_device_task(self, task_id: int, dev_id: int) -> Call[DeviceTaskView]:
        """Cancel one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "cancel")

    # ---------------------------------------------------------------- API tokens

    def create_token(self, name: str, *, role: Role = "viewer") -> Call[ApiTokenCreated]:
        """Create API token ``name`` (unique, never reused) with ``role``; its ``secret`` is in
        this reply only (``POST /tokens``, needs an admin token)."""
        body = {"name": name, "role": role}
        return self.call("POST", "/tokens", _model(ApiTokenCreated), json_body=body)

    def list_tokens(
        self, *, limit: int | None = None, after: str | None = None
    ) -> Call[ApiTokenPage]:
        """One page of API tokens, revoked ones included, never their secrets
        (``GET /tokens``, needs an admin token)."""
        params = {"limit": limit, "after": after}
        return self.call("GET", "/tokens", _model(ApiTokenPage), params=params)

    def iter_tokens(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Pages[ApiToken]:
        """Every API token, page after page."""
        return Pages(lambda after: self.list_tokens(limit=page_size, after=after))

    def revoke_token(self, token_id: int) -> Call[None]:
        """Revoke an API token: every request with it fails from now on, on every server
        process (``DELETE /tokens/{id}``, needs an admin token)."""
        return self.call("DELETE", f"/tokens/{_seg(token_id)}", _nothing)

    # ---------------------------------------------------------------- the audit log

    def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[AuditPage]:
        """One page of the audit log, oldest first: who changed what, when, before and after
        (``GET /audit``). Filters: ``actor`` (a token name or ``system:<component>``),
        ``action`` (``product.create``), ``target`` (``task:7``), ``since``/``until`` (Unix
        seconds, inclusive)."""
        params = {
            "actor": actor, "action": action, "target": target, "since": since, "until": until,
            "limit": limit, "after": after,
        }  # fmt: skip
        return self.call("GET", "/audit", _model(AuditPage), params=params)

    def iter_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: int | None = None,
        until: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Pages[AuditEntry]:
        """Every audit entry that passes the filters (see :meth:`list_audit`), oldest first."""
        return Pages(
            lambda after: self.list_audit(
                actor=actor, action=action, target=target, since=since, until=until,
                limit=page_size, after=after,
            )
        )  # fmt: skip

    # ---------------------------------------------------------------- campaigns

    def create_campaign(self, spec: CampaignCreate | Mapping[str, Any]) -> Call[Campaign]:
        """Create a staged campaign, as a draft; refused when its stages cannot be satisfied
        (``POST /campaigns``). ``spec`` is a :class:`CampaignCreate` or its JSON as a mapping."""
        return self.call("POST", "/campaigns", _model(Campaign), json_body=_campaign_body(spec))

    def preview_campaign_spec(self, spec: CampaignCreate | Mapping[str, Any]) -> Call[Preview]:
        """Dry run: each stage's members of the campaign ``spec`` would create, creating nothing
        (``POST /campaigns/preview``)."""
        body = _campaign_body(spec)
        return self.call("POST", "/campaigns/preview", _model(Preview), json_body=body)

    def list_campaigns(
        self,
        *,
        state: CampaignState | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Call[CampaignPage]:
        """One page of campaigns (``GET /campaigns``)."""
        params = {"state": state, "limit": limit, "after": after}
        return self.call("GET", "/campaigns", _model(CampaignPage), params=params)

    def iter_campaigns(
        self, *, state: CampaignState | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Pages[Campaign]:
        """Every campaign (in ``state``, if given), page after page."""
        return Pages(lambda after: self.list_campaigns(state=state, limit=page_size, after=after))

    def get_campaign(self, campaign_id: int) -> Call[CampaignDetail]:
        """A campaign with per-stage counters and its latest events
        (``GET /campaigns/{id}``)."""
        return self.call("GET", f"/campaigns/{_seg(campaign_id)}", _model(CampaignDetail))

    def delete_campaign(self, campaign_id: int) -> Call[None]:
        """Delete a draft or ended campaign; its tasks stay (``DELETE /campaigns/{id}``)."""
        return self.call("DELETE", f"/campaigns/{_seg(campaign_id)}", _nothing)

    def preview_campaign(self, campaign_id: int) -> Call[Preview]:
        """Dry run of a campaign over the devices it matches now
        (``GET /campaigns/{id}/preview``)."""
        return self.call("GET", f"/campaigns/{_seg(campaign_id)}/preview", _model(Preview))

    def list_campaign_events(self, campaign_id: int) -> Call[list[CampaignEvent]]:
        """Every decision and action of a campaign with its numbers, oldest first
        (``GET /campaigns/{id}/events``)."""
        path = f"/campaigns/{_seg(campaign_id)}/events"
        return self.call("GET", path, _campaign_events)

    def act_on_campaign(
        self, campaign_id: int, action: CampaignAction, *, if_version: int | None = None
    ) -> Call[Campaign]:
        """Start, pause, resume, advance or abort a campaign (``POST /campaigns/{id}/{action}``).
        ``if_version``: act only if the campaign is still at this version (else
        :class:`~onenet_ota.management.errors.Conflict`)."""
        path = f"/campaigns/{_seg(campaign_id)}/{_campaign_action(action)}"
        return self.call("POST", path, _model(Campaign), params={"if_version": if_version})

    def start_campaign(self, campaign_id: int, *, if_version: int | None = None) -> Call[Campaign]:
        """Start a draft campaign: its first stage is activated."""
        return self.act_on_campaign(campaign_id, "start", if_version=if_version)

    def pause_campaign(self, campaign_id: int, *, if_version: int | None = None) -> Call[Campaign]:
        """Pause a running campaign and its device tasks."""
        return self.act_on_campaign(campaign_id, "pause", if_version=if_version)

    def resume_campaign(self, campaign_id: int, *, if_version: int | None = None) -> Call[Campaign]:
        """Resume a paused campaign (refused if it would stop again at once)."""
        return self.act_on_campaign(campaign_id, "resume", if_version=if_version)

    def advance_campaign(
        self, campaign_id: int, *, if_version: int | None = None
    ) -> Call[Campaign]:
        """Advance a campaign to its next stage now (finish it after the last)."""
        return self.act_on_campaign(campaign_id, "advance", if_version=if_version)

    def abort_campaign(self, campaign_id: int, *, if_version: int | None = None) -> Call[Campaign]:
        """Abort a campaign and cancel its open device tasks."""
        return self.act_on_campaign(campaign_id, "abort", if_version=if_version)

    def retry_failed_campaign(
        self,
        campaign_id: int,
        *,
        classes: Iterable[FailureClass | FailureClassName] | None = None,
        if_version: int | None = None,
    ) -> Call[Campaign]:
        """Give a campaign's failed members a new task: those of the failure ``classes`` given,
        by default every class (``POST /campaigns/{id}/retry-failed``)."""
        body = {} if classes is None else {"classes": [str(c) for c in classes]}
        path = f"/campaigns/{_seg(campaign_id)}/retry-failed"
        params = {"if_version": if_version}
        return self.call("POST", path, _model(Campaign), json_body=body, params=params)

    def add_campaign_devices(
        self, campaign_id: int, dev_ids: Sequence[int], *, if_version: int | None = None
    ) -> Call[Campaign]:
        """Add devices to a campaign; a running one activates them up to its stage's share
        (``POST /campaigns/{id}/devices``)."""
        path = f"/campaigns/{_seg(campaign_id)}/devices"
        body = {"dev_ids": list(dev_ids)}
        params = {"if_version": if_version}
        return self.call("POST", path, _model(Campaign), json_body=body, params=params)


def _action(action: str) -> str:
    if action not in ("pause", "resume", "cancel"):
        raise ValueError(f"action must be pause, resume or cancel, not {action!r}")
    return action


_CAMPAIGN_ACTIONS: Final[tuple[str, ...]] = get_args(CampaignAction)


def _campaign_action(action: str) -> str:
    if action not in _CAMPAIGN_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(_CAMPAIGN_ACTIONS)}, not {action!r}")
    return action


def _param(value: Any) -> str:
    if isinstance(value, bool):  # no route takes one; str(True) would be "True"
        return "true" if value else "false"
    return str(value)

"""The management side of the platform: accounts, products, devices, packages and tasks, in SQL.

SQLAlchemy Core, one transaction per operation. The models, defined in
:mod:`onenet_ota.management.models` so that the server and its clients share one definition, are
both the inputs (validated against the spec's value formats, §1 and §4.5) and the outputs;
:mod:`onenet_ota.server.admin_api` turns them into JSON and into its OpenAPI document.

Device-task state changes are the statements of :mod:`onenet_ota.server.transitions` (shared with
the device side), which move rows only along the edges of the state tables in
:mod:`onenet_ota.protocol.states`: a bulk pause, resume or cancel is one ``UPDATE ... CASE``, so
every row moves once, atomically (§5.3 T2-T4).

Errors are :class:`AdminError` subclasses, each naming what the caller did wrong:

    AdminError
    ├── NotFound       the addressed object does not exist                    (HTTP 404)
    ├── Conflict       duplicates, D23's one open task, objects still in use   (HTTP 409)
    └── Invalid        a value that breaks the spec's formats or the rules     (HTTP 422)
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, ParamSpec, TypeVar

from pydantic import (
    BaseModel,
)
from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Select,
    SmallInteger,
    and_,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from onenet_ota import auth
from onenet_ota.management.models import (
    DEFAULT_PAGE,
    DEV_ID_MAX,
    FILE_NAME_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_IMPORT,
    MAX_LABELS,
    MAX_PAGE,
    PACKAGE_ID_MAX,
    RESERVED_PIDS,
    STATE_NAMES,
    STATES_BY_NAME,
    TASK_ID_MAX,
    UID_RULE,
    Account,
    AccountAssign,
    AccountCreate,
    Device,
    DeviceCreate,
    DeviceDetail,
    DeviceImport,
    DeviceImportItem,
    DeviceKeyRotate,
    DeviceLabels,
    DeviceTaskHistory,
    DeviceTaskView,
    KeyRotate,
    LabelsSet,
    Package,
    PackageCreate,
    Product,
    ProductCreate,
    StateCounts,
    Task,
    TaskActionResult,
    TaskCreate,
    TaskCreated,
    TaskDetail,
)
from onenet_ota.protocol import values
from onenet_ota.protocol.states import (
    OPEN_STATES,
    Action,
    IllegalTransition,
    TaskState,
)
from onenet_ota.protocol.status import TaskType
from onenet_ota.server import audit, changes, timeline
from onenet_ota.server.blobs import BlobStore, StoredBlob
from onenet_ota.server.db import chunks, is_foreign_key_violation, is_transient, sqlstate
from onenet_ota.server.schema import (
    accounts,
    campaign_devices,
    device_labels,
    device_task_events,
    device_tasks,
    devices,
    packages,
    products,
    tasks,
    tokens,
)
from onenet_ota.server.transitions import (
    ConcurrentChange,
    apply_action,
    apply_bulk,
    create_task,
    expire_deadlines,
    open_task_devices,
)

# The models and limits are the management API's (onenet_ota.management.models); they are named
# here too because the server's modules address them through this one.
__all__ = [
    "DEFAULT_PAGE",
    "DEVICE_STATES",
    "DEV_ID_MAX",
    "FILE_NAME_PATTERN",
    "MAX_IMPORT",
    "MAX_PAGE",
    "PACKAGE_ID_MAX",
    "RESERVED_PIDS",
    "STATES_BY_NAME",
    "STATE_NAMES",
    "TASK_ID_MAX",
    "UID_RULE",
    "Account",
    "AccountAssign",
    "AccountCreate",
    "AdminError",
    "AdminService",
    "Conflict",
    "Device",
    "DeviceCreate",
    "DeviceDetail",
    "DeviceImport",
    "DeviceImportItem",
    "DeviceKeyRotate",
    "DeviceLabels",
    "DeviceTaskHistory",
    "DeviceTaskView",
    "Invalid",
    "KeyRotate",
    "LabelsSet",
    "NotFound",
    "Package",
    "PackageCreate",
    "Page",
    "Product",
    "ProductCreate",
    "StateCounts",
    "Task",
    "TaskActionResult",
    "TaskCreate",
    "TaskCreated",
    "TaskDetail",
    "generate_access_key",
    "label_filter",
    "parse_label",
]

log = logging.getLogger(__name__)

# dev_ids the server generates stay below 2^53 so that JavaScript clients read them exactly; the
# protocol allows up to 2^63-1 (§1) and operator-given ids may use the whole range.
GENERATED_DEV_ID_MAX = 2**53 - 1
_CONFLICT_SAMPLE = 20  # how many offending ids an error message lists
_MAX_ATTEMPTS = 5  # runs of a management call whose transaction the database aborted


# --------------------------------------------------------------------------------------------
# Errors


class AdminError(Exception):
    """A management request that cannot be carried out. ``code`` is a stable machine word."""

    code = "error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class NotFound(AdminError):
    """The addressed account, product, device, package or task does not exist."""

    code = "not_found"


class Conflict(AdminError):
    """The request conflicts with existing state: a duplicate, an open task, an object in use."""

    code = "conflict"


class Invalid(AdminError):
    """A value breaks the spec's formats or the management rules."""

    code = "invalid"


# --------------------------------------------------------------------------------------------
# Models: defined with the management client, so that the server and its clients share them


def column_max(column: Column[Any]) -> int:
    """The largest value an integer column of :mod:`~onenet_ota.server.schema` holds on every
    database: PostgreSQL's INTEGER is 32-bit and refuses more, where SQLite would take it."""
    kind = column.type
    if isinstance(kind, BigInteger):
        return 2**63 - 1
    if isinstance(kind, SmallInteger):
        return 2**15 - 1
    if isinstance(kind, Integer):
        return values.INT32_MAX
    raise TypeError(f"{column} is not an integer column")


# The bound of the timeline's ids, read from its column (the other ids' bounds are in
# management.models, shared with the client).
EVENT_ID_MAX = column_max(device_task_events.c.id)

_DIGITS: Final = re.compile(r"[0-9]+")


def parse_label(text: str) -> tuple[str, str] | None:
    """``key=value`` as a pair, or None when it breaks the label rules."""
    key, sep, value = text.partition("=")
    if not sep or re.fullmatch(LABEL_KEY_PATTERN, key) is None:
        return None
    if re.fullmatch(LABEL_VALUE_PATTERN, value) is None:
        return None
    return key, value


def label_filter(labels: Iterable[tuple[str, str]]) -> ColumnElement[bool]:
    """A condition on ``devices``: the device has every one of ``labels``."""
    conditions = [
        select(device_labels.c.dev_id)
        .where(
            device_labels.c.dev_id == devices.c.dev_id,
            device_labels.c.key == key,
            device_labels.c.value == value,
        )
        .exists()
        for key, value in labels
    ]
    return and_(true(), *conditions)


def generate_access_key() -> str:
    """A new key in OneNET's format: base64 of 32 random bytes, 44 characters (§1)."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list and the cursor of the next (``after=``), None on the last page."""

    items: list[T]
    next: str | None


@dataclass(frozen=True, slots=True)
class CreatedTask:
    """A new task and the dev_ids it targets (what the task push announces, §11)."""

    task: TaskCreated
    dev_ids: list[int]


# --------------------------------------------------------------------------------------------
# The service


def _sample(ids: Iterable[object]) -> str:
    items = sorted(ids, key=str)
    return _listed([str(i) for i in items[:_CONFLICT_SAMPLE]], len(items))


def _listed(shown: Sequence[str], total: int) -> str:
    """``shown`` (the first few of ``total`` items) as a message fragment: "a, b and 3 more"."""
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _page_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_PAGE
    if not 1 <= limit <= MAX_PAGE:
        raise Invalid(f"limit must be between 1 and {MAX_PAGE}")
    return limit


def parse_int(text: str, minimum: int, maximum: int) -> int | None:
    """``text`` as an int in ``minimum..maximum``, or None: ASCII digits only (``str.isdigit``
    and ``int`` also take other scripts' digits and superscripts), at most as many as
    ``maximum`` has, so that no conversion can fail or take long."""
    if _DIGITS.fullmatch(text) is None or len(text) > len(str(maximum)):
        return None
    value = int(text)
    return value if minimum <= value <= maximum else None


def _int_cursor(after: str | None, maximum: int) -> int | None:
    if after is None:
        return None
    cursor = parse_int(after, 0, maximum)
    if cursor is None:
        raise Invalid("after must be the 'next' value of a previous page")
    return cursor


def _version_column(module_type: int) -> Any:
    return devices.c.f_version if module_type == TaskType.FOTA else devices.c.s_version


# The operator-facing status of a whole task before and after each bulk action.
_STATUS_AFTER: dict[Action, str] = {
    Action.PAUSE: "paused",
    Action.RESUME: "active",
    Action.CANCEL: "cancelled",
}
_STATUS_BEFORE: dict[Action, tuple[str, ...]] = {
    Action.PAUSE: ("active",),
    Action.RESUME: ("paused",),
    Action.CANCEL: ("active", "paused"),
}
TERMINAL_CODES = [int(s) for s in TaskState if s.is_terminal]
OPEN_CODES = [int(s) for s in OPEN_STATES]


# What a task's status shows: the stored one (what the operator did), except "finished" for an
# active or paused task whose every device task has ended; a task without devices has not.
TASK_STATUSES: Final = ("active", "paused", "cancelled", "finished")
_OPEN_CODES: Final = [int(state) for state in TaskState if state.is_open]
# What a device is doing now, for the device list's ``state`` filter: the state of its open
# task (D23: at most one per module type), or "idle" without one.
DEVICE_STATES: Final = ("idle", *(STATE_NAMES[TaskState(code)] for code in sorted(_OPEN_CODES)))
# The open-task index's condition written exactly as the index is, so that SQLite sees the
# partial index ``uq_device_tasks_open`` (dev_id first) can answer the device state filter.
_OPEN_INDEX_WHERE: Final = text("device_tasks.state IN (1, 2, 3, 7)")


def _all_ended(counts: dict[str, int]) -> bool:
    """Whether a task's per-state counts show devices, none of them in an open state."""
    open_names = {STATE_NAMES[TaskState(code)] for code in _OPEN_CODES}
    total = sum(counts.values())
    return total > 0 and not any(counts.get(name, 0) for name in open_names)


def _status_is(status: str) -> Any:
    """The SQL condition of a task showing ``status`` (the same rule as ``_all_ended``)."""
    has_devices = exists().where(device_tasks.c.task_id == tasks.c.id)
    has_open = exists().where(
        device_tasks.c.task_id == tasks.c.id, device_tasks.c.state.in_(_OPEN_CODES)
    )
    ended = and_(has_devices, ~has_open)
    if status == "finished":
        return and_(tasks.c.status != "cancelled", ended)
    if status == "cancelled":
        return tasks.c.status == "cancelled"
    return and_(tasks.c.status == status, ~ended)


def _delete_finished(conn: Connection, which: Any) -> None:
    """Delete the finished device tasks matching ``which`` with their download tokens.

    Only finished rows: one that a concurrent request opened meanwhile stays, and its foreign
    key then fails the caller's delete of the parent row (409), never a half-deleted history.
    """
    finished = and_(which, device_tasks.c.state.in_(TERMINAL_CODES))
    timeline.delete_for(conn, select(device_tasks.c.id).where(finished))
    conn.execute(
        delete(tokens).where(tokens.c.device_task_id.in_(select(device_tasks.c.id).where(finished)))
    )
    conn.execute(delete(device_tasks).where(finished))


def _retried(method: Callable[P, T]) -> Callable[P, T]:
    """Run a management call again when PostgreSQL aborted its transaction to break a deadlock
    or a serialisation conflict. Such a transaction was rolled back whole, so running it again
    is safe. Only for calls whose every effect is inside the transaction or undone when it
    fails; the device paths do the same (device_service.py).
    """

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except DBAPIError as exc:
                if attempt == _MAX_ATTEMPTS or not is_transient(exc):
                    raise
                log.info("%s: transaction aborted by the database (%s); running it again",
                         method.__name__, sqlstate(exc))  # fmt: skip
        raise AssertionError("unreachable")  # pragma: no cover

    return run


class AdminService:
    """Management operations over ``engine`` and the package store ``blobs``.

    ``clock`` returns Unix time in seconds; tests inject one. ``on_change`` is called after every
    committed change to device tasks (so a device API can drop cached token lookups).
    """

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self._clock = clock
        self._on_change = on_change

    def _now(self) -> int:
        return int(self._clock())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _audit(
        self,
        conn: Connection,
        action: str,
        target: str,
        before: Any,
        after: Any,
        detail: str | None = None,
    ) -> None:
        """One audit row in ``conn``'s transaction, for :func:`audit.current_actor`. ``before``
        and ``after``: a row, a model, a mapping or None (audit.py redacts the keys)."""
        audit.record(
            conn, actor=audit.current_actor(), action=action, target=target,
            before=_state(before), after=_state(after), detail=detail, now=self._clock(),
        )  # fmt: skip

    @contextlib.contextmanager
    def _tx(self, conflict: str, *, missing: str | None = None) -> Iterator[Connection]:
        """One transaction. A constraint that a concurrent request broke becomes 409: a
        duplicate says ``conflict``; a row referred to that was deleted meanwhile says
        ``missing`` (by default ``conflict`` too: for a delete, the reference *is* the
        conflict)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            if missing is not None and is_foreign_key_violation(exc):
                raise Conflict(missing) from None
            raise Conflict(conflict) from None

    # ---------------------------------------------------------------- products

    @_retried
    def create_product(self, spec: ProductCreate) -> Product:
        """Create a product, generating the pid and/or the access key when not given."""
        access_key = spec.access_key or generate_access_key()
        now = self._now()
        with self._tx("the product already exists") as conn:
            pid = spec.pid
            if pid is None:
                pid = self._unused_key(conn, products.c.pid, "product id")
            elif self._product_exists(conn, pid):
                raise Conflict(f"product {pid} already exists")
            conn.execute(
                insert(products).values(
                    pid=pid, name=spec.name, access_key=access_key, created_at=now
                )
            )
            product = Product(pid=pid, name=spec.name, access_key=access_key, created_at=now)
            self._audit(conn, "product.create", f"product:{pid}", None, product)
        return product

    @classmethod
    def _unused_key(cls, conn: Connection, column: ColumnElement[str], what: str) -> str:
        """A free value of ``column``: OneNET's pids and uids are decimal (§1, §13.3), and nine
        digits look like theirs."""
        for _ in range(20):
            value = str(100_000_000 + secrets.randbelow(900_000_000))
            if not cls._key_exists(conn, column, value):
                return value
        raise Conflict(f"could not find an unused {what}; retry")  # pragma: no cover

    @staticmethod
    def _key_exists(conn: Connection, column: ColumnElement[str], value: str) -> bool:
        return conn.execute(select(column).where(column == value)).first() is not None

    @classmethod
    def _product_exists(cls, conn: Connection, pid: str) -> bool:
        return cls._key_exists(conn, products.c.pid, pid)

    @_retried
    def rotate_product_key(self, pid: str, spec: KeyRotate) -> Product:
        """Replace a product's access key. Devices must then sign with the new key (§3.4)."""
        return _product(self._rotate_key(products.c.pid, pid, "product", spec), access_key=True)

    def _rotate_key(self, column: Column[Any], key: str, kind: str, spec: KeyRotate) -> Any:
        """Give the product or account whose ``column`` is ``key`` a new access key; returns
        its row. Tokens verified with the old key stop working at once, on every worker."""
        table = column.table
        new_key = spec.access_key or generate_access_key()
        with self._tx("concurrent change") as conn:
            old = conn.execute(select(table).where(column == key)).first()
            done = conn.execute(update(table).where(column == key).values(access_key=new_key))
            if done.rowcount == 0:
                raise NotFound(f"{kind} {key} not found")
            row = conn.execute(select(table).where(column == key)).one()
            self._audit(conn, f"{kind}.rotate_key", f"{kind}:{key}", old, row)
            changes.publish(conn, None, self._clock())  # verified Authorization values
        self._changed()
        return row

    def get_product(self, pid: str) -> Product:
        """A product with its device count, without its access key: a key is read only where
        its showing is recorded (:meth:`reveal_product_key`)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(products).where(products.c.pid == pid)).first()
            if row is None:
                raise NotFound(f"product {pid} not found")
            count = conn.execute(
                select(func.count()).select_from(devices).where(devices.c.pid == pid)
            ).scalar_one()
        return _product(row, device_count=count)

    def list_products(self, *, limit: int | None = None, after: str | None = None) -> Page[Product]:
        """Products in pid order, without their keys."""
        size = _page_limit(limit)
        query = select(
            products.c.pid, products.c.name, products.c.created_at, products.c.account_uid
        )
        if after is not None:
            if not values.is_pid(after):
                raise Invalid("after must be the 'next' value of a previous page")
            query = query.where(products.c.pid > after)
        query = query.order_by(products.c.pid).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        items = [_product(r) for r in rows[:size]]
        return Page(items, items[-1].pid if len(rows) > size else None)

    @_retried
    def set_product_account(self, pid: str, uid: str | None) -> Product:
        """Make account ``uid`` the owner of product ``pid``, or none with None (F12).

        Both rows are locked (PostgreSQL), so that a concurrent delete of the account either
        sees the product (409) or commits first (404 here). A change is published on the
        change feed: cached verifications of ``userid`` tokens for the product's devices must
        go on every worker at once.
        """
        now = self._now()
        with self._tx("concurrent change; retry", missing=f"account {uid} went meanwhile") as conn:
            row = conn.execute(
                select(products).where(products.c.pid == pid).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"product {pid} not found")
            if uid is not None and not self._lock_account(conn, uid):
                raise NotFound(f"account {uid} not found")
            old = row
            if row.account_uid != uid:
                conn.execute(update(products).where(products.c.pid == pid).values(account_uid=uid))
                changes.publish(conn, None, now)
            row = conn.execute(select(products).where(products.c.pid == pid)).one()
            action = "product.set_account" if uid is not None else "product.clear_account"
            self._audit(conn, action, f"product:{pid}", old, row)
        self._changed()
        return _product(row)

    # ---------------------------------------------------------------- accounts

    @_retried
    def create_account(self, spec: AccountCreate) -> Account:
        """Create an account, generating the uid and/or the access key when not given."""
        access_key = spec.access_key or generate_access_key()
        now = self._now()
        with self._tx("the account already exists") as conn:
            uid = spec.uid
            if uid is None:
                uid = self._unused_key(conn, accounts.c.uid, "uid")
            elif self._key_exists(conn, accounts.c.uid, uid):
                raise Conflict(f"account {uid} already exists")
            conn.execute(
                insert(accounts).values(
                    uid=uid, name=spec.name, access_key=access_key, created_at=now
                )
            )
            account = Account(uid=uid, name=spec.name, access_key=access_key, created_at=now)
            self._audit(conn, "account.create", f"account:{uid}", None, account)
        return account

    @staticmethod
    def _lock_account(conn: Connection, uid: str) -> bool:
        query = select(accounts.c.uid).where(accounts.c.uid == uid).with_for_update()
        return conn.execute(query).first() is not None

    @_retried
    def rotate_account_key(self, uid: str, spec: KeyRotate) -> Account:
        """Replace an account's access key: ``userid`` tokens signed with the old one stop
        working at once, on every worker (the change feed)."""
        return _account(self._rotate_key(accounts.c.uid, uid, "account", spec), access_key=True)

    def get_account(self, uid: str) -> Account:
        """An account with the number of products it owns, without its access key (see
        :meth:`get_product`)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(accounts).where(accounts.c.uid == uid)).first()
            if row is None:
                raise NotFound(f"account {uid} not found")
            count = conn.execute(
                select(func.count()).select_from(products).where(products.c.account_uid == uid)
            ).scalar_one()
        return _account(row, product_count=count)

    @_retried
    def reveal_product_key(self, pid: str) -> Product:
        """A product with its access key, the showing recorded in the audit log (who, when;
        never the key) in the same transaction: a key is read only where it is recorded."""
        return _product(self._reveal_key(products.c.pid, pid, "product"), access_key=True)

    @_retried
    def reveal_account_key(self, uid: str) -> Account:
        """An account with its access key, the showing audited as :meth:`reveal_product_key`."""
        return _account(self._reveal_key(accounts.c.uid, uid, "account"), access_key=True)

    def _reveal_key(self, column: Column[Any], key: str, kind: str) -> Any:
        with self._tx("concurrent change") as conn:
            row = conn.execute(select(column.table).where(column == key)).first()
            if row is None:
                raise NotFound(f"{kind} {key} not found")
            self._audit(conn, f"{kind}.reveal_key", f"{kind}:{key}", None, None, "access key shown")
        return row

    def list_accounts(self, *, limit: int | None = None, after: str | None = None) -> Page[Account]:
        """Accounts in numeric uid order, without their keys."""
        size = _page_limit(limit)
        # uids are canonical decimals: shorter is smaller, and equal lengths compare as text.
        length = func.length(accounts.c.uid)
        query = select(accounts.c.uid, accounts.c.name, accounts.c.created_at)
        if after is not None:
            if not auth.is_user_id(after):
                raise Invalid("after must be the 'next' value of a previous page")
            query = query.where(
                (length > len(after)) | ((length == len(after)) & (accounts.c.uid > after))
            )
        query = query.order_by(length, accounts.c.uid).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        items = [_account(r) for r in rows[:size]]
        return Page(items, items[-1].uid if len(rows) > size else None)

    @_retried
    def delete_account(self, uid: str) -> None:
        """Delete an account that owns no product (409 names the products it still owns).

        The account row is locked first (PostgreSQL), so a product assigned to it at the same
        time either commits before the check sees it (409) or waits and then finds no account.
        """
        now = self._now()
        with self._tx(f"account {uid} got a product meanwhile; retry") as conn:
            if not self._lock_account(conn, uid):
                raise NotFound(f"account {uid} not found")
            owned = (
                conn.execute(
                    select(products.c.pid)
                    .where(products.c.account_uid == uid)
                    .order_by(products.c.pid)
                    .limit(_CONFLICT_SAMPLE)
                )
                .scalars()
                .all()
            )
            if owned:
                total = conn.execute(
                    select(func.count()).select_from(products).where(products.c.account_uid == uid)
                ).scalar_one()
                noun = "products" if total > 1 else "product"
                raise Conflict(
                    f"account {uid} still owns {noun} {_listed(owned, total)};"
                    " clear their account first",
                    details=[{"products": list(owned), "product_count": total}],
                )
            old = conn.execute(select(accounts).where(accounts.c.uid == uid)).one()
            conn.execute(delete(accounts).where(accounts.c.uid == uid))
            self._audit(conn, "account.delete", f"account:{uid}", old, None)
            # Verified userid tokens of the account are cached by every device API.
            changes.publish(conn, None, now)
        self._changed()

    @_retried
    def delete_product(self, pid: str) -> None:
        """Delete a product that has no devices, packages or tasks left (409 names what is left).

        The product row is locked first (PostgreSQL), so a device or package created for it at
        the same time either commits before the count sees it (409) or waits and then fails its
        foreign key; a foreign-key race that slips through anyway is a 409 too, never a 500.
        """
        now = self._now()
        with self._tx(f"product {pid} got a device, package or task meanwhile; retry") as conn:
            row = conn.execute(
                select(products).where(products.c.pid == pid).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"product {pid} not found")
            left = {
                name: conn.execute(
                    select(func.count()).select_from(table).where(table.c.pid == pid)
                ).scalar_one()
                for name, table in (("devices", devices), ("packages", packages), ("tasks", tasks))
            }
            if any(left.values()):
                what = ", ".join(
                    f"{count} {name if count > 1 else name[:-1]}"
                    for name, count in left.items()
                    if count
                )
                raise Conflict(f"product {pid} still has {what}; delete them first", details=[left])
            conn.execute(delete(products).where(products.c.pid == pid))
            self._audit(conn, "product.delete", f"product:{pid}", row, None)
            # Verified Authorization values of the product are cached by every device API.
            changes.publish(conn, None, now)
        self._changed()

    # ---------------------------------------------------------------- devices

    def create_device(self, spec: DeviceCreate) -> Device:
        """Create one device (given or generated dev_id; optional device key)."""
        page = self._import(
            DeviceImport(pid=spec.pid, devices=[DeviceImportItem(**_item_fields(spec))]),
            "device.create",
        )
        return page[0]

    def import_devices(self, spec: DeviceImport) -> list[Device]:
        """Create every device in ``spec`` or none: duplicates are reported, nothing is written."""
        return self._import(spec, "device.import")

    @_retried
    def _import(self, spec: DeviceImport, action: str) -> list[Device]:
        names = [item.name for item in spec.devices]
        repeated_names = [name for name, n in Counter(names).items() if n > 1]
        if repeated_names:
            raise Invalid(f"device names repeated in the request: {_sample(repeated_names)}")
        given_ids = [item.dev_id for item in spec.devices if item.dev_id is not None]
        repeated_ids = [dev_id for dev_id, n in Counter(given_ids).items() if n > 1]
        if repeated_ids:
            raise Invalid(f"dev_ids repeated in the request: {_sample(repeated_ids)}")
        now = self._now()
        with self._tx(
            "a device with this name or dev_id already exists",
            missing=f"product {spec.pid} was deleted meanwhile",
        ) as conn:
            if not self._product_exists(conn, spec.pid):
                raise Invalid(f"product {spec.pid} does not exist")
            taken_names: set[str] = set()
            for chunk in chunks(names):
                taken_names.update(
                    conn.execute(
                        select(devices.c.name).where(
                            devices.c.pid == spec.pid, devices.c.name.in_(chunk)
                        )
                    ).scalars()
                )
            if taken_names:
                raise Conflict(
                    f"devices already exist in product {spec.pid}: {_sample(taken_names)}",
                    details=[{"name": n} for n in sorted(taken_names)[:_CONFLICT_SAMPLE]],
                )
            taken_ids = self._existing_dev_ids(conn, given_ids)
            if taken_ids:
                raise Conflict(
                    f"dev_ids already in use: {_sample(taken_ids)}",
                    details=[{"dev_id": i} for i in sorted(taken_ids)[:_CONFLICT_SAMPLE]],
                )
            used = set(given_ids)
            generated = iter(
                self._unused_dev_ids(conn, sum(item.dev_id is None for item in spec.devices), used)
            )
            rows: list[dict[str, Any]] = []
            for item in spec.devices:
                dev_id = item.dev_id
                if dev_id is None:
                    dev_id = next(generated)
                used.add(dev_id)
                key = item.device_key
                if item.generate_device_key:
                    key = generate_access_key()
                rows.append(
                    {
                        "dev_id": dev_id,
                        "pid": spec.pid,
                        "name": item.name,
                        "auth_info": item.auth_info or item.name,
                        "device_key": key,
                        "f_version": None,
                        "s_version": None,
                        "created_at": now,
                        "last_seen_at": None,
                    }
                )
            for batch in chunks(rows):
                conn.execute(insert(devices), list(batch))
            label_rows = [
                {"dev_id": row["dev_id"], "key": key, "value": value}
                for row, item in zip(rows, spec.devices, strict=True)
                for key, value in (item.labels or {}).items()
            ]
            for batch in chunks(label_rows):
                conn.execute(insert(device_labels), list(batch))
            if action == "device.create":
                self._audit(conn, action, f"device:{rows[0]['dev_id']}", None, rows[0])
            else:
                created = [{"dev_id": row["dev_id"], "name": row["name"]} for row in rows]
                after = {"pid": spec.pid, "count": len(rows), "devices": created}
                self._audit(conn, action, f"product:{spec.pid}", None, after)
            # Every device API drops what it holds about these dev_ids and the tokens it
            # verified with their keys (a name or dev_id may have been used by a deleted device).
            changes.publish(conn, [row["dev_id"] for row in rows], now)
        return [Device(**row) for row in rows]

    @staticmethod
    def _existing_dev_ids(conn: Connection, dev_ids: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for chunk in chunks(dev_ids):
            found.update(
                conn.execute(select(devices.c.dev_id).where(devices.c.dev_id.in_(chunk))).scalars()
            )
        return found

    def _unused_dev_ids(self, conn: Connection, count: int, reserved: set[int]) -> list[int]:
        """``count`` random dev_ids that no device has and ``reserved`` does not hold, drawn
        together and checked with one query per chunk: a query per id kept the write transaction
        of a 10,000-device import open for over ten seconds on SQLite, long enough for every
        other writer (device reports, the campaign evaluator's lease) to give up with "database
        is locked"."""
        found: list[int] = []
        for _ in range(20):
            wanted = count - len(found)
            if wanted == 0:
                return found
            candidates = {1 + secrets.randbelow(GENERATED_DEV_ID_MAX) for _ in range(wanted)}
            candidates -= reserved
            candidates.difference_update(found)
            taken = self._existing_dev_ids(conn, sorted(candidates))
            found += [dev_id for dev_id in candidates if dev_id not in taken]
        raise Conflict("could not find unused dev_ids; retry")  # pragma: no cover

    def list_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        labels: Sequence[tuple[str, str]] = (),
        state: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Device]:
        """Devices in dev_id order, filtered by product, reported versions, name, labels or
        state (:data:`DEVICE_STATES`; every filter given applies)."""
        size = _page_limit(limit)
        if state is not None and state not in DEVICE_STATES:
            raise Invalid(f"state must be one of {', '.join(DEVICE_STATES)}")
        query = select(devices)
        for key, value in labels:
            # A list of the label's devices from its (key, value) index, walked in dev_id order:
            # a correlated EXISTS would probe every device until a page is found, which for a
            # rare label is the whole fleet.
            query = query.where(
                devices.c.dev_id.in_(
                    select(device_labels.c.dev_id).where(
                        device_labels.c.key == key, device_labels.c.value == value
                    )
                )
            )
        if pid is not None:
            query = query.where(devices.c.pid == pid)
        if f_version is not None:
            query = query.where(devices.c.f_version == f_version)
        if s_version is not None:
            query = query.where(devices.c.s_version == s_version)
        if name_contains:
            escaped = name_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(devices.c.name.like(f"%{escaped}%", escape="\\"))
        cursor = _int_cursor(after, DEV_ID_MAX)
        if cursor is not None:
            query = query.where(devices.c.dev_id > cursor)
        with self.engine.connect() as conn:
            if state == "idle":
                # Devices without an open task: the two dev_id-ordered indexes merged (EXCEPT),
                # one pass with no lookup per device; then the page's rows by their ids.
                open_ids = select(device_tasks.c.dev_id).where(_OPEN_INDEX_WHERE)
                if cursor is not None:
                    open_ids = open_ids.where(device_tasks.c.dev_id > cursor)
                idle = (
                    query.with_only_columns(devices.c.dev_id)
                    .except_(open_ids)
                    .order_by(devices.c.dev_id)
                    .limit(size + 1)
                )
                ids = list(conn.execute(idle).scalars())
                query = select(devices).where(devices.c.dev_id.in_(ids))
            elif state is not None:
                query = query.where(_device_state_filter(conn, state))
            rows = conn.execute(query.order_by(devices.c.dev_id).limit(size + 1)).all()
        items = [Device(**row._mapping) for row in rows[:size]]
        return Page(items, str(items[-1].dev_id) if len(rows) > size else None)

    def get_device(self, dev_id: int) -> DeviceDetail:
        """A device with its task history, newest first."""
        with self.engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.dev_id == dev_id)).first()
            if row is None:
                raise NotFound(f"device {dev_id} not found")
            history = conn.execute(
                select(
                    device_tasks.c.task_id,
                    tasks.c.package_id,
                    device_tasks.c.module_type,
                    packages.c.target,
                    device_tasks.c.state,
                    device_tasks.c.progress,
                    device_tasks.c.result_code,
                    device_tasks.c.updated_at,
                    device_tasks.c.finished_at,
                )
                .join(tasks, tasks.c.id == device_tasks.c.task_id)
                .join(packages, packages.c.id == tasks.c.package_id)
                .where(device_tasks.c.dev_id == dev_id)
                .order_by(device_tasks.c.id.desc())
                .limit(MAX_PAGE)
            ).all()
            labels = self._labels(conn, dev_id)
        return DeviceDetail(
            **row._mapping,
            labels=labels,
            tasks=[
                DeviceTaskHistory(
                    task_id=h.task_id,
                    package_id=h.package_id,
                    module_type=h.module_type,
                    target=h.target,
                    state=STATE_NAMES[TaskState(h.state)],  # type: ignore[arg-type]
                    progress=h.progress,
                    result_code=h.result_code,
                    updated_at=h.updated_at,
                    finished_at=h.finished_at,
                )
                for h in history
            ],
        )

    @staticmethod
    def _labels(conn: Connection, dev_id: int) -> dict[str, str]:
        rows = conn.execute(
            select(device_labels.c.key, device_labels.c.value)
            .where(device_labels.c.dev_id == dev_id)
            .order_by(device_labels.c.key)
        ).all()
        return {r.key: r.value for r in rows}

    @_retried
    def set_device_labels(self, dev_id: int, spec: LabelsSet, *, replace: bool) -> DeviceLabels:
        """Set a device's labels: ``replace`` drops every label not given (PUT); otherwise only
        the given keys change, and a null value removes its key (PATCH). At most 32 labels."""
        with self._tx("concurrent change of the device's labels; retry") as conn:
            found = conn.execute(
                select(devices.c.dev_id).where(devices.c.dev_id == dev_id).with_for_update()
            ).first()
            if found is None:
                raise NotFound(f"device {dev_id} not found")
            labels = {} if replace else self._labels(conn, dev_id)
            for key, value in spec.labels.items():
                if value is None:
                    labels.pop(key, None)
                else:
                    labels[key] = value
            if len(labels) > MAX_LABELS:
                raise Invalid(f"a device has at most {MAX_LABELS} labels")
            conn.execute(delete(device_labels).where(device_labels.c.dev_id == dev_id))
            if labels:
                conn.execute(
                    insert(device_labels),
                    [{"dev_id": dev_id, "key": k, "value": v} for k, v in labels.items()],
                )
        return DeviceLabels(dev_id=dev_id, labels=dict(sorted(labels.items())))

    @_retried
    def device_history(
        self,
        dev_id: int,
        *,
        task_id: int | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[timeline.HistoryEvent]:
        """A page of a device's timeline (:mod:`.timeline`), oldest first, optionally of one
        task; ``after`` is the previous page's ``next``."""
        size = _page_limit(limit)
        cursor = _int_cursor(after, EVENT_ID_MAX)
        with self.engine.connect() as conn:
            found = conn.execute(select(devices.c.dev_id).where(devices.c.dev_id == dev_id))
            if found.first() is None:
                raise NotFound(f"device {dev_id} not found")
            items, more = timeline.device_history(
                conn, dev_id, task_id=task_id, after=cursor, limit=size
            )
        return Page(items, str(items[-1].id) if more and items else None)

    def rotate_device_key(self, dev_id: int, spec: DeviceKeyRotate) -> Device:
        """Give a device a new device key (§3.4, D4): from the commit on, every server process
        refuses the tokens signed with the old key (the change feed tells the others)."""
        key = spec.device_key or generate_access_key()
        with self._tx("concurrent change") as conn:
            old = conn.execute(select(devices).where(devices.c.dev_id == dev_id)).first()
            done = conn.execute(
                update(devices).where(devices.c.dev_id == dev_id).values(device_key=key)
            )
            if done.rowcount == 0:
                raise NotFound(f"device {dev_id} not found")
            row = conn.execute(select(devices).where(devices.c.dev_id == dev_id)).one()
            self._audit(conn, "device.rotate_key", f"device:{dev_id}", old, row)
            # Tokens verified with the old key are cached by every device API.
            changes.publish(conn, [dev_id], self._clock())
        self._changed()
        return Device(**row._mapping)

    @_retried
    def delete_device(self, dev_id: int) -> None:
        """Delete a device with its finished upgrade history (device tasks) and their download
        tokens, all in one transaction. 409 while the device has an open task: cancel it first.

        Concurrency with a request that gives the device a new task (create_task):

        - Deadlines are applied first (T5), in the device paths' lock order (device tasks before
          the device row): an open task past its deadline has failed and does not block.
        - Then the device row is locked (PostgreSQL; SQLite's write transactions are serialised
          already), so an insert of a device task for it waits for this transaction and then
          fails its foreign key (409 for that request), and one that committed first is seen by
          the check for open tasks (409 here).
        - The deletes name only finished device tasks (compare-and-set), so an open one can never
          be deleted by accident: if one were there, deleting the device row would break the
          foreign key, roll everything back and answer 409, never 500.
        """
        now = self._now()
        with self._tx(f"device {dev_id} got a task meanwhile; cancel it first") as conn:
            expire_deadlines(conn, now, dev_id=dev_id)
            row = conn.execute(
                select(devices).where(devices.c.dev_id == dev_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"device {dev_id} not found")
            open_tasks = conn.execute(
                select(device_tasks.c.task_id, device_tasks.c.state)
                .where(device_tasks.c.dev_id == dev_id, device_tasks.c.state.in_(OPEN_CODES))
                .order_by(device_tasks.c.task_id)
            ).all()
            if open_tasks:
                listed = ", ".join(
                    f"task {t.task_id} ({STATE_NAMES[TaskState(t.state)]})" for t in open_tasks
                )
                which = "an open task" if len(open_tasks) == 1 else "open tasks"
                raise Conflict(
                    f"device {dev_id} has {which}: {listed}; cancel it first",
                    details=[
                        {"task_id": t.task_id, "state": STATE_NAMES[TaskState(t.state)]}
                        for t in open_tasks
                    ],
                )
            # A campaign forgets a deleted member (its counts lose the device).
            conn.execute(delete(campaign_devices).where(campaign_devices.c.dev_id == dev_id))
            conn.execute(delete(device_labels).where(device_labels.c.dev_id == dev_id))
            _delete_finished(conn, device_tasks.c.dev_id == dev_id)
            timeline.delete_device(conn, dev_id)
            conn.execute(delete(devices).where(devices.c.dev_id == dev_id))
            self._audit(conn, "device.delete", f"device:{dev_id}", row, None)
            # The device row, its answers and the tokens verified with its key are cached.
            changes.publish(conn, [dev_id], now)
        self._changed()

    # ---------------------------------------------------------------- packages

    def create_package(self, spec: PackageCreate, blob: StoredBlob) -> Package:
        """Record a package whose file was stored as ``blob``.

        The caller stored the file first (content-addressed, atomically). If recording fails
        for any reason, the file is removed again unless another package shares it.
        """
        if blob.size < 1:
            # D9: clamping is undefined for an empty file.
            self.discard_blob_if_unused(blob.sha256)
            raise Invalid("the package file is empty")
        if blob.size > values.PACKAGE_SIZE_MAX:
            # §4.5: the C SDK reads size as a C int.
            self.discard_blob_if_unused(blob.sha256)
            raise Invalid(f"the package file is larger than {values.PACKAGE_SIZE_MAX} bytes")
        try:
            return self._record_package(spec, blob)
        except AdminError:
            self.discard_blob_if_unused(blob.sha256)
            raise
        except Exception:
            # The database failed. Removing needs it too and may fail as well: then an orphaned
            # file is the lesser harm (the next upload of the same content reuses it), and the
            # original error is the one to answer with.
            try:
                self.discard_blob_if_unused(blob.sha256)
            except Exception:
                log.warning("cannot remove the unrecorded upload %s", blob.sha256, exc_info=True)
            raise

    @_retried
    def _record_package(self, spec: PackageCreate, blob: StoredBlob) -> Package:
        now = self._now()
        with self._tx(
            "concurrent change", missing=f"product {spec.pid} was deleted meanwhile"
        ) as conn:
            self._lock_blobs(conn)
            if not self._product_exists(conn, spec.pid):
                raise Invalid(f"product {spec.pid} does not exist")
            if not self.blobs.exists(blob.sha256):
                # A concurrent delete of a package with the same content removed the file
                # after it was written; the upload must be sent again.
                raise Conflict("the uploaded file was removed by a concurrent delete; retry")
            row = conn.execute(
                insert(packages)
                .values(
                    pid=spec.pid,
                    module_type=spec.module_type,
                    kind=spec.kind,
                    from_version=spec.from_version,
                    target=spec.target,
                    manuf=spec.manuf,
                    model=spec.model,
                    file_name=spec.file_name,
                    size=blob.size,
                    md5=blob.md5,
                    sha256=blob.sha256,
                    created_at=now,
                )
                .returning(packages.c.id)
            ).one()
            package = Package(
                id=row.id,
                **spec.model_dump(),
                size=blob.size,
                md5=blob.md5,
                sha256=blob.sha256,
                created_at=now,
            )
            self._audit(conn, "package.create", f"package:{row.id}", None, package)
        return package

    @staticmethod
    def _lock_blobs(conn: Connection) -> None:
        # Package files are shared by content; recording a package and removing an unused file
        # must not interleave. SQLite: the write transaction (BEGIN IMMEDIATE) already excludes
        # others. PostgreSQL: a transaction-level advisory lock.
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x626C6F6273})

    @_retried
    def discard_blob_if_unused(self, sha256: str) -> None:
        """Remove the stored file ``sha256`` if no package refers to it."""
        with self.engine.begin() as conn:
            self._lock_blobs(conn)
            self._remove_unreferenced(conn, sha256)

    def _remove_unreferenced(self, conn: Connection, sha256: str) -> None:
        used = conn.execute(
            select(func.count()).select_from(packages).where(packages.c.sha256 == sha256)
        ).scalar_one()
        if not used:
            self.blobs.delete(sha256)

    def get_package(self, package_id: int) -> Package:
        """One package."""
        with self.engine.connect() as conn:
            row = conn.execute(select(packages).where(packages.c.id == package_id)).first()
        if row is None:
            raise NotFound(f"package {package_id} not found")
        return Package(**row._mapping)

    def list_packages(
        self,
        *,
        pid: str | None = None,
        module_type: int | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Package]:
        """Packages in id order, optionally of one product and/or type."""
        size = _page_limit(limit)
        query = select(packages)
        if pid is not None:
            query = query.where(packages.c.pid == pid)
        if module_type is not None:
            query = query.where(packages.c.module_type == module_type)
        cursor = _int_cursor(after, PACKAGE_ID_MAX)
        if cursor is not None:
            query = query.where(packages.c.id > cursor)
        query = query.order_by(packages.c.id).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        items = [Package(**row._mapping) for row in rows[:size]]
        return Page(items, str(items[-1].id) if len(rows) > size else None)

    def delete_package(self, package_id: int) -> None:
        """Delete a package that no task uses, and its file unless another package shares it.

        The row goes first, in its own committed transaction, and the file after. A crash in
        between leaves a file that no row refers to, which is harmless and removed by
        :meth:`sweep_storage` at the next start; the other order would leave a row whose file is
        gone, and devices offered its tasks would download byte 1 forever.
        """
        sha256 = self._delete_package_row(package_id)
        try:
            self.discard_blob_if_unused(sha256)
        except Exception:
            # The package is deleted; its file waits for the next start-up sweep.
            log.warning("cannot remove the file of deleted package %d", package_id, exc_info=True)

    @_retried
    def _delete_package_row(self, package_id: int) -> str:
        with self._tx(f"package {package_id} is in use") as conn:
            row = conn.execute(select(packages).where(packages.c.id == package_id)).first()
            if row is None:
                raise NotFound(f"package {package_id} not found")
            used_by = conn.execute(
                select(func.count()).select_from(tasks).where(tasks.c.package_id == package_id)
            ).scalar_one()
            if used_by:
                raise Conflict(f"package {package_id} is used by {used_by} task(s)")
            conn.execute(delete(packages).where(packages.c.id == package_id))
            self._audit(conn, "package.delete", f"package:{package_id}", row, None)
        return str(row.sha256)

    def sweep_storage(self, stale_after: float) -> tuple[int, int]:
        """Remove what a crash left in the package store; returns (partial uploads, orphans).

        Partial uploads are files in the store's ``tmp`` unmodified for ``stale_after`` seconds
        (:meth:`BlobStore.sweep_tmp`); orphans are stored files that no package refers to, as
        left by a crash inside :meth:`delete_package`. A file is removed only once it is that old,
        so an upload that another process or host sharing the store has just written, and is
        about to record, stays.
        """
        partial = self.blobs.sweep_tmp(stale_after)
        orphans = 0
        for chunk in chunks(list(self.blobs.stale(stale_after))):
            orphans += self._remove_orphans(chunk, stale_after)
        return partial, orphans

    @_retried
    def _remove_orphans(self, digests: Sequence[str], stale_after: float) -> int:
        removed = 0
        with self.engine.begin() as conn:
            self._lock_blobs(conn)
            used = set(
                conn.execute(
                    select(packages.c.sha256).where(packages.c.sha256.in_(digests))
                ).scalars()
            )
            for sha256 in digests:
                # Stale still? An upload of the same content may have rewritten it meanwhile.
                if sha256 not in used and self.blobs.is_stale(sha256, stale_after):
                    self.blobs.delete(sha256)
                    removed += 1
        return removed

    # ---------------------------------------------------------------- tasks

    @_retried
    def create_task(self, spec: TaskCreate) -> CreatedTask:
        """Create a task and a to-be-upgraded device task per targeted device (T1)."""
        now = self._now()
        start_time = spec.start_time if spec.start_time is not None else now
        if spec.deadline is not None and spec.deadline <= max(start_time, now):
            raise Invalid("deadline must be later than the start time and than now")
        with self._tx(
            "a targeted device got another open task of this type at the same time; retry",
            missing="the package or a targeted device was deleted meanwhile",
        ) as conn:
            # Deadlines first (T5): a device whose open task has expired is not busy any more.
            expire_deadlines(conn, now)
            package = conn.execute(select(packages).where(packages.c.id == spec.package_id)).first()
            if package is None:
                raise Invalid(f"package {spec.package_id} does not exist")
            module_type = package.module_type
            targets = self._select_targets(conn, spec, package.pid, module_type)
            if not targets:
                raise Invalid("no device matches the task's targets")
            busy = open_task_devices(conn, targets, module_type)
            skipped: list[int] = []
            cancelled: list[int] = []
            if busy:
                if spec.on_open == "fail":
                    raise Conflict(
                        f"devices already have an open {TaskType(module_type).name} task "
                        f"(D23; on_open=skip or cancel decides otherwise): {_sample(busy)}",
                        details=[{"dev_id": i} for i in sorted(busy)[:_CONFLICT_SAMPLE]],
                    )
                if spec.on_open == "skip":
                    skipped = sorted(busy)
                    targets = [d for d in targets if d not in busy]
                    if not targets:
                        raise Conflict("every targeted device already has an open task")
                else:
                    cancelled = sorted(busy)
                    self._cancel_open(conn, cancelled, module_type, now)
            task_id = create_task(
                conn,
                pid=package.pid,
                package_id=package.id,
                module_type=module_type,
                signal=spec.signal,
                power=spec.power,
                retry=spec.retry,
                interval=spec.interval,
                start_time=start_time,
                deadline=spec.deadline,
                dev_ids=targets,
                now=now,
            )
            task = self._task(conn, task_id)
            after = {**task.model_dump(), "skipped": skipped, "cancelled": cancelled}
            self._audit(conn, "task.create", f"task:{task_id}", None, after)
            # Everything: T5 above may have moved any device, and E3 answers "no task" are cached.
            changes.publish(conn, None, now)
        self._changed()
        created = TaskCreated(**task.model_dump(), skipped=skipped, cancelled=cancelled)
        return CreatedTask(task=created, dev_ids=targets)

    def _select_targets(
        self, conn: Connection, spec: TaskCreate, pid: str, module_type: int
    ) -> list[int]:
        if spec.dev_ids is not None:
            wanted = list(dict.fromkeys(spec.dev_ids))
            found: set[int] = set()
            for chunk in chunks(wanted):
                found.update(
                    conn.execute(
                        select(devices.c.dev_id).where(
                            devices.c.dev_id.in_(chunk), devices.c.pid == pid
                        )
                    ).scalars()
                )
            missing = [d for d in wanted if d not in found]
            if missing:
                raise Invalid(
                    f"devices not found in product {pid}: {_sample(missing)}",
                    details=[{"dev_id": d} for d in missing[:_CONFLICT_SAMPLE]],
                )
            return wanted
        assert spec.from_versions is not None
        column = _version_column(module_type)
        return list(
            conn.execute(
                select(devices.c.dev_id)
                .where(devices.c.pid == pid, column.in_(spec.from_versions))
                .order_by(devices.c.dev_id)
            ).scalars()
        )

    @staticmethod
    def _cancel_open(conn: Connection, dev_ids: Sequence[int], module_type: int, now: int) -> None:
        for chunk in chunks(dev_ids):
            where = and_(
                device_tasks.c.dev_id.in_(chunk), device_tasks.c.module_type == module_type
            )
            apply_bulk(conn, Action.CANCEL, where, now)  # T4 on the open ones

    def _task_query(self) -> Select[Any]:
        return select(tasks, packages.c.target).join(packages, packages.c.id == tasks.c.package_id)

    def _counts(self, conn: Connection, task_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        counts: dict[int, dict[str, int]] = {task_id: {} for task_id in task_ids}
        for chunk in chunks(task_ids):
            rows = conn.execute(
                select(device_tasks.c.task_id, device_tasks.c.state, func.count())
                .where(device_tasks.c.task_id.in_(chunk))
                .group_by(device_tasks.c.task_id, device_tasks.c.state)
            ).all()
            for task_id, state, count in rows:
                counts[task_id][STATE_NAMES[TaskState(state)]] = count
        return counts

    @staticmethod
    def _task_model(row: Any, counts: dict[str, int]) -> Task:
        data = dict(row._mapping)
        if data["status"] != "cancelled" and _all_ended(counts):
            data["status"] = "finished"
        return Task(**data, total=sum(counts.values()), counts=StateCounts(**counts))

    def _task(self, conn: Connection, task_id: int) -> Task:
        row = conn.execute(self._task_query().where(tasks.c.id == task_id)).first()
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return self._task_model(row, self._counts(conn, [task_id])[task_id])

    def get_task(
        self,
        task_id: int,
        *,
        state: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> TaskDetail:
        """A task with its counts and a page of its devices (optionally of one state)."""
        with self.engine.connect() as conn:
            task = self._task(conn, task_id)
            page = self._task_devices(conn, task_id, state=state, limit=limit, after=after)
        return TaskDetail(**task.model_dump(), devices=page.items, devices_next=page.next)

    def list_task_devices(
        self,
        task_id: int,
        *,
        state: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[DeviceTaskView]:
        """A page of a task's devices with their states and progress."""
        with self.engine.connect() as conn:
            # Only whether the task exists: its counts would read every one of its devices.
            if conn.execute(select(tasks.c.id).where(tasks.c.id == task_id)).first() is None:
                raise NotFound(f"task {task_id} not found")
            return self._task_devices(conn, task_id, state=state, limit=limit, after=after)

    def _task_devices(
        self,
        conn: Connection,
        task_id: int,
        *,
        state: str | None,
        limit: int | None,
        after: str | None,
    ) -> Page[DeviceTaskView]:
        size = _page_limit(limit)
        where = device_tasks.c.task_id == task_id
        if state is not None:
            if state not in STATES_BY_NAME:
                raise Invalid(f"state must be one of {', '.join(STATES_BY_NAME)}")
            where = and_(where, device_tasks.c.state == int(STATES_BY_NAME[state]))
        cursor = _int_cursor(after, DEV_ID_MAX)
        if cursor is not None:
            where = and_(where, device_tasks.c.dev_id > cursor)
        order: ColumnElement[Any] = device_tasks.c.dev_id
        if state is not None:
            matching = conn.execute(
                select(func.count()).select_from(device_tasks).where(where)
            ).scalar_one()
            if matching <= _FEW:
                # Few in this state (the failed ones, say): read them from the (task_id, state)
                # index and sort, rather than walk the whole task in dev_id order (the order by
                # an expression is what keeps SQLite off the dev_id-ordered index).
                order = device_tasks.c.dev_id + 0
        views = self._device_views(conn, where, limit=size + 1, order=order)
        items = views[:size]
        return Page(items, str(items[-1].dev_id) if len(views) > size else None)

    @staticmethod
    def _device_views(
        conn: Connection, where: Any, *, limit: int, order: ColumnElement[Any] | None = None
    ) -> list[DeviceTaskView]:
        rows = conn.execute(
            select(device_tasks, devices.c.name)
            .join(devices, devices.c.dev_id == device_tasks.c.dev_id)
            .where(where)
            .order_by(device_tasks.c.dev_id if order is None else order)
            .limit(limit)
        ).all()
        return [
            DeviceTaskView(
                dev_id=r.dev_id,
                name=r.name,
                state=STATE_NAMES[TaskState(r.state)],  # type: ignore[arg-type]
                paused_from=(
                    STATE_NAMES[TaskState(r.paused_from)]  # type: ignore[arg-type]
                    if r.paused_from is not None
                    else None
                ),
                progress=r.progress,
                result_code=r.result_code,
                updated_at=r.updated_at,
                finished_at=r.finished_at,
            )
            for r in rows
        ]

    def list_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Task]:
        """Tasks in id order with their per-state counts."""
        size = _page_limit(limit)
        query = self._task_query()
        if pid is not None:
            query = query.where(tasks.c.pid == pid)
        if package_id is not None:
            query = query.where(tasks.c.package_id == package_id)
        if status is not None:
            if status not in TASK_STATUSES:
                raise Invalid(f"status must be one of {', '.join(TASK_STATUSES)}")
            query = query.where(_status_is(status))
        cursor = _int_cursor(after, TASK_ID_MAX)
        if cursor is not None:
            query = query.where(tasks.c.id > cursor)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(tasks.c.id).limit(size + 1)).all()
            counts = self._counts(conn, [r.id for r in rows[:size]])
        items = [self._task_model(r, counts[r.id]) for r in rows[:size]]
        return Page(items, str(items[-1].id) if len(rows) > size else None)

    @_retried
    def delete_task(self, task_id: int) -> None:
        """Delete a finished task: its device tasks (the devices' history of it), their download
        tokens and the task row, all in one transaction. The package stays; once no task uses
        it, it can be deleted too. 409 while any device task is open (to-be-upgraded,
        downloading, upgrading, paused): cancel the task first.

        Devices then forget the task completely: the server remembers a task's tokens only as
        long as it keeps the task (§5.6), so its old tokens become unknown (E5 errno 4, E6 byte
        3, E7/E8 errno 1), exactly as tokens that were never issued.

        Concurrency, in the pattern of :meth:`delete_device`:

        - Deadlines are applied first (T5), in the lock order of the other paths (device tasks
          before the task row): an open device task past its deadline has failed and does not
          block.
        - Then the task row is locked (PostgreSQL; SQLite's write transactions are serialised
          already), so a pause, resume or cancel that gets as far as updating the task, or a
          second delete, waits for this one and then finds no task (404).
        - Device requests on a finished device task (a late report, an E5 with an old token)
          only read, and read either the whole task or nothing. The deletes name only finished
          device tasks (compare-and-set): should a row still be referenced (a device task that
          is open after all, a token inserted meanwhile), a foreign key breaks, everything is
          rolled back and the answer is 409, never 500 and never half the rows.
        """
        now = self._now()
        with self._tx(f"task {task_id} changed while it was being deleted; retry") as conn:
            expire_deadlines(conn, now)
            row = conn.execute(
                select(tasks.c.id).where(tasks.c.id == task_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            this_task = device_tasks.c.task_id == task_id
            still_open = and_(this_task, device_tasks.c.state.in_(OPEN_CODES))
            open_count = conn.execute(
                select(func.count()).select_from(device_tasks).where(still_open)
            ).scalar_one()
            if open_count:
                sample = conn.execute(
                    select(device_tasks.c.dev_id, device_tasks.c.state)
                    .where(still_open)
                    .order_by(device_tasks.c.dev_id)
                    .limit(_CONFLICT_SAMPLE)
                ).all()
                listed = _listed(
                    [f"{r.dev_id} ({STATE_NAMES[TaskState(r.state)]})" for r in sample],
                    open_count,
                )
                what = "open device task" if open_count == 1 else "open device tasks"
                raise Conflict(
                    f"task {task_id} has {open_count} {what}: {listed}; cancel the task first",
                    details=[
                        {"dev_id": r.dev_id, "state": STATE_NAMES[TaskState(r.state)]}
                        for r in sample
                    ],
                )
            # Whose cached answers, device rows and download grants mention the task.
            affected = list(
                conn.execute(
                    select(device_tasks.c.dev_id)
                    .where(this_task)
                    .order_by(device_tasks.c.dev_id)
                    .limit(changes.MAX_DEVICES_PER_CHANGE + 1)  # beyond it: "anything"
                ).scalars()
            )
            old = self._task(conn, task_id)
            _delete_finished(conn, this_task)
            conn.execute(delete(tasks).where(tasks.c.id == task_id))
            self._audit(conn, "task.delete", f"task:{task_id}", old, None)
            # T5 above needs no feed row of its own: cached answers and download grants end at
            # the deadline by themselves (device_service.py).
            changes.publish(conn, affected, now)
        self._changed()

    # ---------------------------------------------------------------- task actions

    @_retried
    def act_on_task(self, task_id: int, action: Action) -> TaskActionResult:
        """Pause, resume or cancel every device task of a task where the state table allows it
        (T2, T3, T4). Device tasks where it does not (an upgrading device cannot be paused, a
        finished one cannot be cancelled) are left as they are.
        """
        if action not in _STATUS_AFTER:
            raise Invalid(f"unsupported action {action.name.lower()}")
        now = self._now()
        with self._tx("concurrent change") as conn:
            row = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            if row.status not in _STATUS_BEFORE[action]:
                raise Conflict(f"can't {action.name.lower()} a task that is {row.status}")
            # Deadlines first (T5), so that nothing past its deadline is resumed.
            expire_deadlines(conn, now)
            old = self._task(conn, task_id)
            changed = apply_bulk(conn, action, device_tasks.c.task_id == task_id, now)
            conn.execute(
                update(tasks).where(tasks.c.id == task_id).values(status=_STATUS_AFTER[action])
            )
            task = self._task(conn, task_id)
            self._audit(
                conn, f"task.{action.name.lower()}", f"task:{task_id}", old, task,
                detail=f"{changed} device task(s) changed",
            )  # fmt: skip
            changes.publish(conn, None, now)
        self._changed()
        return TaskActionResult(**task.model_dump(), changed=changed)

    @_retried
    def act_on_device_task(self, task_id: int, dev_id: int, action: Action) -> DeviceTaskView:
        """Pause, resume or cancel one device's part of a task; 409 where the table forbids."""
        if action not in _STATUS_AFTER:
            raise Invalid(f"unsupported action {action.name.lower()}")
        now = self._now()
        where = and_(device_tasks.c.task_id == task_id, device_tasks.c.dev_id == dev_id)
        for _ in range(5):
            try:
                with self._tx("concurrent change") as conn:
                    expire_deadlines(conn, now, dev_id=dev_id)
                    device_task_id = conn.execute(
                        select(device_tasks.c.id).where(where)
                    ).scalar_one_or_none()
                    if device_task_id is None:
                        raise NotFound(f"device {dev_id} is not part of task {task_id}")
                    old = self._device_views(conn, where, limit=1)[0]
                    try:
                        apply_action(conn, device_task_id, action, now)
                    except IllegalTransition as exc:
                        raise Conflict(str(exc)) from None
                    view = self._device_views(conn, where, limit=1)[0]
                    self._audit(
                        conn, f"task.device_{action.name.lower()}",
                        f"task:{task_id}/device:{dev_id}", old, view,
                    )  # fmt: skip
                    changes.publish(conn, [dev_id], now)
            except ConcurrentChange:
                continue  # a device request moved the task meanwhile: read it again
            self._changed()
            return view
        raise Conflict("the device's task keeps changing; retry")


_FEW: Final = 5000
"""Matching rows up to which a filter is driven from its own index and sorted, rather than by
walking the ordered table and probing each row (which stops early only when matches are dense)."""


def _in_state(state: int) -> ColumnElement[bool]:
    # Device tasks in one state, found per task through ix_device_tasks_task_id_state (there
    # are few tasks and many device tasks: one index range each, no scan of the table).
    return and_(device_tasks.c.task_id.in_(select(tasks.c.id)), device_tasks.c.state == state)


def _device_state_filter(conn: Connection, state: str) -> ColumnElement[bool]:
    """A condition on ``devices``: the device is in ``state`` (one of :data:`DEVICE_STATES`).

    A rare state (few devices downloading) is found from the device tasks' index; a common one
    by walking the devices in order, which finds a page within its first rows. ("idle", the
    absence of an open task, is :meth:`AdminService.list_devices`'s own.)
    """
    open_task = select(device_tasks.c.id).where(
        device_tasks.c.dev_id == devices.c.dev_id, _OPEN_INDEX_WHERE
    )
    code = int(STATES_BY_NAME[state])
    count = conn.execute(
        select(func.count()).select_from(device_tasks).where(_in_state(code))
    ).scalar_one()
    if count <= _FEW:
        # The ids of the device tasks come from the index alone; their rows then give the
        # dev_ids (selecting dev_id directly makes SQLite scan every device task instead).
        found = device_tasks.alias("found")
        ids = select(device_tasks.c.id).where(_in_state(code))
        return devices.c.dev_id.in_(select(found.c.dev_id).where(found.c.id.in_(ids)))
    return open_task.where(device_tasks.c.state == code).exists()


def _state(value: Any) -> dict[str, Any] | None:
    """An object's state for the audit log: a model, a row or a mapping as a dict."""
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    mapping = getattr(value, "_mapping", value)
    return dict(mapping)


def _product(row: Any, *, access_key: bool = False, device_count: int | None = None) -> Product:
    return Product(
        pid=row.pid,
        name=row.name,
        access_key=row.access_key if access_key else None,
        created_at=row.created_at,
        account_uid=row.account_uid,
        device_count=device_count,
    )


def _account(row: Any, *, access_key: bool = False, product_count: int | None = None) -> Account:
    return Account(
        uid=row.uid,
        name=row.name,
        access_key=row.access_key if access_key else None,
        created_at=row.created_at,
        product_count=product_count,
    )


def _item_fields(spec: DeviceCreate) -> dict[str, Any]:
    data = spec.model_dump()
    data.pop("pid")
    return data

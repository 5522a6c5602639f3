"""The management API's request and response models: one definition for the server and its clients.

The server (:mod:`onenet_ota.server.admin_service` and :mod:`onenet_ota.server.admin_api`)
validates request bodies with the ``_In`` models and answers with the ``_Out`` models; its OpenAPI
document is generated from them. :mod:`onenet_ota.management.client` reads the same replies into
the same classes. Nothing here imports the server: a script that manages a platform installs
pydantic and httpx2, not the server's database stack.

Request models (``_In``) are strict: JSON ``true`` is not an integer (§2.4), ``"1"`` is not a
number, an unknown key is a typo. Response models (``_Out``) ignore keys they do not know, so an
older client keeps reading a newer server's replies.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
    model_validator,
)

from onenet_ota import auth
from onenet_ota.protocol import values
from onenet_ota.protocol.code_texts import code_name, code_text
from onenet_ota.protocol.dialects import STUDIO_PID
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import PackageKind

__all__ = [
    "DEFAULT_PAGE",
    "DEV_ID_MAX",
    "MAX_IMPORT",
    "MAX_PAGE",
    "MAX_TARGETS",
    "PACKAGE_ID_MAX",
    "RESERVED_PIDS",
    "TASK_ID_MAX",
    "Account",
    "AccountAssign",
    "AccountCreate",
    "AccountPage",
    "Device",
    "DeviceCreate",
    "DeviceDetail",
    "DeviceImport",
    "DeviceImportItem",
    "DeviceKeyRotate",
    "DeviceList",
    "DevicePage",
    "DeviceTaskHistory",
    "DeviceTaskPage",
    "DeviceTaskView",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "KeyRotate",
    "Package",
    "PackageCreate",
    "PackagePage",
    "Product",
    "ProductCreate",
    "ProductPage",
    "StateCounts",
    "StateName",
    "Task",
    "TaskActionResult",
    "TaskCreate",
    "TaskCreated",
    "TaskDetail",
    "TaskPage",
]

MAX_PAGE: Final = 1000
"""The largest page a list answers (``?limit=``)."""
DEFAULT_PAGE: Final = 100
"""The page size when ``?limit=`` is not given."""
MAX_IMPORT: Final = 10_000
"""The most devices one import creates."""
MAX_TARGETS: Final = 100_000
"""The most dev_ids one request names: a task's, a campaign's selector or its added devices."""


# --------------------------------------------------------------------------------------------
# Value types shared by the models


def _whole(pattern: str) -> str:
    # pydantic searches for the pattern; the spec's formats must match the whole value.
    return f"^(?:{pattern})$"


# The bounds of every id the management API accepts: those of the columns that store them (the
# server's tests check that they agree), so that no id the API lets through can overflow a column
# (a database error, not a client's 4xx). PostgreSQL's INTEGER is 32-bit.
DEV_ID_MAX: Final = values.DEV_ID_MAX  # a BIGINT column
PACKAGE_ID_MAX: Final = values.INT32_MAX  # an INTEGER column
TASK_ID_MAX: Final = values.INT32_MAX  # an INTEGER column

# §4.5's file name less '/', which would let a device that saves the file under its name leave
# its directory (the rule that the name is not only dots and spaces is checked in PackageCreate).
FILE_NAME_PATTERN: Final = r"[ !#-.0-\[\]-~]{1,64}"

# Free text: PostgreSQL cannot store NUL in a string, and no field of this API needs one.
NO_NUL: Final = "^[^\\x00]*$"

Pid = Annotated[str, StringConstraints(pattern=_whole(values.PID_RE.pattern))]
UID_RULE: Final = "a decimal 1..2^63-1 without sign or leading zero"


def _check_uid(value: str) -> str:
    # The pattern bounds the digits (for the OpenAPI document too); this adds the value bound.
    if not auth.is_user_id(value):
        raise ValueError(f"must be {UID_RULE}")
    return value


# Exactly the uids a userid token can name (auth.user_resource), each with one spelling.
Uid = Annotated[
    str, StringConstraints(pattern=_whole(auth.USER_ID_RE.pattern)), AfterValidator(_check_uid)
]

RESERVED_PIDS: Final = STUDIO_PID.reserved
"""S1: the classic device paths ``/ota/south/...``, ``/ota/device/version`` and ``/ota/devInfo``
win over Studio's ``/ota/{pid}/...``, so a product with one of these pids could not be reached
by Studio devices. The match is exact: pids are case-sensitive (§1), and so is path matching,
so ``South`` is an ordinary pid."""
# Device labels: free-form ``key=value`` pairs. Keys and values leave out ``=``, ``,`` and ``;``
# so that a label is written the same way in a query (``?label=k=v``), a CSV cell and the CLI.
LABEL_KEY_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
LABEL_VALUE_PATTERN: Final = r"[A-Za-z0-9_.:/@+-]{0,128}"
MAX_LABELS: Final = 32
LabelKey = Annotated[str, StringConstraints(pattern=_whole(LABEL_KEY_PATTERN))]
LabelValue = Annotated[str, StringConstraints(pattern=_whole(LABEL_VALUE_PATTERN))]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]
DeviceName = Annotated[str, StringConstraints(pattern=_whole(values.DEVICE_NAME_RE.pattern))]
Version = Annotated[str, StringConstraints(pattern=_whole(values.VERSION_RE.pattern))]
DevId = Annotated[int, Field(ge=1, le=DEV_ID_MAX)]
PackageId = Annotated[int, Field(ge=1, le=PACKAGE_ID_MAX)]
Int32 = Annotated[int, Field(ge=values.INT32_MIN, le=values.INT32_MAX)]
UnixTime = Annotated[int, Field(ge=0, le=2**62)]
AuthInfo = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=NO_NUL)]
Key = Annotated[str, StringConstraints(max_length=128, pattern=NO_NUL)]
ManufModel = Annotated[str, StringConstraints(pattern=_whole(values.MANUF_MODEL_RE.pattern))]
StateName = Literal[
    "to_be_upgraded", "downloading", "upgrading", "succeeded", "failed", "cancelled", "paused"
]
STATE_NAMES: dict[TaskState, str] = {state: state.name.lower() for state in TaskState}
STATES_BY_NAME: dict[str, TaskState] = {name: state for state, name in STATE_NAMES.items()}


def _check_key(value: str | None) -> str | None:
    """An access key or device key: standard base64 of at least 1 byte, at most 128 chars (§1)."""
    if value is None:
        return None
    if len(value) > 128:
        raise ValueError("a key is at most 128 characters")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a key must be standard base64, e.g. 44 characters for 32 bytes") from None
    if not decoded:
        raise ValueError("a key must not be empty")
    return value


class _In(BaseModel):
    # Strict: JSON true is not an integer (§2.4), "1" is not a number; unknown keys are typos.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# --------------------------------------------------------------------------------------------
# Accounts


class AccountCreate(_In):
    """An account for ``userid/{uid}`` tokens (§13.3, F12). Give ``uid`` and ``access_key`` to
    take over a OneNET account whose devices already sign with them; omit them to have them
    generated."""

    uid: Uid | None = Field(default=None, description=f"{UID_RULE}; generated when omitted")
    access_key: Key | None = Field(default=None, description="base64; generated when omitted")
    name: Annotated[str, StringConstraints(max_length=128, pattern=NO_NUL)] = ""

    @model_validator(mode="after")
    def _key(self) -> AccountCreate:
        _check_key(self.access_key)
        return self


class Account(_Out):
    """An account. ``access_key`` is omitted from lists; ``product_count`` is given when one
    account is shown."""

    uid: str
    name: str
    access_key: str | None = None
    created_at: int
    product_count: int | None = None


class AccountAssign(_In):
    """The account a product is to belong to."""

    uid: Uid = Field(description=f"an existing account's uid: {UID_RULE}")


# --------------------------------------------------------------------------------------------
# Products


class ProductCreate(_In):
    """A product to create. Give ``pid`` and ``access_key`` to take over a product whose devices
    already carry them in firmware (moving a fleet from OneNET); omit them to have them generated.
    """

    pid: Pid | None = Field(default=None, description="1-32 characters [A-Za-z0-9]")
    access_key: Key | None = Field(default=None, description="base64; generated when omitted")
    name: Annotated[str, StringConstraints(max_length=128, pattern=NO_NUL)] = ""

    @field_validator("pid")
    @classmethod
    def _not_reserved(cls, pid: str | None) -> str | None:
        if pid in RESERVED_PIDS:
            raise ValueError(
                f"pid {pid} is reserved: the classic device paths /ota/south/...,"
                " /ota/device/version and /ota/devInfo would hide this product's Studio paths"
                " /ota/{pid}/... (spec S1)"
            )
        return pid

    @model_validator(mode="after")
    def _key(self) -> ProductCreate:
        _check_key(self.access_key)
        return self


class KeyRotate(_In):
    """A key rotation: the new key, or none to have one generated."""

    access_key: Key | None = Field(default=None, description="base64; generated when omitted")

    @model_validator(mode="after")
    def _key(self) -> KeyRotate:
        _check_key(self.access_key)
        return self


class Product(_Out):
    """A product. ``access_key`` is omitted from lists. ``account_uid``: the account that owns
    it (F12), if any."""

    pid: str
    name: str
    access_key: str | None = None
    created_at: int
    account_uid: str | None = None
    device_count: int | None = None


# --------------------------------------------------------------------------------------------
# Devices


class DeviceImportItem(_In):
    """One device: its name, and optionally the dev_id, device key and auth_info it already has."""

    name: DeviceName = Field(description="1-64 characters [A-Za-z0-9_.-], unique in the product")
    dev_id: DevId | None = Field(default=None, description="generated when omitted")
    device_key: Key | None = Field(default=None, description="optional per-device key (base64)")
    generate_device_key: bool = False
    auth_info: AuthInfo | None = Field(default=None, description="E9 lookup string; the name")
    labels: Labels | None = Field(default=None, description="key=value labels")

    @model_validator(mode="after")
    def _key(self) -> DeviceImportItem:
        _check_key(self.device_key)
        if self.device_key is not None and self.generate_device_key:
            raise ValueError("give device_key or generate_device_key, not both")
        return self


class DeviceCreate(DeviceImportItem):
    """A device to create in product ``pid``."""

    pid: Pid


class DeviceKeyRotate(_In):
    """A device key rotation: the new key, or none to have one generated."""

    device_key: str | None = Field(default=None, description="base64; generated when omitted")

    @model_validator(mode="after")
    def _key(self) -> DeviceKeyRotate:
        _check_key(self.device_key)
        return self


class DeviceImport(_In):
    """Many devices of one product, created all together or not at all."""

    pid: Pid
    devices: Annotated[list[DeviceImportItem], Field(min_length=1, max_length=MAX_IMPORT)]


class Device(_Out):
    """A device and the versions it last reported (E1) or declared (E3)."""

    dev_id: int
    pid: str
    name: str
    auth_info: str
    device_key: str | None
    f_version: str | None
    s_version: str | None
    created_at: int
    last_seen_at: int | None


class _WithResultText(_Out):
    """A view with a ``result_code``, shown with its name and text wherever it appears."""

    result_code: int | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_name(self) -> str | None:
        """``result_code``'s short name (``md5 mismatch``), from protocol.code_texts."""
        return code_name(self.result_code)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_text(self) -> str | None:
        """What ``result_code`` means (spec §6.7.1)."""
        return code_text(self.result_code)


class DeviceTaskHistory(_WithResultText):
    """One of a device's upgrades, newest first in :class:`DeviceDetail`."""

    task_id: int
    package_id: int
    module_type: int
    target: str
    state: StateName
    progress: int
    result_code: int | None
    updated_at: int
    finished_at: int | None


class DeviceDetail(Device):
    """A device with its labels and task history."""

    labels: dict[str, str]
    tasks: list[DeviceTaskHistory]


class LabelsSet(_In):
    """Labels to set: PUT replaces every label, PATCH changes the given ones (null removes)."""

    labels: Annotated[dict[LabelKey, LabelValue | None], Field(max_length=MAX_LABELS)]


class DeviceLabels(_Out):
    """A device's labels after a change."""

    dev_id: int
    labels: dict[str, str]


# --------------------------------------------------------------------------------------------
# Packages


class PackageCreate(_In):
    """A package's metadata. The file itself is uploaded separately and measured by the server."""

    pid: Pid
    module_type: Literal[1, 2] = Field(description="1 = FOTA, 2 = SOTA")
    kind: Literal[1, 2] = Field(default=1, description="1 = full, 2 = differential")
    from_version: Version | None = Field(default=None, description="differential packages only")
    target: Version
    manuf: ManufModel | None = None
    model: ManufModel | None = None
    file_name: Annotated[str, StringConstraints(pattern=_whole(FILE_NAME_PATTERN))] = Field(
        description="1-64 printable ASCII characters, no quote, backslash or slash, not only dots"
        " and spaces"
    )

    @model_validator(mode="after")
    def _rules(self) -> PackageCreate:
        if not values.is_file_name(self.file_name):
            raise ValueError(
                "file_name must be 1-64 printable ASCII characters other than '\"' and '\\'"
            )
        # Stricter than §4.5: the name reaches devices in Content-Disposition, and one that saves
        # the file under it must stay in its directory.
        if "/" in self.file_name or self.file_name.strip(" .") == "":
            raise ValueError("file_name must not contain '/' or consist only of dots and spaces")
        if self.kind == int(PackageKind.DIFF) and self.from_version is None:
            raise ValueError("a differential package needs from_version")
        if self.kind == int(PackageKind.FULL) and self.from_version is not None:
            raise ValueError("from_version is for differential packages only")
        return self


class Package(_Out):
    """A stored package. ``size``, ``md5`` and ``sha256`` were computed by the server."""

    id: int
    pid: str
    module_type: int
    kind: int
    from_version: str | None
    target: str
    manuf: str | None
    model: str | None
    file_name: str
    size: int
    md5: str
    sha256: str
    created_at: int


# --------------------------------------------------------------------------------------------
# Tasks


class TaskCreate(_In):
    """An upgrade task for one package.

    Targets: explicit ``dev_ids``, or every device of the package's product whose current version
    for the package's type is one of ``from_versions``. ``on_open`` decides what happens to a
    targeted device that already has an open task of that type (D23): ``fail`` refuses the whole
    request, ``skip`` leaves the device out, ``cancel`` cancels its open task first.
    """

    package_id: PackageId
    dev_ids: Annotated[list[DevId], Field(min_length=1, max_length=MAX_TARGETS)] | None = None
    from_versions: Annotated[list[Version], Field(min_length=1, max_length=100)] | None = None
    signal: Int32 = 0
    power: Int32 = 0
    retry: Int32 = 0
    interval: Int32 = 0
    start_time: UnixTime | None = Field(default=None, description="Unix seconds; default now")
    deadline: UnixTime | None = Field(default=None, description="Unix seconds; open tasks fail")
    on_open: Literal["fail", "skip", "cancel"] = "fail"

    @model_validator(mode="after")
    def _rules(self) -> TaskCreate:
        if (self.dev_ids is None) == (self.from_versions is None):
            raise ValueError("give exactly one of dev_ids and from_versions")
        return self


class StateCounts(_Out):
    """How many of a task's devices are in each state."""

    to_be_upgraded: int = 0
    downloading: int = 0
    upgrading: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    paused: int = 0


class Task(_Out):
    """An operator's task: one package, a set of devices, one policy."""

    id: int
    pid: str
    package_id: int
    module_type: int
    target: str
    signal: int
    power: int
    retry: int
    interval: int
    start_time: int
    deadline: int | None
    # "finished" when every device task has ended (computed: see AdminService._task_model).
    status: Literal["active", "paused", "cancelled", "finished"]
    created_at: int
    total: int
    counts: StateCounts


class DeviceTaskView(_WithResultText):
    """One device's part of a task."""

    dev_id: int
    name: str
    state: StateName
    paused_from: StateName | None
    progress: int
    result_code: int | None
    updated_at: int
    finished_at: int | None


class TaskDetail(Task):
    """A task with the first page of its devices (``devices_next`` continues the list)."""

    devices: list[DeviceTaskView]
    devices_next: str | None


class TaskCreated(Task):
    """A new task. ``skipped``: targeted devices left out because they had an open task
    (``on_open=skip``); ``cancelled``: devices whose open task was cancelled (``on_open=cancel``).
    """

    skipped: list[int]
    cancelled: list[int]


class TaskActionResult(Task):
    """A task after pause, resume or cancel; ``changed`` device tasks moved."""

    changed: int


# --------------------------------------------------------------------------------------------
# Lists and envelopes, named for the OpenAPI document


class ProductPage(BaseModel):
    """A page of products."""

    items: list[Product]
    next: str | None


class AccountPage(BaseModel):
    """A page of accounts."""

    items: list[Account]
    next: str | None


class DevicePage(BaseModel):
    """A page of devices."""

    items: list[Device]
    next: str | None


class DeviceList(BaseModel):
    """Devices created by an import, in request order."""

    items: list[Device]


class PackagePage(BaseModel):
    """A page of packages."""

    items: list[Package]
    next: str | None


class TaskPage(BaseModel):
    """A page of tasks."""

    items: list[Task]
    next: str | None


class DeviceTaskPage(BaseModel):
    """A page of a task's devices."""

    items: list[DeviceTaskView]
    next: str | None


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"]
    version: str


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    """Every error reply."""

    error: ErrorDetail


# --------------------------------------------------------------------------------------------
# Device timelines (server/timeline.py)

EventKind = Literal["offered", "state", "report", "progress", "version"]


class ShortDownload(BaseModel):
    """A success report made while the server had served fewer bytes than the package."""

    model_config = ConfigDict(frozen=True)

    served: int
    size: int


class HistoryEvent(BaseModel):
    """One event of a device's timeline (``GET /devices/{dev_id}/history``)."""

    model_config = ConfigDict(frozen=True)

    id: int
    at_ms: int
    kind: EventKind
    task_id: int | None
    device_task_id: int | None
    dialect: str | None
    endpoint: str | None
    code: int | None
    status_name: str | None
    status_text: str | None
    errno: int | None
    from_state: str | None
    to_state: str | None
    detail: str | None
    short_download: ShortDownload | None = None


class HistoryPage(BaseModel):
    """A page of a device's timeline, oldest first."""

    items: list[HistoryEvent]
    next: str | None


# --------------------------------------------------------------------------------------------
# API tokens (server/api_tokens.py) and the audit log (server/audit.py)

_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RULE: Final = "1-64 characters [A-Za-z0-9_.-], starting with a letter or digit"
Role = Literal["viewer", "operator", "admin"]


class ApiTokenCreate(BaseModel):
    """A token to create: a unique name and a role (viewer unless said)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=f"^(?:{_NAME_PATTERN})$")] = Field(
        description=f"{NAME_RULE}; unique, never reused"
    )
    role: Role = "viewer"


class ApiToken(BaseModel):
    """A token as lists show it: never its secret. ``prefix``: the secret's first characters
    (empty for a secret the operator chose)."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


class ApiTokenCreated(ApiToken):
    """A new token with its secret: shown this once, never again."""

    secret: str


class ApiTokenPage(BaseModel):
    """A page of tokens."""

    items: list[ApiToken]
    next: str | None


class AuditEntry(BaseModel):
    """One audit row: ``actor`` did ``action`` to ``target`` at ``at`` (Unix seconds)."""

    id: int
    at: int
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    detail: str | None


class AuditPage(BaseModel):
    """A page of the audit log, oldest first; ``next`` continues it (``after=``)."""

    items: list[AuditEntry]
    next: str | None


# --------------------------------------------------------------------------------------------
# Staged campaigns (server/campaigns.py, server/campaign_engine.py)

MAX_STAGES: Final = 20


class FailureClass(StrEnum):
    """What a failure code says about the package (module doc)."""

    DEFERRAL = "deferral"
    ENVIRONMENT = "environment"
    PACKAGE = "package"


# The defaults, per status code of §6.7.1 (the success codes 101 and 201 are not failures). A
# failure without a code (T5, the deadline) is ENVIRONMENT; a code not listed here is PACKAGE, the
# cautious choice: an unknown failure may be the package's.


Percent = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]


class StageSpec(BaseModel):
    """One stage: its share of the population and the rules that end it.

    ``percent`` or ``count`` is the stage's **cumulative** share (module doc); ``rest`` takes
    every device left and is allowed for the last stage only. Exactly one of them is given.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    percent: Percent | None = Field(default=None, description="cumulative percent of the devices")
    count: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="cumulative number of devices"
    )
    rest: bool = Field(default=False, description="every device left (last stage only)")
    soak_s: Annotated[int, Field(ge=0, le=30 * 86400)] = Field(
        default=0, description="seconds after activation before the gate may pass"
    )
    min_executed: Annotated[int, Field(ge=0, le=10_000_000)] = Field(
        default=0, description="succeeded + package failures needed before a gate or ratio"
    )
    success_percent: Percent = Field(
        default=100.0, description="succeeded / targeted needed to pass the gate"
    )
    on_success: Literal["advance", "pause"] = "advance"
    max_failed: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="package failures that trip the ceiling"
    )
    max_failed_percent: Percent | None = Field(
        default=None, description="package failures / executed that trip the ceiling"
    )
    on_failure: Literal["pause", "abort"] = "pause"

    @model_validator(mode="after")
    def _one_share(self) -> StageSpec:
        given = sum((self.percent is not None, self.count is not None, self.rest))
        if given != 1:
            raise ValueError("give exactly one of percent, count and rest")
        return self

    def label(self, index: int) -> str:
        """The stage's name for messages: its own name or ``stage N`` (1-based)."""
        return self.name or f"stage {index + 1}"


class DispatchRate(BaseModel):
    """How fast a stage's members get their device task: a rate that starts at ``per_minute``
    and is multiplied by ``growth`` every ``period_s`` seconds, up to ``max_per_minute``.

    The rate restarts when a stage is activated and when the campaign is resumed (a pause
    dispatches nothing, and a resume does not make up for it). Over the ``t`` seconds since then
    the stage may have dispatched ``1 + floor(A(t))`` devices, where ``A(t)`` is the integral of
    the rate (devices per second is ``per_minute / 60``): the first device goes at once, the next
    ones as the integral reaches each whole device. The evaluator dispatches in batches, at each
    of those slots or when it next looks, never more than this. ``growth`` 1 (the default) is a
    constant rate; ``growth`` 2 with ``period_s`` 300 doubles it every five minutes.

    A stage's success gate waits until every member is dispatched; its failure ceiling counts
    the dispatched devices only and may trip at any time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_minute: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = Field(
        description="devices dispatched per minute at the start of a stage"
    )
    growth: Annotated[float, Field(ge=1, le=100, allow_inf_nan=False)] = Field(
        default=1.0, description="factor the rate is multiplied by every period (1: constant)"
    )
    period_s: Annotated[int, Field(ge=1, le=30 * 86400)] = Field(
        default=60, description="seconds between two growths of the rate"
    )
    max_per_minute: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] | None = Field(
        default=None, description="the rate never grows beyond this"
    )

    @model_validator(mode="after")
    def _sensible(self) -> DispatchRate:
        if self.max_per_minute is not None and self.max_per_minute < self.per_minute:
            raise ValueError(
                f"max_per_minute {self.max_per_minute:g} is below the starting rate "
                f"per_minute {self.per_minute:g}"
            )
        if self.max_per_minute is not None and self.growth == 1:
            raise ValueError("max_per_minute caps a growing rate: give growth > 1 with it")
        return self


class _CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Selector(_CampaignIn):
    """Which devices of the package's product a campaign covers: an explicit ``dev_ids`` list,
    or a filter (``from_versions`` of the package's type and every one of ``labels``; an empty
    filter is every device of the product). ``added`` holds devices added later."""

    dev_ids: Annotated[list[DevId], Field(min_length=1, max_length=MAX_TARGETS)] | None = None
    from_versions: Annotated[list[Version], Field(min_length=1, max_length=100)] | None = None
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = Field(
        default_factory=dict
    )
    added: Annotated[list[DevId], Field(max_length=MAX_TARGETS)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> Selector:
        if self.dev_ids is not None and (self.from_versions is not None or self.labels):
            raise ValueError("give dev_ids, or a filter (from_versions, labels), not both")
        return self


class CampaignCreate(_CampaignIn):
    """A staged campaign (see :mod:`onenet_ota.server.campaign_engine` for the rules).

    ``failure_classes`` overrides the class of status codes (``{"207": "environment"}``); the
    device parameters ``signal``, ``power``, ``retry`` and ``interval``, ``start_time`` and
    ``deadline`` are forwarded to the tasks the campaign creates.
    """

    name: Annotated[str, Field(max_length=128)] = ""
    package_id: PackageId
    selector: Selector
    stages: Annotated[list[StageSpec], Field(min_length=1, max_length=MAX_STAGES)]
    failure_classes: dict[Annotated[int, Field(ge=102, le=208)], FailureClass] = Field(
        default_factory=dict
    )
    signal: Int32 = 0
    power: Int32 = 0
    retry: Int32 = 0
    interval: Int32 = 0
    start_time: UnixTime | None = None
    deadline: UnixTime | None = None
    rate: DispatchRate | None = Field(
        default=None, description="dispatch rate of every stage (None: all members at once)"
    )
    dynamic: bool = Field(
        default=False,
        description="devices that come to match the selector while it runs join it",
    )

    @model_validator(mode="after")
    def _dynamic_needs_a_filter(self) -> CampaignCreate:
        if self.dynamic and self.selector.dev_ids is not None:
            raise ValueError(
                "dynamic mode needs a filter selector (from_versions, labels): an explicit "
                "dev_ids list never gains devices"
            )
        return self


class StageView(BaseModel):
    """One stage with its counters (``targeted`` 0 until it is activated)."""

    index: int
    spec: StageSpec
    planned: int  # devices the stage covers, over the current population
    skipped: int  # members left out because they had an open task (D23)
    counts: dict[str, int]


class CampaignEvent(BaseModel):
    """One decision or action, with the numbers behind it."""

    version: int
    at: int
    actor: str = Field(description='"auto" for the evaluator\'s decisions, "operator" for actions')
    by: str | None = Field(
        default=None,
        description="who acted: the API token's name, or system:campaigns for the evaluator "
        "(as in the audit log); null for events recorded before servers kept it",
    )
    action: str
    stage: int
    from_state: str
    to_state: str
    detail: str
    numbers: dict[str, Any]


class Campaign(BaseModel):
    """A campaign and where it stands."""

    id: int
    name: str
    pid: str
    package_id: int
    module_type: int
    selector: Selector
    failure_classes: dict[int, FailureClass]
    signal: int
    power: int
    retry: int
    interval: int
    start_time: int | None
    deadline: int | None
    state: Literal["draft", "running", "paused", "finished", "aborted"]
    stage: int  # the active stage (0-based); -1 before the first one
    stage_started_at: int | None
    activated_stage: int  # the highest stage whose members were activated
    population: int
    version: int
    created_at: int
    updated_at: int
    rate: DispatchRate | None = None
    dynamic: bool = False
    dispatched: int = 0  # devices the current stage's rate has dispatched since it (re)started


class CampaignDetail(Campaign):
    """A campaign with per-stage counters and its latest events, newest first."""

    stages: list[StageView]
    events: list[CampaignEvent]


class StagePreview(BaseModel):
    """A dry run of one stage: how many devices it would activate and which (the first few)."""

    index: int
    name: str
    devices: int
    sample: list[int]


class Preview(BaseModel):
    """What a campaign would do, computed without changing anything."""

    population: int
    stages: list[StagePreview]
    busy: int  # matching devices that have an open task of the type now (they would be skipped)


class DevicesAdd(_CampaignIn):
    """Devices to add to a campaign (they join at the next activation in the stable order)."""

    dev_ids: Annotated[list[DevId], Field(min_length=1, max_length=MAX_TARGETS)]


class RetryFailed(_CampaignIn):
    """Which failed members get a new task: by default every failure class."""

    classes: list[FailureClass] = Field(default_factory=lambda: list(FailureClass))


class CampaignPage(BaseModel):
    """A page of campaigns."""

    items: list[Campaign]
    next: str | None


class CampaignEventList(BaseModel):
    """A campaign's events, oldest first."""

    items: list[CampaignEvent]

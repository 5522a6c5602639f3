"""Events a client reports to its callback: the C SDK's five ``ota_state_t`` events, typed.

The C SDK calls ``evt_cb(state, data, data_len)`` with the raw reply (or the downloaded bytes).
Here the callback receives one event object, which carries the raw reply and the decoded payload.
An event is delivered after its call succeeded and before the call returns; a call that raises
delivers none. An exception raised by the callback propagates to the caller unchanged.

=====================  ==========================  ====================================
``EventKind``          event class                 sent by
=====================  ==========================  ====================================
POST_VERSION (0)       :class:`VersionPosted`      ``post_version`` (E1)
CHECK_TASK (1)         :class:`TaskChecked`        ``check_task`` (E3), ``tasking`` (E4)
CHECK_TOKEN (2)        :class:`TokenChecked`       ``check_token`` (E5)
DOWNLOAD_PACKAGE (3)   :class:`PackageDownloaded`  ``download_range``/``download_package`` (E6)
REPORT_STATUS (4)      :class:`StatusReported`     ``report_status`` (E7), ``report_result`` (E8)
=====================  ==========================  ====================================
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Protocol, TypeAlias

from onenet_ota.protocol.dialects import EndpointSpec
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo

AnyEndpoint: TypeAlias = Endpoint | EndpointSpec


class EventKind(IntEnum):
    """The C SDK's ``enum ota_state_t``, with its values."""

    POST_VERSION = 0
    CHECK_TASK = 1
    CHECK_TOKEN = 2
    DOWNLOAD_PACKAGE = 3
    REPORT_STATUS = 4


@dataclass(frozen=True, slots=True)
class DownloadedChunk:
    """Bytes served by E6 and where they belong in the package.

    ``start`` and ``end`` (inclusive) are the positions the server says it served, ``total`` is
    the package size. ``partial`` is False when the server ignored the Range and sent the whole
    file (200 without Content-Range): then ``start`` is 0 whatever was requested (spec §10).
    """

    data: bytes
    start: int
    end: int
    total: int
    partial: bool = True

    def __repr__(self) -> str:  # keep package bytes out of logs and test output
        return (
            f"DownloadedChunk(<{len(self.data)} bytes>, start={self.start}, end={self.end}, "
            f"total={self.total}, partial={self.partial})"
        )


@dataclass(frozen=True, slots=True)
class VersionPosted:
    """E1 accepted the reported version(s)."""

    kind: ClassVar[EventKind] = EventKind.POST_VERSION
    endpoint: AnyEndpoint
    reply: bytes
    f_version: str | None
    s_version: str | None


@dataclass(frozen=True, slots=True)
class TaskChecked:
    """E3 (or E4) returned a task."""

    kind: ClassVar[EventKind] = EventKind.CHECK_TASK
    endpoint: AnyEndpoint
    reply: bytes
    task: TaskInfo | TidTaskInfo  # TidTaskInfo from Studio's S-C and fuse's F-C


@dataclass(frozen=True, slots=True)
class TokenChecked:
    """E5 accepted the download token; the task is now downloading.

    Studio's S-T and fuse's F-T: ``token`` is empty, ``tid`` names the task and ``status`` is
    the state the platform gave (§5.1).
    """

    kind: ClassVar[EventKind] = EventKind.CHECK_TOKEN
    endpoint: AnyEndpoint
    reply: bytes
    token: str
    tid: int | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class PackageDownloaded:
    """E6 served a chunk. ``chunk.data`` is the C SDK's event data; ``chunk.start`` its offset."""

    kind: ClassVar[EventKind] = EventKind.DOWNLOAD_PACKAGE
    endpoint: AnyEndpoint
    token: str  # empty on Studio and fuse: see tid
    chunk: DownloadedChunk
    tid: int | None = None


@dataclass(frozen=True, slots=True)
class StatusReported:
    """E7 (or E8) accepted a progress value (0-100) or a status code (101-107, 201-208)."""

    kind: ClassVar[EventKind] = EventKind.REPORT_STATUS
    endpoint: AnyEndpoint
    reply: bytes
    token: str  # empty on Studio and fuse: see tid
    code: int
    tid: int | None = None


OtaEvent: TypeAlias = (
    VersionPosted | TaskChecked | TokenChecked | PackageDownloaded | StatusReported
)


class EventCallback(Protocol):
    """The callback of :class:`~onenet_ota.device.OtaClient`: a plain function of one event."""

    def __call__(self, event: OtaEvent, /) -> None: ...


class AsyncEventCallback(Protocol):
    """The callback of :class:`~onenet_ota.device.AsyncOtaClient`: plain or ``async``."""

    def __call__(self, event: OtaEvent, /) -> Awaitable[None] | None: ...

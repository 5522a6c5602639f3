"""The OneNET OTA device SDK: the official C SDK's ``ota_*`` API, in Python.

::

    from onenet_ota.device import Credentials, DeviceConfig, NoTask, OtaClient, StatusCode

    config = DeviceConfig(
        credentials=Credentials.from_access_key("123123", ACCESS_KEY),
        dev_id="987654321",
        version="1.0.0",
    )
    with OtaClient(config) as client:  # ota_init ... ota_deinit
        client.post_version()
        try:
            task = client.check_task()
        except NoTask:
            task = None
        if task is not None:
            package = b""
            while len(package) < task.size:
                client.check_token(task.token)
                package += client.download_package(task.token, len(package), 4096)
            # verify len(package) == task.size and its MD5 == task.md5 before reporting 101
            client.report_status(task.token, StatusCode.DOWNLOADED)

The whole resumable upgrade is one call (:mod:`onenet_ota.device.upgrader`)::

    from onenet_ota.device import FileInstaller, Outcome, Upgrader

    with OtaClient(config) as client:
        result = Upgrader(client, FileInstaller("/opt/fw.bin"), state_dir="/var/lib/ota").run()

:class:`AsyncOtaClient` (and :class:`AsyncUpgrader`) offer the same for asyncio. Errors form one
tree rooted at
:class:`OtaError` (see :mod:`onenet_ota.device.errors`); the client's events are in
:mod:`onenet_ota.device.events`, the upgrader's in :mod:`onenet_ota.device.upgrader`. This
package never imports the server. It logs to ``onenet_ota.device`` and its children (silent
unless the application configures logging) and never logs tokens or keys.
"""

import logging

from onenet_ota.device._core import VersionInfo
from onenet_ota.device.client import AsyncOtaClient, OtaClient
from onenet_ota.device.config import DEFAULT_BASE_URL, Credentials, DeviceConfig, Timeout
from onenet_ota.device.errors import (
    AuthFailed,
    ClientClosedError,
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    InvalidOperation,
    InvalidParameter,
    InvalidState,
    InvalidVersionFormat,
    LocalError,
    ManufModelMismatch,
    NoTask,
    NoValidToken,
    OtaError,
    PlatformError,
    PlatformInternalError,
    ProtocolError,
    RequestTimeout,
    TaskCancelled,
    TaskFinished,
    TaskSucceeded,
    TokenExpired,
    TransportError,
    VersionMismatch,
)
from onenet_ota.device.events import (
    AsyncEventCallback,
    DownloadedChunk,
    EventCallback,
    EventKind,
    OtaEvent,
    PackageDownloaded,
    StatusReported,
    TaskChecked,
    TokenChecked,
    VersionPosted,
)
from onenet_ota.device.install import AsyncInstaller, FileInstaller, Installer, InstallError
from onenet_ota.device.retry import Retry
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    GatePolicy,
    Outcome,
    TokenCheck,
    UpgradeEvent,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
)
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo
from onenet_ota.protocol.status import PackageKind, StatusCode, TaskType

# Library logging stays silent unless the application configures it.
logging.getLogger("onenet_ota.device").addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncEventCallback",
    "AsyncInstaller",
    "AsyncOtaClient",
    "AsyncUpgrader",
    "AuthFailed",
    "ClientClosedError",
    "Credentials",
    "DeviceConfig",
    "Dialect",
    "DownloadError",
    "DownloadErrorCode",
    "DownloadedChunk",
    "Errno",
    "EventCallback",
    "EventKind",
    "FileInstaller",
    "GatePolicy",
    "HTTPStatusError",
    "InstallError",
    "Installer",
    "InvalidArgumentError",
    "InvalidOperation",
    "InvalidParameter",
    "InvalidState",
    "InvalidVersionFormat",
    "LocalError",
    "ManufModelMismatch",
    "NoTask",
    "NoValidToken",
    "OtaClient",
    "OtaError",
    "OtaEvent",
    "Outcome",
    "PackageDownloaded",
    "PackageKind",
    "PlatformError",
    "PlatformInternalError",
    "ProtocolError",
    "RequestTimeout",
    "Retry",
    "StatusCode",
    "StatusReported",
    "TaskCancelled",
    "TaskChecked",
    "TaskFinished",
    "TaskInfo",
    "TaskSucceeded",
    "TaskType",
    "TidTaskInfo",
    "Timeout",
    "TokenCheck",
    "TokenChecked",
    "TokenExpired",
    "TransportError",
    "UpgradeEvent",
    "UpgradeOptions",
    "UpgradeResult",
    "Upgrader",
    "VersionInfo",
    "VersionMismatch",
    "VersionPosted",
]

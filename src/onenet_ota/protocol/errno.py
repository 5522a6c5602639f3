"""Platform errno values of the classic API (spec §4.4) and their texts (decision D2)."""

from __future__ import annotations

from enum import IntEnum


class Errno(IntEnum):
    """errno values of the classic OTA API's ``{"errno","error"}`` envelope (spec §4.4)."""

    SUCC = 0
    AUTH_FAILED = 1
    INVALID_PARAMETER = 2
    NO_VALID_TOKEN = 4
    INTERNAL_ERROR = 7
    MANUF_MODEL_MISMATCH = 8
    VERSION_MISMATCH = 9
    NO_TASK = 11
    TOKEN_EXPIRED = 12
    INVALID_STATE = 17
    TASK_FINISHED = 20
    INVALID_OPERATION = 21
    TASK_CANCELLED = 22
    INVALID_RESULT = 24
    INVALID_DEV_ID = 26
    INVALID_VERSION_FORMAT = 27
    NO_MATCHING_PACKAGE = 32
    QUOTA_EXCEEDED = 5116

    @property
    def text(self) -> str:
        """The ``error`` text this project sends with the errno (D2)."""
        return ERRNO_TEXT[self]


ERRNO_TEXT: dict[Errno, str] = {
    Errno.SUCC: "succ",
    Errno.AUTH_FAILED: "auth failed",
    Errno.INVALID_PARAMETER: "invalid parameter",
    Errno.NO_VALID_TOKEN: "no valid token",
    Errno.INTERNAL_ERROR: "internal error",
    Errno.MANUF_MODEL_MISMATCH: "manuf/model mismatch",
    Errno.VERSION_MISMATCH: "version mismatch",
    Errno.NO_TASK: "no task",
    Errno.TOKEN_EXPIRED: "token expired",
    Errno.INVALID_STATE: "invalid state",
    Errno.TASK_FINISHED: "task finished",
    Errno.INVALID_OPERATION: "invalid operation",
    Errno.TASK_CANCELLED: "task cancelled",
    Errno.INVALID_RESULT: "invalid result",
    Errno.INVALID_DEV_ID: "invalid dev_id",
    Errno.INVALID_VERSION_FORMAT: "invalid version format",
    Errno.NO_MATCHING_PACKAGE: "no matching package",
    Errno.QUOTA_EXCEEDED: "quota exceeded",
}

"""Reply codes of the three dialects (spec §4.4, §12.4, §13.5), and the one vocabulary the shared
rules decide in.

Rules:

1. The rules are shared (one task, every dialect: S10, F14); only the number a device sees
   differs. The shared rules conclude a :class:`Verdict` (JSON endpoints) or a
   :class:`DownloadVerdict` (downloads); each dialect maps verdicts to its own codes here, per
   operation where the number depends on the endpoint.
2. Classic speaks the errno of §4.4 (``Errno``). Studio speaks the same errno with two changes:
   S-C's "no active task" is errno 10 (S4) and a tid not of this device is errno 4 on S-T and
   S-R (S6, S8). Fuse speaks the classic numbers where the field shows no fuse code (F3) and
   10403 / 12012 / 12013 where it does (F2-F4, F6, F7, F9).
3. Download errors: classic sends one raw byte 1-6 (``DownloadError``, §6.6.4). Studio and fuse
   send ``Ota-Errno`` with the new table of §13.5 (:class:`OtaErrno`), whose numbers mean other
   things than classic's bytes (2 is "file not found" there, "size mismatch" in classic).
4. A verdict a dialect cannot produce (a token expiry on a dialect without tokens, a manuf/model
   check where no manuf/model is sent) has no code: :func:`reply_code` raises ``KeyError``, a bug
   in the caller.

Theory of operation. A server handler runs the shared rules (P1-P3 or their path-based twins,
the value checks, the state tables of :mod:`onenet_ota.protocol.states`), gets a verdict,
and asks ``reply_code(dialect, operation, verdict)`` for the number and ``reply_text`` for the
text of its envelope. The state tables speak classic ``Errno``; :func:`verdict_of_errno` turns
their refusals into verdicts. A client reads codes the other way with :func:`verdict_of_code`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Final

from onenet_ota.protocol.download import DownloadError
from onenet_ota.protocol.errno import ERRNO_TEXT, Errno


class Dialect(Enum):
    """The three device APIs this project speaks (§0.1)."""

    CLASSIC = "classic"  # §4-§6, ota.heclouds.com
    STUDIO = "studio"  # §12, studio-ota.heclouds.com ("things-model")
    FUSE = "fuse"  # §13, iot-api.heclouds.com/fuse-ota/


class Operation(Enum):
    """What a device asks, whatever the dialect. ``value`` names the classic endpoint(s)."""

    REPORT_VERSION = "E1"  # S-V, F-V
    QUERY_VERSION = "E2"  # S-Q, F-Q
    CHECK_TASK = "E3"  # S-C, F-C
    TASKING = "E4"  # classic only
    CHECK_STATE = "E5"  # S-T, F-T: token check / task status
    DOWNLOAD = "E6"  # S-D, F-D
    REPORT_STATUS = "E7"  # S-R, F-R
    REPORT_RESULT = "E8"  # classic only
    DEV_INFO = "E9"  # classic only


class Verdict(Enum):
    """What the shared rules concluded about a JSON request, before any dialect numbers it."""

    OK = "ok"
    AUTH_FAILED = "auth_failed"  # P1/P3, S2/S3, F2/F4
    INVALID_PARAMETER = "invalid_parameter"
    INTERNAL_ERROR = "internal_error"
    MANUF_MODEL_MISMATCH = "manuf_model_mismatch"  # D11, classic E3 only
    FROM_VERSION_MISMATCH = "from_version_mismatch"  # D17, S4, F6
    BAD_VERSION_FORMAT = "bad_version_format"  # D17 errno 27
    NO_TASK = "no_task"  # no active task of that type (E3 11, S4 10, F6 12012)
    ALREADY_ON_TARGET = "already_on_target"  # F6: the latest task succeeded with this version
    NOT_RUNNING = "not_running"  # E4: no downloading/upgrading task (D18)
    UNKNOWN_TASK = "unknown_task"  # token never issued or foreign; tid not this device's
    TOKEN_EXPIRED = "token_expired"  # D13, classic E4/E5 only
    INVALID_STATE = "invalid_state"  # §5.4, §5.5
    TASK_FINISHED = "task_finished"
    INVALID_OPERATION = "invalid_operation"
    TASK_CANCELLED = "task_cancelled"
    INVALID_RESULT = "invalid_result"  # D15, E8 only


class DownloadVerdict(Enum):
    """What the shared download rules concluded (D6, S7, F8)."""

    OK = "ok"
    AUTH_FAILED = "auth_failed"  # S2, F2 (classic downloads carry no credential, D5)
    BAD_PARAMETER = "bad_parameter"  # classic s_id (§6.6 step 1)
    UNKNOWN_TASK = "unknown_task"  # token never issued or foreign; tid not this device's
    NOT_DOWNLOADABLE = "not_downloadable"  # expired token, or task not in states 1-3
    PACKAGE_MISSING = "package_missing"
    SIZE_MISMATCH = "size_mismatch"
    READ_FAILED = "read_failed"


class OtaErrno(IntEnum):
    """The ``Ota-Errno`` download header of Studio (§12.3) and fuse (§13.4), table §13.5."""

    OK = 0
    DEVICE_NOT_FOUND = 1
    FILE_NOT_FOUND = 2
    READ_FAILED = 3
    SIZE_MISMATCH = 4
    NOT_DOWNLOADABLE = 5  # "task expired or no longer downloadable"
    AUTH_FAILED = 6

    @property
    def text(self) -> str:
        """§13.5's meaning, used as the ``msg`` of fuse's download error body (F8)."""
        return _OTA_ERRNO_TEXT[self]


_OTA_ERRNO_TEXT: Final = {
    OtaErrno.OK: "succ",
    OtaErrno.DEVICE_NOT_FOUND: "device not found",
    OtaErrno.FILE_NOT_FOUND: "file not found",
    OtaErrno.READ_FAILED: "storage read failure",
    OtaErrno.SIZE_MISMATCH: "size mismatch",
    OtaErrno.NOT_DOWNLOADABLE: "task expired or no longer downloadable",
    OtaErrno.AUTH_FAILED: "authentication failed",
}


class FuseCode(IntEnum):
    """Codes of the fuse envelope (§13.5, F3): classic numbers plus the fuse-specific ones."""

    SUCC = 0
    INVALID_PARAMETER = 2
    INTERNAL_ERROR = 7
    VERSION_MISMATCH = 9
    INVALID_STATE = 17
    TASK_FINISHED = 20
    INVALID_OPERATION = 21
    TASK_CANCELLED = 22
    INVALID_VERSION_FORMAT = 27
    AUTH_FAILED = 10403  # third-party, unconfirmed (§13.5); F2
    NOT_EXIST = 12012  # F-C no task; F-T/F-R tid not this device's (F6, F7, F9)
    TASK_SUCC = 12013  # F-C: already on the latest task's target (F6)


# Studio's only errno outside §4.4 (S4). Its text is this project's wording (D2).
STUDIO_NO_TASK: Final = 10

V = Verdict
E = Errno
# Every classic and Studio JSON endpoint can answer these (§4.4; S2, S3 for Studio's 1).
_COMMON: Final = {
    V.OK: E.SUCC,
    V.AUTH_FAILED: E.AUTH_FAILED,
    V.INVALID_PARAMETER: E.INVALID_PARAMETER,
    V.INTERNAL_ERROR: E.INTERNAL_ERROR,
}
# The refusals of the token check (§5.4) and of reports (§5.5), without token expiry.
_CHECK_REFUSALS: Final = {
    V.INVALID_STATE: E.INVALID_STATE,
    V.TASK_FINISHED: E.TASK_FINISHED,
    V.TASK_CANCELLED: E.TASK_CANCELLED,
}
_REPORT_REFUSALS: Final = {**_CHECK_REFUSALS, V.INVALID_OPERATION: E.INVALID_OPERATION}

# Per dialect and operation: the verdicts it can reach and their numbers. Classic rows are the
# errno lists at the end of each endpoint's section (§6.1-§6.9); Studio's follow S2-S9, fuse's
# F2-F9. DOWNLOAD rows are empty: downloads answer with DOWNLOAD_CODES.
_CLASSIC: Final[dict[Operation, dict[Verdict, int]]] = {
    Operation.REPORT_VERSION: {**_COMMON},  # §6.1
    Operation.QUERY_VERSION: {**_COMMON},  # §6.2
    Operation.CHECK_TASK: {  # §6.3, D17
        **_COMMON,
        V.MANUF_MODEL_MISMATCH: E.MANUF_MODEL_MISMATCH,
        V.FROM_VERSION_MISMATCH: E.VERSION_MISMATCH,
        V.NO_TASK: E.NO_TASK,
        V.BAD_VERSION_FORMAT: E.INVALID_VERSION_FORMAT,
    },
    Operation.TASKING: {  # §6.4, D18
        **_COMMON,
        V.NOT_RUNNING: E.NO_VALID_TOKEN,
        V.TOKEN_EXPIRED: E.TOKEN_EXPIRED,
    },
    Operation.CHECK_STATE: {  # §6.5, §5.4
        **_COMMON,
        V.UNKNOWN_TASK: E.NO_VALID_TOKEN,
        V.TOKEN_EXPIRED: E.TOKEN_EXPIRED,
        **_CHECK_REFUSALS,
    },
    Operation.DOWNLOAD: {},
    Operation.REPORT_STATUS: {  # §6.7, §5.5
        **_COMMON,
        V.UNKNOWN_TASK: E.AUTH_FAILED,  # §6.7 step 2
        **_REPORT_REFUSALS,
    },
    Operation.REPORT_RESULT: {  # §6.8, D15: no progress values, so no 17
        **_COMMON,
        V.UNKNOWN_TASK: E.AUTH_FAILED,  # §6.8 step 2
        V.TASK_FINISHED: E.TASK_FINISHED,
        V.INVALID_OPERATION: E.INVALID_OPERATION,
        V.TASK_CANCELLED: E.TASK_CANCELLED,
        V.INVALID_RESULT: E.INVALID_RESULT,
    },
    Operation.DEV_INFO: {**_COMMON},  # §6.9
}
_STUDIO: Final[dict[Operation, dict[Verdict, int]]] = {
    Operation.REPORT_VERSION: {**_COMMON},  # S9
    Operation.QUERY_VERSION: {**_COMMON},
    Operation.CHECK_TASK: {  # S4 (no manuf/model in Studio, so no 8)
        **_COMMON,
        V.FROM_VERSION_MISMATCH: E.VERSION_MISMATCH,
        V.NO_TASK: STUDIO_NO_TASK,  # the Studio SDK's value; classic uses 11
        V.BAD_VERSION_FORMAT: E.INVALID_VERSION_FORMAT,
    },
    Operation.CHECK_STATE: {  # S6: E5 by state; a tid does not expire
        **_COMMON,
        V.UNKNOWN_TASK: E.NO_VALID_TOKEN,
        **_CHECK_REFUSALS,
    },
    Operation.DOWNLOAD: {},
    Operation.REPORT_STATUS: {  # S8: the E7 table
        **_COMMON,
        V.UNKNOWN_TASK: E.NO_VALID_TOKEN,
        **_REPORT_REFUSALS,
    },
}
_FUSE_COMMON: Final = {
    V.OK: FuseCode.SUCC,
    V.AUTH_FAILED: FuseCode.AUTH_FAILED,  # F2, F4
    V.INVALID_PARAMETER: FuseCode.INVALID_PARAMETER,  # F3, F5
    V.INTERNAL_ERROR: FuseCode.INTERNAL_ERROR,  # F3: classic's number, no field evidence
}
_FUSE: Final[dict[Operation, dict[Verdict, int]]] = {
    Operation.REPORT_VERSION: {**_FUSE_COMMON},  # F5
    Operation.QUERY_VERSION: {**_FUSE_COMMON},
    Operation.CHECK_TASK: {  # F6
        **_FUSE_COMMON,
        V.FROM_VERSION_MISMATCH: FuseCode.VERSION_MISMATCH,  # "other answers as D17"
        V.NO_TASK: FuseCode.NOT_EXIST,
        V.ALREADY_ON_TARGET: FuseCode.TASK_SUCC,
        V.BAD_VERSION_FORMAT: FuseCode.INVALID_VERSION_FORMAT,
    },
    # F7: F-T answers code 0 with the status for every task of the device, terminal ones
    # included, so this server never refuses it by state. §13.5 still lists 20 on F-T (seen from
    # OneNET): the entry stays so that a client reads that answer; the server never produces it.
    Operation.CHECK_STATE: {
        **_FUSE_COMMON,
        V.UNKNOWN_TASK: FuseCode.NOT_EXIST,
        V.TASK_FINISHED: FuseCode.TASK_FINISHED,
    },
    Operation.DOWNLOAD: {},
    Operation.REPORT_STATUS: {  # F9: the E7 table with F3's numbers
        **_FUSE_COMMON,
        V.UNKNOWN_TASK: FuseCode.NOT_EXIST,
        V.INVALID_STATE: FuseCode.INVALID_STATE,
        V.TASK_FINISHED: FuseCode.TASK_FINISHED,
        V.INVALID_OPERATION: FuseCode.INVALID_OPERATION,
        V.TASK_CANCELLED: FuseCode.TASK_CANCELLED,
    },
}

REPLY_CODES: Final[Mapping[Dialect, Mapping[Operation, Mapping[Verdict, int]]]] = MappingProxyType(
    {
        Dialect.CLASSIC: MappingProxyType(
            {
                op: MappingProxyType({v: int(c) for v, c in row.items()})
                for op, row in _CLASSIC.items()
            }
        ),
        Dialect.STUDIO: MappingProxyType(
            {
                op: MappingProxyType({v: int(c) for v, c in row.items()})
                for op, row in _STUDIO.items()
            }
        ),
        Dialect.FUSE: MappingProxyType(
            {op: MappingProxyType({v: int(c) for v, c in row.items()}) for op, row in _FUSE.items()}
        ),
    }
)
"""dialect -> operation -> verdict -> code. An operation missing from a dialect has no endpoint
there; a verdict missing from an operation cannot happen on it."""

# The text sent with each code. Classic texts are D2's; Studio adds its 10; fuse keeps §13.5's
# wording where the field shows one ("task finish", "not exist", "task succ") and classic's
# elsewhere (F3).
_CLASSIC_TEXTS: Final = {int(e): t for e, t in ERRNO_TEXT.items()}
REPLY_TEXTS: Final[Mapping[Dialect, Mapping[int, str]]] = MappingProxyType(
    {
        Dialect.CLASSIC: MappingProxyType(_CLASSIC_TEXTS),
        Dialect.STUDIO: MappingProxyType({**_CLASSIC_TEXTS, STUDIO_NO_TASK: "no task"}),
        Dialect.FUSE: MappingProxyType(
            {
                0: "succ",
                2: "invalid parameter",
                7: "internal error",
                9: "version mismatch",
                17: "invalid state",
                20: "task finish",  # §13.5 (classic: "task finished")
                21: "invalid operation",
                22: "task cancelled",
                27: "invalid version format",
                10403: "auth failed",
                12012: "not exist",
                12013: "task succ",
            }
        ),
    }
)

D = DownloadVerdict
DOWNLOAD_CODES: Final[Mapping[Dialect, Mapping[DownloadVerdict, int]]] = MappingProxyType(
    {
        # §6.6 processing, D6, D7. No AUTH_FAILED: E6 needs no Authorization (D5).
        Dialect.CLASSIC: MappingProxyType(
            {
                D.BAD_PARAMETER: int(DownloadError.BAD_PARAMETER),
                D.UNKNOWN_TASK: int(DownloadError.INVALID_TOKEN),
                D.NOT_DOWNLOADABLE: int(DownloadError.INVALID_TOKEN),
                D.PACKAGE_MISSING: int(DownloadError.NOT_FOUND),
                D.SIZE_MISMATCH: int(DownloadError.SIZE_MISMATCH),
                D.READ_FAILED: int(DownloadError.READ_FAILED),
            }
        ),
        # S7, S2: a tid not of this device is 5, like a task that cannot be downloaded.
        Dialect.STUDIO: MappingProxyType(
            {
                D.OK: int(OtaErrno.OK),
                D.AUTH_FAILED: int(OtaErrno.AUTH_FAILED),
                D.UNKNOWN_TASK: int(OtaErrno.NOT_DOWNLOADABLE),
                D.NOT_DOWNLOADABLE: int(OtaErrno.NOT_DOWNLOADABLE),
                D.PACKAGE_MISSING: int(OtaErrno.FILE_NOT_FOUND),
                D.SIZE_MISMATCH: int(OtaErrno.SIZE_MISMATCH),
                D.READ_FAILED: int(OtaErrno.READ_FAILED),
            }
        ),
        # F8, F2: a tid not of this device is 1 ("device not found").
        Dialect.FUSE: MappingProxyType(
            {
                D.OK: int(OtaErrno.OK),
                D.AUTH_FAILED: int(OtaErrno.AUTH_FAILED),
                D.UNKNOWN_TASK: int(OtaErrno.DEVICE_NOT_FOUND),
                D.NOT_DOWNLOADABLE: int(OtaErrno.NOT_DOWNLOADABLE),
                D.PACKAGE_MISSING: int(OtaErrno.FILE_NOT_FOUND),
                D.SIZE_MISMATCH: int(OtaErrno.SIZE_MISMATCH),
                D.READ_FAILED: int(OtaErrno.READ_FAILED),
            }
        ),
    }
)
"""dialect -> download verdict -> the byte (classic) or ``Ota-Errno`` (Studio, fuse). Classic
success has no code: it is the absence of an error byte."""


def reply_code(dialect: Dialect, operation: Operation, verdict: Verdict) -> int:
    """The code ``dialect`` answers for ``verdict`` on ``operation``.

    Raises ``KeyError`` when the operation has no endpoint in the dialect or the verdict cannot
    happen there (a caller's bug, never a device's).
    """
    row = REPLY_CODES[dialect][operation]
    if verdict not in row:
        raise KeyError(f"{verdict.value} has no code on {dialect.value} {operation.name.lower()}")
    return row[verdict]


def reply_text(dialect: Dialect, code: int) -> str:
    """The envelope text sent with ``code`` (D2, S4, §13.5)."""
    return REPLY_TEXTS[dialect][code]


def download_code(dialect: Dialect, verdict: DownloadVerdict) -> int:
    """The download error byte (classic) or ``Ota-Errno`` (Studio, fuse) for ``verdict``."""
    table = DOWNLOAD_CODES[dialect]
    if verdict not in table:
        raise KeyError(f"{verdict.value} has no download code in {dialect.value}")
    return table[verdict]


_STATE_VERDICTS: Final = {
    Errno.SUCC: V.OK,
    Errno.TOKEN_EXPIRED: V.TOKEN_EXPIRED,
    Errno.INVALID_STATE: V.INVALID_STATE,
    Errno.TASK_FINISHED: V.TASK_FINISHED,
    Errno.INVALID_OPERATION: V.INVALID_OPERATION,
    Errno.TASK_CANCELLED: V.TASK_CANCELLED,
}


def verdict_of_errno(errno: Errno) -> Verdict:
    """The verdict behind an errno of the state tables (§5.4, §5.5): 0, 12, 17, 20, 21, 22."""
    try:
        return _STATE_VERDICTS[errno]
    except KeyError:
        raise ValueError(f"errno {int(errno)} is not an outcome of the state tables") from None


def verdict_of_code(dialect: Dialect, operation: Operation, code: int) -> Verdict | None:
    """The verdict a device should read from ``code`` on ``operation``, or None when the code is
    not one the dialect answers there. Where two verdicts share a number (classic E5's 4 is
    never issued or foreign), the first in :class:`Verdict` order is returned."""
    row = REPLY_CODES[dialect][operation]
    for verdict in Verdict:
        if row.get(verdict) == code:
            return verdict
    return None

"""Progress values and status codes reported by devices (spec §6.7.1), and task types (§1)."""

from __future__ import annotations

from enum import Enum, IntEnum

from onenet_ota.protocol.code_texts import CODE_TEXTS, code_label, code_text


class TaskType(IntEnum):
    """The ``type`` query parameter: which channel an upgrade travels on (spec §1)."""

    FOTA = 1  # module firmware
    SOTA = 2  # application / MCU software


class PackageKind(IntEnum):
    """The ``data.type`` response field: full or differential package (spec §1)."""

    FULL = 1
    DIFF = 2


class StatusCode(IntEnum):
    """Status codes of E7/E8 (spec §6.7.1). 1xx: download phase; 2xx: upgrade phase."""

    DOWNLOADED = 101
    DOWNLOAD_NO_SPACE = 102
    DOWNLOAD_NO_MEMORY = 103
    DOWNLOAD_TIMEOUT = 104
    DOWNLOAD_LOW_BATTERY = 105
    DOWNLOAD_WEAK_SIGNAL = 106
    DOWNLOAD_OTHER = 107
    UPGRADED = 201
    UPGRADE_LOW_BATTERY = 202
    UPGRADE_NO_MEMORY = 203
    UPGRADE_VERSION_MISMATCH = 204
    UPGRADE_MD5_MISMATCH = 205
    UPGRADE_OTHER = 206
    UPGRADE_RETRY_LIMIT = 207
    UPGRADE_EXPIRED = 208

    @property
    def text(self) -> str:
        """What the code means, in the words of spec §6.7.1 (for people; never sent)."""
        return STATUS_TEXT[self]

    @property
    def label(self) -> str:
        """The code with its short name, e.g. ``205 md5 mismatch`` (for people; never sent)."""
        return code_label(self)


# Read from the one table of codes' names and texts (protocol.code_texts); an import-time check
# that it names exactly these codes.
STATUS_TEXT: dict[StatusCode, str] = {code: CODE_TEXTS[code].text for code in StatusCode}
if set(CODE_TEXTS) != set(StatusCode):  # pragma: no cover - a table out of step with the enum
    raise AssertionError("protocol.code_texts must name exactly the StatusCode values")


def status_name(code: int) -> str | None:
    """The text of status code ``code`` (:attr:`StatusCode.text`), or None for another value."""
    return code_text(code)


def describe_status(code: int) -> str:
    """``code`` with its name and meaning for display, e.g.
    ``205 md5 mismatch (upgrade failed: MD5 check failed)``.

    A value that is not a status code (a progress value, or whatever a newer server sends)
    shows as the bare number.
    """
    text = code_text(code)
    return str(code) if text is None else f"{code_label(code)} ({text})"


class ReportKind(Enum):
    """The columns of the report state table (spec §5.5)."""

    PROGRESS = "progress"  # 0-99
    COMPLETE = "complete"  # 100
    DOWNLOADED = "downloaded"  # 101
    DOWNLOAD_FAILED = "download_failed"  # 102-107
    UPGRADED = "upgraded"  # 201
    UPGRADE_FAILED = "upgrade_failed"  # 202-208


def classify_step(step: int) -> ReportKind | None:
    """The report column of an E7 ``step`` value, or None when it is not a valid value (errno 2)."""
    if 0 <= step <= 99:
        return ReportKind.PROGRESS
    if step == 100:
        return ReportKind.COMPLETE
    if step == 101:
        return ReportKind.DOWNLOADED
    if 102 <= step <= 107:
        return ReportKind.DOWNLOAD_FAILED
    if step == 201:
        return ReportKind.UPGRADED
    if 202 <= step <= 208:
        return ReportKind.UPGRADE_FAILED
    return None


def classify_result(result: int) -> ReportKind | None:
    """The report column of an E8 ``result``: status codes only, 0-100 is invalid there (D15)."""
    kind = classify_step(result)
    if kind in (ReportKind.PROGRESS, ReportKind.COMPLETE):
        return None
    return kind


def is_valid_step(step: int) -> bool:
    """Whether ``step`` is a progress value (0-100) or a status code (spec §6.7, step 4)."""
    return classify_step(step) is not None

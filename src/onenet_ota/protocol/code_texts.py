"""Names and texts of the status codes devices report (spec §6.7.1): the one table every place
that shows a code reads (the management API's ``status_name``/``status_text``, the CLI's
``205 md5 mismatch``, the upgrader's log lines, device timelines).

Each entry says where its words come from:

- ``text`` (English): the meaning column of spec §6.7.1, verbatim (201's up to its semicolon:
  what follows, "the platform sets the device's version to the target", is the server's part).
- ``text_zh`` (Chinese, OneNET's console wording): None for every code. Neither the spec nor
  the OneNET C SDK document (``ota_report_status``: "<=100-下载进度，>100-状态码", the only
  wording it has) gives a per-code Chinese text, so none is invented here. The Chinese names of
  the task *states* a code leads to are in spec §5.1 and :data:`STATE_TEXT_ZH`.
- ``name``: this project's short name for people (``205 md5 mismatch``); never sent.
- ``phase`` and ``outcome``: the code's class (1xx download, 2xx upgrade; success or failure),
  and ``state``: the state the report leads to (§6.7.1's "resulting state" column).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "CODE_TEXTS",
    "STATE_TEXT_ZH",
    "CodeText",
    "code_label",
    "code_name",
    "code_text",
]

SPEC_SOURCE: Final = "spec §6.7.1"


@dataclass(frozen=True, slots=True)
class CodeText:
    """One status code of §6.7.1 with its words and class."""

    code: int
    name: str
    text: str
    text_zh: str | None
    phase: Literal["download", "upgrade"]
    outcome: Literal["success", "failure"]
    state: Literal["upgrading", "succeeded", "failed"]
    source: str = SPEC_SOURCE


def _entry(code: int, name: str, text: str) -> CodeText:
    phase: Literal["download", "upgrade"] = "download" if code < 200 else "upgrade"
    success = code in (101, 201)
    state: Literal["upgrading", "succeeded", "failed"] = (
        "upgrading" if code == 101 else "succeeded" if code == 201 else "failed"
    )
    return CodeText(code, name, text, None, phase, "success" if success else "failure", state)


CODE_TEXTS: Final[Mapping[int, CodeText]] = MappingProxyType(
    {
        entry.code: entry
        for entry in (
            _entry(101, "downloaded", "package downloaded"),
            _entry(102, "download no space", "download failed: not enough space"),
            _entry(103, "download no memory", "download failed: out of memory"),
            _entry(104, "download timeout", "download failed: request timed out"),
            _entry(105, "download low battery", "download failed: battery too low"),
            _entry(106, "download weak signal", "download failed: signal too weak"),
            _entry(107, "download failed", "download failed: other error"),
            _entry(201, "upgraded", "upgrade succeeded"),
            _entry(202, "upgrade low battery", "upgrade failed: battery too low"),
            _entry(203, "upgrade no memory", "upgrade failed: out of memory"),
            _entry(204, "version mismatch", "upgrade failed: package version ≠ task target"),
            _entry(205, "md5 mismatch", "upgrade failed: MD5 check failed"),
            _entry(206, "upgrade failed", "upgrade failed: other error"),
            _entry(207, "retry limit", "upgrade failed: retry limit reached"),
            _entry(208, "upgrade expired", "upgrade failed: device upgrade expired"),
        )
    }
)

# The task states' names in OneNET's console (spec §5.1, the table of states), keyed by the
# names the management API uses.
STATE_TEXT_ZH: Final[Mapping[str, str]] = MappingProxyType(
    {
        "to_be_upgraded": "待升级",
        "downloading": "下载中",
        "upgrading": "升级中",
        "succeeded": "升级成功",
        "failed": "升级失败",
        "cancelled": "升级取消",
        "paused": "暂停",
    }
)


def code_name(code: int | None) -> str | None:
    """The short name of status code ``code`` (``"md5 mismatch"``), None for another value."""
    entry = CODE_TEXTS.get(code) if code is not None else None
    return None if entry is None else entry.name


def code_text(code: int | None) -> str | None:
    """The English meaning of status code ``code`` (spec §6.7.1), None for another value."""
    entry = CODE_TEXTS.get(code) if code is not None else None
    return None if entry is None else entry.text


def code_label(code: int) -> str:
    """``code`` with its name for display: ``205 md5 mismatch``; a value that is not a status
    code (a progress value, an errno) is the bare number."""
    name = code_name(code)
    return str(code) if name is None else f"{code} {name}"

"""Decoding device requests, shared by every dialect's endpoints (spec §2.4, §4.5, §6.1, §6.6.1,
§6.7, §12.2, §13.1): the same body and parameter rules, whichever paths carried them.

Pure functions over what a request sent; each answers the classic errno of its refusal, which a
dialect then numbers (:mod:`onenet_ota.protocol.codes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from onenet_ota.protocol import values
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.device_service import Report

__all__ = [
    "Rejected",
    "decode_report",
    "decode_versions",
    "json_object",
    "parse_task_type",
    "pread_all",
    "range_header",
]


class Rejected(Exception):
    """A request answered early with a fixed errno."""

    def __init__(self, errno: Errno) -> None:
        super().__init__(errno.text)
        self.errno = errno


def parse_task_type(value: str | None) -> TaskType:
    """The ``type`` query parameter: exactly 1 or 2 (§4.5); raises :class:`Rejected` (errno 2)."""
    if value == "1":
        return TaskType.FOTA
    if value == "2":
        return TaskType.SOTA
    raise Rejected(Errno.INVALID_PARAMETER)


def json_object(body: bytes) -> dict[str, Any] | None:
    """A UTF-8 JSON object (§2.4), or None."""
    if not body:
        return None
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def decode_versions(body: bytes) -> tuple[str | None, str | None] | None:
    """E1/S-V/F-V's body (D16, S9, F5): ``(f_version, s_version)``, at least one of them a
    version string; None for errno 2."""
    obj = json_object(body)
    if obj is None:
        return None
    found: dict[str, str | None] = {"f_version": None, "s_version": None}
    for key in found:
        if key in obj:
            if not values.is_version(obj[key]):
                return None
            found[key] = obj[key]
    if found["f_version"] is None and found["s_version"] is None:
        return None
    return found["f_version"], found["s_version"]


def decode_report(
    body: bytes,
    key: str,
    classify: Callable[[int], Any],
    body_errno: Errno,
) -> Report | Errno:
    """E7's ``step`` (and S-R's, F-R's) / E8's ``result``: a JSON integer (never a bool, §2.4)
    of a valid kind."""
    obj = json_object(body)
    if obj is None:
        return body_errno
    value = obj.get(key)
    if not values.is_json_int(value):
        return body_errno
    assert isinstance(value, int)
    kind = classify(value)
    if kind is None:
        return Errno.INVALID_PARAMETER  # E7 step 4, E8 step 4
    return Report(kind, value)


def range_header(headers: list[tuple[str, str]]) -> str | None:
    """A download's Range input: the one Range header's value. More than one Range header is
    malformed, served as if none was sent (§6.6.1)."""
    found = None
    for name, value in headers:
        if len(name) == 5 and name.lower() == "range":
            if found is not None:
                return None
            found = value
    return found


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` of an open file; ``OSError`` if it ends before them."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(f"package file ends before byte {offset + length}")
        data += more
    return data

"""Value formats and limits of the classic API (spec §4.5, decision D21) and §1's identifiers."""

from __future__ import annotations

import re

VERSION_RE = re.compile(r"[A-Za-z0-9_.\-]{1,20}")
DEV_ID_RE = re.compile(r"[0-9]{1,19}")
PID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TOKEN_RE = re.compile(r"ota_[A-Za-z0-9]{20}")
MD5_RE = re.compile(r"[0-9a-f]{32}")
IP_PORT_RE = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
FILE_NAME_RE = re.compile(r"[\x20-\x7e]{1,64}")
MANUF_MODEL_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")

DEV_ID_MAX = 2**63 - 1
PACKAGE_SIZE_MAX = 2**31 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
IP_PORT_MAX_LEN = 31  # the C SDK's buffer (spec §8.2 item 9)
TOKEN_LIFETIME_S = 48 * 3600  # D13
TOKEN_PREFIX = "ota_"
TOKEN_RANDOM_LEN = 20


def is_version(value: object) -> bool:
    """1-20 characters ``[A-Za-z0-9_.-]``; versions are opaque exact strings (§4.5)."""
    return isinstance(value, str) and VERSION_RE.fullmatch(value) is not None


def parse_dev_id(value: str | None) -> int | None:
    """A ``dev_id`` query value as an int, or None when it is not 1-19 digits in 1..2^63-1 (P2)."""
    if value is None or DEV_ID_RE.fullmatch(value) is None:
        return None
    dev_id = int(value)
    return dev_id if 1 <= dev_id <= DEV_ID_MAX else None


def is_pid(value: object) -> bool:
    """A product id: 1-32 characters ``[A-Za-z0-9]`` (§1)."""
    return isinstance(value, str) and PID_RE.fullmatch(value) is not None


def is_device_name(value: object) -> bool:
    """A device name: 1-64 characters ``[A-Za-z0-9_.-]`` (§1)."""
    return isinstance(value, str) and DEVICE_NAME_RE.fullmatch(value) is not None


def is_md5(value: object) -> bool:
    """32 lower-case hex digits (§4.5)."""
    return isinstance(value, str) and MD5_RE.fullmatch(value) is not None


def is_ip_port(value: object) -> bool:
    """``host`` or ``host:port``, at most 31 characters (§4.5, D10)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= IP_PORT_MAX_LEN
        and IP_PORT_RE.fullmatch(value) is not None
    )


def is_file_name(value: object) -> bool:
    """1-64 printable ASCII characters other than ``"`` and ``\\`` (§4.5)."""
    return (
        isinstance(value, str)
        and FILE_NAME_RE.fullmatch(value) is not None
        and '"' not in value
        and "\\" not in value
    )


def is_int32(value: object) -> bool:
    """A JSON integer (never a bool, §2.4) in the signed 32-bit range (§4.5)."""
    return type(value) is int and INT32_MIN <= value <= INT32_MAX


def is_json_int(value: object) -> bool:
    """A JSON integer. ``True``/``False`` are not integers on this wire (§2.4)."""
    return type(value) is int


def parse_cdn(value: str | None) -> bool | None:
    """The ``cdn`` query value: true/false in any case, absent is False; None if invalid (D10)."""
    if value is None:
        return False
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None

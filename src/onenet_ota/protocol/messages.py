"""JSON bodies: the classic errno envelope (§4.3), E3/E4's task data (§6.3), and the task data of
the Studio and fuse check and status calls (§12.2, §13.1), which name the task by ``tid``.

Encoding is canonical (compact, fixed key order, D26); decoding is strict about JSON types, since
the C SDK crashes on a number where it expects a string (§8.2 item 8) and ``bool`` is not an int.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from onenet_ota.protocol import values
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.status import PackageKind

MAX_JSON_RESPONSE = 512  # status line + headers + body, C SDK receive buffer (§8.2 item 4)
MAX_JSON_REQUEST_BODY = 4096  # larger bodies on JSON endpoints get 413 (§4.3)


class WireFormatError(ValueError):
    """A body that does not have the form the protocol requires."""


def dumps(obj: object) -> bytes:
    """Compact JSON: no spaces, no trailing newline (§2.5)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode_envelope(errno: Errno, data: dict[str, Any] | None = None) -> bytes:
    """``{"errno":N,"error":"text"[,"data":{...}]}`` (§4.3, D2)."""
    body: dict[str, Any] = {"errno": int(errno), "error": errno.text}
    if data is not None:
        body["data"] = data
    return dumps(body)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded response envelope. ``errno`` is kept as an int: unknown values are possible."""

    errno: int
    error: str
    data: dict[str, Any] | None


def decode_envelope(body: bytes) -> Envelope:
    """Decode a JSON endpoint's reply; raises :class:`WireFormatError` when it is not one."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"reply is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireFormatError("reply is not a JSON object")
    errno = obj.get("errno")
    if not isinstance(errno, int) or not values.is_json_int(errno):
        raise WireFormatError("reply has no integer 'errno'")
    error = obj.get("error", "")
    if not isinstance(error, str):
        raise WireFormatError("reply's 'error' is not a string")
    data = obj.get("data")
    if data is not None and not isinstance(data, dict):
        raise WireFormatError("reply's 'data' is not an object")
    return Envelope(errno=errno, error=error, data=data)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """An upgrade task as E3 and E4 describe it (spec §6.3, the C SDK's ``ota_task_info_t``).

    ``signal``, ``power``, ``retry`` and ``interval`` are advisory: the device enforces them.
    ``kind`` is the package kind (the response's ``type`` field), not the task type.
    """

    target: str
    token: str
    size: int
    md5: str
    signal: int = 0
    power: int = 0
    retry: int = 0
    interval: int = 0
    kind: PackageKind = PackageKind.FULL
    ip_port: str | None = None

    def to_data(self) -> dict[str, Any]:
        """The ``data`` object in the field order of §6.3's table."""
        data: dict[str, Any] = {
            "target": self.target,
            "token": self.token,
            "size": self.size,
            "md5": self.md5,
            "signal": self.signal,
            "power": self.power,
            "retry": self.retry,
            "interval": self.interval,
            "type": int(self.kind),
        }
        if self.ip_port is not None:
            data["ipPort"] = self.ip_port
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> TaskInfo:
        """Parse E3/E4 ``data``; raises :class:`WireFormatError` naming the first bad field."""

        def string(name: str, check: Any = None) -> str:
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise WireFormatError(f"'{name}' is missing or not a string")
            if check is not None and not check(value):
                raise WireFormatError(f"'{name}' has an invalid value {value!r}")
            return value

        def integer(name: str, *, required: bool = False) -> int:
            if name not in data and not required:
                return 0
            value = data.get(name)
            if not values.is_int32(value):
                raise WireFormatError(f"'{name}' is missing or not a 32-bit integer")
            assert isinstance(value, int)
            return value

        size = integer("size", required=True)
        if not 1 <= size <= values.PACKAGE_SIZE_MAX:
            raise WireFormatError(f"'size' {size} is out of range")
        kind_value = integer("type") or 1
        try:
            kind = PackageKind(kind_value)
        except ValueError:
            raise WireFormatError(f"'type' {kind_value} is not a package kind") from None
        ip_port = data.get("ipPort")
        if ip_port is not None and not values.is_ip_port(ip_port):
            raise WireFormatError(f"'ipPort' has an invalid value {ip_port!r}")
        md5 = string("md5").lower()
        if not values.is_md5(md5):
            raise WireFormatError(f"'md5' has an invalid value {md5!r}")
        return cls(
            target=string("target"),
            token=string("token", lambda t: "/" not in t and len(t) <= 64),
            size=size,
            md5=md5,
            signal=integer("signal"),
            power=integer("power"),
            retry=integer("retry"),
            interval=integer("interval"),
            kind=kind,
            ip_port=ip_port,
        )


def version_body(f_version: str | None, s_version: str | None) -> dict[str, str]:
    """E1's body: only the keys whose versions are known (§6.1)."""
    body: dict[str, str] = {}
    if f_version is not None:
        body["f_version"] = f_version
    if s_version is not None:
        body["s_version"] = s_version
    if not body:
        raise ValueError("E1 needs at least one of f_version and s_version")
    return body


TID_MAX = 2**31 - 1  # §12.2


@dataclass(frozen=True, slots=True)
class TidTaskInfo:
    """A task as Studio's S-C and fuse's F-C describe it (§12.2, §13.1): no token, no advisory
    values; ``tid`` names the task and ``status`` is its state, 1-3 (S5). ``kind`` is the
    package kind (the ``type`` field), as in :class:`TaskInfo`."""

    target: str
    tid: int
    size: int
    md5: str
    status: int
    kind: PackageKind = PackageKind.FULL

    def to_data(self) -> dict[str, Any]:
        """The ``data`` object. One order for both dialects: §13.1's, which is also the reply
        the things-model captures were taken with (docs/dialects.md)."""
        return {
            "target": self.target,
            "tid": self.tid,
            "size": self.size,
            "md5": self.md5,
            "status": self.status,
            "type": int(self.kind),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> TidTaskInfo:
        """Parse S-C/F-C ``data``; raises :class:`WireFormatError` naming the first bad field.

        Strict about JSON types (§8.2 item 8: ``tid``, ``size`` and ``type`` are numbers;
        ``target`` and ``md5`` strings); ``type`` may be missing (full package).
        """
        target = data.get("target")
        if not isinstance(target, str) or not target:
            raise WireFormatError("'target' is missing or not a string")
        md5 = data.get("md5")
        if not isinstance(md5, str) or not values.is_md5(md5.lower()):
            raise WireFormatError("'md5' is missing or not 32 hex digits")
        return cls(
            target=target,
            tid=_int_field(data, "tid", 1, TID_MAX),
            size=_int_field(data, "size", 1, values.PACKAGE_SIZE_MAX),
            md5=md5.lower(),
            status=_int_field(data, "status", 1, 3),  # S5: an active task
            kind=PackageKind(_int_field(data, "type", 1, 2, default=1)),
        )


def _int_field(data: dict[str, Any], name: str, low: int, high: int, default: int = 0) -> int:
    """A JSON integer (never a bool, §2.4) in ``low..high``; ``default`` when absent and
    non-zero."""
    value = data.get(name, default or None)
    if type(value) is not int or not low <= value <= high:
        raise WireFormatError(f"'{name}' is missing or not an integer in {low}..{high}")
    return value


def status_data(status: int) -> dict[str, int]:
    """S-T and F-T's ``data``: ``{"status": n}`` with n a task state code 1-6 (S6, F7)."""
    if type(status) is not int or not 1 <= status <= 6:
        raise ValueError(f"status {status!r} is not a state code 1-6 (§5.1)")
    return {"status": status}


def parse_status_data(data: dict[str, Any] | None) -> int:
    """The ``status`` of an S-T/F-T reply's ``data``; raises :class:`WireFormatError`."""
    if data is None:
        raise WireFormatError("the reply has no 'data'")
    return _int_field(data, "status", 1, 6)

"""OneNET Authorization tokens (spec §3): build them as devices do, parse and verify them as a
platform does. Shared by the device SDK and the server.

A token is ``version=2018-10-31&res=products%2F{pid}&et={unix}&method=sha1&sign={b64}``, where
``sign`` is the base64 HMAC of ``et\\nmethod\\nres\\nversion`` keyed with the base64-decoded access
key (§3.2). It is a credential: never log it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

VERSION: Final = "2018-10-31"
METHODS: Final = ("md5", "sha1", "sha256")
# The C SDK's constant expiry: 2050-01-01 00:00 at UTC+8 (§3.1).
DEFAULT_ET: Final = 2524579200
_ET_MAX: Final = 2**63 - 1

# OneNET's percent-encoding table (§3.2 step 4); every other character is left as it is.
_ENCODE_TABLE: Final = {
    "+": "%2B",
    " ": "%20",
    "/": "%2F",
    "?": "%3F",
    "%": "%25",
    "#": "%23",
    "&": "%26",
    "=": "%3D",
}
_RES_RE: Final = re.compile(
    r"products/(?P<pid>[A-Za-z0-9]{1,32})(?:/devices/(?P<name>[A-Za-z0-9_.\-]{1,64}))?"
)
_ET_RE: Final = re.compile(r"[0-9]{1,20}")
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


class TokenError(ValueError):
    """A token that cannot be parsed or does not verify. Its message never contains the sign."""


def onenet_quote(value: str) -> str:
    """Percent-encode ``value`` with OneNET's table (§3.2 step 4)."""
    return "".join(_ENCODE_TABLE.get(ch, ch) for ch in value)


def onenet_unquote(value: str) -> str:
    """Strict percent-decoding (§3.3 step 3): ``%HH`` of either case; ``+`` stays ``+``."""
    if "%" not in value:
        return value
    # unquote_to_bytes does the decoding (and leaves "+" alone) but lets a broken escape through
    # as text; the check before it refuses those.
    if _BAD_ESCAPE_RE.search(value) is not None:
        raise TokenError("bad percent-escape in token")
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError("token value is not UTF-8") from None


def resource(pid: str, device_name: str | None = None) -> str:
    """The ``res`` value: ``products/{pid}`` or ``products/{pid}/devices/{name}`` (§3.1)."""
    res = f"products/{pid}" if device_name is None else f"products/{pid}/devices/{device_name}"
    if _RES_RE.fullmatch(res) is None:
        raise ValueError(f"invalid product id or device name in {res!r}")
    return res


def decode_key(access_key: str) -> bytes:
    """Base64-decode an access key or device key (§3.2 step 1)."""
    try:
        key = base64.b64decode(access_key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the access key is not valid base64") from None
    if not key:
        raise ValueError("the access key is empty")
    return key


def compute_sign(key: bytes, *, et: str, method: str, res: str, version: str = VERSION) -> str:
    """base64(HMAC-method(key, et LF method LF res LF version)) (§3.2 steps 2-3)."""
    if method not in METHODS:
        raise ValueError(f"unsupported method {method!r}; use one of {', '.join(METHODS)}")
    string_to_sign = f"{et}\n{method}\n{res}\n{version}".encode()
    digest = hmac.new(key, string_to_sign, method).digest()
    return base64.b64encode(digest).decode("ascii")


def build_token(
    product_id: str,
    access_key: str,
    *,
    device_name: str | None = None,
    method: str = "sha1",
    et: int = DEFAULT_ET,
) -> str:
    """The Authorization header value a OneNET device sends (§3.2; vectors in Appendix B.1).

    ``access_key`` is the product's access key for a product-level token, or the device key (or
    product key) for a device-level one. The default ``et`` is the C SDK's far-future constant.
    """
    if not 0 <= et <= _ET_MAX:
        raise ValueError("et must be a Unix time between 0 and 2^63-1")
    res = resource(product_id, device_name)
    sign = compute_sign(decode_key(access_key), et=str(et), method=method, res=res)
    return (
        f"version={VERSION}&res={onenet_quote(res)}&et={et}"
        f"&method={method}&sign={onenet_quote(sign)}"
    )


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """The decoded fields of a token. ``et`` is kept as the digits received (§3.3 step 8)."""

    version: str
    res: str
    et: str
    method: str
    sign: str
    product_id: str
    device_name: str | None

    @property
    def expires_at(self) -> int:
        """``et`` as an integer (64-bit, never 32-bit: §3.3 step 6)."""
        return int(self.et)

    def __repr__(self) -> str:  # the sign is a credential: keep it out of logs and tracebacks
        return f"ParsedToken(res={self.res!r}, et={self.et}, method={self.method!r})"


_FIELDS: Final = ("version", "res", "et", "method", "sign")


def parse_token(value: str | None) -> ParsedToken:
    """Parse an Authorization value, encoded or raw (§3.3 steps 1-7, without the lookups)."""
    if not value:
        raise TokenError("missing Authorization")
    fields: dict[str, str] = {}
    for piece in value.split("&"):
        if not piece:
            continue
        key, sep, raw = piece.partition("=")
        if not sep:
            raise TokenError("token field without '='")
        if key in _FIELDS:
            if key in fields:
                raise TokenError(f"token field {key!r} repeated")
            fields[key] = onenet_unquote(raw)
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise TokenError(f"token lacks {', '.join(missing)}")
    if fields["version"] != VERSION:
        raise TokenError(f"unsupported token version {fields['version']!r}")
    if fields["method"] not in METHODS:
        raise TokenError(f"unsupported token method {fields['method']!r}")
    et = fields["et"]
    if _ET_RE.fullmatch(et) is None or int(et) > _ET_MAX:
        raise TokenError("token et is not a 64-bit Unix time")
    match = _RES_RE.fullmatch(fields["res"])
    if match is None:
        raise TokenError("token res is not products/{pid}[/devices/{name}]")
    return ParsedToken(
        version=fields["version"],
        res=fields["res"],
        et=et,
        method=fields["method"],
        sign=fields["sign"],
        product_id=match.group("pid"),
        device_name=match.group("name"),
    )


def verify_token(token: ParsedToken, key: bytes, *, now: float) -> None:
    """Check expiry and signature (§3.3 steps 6, 8, 9); raises :class:`TokenError` on failure.

    ``key`` is the decoded key chosen by §3.4. The comparison is constant-time.
    """
    if token.expires_at < now:
        raise TokenError("token expired")
    expected = compute_sign(key, et=token.et, method=token.method, res=token.res)
    if not hmac.compare_digest(expected.encode(), token.sign.encode("utf-8")):
        raise TokenError("token signature mismatch")


def redact(authorization: str) -> str:
    """A loggable form of an Authorization value: the sign replaced by ``***``."""
    return re.sub(r"(sign=)[^&]*", r"\1***", authorization)


# The hashlib names match OneNET's method names; fail at import if that ever changes.
assert all(name in hashlib.algorithms_guaranteed for name in METHODS)

"""OneNET Authorization tokens (spec §3, §13.3): build them as devices do, parse and verify them
as a platform does. Shared by the device SDK and the server.

Rules:

1. A token is ``version=V&res=R&et=T&method=M&sign=S`` (§3.1). ``sign`` is the base64 HMAC-``M``
   of ``T\\nM\\nR\\nV`` keyed with the base64-decoded access key (§3.2). It is a credential: never
   log it (use :func:`redact`); no message or ``repr`` of this module contains it.
2. ``version`` is ``2018-10-31`` (classic) or ``2022-05-01`` (the new platform, §13.3). ``method``
   is ``md5``, ``sha1`` or ``sha256``. ``et`` is 1-20 digits, at most 2^63-1, never 32-bit.
3. ``res`` names one of three resources: ``products/{pid}``, ``products/{pid}/devices/{name}``
   or ``userid/{uid}`` (an account, §13.3, F12). Which key signs which is §3.4: see
   :func:`key_source`.
4. Parsing accepts the encoded form the C SDK sends and the raw form some docs print (§3.3 step
   3: ``%HH`` of either case, ``+`` stays ``+``). Fields may come in any order; unknown keys are
   ignored; each of the five must occur once.
5. Which versions and resources a request may use is the dialect's business, not the token's:
   the classic API takes ``2018-10-31`` product and device tokens only (D3; Appendix B.1 lists
   ``version=2022-05-01`` among the classic refusals); Studio (S2) and fuse (F2) take both
   versions, and fuse also account tokens. A :class:`TokenPolicy` carries that choice into
   :func:`parse_token` / :func:`parse_any_token`; the default is the classic one.

Theory of operation. A device calls :func:`build_token` (product or device level) or
:func:`build_user_token` (account level) once and sends the value on every request. The server
calls :func:`parse_any_token` (or :func:`parse_token` where only product and device tokens can
be right) under the dialect's policy, looks up the key that :func:`key_source` names, calls
:func:`verify_token` (expiry, then a constant-time comparison of the signs) and finally
:func:`grants` to check that the token speaks for the product and device the request is about.
Every failure is a :class:`TokenError`; a server answers all of them alike (errno 1, D3; S2;
code 10403, F2), so the reason in the message is for logs and tests only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import unquote_to_bytes

VERSION: Final = "2018-10-31"
"""The classic API's token version (§3.1); the C SDK sends it in both of its modes."""
VERSION_2022: Final = "2022-05-01"
"""The new platform's token version (§3.3 step 4, §13.3)."""
VERSIONS: Final = (VERSION, VERSION_2022)
METHODS: Final = ("md5", "sha1", "sha256")
# The C SDK's constant expiry: 2050-01-01 00:00 at UTC+8 (§3.1).
DEFAULT_ET: Final = 2524579200
_ET_MAX: Final = 2**63 - 1
USER_ID_MAX: Final = 2**63 - 1

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
# F12 says only "decimal string". The uid also travels as a JSON integer in task pushes (§11), so
# it is a positive 64-bit value written canonically: no sign, no leading zero (docs/dialects.md).
USER_ID_RE: Final = re.compile(r"[1-9][0-9]{0,18}")
"""An account's uid, up to the value bound :data:`USER_ID_MAX` (see :func:`is_user_id`)."""
_USER_RES_RE: Final = re.compile(rf"userid/(?P<uid>{USER_ID_RE.pattern})")
_ET_RE: Final = re.compile(r"[0-9]{1,20}")
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


class TokenError(ValueError):
    """A token that cannot be parsed or does not verify. Its message never contains the sign."""


class ResourceKind(Enum):
    """The three forms of ``res`` (§3.3 step 7)."""

    PRODUCT = "product"  # products/{pid}
    DEVICE = "device"  # products/{pid}/devices/{name}
    USER = "user"  # userid/{uid} (§13.3, F12)


class KeySource(Enum):
    """Which stored key verifies a token (§3.4, D4)."""

    PRODUCT = "product"  # the product's access key
    DEVICE_OR_PRODUCT = (
        "device_or_product"  # the device key if the device has one, else the product's
    )
    ACCOUNT = "account"  # the account's access key (F2, F12)


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """The token versions and resource forms one dialect accepts (D3, S2, F2)."""

    versions: frozenset[str]
    kinds: frozenset[ResourceKind]

    def __post_init__(self) -> None:
        unknown = self.versions - set(VERSIONS)
        if unknown or not self.versions or not self.kinds:
            raise ValueError(f"a token policy needs known versions and kinds, not {unknown}")


_PRODUCT_KINDS: Final = frozenset({ResourceKind.PRODUCT, ResourceKind.DEVICE})
CLASSIC_POLICY: Final = TokenPolicy(frozenset({VERSION}), _PRODUCT_KINDS)
"""D3: classic takes ``2018-10-31`` product and device tokens; B.1 refuses ``2022-05-01``."""
STUDIO_POLICY: Final = TokenPolicy(frozenset(VERSIONS), _PRODUCT_KINDS)
"""S2: device or product level, either version."""
FUSE_POLICY: Final = TokenPolicy(frozenset(VERSIONS), frozenset(ResourceKind))
"""F2: the three forms of §13.3 plus product level, either version, accounts included."""


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


def is_user_id(value: object) -> bool:
    """An account's uid: a decimal 1..2^63-1 without sign or leading zero (F12)."""
    return (
        isinstance(value, str)
        and USER_ID_RE.fullmatch(value) is not None
        and int(value) <= USER_ID_MAX
    )


def user_resource(user_id: str) -> str:
    """The ``res`` value of an account token: ``userid/{uid}`` (§13.3, F12)."""
    if not is_user_id(user_id):
        raise ValueError(f"invalid user id {user_id!r}: a decimal 1..2^63-1 without leading zero")
    return f"userid/{user_id}"


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
    if version not in VERSIONS:
        raise ValueError(f"unsupported version {version!r}; use one of {', '.join(VERSIONS)}")
    string_to_sign = f"{et}\n{method}\n{res}\n{version}".encode()
    digest = hmac.new(key, string_to_sign, method).digest()
    return base64.b64encode(digest).decode("ascii")


def _assemble(res: str, access_key: str, *, method: str, et: int, version: str) -> str:
    if not 0 <= et <= _ET_MAX:
        raise ValueError("et must be a Unix time between 0 and 2^63-1")
    sign = compute_sign(decode_key(access_key), et=str(et), method=method, res=res, version=version)
    return (
        f"version={version}&res={onenet_quote(res)}&et={et}"
        f"&method={method}&sign={onenet_quote(sign)}"
    )


def build_token(
    product_id: str,
    access_key: str,
    *,
    device_name: str | None = None,
    method: str = "sha1",
    et: int = DEFAULT_ET,
    version: str = VERSION,
) -> str:
    """The Authorization header value a OneNET device sends (§3.2; vectors in Appendix B.1).

    ``access_key`` is the product's access key for a product-level token, or the device key (or
    product key) for a device-level one. The default ``et`` is the C SDK's far-future constant;
    the default ``version`` the classic one (the new platform also takes ``2022-05-01``, §13.3).
    """
    return _assemble(
        resource(product_id, device_name), access_key, method=method, et=et, version=version
    )


def build_user_token(
    user_id: str,
    access_key: str,
    *,
    method: str = "sha1",
    et: int = DEFAULT_ET,
    version: str = VERSION_2022,
) -> str:
    """An account-level token, ``res=userid/{uid}``, signed with the account's access key
    (§13.3; only the fuse dialect accepts it, F2). The default version is the one §13.3 reports
    working with it."""
    return _assemble(user_resource(user_id), access_key, method=method, et=et, version=version)


@dataclass(frozen=True, slots=True, repr=False)
class _Token:
    version: str
    res: str
    et: str
    method: str
    sign: str

    @property
    def expires_at(self) -> int:
        """``et`` as an integer (64-bit, never 32-bit: §3.3 step 6)."""
        return int(self.et)

    def __repr__(self) -> str:  # the sign is a credential: keep it out of logs and tracebacks
        return f"{type(self).__name__}(res={self.res!r}, et={self.et}, method={self.method!r})"


@dataclass(frozen=True, slots=True, repr=False)
class ParsedToken(_Token):
    """A product- or device-level token's decoded fields. ``et`` is kept as the digits received
    (§3.3 step 8)."""

    product_id: str
    device_name: str | None

    @property
    def kind(self) -> ResourceKind:
        """Product or device level."""
        return ResourceKind.PRODUCT if self.device_name is None else ResourceKind.DEVICE


@dataclass(frozen=True, slots=True, repr=False)
class UserToken(_Token):
    """An account-level token's decoded fields, ``res=userid/{uid}`` (§13.3, F12)."""

    user_id: str

    @property
    def kind(self) -> ResourceKind:
        """Always :attr:`ResourceKind.USER`."""
        return ResourceKind.USER


AnyToken = ParsedToken | UserToken

_FIELDS: Final = ("version", "res", "et", "method", "sign")


def _fields(value: str | None, policy: TokenPolicy) -> dict[str, str]:
    """§3.3 steps 1-6: split, decode, and check version, method and et."""
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
    if fields["version"] not in policy.versions:
        raise TokenError(f"unsupported token version {fields['version']!r}")
    if fields["method"] not in METHODS:
        raise TokenError(f"unsupported token method {fields['method']!r}")
    et = fields["et"]
    if _ET_RE.fullmatch(et) is None or int(et) > _ET_MAX:
        raise TokenError("token et is not a 64-bit Unix time")
    return fields


def parse_any_token(value: str | None, *, policy: TokenPolicy = FUSE_POLICY) -> AnyToken:
    """Parse an Authorization value, encoded or raw, under ``policy`` (§3.3 steps 1-7, without
    the lookups). The default policy takes every form this module knows (F2)."""
    fields = _fields(value, policy)
    res = fields["res"]
    common = (fields["version"], res, fields["et"], fields["method"], fields["sign"])
    match = _RES_RE.fullmatch(res)
    if match is not None:
        token: AnyToken = ParsedToken(*common, match.group("pid"), match.group("name"))
    else:
        user = _USER_RES_RE.fullmatch(res)
        if user is None or int(user.group("uid")) > USER_ID_MAX:
            raise TokenError("token res is not products/{pid}[/devices/{name}] or userid/{uid}")
        token = UserToken(*common, user.group("uid"))
    if token.kind not in policy.kinds:
        raise TokenError(f"{token.kind.value}-level tokens are not accepted here")
    return token


def parse_token(value: str | None, *, policy: TokenPolicy = CLASSIC_POLICY) -> ParsedToken:
    """Parse a product- or device-level Authorization value, encoded or raw (§3.3 steps 1-7,
    without the lookups). The default policy is the classic API's (D3)."""
    fields = _fields(value, policy)
    match = _RES_RE.fullmatch(fields["res"])
    if match is None:
        raise TokenError("token res is not products/{pid}[/devices/{name}]")
    token = ParsedToken(
        version=fields["version"],
        res=fields["res"],
        et=fields["et"],
        method=fields["method"],
        sign=fields["sign"],
        product_id=match.group("pid"),
        device_name=match.group("name"),
    )
    if token.kind not in policy.kinds:
        raise TokenError(f"{token.kind.value}-level tokens are not accepted here")
    return token


def key_source(token: AnyToken) -> KeySource:
    """Which stored key verifies ``token`` (§3.4, D4; F2 for accounts)."""
    if isinstance(token, UserToken):
        return KeySource.ACCOUNT
    return KeySource.PRODUCT if token.device_name is None else KeySource.DEVICE_OR_PRODUCT


def verify_token(token: AnyToken, key: bytes, *, now: float) -> None:
    """Check expiry and signature (§3.3 steps 6, 8, 9); raises :class:`TokenError` on failure.

    ``key`` is the decoded key chosen by §3.4 (:func:`key_source`). A token is valid while
    ``et >= now``. The sign comparison is constant-time (``hmac.compare_digest``); the expiry
    check before it reveals nothing the caller did not send (``et`` is in the token).
    """
    if token.expires_at < now:
        raise TokenError("token expired")
    expected = compute_sign(
        key, et=token.et, method=token.method, res=token.res, version=token.version
    )
    if not hmac.compare_digest(expected.encode(), token.sign.encode("utf-8")):
        raise TokenError("token signature mismatch")


def grants(
    token: AnyToken, *, pid: str, device_name: str, product_owner: str | None = None
) -> bool:
    """Whether a verified ``token`` speaks for device ``device_name`` of product ``pid``.

    A product token speaks for the devices of its product, a device token for its own device
    only (D4, S2), and an account token for every device of the products that account owns (F2):
    ``product_owner`` is the uid of the account that owns ``pid``, or None when none does.
    """
    if isinstance(token, UserToken):
        return product_owner is not None and product_owner == token.user_id  # uids are no secret
    if token.product_id != pid:
        return False
    return token.device_name is None or token.device_name == device_name


def redact(authorization: str) -> str:
    """A loggable form of an Authorization value: the sign replaced by ``***``."""
    return re.sub(r"(sign=)[^&]*", r"\1***", authorization)


# The hashlib names match OneNET's method names; fail at import if that ever changes.
assert all(name in hashlib.algorithms_guaranteed for name in METHODS)

"""Value objects that configure a device client: credentials, identity (the C SDK's ``ota_init``)
and time limits. All are immutable and validated on construction, so a bad value fails before any
request is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onenet_ota import auth
from onenet_ota.device.errors import InvalidArgumentError
from onenet_ota.protocol import values
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.dialects import NAME, PID, STUDIO_PID
from onenet_ota.protocol.status import TaskType

DEFAULT_BASE_URL = "http://ota.heclouds.com"  # the classic API host (spec §2.1)
# The hosts of the other dialects (§12, §13). Fuse's paths carry their own /fuse-ota/ prefix.
DEFAULT_BASE_URLS = {
    Dialect.CLASSIC: DEFAULT_BASE_URL,
    Dialect.STUDIO: "http://studio-ota.heclouds.com",
    Dialect.FUSE: "http://iot-api.heclouds.com",
}
# §13.7: the token version each dialect's device sends by default. Studio's is the C SDK's
# (it sends 2018-10-31 in its things-model mode too, §12.2); fuse's the new platform's.
DEFAULT_TOKEN_VERSIONS = {
    Dialect.CLASSIC: auth.VERSION,
    Dialect.STUDIO: auth.VERSION,
    Dialect.FUSE: auth.VERSION_2022,
}
DEFAULT_TIMEOUT_MS = 3000  # the C SDK example's per-request timeout (spec §8.2 item 10)
MAX_TIMEOUT_MS = 24 * 3600 * 1000

# A header value must not be able to smuggle another header: printable ASCII only.
_HEADER_VALUE_RE = re.compile(r"[\x21-\x7e]+")


def check_timeout_ms(value: object, what: str = "timeout_ms") -> int:
    """``value`` as a positive millisecond count; raises :class:`InvalidArgumentError`."""
    if type(value) is not int or not 1 <= value <= MAX_TIMEOUT_MS:
        raise InvalidArgumentError(f"{what} must be an integer from 1 to {MAX_TIMEOUT_MS}")
    return value


@dataclass(frozen=True, slots=True)
class Timeout:
    """Time limits of one call, in milliseconds, as the C SDK's ``timeout_ms``.

    ``ms`` bounds the whole call: connecting, sending, and reading the complete reply.
    ``connect_ms`` bounds the TCP (and TLS) connect alone; it defaults to ``ms``.
    """

    ms: int = DEFAULT_TIMEOUT_MS
    connect_ms: int | None = None

    def __post_init__(self) -> None:
        check_timeout_ms(self.ms, "Timeout.ms")
        if self.connect_ms is not None:
            check_timeout_ms(self.connect_ms, "Timeout.connect_ms")

    def with_ms(self, ms: int | None) -> Timeout:
        """This limit with ``ms`` replaced (a per-call override); unchanged when ``ms`` is None."""
        if ms is None:
            return self
        return Timeout(check_timeout_ms(ms), self.connect_ms)

    @property
    def seconds(self) -> float:
        """``ms`` in seconds."""
        return self.ms / 1000

    @property
    def connect_seconds(self) -> float:
        """The connect limit in seconds."""
        return (self.ms if self.connect_ms is None else self.connect_ms) / 1000


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """The ``Authorization`` header value a device sends (spec §3).

    Pass a ready value, or derive one with :meth:`from_access_key`. The value is a credential:
    ``repr()`` shows it with its signature redacted, and no error message ever contains it.
    """

    authorization: str

    def __post_init__(self) -> None:
        if not isinstance(self.authorization, str) or (
            _HEADER_VALUE_RE.fullmatch(self.authorization) is None
        ):
            raise InvalidArgumentError(
                "the Authorization value must be non-empty printable ASCII without spaces"
            )

    @classmethod
    def from_access_key(
        cls,
        product_id: str,
        access_key: str,
        *,
        device_name: str | None = None,
        method: str = "sha1",
        et: int = auth.DEFAULT_ET,
        version: str = auth.VERSION,
    ) -> Credentials:
        """Build the token as the C SDK does (§3.2): product level unless ``device_name`` is given.

        ``et`` defaults to the C SDK's far-future constant 2524579200; ``version`` to the classic
        ``2018-10-31`` (Studio and fuse also take ``2022-05-01``, §13.3; see :meth:`for_dialect`).
        """
        try:
            return cls(
                auth.build_token(
                    product_id,
                    access_key,
                    device_name=device_name,
                    method=method,
                    et=et,
                    version=version,
                )
            )
        except (ValueError, TypeError) as exc:
            # auth's messages name the bad field and never include the key.
            raise InvalidArgumentError(str(exc)) from None

    @classmethod
    def from_user_key(
        cls,
        user_id: str,
        access_key: str,
        *,
        method: str = "sha1",
        et: int = auth.DEFAULT_ET,
        version: str = auth.VERSION_2022,
    ) -> Credentials:
        """An account-level token, ``res=userid/{uid}``, signed with the account's access key
        (§13.3). Only the fuse dialect takes it (F2)."""
        try:
            return cls(
                auth.build_user_token(user_id, access_key, method=method, et=et, version=version)
            )
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(str(exc)) from None

    @classmethod
    def for_dialect(
        cls,
        dialect: Dialect,
        product_id: str,
        access_key: str,
        *,
        device_name: str | None = None,
        method: str = "sha1",
        et: int = auth.DEFAULT_ET,
        version: str | None = None,
    ) -> Credentials:
        """The device's default token for ``dialect`` (§13.7): a ``2018-10-31`` token for classic
        and Studio (the C SDK's), ``2022-05-01`` for fuse, unless ``version`` says otherwise."""
        return cls.from_access_key(
            product_id,
            access_key,
            device_name=device_name,
            method=method,
            et=et,
            version=DEFAULT_TOKEN_VERSIONS[Dialect(dialect)] if version is None else version,
        )

    @property
    def product_id(self) -> str | None:
        """The product id named in the token's ``res``, or None if the value does not parse."""
        try:
            return auth.parse_token(self.authorization).product_id
        except auth.TokenError:
            return None

    def __repr__(self) -> str:
        return f"Credentials({auth.redact(self.authorization)!r})"


def _check_version(value: object, what: str) -> None:
    if not values.is_version(value):
        raise InvalidArgumentError(
            f"{what} must be 1-20 characters of [A-Za-z0-9_.-] (spec §4.5), got {value!r}"
        )


def _check_code(value: object, what: str) -> None:
    if not isinstance(value, str) or values.MANUF_MODEL_RE.fullmatch(value) is None:
        raise InvalidArgumentError(f"{what} must be 1-32 characters of [A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """Who the device is, as the C SDK's ``ota_init`` takes it.

    - ``credentials``: the Authorization value (product id + access key, or a ready token).
    - ``dev_id``: OneNET's numeric device id, as a string of 1-19 digits. It may be None only for
      a client that looks it up first with ``dev_info`` (E9); other calls need it.
    - ``version``: the current version of the channel being upgraded (``type``).
    - ``type``: ``TaskType.FOTA`` (module firmware, 1) or ``TaskType.SOTA`` (application, 2).
    - ``manuf``, ``model``: optional codes (spec Appendix A); sent on E3 only when set (D11).
    - ``cdn``: ask E3/E4 for an ``ipPort`` to download from (D10).
    - ``other_version``: the version of the other channel (the application version of a FOTA
      device, the firmware version of a SOTA one). When set, E1 reports both versions; otherwise
      only ``type``'s key.
    - ``dialect``: which device API to speak (§13.7): ``Dialect.CLASSIC`` (the default),
      ``Dialect.STUDIO`` (§12) or ``Dialect.FUSE`` (§13).
    - ``product_id``, ``device_name``: Studio and fuse name the device by these in the path
      (§12.2, §13.1); both are required there, and ``dev_id``, ``manuf``, ``model`` and ``cdn``
      are not used. Classic ignores them.
    - ``keep_alive``: False sends ``Connection: close`` on every request, so that each request
      has a connection of its own, as the AT-command modules of §13.1 do. The default lets the
      HTTP client keep a connection open between requests.
    - ``range_for_whole_file``: False sends a download that asks for the whole package from
      byte 0 without a ``Range`` header, as the ESP32 clients of §13.1 that stream the file in
      one GET do; the reply must then be a 200 with the whole file (§10, §13.4, F10). A
      download of any other span always carries a Range.
    """

    credentials: Credentials
    dev_id: str | None
    version: str
    type: TaskType = TaskType.FOTA
    manuf: str | None = None
    model: str | None = None
    cdn: bool = False
    other_version: str | None = None
    dialect: Dialect = Dialect.CLASSIC
    product_id: str | None = None
    device_name: str | None = None
    keep_alive: bool = True
    range_for_whole_file: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.credentials, Credentials):
            raise InvalidArgumentError(
                "credentials must be a Credentials (Credentials(value) or "
                "Credentials.from_access_key(...))"
            )
        if self.dev_id is not None and (
            not isinstance(self.dev_id, str) or values.parse_dev_id(self.dev_id) is None
        ):
            raise InvalidArgumentError("dev_id must be 1-19 decimal digits, from 1 to 2^63-1")
        _check_version(self.version, "version")
        if self.other_version is not None:
            _check_version(self.other_version, "other_version")
        if not isinstance(self.type, int) or isinstance(self.type, bool) or self.type not in (1, 2):
            raise InvalidArgumentError("type must be 1 (FOTA) or 2 (SOTA)")
        # A plain 1 or 2 is accepted and stored as the enum, so `is` comparisons hold.
        object.__setattr__(self, "type", TaskType(self.type))
        if self.manuf is not None:
            _check_code(self.manuf, "manuf")
        if self.model is not None:
            _check_code(self.model, "model")
        for name in ("cdn", "keep_alive", "range_for_whole_file"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False")
        try:
            object.__setattr__(self, "dialect", Dialect(self.dialect))
        except ValueError:
            raise InvalidArgumentError(
                f"dialect must be one of {', '.join(d.value for d in Dialect)}"
            ) from None
        if self.dialect is not Dialect.CLASSIC:
            pid_grammar = STUDIO_PID if self.dialect is Dialect.STUDIO else PID
            if not isinstance(self.product_id, str) or not pid_grammar.accepts(self.product_id):
                raise InvalidArgumentError(
                    f"the {self.dialect.value} dialect needs product_id: 1-32 characters of "
                    "[A-Za-z0-9] (spec §1)"
                    + (
                        "; south, device and devInfo are reserved (S1)"
                        if pid_grammar.reserved
                        else ""
                    )
                )
            if not isinstance(self.device_name, str) or not NAME.accepts(self.device_name):
                raise InvalidArgumentError(
                    f"the {self.dialect.value} dialect needs device_name: 1-64 characters of "
                    "[A-Za-z0-9_.-] (spec §1)"
                )

    @property
    def f_version(self) -> str | None:
        """The module firmware version E1 reports (``f_version``), if known."""
        return self.version if self.type is TaskType.FOTA else self.other_version

    @property
    def s_version(self) -> str | None:
        """The application version E1 reports (``s_version``), if known."""
        return self.version if self.type is TaskType.SOTA else self.other_version

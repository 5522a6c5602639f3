"""Which device API each virtual device speaks, and how its HTTP client behaves.

Dialects (``--dialect``): ``classic`` (§4–§6), ``studio`` (§12), ``fuse`` (§13), or ``mixed``.

Client profiles (``--profile``) copy the clients seen in the field (§13.1, and the OneNET C SDK
of §7, §8.2). They are data, one row of :data:`PROFILES` each, and reach the device only through
the SDK's own options (:class:`~onenet_ota.device.DeviceConfig`,
:class:`~onenet_ota.device.upgrader.UpgradeOptions`) and the fleet's connection pools:

- ``default``: ``--chunk-size`` ranges; the dialect's checks (§13.7) and progress every 10 %;
  connections kept alive in the fleet's shared pools.
- ``c-sdk``: 4 KiB ranges, a token (E5) or tid (S-T, F-T) check before every chunk, no progress
  reports (101 and 201 only, §6.7), and a new connection for every request, without a
  ``Connection`` header saying so.
- ``at-module``: 256 B, 512 B or 1 KiB ranges, ``Connection: close`` on every request, progress
  every 10 %, then 100, then 101.
- ``esp32-stream``: the whole package in one GET without Range (packages up to the SDK's largest
  chunk, 16 MiB; beyond that, 16 MiB ranges); connections kept alive.

``mixed`` assigns by the device's index in the fleet: device *i* speaks dialect ``i mod 3`` and
runs profile ``(i div 3) mod 4`` (in the orders of :data:`DIALECT_NAMES` and
:data:`PROFILE_NAMES`), so that the assignment is the same on every run, in every process of a
sharded fleet, and any 12 consecutive devices cover every pairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from onenet_ota.device._flow import MAX_CHUNK, TokenCheck
from onenet_ota.protocol.codes import Dialect

__all__ = [
    "DIALECT_NAMES",
    "MIXED",
    "PROFILES",
    "PROFILE_NAMES",
    "ClientProfile",
    "dialect_of",
    "profile_of",
]

MIXED: Final = "mixed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientProfile:
    """How one kind of field client talks to the platform (see the module table).

    - ``chunk_sizes``: bytes per download request; a device takes one of them by its index.
      Empty: the fleet's ``--chunk-size``.
    - ``whole_file``: download the package in one request (up to the SDK's largest chunk), sent
      without a Range header.
    - ``token_check``: when to check the token or tid (None: the dialect's default, §13.7).
    - ``progress_step``: progress reports every this many percent (None: the fleet's).
    - ``report_full_progress``: report 100 before 101.
    - ``keep_alive``: False sends ``Connection: close`` on every request.
    - ``reuse_connections``: False gives every request a new connection without saying so in a
      header (the device's HTTP pool keeps no idle connection).
    """

    name: str
    chunk_sizes: tuple[int, ...] = ()
    whole_file: bool = False
    token_check: TokenCheck | None = None
    progress_step: int | None = None
    report_full_progress: bool = False
    keep_alive: bool = True
    reuse_connections: bool = True

    def chunk_size(self, index: int, default: int) -> int:
        """The chunk size of the fleet's device ``index`` (``default`` is ``--chunk-size``)."""
        if self.whole_file:
            return MAX_CHUNK
        if not self.chunk_sizes:
            return default
        return self.chunk_sizes[index % len(self.chunk_sizes)]


PROFILES: Final[dict[str, ClientProfile]] = {
    profile.name: profile
    for profile in (
        ClientProfile(name="default"),
        # The OneNET C SDK: 4096-byte ranges, a check before each, 101 and 201 only (§6.7), and
        # a socket opened and closed for every request.
        ClientProfile(
            name="c-sdk",
            chunk_sizes=(4096,),
            token_check=TokenCheck.EVERY_CHUNK,
            progress_step=0,
            reuse_connections=False,
        ),
        # AT-command modules (ESP-01S, 4G modules): small ranges, Connection: close, progress
        # every 10 %, and 100 followed by 101 (§13.1).
        ClientProfile(
            name="at-module",
            chunk_sizes=(256, 512, 1024),
            progress_step=10,
            report_full_progress=True,
            keep_alive=False,
            reuse_connections=False,
        ),
        # ESP32 clients streaming the whole file in one GET with no Range (§13.1).
        ClientProfile(name="esp32-stream", whole_file=True),
    )
}
PROFILE_NAMES: Final = tuple(PROFILES)
DIALECT_NAMES: Final = tuple(dialect.value for dialect in Dialect)


def dialect_of(choice: str, index: int) -> Dialect:
    """The dialect of the fleet's device ``index`` under ``--dialect choice``."""
    if choice == MIXED:
        return Dialect(DIALECT_NAMES[index % len(DIALECT_NAMES)])
    return Dialect(choice)


def profile_of(choice: str, index: int) -> ClientProfile:
    """The client profile of the fleet's device ``index`` under ``--profile choice``."""
    if choice == MIXED:
        return PROFILES[PROFILE_NAMES[(index // len(DIALECT_NAMES)) % len(PROFILE_NAMES)]]
    return PROFILES[choice]

"""The parameters of a fleet run, validated before anything starts: :class:`FleetConfig`.

Every refusal is a :class:`SimulationError` whose message names the parameter (as its command-line
flag) and says what would work; nothing is left behind by a refused run, because nothing was
started yet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from onenet_ota.device._flow import MAX_CHUNK, MIN_CHUNK
from onenet_ota.device.config import MAX_TIMEOUT_MS
from onenet_ota.protocol import values
from onenet_ota.protocol.status import TaskType
from onenet_ota.sim.profiles import DIALECT_NAMES, MIXED, PROFILE_NAMES

__all__ = [
    "FD_PER_DEVICE",
    "HTTP_CLIENTS",
    "MAX_DEVICES",
    "MEMORY_DIR",
    "FleetConfig",
    "SimulationError",
    "ValueRange",
    "parse_range",
]

HTTP_CLIENTS: Final = ("sdk", "httpx2")  # how the devices send (FleetConfig.http)
MEMORY_DIR: Final = Path("/dev/shm")  # noqa: S108 - where the devices' state goes by default
MAX_DEVICES: Final = 100_000  # one task's device list (the management API's limit)
MAX_CONCURRENCY: Final = 10_000
MAX_PROCESSES: Final = 64
MAX_POWER_CUTS: Final = 5  # per device: its last run is never cut, so every device finishes
# A running device holds a pooled connection plus, for a moment, its lock, state and package
# files; keep this many descriptors per concurrent device, and some for the process itself.
FD_PER_DEVICE: Final = 4
FD_RESERVE: Final = 64
MAX_PACKAGE_SIZE: Final = 256 * 1024 * 1024  # the server's default upload limit


class SimulationError(Exception):
    """The simulation cannot run as asked (bad parameters, unreachable server, setup refused)."""


@dataclass(frozen=True, slots=True)
class ValueRange:
    """An inclusive integer range a device's probe value is drawn from (``--signal 20:90``)."""

    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


def parse_range(text: str, what: str, *, low: int, high: int) -> ValueRange:
    """``"A:B"`` or ``"A"`` as a :class:`ValueRange` within ``low..high``."""
    first, sep, second = text.partition(":")
    try:
        a = int(first)
        b = int(second) if sep else a
    except ValueError:
        raise SimulationError(f"{what}: expected N or LOW:HIGH (integers), got {text!r}") from None
    if a > b:
        raise SimulationError(f"{what}: {a}:{b} is empty; write LOW:HIGH with LOW <= HIGH")
    if a < low or b > high:
        raise SimulationError(f"{what}: values must lie within {low}..{high}, got {text!r}")
    return ValueRange(a, b)


def _fd_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        # An operator tool may use what the hard limit allows.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """How the fleet behaves. Flags of ``onenet-ota simulate`` in brackets.

    Fleet:
    - ``devices`` [--devices]: virtual devices, 1 to 100,000.
    - ``concurrency`` [--concurrency]: devices upgrading at once (each holds at most one
      connection); more than ``devices`` is reduced to ``devices``.
    - ``processes`` [--processes]: client processes sharing the devices (and the concurrency)
      out, for a machine where one Python process cannot keep up with the server; at most
      ``concurrency``.
    - ``ramp_up`` [--ramp-up]: seconds over which the device starts are spread evenly.
    - ``chunk_size`` [--chunk-size]: bytes per download request (the C SDK uses 4096).
    - ``timeout_ms`` [--timeout-ms]: each request's time limit.
    - ``version``: the version the devices report before the upgrade; ``task_type``: FOTA/SOTA.

    HTTP: ``http`` [--http]: ``sdk`` (default) sends with the device SDK's own transport, a
    connection per device as on a real device; ``httpx2`` sends every device through one shared
    ``httpx2.AsyncClient`` (the SDK's injected-client path), at about three times the
    simulator's CPU per request (:mod:`onenet_ota.sim.transport`).

    Dialects and clients (:mod:`onenet_ota.sim.profiles`):
    - ``dialect`` [--dialect]: the device API the devices speak: ``classic``, ``studio``,
      ``fuse``, or ``mixed`` (each device one of the three, by its index).
    - ``profile`` [--profile]: how their HTTP clients behave: ``default``, ``c-sdk``,
      ``at-module``, ``esp32-stream``, or ``mixed``.

    Probes and gates:
    - ``signal``, ``power`` [--signal, --power]: each device's probe value is drawn from this range
      once (None: the device has no probe, so the task's thresholds are not checked).
    - ``task_signal``, ``task_power`` [--task-signal, --task-power]: the thresholds of the task
      the simulator creates ("run only if above", §6.3).
    - ``gate_fail`` [--gate fail]: a failed gate reports 105/106/202 instead of deferring.

    Faults:
    - ``drop_rate`` [--drop-rate]: probability that a request's connection drops (0 to < 1).
    - ``defective_rate`` [--defective-rate]: fraction of devices on which the package is
      defective: the install fails and the device reports 205 or 206 (one of
      ``defective_codes``), as a bad build would make it (a staged campaign's ceiling trips);
    - ``power_cut_rate`` [--power-cut-rate]: probability that an upgrader run loses power (at a
      random request) and restarts on its state directory; at most 5 cuts per device.

    Retries: ``retry_interval`` [--retry-interval] is the first wait after a failed step (the
    upgrader backs off from there, with jitter); ``retry_attempts`` its budget per step.

    Setup (when the simulator creates the product, devices, package and task):
    ``package_size`` [--package-size] random bytes, or the file ``package`` [--package];
    ``target`` the version it installs. ``task_id`` [--task] uses an existing task instead; its
    devices are not the simulator's (they may be real ones, whose versions and upgrade states
    the run rewrites on the server), so it needs ``allow_real_devices`` [--allow-real-devices].

    ``seed`` [--seed] makes the faults, probes and package bytes repeatable; ``state_root``
    [--state-dir] is where device state directories are made (default: a temporary directory,
    in /dev/shm when it exists, since a real device's flash is not what is being measured).
    """

    devices: int = 100
    concurrency: int = 64
    processes: int = 1
    ramp_up: float = 0.0
    chunk_size: int = 64 * 1024
    timeout_ms: int = 30_000
    version: str = "1.0.0"
    target: str = "1.0.1"
    task_type: TaskType = TaskType.FOTA
    dialect: str = "classic"
    profile: str = "default"
    http: str = "sdk"
    signal: ValueRange | None = None
    power: ValueRange | None = None
    task_signal: int = 0
    task_power: int = 0
    gate_fail: bool = False
    drop_rate: float = 0.0
    power_cut_rate: float = 0.0
    defective_rate: float = 0.0
    defective_codes: tuple[int, ...] = (205, 206)
    retry_interval: float = 0.2
    retry_attempts: int = 8
    package_size: int = 256 * 1024
    package: Path | None = None
    task_id: int | None = None
    allow_real_devices: bool = False
    seed: int | None = None
    state_root: Path | None = None
    progress_step: int = 10
    max_power_cuts: int = field(default=MAX_POWER_CUTS)

    def __post_init__(self) -> None:
        def integer(name: str, flag: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise SimulationError(f"{flag} must be an integer from {low} to {high}")

        def number(name: str, flag: str, low: float, high: float, *, high_open: bool) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and low <= value
            ok = ok and (value < high if high_open else value <= high)
            if not ok:
                bound = f"below {high:g}" if high_open else f"at most {high:g}"
                raise SimulationError(f"{flag} must be a number of at least {low:g} and {bound}")

        integer("devices", "--devices", 1, MAX_DEVICES)
        integer("concurrency", "--concurrency", 1, MAX_CONCURRENCY)
        if self.concurrency > self.devices:
            object.__setattr__(self, "concurrency", self.devices)
        integer("processes", "--processes", 1, MAX_PROCESSES)
        if self.processes > self.concurrency:
            object.__setattr__(self, "processes", self.concurrency)
        number("ramp_up", "--ramp-up", 0, 24 * 3600, high_open=False)
        integer("chunk_size", "--chunk-size", MIN_CHUNK, MAX_CHUNK)
        integer("timeout_ms", "--timeout-ms", 1, MAX_TIMEOUT_MS)
        for name, flag in (("version", "--version"), ("target", "--target")):
            if not values.is_version(getattr(self, name)):
                raise SimulationError(f"{flag} must be 1-20 characters of [A-Za-z0-9_.-] (§4.5)")
        if self.package is None and self.task_id is None and self.version == self.target:
            raise SimulationError("--target must differ from --version, or nothing is upgraded")
        object.__setattr__(self, "task_type", TaskType(self.task_type))
        for name, flag, choices in (
            ("dialect", "--dialect", (*DIALECT_NAMES, MIXED)),
            ("profile", "--profile", (*PROFILE_NAMES, MIXED)),
            ("http", "--http", HTTP_CLIENTS),
        ):
            if getattr(self, name) not in choices:
                raise SimulationError(f"{flag} must be one of {', '.join(choices)}")
        for name, flag in (("task_signal", "--task-signal"), ("task_power", "--task-power")):
            integer(name, flag, values.INT32_MIN, values.INT32_MAX)
        number("drop_rate", "--drop-rate", 0, 1, high_open=True)
        number("power_cut_rate", "--power-cut-rate", 0, 1, high_open=False)
        number("defective_rate", "--defective-rate", 0, 1, high_open=False)
        if not self.defective_codes or any(
            type(code) is not int or not 202 <= code <= 208 for code in self.defective_codes
        ):
            raise SimulationError("defective_codes must be upgrade failure codes 202-208")
        number("retry_interval", "--retry-interval", 0, 120, high_open=False)
        integer("retry_attempts", "--retry-attempts", 1, 50)
        integer("progress_step", "--progress-step", 0, 99)
        integer("max_power_cuts", "max_power_cuts", 0, 100)
        if self.task_id is None and self.package is None:
            integer("package_size", "--package-size", 1, MAX_PACKAGE_SIZE)
        if self.task_id is not None:
            integer("task_id", "--task", 1, 2**31 - 1)
            if self.package is not None:
                raise SimulationError("--package and --task exclude each other")
            if self.allow_real_devices is not True:
                raise SimulationError(
                    f"--task {self.task_id} runs devices this simulator did not create: their "
                    "versions and upgrade states on the server are rewritten as if they had "
                    "upgraded. Pass --allow-real-devices to run them anyway"
                )
        if self.package is not None:
            try:
                size = self.package.stat().st_size
            except OSError as exc:
                raise SimulationError(f"--package {self.package}: {exc.strerror or exc}") from None
            if not self.package.is_file() or not 1 <= size <= values.PACKAGE_SIZE_MAX:
                raise SimulationError(
                    f"--package {self.package}: must be a file of 1 to {values.PACKAGE_SIZE_MAX} "
                    "bytes (D9)"
                )
        self._check_descriptors()

    def _check_descriptors(self) -> None:
        limit = _fd_limit()
        need = self.concurrency * FD_PER_DEVICE + FD_RESERVE
        if limit is not None and need > limit:
            most = max(1, (limit - FD_RESERVE) // FD_PER_DEVICE)
            raise SimulationError(
                f"--concurrency {self.concurrency} needs about {need} file descriptors, but this "
                f"process may open {limit} (ulimit -n); use --concurrency {most} or less, or "
                "raise the limit"
            )

    def state_base(self) -> Path:
        """Where the temporary device state directories go: ``state_root``, else the
        memory-backed :data:`MEMORY_DIR`, else the system's temporary directory."""
        if self.state_root is not None:
            return self.state_root
        # tmpfs: the devices' fsyncs cost nothing there, and their state is throwaway. It still
        # outlives a simulated power cut (the process-level state is rebuilt from the files).
        if _usable(MEMORY_DIR):
            return MEMORY_DIR
        import tempfile

        return Path(tempfile.gettempdir())

    def state_note(self) -> str | None:
        """Why the devices' state is not memory-backed, when it falls back to the disk (None
        when ``state_root`` was given or :data:`MEMORY_DIR` is usable)."""
        if self.state_root is not None or _usable(MEMORY_DIR):
            return None
        return (
            f"{MEMORY_DIR} is missing or not writable: the devices' state files go to "
            f"{self.state_base()}, where each simulated device's fsyncs reach the disk and slow "
            "the fleet; give --state-dir a memory-backed directory (a tmpfs) to avoid it"
        )


def _usable(directory: Path) -> bool:
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)

"""The fleet: N virtual devices, each running the real :class:`AsyncUpgrader` over HTTP.

Theory of operation. ``concurrency`` worker tasks take devices in order; device *i* starts no
earlier than ``ramp_up * i / N`` seconds into the run. A device is:

- an :class:`~onenet_ota.device.AsyncOtaClient` in the device's dialect (classic: the
  product-level token and its ``dev_id``; Studio and fuse: a device-level token and its name),
  with the fleet's version, over the SDK's own transport (a connection of its own, through a
  :class:`~onenet_ota.sim.transport.FleetSender`) or, with ``http="httpx2"``, over the fleet's
  one shared ``httpx2.AsyncClient`` (a :class:`~onenet_ota.sim.transport.FleetTransport`); both
  meter every request and inject the faults;
- an :class:`~onenet_ota.device.upgrader.AsyncUpgrader` whose installer checks the verified
  package against the server's (:class:`~onenet_ota.sim.storage.CheckingInstaller`), on a state
  directory of its own (the SDK's state store without fsyncs, :mod:`onenet_ota.sim.storage`),
  with probes returning the device's signal and battery values;
- a client profile (:mod:`onenet_ota.sim.profiles`) that sets the client's and the upgrader's
  options, and whether the device's requests go through pools that keep connections alive;
- a defective package with ``defective_rate``: the device's installer fails with 205 or 206
  (:class:`~onenet_ota.sim.storage.DefectiveInstaller`), after a download that verified, as a
  bad build fails;
- a power-cut plan: with ``power_cut_rate`` a run loses power at a random request (the transport
  raises :class:`PowerCut`); the device then "reboots": a fresh client and a fresh upgrader on
  the same state directory, which resume from what the dead run had made durable.

When a device's upgrade ends, its record says whether what it installed was the package, and
its state directory is removed, so a fleet
of 10,000 devices needs disk for ``concurrency`` packages at a time, not for all of them.

Everything the fleet observes is in :class:`FleetState`: per-device records (phase, result,
power cuts, status reports the server accepted), phase counts for a live view, and the
:class:`~onenet_ota.sim.metrics.FleetMetrics` of the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import random
import shutil
import signal
import ssl
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import httpx2

from onenet_ota.device import (
    AsyncOtaClient,
    Credentials,
    DeviceConfig,
    OtaEvent,
    StatusReported,
    Timeout,
)
from onenet_ota.device.client import USER_AGENT
from onenet_ota.device.transport import AsyncTransport
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    GatePolicy,
    Outcome,
    Restarted,
    Retry,
    Retrying,
    TaskFound,
    UpgradeEvent,
    UpgradeOptions,
    UpgradeResult,
    Verified,
    Waiting,
)
from onenet_ota.protocol.codes import Dialect
from onenet_ota.sim.config import FleetConfig, SimulationError
from onenet_ota.sim.metrics import FleetMetrics
from onenet_ota.sim.profiles import PROFILES, ClientProfile, dialect_of, profile_of
from onenet_ota.sim.provision import FleetTarget
from onenet_ota.sim.storage import (
    CheckingInstaller,
    DefectiveInstaller,
    InstalledCheck,
    SimStateStore,
)
from onenet_ota.sim.transport import (
    DeviceLink,
    FleetSender,
    FleetTransport,
    PowerCut,
    device_context,
    in_device_context,
)

__all__ = [
    "DefectiveInstaller",
    "DeviceLogPolicy",
    "DeviceRecord",
    "Fleet",
    "FleetState",
    "Phase",
    "Shard",
    "make_state_root",
]

log = logging.getLogger(__name__)

_KEEP_ERRORS: Final = 5
_PAUSE_LIMIT_S: Final = 60.0  # a paused task is waited on this long before the device defers
_PAUSE_POLL_S: Final = 2.0
_BACKOFF_MAX_S: Final = 10.0
POOL_SIZE: Final = 8  # connections per httpx2 pool (see FleetTransport)


class Phase(StrEnum):
    """Where a device is, for the live view. The last six are how its upgrade ended."""

    WAITING = "waiting"  # not started yet
    CHECKING = "checking"  # E1, E3; after a power cut, rebooting
    DOWNLOADING = "downloading"  # E5/E6 chunk after chunk
    INSTALLING = "installing"  # verified: 101, install, 201
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEFERRED = "deferred"
    CANCELLED = "cancelled"
    FINISHED = "finished"
    NO_TASK = "no_task"

    @property
    def done(self) -> bool:
        """Whether the device's upgrade has ended."""
        return self not in _RUNNING


_RUNNING: Final = frozenset({Phase.WAITING, Phase.CHECKING, Phase.DOWNLOADING, Phase.INSTALLING})


@dataclass(slots=True)
class DeviceRecord:
    """One virtual device: what it did and how it ended.

    ``accepted`` counts the status codes (101-107, 201-208) the server acknowledged with errno 0;
    a code acknowledged twice would be a duplicated report. Its counter is made on first use: a
    fleet holds a record for each of up to 100,000 devices from the start, and most of them
    wait, so a waiting device costs its record alone. ``installed_ok`` says whether the
    installed file matched the package (None when nothing was installed). ``index`` is the
    device's place in the fleet, ``name`` its name on the server; ``dialect`` and ``profile``
    say how it talks (:mod:`onenet_ota.sim.profiles`).
    """

    dev_id: int
    index: int = 0
    name: str = ""
    dialect: Dialect = Dialect.CLASSIC
    profile: str = "default"
    phase: Phase = Phase.WAITING
    result: UpgradeResult | None = None
    runs: int = 0
    power_cuts: int = 0
    installed_ok: bool | None = None
    error: str = ""
    _accepted: Counter[int] | None = field(default=None, repr=False)

    @property
    def accepted(self) -> Counter[int]:
        """The status codes the server acknowledged, and how often."""
        if self._accepted is None:
            self._accepted = Counter()
        return self._accepted


@dataclass(slots=True)
class FleetState:
    """The whole fleet, live: records, phase counts, HTTP metrics, upgrader events."""

    devices: list[DeviceRecord]
    metrics: FleetMetrics = field(default_factory=FleetMetrics)
    phases: Counter[Phase] = field(default_factory=Counter)
    retries: int = 0
    retry_steps: Counter[str] = field(default_factory=Counter)  # retries by the step retried
    device_logs: Counter[str] = field(default_factory=Counter)  # SDK records held back, by level
    waits: int = 0
    restarts: int = 0
    recent_errors: deque[str] = field(default_factory=lambda: deque(maxlen=_KEEP_ERRORS))
    started_at: float = 0.0
    finished_at: float | None = None
    interrupted: bool = False

    @property
    def elapsed(self) -> float:
        """Seconds since the fleet started (until it finished)."""
        if not self.started_at:
            return 0.0
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    @property
    def done(self) -> int:
        """Devices whose upgrade has ended."""
        return sum(n for phase, n in self.phases.items() if phase.done)

    def move(self, record: DeviceRecord, phase: Phase) -> None:
        """Put ``record`` into ``phase`` (keeping the counts)."""
        if record.phase is phase:
            return
        self.phases[record.phase] -= 1
        self.phases[phase] += 1
        record.phase = phase


_OUTCOME_PHASE: Final = {
    Outcome.SUCCEEDED: Phase.SUCCEEDED,
    Outcome.FAILED: Phase.FAILED,
    Outcome.DEFERRED: Phase.DEFERRED,
    Outcome.CANCELLED: Phase.CANCELLED,
    Outcome.FINISHED: Phase.FINISHED,
    Outcome.NO_TASK: Phase.NO_TASK,
}


SDK_LOGGER: Final = "onenet_ota.device"


class DeviceLogPolicy(logging.Filter):
    """The simulator's logging policy for its virtual devices: the device SDK's records below
    ERROR that a virtual device causes are counted by level (``counts``) and not emitted.

    Why: each virtual device runs the SDK's real upgrader, which logs what an operator of one
    device wants to read (a WARNING per retry, an INFO per report). Multiplied by a fleet, with
    connections dropped on purpose, that is tens of thousands of lines that say what the fleet's
    report says in one: retries counted by step (:attr:`FleetState.retry_steps`) and these
    counts. Records are told apart by the simulated device's context
    (:func:`~onenet_ota.sim.transport.device_context`), so a real device's client in the same
    process logs as always, and nothing is changed on the SDK's side. ERROR and above still go
    out: they are not the noise of a drill.
    """

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts
        self._loggers: list[logging.Logger] = []

    def filter(self, record: logging.LogRecord) -> bool:
        """False (held back, counted) for a virtual device's record below ERROR."""
        if record.levelno >= logging.ERROR or not in_device_context():
            return True
        self.counts[record.levelname] += 1
        return False

    def install(self) -> None:
        """Attach to the SDK's loggers (a logger's filters see only its own records)."""
        manager = logging.Logger.manager
        names = {SDK_LOGGER, *(n for n in manager.loggerDict if n.startswith(SDK_LOGGER + "."))}
        self._loggers = [logging.getLogger(name) for name in sorted(names)]
        for logger in self._loggers:
            logger.addFilter(self)

    def remove(self) -> None:
        """Detach from every logger :meth:`install` attached to."""
        for logger in self._loggers:
            logger.removeFilter(self)
        self._loggers = []


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop a fleet runs in: uvloop's if installed (the ``server`` extra, which the
    simulator's local server needs anyway), else asyncio's.

    Why: a simulator process is CPU-bound, and at 64 devices at once a share of its CPU is the
    event loop's own (its transports' reads and writes, handles, timers). libuv's loop does that
    part in C; the devices' SDK, their HTTP and their files are the same on either loop (the
    SDK's async transport is an asyncio protocol, which uvloop runs as asyncio does).

    The server's HTTP layer has the same six lines; they are not shared because the simulator's
    devices depend only on the device SDK and the management client (docs/architecture.md).
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def make_state_root(config: FleetConfig) -> Path:
    """A new temporary directory for the devices' state directories (the caller removes it)."""
    base = config.state_base()
    try:
        return Path(tempfile.mkdtemp(prefix="onenet-ota-sim-devices-", dir=base))
    except OSError as exc:
        raise SimulationError(
            f"cannot make the devices' state directories in {base}: {exc.strerror or exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class Shard:
    """The share of the fleet one process runs (see :mod:`onenet_ota.sim.shards`).

    ``indices`` are positions in the target's device list; ``started_at`` is the whole fleet's
    start (``time.monotonic()``, comparable across processes); ``root`` is the parent's
    directory for state directories.
    """

    number: int
    indices: tuple[int, ...]
    concurrency: int
    started_at: float
    root: Path


class Fleet:
    """Runs ``target``'s devices against ``base_url`` as ``config`` says; see the module doc.

    ``inner_transport`` replaces the real HTTP transport (tests of error paths only).
    """

    def __init__(
        self,
        config: FleetConfig,
        target: FleetTarget,
        base_url: str,
        *,
        inner_transport: httpx2.AsyncBaseTransport | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.base_url = base_url.rstrip("/")
        self.shard = shard
        indices = range(len(target.dev_ids)) if shard is None else shard.indices
        self._indices = tuple(indices)
        self.state = FleetState(
            [
                DeviceRecord(
                    target.dev_ids[i],
                    index=i,
                    name=target.names[i],
                    dialect=dialect_of(config.dialect, i),
                    profile=profile_of(config.profile, i).name,
                )
                for i in self._indices
            ]
        )
        self.state.phases[Phase.WAITING] = len(self.state.devices)
        self._rng = random.Random(
            config.seed if shard is None or config.seed is None else f"{config.seed}:{shard.number}"
        )
        self._credentials = Credentials.from_access_key(target.pid, target.access_key)
        self._inner = inner_transport
        self._tls: ssl.SSLContext | None = None
        # The faults' draws (drops, which half of a power cut): one source per process.
        self._fault_rng = random.Random(self._rng.random())
        self._installed = InstalledCheck(target.size, target.md5)

    def _expected_requests(self, options: UpgradeOptions) -> int:
        """E1, E3, (E5, E6) per chunk, progress reports, 100, 101, 201, E1: where a cut may
        land."""
        chunks = math.ceil(self.target.size / options.chunk_size)
        step = options.progress_step
        reports = min(chunks, 100 // step) if step else 0
        return 2 + 2 * chunks + reports + 4

    def _device_config(self, record: DeviceRecord, profile: ClientProfile) -> DeviceConfig:
        dialect = record.dialect
        if dialect is Dialect.CLASSIC:
            credentials = self._credentials  # the product-level token, shared
        else:
            # The device-level token Studio's C SDK and fuse clients send (§13.7), signed with
            # the product's key (D4): the simulator's devices have no keys of their own.
            credentials = Credentials.for_dialect(
                dialect, self.target.pid, self.target.access_key, device_name=record.name
            )
        return DeviceConfig(
            credentials=credentials,
            dev_id=str(record.dev_id),
            version=self.target.version,
            type=self.target.task_type,
            dialect=dialect,
            product_id=None if dialect is Dialect.CLASSIC else self.target.pid,
            device_name=None if dialect is Dialect.CLASSIC else record.name,
            keep_alive=profile.keep_alive,
            range_for_whole_file=not profile.whole_file,
        )

    def _options(
        self, signal: int | None, power: int | None, profile: ClientProfile, index: int
    ) -> UpgradeOptions:
        config = self.config
        return UpgradeOptions(
            chunk_size=profile.chunk_size(index, config.chunk_size),
            token_check=profile.token_check,
            progress_step=(
                config.progress_step if profile.progress_step is None else profile.progress_step
            ),
            report_full_progress=profile.report_full_progress,
            signal_probe=None if signal is None else (lambda: signal),
            power_probe=None if power is None else (lambda: power),
            gate=GatePolicy.FAIL if config.gate_fail else GatePolicy.DEFER,
            retry=Retry(
                attempts=config.retry_attempts,
                interval=config.retry_interval,
                backoff_max=max(config.retry_interval, _BACKOFF_MAX_S),
                pause_limit=_PAUSE_LIMIT_S,
                pause_poll=_PAUSE_POLL_S,
            ),
        )

    def run_until_stopped(self, on_tick: Callable[[FleetState], None] | None = None) -> FleetState:
        """:meth:`run` in a new event loop; SIGINT/SIGTERM end it as interrupted (on the main
        thread; elsewhere signals are left alone). The caller's signal handlers are restored."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None

            def stop() -> None:
                self.state.interrupted = True
                task.cancel()

            handled = []
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stop)
                    handled.append(signum)
            try:
                await self.run(on_tick)
            except asyncio.CancelledError:
                if not self.state.interrupted:
                    raise
            finally:
                for signum in handled:
                    loop.remove_signal_handler(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(main())
        finally:
            # asyncio resets the handlers it replaced to the defaults; put the caller's back.
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
        return self.state

    async def run(
        self, on_tick: Callable[[FleetState], None] | None = None, *, tick: float = 0.5
    ) -> FleetState:
        """Run every device to the end of its upgrade; returns the final :class:`FleetState`.

        ``on_tick`` is called every ``tick`` seconds while the fleet runs, and once at the end.
        Cancelling the caller stops the fleet; the state then says what had finished. With
        ``config.processes`` above 1 the devices are shared out to that many processes
        (:mod:`onenet_ota.sim.shards`).
        """
        config = self.config
        if self.shard is None and config.processes > 1:
            from onenet_ota.sim.shards import run_sharded

            return await run_sharded(self, on_tick, tick)
        state = self.state
        shard = self.shard
        concurrency = config.concurrency if shard is None else shard.concurrency
        total = len(self.target.dev_ids)
        # One pool per POOL_SIZE workers: each worker runs one device at a time, so no pool
        # ever needs more than POOL_SIZE connections.
        pools = math.ceil(concurrency / POOL_SIZE)
        sdk = config.http == "sdk" and self._inner is None
        # One CA load for all devices (only an https:// server needs it).
        self._tls = ssl.create_default_context() if self.base_url.startswith("https:") else None

        def make_pools(keepalive: int) -> list[httpx2.AsyncBaseTransport]:
            if self._inner is not None:
                return [self._inner]
            tls = httpx2.create_ssl_context(verify=True, trust_env=False)  # one CA load for all
            limits = httpx2.Limits(max_connections=POOL_SIZE, max_keepalive_connections=keepalive)
            return [
                httpx2.AsyncHTTPTransport(verify=tls, limits=limits, trust_env=False)
                for _ in range(pools)
            ]

        # Clients that open a connection for every request (profiles without
        # reuse_connections) send through pools that keep no idle connection.
        transport: FleetTransport | None = None
        if not sdk:
            once = any(not profile_of(config.profile, i).reuse_connections for i in self._indices)
            transport = FleetTransport(
                make_pools(POOL_SIZE),
                state.metrics,
                drop_rate=config.drop_rate,
                rng=self._fault_rng,
                fresh=make_pools(0) if once else None,
            )
        root = make_state_root(config) if shard is None else shard.root
        policy = DeviceLogPolicy(state.device_logs)
        policy.install()
        next_index = iter(enumerate(self._indices))
        # A shard's clock is the whole fleet's: CLOCK_MONOTONIC is system-wide.
        state.started_at = time.monotonic() if shard is None else shard.started_at
        try:
            async with contextlib.AsyncExitStack() as stack:
                http = None
                if transport is not None:
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(transport=transport, trust_env=False)
                    )

                async def worker(number: int) -> None:
                    for local, index in next_index:
                        start_at = state.started_at + config.ramp_up * index / total
                        delay = start_at - time.monotonic()
                        if delay > 0:
                            await anyio.sleep(delay)
                        pool = number // POOL_SIZE
                        await self._device(state.devices[local], http, root, pool)

                async with anyio.create_task_group() as group:
                    if on_tick is not None:
                        group.start_soon(self._ticker, on_tick, tick)
                    async with anyio.create_task_group() as workers:
                        for number in range(concurrency):
                            workers.start_soon(worker, number)
                    group.cancel_scope.cancel()  # the ticker
        except BaseException:
            state.interrupted = True
            raise
        finally:
            policy.remove()
            state.finished_at = time.monotonic()
            if shard is None:
                shutil.rmtree(root, ignore_errors=True)
            if on_tick is not None:
                on_tick(state)
        return state

    def _sender(self, link: DeviceLink, profile: ClientProfile) -> FleetSender:
        """The SDK's own transport for one device run, metered and faulty (``http="sdk"``).

        A device that keeps no idle connection (``keep_alive`` or ``reuse_connections`` off)
        gets a transport that pools none, so each request opens a connection of its own.
        """
        inner = AsyncTransport(
            self._tls,
            user_agent=USER_AGENT,
            keep_alive=profile.keep_alive and profile.reuse_connections,
        )
        return FleetSender(
            inner,
            link,
            self.state.metrics,
            drop_rate=self.config.drop_rate,
            rng=self._fault_rng,
        )

    async def _ticker(self, on_tick: Callable[[FleetState], None], tick: float) -> None:
        while True:
            await anyio.sleep(tick)
            on_tick(self.state)

    async def _device(
        self, record: DeviceRecord, http: httpx2.AsyncClient | None, root: Path, pool: int
    ) -> None:
        try:
            await self._upgrade(record, http, root / str(record.dev_id), pool)
        except Exception as exc:  # a simulator bug must not stop the other devices
            log.exception("device %s: unexpected error", record.dev_id)
            record.error = f"simulator error: {type(exc).__name__}: {exc}"
            self.state.move(record, Phase.FAILED)

    async def _upgrade(
        self, record: DeviceRecord, http: httpx2.AsyncClient | None, home: Path, pool: int
    ) -> None:
        config = self.config
        state = self.state
        # Per device, so that --seed repeats each device's probes and power-cut plan.
        rng = (
            random.Random(f"{config.seed}:{record.dev_id}")
            if config.seed is not None
            else self._rng
        )
        signal = (
            None if config.signal is None else rng.randint(config.signal.low, config.signal.high)
        )
        power = None if config.power is None else rng.randint(config.power.low, config.power.high)
        profile = PROFILES[record.profile]
        options = self._options(signal, power, profile, record.index)
        expected_requests = self._expected_requests(options)
        device_config = self._device_config(record, profile)
        installer: CheckingInstaller | DefectiveInstaller = CheckingInstaller(self._installed)
        if config.defective_rate and rng.random() < config.defective_rate:
            installer = DefectiveInstaller(rng.choice(config.defective_codes))
        link = DeviceLink(pool=pool, fresh=not profile.reuse_connections)

        def on_client_event(event: OtaEvent) -> None:
            if isinstance(event, StatusReported) and event.code > 100:
                record.accepted[event.code] += 1

        def on_event(event: UpgradeEvent) -> None:
            if isinstance(event, TaskFound):
                phase = Phase.DOWNLOADING if event.phase == "downloading" else Phase.INSTALLING
                state.move(record, phase)
            elif isinstance(event, Verified):
                state.move(record, Phase.INSTALLING)
            elif isinstance(event, Retrying):
                state.retries += 1
                state.retry_steps[event.step] += 1
                state.recent_errors.append(f"{record.dev_id} {event.step}: {event.error}")
            elif isinstance(event, Waiting):
                state.waits += 1
            elif isinstance(event, Restarted):
                state.restarts += 1

        state.move(record, Phase.CHECKING)
        with device_context(link):
            while True:
                if record.power_cuts < config.max_power_cuts and (
                    config.power_cut_rate and rng.random() < config.power_cut_rate
                ):
                    link.cut_at = link.requests + rng.randint(1, expected_requests)
                client = AsyncOtaClient(
                    device_config,
                    base_url=self.base_url,
                    http_client=http,
                    timeout=Timeout(config.timeout_ms),
                    on_event=on_client_event,
                )
                if http is None:
                    client._sender = self._sender(link, profile)
                upgrader = AsyncUpgrader(
                    client,
                    installer,
                    state_dir=home,
                    options=options,
                    on_event=on_event,
                )
                upgrader.store = SimStateStore(home, device_config.type)
                record.runs += 1
                try:
                    result = await upgrader.run()
                except PowerCut:
                    record.power_cuts += 1
                    state.move(record, Phase.CHECKING)  # rebooting
                    continue
                finally:
                    link.cut_at = None  # a cut planned for this run dies with it
                    await client.aclose()  # the shared pool stays open
                break
        record.result = result
        if isinstance(installer, CheckingInstaller):
            record.installed_ok = installer.installed
        with contextlib.suppress(OSError):
            shutil.rmtree(home)
        state.move(record, _OUTCOME_PHASE[result.outcome])

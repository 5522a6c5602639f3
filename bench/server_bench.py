"""Server benchmark: check-task and 4 KiB range downloads against a bare JSON endpoint, and one
device's upgrade.

Run::

    .venv/bin/python -m bench.server_bench                 # about a minute
    .venv/bin/python -m bench.server_bench --only keep-alive --only check-task --profile

What it does:

1. Builds the real platform in a temporary directory: a SQLite file migrated with Alembic, and
   the app of :func:`onenet_ota.server.app.create_app`. It seeds one product (key K1 of
   Appendix B.1), ``--devices`` devices, a 256 KiB FOTA package and one task for every device,
   all through the management layer (:class:`AdminService`), then runs E3 once per device
   through the device service so that every device holds a download token and has recorded its
   version (later E3s are then read-only, as in steady-state polling).
2. Serves, in this process, one handler on the project's own HTTP stack: ``GET /bare`` answers a
   fixed 26-byte JSON (``{"errno":0,"error":"succ"}``, the smallest canonical device reply);
   every other path goes to the real app.
3. Drives load from a separate process (``multiprocessing`` spawn), so that the client does not
   share the server's interpreter: the load generator of :mod:`bench.loadgen` (raw non-blocking
   sockets and one epoll loop, Linux), with pre-built request bytes in the C SDK's exact format
   and responses framed by ``Content-Length`` and checked for status and errno. It costs far
   less per request than an asyncio client, so one client process can keep the one-process
   server busy on a 2-core machine. ``--concurrency`` (64) clients run in two modes:

   - ``keep-alive``: 64 persistent connections, each sending its next request as soon as the
     previous response is complete;
   - ``per-connection``: like the C SDK, each request on a fresh TCP connection that the client
     closes after the response (with SO_LINGER 0, so that the run does not exhaust ephemeral
     ports with TIME_WAIT sockets).

   For each mode it measures ``bare``, ``check-task`` (E3 across all devices, round robin, so
   each device polls again only after all the others: its answer comes from the device API's
   cache, which the change feed keeps current, or from the database when the entry has reached
   its maximum age or was dropped), ``check-hot`` (E3 from only ``--concurrency`` devices that
   poll again and again), ``check-cold`` (E3 across all devices on a second device API over the
   same database with its caches off, so every request reads the database: reported, no target)
   and ``download`` (E6 with ``Range:<s>-<s+4095>``, 256 devices each fetching its 64 chunks in
   order, like the C SDK's loop, interleaved across devices), and the same two over fuse-ota
   (§13): ``fuse-check`` (F-C across all devices, each with its device-level ``2022-05-01``
   token, the fuse default of §13.7) and ``fuse-dl`` (F-D with ``Range: bytes=``, as
   ``download``). Last, in keep-alive mode only, one device's real upgrade: ``upgrade-4k`` and
   ``upgrade-64k``, a device of its own with a real task on a 64 MiB package and the token its
   E3 was issued, fetching the package in order with E5 then E6 for every chunk (the C SDK's
   loop, §7) on one connection; the chunk cache is emptied (and which chunks were read,
   forgotten) before each run, so that every chunk is read from the file as in a device's first
   download; and ``bare-1``, the bare endpoint on one connection in the same rhythm: the floor
   of those requests (each pays a wake-up of the server, which 64 connections share). Each run
   has ``--warmup`` seconds unmeasured, and at least one unmeasured pass over its requests
   (every device's first request of a run fills the caches that check-task and fuse-check are
   meant to find warm), then ``--duration`` seconds measured; the seventeen scenarios run
   ``--rounds`` times, interleaved, so that load from elsewhere on a shared machine drifts over
   all of them alike, and each reports its median.

It prints requests/s per scenario, the server's CPU use (process CPU time over wall time: close
to 1.0 means the server was the bottleneck; well below it, the client or the machine was) and
its CPU time per request, and the ratios to ``bare`` against the targets in docs/performance.md
(check-task and download each at least 0.5x bare, and so fuse-check and fuse-dl; check-hot is
reported against the same bar, check-cold, in keep-alive mode, against at least 0.3x); for the
upgrades, their CPU time per request against the keep-alive ``download``'s (at most 1.5x), and
for reference against ``bare-1``'s. Each
CPU time per request is shown with its system part (the kernel's: the sockets, SQLite's locks,
and on loopback the client's side of TCP, which the server's send runs).
The run is bounded (rounds x 17 x (warmup + duration) seconds, 128 s by default, plus setup) and
exits 0 whether or not a target is met; it exits 1 only if the setup fails or a scenario completes
no request. ``--profile`` runs the server's event-loop thread under cProfile (the device API runs
its database calls on that thread) and prints its top functions after the run; ``--only``
restricts the run to scenarios (``bare``, ``check-task``, ``check-hot``, ``check-cold``,
``download``, ``fuse-check``, ``fuse-dl``, ``bare-1``, ``upgrade-4k``, ``upgrade-64k``) and/or
modes.
``--handler`` skips HTTP: it calls the device API in this process and prints its CPU time per
request for each scenario (the HTTP layer excluded), a figure that a loaded shared machine
disturbs far less than the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing
import multiprocessing.connection
import os
import pstats
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import SecretStr
from tests.serverthread import ServerThread

from bench.loadgen import Result, Scenario, load_generator
from onenet_ota import auth
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.admin_service import (
    DeviceImport,
    DeviceImportItem,
    PackageCreate,
    ProductCreate,
    TaskCreate,
)
from onenet_ota.server.app import SERVED_FLUSH_S, create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.http import Request, Response

PID: Final = "123123"
K1: Final = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1
# The C SDK's Authorization header (Appendix B.1 vector 3): product level, sha1, et 2050.
AUTHORIZATION: Final = (
    "version=2018-10-31&res=products%2F123123&et=2524579200&method=sha1"
    "&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"
)
PACKAGE_SIZE: Final = 256 * 1024
CHUNK: Final = 4096
FIRST_DEV_ID: Final = 100_000_001
BARE_BODY: Final = b'{"errno":0,"error":"succ"}'
BARE_RESPONSE: Final = Response(
    200,
    [("Content-Type", "application/json"), ("Content-Length", str(len(BARE_BODY)))],
    BARE_BODY,
)
TARGET_RATIO: Final = 0.5
# The cold poll reads the database on every request: a bar of its own, over keep-alive.
COLD_TARGET: Final = 0.3
# One device's real upgrade: its own task on a package large enough that no chunk of one run is
# still cached from the run before (the chunk cache holds 16 MiB), fetched chunk after chunk
# with an E5 before each, as the C SDK does (§7), in 4 KiB and in 64 KiB chunks.
UPGRADE_PACKAGE_SIZE: Final = 64 * 1024 * 1024
UPGRADE_CHUNKS: Final = {"upgrade-4k": 4096, "upgrade-64k": 64 * 1024}
UPGRADE_TARGET: Final = 1.5  # server CPU per request, at most this times the cached download's
# The scenarios run on one connection: the upgrades, and the bare endpoint as their floor.
ONE_CONNECTION: Final = ("bare-1", *UPGRADE_CHUNKS)


# ---------------------------------------------------------------------------------------------
# Requests, in the C SDK's exact format (§8.1, Appendix C)


def bare_request() -> bytes:
    return (
        "GET /bare HTTP/1.1\r\n"
        "Host:ota.heclouds.com\r\n"
        "Content-Type:application/json\r\n"
        f"Authorization:{AUTHORIZATION}\r\n"
        "\r\n"
    ).encode()


def check_task_request(dev_id: int) -> bytes:
    return (
        f"GET /ota/south/check?type=1&version=1.0.0&cdn=false&dev_id={dev_id} HTTP/1.1\r\n"
        "Host:ota.heclouds.com\r\n"
        "Content-Type:application/json\r\n"
        f"Authorization:{AUTHORIZATION}\r\n"
        "\r\n"
    ).encode()


def download_request(token: str, start: int, chunk: int = CHUNK) -> bytes:
    return (
        f"GET /ota/south/download/{token} HTTP/1.1\r\n"
        "Host:ota.heclouds.com\r\n"
        f"Authorization:{AUTHORIZATION}\r\n"
        f"Range:{start}-{start + chunk - 1}\r\n"
        "\r\n"
    ).encode()


def check_token_request(dev_id: int, token: str) -> bytes:
    """E5 as the C SDK sends it before every chunk (§6.5)."""
    return (
        f"GET /ota/south/download/{token}/check?dev_id={dev_id} HTTP/1.1\r\n"
        "Host:ota.heclouds.com\r\n"
        "Content-Type:application/json\r\n"
        f"Authorization:{AUTHORIZATION}\r\n"
        "\r\n"
    ).encode()


def fuse_check_request(dev_id: int) -> bytes:
    """F-C as the field's fuse clients send it (§13.1), with a device-level 2022-05-01 token
    (§13.7's default)."""
    return (
        f"GET /fuse-ota/{PID}/dev{dev_id}/check?type=1&version=1.0.0 HTTP/1.1\r\n"
        "Host: iot-api.heclouds.com\r\n"
        f"Authorization: {fuse_authorization(dev_id)}\r\n"
        "\r\n"
    ).encode()


def fuse_download_request(dev_id: int, tid: int, start: int) -> bytes:
    """F-D with ``Range: bytes=`` (§13.1)."""
    return (
        f"GET /fuse-ota/{PID}/dev{dev_id}/{tid}/download HTTP/1.1\r\n"
        "Host: iot-api.heclouds.com\r\n"
        f"Authorization: {fuse_authorization(dev_id)}\r\n"
        f"Range: bytes={start}-{start + CHUNK - 1}\r\n"
        "\r\n"
    ).encode()


def fuse_authorization(dev_id: int) -> str:
    return auth.build_token(PID, K1, device_name=f"dev{dev_id}", version=auth.VERSION_2022)


# ---------------------------------------------------------------------------------------------
# The server side


@dataclass(frozen=True)
class Upgrader:
    """The device of the one-device upgrade scenarios, with its real download token."""

    dev_id: int
    token: str


def seed(
    settings: Settings, devices: int
) -> tuple[Any, Any, list[int], list[str], list[int], Upgrader]:
    """Create the app and its data; returns (handler, resources, dev_ids, tokens, tids,
    upgrader)."""
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    service = resources.admin_api.service
    service.create_product(ProductCreate(pid=PID, access_key=K1, name="bench"))
    dev_ids = [FIRST_DEV_ID + i for i in range(devices)]
    for first in range(0, devices, 10_000):
        batch = dev_ids[first : first + 10_000]
        service.import_devices(
            DeviceImport(
                pid=PID,
                devices=[DeviceImportItem(name=f"dev{dev_id}", dev_id=dev_id) for dev_id in batch],
            )
        )
    blob = resources.blobs.put_bytes(random.Random(1).randbytes(PACKAGE_SIZE))
    package = service.create_package(
        PackageCreate(pid=PID, module_type=1, target="1.0.1", file_name="firmware.bin"), blob
    )
    service.create_task(TaskCreate(package_id=package.id, dev_ids=dev_ids, retry=3, interval=1))
    device_service = resources.device_api.service
    tokens = []
    for dev_id in dev_ids:
        errno, info = device_service.check_task(dev_id, TaskType.FOTA, "1.0.0")
        if info is None:
            raise RuntimeError(f"seeding failed: E3 for {dev_id} answered errno {int(errno)}")
        tokens.append(info.token)
    tids = []
    for dev_id in dev_ids:
        errno, tid_info = device_service.check_task_tid(dev_id, TaskType.FOTA, "1.0.0")
        if tid_info is None:
            raise RuntimeError(f"seeding failed: F-C for {dev_id} answered errno {int(errno)}")
        tids.append(tid_info.tid)
    upgrader = seed_upgrader(resources, FIRST_DEV_ID - 1)
    # F-C's first offers are kept back (a poll stays a read) until the periodic flush: write
    # them now, or the first measured run pays for writing 2000 timeline rows.
    resources.device_api.flush_served()
    return handler, resources, dev_ids, tokens, tids, upgrader


def seed_upgrader(resources: Any, dev_id: int) -> Upgrader:
    """A device of its own with a task on a package of its own, offered by E3 (its token)."""
    service = resources.admin_api.service
    service.import_devices(
        DeviceImport(pid=PID, devices=[DeviceImportItem(name=f"dev{dev_id}", dev_id=dev_id)])
    )
    blob = resources.blobs.put_bytes(random.Random(2).randbytes(UPGRADE_PACKAGE_SIZE))
    package = service.create_package(
        PackageCreate(pid=PID, module_type=1, target="1.0.2", file_name="big.bin"), blob
    )
    service.create_task(TaskCreate(package_id=package.id, dev_ids=[dev_id], retry=3, interval=1))
    errno, info = resources.device_api.service.check_task(dev_id, TaskType.FOTA, "1.0.0")
    if info is None:
        raise RuntimeError(f"seeding failed: E3 for the upgrader answered errno {int(errno)}")
    return Upgrader(dev_id, info.token)


COLD_PREFIX: Final = "/cold"


def bench_handler(app: Any, cold: DeviceApi) -> Any:
    """The bare endpoint on ``/bare``; ``/cold/...`` to a device API without caches; everything
    else to the real app."""

    async def handle(request: Request) -> Response:
        path = request.path
        if path == "/bare":
            return BARE_RESPONSE
        if path.startswith(COLD_PREFIX):
            request.path = path[len(COLD_PREFIX) :]
            return await cold.handle(request)
        response: Response = await app(request)
        return response

    return handle


def upgrade_scenario(name: str, upgrader: Upgrader) -> Scenario:
    """One device's upgrade: E5 then E6 for each chunk of its package, in order."""
    chunk = UPGRADE_CHUNKS[name]
    check = check_token_request(upgrader.dev_id, upgrader.token)
    requests: list[bytes] = []
    for start in range(0, UPGRADE_PACKAGE_SIZE, chunk):
        requests += [check, download_request(upgrader.token, start, chunk)]
    ok = (b"200", b'{"errno":0,"error":"succ"}')
    chunk_ok = (b"206", f"Content-Length: {chunk}\r\n".encode())
    return Scenario(
        name,
        "keep-alive",
        requests,
        b"",
        b"",
        expectations=[ok, chunk_ok] * (len(requests) // 2),
    )


def scenarios(
    dev_ids: list[int],
    tokens: list[str],
    tids: list[int],
    upgrader: Upgrader,
    *,
    download_devices: int,
    hot_devices: int,
) -> list[Scenario]:
    rng = random.Random(7)
    bare = [bare_request()]
    check = [check_task_request(dev_id) for dev_id in dev_ids]
    rng.shuffle(check)
    hot = check[:hot_devices]
    cold = [r.replace(b"GET /ota/", b"GET " + COLD_PREFIX.encode() + b"/ota/", 1) for r in check]
    # Each device downloads its package chunk after chunk, as the C SDK does (§7); requests of
    # different devices are interleaved, so no two clients fetch for one device at once.
    devices = rng.sample(tokens, min(download_devices, len(tokens)))
    download = [
        download_request(token, chunk * CHUNK)
        for chunk in range(PACKAGE_SIZE // CHUNK)
        for token in devices
    ]
    fuse_check = [fuse_check_request(dev_id) for dev_id in dev_ids]
    rng.shuffle(fuse_check)
    fuse_devices = rng.sample(range(len(dev_ids)), min(download_devices, len(dev_ids)))
    fuse_download = [
        fuse_download_request(dev_ids[i], tids[i], chunk * CHUNK)
        for chunk in range(PACKAGE_SIZE // CHUNK)
        for i in fuse_devices
    ]
    fuse_ok = b'"code":0,"msg":"succ"'
    result = []
    for mode in ("keep-alive", "per-connection"):
        result += [
            Scenario("bare", mode, bare, b"200", b'"errno":0'),
            Scenario("check-task", mode, check, b"200", b'"errno":0,"error":"succ","data"'),
            Scenario("check-hot", mode, hot, b"200", b'"errno":0,"error":"succ","data"'),
            Scenario("check-cold", mode, cold, b"200", b'"errno":0,"error":"succ","data"'),
            Scenario("download", mode, download, b"206", b"Content-Length: 4096\r\n"),
            Scenario("fuse-check", mode, fuse_check, b"200", fuse_ok),
            Scenario("fuse-dl", mode, fuse_download, b"206", b"Content-Length: 4096\r\n"),
        ]
    # The floor of one device's requests: the bare endpoint over one connection, a request only
    # after the previous response, as the upgrades (so each pays a wake-up of the server).
    result.append(Scenario("bare-1", "keep-alive", bare, b"200", b'"errno":0'))
    result += [upgrade_scenario(name, upgrader) for name in UPGRADE_CHUNKS]
    return result


def _run_in_loop(server: ServerThread, fn: Any) -> None:
    """Call ``fn`` on the server's loop thread and wait for it (cProfile is per thread)."""
    done = threading.Event()

    def call() -> None:
        fn()
        done.set()

    server.loop.call_soon_threadsafe(call)
    done.wait(10)


MODES: Final = ("keep-alive", "per-connection")
NAMES: Final = (
    "bare",
    "check-task",
    "check-hot",
    "check-cold",
    "download",
    "fuse-check",
    "fuse-dl",
    *ONE_CONNECTION,
)
TARGETED: Final = ("check-task", "check-hot", "download", "fuse-check", "fuse-dl")


@dataclass
class Measured:
    """Every round of one scenario."""

    scenario: Scenario
    rates: list[float]
    server_cpu: list[float]
    server_sys: list[float] = field(default_factory=list)  # the kernel's part of server_cpu
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def cpu_per_request(self) -> float:
        """The server's CPU seconds per request (median over the rounds)."""
        each = [cpu / rate for cpu, rate in zip(self.server_cpu, self.rates, strict=True) if rate]
        return statistics.median(each) if each else 0.0

    @property
    def sys_per_request(self) -> float:
        """The kernel's part of :attr:`cpu_per_request` (system time: the sockets, SQLite's
        locks, and on loopback the client's side of TCP, which the sender's send runs)."""
        each = [cpu / rate for cpu, rate in zip(self.server_sys, self.rates, strict=True) if rate]
        return statistics.median(each) if each else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per scenario")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    parser.add_argument("--devices", type=int, default=2000, help="devices with a task")
    parser.add_argument("--profile", action="store_true", help="cProfile the server")
    parser.add_argument(
        "--handler",
        action="store_true",
        help="no HTTP: the device API's CPU time per request, in this process",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=[*MODES, *NAMES],
        help="restrict to these scenarios and/or modes (repeatable)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.only if m in MODES] or list(MODES)
    names = [n for n in args.only if n in NAMES] or list(NAMES)

    with tempfile.TemporaryDirectory(prefix="onenet-ota-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            db=f"sqlite:///{Path(tmp) / 'bench.db'}",
            admin_token=SecretStr("bench-admin-token"),
        )
        print(f"seeding {args.devices} devices, one package, one task ...", flush=True)
        app, resources, dev_ids, tokens, tids, upgrader = seed(settings, args.devices)
        plan = [
            s
            for s in scenarios(
                dev_ids,
                tokens,
                tids,
                upgrader,
                download_devices=256,
                hot_devices=args.concurrency,
            )
            if s.mode in modes and s.name in names
        ]
        measured = [Measured(scenario, [], []) for scenario in plan]
        profiler = cProfile.Profile() if args.profile else None
        cold = DeviceApi(resources.engine, resources.blobs, cache_ttl=0)
        if args.handler:
            try:
                handler_costs(bench_handler(app, cold), plan, resources.device_api.service.caches)
            finally:
                cold.close()
                with contextlib.suppress(Exception):
                    asyncio.run(resources.aclose())
            return 0
        try:
            with ServerThread(bench_handler(app, cold)) as server:
                # As `serve` does: the bytes served and the kept first offers are written once
                # a second, on the server's loop.
                flusher = asyncio.run_coroutine_threadsafe(
                    resources.flush_served_forever(SERVED_FLUSH_S), server.loop
                )
                try:
                    run_rounds(server, measured, args, profiler, resources)
                finally:
                    server.loop.call_soon_threadsafe(flusher.cancel)
        finally:
            cold.close()
            with contextlib.suppress(Exception):
                asyncio.run(resources.aclose())
    report(measured, args)
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
        print(stream.getvalue())
    return 1 if any(m.rate == 0 for m in measured) else 0


def run_rounds(
    server: ServerThread,
    measured: list[Measured],
    args: argparse.Namespace,
    profiler: cProfile.Profile | None,
    resources: Any,
) -> None:
    """Run every scenario ``args.rounds`` times, interleaved, so that load from elsewhere on the
    machine drifts over all scenarios alike; each scenario reports its median. The one-device
    upgrades run on one connection, each after the chunk cache was emptied (no other device
    fetched the package before it)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    generator = ctx.Process(
        target=load_generator, args=(theirs, server.host, server.port), daemon=True
    )
    generator.start()
    options = {"warmup": args.warmup, "duration": args.duration, "concurrency": args.concurrency}
    try:
        for round_ in range(1, args.rounds + 1):
            for m in measured:
                scenario = m.scenario
                print(
                    f"  round {round_}: {scenario.mode:>14} {scenario.name:<10} ...",
                    end="",
                    flush=True,
                )
                # Every device's first request of a run fills the caches (the answers live 30 s,
                # and a round of the other scenarios takes longer): one pass over the scenario's
                # requests is warm-up however slowly it goes, so that check-task and fuse-check
                # measure repeated polls, as check-cold measures first ones.
                run_options = {**options, "warmup_requests": len(scenario.requests)}
                if scenario.name in ONE_CONNECTION:
                    run_options = {**options, "concurrency": 1}
                    resources.device_api.service.caches.forget_chunks()
                if profiler is not None:
                    # cProfile profiles the thread that enables it: the server's loop
                    _run_in_loop(server, profiler.enable)
                usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                ours.send((scenario, run_options))
                result: Result = ours.recv()
                # over the run's wall time: its warm-up pass may take longer than --warmup
                wall = time.monotonic() - wall
                after = resource.getrusage(resource.RUSAGE_SELF)
                system = after.ru_stime - usage.ru_stime
                m.server_cpu.append((after.ru_utime - usage.ru_utime + system) / wall)
                m.server_sys.append(system / wall)
                if profiler is not None:
                    _run_in_loop(server, profiler.disable)
                rate = result.completed / result.elapsed
                m.rates.append(rate)
                m.errors += result.errors
                m.first_error = m.first_error or result.first_error
                print(f" {rate:9.0f} req/s", flush=True)
    finally:
        ours.send(None)
        generator.join(10)
        if generator.is_alive():
            generator.kill()


def parse_request(raw: bytes) -> Request:
    """A request as the HTTP layer would hand it over (GET requests without a body)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ")
    path, _, query = target.partition("?")
    headers = [(name, value.strip()) for name, _, value in (h.partition(":") for h in head[1:])]

    async def no_body() -> bytes:
        return b""

    return Request(method, target, path, query, headers, "127.0.0.1", no_body)


def handler_costs(
    handle: Any, plan: list[Scenario], caches: Any, count: int = 3000, repeats: int = 7
) -> None:
    """Print, per scenario, the CPU time the handler spends on one request (the best of
    ``repeats`` runs of ``count`` requests after one unmeasured pass over the scenario's
    requests, the parsing of the request excluded). CPU time in one process, so a loaded
    machine disturbs it far less than the HTTP runs' ratios; the HTTP layer is not in it.
    The upgrades have no unmeasured pass, and the chunk cache of ``caches`` is emptied (and which
    chunks were read, forgotten) before each of their runs, as over HTTP."""
    loop = asyncio.new_event_loop()

    async def run(requests: list[bytes], n: int, call: bool) -> float:
        start = time.process_time()
        for i in range(n):
            request = parse_request(requests[i % len(requests)])
            if call:
                await handle(request)
        return (time.process_time() - start) / n * 1e6

    print(f"{'scenario':<11} {'handler CPU per request':>24}")
    try:
        for scenario in plan:
            if scenario.mode != "keep-alive":
                continue
            requests = scenario.requests
            upgrade = scenario.name in UPGRADE_CHUNKS
            if not upgrade:
                loop.run_until_complete(run(requests, len(requests), True))  # caches warm
            parse = min(loop.run_until_complete(run(requests, count, False)) for _ in range(3))
            costs = []
            for _ in range(repeats):
                if upgrade:
                    caches.forget_chunks()
                costs.append(loop.run_until_complete(run(requests, count, True)))
            best = min(costs)
            print(f"{scenario.name:<11} {best - parse:21.1f} us", flush=True)
    finally:
        loop.close()


def report(measured: list[Measured], args: argparse.Namespace) -> None:
    print()
    print(
        f"onenet-ota server benchmark: {args.concurrency} clients, {args.devices} devices, "
        f"median of {args.rounds} x {args.duration:g} s, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'mode':<15} {'scenario':<11} {'req/s':>9} {'vs bare':>8} {'server CPU':>11} "
        f"{'us/request':>10} {'of it sys':>9} errors"
    )
    rates = {(m.scenario.mode, m.scenario.name): m.rate for m in measured}
    per_request = {(m.scenario.mode, m.scenario.name): m.cpu_per_request for m in measured}
    for m in measured:
        bare = rates.get((m.scenario.mode, "bare"), 0.0)
        ratio = m.rate / bare if bare else 0.0
        cpu = statistics.median(m.server_cpu) if m.server_cpu else 0.0
        print(
            f"{m.scenario.mode:<15} {m.scenario.name:<11} {m.rate:9.0f} {ratio:7.2f}x "
            f"{cpu:10.2f} {m.cpu_per_request * 1e6:10.1f} {m.sys_per_request * 1e6:9.1f} "
            f"{m.errors}" + (f"  first: {m.first_error}" if m.errors else "")
        )
    print()
    cached = per_request.get(("keep-alive", "download"), 0.0)
    floor = per_request.get(("keep-alive", "bare-1"), 0.0)
    for name in UPGRADE_CHUNKS:
        own = per_request.get(("keep-alive", name))
        if own is None:
            continue
        against_floor = f" ({own / floor:.2f}x bare on one connection)" if floor else ""
        if not cached:
            print(f"       {name:<11} {own * 1e6:.1f} us of server CPU per request{against_floor}")
            continue
        ratio = own / cached
        verdict = "met" if ratio <= UPGRADE_TARGET else "MISSED"
        print(
            f"target {name:<11} {own * 1e6:.1f} us/request = {ratio:.2f}x the cached download's "
            f"{cached * 1e6:.1f} (<= {UPGRADE_TARGET}x): {verdict}{against_floor}"
        )
    for mode in MODES:
        bare = rates.get((mode, "bare"), 0.0)
        for name in NAMES[1:]:
            if not bare or (mode, name) not in rates or name in ONE_CONNECTION:
                continue
            ratio = rates[mode, name] / bare
            if name == "check-cold" and mode == "keep-alive":
                verdict = "met" if ratio >= COLD_TARGET else "MISSED"
                print(
                    f"target {mode:<15} {name:<11} {ratio:5.2f}x bare (>= {COLD_TARGET}x): "
                    f"{verdict}"
                )
                continue
            if name not in TARGETED:
                print(f"       {mode:<15} {name:<11} {ratio:5.2f}x bare (no target)")
                continue
            verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
            print(
                f"target {mode:<15} {name:<11} {ratio:5.2f}x bare (>= {TARGET_RATIO}x): {verdict}"
            )


if __name__ == "__main__":
    sys.exit(main())

"""Console benchmark: the web console's pages and live updates over a fleet of 100,000 devices.

Run::

    .venv/bin/python -m bench.console_bench                  # about two minutes
    .venv/bin/python -m bench.console_bench --devices 20000 --rounds 1

What it does:

1. Builds the real platform in a temporary directory (a SQLite file migrated with Alembic, the
   app of :func:`onenet_ota.server.app.create_app`, its console on) and fills it set-wise in SQL,
   the way :mod:`bench.scale_bench` does: one product (key K1 of Appendix B.1), ``--devices``
   devices with a label each (``site=s0..s9``, and ``ring=canary`` on a few), one active task
   over all but the last 1 % of them (each device task holding a download token, so the device
   API's check-task and download are read-only, as in steady polling: the measured devices'
   first check-task, which records the offer, runs before), 50 of them downloading,
   and 30 finished older tasks that give every device an upgrade history.
2. Page times: the app's handler is called in this process with a signed-in admin's session
   cookie, and the wall time of each page is the median of ``--samples`` calls after two
   unmeasured ones (the HTTP layer excluded: this is the server's time for the page, database
   and rendering included). The baseline in the same run is the sign-in page, which reads
   nothing. Target: every list and device page under 100 ms (docs/performance.md).
3. Live pages: with the server on loopback, a separate process holds ``--pages`` (20) event
   streams of the big task's page open while a thread in this process changes a device task
   every 0.2 s (so every period brings a new value to render and send). The server's CPU over
   ``--cpu-seconds`` is compared with the same window with no page open; the difference per
   page is the cost of an open page. Target: under 1 % of a core per page.
4. Device API: check-task and 4 KiB downloads against a bare JSON endpoint, as
   :mod:`bench.server_bench` measures them (its request bytes and load generator), with no
   console page open and with ``--pages`` live pages open, interleaved over ``--rounds``.
   Target: the ratios to bare unchanged by the open pages (within the run's noise).

It prints a table per part and exits 0 whether or not a target is met (1 only if the setup
fails or a scenario completes no request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from pydantic import SecretStr
from sqlalchemy import Engine, text
from tests.serverthread import ServerThread

from bench.common import machine
from bench.loadgen import LoadGenerator, Scenario
from bench.server_bench import (
    BARE_RESPONSE,
    CHUNK,
    K1,
    PACKAGE_SIZE,
    PID,
    bare_request,
    check_task_request,
    download_request,
)
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.console import PREFIX
from onenet_ota.server.console.sessions import SessionCodec, load_or_create_key
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.http import Request, Response

FIRST_DEV_ID: Final = 100_000_001
OLD_TASKS: Final = 30
DOWNLOADING: Final = 50
CANARIES: Final = 100
PAGE_TARGET_MS: Final = 100.0
LIVE_TARGET: Final = 0.01  # of one core, per open page
ADMIN: Final = "console-bench-admin-token"


# ---------------------------------------------------------------------------------------------
# The data


def fill(engine: Engine, devices: int, package: Any) -> None:
    """Every row of the fleet, set-wise (SQLite): see the module's description."""
    now = int(time.time())
    active = devices - devices // 100  # the last 1 % have no open task: idle
    seq = (
        f"WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq "
        f"WHERE i < {devices - 1}) "
    )
    token = "'ota_' || substr(lower(hex(randomblob(10))), 1, 20)"
    statements = [
        (
            "INSERT INTO products (pid, name, access_key, created_at) "
            f"VALUES ('{PID}', 'fleet', '{K1}', {now})"
        ),
        (
            "INSERT INTO packages (id, pid, module_type, kind, target, file_name, size, md5, "
            f"sha256, created_at) VALUES (1, '{PID}', 1, 1, '1.0.1', 'firmware.bin', "
            f"{package.size}, '{package.md5}', '{package.sha256}', {now})"
        ),
        (
            "INSERT INTO devices (dev_id, pid, name, auth_info, f_version, created_at, "
            f"last_seen_at) {seq} SELECT {FIRST_DEV_ID} + i, '{PID}', 'dev' || i, 'dev' || i, "
            f"CASE WHEN i % 1000 = 7 THEN '0.9.0' ELSE '1.0.0' END, {now}, {now} FROM seq"
        ),
        (
            "INSERT INTO device_labels (dev_id, key, value) "
            f"SELECT dev_id, 'site', 's' || ((dev_id - {FIRST_DEV_ID}) % 10) FROM devices"
        ),
        (
            "INSERT INTO device_labels (dev_id, key, value) SELECT dev_id, 'ring', 'canary' "
            f"FROM devices WHERE (dev_id - {FIRST_DEV_ID}) % {devices // CANARIES} = 3"
        ),
        # 30 older tasks, finished: each device succeeded (or, one in ten, failed) in one.
        *(
            "INSERT INTO tasks (id, pid, package_id, module_type, start_time, created_at) "
            f"VALUES ({n}, '{PID}', 1, 1, {now - 86400}, {now - 86400})"
            for n in range(1, OLD_TASKS + 1)
        ),
        (
            "INSERT INTO device_tasks (task_id, dev_id, module_type, state, progress, "
            "result_code, updated_at, finished_at) "
            f"SELECT 1 + (dev_id - {FIRST_DEV_ID}) % {OLD_TASKS}, dev_id, 1, "
            f"CASE WHEN dev_id % 10 = 0 THEN 5 ELSE 4 END, 100, "
            f"CASE WHEN dev_id % 10 = 0 THEN 205 ELSE 201 END, {now - 3600}, {now - 3600} "
            "FROM devices"
        ),
        # The active task: every device but the idle ones, each with a current token (D13).
        (
            "INSERT INTO tasks (id, pid, package_id, module_type, start_time, created_at) "
            f"VALUES ({OLD_TASKS + 1}, '{PID}', 1, 1, {now}, {now})"
        ),
        (
            "INSERT INTO device_tasks (task_id, dev_id, module_type, state, progress, "
            f"current_token, token_issued_at, updated_at) SELECT {OLD_TASKS + 1}, dev_id, 1, 1, "
            f"0, {token}, {now}, {now} FROM devices WHERE dev_id < {FIRST_DEV_ID + active}"
        ),
        "INSERT INTO tokens (token, device_task_id, issued_at) "
        "SELECT current_token, id, token_issued_at FROM device_tasks "
        "WHERE current_token IS NOT NULL",
        # A few download, near the end of the range: the worst case of a filter on them.
        (
            "UPDATE device_tasks SET state = 2 WHERE task_id = "
            f"{OLD_TASKS + 1} AND dev_id >= {FIRST_DEV_ID + active - DOWNLOADING}"
        ),
        "ANALYZE",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


# ---------------------------------------------------------------------------------------------
# Page times, in this process


def _request(path: str, cookie: str) -> Request:
    target = PREFIX + path
    route, _, query = target.partition("?")

    async def no_body() -> bytes:
        return b""

    headers = [("Host", "bench"), ("Cookie", cookie), ("Accept-Language", "en")]
    return Request("GET", target, route, query, headers, "127.0.0.1", no_body)


def page_times(handle: Any, cookie: str, pages: list[str], samples: int) -> dict[str, float]:
    """The median wall time (ms) of each page, after two unmeasured calls."""
    loop = asyncio.new_event_loop()
    result: dict[str, float] = {}
    try:
        for path in pages:
            times = []
            for i in range(samples + 2):
                start = time.perf_counter()
                response: Response = loop.run_until_complete(handle(_request(path, cookie)))
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"{path} answered {response.status}")
                if i >= 2:
                    times.append(elapsed * 1000)
            result[path] = statistics.median(times)
            print(f"  {path:<48} {result[path]:8.1f} ms", flush=True)
    finally:
        loop.close()
    return result


# ---------------------------------------------------------------------------------------------
# Live pages: the event streams, held open by another process


def hold_streams(host: str, port: int, path: str, cookie: str, count: int, stop: Any) -> None:
    """Open ``count`` event streams and read them until ``stop`` is set (another process)."""
    socks = []
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    for _ in range(count):
        sock = socket.create_connection((host, port))
        sock.sendall(request)
        sock.settimeout(0.2)
        socks.append(sock)
    try:
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    if not sock.recv(65536):
                        # The stream ended (its lifetime): the browser's EventSource reopens it.
                        sock.close()
                        socks.remove(sock)
                        fresh = socket.create_connection((host, port))
                        fresh.sendall(request)
                        fresh.settimeout(0.2)
                        socks.append(fresh)
                        break
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def open_pages(server: ServerThread, path: str, cookie: str, count: int) -> Iterator[None]:
    if count == 0:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    process = ctx.Process(
        target=hold_streams,
        args=(server.host, server.port, PREFIX + path, cookie, count, stop),
        daemon=True,
    )
    process.start()
    time.sleep(2.0)  # connected, and the first value read and sent
    try:
        yield
    finally:
        stop.set()
        process.join(10)
        if process.is_alive():
            process.kill()


@contextlib.contextmanager
def churn(engine: Engine, task_id: int, dev_ids: list[int]) -> Iterator[None]:
    """Flip a device task between to-be-upgraded and downloading every 0.2 s (as device reports
    would), so that each live period has a new value to render and send."""
    stop = threading.Event()

    def run() -> None:
        n = 0
        while not stop.wait(0.2):
            dev_id = dev_ids[n % len(dev_ids)]
            n += 1
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE device_tasks SET state = 3 - state, updated_at = :now "
                        "WHERE task_id = :task AND dev_id = :dev AND state IN (1, 2)"
                    ),
                    {"now": int(time.time()), "task": task_id, "dev": dev_id},
                )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def server_cpu(seconds: float) -> float:
    """This process's CPU use (cores) over ``seconds``: the server runs in it (its threads),
    and the processes it started (the streams' holder, the load generator) are not counted."""
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - wall)


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=100_000, help="devices in the fleet")
    parser.add_argument("--samples", type=int, default=15, help="measured calls per page")
    parser.add_argument("--pages", type=int, default=20, help="live pages held open")
    parser.add_argument("--cpu-seconds", type=float, default=10.0, help="CPU window per case")
    parser.add_argument("--duration", type=float, default=2.0, help="measured s per load run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured s per load run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved load runs")
    parser.add_argument("--concurrency", type=int, default=32, help="device API clients")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="onenet-ota-console-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            db=f"sqlite:///{Path(tmp) / 'bench.db'}",
            admin_token=SecretStr(ADMIN),
        )
        engine = create_engine(settings.database_url)
        migrate(engine)
        engine.dispose()
        app, resources = create_app(settings)
        try:
            return run(args, settings, app, resources)
        finally:
            with contextlib.suppress(Exception):
                asyncio.run(resources.aclose())


def run(args: argparse.Namespace, settings: Settings, app: Any, resources: Any) -> int:
    devices: int = args.devices
    print(f"seeding {devices} devices, {OLD_TASKS + 1} tasks ...", flush=True)
    started = time.monotonic()
    blob = resources.blobs.put_bytes(random.Random(1).randbytes(PACKAGE_SIZE))
    fill(resources.engine, devices, blob)
    print(f"  seeded in {time.monotonic() - started:.1f} s", flush=True)
    live_task = OLD_TASKS + 1
    admin = resources.admin_api.tokens.list().items[0]
    codec = SessionCodec(load_or_create_key(settings.data_dir))
    cookie = "onenet_ota_session=" + codec.encode(codec.new(str(admin.id), admin.name, admin.role))

    middle = FIRST_DEV_ID + devices // 2
    last_active = FIRST_DEV_ID + devices - devices // 100 - 1
    baseline = "/login"
    pages = [
        baseline,
        "/devices",
        f"/devices?after={middle}",
        f"/devices?pid={PID}",
        "/devices?version=0.9.0",
        f"/devices?q=dev{devices - 2}",
        "/devices?state=idle",
        "/devices?state=downloading",
        "/devices?state=to_be_upgraded",
        "/devices?label=site%3Ds3",
        "/devices?label=ring%3Dcanary",
        "/devices?label=ring%3Dcanary&state=to_be_upgraded",
        f"/devices/{middle}",
        f"/devices/{last_active}",
        "/tasks",
        f"/tasks/{live_task}",
        "/",
        "/products",
        f"/products/{PID}",
        "/audit",
    ]
    print("page times (server, median):", flush=True)
    times = page_times(app, cookie, pages, args.samples)

    # The device API's scenarios, as server_bench builds them.
    rng = random.Random(7)
    checked = [FIRST_DEV_ID + i for i in rng.sample(range(devices - devices // 100), 2000)]
    checked = [d for d in checked if d < last_active - DOWNLOADING]
    # A device's first E3 records the offer on its timeline (a write); later ones only read,
    # as in steady polling, which is what is measured (as server_bench seeds it).
    for dev_id in checked:
        resources.device_api.service.check_task(dev_id, TaskType.FOTA, "1.0.0")
    with resources.engine.connect() as conn:
        tokens = [
            row[0]
            for row in conn.execute(
                text(
                    "SELECT current_token FROM device_tasks WHERE task_id = :t AND state = 1 "
                    "ORDER BY random() LIMIT 256"
                ),
                {"t": live_task},
            )
        ]
    download = [
        download_request(t, c * CHUNK) for c in range(PACKAGE_SIZE // CHUNK) for t in tokens
    ]
    scenarios = [
        Scenario("bare", "keep-alive", [bare_request()], b"200", b'"errno":0'),
        Scenario(
            "check-task",
            "keep-alive",
            [check_task_request(d) for d in checked],
            b"200",
            b'"errno":0,"error":"succ","data"',
        ),
        Scenario("download", "keep-alive", download, b"206", b"Content-Length: 4096\r\n"),
    ]

    async def handler(request: Request) -> Response:
        if request.path == "/bare":
            return BARE_RESPONSE
        response: Response = await app(request)
        return response

    live_path = f"/tasks/{live_task}/events"
    churned = list(range(FIRST_DEV_ID, FIRST_DEV_ID + 20))
    cpu: dict[int, float] = {}
    rates: dict[tuple[int, str], list[float]] = {}
    failed = False
    with ServerThread(handler) as server:
        print("live pages: server CPU with a device task changing every 0.2 s ...", flush=True)
        with churn(resources.engine, live_task, churned):
            for count in (0, 1, args.pages):
                with open_pages(server, live_path, cookie, count):
                    cpu[count] = server_cpu(args.cpu_seconds)
                print(f"  {count:3d} pages open: {100 * cpu[count]:6.2f} % of a core", flush=True)
        print("device API with and without open live pages ...", flush=True)
        with LoadGenerator(server.host, server.port) as load:
            for round_ in range(1, args.rounds + 1):
                for count in (0, args.pages):
                    with open_pages(server, live_path, cookie, count):
                        for scenario in scenarios:
                            result = load.run(
                                scenario,
                                warmup=args.warmup,
                                duration=args.duration,
                                concurrency=args.concurrency,
                            )
                            if result.errors:
                                print(f"  errors: {result.first_error}")
                            failed |= result.completed == 0
                            rates.setdefault((count, scenario.name), []).append(result.rate)
                            print(
                                f"  round {round_}: {count:2d} pages {scenario.name:<10} "
                                f"{result.rate:9.0f} req/s",
                                flush=True,
                            )

    report(args, times, baseline, cpu, rates)
    return 1 if failed else 0


def report(
    args: argparse.Namespace,
    times: dict[str, float],
    baseline: str,
    cpu: dict[int, float],
    rates: dict[tuple[int, str], list[float]],
) -> None:
    print()
    print(f"onenet-ota console benchmark: {args.devices} devices; {machine()}")
    print(f"{'page':<50} {'ms':>8} {'vs sign-in':>10}  target < {PAGE_TARGET_MS:g} ms")
    base = times[baseline]
    for path, ms in times.items():
        verdict = "" if path == baseline else ("ok" if ms < PAGE_TARGET_MS else "MISSED")
        print(f"{path:<50} {ms:8.1f} {ms / base:9.1f}x  {verdict}")
    print()
    one = cpu[1] - cpu[0]
    many = (cpu[args.pages] - cpu[0]) / args.pages
    for label, value in (("1 page open", one), (f"{args.pages} pages open, per page", many)):
        verdict = "ok" if value < LIVE_TARGET else "MISSED"
        print(f"live {label:<30} {100 * value:6.2f} % of a core  target < 1 %  {verdict}")
    print()
    print(f"{'device API':<12} {'pages':>5} {'req/s':>9} {'vs bare':>8}")
    ratios: dict[tuple[int, str], float] = {}
    for count in (0, args.pages):
        bare = statistics.median(rates[(count, "bare")])
        for name in ("bare", "check-task", "download"):
            rate = statistics.median(rates[(count, name)])
            ratios[(count, name)] = rate / bare if bare else 0.0
            print(f"{name:<12} {count:5d} {rate:9.0f} {ratios[(count, name)]:7.2f}x")
    for name in ("check-task", "download"):
        before, after = ratios[(0, name)], ratios[(args.pages, name)]
        change = (after / before - 1) * 100 if before else 0.0
        print(
            f"{name} ratio with {args.pages} live pages: {after:.2f}x"
            f" vs {before:.2f}x without ({change:+.0f} %)"
        )


if __name__ == "__main__":
    raise SystemExit(main())

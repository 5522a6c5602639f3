"""Upgrade benchmark: the SDK's whole upgrade against curl, and the upgrader's memory.

Run::

    .venv/bin/python -m bench.upgrade_bench                 # about a minute
    .venv/bin/python -m bench.upgrade_bench --rounds 5 --size 16m --json

What it does, in one run, against one server (the real platform, ``onenet-ota serve`` with
SQLite, in its own process: :class:`onenet_ota.sim.server.LocalServer`):

1. **Throughput.** A ``--size`` (16 MiB) package. For each chunk size (``--chunks``: 4 KiB, the
   C SDK's; 64 KiB, the upgrader's default; 1 MiB) a fresh device with a task runs the whole
   upgrade through the SDK (:class:`~onenet_ota.device.upgrader.Upgrader` over
   :class:`OtaClient`): E1, E3, then a token check (E5) before *every* chunk and the chunk (E6),
   fsynced checkpoints every MiB, verification, 101, install (an atomic copy of the file), 201.
   Each chunk size runs once per ``--variants`` entry: ``httpx`` (the client over an injected
   httpx2 client, as before the SDK had its own transport), ``lean`` (the SDK's own transport,
   the default) and ``lean+pipeline`` (``UpgradeOptions.pipeline``: E5 and E6 back to back on
   one connection, and ``--pipeline-depth`` chunks in flight on it), so one run gives the before
   and after ratios.
   As the baseline, ``curl`` downloads the same file from the same server in one request (E6
   without Range). Each measurement runs in a separate process (so none shares an interpreter
   with the server), is repeated ``--rounds`` times, interleaved, and reported as its median,
   with the ratio of the SDK's bytes/s to curl's.
2. **Memory.** The upgrader's peak RSS (``VmHWM`` of its process) for an 8 MiB and a 64 MiB
   package (64 KiB chunks): it must not grow with the package, since chunks stream to disk and
   the MD5 is computed as they arrive.

The SDK's time is measured around ``Upgrader.run()`` inside the worker process (interpreter
start-up excluded); curl's is its own ``time_total``. If curl is missing, a single GET over a raw
socket takes its place, and the report says so. Exit status 0 when every run succeeded and the
64 MiB run's peak RSS stayed within 16 MiB of the 8 MiB run's; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import machine, process_cpu
from onenet_ota.demo import Provisioned, generate_package, provision
from onenet_ota.device import Credentials, DeviceConfig, OtaClient, TaskType
from onenet_ota.device.install import FileInstaller
from onenet_ota.device.upgrader import Outcome, UpgradeOptions, Upgrader
from onenet_ota.management import ManagementClient
from onenet_ota.sim.server import LocalServer

KIB = 1024
MIB = 1024 * KIB
RSS_GROWTH_LIMIT_KIB = 16 * 1024


def _size(text: str) -> int:
    value = text.strip().lower()
    for suffix, factor in (("m", MIB), ("k", KIB)):
        if value.endswith(suffix):
            return int(value[:-1]) * factor
    return int(value)


# -- the worker: one upgrade in its own process ----------------------------------------------


def _vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def worker(args: argparse.Namespace) -> int:
    """Run one upgrade; print ``{"seconds", "bytes", "outcome", "vmhwm_kib"}`` as JSON."""
    config = DeviceConfig(
        credentials=Credentials.from_access_key(args.pid, os.environ["BENCH_ACCESS_KEY"]),
        dev_id=args.dev_id,
        version="1.0.0",
        type=TaskType.FOTA,
    )
    options = UpgradeOptions(
        chunk_size=args.chunk_size, pipeline=args.pipeline, pipeline_depth=args.pipeline_depth
    )
    with contextlib.ExitStack() as stack:
        http: Any = None
        if args.transport == "httpx":
            import httpx2

            http = stack.enter_context(httpx2.Client(trust_env=False))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="onenet-ota-bench-device-"))
        with OtaClient(config, base_url=args.server, timeout=30_000, http_client=http) as client:
            upgrader = Upgrader(
                client,
                FileInstaller(Path(tmp) / "fw.bin"),
                state_dir=Path(tmp) / "state",
                options=options,
            )
            start = time.perf_counter()
            cpu = time.process_time()
            result = upgrader.run()
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu
        report = {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "bytes": result.bytes_downloaded,
            "outcome": result.outcome.value,
            "reason": result.reason,
            "vmhwm_kib": _vmhwm_kib(),
        }
    print(json.dumps(report), flush=True)
    return 0 if result.outcome is Outcome.SUCCEEDED else 1


# -- the driver ---------------------------------------------------------------------------------


def _upgrade_in_process(
    server: str,
    world: Provisioned,
    chunk_size: int,
    server_pid: int | None = None,
    variant: str = "lean",
    pipeline_depth: int = 4,
) -> dict[str, Any]:
    env = {**os.environ, "BENCH_ACCESS_KEY": world.access_key}
    command = [
        sys.executable,
        "-m",
        "bench.upgrade_bench",
        "--worker",
        "--server",
        server,
        "--pid",
        world.pid,
        "--dev-id",
        str(world.dev_id),
        "--chunk-size",
        str(chunk_size),
        "--transport",
        variant.split("+")[0],
        *(["--pipeline"] if variant.endswith("+pipeline") else []),
        "--pipeline-depth",
        str(pipeline_depth),
    ]
    before = process_cpu(server_pid) if server_pid is not None else 0.0
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"the upgrade worker failed: {done.stdout}{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    # The server's CPU over the worker's whole life (start-up included, when it is idle).
    report["server_cpu_seconds"] = (
        process_cpu(server_pid) - before if server_pid is not None else None
    )
    return report


def _download_token(server: str, world: Provisioned) -> str:
    config = DeviceConfig(
        credentials=Credentials.from_access_key(world.pid, world.access_key),
        dev_id=str(world.dev_id),
        version=world.current,
    )
    with OtaClient(config, base_url=server, timeout=30_000) as client:
        return client.check_task().token


def _curl(url: str, size: int) -> tuple[float, str]:
    """Seconds for one whole-file GET, and the tool used."""
    curl = shutil.which("curl")
    if curl is not None:
        done = subprocess.run(
            [curl, "-sS", "-o", os.devnull, "-w", "%{size_download} %{time_total}", url],
            capture_output=True,
            text=True,
            check=True,
        )
        got, seconds = done.stdout.split()
        if int(got) != size:
            raise RuntimeError(f"curl got {got} bytes, expected {size}")
        return float(seconds), "curl"
    return _raw_get(url, size), "raw socket (curl not found)"


def _raw_get(url: str, size: int) -> float:
    parts = urlsplit(url)
    start = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port or 80)) as sock:
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    seconds = time.perf_counter() - start
    if received < size:
        raise RuntimeError(f"the raw GET got {received} bytes, expected at least {size}")
    return seconds


def _requests(size: int, chunk: int) -> int:
    """The requests of one upgrade: E5 and E6 per chunk, E1, E3, 101, 201 and E1 again, and
    progress reports (at most nine)."""
    return 2 * -(-size // chunk) + 5 + min(9, -(-size // chunk))


def _mib_s(size: int, seconds: float) -> float:
    return size / seconds / MIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upgrade_bench", description=__doc__)
    parser.add_argument("--size", type=_size, default=16 * MIB, help="throughput package (16m)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, median reported")
    parser.add_argument("--chunks", default="4k,64k,1m", help="chunk sizes to measure")
    parser.add_argument("--rss-sizes", default="8m,64m", help="package sizes for peak RSS")
    parser.add_argument(
        "--variants",
        default="httpx,lean,lean+pipeline",
        help="SDK transports to measure: lean (the SDK's own), httpx (an injected httpx2 "
        "client), each optionally +pipeline (UpgradeOptions.pipeline)",
    )
    parser.add_argument(
        "--pipeline-depth",
        type=int,
        default=4,
        help="chunks in flight on one connection with +pipeline (UpgradeOptions.pipeline_depth)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--pid", help=argparse.SUPPRESS)
    parser.add_argument("--dev-id", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="lean", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    chunks = [_size(c) for c in args.chunks.split(",")]
    variants = args.variants.split(",")
    if not set(variants) <= {"lean", "httpx", "lean+pipeline", "httpx+pipeline"}:
        parser.error("--variants: lean, httpx, lean+pipeline, httpx+pipeline")
    args.variant_list = variants
    rss_sizes = [_size(s) for s in args.rss_sizes.split(",")]
    print(f"upgrade benchmark on {machine()}", file=sys.stderr)

    with LocalServer() as server:
        admin = ManagementClient(server.url, server.admin_token)
        try:
            return _run(server.url, server.pid, admin, args, chunks, rss_sizes)
        finally:
            admin.close()


def _run(
    server: str,
    server_pid: int | None,
    admin: ManagementClient,
    args: argparse.Namespace,
    chunks: list[int],
    rss_sizes: list[int],
) -> int:
    names = iter(range(1, 1_000_000))

    def world(data: bytes) -> Provisioned:
        return provision(admin, data, device_name=f"bench{next(names)}")

    data = generate_package(args.size)
    runs = [(variant, chunk) for variant in args.variant_list for chunk in chunks]
    sdk: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    cpu: dict[tuple[str, int], list[tuple[float, float]]] = {run: [] for run in runs}
    baseline: list[float] = []
    tool = ""
    for _ in range(args.rounds):
        # Interleaved, so that load from elsewhere on a shared machine drifts over all alike.
        for variant, chunk in runs:
            report = _upgrade_in_process(
                server, world(data), chunk, server_pid, variant, args.pipeline_depth
            )
            if report["outcome"] != "succeeded" or report["bytes"] != len(data):
                raise RuntimeError(f"upgrade with {chunk}-byte chunks ({variant}): {report}")
            sdk[variant, chunk].append(report["seconds"])
            cpu[variant, chunk].append((report["cpu_seconds"], report["server_cpu_seconds"] or 0.0))
        curl_world = world(data)
        token = _download_token(server, curl_world)
        seconds, tool = _curl(f"{server}/ota/south/download/{token}", len(data))
        baseline.append(seconds)

    rss: dict[int, int] = {}
    for size in rss_sizes:
        package = generate_package(size, seed=size)
        report = _upgrade_in_process(
            server, world(package), 64 * KIB, None, args.variant_list[-1], args.pipeline_depth
        )
        if report["outcome"] != "succeeded":
            raise RuntimeError(f"upgrade of {size} bytes: {report}")
        rss[size] = report["vmhwm_kib"]

    curl_s = statistics.median(baseline)
    curl_bps = len(data) / curl_s
    results: dict[str, Any] = {
        "package_bytes": len(data),
        "baseline": {"tool": tool, "seconds": curl_s, "bytes_per_s": curl_bps},
        "sdk": {
            f"{variant}/{chunk}": {
                "seconds": statistics.median(times),
                "bytes_per_s": len(data) / statistics.median(times),
                "ratio_to_baseline": (len(data) / statistics.median(times)) / curl_bps,
                "client_cpu_seconds": statistics.median(c for c, _ in cpu[variant, chunk]),
                "client_cpu_us_per_request": statistics.median(c for c, _ in cpu[variant, chunk])
                * 1e6
                / _requests(len(data), chunk),
                "server_cpu_seconds": statistics.median(s for _, s in cpu[variant, chunk]),
            }
            for (variant, chunk), times in sdk.items()
        },
        "peak_rss_kib": {str(size): kib for size, kib in rss.items()},
    }
    growth = max(rss.values()) - min(rss.values())
    ok = growth <= RSS_GROWTH_LIMIT_KIB
    results["peak_rss_growth_kib"] = growth
    results["ok"] = ok
    if args.json:
        print(json.dumps(results, indent=2))
        return 0 if ok else 1

    print(f"\nthroughput, {len(data) / MIB:g} MiB package, median of {args.rounds}:")
    print(
        f"  {'':38}{'seconds':>9}{'MiB/s':>8}{'bytes/s':>13}{'x ' + tool.split()[0]:>9}"
        f"{'client CPU':>12}{'server CPU':>12}{'CPU/req':>11}"
    )
    print(
        f"  {tool + ', one request':38}{curl_s:>9.3f}{_mib_s(len(data), curl_s):>8.1f}"
        f"{curl_bps:>13,.0f}{1.0:>9.3f}"
    )
    for (variant, chunk), times in sdk.items():
        seconds = statistics.median(times)
        row = results["sdk"][f"{variant}/{chunk}"]
        label = f"SDK {variant}, {chunk // KIB} KiB chunks, E5 each"
        print(
            f"  {label:38}{seconds:>9.3f}{_mib_s(len(data), seconds):>8.1f}"
            f"{len(data) / seconds:>13,.0f}{(len(data) / seconds) / curl_bps:>9.3f}"
            f"{row['client_cpu_seconds']:>11.2f}s{row['server_cpu_seconds']:>11.2f}s"
            f"{row['client_cpu_us_per_request']:>9.0f}µs"
        )
    print(
        "  (one chunk = two requests, E5 then E6, pipelined with +pipeline; lean is the SDK's\n"
        "   own transport, httpx an injected httpx2 client; client CPU is the upgrader process's,\n"
        "   CPU/req over all its requests; server\n"
        "   CPU the server's over the same run; their sum well below the wall time means the\n"
        "   machine was busy elsewhere)"
    )
    print("\npeak RSS of the upgrader process (VmHWM), 64 KiB chunks:")
    for size, kib in rss.items():
        print(f"  {size / MIB:>6g} MiB package: {kib / 1024:8.1f} MiB")
    verdict = "does not grow" if ok else "GROWS"
    print(f"  difference {growth / 1024:.1f} MiB: peak memory {verdict} with the package size")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

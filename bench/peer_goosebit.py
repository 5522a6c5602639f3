"""Peer comparison: goosebit's DDI poll and download against our check-task and download.

Run::

    .venv/bin/python -m bench.peer_goosebit                    # installs goosebit: ~1 min extra
    .venv/bin/python -m bench.peer_goosebit --venv /tmp/goosebit-venv   # keep the install

goosebit (PyPI) is a Python OTA server speaking hawkBit's DDI device API. This benchmark:

1. Installs goosebit from PyPI into a virtual environment of its own (``--venv``: reused when it
   already holds goosebit, kept afterwards; default a temporary one, removed). goosebit runs in
   that environment only; nothing of it is imported here.
2. Sets goosebit up as its README says: ``aerich upgrade`` creates its SQLite database (config
   ``[tool.aerich]`` pointing at goosebit's own migrations), then a seeding script run by
   goosebit's interpreter uses goosebit's own models to register ``--devices`` devices (hardware
   default/default, state *registered*, software 1.0.0, rollout mode, feed ``default``), a 256 KiB
   software 1.0.1 compatible with that hardware, and a rollout of it on the ``default`` feed, so
   that every device's poll answers with a ``deploymentBase`` link. Device authentication stays
   off (goosebit's default), so a poll needs no token.
3. Starts goosebit with uvicorn, bound to 127.0.0.1, one process, as installed (uvicorn's h11
   protocol: the PyPI package does not pull in httptools). Its log level is set to WARNING so that
   per-request log lines do not count against it (ours logs nothing per request either).
4. Starts our platform in its own process (``LocalServer``: one worker, SQLite), sets up a
   product (pid 123123, key K1 of Appendix B.1), the same number of devices, a 256 KiB package and
   a task through ``/api/v1``, and runs one E3 per device (so every device holds a token and has
   recorded its version; later E3s are steady-state polls).
5. Drives both with the same load generator (:mod:`bench.loadgen`, its own process, concurrency
   ``--concurrency`` = 64), keep-alive and one-request-per-connection, in interleaved rounds
   (``--rounds``, medians reported, since a shared machine drifts):

   - goosebit ``GET /DEFAULT/controller/v1/{controllerId}`` (DDI poll; 200 with
     ``deploymentBase``) against our ``GET /ota/south/check`` (E3; errno 0 with data), devices
     round robin;
   - goosebit ``GET /DEFAULT/controller/v1/{controllerId}/download`` (the whole artifact,
     FileResponse) against our ``GET /ota/south/download/{token}`` without Range (E6, the whole
     package, 200).

It prints requests/s, latency p50/p99, MiB/s and each server's CPU per wall second, then the
ratios against the targets (docs/performance.md): our check-task requests/s at least 10x
goosebit's poll, our download throughput at least goosebit's. ``--py-spy PATH`` also samples each
server during its keep-alive poll runs and prints where it spends its time. Exit status 0 when
both targets are met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx2
from tests.pgcluster import free_port

from bench.common import PySpy, machine, process_cpu
from bench.loadgen import LoadGenerator, Result, Scenario
from bench.profiles import top_functions
from bench.server_bench import K1, PID, check_task_request
from onenet_ota.device import Credentials, DeviceConfig, OtaClient
from onenet_ota.management import ManagementClient
from onenet_ota.sim import LocalServer

PACKAGE_SIZE: Final = 256 * 1024
TENANT: Final = "DEFAULT"
CHECK_TARGET: Final = 10.0
DOWNLOAD_TARGET: Final = 1.0
MODES: Final = ("keep-alive", "per-connection")

SEED_SCRIPT: Final = textwrap.dedent(
    '''
    """Seed goosebit through its own models (run by goosebit's interpreter)."""
    import asyncio, hashlib, sys
    from pathlib import Path
    from tortoise import Tortoise
    from goosebit.db.config import TORTOISE_CONF
    from goosebit.db.models import (
        Device, Hardware, Rollout, Software, UpdateModeEnum, UpdateStateEnum,
    )

    async def main(count, package):
        await Tortoise.init(config=TORTOISE_CONF)
        data = Path(package).read_bytes()
        hardware = (await Hardware.get_or_create(model="default", revision="default"))[0]
        software = await Software.create(
            uri=Path(package).resolve().as_uri(), size=len(data),
            hash=hashlib.sha1(data).hexdigest(), version="1.0.1",
        )
        await software.compatibility.add(hardware)
        await Rollout.create(feed="default", software=software)
        await Device.bulk_create(
            [
                Device(id=f"dev{i}", hardware=hardware, sw_version="1.0.0", feed="default",
                       last_state=UpdateStateEnum.REGISTERED, update_mode=UpdateModeEnum.ROLLOUT)
                for i in range(count)
            ],
            batch_size=1000,
        )
        print(await Device.all().count(), flush=True)
        await Tortoise.close_connections()

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    '''
)
QUIET_LOGGING: Final = json.dumps(
    {
        "version": 1,
        "handlers": {"console": {"class": "logging.StreamHandler", "level": "WARNING"}},
        "root": {"level": "WARNING", "handlers": ["console"]},
    }
)


class PeerError(Exception):
    """goosebit could not be installed, set up or started; the message says where."""


# ------------------------------------------------------------------------------------------------
# goosebit


def _run(argv: list[str], *, what: str, timeout: float, **kwargs: Any) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerError(f"{what}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PeerError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return str(done.stdout)


def goosebit_venv(path: Path) -> tuple[Path, str]:
    """A virtual environment at ``path`` holding goosebit (installed unless already there)."""
    python = path / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('goosebit'))"]
    if python.is_file():
        with contextlib.suppress(PeerError):
            return python, _run(probe, what="probing goosebit", timeout=60).strip()
    print(f"installing goosebit from PyPI into {path} ...", flush=True)
    _run([sys.executable, "-m", "venv", "--clear", str(path)], what="python -m venv", timeout=300)
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "goosebit"],
        what="pip install goosebit",
        timeout=1200,
    )
    return python, _run(probe, what="probing goosebit", timeout=60).strip()


@dataclass
class Goosebit:
    """goosebit set up in ``work`` and served by uvicorn on 127.0.0.1."""

    python: Path
    work: Path
    devices: int
    package: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def setup(self) -> None:
        """``aerich upgrade``, then the seeding script."""
        site = _run(
            [str(self.python), "-c", "import goosebit, pathlib; "
             "print(pathlib.Path(goosebit.__file__).parent)"],
            what="locating goosebit", timeout=120,
        ).strip()  # fmt: skip
        (self.work / "artifacts").mkdir(parents=True, exist_ok=True)
        (self.work / "pyproject.toml").write_text(
            "[tool.aerich]\n"
            'tortoise_orm = "goosebit.db.config.TORTOISE_CONF"\n'
            f'location = "{site}/db/migrations"\n'
            'src_folder = "./."\n'
        )
        self.env = {
            **os.environ,
            "GOOSEBIT_DB_URI": f"sqlite:///{self.work / 'db.sqlite3'}",
            "GOOSEBIT_ARTIFACTS_DIR": str(self.work / "artifacts"),
            "GOOSEBIT_LOGGING": QUIET_LOGGING,
        }
        aerich = self.python.with_name("aerich")
        _run([str(aerich), "upgrade"], what="aerich upgrade", timeout=300, cwd=self.work,
             env=self.env)  # fmt: skip
        script = self.work / "seed_goosebit.py"
        script.write_text(SEED_SCRIPT)
        out = _run(
            [str(self.python), str(script), str(self.devices), str(self.package)],
            what="seeding goosebit", timeout=600, cwd=self.work, env=self.env,
        )  # fmt: skip
        if out.strip().splitlines()[-1:] != [str(self.devices)]:
            raise PeerError(f"seeding goosebit: expected {self.devices} devices, got {out!r}")

    def start(self) -> None:
        """uvicorn on 127.0.0.1, one process; returns once a poll answers."""
        self.port = free_port()
        log = (self.work / "goosebit.log").open("wb")
        self.process = subprocess.Popen(
            [str(self.python), "-m", "uvicorn", "goosebit:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, process_group=0,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 120
        url = f"http://127.0.0.1:{self.port}/{TENANT}/controller/v1/dev0"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx2.HTTPError):
                reply = httpx2.get(url, timeout=5)
                if reply.status_code == 200 and "deploymentBase" in reply.text:
                    return
            time.sleep(0.5)
        tail = (self.work / "goosebit.log").read_text(errors="replace")[-2000:]
        raise PeerError(f"goosebit did not answer polls on port {self.port}:\n{tail}")

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def poll_request(self, index: int) -> bytes:
        return (
            f"GET /{TENANT}/controller/v1/dev{index} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.port}\r\nAccept: application/hal+json\r\n\r\n"
        ).encode()

    def download_request(self, index: int) -> bytes:
        return (
            f"GET /{TENANT}/controller/v1/dev{index}/download HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.port}\r\n\r\n"
        ).encode()


# ------------------------------------------------------------------------------------------------
# ours


def seed_ours(server: LocalServer, devices: int, package: bytes) -> tuple[list[int], list[str]]:
    """Product 123123 (K1), ``devices`` devices, the package, a task; one E3 each for tokens."""
    admin = ManagementClient(server.url, server.admin_token)
    try:
        admin.create_product(pid=PID, access_key=K1)
        names = [{"name": f"dev{i}"} for i in range(devices)]
        dev_ids = [d.dev_id for d in admin.import_devices(PID, names)]
        pkg = admin.upload_package(
            package, pid=PID, module_type="fota", target="1.0.1", file_name="firmware.bin"
        )
        admin.create_task(pkg.id, dev_ids=dev_ids)
    finally:
        admin.close()
    credentials = Credentials.from_access_key(PID, K1)
    tokens = []
    with httpx2.Client(trust_env=False) as http:
        for dev_id in dev_ids:
            config = DeviceConfig(credentials=credentials, dev_id=str(dev_id), version="1.0.0")
            with OtaClient(config, base_url=server.url, http_client=http) as client:
                tokens.append(client.check_task().token)
    return dev_ids, tokens


def our_download_request(token: str) -> bytes:
    """E6 for the whole package (no Range: 200 with the file, §6.6.3), as the C SDK writes."""
    return (f"GET /ota/south/download/{token} HTTP/1.1\r\nHost:ota.heclouds.com\r\n\r\n").encode()


# ------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Runs:
    """Every round of one (server, scenario, mode)."""

    server: str
    scenario: str
    mode: str
    results: list[Result] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.results) if self.results else 0.0

    def median_result(self) -> Result:
        ordered = sorted(self.results, key=lambda r: r.rate)
        return ordered[len(ordered) // 2]

    @property
    def mib_per_s(self) -> float:
        result = self.median_result()
        return result.body_bytes / result.elapsed / 1024 / 1024 if result.elapsed else 0.0

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, help="goosebit's virtual environment (kept)")
    parser.add_argument("--devices", type=int, default=1000, help="devices on each server")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable [both]")
    parser.add_argument("--py-spy", metavar="PATH", help="sample each server with py-spy")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = parser.parse_args(argv)
    modes = args.mode or list(MODES)
    print(f"onenet-ota vs goosebit on {machine()}", flush=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onenet-ota-peer-")))
        venv = args.venv if args.venv is not None else tmp / "goosebit-venv"
        try:
            python, version = goosebit_venv(venv)
        except PeerError as exc:
            print(f"goosebit cannot be installed: {exc}", file=sys.stderr)
            return 2
        package = tmp / "firmware.swu"
        data = random.Random(1).randbytes(PACKAGE_SIZE)
        package.write_bytes(data)
        peer = Goosebit(python, tmp / "goosebit", args.devices, package)
        try:
            print(f"setting up goosebit {version} with {args.devices} devices ...", flush=True)
            peer.setup()
            peer.start()
        except PeerError as exc:
            peer.stop()
            print(f"goosebit cannot be run: {exc}", file=sys.stderr)
            return 2
        stack.callback(peer.stop)
        ours = stack.enter_context(LocalServer(workers=1))
        assert ours.pid is not None
        print(f"setting up onenet-ota with {args.devices} devices ...", flush=True)
        dev_ids, tokens = seed_ours(ours, args.devices, data)
        indices = list(range(args.devices))
        random.Random(7).shuffle(indices)
        plans: list[tuple[Runs, Scenario, int, Any]] = []
        for mode in modes:
            plans += [
                (Runs("goosebit", "poll", mode), Scenario(
                    "poll", mode, [peer.poll_request(i) for i in indices], b"200",
                    b'"deploymentBase"'), peer.port, peer.pid),
                (Runs("onenet-ota", "check-task", mode), Scenario(
                    "check-task", mode, [check_task_request(dev_ids[i]) for i in indices], b"200",
                    b'"errno":0,"error":"succ","data"'), ours.port, ours.pid),
                (Runs("goosebit", "download", mode), Scenario(
                    "download", mode, [peer.download_request(i) for i in indices], b"200",
                    f"content-length: {PACKAGE_SIZE}".encode()), peer.port, peer.pid),
                (Runs("onenet-ota", "download", mode), Scenario(
                    "download", mode, [our_download_request(tokens[i]) for i in indices], b"200",
                    f"Content-Length: {PACKAGE_SIZE}".encode()), ours.port, ours.pid),
            ]  # fmt: skip
        profiles: dict[str, list[str]] = {}
        for round_ in range(1, args.rounds + 1):
            for runs, scenario, port, pid in plans:
                print(
                    f"  round {round_}: {runs.server:>10} {scenario.name:<10} {runs.mode:<14}",
                    end="",
                    flush=True,
                )
                spy = None
                spy_file = tmp / f"{runs.server}.txt"
                if (
                    args.py_spy
                    and round_ == 1
                    and runs.mode == "keep-alive"
                    and (scenario.name in ("poll", "check-task"))
                ):
                    spy = PySpy(args.py_spy, pid, spy_file)
                cpu = process_cpu(pid)
                with LoadGenerator("127.0.0.1", port) as generator:
                    result = generator.run(
                        scenario,
                        warmup=args.warmup,
                        duration=args.duration,
                        concurrency=args.concurrency,
                    )
                runs.cpu.append((process_cpu(pid) - cpu) / (args.warmup + args.duration))
                if spy is not None:
                    spy.stop()
                    profiles[f"{runs.server} {scenario.name}"] = top_functions(spy_file, 15)
                runs.results.append(result)
                print(f" {result.rate:8.0f} req/s  errors {result.errors}", flush=True)
    return report([p[0] for p in plans], profiles, args, version)


def report(
    all_runs: list[Runs], profiles: dict[str, list[str]], args: argparse.Namespace, version: str
) -> int:
    print(
        f"\ngoosebit {version} (uvicorn, 1 process) vs onenet-ota (1 worker), both on SQLite, "
        f"{args.devices} devices, {args.concurrency} clients, median of {args.rounds} x "
        f"{args.duration:g} s"
    )
    print(
        f"{'server':<11} {'scenario':<11} {'mode':<15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'MiB/s':>7} {'srv CPU':>8} errors"
    )
    by_key = {(r.server, r.scenario, r.mode): r for r in all_runs}
    for runs in all_runs:
        median = runs.median_result()
        print(
            f"{runs.server:<11} {runs.scenario:<11} {runs.mode:<15} {runs.rate:8.0f} "
            f"{median.latency.percentile(50) * 1000:8.1f} "
            f"{median.latency.percentile(99) * 1000:8.1f} {runs.mib_per_s:7.1f} "
            f"{statistics.median(runs.cpu):8.2f} {runs.errors}"
        )
    met = True
    print()
    ratios: dict[str, float] = {}
    for mode in {r.mode for r in all_runs}:
        poll = by_key[("goosebit", "poll", mode)]
        check = by_key[("onenet-ota", "check-task", mode)]
        ratio = check.rate / poll.rate if poll.rate else float("inf")
        ratios[f"check-task/poll {mode}"] = ratio
        ok = ratio >= CHECK_TARGET
        met = met and ok
        print(
            f"ratio {mode:<15} our check-task / goosebit poll      = {ratio:6.2f}x "
            f"(target >= {CHECK_TARGET:g}x): {'met' if ok else 'MISSED'}"
        )
        theirs = by_key[("goosebit", "download", mode)]
        mine = by_key[("onenet-ota", "download", mode)]
        ratio = mine.mib_per_s / theirs.mib_per_s if theirs.mib_per_s else float("inf")
        ratios[f"download {mode}"] = ratio
        ok = ratio >= DOWNLOAD_TARGET
        met = met and ok
        print(
            f"ratio {mode:<15} our download / goosebit download = {ratio:6.2f}x "
            f"(target >= {DOWNLOAD_TARGET:g}x): {'met' if ok else 'MISSED'}"
        )
    for name, lines in profiles.items():
        print(f"\nprofile of {name} (keep-alive):")
        for line in lines:
            print(f"  {line}")
    if args.json:
        data = {
            "goosebit": version,
            "machine": machine(),
            "ratios": ratios,
            "runs": [
                {
                    "server": r.server,
                    "scenario": r.scenario,
                    "mode": r.mode,
                    "rates": [x.rate for x in r.results],
                    "p50_ms": r.median_result().latency.percentile(50) * 1000,
                    "p99_ms": r.median_result().latency.percentile(99) * 1000,
                    "mib_per_s": r.mib_per_s,
                    "server_cpu": r.cpu,
                    "errors": r.errors,
                }
                for r in all_runs
            ],
            "profiles": profiles,
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

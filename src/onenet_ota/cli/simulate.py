"""``onenet-ota simulate``: rehearse a fleet upgrade with virtual devices.

Examples::

    onenet-ota simulate --devices 1000 --concurrency 64          # on a throwaway local server
    onenet-ota simulate --devices 1000 --drop-rate 0.05 --power-cut-rate 0.02 --seed 7
    onenet-ota simulate --devices 120 --dialect mixed --profile mixed --drop-rate 0.02
    onenet-ota simulate --server http://ota.example.net:8080 --devices 500 --ramp-up 60
    onenet-ota simulate --server http://ota.example.net:8080 --task 12 --devices 200 \
        --allow-real-devices

Without ``--server`` the command starts its own server (SQLite in a temporary directory, or
``--db``) and stops it at the end; with ``--server`` it needs the management token
(``--admin-token`` or ``ONENET_OTA_ADMIN_TOKEN``). It creates a product, the devices, a package
and a task through ``/api/v1``, unless ``--task`` names an existing task to run. Those devices
were not created by the simulator and may be real ones: the run rewrites their versions and task
states on the server, so ``--task`` is refused without ``--allow-real-devices``.

``--dialect`` picks the device API the devices speak (classic, Studio §12, fuse §13, or a mix);
``--profile`` how their clients behave, after the clients seen in the field (§13.1): ``c-sdk``
(4 KiB ranges, a check before each, a connection per request), ``at-module`` (256 B-1 KiB ranges,
``Connection: close``, progress every 10 %, 100 then 101), ``esp32-stream`` (one GET without
Range), or a mix (see :mod:`onenet_ota.sim.profiles`).

Exit status: 0 when every device succeeded, installed the right bytes and the server's records
agree with the devices; 1 otherwise (or when the run could not start); 130 when interrupted.
Ctrl-C (or SIGTERM) stops the devices, stops a server the command started, removes every
temporary directory, and prints what had happened so far.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

_SIZE_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2}


def _size(text: str, flag: str) -> int:
    value = text.strip().lower()
    number = value.rstrip("kmib")
    unit = value[len(number) :]
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise click.BadParameter(
            f"expected bytes such as 4096, 64k or 1m, got {text!r}", param_hint=flag
        )
    return int(number) * _SIZE_UNITS[unit]


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C (cleanup included), outside the fleet's event loop too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command()
@click.option(
    "--server",
    envvar="ONENET_OTA_SERVER",
    metavar="URL",
    help="the platform's base URL [default: start a local server for this run]",
)
@click.option(
    "--admin-token",
    envvar="ONENET_OTA_ADMIN_TOKEN",
    metavar="TOKEN",
    help="management API token of --server (prefer ONENET_OTA_ADMIN_TOKEN)",
)
@click.option("--devices", type=int, default=100, show_default=True, help="virtual devices")
@click.option(
    "--concurrency", type=int, default=64, show_default=True, help="devices upgrading at once"
)
@click.option(
    "--processes",
    type=int,
    default=1,
    show_default=True,
    help="client processes sharing the devices out (when one cannot keep up)",
)
@click.option(
    "--ramp-up",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="spread the device starts evenly over this long",
)
@click.option(
    "--chunk-size",
    default="64k",
    show_default=True,
    metavar="BYTES",
    help="bytes per download request (the C SDK uses 4096)",
)
@click.option(
    "--package-size",
    default="256k",
    show_default=True,
    metavar="BYTES",
    help="size of the random package the run uploads",
)
@click.option(
    "--package",
    type=click.Path(dir_okay=False, path_type=Path),
    help="upload this file as the package instead",
)
@click.option("--task", "task_id", type=int, help="run an existing task's waiting devices")
@click.option(
    "--allow-real-devices",
    is_flag=True,
    help="let --task run devices the simulator did not create (their versions and task states "
    "on the server change as if they had upgraded)",
)
@click.option(
    "--version",
    "version",
    default="1.0.0",
    show_default=True,
    help="the version devices report before upgrading",
)
@click.option(
    "--target", default="1.0.1", show_default=True, help="the version the uploaded package installs"
)
@click.option(
    "--type", "task_type", type=click.Choice(["fota", "sota"]), default="fota", show_default=True
)
@click.option(
    "--dialect",
    type=click.Choice(["classic", "studio", "fuse", "mixed"]),
    default="classic",
    show_default=True,
    help="the device API the devices speak (mixed: each one of the three, by its index)",
)
@click.option(
    "--profile",
    type=click.Choice(["default", "c-sdk", "at-module", "esp32-stream", "mixed"]),
    default="default",
    show_default=True,
    help="how the devices' clients behave, after the clients in the field (mixed: each one of "
    "the four, by its index)",
)
@click.option(
    "--http",
    type=click.Choice(["sdk", "httpx2"]),
    default="sdk",
    show_default=True,
    help="how the devices send: the SDK's own transport, a connection per device (sdk), or one "
    "shared httpx2 client (httpx2, about three times the simulator's CPU per request)",
)
@click.option(
    "--signal",
    "signal_range",
    metavar="LOW:HIGH",
    help="each device's signal strength, drawn from this range",
)
@click.option(
    "--power",
    "power_range",
    metavar="LOW:HIGH",
    help="each device's battery percent, drawn from this range",
)
@click.option(
    "--task-signal",
    type=int,
    default=0,
    show_default=True,
    help="the task's signal threshold (devices run only above it)",
)
@click.option(
    "--task-power",
    type=int,
    default=0,
    show_default=True,
    help="the task's battery threshold (devices run only above it)",
)
@click.option(
    "--gate",
    type=click.Choice(["defer", "fail"]),
    default="defer",
    show_default=True,
    help="below a threshold: defer quietly, or fail with 105/106/202",
)
@click.option(
    "--drop-rate",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="probability that a request's connection drops",
)
@click.option(
    "--power-cut-rate",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="probability that a device loses power during a run (it then resumes)",
)
@click.option(
    "--defective-rate",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="fraction of devices whose install fails with 205 or 206 (a defective package)",
)
@click.option(
    "--timeout-ms", type=int, default=30_000, show_default=True, help="each request's time limit"
)
@click.option(
    "--retry-interval",
    type=float,
    default=0.2,
    show_default=True,
    metavar="SECONDS",
    help="first wait after a failed step (the upgrader backs off from there)",
)
@click.option("--seed", type=int, help="repeat the package bytes, probes and power-cut plans")
@click.option("--db", metavar="URL", help="the local server's database [default: SQLite]")
@click.option(
    "--server-workers",
    type=int,
    default=1,
    show_default=True,
    help="the local server's worker processes",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="where device state directories are made [default: a temporary directory]",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, allow_dash=True),
    metavar="FILE",
    help="also write the summary as JSON ('-' for stdout)",
)
@click.option("--live/--no-live", default=None, help="the live view [default: on a terminal]")
def simulate(
    server: str | None, admin_token: str | None, devices: int, concurrency: int, processes: int,
    ramp_up: float,
    chunk_size: str, package_size: str, package: Path | None, task_id: int | None,
    allow_real_devices: bool, version: str,
    target: str, task_type: str, dialect: str, profile: str, http: str, signal_range: str | None,
    power_range: str | None,
    task_signal: int, task_power: int, gate: str, drop_rate: float, power_cut_rate: float,
    defective_rate: float, timeout_ms: int, retry_interval: float, seed: int | None, db: str | None,
    server_workers: int, state_dir: Path | None, json_out: str | None, live: bool | None,
) -> None:  # fmt: skip
    """Rehearse a fleet upgrade: virtual devices run the real upgrader against a server."""
    from rich.console import Console

    from onenet_ota.protocol.status import TaskType
    from onenet_ota.sim import FleetConfig, SimulationError, parse_range
    from onenet_ota.sim import simulate as run
    from onenet_ota.sim.view import LiveView, print_summary

    if server is not None and db is not None:
        _fail("--db configures the local server; it makes no sense with --server")
    try:
        config = FleetConfig(
            devices=devices,
            concurrency=concurrency,
            processes=processes,
            ramp_up=ramp_up,
            chunk_size=_size(chunk_size, "--chunk-size"),
            package_size=_size(package_size, "--package-size"),
            package=package,
            task_id=task_id,
            allow_real_devices=allow_real_devices,
            version=version,
            target=target,
            task_type=TaskType.FOTA if task_type == "fota" else TaskType.SOTA,
            dialect=dialect,
            profile=profile,
            http=http,
            signal=None if signal_range is None else parse_range(
                signal_range, "--signal", low=-(2**31), high=2**31 - 1),
            power=None if power_range is None else parse_range(
                power_range, "--power", low=-(2**31), high=2**31 - 1),
            task_signal=task_signal,
            task_power=task_power,
            gate_fail=gate == "fail",
            drop_rate=drop_rate,
            power_cut_rate=power_cut_rate,
            defective_rate=defective_rate,
            timeout_ms=timeout_ms,
            retry_interval=retry_interval,
            seed=seed,
            state_root=state_dir,
        )  # fmt: skip
    except SimulationError as exc:
        _fail(str(exc))
        return
    if not 1 <= server_workers <= 64:
        _fail("--server-workers must be an integer from 1 to 64")
    if state_dir is not None and not state_dir.is_dir():
        _fail(f"--state-dir {state_dir} is not a directory")
    # With --json - the summary's JSON owns stdout; everything else goes to stderr.
    console = Console(stderr=json_out == "-", force_terminal=live)
    view = LiveView(console, config.devices)

    def notice(text: str) -> None:
        console.print(text, style="dim", highlight=False)

    report = None
    try:
        with _sigterm_as_interrupt(), view:
            report = run(
                config,
                server=server,
                admin_token=admin_token,
                db=db,
                server_workers=server_workers,
                on_tick=view.update,
                notice=notice,
            )
    except SimulationError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted during setup; everything was stopped[/yellow]")
        sys.exit(130)
    assert report is not None
    print_summary(report, console)
    if json_out is not None:
        _write_json(report.to_dict(), json_out)
    if report.state.interrupted:
        sys.exit(130)
    sys.exit(0 if report.ok else 1)


def _write_json(data: dict[str, Any], destination: str) -> None:
    text = json.dumps(data, indent=2)
    if destination == "-":
        click.echo(text)
        return
    try:
        Path(destination).write_text(text + "\n")
    except OSError as exc:
        _fail(f"--json {destination}: {exc.strerror or exc}")

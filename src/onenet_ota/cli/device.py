"""``onenet-ota device``: act as a device against a OneNET-compatible OTA server.

Commands::

    onenet-ota device upgrade --server URL --dev-id ID --product-id PID --access-key KEY \\
        --type fota|sota --version V --state-dir DIR --output PATH [--chunk-size N] [--json]
    onenet-ota device check --server URL --dev-id ID --product-id PID --access-key KEY \\
        --type fota|sota --version V [--json]
    onenet-ota device upgrade|check --dialect studio|fuse --server URL --product-id PID \\
        --device-name NAME --access-key KEY [--user-id UID] [--token-version V] ...

``--dialect`` picks the device API (spec §13.7): ``classic`` (the default; needs ``--dev-id``),
``studio`` (§12) or ``fuse`` (§13), which name the device by ``--product-id`` and
``--device-name`` in the path. Their token is device-level by default (Studio: version
2018-10-31, as the C SDK; fuse: 2022-05-01); ``--user-id`` signs an account-level token instead
(fuse only), with the account's key as ``--access-key``; ``--token-version`` overrides the
version.

``upgrade`` runs the whole resumable upgrade (:mod:`onenet_ota.device.upgrader`): run it again
after any interruption and it continues from ``--state-dir``. On a terminal it draws a progress
bar (bytes, rate, ETA); ``--json`` prints one JSON object per event instead, the last one being
``{"event": "result", ...}``. ``check`` asks E3 for a task and prints it. When the reader of
the output goes away (``... --json | head -n 1``), ``upgrade`` stops printing and finishes the
upgrade; its exit status still says how the upgrade ended.

Every option can also come from the environment: ``ONENET_OTA_<OPTION>``, e.g.
``ONENET_OTA_SERVER``, ``ONENET_OTA_DEV_ID``, ``ONENET_OTA_PRODUCT_ID``,
``ONENET_OTA_ACCESS_KEY`` (keep the key out of shell history this way), ``ONENET_OTA_STATE_DIR``.

Exit status of ``upgrade``: 0 when nothing is left to do (upgraded, no task, task already
finished or cancelled); 3 when deferred (gate not passed, task paused, success report pending:
run again later); 1 when the upgrade failed; 2 for bad usage; 130 when interrupted (run again to
resume). ``check``: 0 (task or no task), 1 on error, 2 for bad usage.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from onenet_ota import auth
from onenet_ota.device import (
    Credentials,
    DeviceConfig,
    InvalidArgumentError,
    NoTask,
    OtaClient,
    OtaError,
    TaskType,
    Timeout,
)
from onenet_ota.device.install import FileInstaller
from onenet_ota.device.retry import Retry
from onenet_ota.device.upgrader import (
    Finished,
    GatePolicy,
    Installed,
    Outcome,
    Progress,
    Reported,
    Restarted,
    Retrying,
    TaskFound,
    TokenCheck,
    UpgradeEvent,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
    Verified,
    Waiting,
)
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo
from onenet_ota.protocol.status import describe_status, status_name

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DEFERRED = 3
EXIT_INTERRUPTED = 130

_EXIT_CODES = {
    Outcome.SUCCEEDED: EXIT_OK,
    Outcome.NO_TASK: EXIT_OK,
    Outcome.FINISHED: EXIT_OK,
    Outcome.CANCELLED: EXIT_OK,
    Outcome.DEFERRED: EXIT_DEFERRED,
    Outcome.FAILED: EXIT_FAILED,
}
_TYPES = {"fota": TaskType.FOTA, "sota": TaskType.SOTA}


def _env(name: str) -> str:
    return f"ONENET_OTA_{name}"


def _device_options(command: F) -> F:
    """The options that say who the device is and where its server is."""
    options = [
        click.option(
            "--server",
            envvar=_env("SERVER"),
            required=True,
            metavar="URL",
            help="the OTA server's base URL, e.g. http://127.0.0.1:8080 [env ONENET_OTA_SERVER]",
        ),
        click.option(
            "--dialect",
            envvar=_env("DIALECT"),
            type=click.Choice([dialect.value for dialect in Dialect]),
            default=Dialect.CLASSIC.value,
            show_default=True,
            help="the device API: classic, studio (§12) or fuse (§13) [env ONENET_OTA_DIALECT]",
        ),
        click.option(
            "--dev-id",
            envvar=_env("DEV_ID"),
            metavar="ID",
            help="OneNET device id (digits); classic only, and required there "
            "[env ONENET_OTA_DEV_ID]",
        ),
        click.option(
            "--product-id",
            envvar=_env("PRODUCT_ID"),
            required=True,
            metavar="PID",
            help="product id [env ONENET_OTA_PRODUCT_ID]",
        ),
        click.option(
            "--access-key",
            envvar=_env("ACCESS_KEY"),
            required=True,
            metavar="KEY",
            help="base64 product access key (or device key with --device-name); prefer the "
            "environment variable [env ONENET_OTA_ACCESS_KEY]",
        ),
        click.option(
            "--device-name",
            envvar=_env("DEVICE_NAME"),
            metavar="NAME",
            help="sign a device-level token for this device; studio and fuse also name the "
            "device by it in the path, and need it [env ONENET_OTA_DEVICE_NAME]",
        ),
        click.option(
            "--user-id",
            envvar=_env("USER_ID"),
            metavar="UID",
            help="fuse: sign an account-level token (res=userid/UID, §13.3) with the account's "
            "key as --access-key [env ONENET_OTA_USER_ID]",
        ),
        click.option(
            "--token-version",
            envvar=_env("TOKEN_VERSION"),
            type=click.Choice(auth.VERSIONS),
            help="the token's version; default: the dialect's (§13.7) "
            "[env ONENET_OTA_TOKEN_VERSION]",
        ),
        click.option(
            "--method",
            envvar=_env("METHOD"),
            type=click.Choice(auth.METHODS),
            default="sha1",
            show_default=True,
            help="token HMAC [env ONENET_OTA_METHOD]",
        ),
        click.option(
            "--type",
            "task_type",
            envvar=_env("TYPE"),
            type=click.Choice(sorted(_TYPES)),
            default="fota",
            show_default=True,
            help="FOTA (module firmware) or SOTA (application) [env ONENET_OTA_TYPE]",
        ),
        click.option(
            "--version",
            envvar=_env("VERSION"),
            required=True,
            metavar="V",
            help="the version the device runs now [env ONENET_OTA_VERSION]",
        ),
        click.option(
            "--cdn/--no-cdn",
            envvar=_env("CDN"),
            default=False,
            show_default=True,
            help="ask for a separate download address (ipPort, D10) [env ONENET_OTA_CDN]",
        ),
        click.option("--manuf", envvar=_env("MANUF"), help="manufacturer code (Appendix A)"),
        click.option("--model", envvar=_env("MODEL"), help="module/chip code (Appendix A)"),
        click.option(
            "--timeout",
            "timeout_ms",
            envvar=_env("TIMEOUT"),
            type=click.IntRange(1, 3_600_000),
            default=10_000,
            show_default=True,
            metavar="MS",
            help="per-request time limit in milliseconds [env ONENET_OTA_TIMEOUT]",
        ),
        click.option(
            "--ca-file",
            envvar=_env("CA_FILE"),
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="PEM CA bundle to verify an https server [env ONENET_OTA_CA_FILE]",
        ),
        click.option(
            "--json",
            "as_json",
            envvar=_env("JSON"),
            is_flag=True,
            help="print one JSON object per line instead of text [env ONENET_OTA_JSON]",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _usage(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _client(params: dict[str, Any]) -> OtaClient:
    """A client from the common options; bad values exit with status 2 and one clear line."""
    server: str = params["server"]
    if not server.startswith(("http://", "https://")):
        _usage(f"--server must be an http:// or https:// URL, not {server!r}")
    dialect = Dialect(params["dialect"])
    if dialect is Dialect.CLASSIC and not params["dev_id"]:
        _usage("--dev-id is required with --dialect classic")
    if dialect is not Dialect.CLASSIC and not params["device_name"]:
        _usage(f"--device-name is required with --dialect {dialect.value}")
    if params["user_id"] is not None and dialect is not Dialect.FUSE:
        _usage("--user-id (an account token) works with --dialect fuse only (§13.3)")
    try:
        if params["user_id"] is not None:
            credentials = Credentials.from_user_key(
                params["user_id"],
                params["access_key"],
                method=params["method"],
                version=params["token_version"] or auth.VERSION_2022,
            )
        else:
            credentials = Credentials.for_dialect(
                dialect,
                params["product_id"],
                params["access_key"],
                device_name=params["device_name"],
                method=params["method"],
                version=params["token_version"],
            )
        config = DeviceConfig(
            credentials=credentials,
            dev_id=params["dev_id"] if dialect is Dialect.CLASSIC else None,
            version=params["version"],
            type=_TYPES[params["task_type"]],
            manuf=params["manuf"],
            model=params["model"],
            cdn=params["cdn"],
            dialect=dialect,
            product_id=params["product_id"] if dialect is not Dialect.CLASSIC else None,
            device_name=params["device_name"] if dialect is not Dialect.CLASSIC else None,
        )
        return OtaClient(
            config,
            base_url=server.rstrip("/"),
            timeout=Timeout(params["timeout_ms"]),
            ca_file=params["ca_file"],
        )
    except InvalidArgumentError as exc:
        # Messages name the bad value's field; the access key is never echoed (auth.py).
        _usage(str(exc))


def _print_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


# -- check --------------------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Act as a device: check for a task, or run a whole resumable upgrade."""


@device.command()
@_device_options
def check(**params: Any) -> None:
    """Ask the server for an upgrade task (E3; S-C, F-C) and print it. Changes nothing but the
    stored version (E3 records it, spec §6.3)."""
    as_json: bool = params["as_json"]
    with _client(params) as client:
        try:
            task: TaskInfo | TidTaskInfo = (
                client.check_task()
                if client.dialect is Dialect.CLASSIC
                else client.check_tid_task()
            )
        except NoTask:
            if as_json:
                _print_json({"task": None})
            else:
                click.echo("no task")
            return
        except OtaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    data = _task_dict(task)
    if as_json:
        _print_json({"task": data})
        return
    for key, value in data.items():
        click.echo(f"{key:>9}: {value}")


def _task_dict(task: TaskInfo | TidTaskInfo) -> dict[str, Any]:
    # The token is a download credential: shown, since it is what `check` is for, but only here.
    data = task.to_data()
    data["type"] = "differential" if data["type"] == 2 else "full"
    return data


# -- upgrade ------------------------------------------------------------------------------------


def _size(text: str) -> int:
    value = text.strip().lower()
    units = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2}
    number = value.rstrip("kmib")
    unit = value[len(number) :]
    if not number.isdigit() or unit not in units:
        raise click.BadParameter(f"expected bytes such as 4096, 64k or 1m, got {text!r}")
    return int(number) * units[unit]


class _SizeType(click.ParamType[int]):
    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return _size(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


@device.command()
@_device_options
@click.option(
    "--state-dir",
    envvar=_env("STATE_DIR"),
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="where the resumable state lives; keep it across restarts [env ONENET_OTA_STATE_DIR]",
)
@click.option(
    "--output",
    envvar=_env("OUTPUT"),
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="where the verified package is placed, atomically [env ONENET_OTA_OUTPUT]",
)
@click.option(
    "--chunk-size",
    envvar=_env("CHUNK_SIZE"),
    type=_SizeType(),
    default="64k",
    show_default=True,
    help="bytes per download request (the C SDK uses 4096) [env ONENET_OTA_CHUNK_SIZE]",
)
@click.option(
    "--token-check",
    envvar=_env("TOKEN_CHECK"),
    type=click.Choice([policy.value for policy in TokenCheck]),
    help="when to check the download token (E5) or the task (S-T, F-T); default: the "
    "dialect's, every-chunk on classic and studio, first-chunk on fuse (§13.7) "
    "[env ONENET_OTA_TOKEN_CHECK]",
)
@click.option(
    "--progress-step",
    envvar=_env("PROGRESS_STEP"),
    type=click.IntRange(0, 99),
    default=10,
    show_default=True,
    help="report progress to the server every N percent, 0 never [env ONENET_OTA_PROGRESS_STEP]",
)
@click.option(
    "--checkpoint",
    "checkpoint_bytes",
    envvar=_env("CHECKPOINT"),
    type=_SizeType(),
    default="1m",
    show_default=True,
    help="fsync and persist the offset at least this often [env ONENET_OTA_CHECKPOINT]",
)
@click.option(
    "--signal",
    envvar=_env("SIGNAL"),
    type=int,
    help="the current signal strength, compared with the task's threshold [env ONENET_OTA_SIGNAL]",
)
@click.option(
    "--power",
    envvar=_env("POWER"),
    type=int,
    help="the current battery percent, compared with the task's threshold [env ONENET_OTA_POWER]",
)
@click.option(
    "--gate",
    envvar=_env("GATE"),
    type=click.Choice([policy.value for policy in GatePolicy]),
    default=GatePolicy.DEFER.value,
    show_default=True,
    help="below a threshold: defer without a report, or fail the task [env ONENET_OTA_GATE]",
)
@click.option(
    "--max-duration",
    envvar=_env("MAX_DURATION"),
    type=click.FloatRange(min=0, min_open=True),
    help="seconds after which the upgrade is reported expired, 208 [env ONENET_OTA_MAX_DURATION]",
)
@click.option(
    "--pause-limit",
    envvar=_env("PAUSE_LIMIT"),
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="seconds to wait on a paused task before deferring [env ONENET_OTA_PAUSE_LIMIT]",
)
@click.option(
    "--retry-attempts",
    envvar=_env("RETRY_ATTEMPTS"),
    type=click.IntRange(1, 50),
    default=5,
    show_default=True,
    help="tries per step when the task sets no retry count [env ONENET_OTA_RETRY_ATTEMPTS]",
)
@click.option(
    "--retry-interval",
    envvar=_env("RETRY_INTERVAL"),
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="first wait (s) when the task sets no interval; doubles per retry "
    "[env ONENET_OTA_RETRY_INTERVAL]",
)
def upgrade(**params: Any) -> None:
    """Run the whole upgrade: check, download (resumable), verify, install at --output, report.

    Exit status: 0 nothing left to do, 3 deferred (run again later), 1 failed, 2 bad usage,
    130 interrupted (run again to resume).
    """
    try:
        options = UpgradeOptions(
            chunk_size=params["chunk_size"],
            token_check=None
            if params["token_check"] is None
            else TokenCheck(params["token_check"]),
            progress_step=params["progress_step"],
            checkpoint_bytes=params["checkpoint_bytes"],
            signal_probe=_constant(params["signal"]),
            power_probe=_constant(params["power"]),
            gate=GatePolicy(params["gate"]),
            max_duration=params["max_duration"],
            retry=Retry(
                attempts=params["retry_attempts"],
                interval=params["retry_interval"],
                pause_limit=params["pause_limit"],
            ),
        )
    except ValueError as exc:
        _usage(str(exc))
    output: Path = params["output"]
    if not output.parent.is_dir():
        _usage(f"--output: directory {output.parent} does not exist")
    as_json: bool = params["as_json"]
    with _client(params) as client:
        view: _View = _JsonView() if as_json else _TextView()
        try:
            with view:
                result = Upgrader(
                    client,
                    FileInstaller(output),
                    state_dir=params["state_dir"],
                    options=options,
                    on_event=view.handle,
                ).run()
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # a bug or an environment the SDK did not foresee
            # One line, no traceback; the state directory keeps what was done for the next run.
            click.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    sys.exit(_EXIT_CODES[result.outcome])


def _constant(value: int | None) -> Callable[[], int] | None:
    if value is None:
        return None
    return lambda: value


# -- output -------------------------------------------------------------------------------------


class _View:
    """Shows the upgrader's events; a reader that went away only ends the showing."""

    def __init__(self) -> None:
        self.stdout_gone = False

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def handle(self, event: UpgradeEvent) -> None:
        if self.stdout_gone:
            return
        try:
            self.show(event)
        except BrokenPipeError:
            self.stdout_gone = True
            _discard_stdout()

    def show(self, event: UpgradeEvent) -> None:
        raise NotImplementedError


def _discard_stdout() -> None:
    """Point stdout at /dev/null after its reader left (Python's "Note on SIGPIPE" idiom).

    The upgrade must go on: the device's task does not depend on who reads the output. Without
    this, the interpreter's final flush of the unwritten output fails again at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _JsonView(_View):
    """One JSON object per event, flushed at once (for supervisors and log collectors).

    A status code comes with its meaning: ``"code": 205, "code_name": "upgrade failed: ..."``.
    """

    def show(self, event: UpgradeEvent) -> None:
        data = event.to_dict()
        code = data.get("code")
        if isinstance(code, int):
            name = status_name(code)
            if name is not None:
                data["code_name"] = name
        _print_json(data)


class _TextView(_View):
    """A rich progress bar on a terminal; plain lines otherwise."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        class QuietOnBrokenPipe(Console):
            # rich's default exits the process (SystemExit(1)) mid-upgrade; the view's handle()
            # stops showing instead and the upgrade goes on.
            def on_broken_pipe(self) -> None:
                self.quiet = True
                raise BrokenPipeError

        self.console = QuietOnBrokenPipe(highlight=False)
        self.progress: Any = None
        self.bar: Any = None
        self._last_line_percent = -1

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _start_bar(self, task: TaskFound) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        self.progress = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.bar = self.progress.add_task(task.target, total=task.size, completed=task.resumed_from)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def show(self, event: UpgradeEvent) -> None:
        if isinstance(event, TaskFound):
            resumed = f", resuming at {event.resumed_from} bytes" if event.resumed_from else ""
            self.say(
                f"task: upgrade to {event.target} ({event.size} bytes, md5 {event.md5}{resumed})"
            )
            if self.console.is_terminal and event.phase == "downloading":
                self._start_bar(event)
        elif isinstance(event, Progress):
            if self.progress is not None:
                self.progress.update(self.bar, completed=event.downloaded, total=event.total)
            else:
                percent = event.downloaded * 100 // event.total
                if percent // 10 > self._last_line_percent // 10 or event.downloaded == event.total:
                    self._last_line_percent = percent
                    self.say(f"downloaded {event.downloaded}/{event.total} bytes ({percent}%)")
        elif isinstance(event, Retrying):
            self.say(
                f"retry {event.failures}/{event.attempts - 1} of {event.step} in "
                f"{event.wait:.1f} s: {event.error}"
            )
        elif isinstance(event, Waiting):
            self.say(f"{event.reason}; asking again in {event.wait:.0f} s")
        elif isinstance(event, Restarted):
            self.say(f"starting the download over: {event.reason}")
        elif isinstance(event, Verified):
            self._stop_bar()
            self.say(f"verified: {event.size} bytes, md5 {event.md5}")
        elif isinstance(event, Installed):
            self.say(f"installed {event.target}")
        elif isinstance(event, Reported):
            if event.code > 100:
                self.say(f"reported {describe_status(event.code)}")
        elif isinstance(event, Finished):
            self._stop_bar()
            self.say(_summary(event.result))

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary(result: UpgradeResult) -> str:
    outcome = result.outcome
    if outcome is Outcome.SUCCEEDED:
        text = f"upgraded to {result.target}"
    elif outcome is Outcome.NO_TASK:
        text = "no upgrade task"
    elif outcome is Outcome.FAILED:
        if result.code is None:
            text = "upgrade failed"
        else:
            text = f"failed, reported {describe_status(result.code)}"
    else:
        text = outcome.value.replace("_", " ")
    return f"{text}: {result.reason}" if result.reason else text

"""The upgrade flow, written once, without I/O of its own on the network (sans-IO).

Theory of operation. :meth:`UpgradeFlow.run` is a generator. It yields *operations*
(:class:`PostVersion`, :class:`CheckTask`, :class:`CheckToken`, :class:`Download`,
:class:`Report`, :class:`Tasking`, :class:`Install`, :class:`Sleep`) and receives each one's
result; a failed operation is thrown back into it as the client's exception
(:mod:`onenet_ota.device.errors`). The sync and async upgraders (:mod:`onenet_ota.device.upgrader`)
only perform the operations, the way httpx drives its auth flows. Local disk I/O (the state
directory) happens here, synchronously: it is bounded by the checkpoint size and a device's disk
is local. The exception is the periodic checkpoint during the download, whose fsync and state
save run in a worker thread while the next chunks download (:meth:`UpgradeFlow._checkpoint_behind`).

The flow (spec §7, §10)::

    E1 post version -> E3 check task -> gate (signal, power) -> for each chunk: E5, E6,
    (the next chunk's E5 sent: Prefetch) write -> checkpoint (fsync, persist offset)
    -> verify size and MD5 -> persist VERIFIED -> E7 101
    -> gate (power) -> install -> persist INSTALLED -> E7 201 -> E1 the new version -> clear

Every way out is one :class:`UpgradeResult`. A failure the platform must hear about is reported
exactly once: the code is persisted as *pending* before it is sent, re-sent after a crash, and an
answer proving it already arrived (errno 20, or 21 for a 101 the platform already has) counts as
delivered. Rules that keep a device whole:

- 205 is reported, and nothing installed, when the package's size or MD5 differ from the task's.
- 101 is never sent before the package was verified and fsynced; 201 never before it was installed.
- errno 20/22 stop the flow without a failure report (spec §10); the state is cleared.
- errno 17 waits without consuming the retry budget, within :attr:`Retry.pause_limit`.
- errno 12 (and byte 3 from E6) runs E3 again; a changed size or MD5 restarts the download.
- Retries follow the task's ``retry``/``interval`` (:class:`~onenet_ota.device.retry.Retry`) and
  always end: timeouts, resets, short reads, HTTP 5xx and errno 7 are retried; a refusal that
  cannot succeed is not.

Studio and fuse (§13.7) run the same flow. The task is named by its ``tid``, carried in the
task's ``token`` field as decimal text (:func:`task_from_tid`); the driver turns it back into the
integer the client sends (:func:`tid_of`). ``CheckToken`` is then S-T / F-T, whose status the
driver judges with :func:`judge_status` (a terminal state is errno 20 or 22's exception).
Studio checks the tid before every chunk, as the C SDK does; fuse checks at the start, after a
failed chunk and before each status report, never before every chunk. ``Ota-Errno: 5`` is
followed by a status check: a terminal state stops the flow without a report, an active one
(a paused fuse task shows the state it was paused from, F7) waits as a pause does. Fuse's 12013
(already on the target) ends the run like "no task". The state records the dialect: a state
from another dialect, or from another tid, is started over, never resumed.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import hmac
import random
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn, TypeVar

from onenet_ota.device.errors import (
    AnyEndpoint,
    AuthFailed,
    DownloadError,
    HTTPStatusError,
    InvalidState,
    ManufModelMismatch,
    NoTask,
    NoValidToken,
    OtaError,
    PlatformError,
    PlatformInternalError,
    ProtocolError,
    RequestTimeout,
    TaskCancelled,
    TaskFinished,
    TaskSucceeded,
    TokenExpired,
    TransportError,
    VersionMismatch,
)
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.device.install import InstallError
from onenet_ota.device.retry import PauseLimitReached, Retry, RetryExhausted
from onenet_ota.device.state import (
    Checkpoint,
    PartialFile,
    Phase,
    StateError,
    StateStore,
    UpgradeState,
)
from onenet_ota.protocol.codes import Dialect, OtaErrno
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import StatusCode, TaskType

__all__ = [
    "CheckTask",
    "CheckToken",
    "Download",
    "Finished",
    "GatePolicy",
    "Install",
    "Operation",
    "Outcome",
    "PostVersion",
    "Prefetch",
    "Progress",
    "Report",
    "Reported",
    "Restarted",
    "Retrying",
    "Sleep",
    "TaskFound",
    "Tasking",
    "TokenCheck",
    "UpgradeEvent",
    "UpgradeFlow",
    "UpgradeOptions",
    "UpgradeResult",
    "Verified",
    "Waiting",
]

T = TypeVar("T")

MIN_CHUNK: Final = 2  # OneNET advises at least 2 bytes per request (§6.6.1, §10)
MAX_REFRESHES: Final = 4  # consecutive E3 token refreshes without download progress
MAX_CHUNK: Final = 16 * 1024 * 1024
MAX_DEPTH: Final = 64  # chunks in flight on one connection (UpgradeOptions.pipeline_depth)
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
_FINISHED: Final = "the task is already finished"
_CANCELLED: Final = "the task was cancelled"

Probe = Callable[[], int]
"""Reads a current value from the hardware: signal strength, or battery percent."""


# -- operations: what the flow asks its driver to do ---------------------------------------------


@dataclass(frozen=True, slots=True)
class PostVersion:
    """E1. ``version`` None reports the configured version(s); otherwise this one for the type."""

    version: str | None = None


@dataclass(frozen=True, slots=True)
class CheckTask:
    """E3 with the configured type and version; returns a :class:`TaskInfo`."""


@dataclass(frozen=True, slots=True)
class Tasking:
    """E4: the task already downloading or upgrading; returns a :class:`TaskInfo`. On Studio
    and fuse, the status of task ``token`` (the tid): NoValidToken unless it is upgrading."""

    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Download:
    """E6: ``size`` bytes from ``start``; returns a :class:`DownloadedChunk`. ``total`` is the
    task's package size (Studio and fuse clamp the request's end to it, §13.7)."""

    token: str = field(repr=False)
    start: int
    size: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class CheckToken:
    """E5 with ``token``.

    ``then`` is the download the flow asks for next if the check passes (set only with
    :attr:`UpgradeOptions.pipeline`): a driver may send it right behind the check, on the same
    connection, but must hand its result to the flow only when the next operation is exactly
    ``then`` (so only after the check passed) and drop it otherwise.
    """

    token: str = field(repr=False)
    then: Download | None = None


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Send ``op`` now and return at once, without waiting for its reply.

    The flow yields it just before it writes and hashes a chunk, with the operation it will ask
    for next (the next chunk's check, or the next chunk), so that the server works on that while
    the device works on its disk. The driver hands ``op``'s result to the flow only when the next
    operation is exactly ``op``; when it is anything else, the driver drops what it sent (its
    reply is never used) and performs that operation. A driver may also ignore a prefetch and
    return None: the flow then waits for ``op`` as for any operation.
    """

    op: CheckToken | Download


@dataclass(frozen=True, slots=True)
class Report:
    """E7 with ``code``: progress 0-99 or a status code."""

    token: str = field(repr=False)
    code: int


@dataclass(frozen=True, slots=True)
class Install:
    """Run the installer on the verified ``package``."""

    package: Path
    task: TaskInfo
    task_type: TaskType


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` (before a retry, or while the task is paused)."""

    seconds: float


Operation = (
    PostVersion | CheckTask | Tasking | CheckToken | Download | Prefetch | Report | Install | Sleep
)


# -- configuration and results ----------------------------------------------------------------


class TokenCheck(StrEnum):
    """When to run E5 (spec §6.5: OneNET calls it optional, but the C SDK checks before every
    chunk and a device that never checks cannot report success, because its task never leaves
    to-be-upgraded)."""

    EVERY_CHUNK = "every-chunk"  # the C SDK's behaviour (§7); Studio's default (§13.7)
    FIRST_CHUNK = "first-chunk"  # once per run, and again after any failure or new token;
    # fuse's default (§13.7), which also checks before each status report


DEFAULT_TOKEN_CHECK: Final = {
    Dialect.CLASSIC: TokenCheck.EVERY_CHUNK,
    Dialect.STUDIO: TokenCheck.EVERY_CHUNK,
    Dialect.FUSE: TokenCheck.FIRST_CHUNK,
}


def task_from_tid(task: TidTaskInfo) -> TaskInfo:
    """A Studio/fuse task in the flow's form: the tid as the token's decimal text, no advisory
    values (S-C and F-C send none)."""
    return TaskInfo(
        target=task.target, token=str(task.tid), size=task.size, md5=task.md5, kind=task.kind
    )


def tid_of(token: str) -> int:
    """The tid a Studio/fuse task's token field holds (see :func:`task_from_tid`)."""
    return int(token)


def judge_status(status: int, endpoint: AnyEndpoint | None) -> int:
    """An S-T/F-T status as the flow reads E5's answers: a succeeded or failed task is
    :class:`TaskFinished` (20), a cancelled one :class:`TaskCancelled` (22); an active state is
    returned. A paused task never shows here: S-T answers 17 (S6), F-T its former state (F7)."""
    state = TaskState(status)
    if state is TaskState.CANCELLED:
        raise TaskCancelled(
            int(Errno.TASK_CANCELLED), f"the task is {state.name.lower()}", endpoint=endpoint
        )
    if state.is_terminal:
        raise TaskFinished(
            int(Errno.TASK_FINISHED), f"the task has {state.name.lower()}", endpoint=endpoint
        )
    return status


class GatePolicy(StrEnum):
    """What a failed signal/power gate does. The thresholds are advisory "run only if" values
    (spec §6.3), so the default is to defer without a report."""

    DEFER = "defer"  # stop without a report; the next run tries again
    FAIL = "fail"  # report 105/106 (before download) or 202 (before install) and fail the task


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeOptions:
    """How the upgrader behaves. Every field has a sensible default.

    - ``chunk_size``: bytes per E6 request (the C SDK uses 4096, §7).
    - ``token_check``: when to run E5 (:class:`TokenCheck`); None for the dialect's default
      (§13.7: every chunk on classic and Studio, first chunk on fuse).
    - ``progress_step``: report download progress (E7 0-99) every this many percent; 0 = never.
    - ``checkpoint_bytes``: fsync the partial package and persist the offset at least this often.
      A restart loses at most this much download.
    - ``signal_probe``, ``power_probe``: read the current signal and battery; compared with the
      task's ``signal`` and ``power`` (run only if above; a threshold of 0 means none).
    - ``gate``: what a failed gate does (:class:`GatePolicy`).
    - ``max_duration``: seconds from the first E3 after which the upgrade counts as expired and is
      reported as 208; None for no limit.
    - ``retry``: the defaults of the retry budget; a task's non-zero ``retry``/``interval`` override
      its ``attempts``/``interval``.
    - ``report_version``: after 201, report the new version with E1.
    - ``report_full_progress``: also report progress 100, once the package is verified and just
      before 101, as the AT-command modules of §13.1 do. The platform moves the task to
      upgrading on 100 and answers the 101 after it with errno 21 (§5.5); the upgrader then
      confirms with E4 (S-T, F-T) that the task is upgrading and counts 101 as delivered.
      Off by default: §5.5 and §13.5 say a device that reported 100 does not also send 101.
    - ``pipeline``: send each chunk's token check and its download back to back on one
      connection (HTTP/1.1 pipelining), saving a round trip per chunk: E5 and E6 on classic,
      S-T and S-D on Studio, F-T and F-D on fuse (whose check comes only before the first chunk
      and after a failed one, §13.7). The check still comes first and the chunk is used only
      when it passed. Off by default: OneNET's own servers, and other third-party ones, may not
      pipeline (a server that answers the first request and closes is detected, and the client
      goes back to one request at a time).
    - ``pipeline_depth``: with ``pipeline``, how many chunks (each its check and its download)
      may be in flight on one connection: while the device writes and hashes one chunk, the
      server already answers the next ones. Each chunk is still used only after its own check
      passed; requests sent ahead that the flow no longer wants (a refused token, a changed
      task) are dropped unread with their connection. 1 keeps only the next chunk in flight.

    Whatever the options, the next chunk's request (or its check) is sent before the chunk
    just received is written and hashed (:class:`Prefetch`), so the server and the device's
    disk work at the same time; the requests and their order on the wire are the same.
    """

    chunk_size: int = 64 * 1024
    token_check: TokenCheck | None = None
    progress_step: int = 10
    checkpoint_bytes: int = 1024 * 1024
    signal_probe: Probe | None = None
    power_probe: Probe | None = None
    gate: GatePolicy = GatePolicy.DEFER
    max_duration: float | None = None
    retry: Retry = field(default_factory=Retry)
    report_version: bool = True
    report_full_progress: bool = False
    pipeline: bool = False
    pipeline_depth: int = 4

    def __post_init__(self) -> None:
        if type(self.chunk_size) is not int or not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be an integer from {MIN_CHUNK} to {MAX_CHUNK}")
        if type(self.progress_step) is not int or not 0 <= self.progress_step <= 99:
            raise ValueError("progress_step must be an integer from 0 (never) to 99")
        if type(self.checkpoint_bytes) is not int or self.checkpoint_bytes < 1:
            raise ValueError("checkpoint_bytes must be a positive integer")
        if self.token_check is not None:
            object.__setattr__(self, "token_check", TokenCheck(self.token_check))
        object.__setattr__(self, "gate", GatePolicy(self.gate))
        if self.max_duration is not None and not self.max_duration > 0:
            raise ValueError("max_duration must be positive (or None)")
        if not isinstance(self.retry, Retry):
            raise ValueError("retry must be a Retry")
        if type(self.pipeline_depth) is not int or not 1 <= self.pipeline_depth <= MAX_DEPTH:
            raise ValueError(f"pipeline_depth must be an integer from 1 to {MAX_DEPTH}")
        for name in ("report_version", "report_full_progress", "pipeline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False")


class Outcome(StrEnum):
    """How an upgrade run ended."""

    SUCCEEDED = "succeeded"  # installed and reported (201)
    NO_TASK = "no_task"  # nothing to do (errno 11)
    DEFERRED = "deferred"  # gate not passed, task paused, or platform unreachable: try later
    CANCELLED = "cancelled"  # the task was cancelled (errno 22)
    FINISHED = "finished"  # the task was already finished (errno 20)
    FAILED = "failed"  # failed; ``code`` is the status reported, if any


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    """The end of one run.

    ``code`` is the failure status code reported (102-107, 202-208), or None when the failure
    could not be reported to the platform (then ``reason`` says why, and the state is kept for the
    next run when that can help). ``reports`` lists every E7 value the platform acknowledged in
    this run, progress included. ``bytes_downloaded`` counts this run's bytes; ``resumed_from``
    is the offset the download continued from.
    """

    outcome: Outcome
    task_type: TaskType
    target: str | None = None
    code: StatusCode | None = None
    reason: str = ""
    bytes_downloaded: int = 0
    resumed_from: int = 0
    reports: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is left to do: succeeded, no task, or already finished."""
        return self.outcome in (Outcome.SUCCEEDED, Outcome.NO_TASK, Outcome.FINISHED)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "outcome": self.outcome.value,
            "type": self.task_type.name.lower(),
            "target": self.target,
            "code": None if self.code is None else int(self.code),
            "reason": self.reason,
            "bytes_downloaded": self.bytes_downloaded,
            "resumed_from": self.resumed_from,
            "reports": list(self.reports),
        }


# -- events: what the flow tells its observer ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpgradeEvent:
    """Base of the upgrader's events. ``to_dict()`` gives ``{"event": name, ...fields}``."""

    name: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"event": self.name, **asdict(self)}


@dataclass(frozen=True, slots=True)
class TaskFound(UpgradeEvent):
    """E3 returned a task; ``resumed_from`` is the durable offset the download continues from."""

    name: ClassVar[str] = "task"
    target: str
    size: int
    md5: str
    resumed_from: int
    phase: str


@dataclass(frozen=True, slots=True)
class Progress(UpgradeEvent):
    """Bytes of the package on disk so far."""

    name: ClassVar[str] = "progress"
    downloaded: int
    total: int


@dataclass(frozen=True, slots=True)
class Retrying(UpgradeEvent):
    """A step failed and will be tried again after ``wait`` seconds."""

    name: ClassVar[str] = "retry"
    step: str
    error: str
    failures: int
    attempts: int
    wait: float


@dataclass(frozen=True, slots=True)
class Waiting(UpgradeEvent):
    """The task is paused; asking again after ``wait`` seconds."""

    name: ClassVar[str] = "wait"
    reason: str
    wait: float


@dataclass(frozen=True, slots=True)
class Restarted(UpgradeEvent):
    """The download starts over from 0 (the package changed, or a resumed file failed MD5)."""

    name: ClassVar[str] = "restart"
    reason: str


@dataclass(frozen=True, slots=True)
class Verified(UpgradeEvent):
    """The package's size and MD5 match the task."""

    name: ClassVar[str] = "verified"
    size: int
    md5: str


@dataclass(frozen=True, slots=True)
class Reported(UpgradeEvent):
    """E7 accepted ``code`` (progress or status), or proved it already had it."""

    name: ClassVar[str] = "report"
    code: int


@dataclass(frozen=True, slots=True)
class Installed(UpgradeEvent):
    """The installer finished."""

    name: ClassVar[str] = "installed"
    target: str


@dataclass(frozen=True, slots=True)
class Finished(UpgradeEvent):
    """The run ended."""

    name: ClassVar[str] = "result"
    result: UpgradeResult

    def to_dict(self) -> dict[str, Any]:
        """``{"event": "result", ...the result's fields}``."""
        return {"event": self.name, **self.result.to_dict()}


# -- internals ----------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends the flow with ``result`` (raised from deep inside, caught in :meth:`run`)."""

    def __init__(self, result: UpgradeResult) -> None:
        super().__init__(result.outcome.value)
        self.result = result


class _Exhausted(Exception):
    """A step failed with a retryable error until the budget ran out; ``last`` is the last one."""

    def __init__(self, step: str, last: OtaError, attempts: int) -> None:
        super().__init__(f"{step}: {last} (gave up after {attempts} attempts)")
        self.step = step
        self.last = last


class _Deliver(Exception):
    """A failure was decided: :meth:`UpgradeFlow.run` reports ``code`` and stops."""

    def __init__(self, code: StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _FailedChunk(Exception):
    """A retryable download failure on fuse: the loop checks the task (F-T) before retrying."""


class _Unreachable:
    """The report's answer when the platform could not be reached."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _is_retryable(exc: BaseException) -> bool:
    """Timeouts, resets, short reads, garbled replies, 5xx, errno 7, byte 4 (read failure)."""
    if isinstance(exc, TransportError | ProtocolError | PlatformInternalError):
        return True
    if isinstance(exc, HTTPStatusError):
        return exc.status_code >= 500 or exc.status_code in _RETRYABLE_STATUS
    if isinstance(exc, DownloadError):
        return exc.reason is DownloadErrorCode.READ_FAILED
    return False


def _no_task(exc: NoTask) -> str:
    if isinstance(exc, TaskSucceeded):  # fuse 12013 (F6)
        return "no upgrade task: the device already runs the latest task's target"
    return "no upgrade task"


def _is_failure_code(code: int) -> bool:
    return 102 <= code <= 107 or 202 <= code <= 208


def _same_package(a: TaskInfo, b: TaskInfo) -> bool:
    return a.target == b.target and a.size == b.size and a.md5 == b.md5 and a.kind == b.kind


def _local_code(exc: BaseException, *, downloading: bool) -> StatusCode:
    """The status code of a local failure: disk full, out of memory, other."""
    if isinstance(exc, MemoryError):
        return StatusCode.DOWNLOAD_NO_MEMORY if downloading else StatusCode.UPGRADE_NO_MEMORY
    if isinstance(exc, OSError) and exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
        return StatusCode.DOWNLOAD_NO_SPACE if downloading else StatusCode.UPGRADE_OTHER
    return StatusCode.DOWNLOAD_OTHER if downloading else StatusCode.UPGRADE_OTHER


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({errno_codes.errorcode.get(exc.errno or 0, exc.errno)})"
    return str(exc) or type(exc).__name__


Flow = Generator[Operation, Any, T]


class UpgradeFlow:
    """One upgrade run as a generator of operations. Create one per run.

    ``store`` is the durable state of ``task_type``; ``current_version`` is the version the device
    runs now (what the client reports in E1 and E3). ``emit`` receives :class:`UpgradeEvent`s,
    ``clock`` gives Unix time, ``rng`` draws retry jitter.
    """

    def __init__(
        self,
        *,
        store: StateStore,
        task_type: TaskType,
        current_version: str,
        options: UpgradeOptions,
        emit: Callable[[UpgradeEvent], None],
        clock: Callable[[], float],
        rng: random.Random,
        dialect: Dialect = Dialect.CLASSIC,
    ) -> None:
        if store.task_type is not task_type:
            raise ValueError("the state store is for another task type")
        self.store = store
        self.task_type = task_type
        self.current_version = current_version
        self.options = options
        self._emit = emit
        self._clock = clock
        self._rng = rng
        self.retry = options.retry
        self.state: UpgradeState | None = None
        self._partial: PartialFile | None = None
        self._reports: list[int] = []
        self._downloaded = 0
        self._resumed_from = 0
        self._verified_this_run = False
        self._refreshes = 0
        self._behind: Checkpoint | None = None  # see _checkpoint_behind
        self.dialect = Dialect(dialect)
        self.token_check = options.token_check or DEFAULT_TOKEN_CHECK[self.dialect]

    @property
    def _by_tid(self) -> bool:
        return self.dialect is not Dialect.CLASSIC

    # -- entry --------------------------------------------------------------------------------

    def run(self) -> Flow[UpgradeResult]:
        """The whole run; returns its :class:`UpgradeResult` (also emitted as :class:`Finished`)."""
        try:
            with self.store.lock():
                try:
                    try:
                        result = yield from self._main()
                    except _Deliver as failure:
                        if self.state is None:  # nothing to report on: no task was found
                            raise self._stop(Outcome.FAILED, failure.reason) from None
                        yield from self._fail(failure.code, failure.reason)
                        raise AssertionError("_fail always stops") from None  # pragma: no cover
                except _Stop as stop:
                    result = stop.result
                except BaseException as exc:
                    if not isinstance(exc, Exception):
                        # An orderly interruption: Ctrl-C or SystemExit here, or the driver
                        # closing the flow after one (GeneratorExit; a cancellation). Keep the
                        # bytes downloaded so far for the next run, then release the lock. An
                        # Exception escaping the flow is a crash (or a simulated power cut):
                        # the durable state stays as the last checkpoint left it.
                        self._checkpoint_quietly()
                    raise
                finally:
                    self._close_partial()
        except StateError as exc:
            result = self._result(Outcome.FAILED, reason=str(exc))
        self._emit(Finished(result))
        return result

    def _result(
        self, outcome: Outcome, *, code: StatusCode | None = None, reason: str = ""
    ) -> UpgradeResult:
        return UpgradeResult(
            outcome=outcome,
            task_type=self.task_type,
            target=None if self.state is None else self.state.task.target,
            code=code,
            reason=reason,
            bytes_downloaded=self._downloaded,
            resumed_from=self._resumed_from,
            reports=tuple(self._reports),
        )

    def _stop(
        self,
        outcome: Outcome,
        reason: str = "",
        *,
        code: StatusCode | None = None,
        clear: bool = False,
    ) -> _Stop:
        result = self._result(outcome, code=code, reason=reason)
        if clear:
            self._clear()
        else:
            self._checkpoint_quietly()
        return _Stop(result)

    def _main(self) -> Flow[UpgradeResult]:
        self.state = self.store.load()
        if self.state is not None and self.state.dialect is not self.dialect:
            # Its task reference means nothing to this dialect (a token is no tid), and its
            # reports went to another API: start over rather than resume it wrongly.
            self._emit(
                Restarted(reason=f"the saved upgrade is of the {self.state.dialect.value} dialect")
            )
            self.state = None
            self._clear()
        state = self.state
        if state is not None:
            self._resumed_from = state.offset if state.phase is Phase.DOWNLOADING else 0
        if state is not None and state.pending is not None and _is_failure_code(state.pending):
            # A failure decided by an earlier run whose report may not have arrived.
            code = StatusCode(state.pending)
            yield from self._fail(code, "reported again after a restart")
        if state is not None and state.phase is Phase.INSTALLED:
            return (yield from self._complete())
        yield from self._post_version()
        task = yield from self._find_task()
        self._adopt(task)
        state = self._require_state()
        self._emit(
            TaskFound(
                target=state.task.target,
                size=state.task.size,
                md5=state.task.md5,
                resumed_from=state.offset if state.phase is Phase.DOWNLOADING else state.task.size,
                phase=state.phase.value,
            )
        )
        if state.phase is Phase.DOWNLOADING:
            self._gate(downloading=True)
            yield from self._download()
        return (yield from self._apply())

    # -- state --------------------------------------------------------------------------------

    def _require_state(self) -> UpgradeState:
        assert self.state is not None, "no task yet"
        return self.state

    def _save(self, **changes: Any) -> None:
        """Update the state and persist it; OSError propagates (the caller maps it to a code)."""
        self._settle()
        self.state = replace(self._require_state(), **changes)
        self.store.save(self.state)

    def _save_quietly(self, **changes: Any) -> None:
        """Update and persist if the disk lets us; a failure only costs durability."""
        with contextlib.suppress(OSError):
            self._settle()
        self.state = replace(self._require_state(), **changes)
        with contextlib.suppress(OSError):
            self.store.save(self.state)

    def _checkpoint(self) -> None:
        """fsync the partial package, then persist the offset it covers (never the reverse)."""
        self._settle()
        partial = self._partial
        state = self.state
        if partial is None or state is None or state.phase is not Phase.DOWNLOADING:
            return
        if partial.offset == state.offset and partial.durable_offset == partial.offset:
            return
        partial.sync()
        self._save(offset=partial.durable_offset)

    def _checkpoint_behind(self) -> None:
        """:meth:`_checkpoint` in a worker thread, while the download goes on: the fsync of
        the partial package, then the state with the offset it covers. The offset counts as
        durable only once :meth:`_settle` saw both done (the next checkpoint, any save, the
        end of the download, closing the file); until then a restart resumes from the one
        before, as it would after a power cut in the middle of a checkpoint."""
        self._settle()
        partial = self._partial
        assert partial is not None
        snapshot = replace(self._require_state(), offset=partial.offset)
        store = self.store
        self._behind = partial.sync_behind(lambda: store.save(snapshot))

    def _settle(self) -> None:
        """Wait for the checkpoint running behind the download, if any, and take its offset
        as the state's. Raises its :class:`OSError` (the offset then stays where it was)."""
        behind, self._behind = self._behind, None
        if behind is None:
            return
        partial = self._partial
        assert partial is not None, "the partial package is closed only after settling"
        partial.settle(behind)
        state = self._require_state()
        if state.phase is Phase.DOWNLOADING and behind.offset > state.offset:
            self.state = replace(state, offset=behind.offset)

    def _checkpoint_quietly(self) -> None:
        # the durable offset stays where it was; a restart repeats the rest
        with contextlib.suppress(OSError, MemoryError):
            self._checkpoint()

    def _close_partial(self) -> None:
        if self._partial is not None:
            with contextlib.suppress(OSError):
                self._settle()  # the worker's fsync must not outlive the file's descriptor
            with contextlib.suppress(OSError):
                self._partial.close()
            self._partial = None

    def _clear(self) -> None:
        self._close_partial()
        # a stale state is re-examined (and found finished) by the next run
        with contextlib.suppress(OSError):
            self.store.clear()

    # -- generic steps ----------------------------------------------------------------------

    def _call(
        self,
        step: str,
        make: Callable[[], Operation],
        *,
        reset: bool = False,
        accept: Callable[[Any], None] | None = None,
        check_after_failure: bool = False,
    ) -> Flow[Any]:
        """Perform an operation, retrying retryable failures within the budget.

        ``reset`` restores the full budget on success (for steps outside the download loop,
        where only written bytes count as progress). ``accept`` validates the result and may
        raise an :class:`OtaError` that is treated like the operation's own failure.
        Raises :class:`_Exhausted`, or the operation's non-retryable error.
        """
        while True:
            try:
                result = yield make()
                if accept is not None:
                    accept(result)
            except OtaError as exc:
                if not _is_retryable(exc):
                    raise
                yield from self._backoff(step, exc)
                if check_after_failure:
                    raise _FailedChunk from exc  # the caller checks the task before retrying
                continue
            if reset:
                self.retry = self.retry.reset()
            return result

    def _backoff(self, step: str, exc: OtaError) -> Flow[None]:
        try:
            self.retry = self.retry.increment(exc)
        except RetryExhausted as exhausted:
            raise _Exhausted(step, exc, exhausted.retry.failures) from exc
        wait = self.retry.backoff(self._rng.random())
        self._checkpoint_quietly()
        self._emit(
            Retrying(
                step=step,
                error=str(exc),
                failures=self.retry.failures,
                attempts=self.retry.attempts,
                wait=round(wait, 3),
            )
        )
        yield Sleep(wait)

    def _wait_paused(self, reason: str) -> Flow[None]:
        """errno 17: wait without consuming the retry budget (§10), within the pause limit."""
        self._checkpoint_quietly()
        try:
            self.retry, wait = self.retry.pause()
        except PauseLimitReached as exc:
            raise self._stop(Outcome.DEFERRED, f"{reason}; {exc}") from None
        self._emit(Waiting(reason=reason, wait=wait))
        yield Sleep(wait)

    # -- E1, E3 -------------------------------------------------------------------------------

    def _post_version(self) -> Flow[None]:
        try:
            yield from self._call("post version", PostVersion, reset=True)
        except _Exhausted as exc:
            raise self._stop(Outcome.FAILED, f"cannot reach the platform: {exc}") from None
        except OtaError as exc:
            raise self._stop(Outcome.FAILED, self._config_problem(exc)) from None

    def _config_problem(self, exc: OtaError) -> str:
        if isinstance(exc, AuthFailed):
            return f"{exc} (check the product id, access key and dev_id)"
        if isinstance(exc, HTTPStatusError):
            return f"{exc} (is the server URL right?)"
        return str(exc)

    def _find_task(self) -> Flow[TaskInfo]:
        """E3; a task that vanished (errno 11) is looked up by its old token (§5.4)."""
        while True:
            try:
                task: TaskInfo = yield from self._call("check task", CheckTask, reset=True)
                return task
            except NoTask as exc:
                if self.state is None:
                    raise self._stop(Outcome.NO_TASK, _no_task(exc)) from None
                return (yield from self._resolve_vanished())
            except (ManufModelMismatch, VersionMismatch) as exc:
                # T7/T8: the platform itself failed the task; nothing to report (§5.3).
                raise self._stop(
                    Outcome.FAILED, f"the platform refused the task: {exc}", clear=True
                ) from None
            except _Exhausted as exc:
                raise self._stop(Outcome.FAILED, f"cannot reach the platform: {exc}") from None
            except OtaError as exc:
                raise self._stop(Outcome.FAILED, self._config_problem(exc)) from None

    def _resolve_vanished(self) -> Flow[TaskInfo]:
        """E3 says there is no task, but we hold one: E5 with its token tells why (§5.4).

        Cancelled (22) or finished (20): stop and clean up. Paused (17, or 12 when the paused
        task's token also expired; E3 hides paused tasks, D12): wait within the pause limit and
        return the task once E5 accepts the token again (or E3 shows the task with a fresh one).
        """
        state = self._require_state()
        while True:
            try:
                yield from self._call("check token", lambda: CheckToken(state.task.token))
                return state.task
            except TaskCancelled:
                raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True) from None
            except TaskFinished:
                if state.pending == StatusCode.UPGRADED or StatusCode.UPGRADED in state.sent:
                    raise self._stop(
                        Outcome.SUCCEEDED, "201 was already recorded", clear=True
                    ) from None
                raise self._stop(Outcome.FINISHED, _FINISHED, clear=True) from None
            except NoValidToken:
                raise self._stop(
                    Outcome.NO_TASK, "the platform no longer knows the task", clear=True
                ) from None
            except InvalidState:
                expired = False
            except TokenExpired:
                expired = True
            except _Exhausted as exc:
                raise self._stop(Outcome.FAILED, f"cannot reach the platform: {exc}") from None
            except OtaError as exc:
                raise self._stop(Outcome.FAILED, self._config_problem(exc)) from None
            yield from self._wait_paused("the task is paused")
            if not expired:
                continue
            try:
                task: TaskInfo = yield from self._call("check task", CheckTask)
            except NoTask:
                continue
            except _Exhausted as exc:
                raise self._stop(Outcome.FAILED, f"cannot reach the platform: {exc}") from None
            except OtaError as exc:
                raise self._stop(Outcome.FAILED, self._config_problem(exc)) from None
            return task

    def _adopt(self, task: TaskInfo) -> None:
        """Continue the persisted upgrade under ``task``, or start a new one."""
        state = self.state
        if state is not None and self._by_tid and state.task.token != task.token:
            # Another tid is another task (§12.2): its reports must not inherit this one's.
            self._emit(Restarted(reason="the platform's task is another tid"))
            self._clear()
            self._resumed_from = 0
            state = self.state = None
        if state is not None and not _same_package(state.task, task):
            self._emit(Restarted(reason="the task's package changed"))
            self._clear()
            self._resumed_from = 0
            state = self.state = None
        self.retry = replace(
            Retry.from_task(
                task.retry,
                task.interval,
                default_attempts=self.options.retry.attempts,
                default_interval=self.options.retry.interval,
                backoff_factor=self.options.retry.backoff_factor,
                backoff_max=self.options.retry.backoff_max,
                jitter=self.options.retry.jitter,
                pause_limit=self.options.retry.pause_limit,
                pause_poll=self.options.retry.pause_poll,
            ),
            paused_for=self.retry.paused_for,
        )
        try:
            if state is None:
                self.state = UpgradeState(
                    task_type=self.task_type,
                    from_version=self.current_version,
                    task=task,
                    started_at=self._clock(),
                    dialect=self.dialect,
                )
                self.store.save(self.state)
            elif state.task != task:
                self._save(task=task)
        except (OSError, MemoryError) as exc:
            self._fail_local(exc, downloading=True)

    # -- gate and deadline ------------------------------------------------------------------

    def _gate(self, *, downloading: bool) -> None:
        """Signal and power must be above the task's thresholds (§6.3: "run only if")."""
        task = self._require_state().task
        power, signal = self.options.power_probe, self.options.signal_probe
        checks: list[tuple[str, Probe | None, int, StatusCode]]
        if downloading:
            checks = [
                ("battery", power, task.power, StatusCode.DOWNLOAD_LOW_BATTERY),
                ("signal", signal, task.signal, StatusCode.DOWNLOAD_WEAK_SIGNAL),
            ]
        else:
            checks = [("battery", power, task.power, StatusCode.UPGRADE_LOW_BATTERY)]
        for what, probe, threshold, code in checks:
            if probe is None or threshold == 0:  # 0 is the unset default of §4.5
                continue
            try:
                value = int(probe())
            except Exception as exc:  # a probe is caller code; never let it crash the upgrade
                raise self._stop(
                    Outcome.DEFERRED, f"the {what} probe failed: {_describe(exc)}"
                ) from None
            if value > threshold:
                continue
            reason = f"{what} {value} is not above the task's threshold {threshold}"
            if self.options.gate is GatePolicy.FAIL:
                self._fail_now(code, reason)
            raise self._stop(Outcome.DEFERRED, reason)

    def _check_deadline(self) -> None:
        limit = self.options.max_duration
        state = self._require_state()
        if limit is None or self._clock() - state.started_at <= limit:
            return
        self._fail_now(
            StatusCode.UPGRADE_EXPIRED, f"the upgrade took longer than {limit:g} s (max_duration)"
        )

    # -- download -----------------------------------------------------------------------------

    def _download(self) -> Flow[None]:
        state = self._require_state()
        try:
            self._partial = self.store.open_partial(state.offset)
        except (OSError, MemoryError) as exc:
            self._fail_local(exc, downloading=True)
        partial = self._partial
        assert partial is not None
        if partial.offset != state.offset:
            self._emit(Restarted(reason="the partial package was shorter than its durable offset"))
            self._resumed_from = 0
            self._save_quietly(offset=partial.offset)
        try:
            yield from self._download_loop()
        except (OSError, MemoryError) as exc:
            self._fail_local(exc, downloading=True)

    def _download_loop(self) -> Flow[None]:
        needs_check = True
        while True:
            state = self._require_state()
            partial = self._partial
            assert partial is not None
            if partial.offset >= state.task.size:
                self._checkpoint()
                if self._verify_download():
                    return
                needs_check = True
                continue
            if needs_check or self.token_check is TokenCheck.EVERY_CHUNK:
                yield from self._token_check(partial.offset)
                needs_check = False
                # E5 may have refreshed the task, or restarted the download for a new package.
                state = self._require_state()
                partial = self._partial
                assert partial is not None
                if partial.offset >= state.task.size:
                    continue
            got = yield from self._download_chunk(partial.offset)
            if got is None:  # the task was refreshed or a chunk failed: check the task first
                needs_check = True
                continue
            ahead = self._next_request(partial.offset + len(got))
            if ahead is not None:
                # The next chunk's request goes out before this one is written and hashed: the
                # server answers while the disk works. Its reply is used only if the flow asks
                # for exactly that next (Prefetch), so a failed write still stops here.
                yield Prefetch(ahead)
            partial.write(got)
            self._downloaded += len(got)
            self.retry = self.retry.reset()
            self._refreshes = 0
            size = state.task.size
            self._emit(Progress(downloaded=partial.offset, total=size))
            if partial.offset - partial.durable_offset >= self.options.checkpoint_bytes:
                self._checkpoint_behind()
            yield from self._report_progress(partial.offset, size)

    def _next_request(self, offset: int) -> CheckToken | Download | None:
        """What the download loop asks for once the chunk ending at ``offset`` is written, if
        that is known now: the next chunk's check, or the chunk itself when the dialect checks
        only after a failure. None when something else comes first (a progress report, the
        verification)."""
        state = self._require_state()
        size = state.task.size
        if offset >= size or self._progress_due(offset, size) is not None:
            return None
        if self.token_check is TokenCheck.EVERY_CHUNK:
            return self._chunk_check(offset)
        return self._planned_download(offset)

    def following(self, op: CheckToken | Download) -> CheckToken | Download | None:
        """The request the download loop asks for after ``op``'s chunk, if that chunk arrives
        whole and nothing else intervenes; None at the end of the package or when ``op`` is
        no chunk's request. A driver may send it ahead; it must still hand its result to the
        flow only when the flow asks for exactly it (see :class:`Prefetch`)."""
        download = op.then if isinstance(op, CheckToken) else op
        state = self.state
        if download is None or state is None or download.token != state.task.token:
            return None
        start = download.start + download.size
        if start >= state.task.size:
            return None
        if self.token_check is TokenCheck.EVERY_CHUNK:
            return self._chunk_check(start)
        return self._planned_download(start)

    def _chunk_check(self, start: int) -> CheckToken:
        """E5 (S-T, F-T) before the chunk at ``start``, with that chunk when pipelining."""
        then = self._planned_download(start) if self.options.pipeline else None
        return CheckToken(self._require_state().task.token, then)

    def _token_check(self, start: int) -> Flow[None]:
        """E5 before the chunk at ``start`` (§6.5, §10's errno table)."""
        while True:
            try:
                yield from self._call("check token", lambda: self._chunk_check(start))
                self._check_deadline()
                return
            except (TokenExpired, NoValidToken) as exc:
                yield from self._refresh(f"{exc}")
            except InvalidState:
                yield from self._wait_paused("the task is paused")
            except TaskFinished:
                raise self._stop(Outcome.FINISHED, _FINISHED, clear=True) from None
            except TaskCancelled:
                raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True) from None
            except AuthFailed as exc:
                raise self._stop(Outcome.FAILED, self._config_problem(exc)) from None
            except _Exhausted as exc:
                self._fail_exhausted(exc)
            except OtaError as exc:
                self._fail_now(StatusCode.DOWNLOAD_OTHER, f"check token: {exc}")

    def _refresh(self, why: str) -> Flow[None]:
        """Run E3 again for a fresh token (§5.6); a changed package restarts the download.

        Refreshing is normal once in 48 h, not over and over: a platform that keeps refusing
        the tokens it issues ends the upgrade after :data:`MAX_REFRESHES` refreshes in a row
        without a byte of progress.
        """
        self._refreshes += 1
        if self._refreshes > MAX_REFRESHES:
            self._fail_now(
                StatusCode.DOWNLOAD_OTHER,
                f"{why}; the token was renewed {MAX_REFRESHES} times without any progress",
            )
        state = self._require_state()
        old = state.task
        try:
            task: TaskInfo = yield from self._call("check task", CheckTask)
        except NoTask:
            task = yield from self._resolve_vanished()
        except (ManufModelMismatch, VersionMismatch) as exc:
            raise self._stop(
                Outcome.FAILED, f"the platform refused the task: {exc}", clear=True
            ) from None
        except _Exhausted as exc:
            self._fail_exhausted(exc)
        except OtaError as exc:
            self._fail_now(StatusCode.DOWNLOAD_OTHER, f"check task: {exc}")
        if task.token == old.token and _same_package(task, old):
            # The platform keeps handing out a token it then refuses: count it, so this ends.
            yield from self._backoff("refresh token", ProtocolError(why))
        if _same_package(task, old):
            if task != old:
                self._save(task=task)
            return
        self._emit(Restarted(reason="the task's package changed"))
        self._close_partial()
        self.store.discard_partial()
        self.state = UpgradeState(
            task_type=self.task_type,
            from_version=self.current_version,
            task=task,
            started_at=state.started_at,
            dialect=self.dialect,
        )
        self.store.save(self.state)
        self._partial = self.store.open_partial(0)
        self._resumed_from = 0

    def _planned_download(self, start: int) -> Download:
        """The E6 request for the chunk at ``start``."""
        state = self._require_state()
        size = state.task.size
        want = min(self.options.chunk_size, size - start)
        # At least 2 bytes per request (§6.6.1); the server clamps the end at EOF (§6.6.2).
        return Download(state.task.token, start, max(want, MIN_CHUNK), size)

    def _download_chunk(self, start: int) -> Flow[memoryview | None]:
        """E6 for the chunk at ``start``: its new bytes, or None after a task refresh."""
        size = self._require_state().task.size

        def accept(chunk: DownloadedChunk) -> None:
            # §10: bytes go where Content-Range puts them; anything before ``start`` we have.
            if chunk.total != size:
                raise ProtocolError(f"the server's package has {chunk.total} bytes, not {size}")
            if not chunk.start <= start <= chunk.end:
                raise ProtocolError(f"served {chunk.start}-{chunk.end} for a chunk at {start}")

        try:
            chunk: DownloadedChunk = yield from self._call(
                "download",
                lambda: self._planned_download(start),
                accept=accept,
                # §13.7: on fuse a failed chunk is followed by F-T before it is asked again.
                check_after_failure=self.dialect is Dialect.FUSE,
            )
        except _FailedChunk:
            return None
        except DownloadError as exc:
            if exc.reason is OtaErrno.NOT_DOWNLOADABLE:
                # Ota-Errno 5 (§13.5): ended, cancelled or paused. The status check tells which:
                # a terminal state stops without a report (§13.7), an active one is a pause.
                yield from self._status_after_refusal()
                return None
            if exc.reason is DownloadErrorCode.INVALID_TOKEN:
                # Byte 3: expired token, or the task stopped (§6.6.4): E3 (and E5) tell which.
                yield from self._backoff("download", exc)
                yield from self._refresh(str(exc))
                return None
            self._fail_now(StatusCode.DOWNLOAD_OTHER, f"download: {exc}")
        except _Exhausted as exc:
            self._fail_exhausted(exc)
        except OtaError as exc:
            self._fail_now(StatusCode.DOWNLOAD_OTHER, f"download: {exc}")
        view = memoryview(chunk.data)[start - chunk.start :]
        return view[: size - start]

    def _status_after_refusal(self) -> Flow[None]:
        """After ``Ota-Errno: 5``: S-T/F-T. Terminal stops the run; anything else waits."""
        try:
            yield from self._call("task status", lambda: self._check_op())
        except TaskFinished:
            raise self._stop(Outcome.FINISHED, _FINISHED, clear=True) from None
        except TaskCancelled:
            raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True) from None
        except InvalidState:
            pass
        except NoValidToken as exc:
            raise self._stop(
                Outcome.NO_TASK, f"the platform no longer knows the task: {exc}", clear=True
            ) from None
        except _Exhausted as exc:
            self._fail_exhausted(exc)
        except OtaError as exc:
            self._fail_now(StatusCode.DOWNLOAD_OTHER, f"task status: {exc}")
        yield from self._wait_paused("the platform refused the download (Ota-Errno 5)")

    def _check_op(self) -> CheckToken:
        return CheckToken(self._require_state().task.token)

    def _progress_due(self, offset: int, size: int) -> int | None:
        """The progress value to report once ``offset`` bytes are written, or None."""
        step = self.options.progress_step
        if step == 0:
            return None
        percent = offset * 100 // size
        value = percent - percent % step
        # 0-99 only: 100 would replace 101, and the SDK sends 101 (§5.5).
        if value <= self._require_state().progress or value <= 0 or value >= 100:
            return None
        return value

    def _report_progress(self, offset: int, size: int) -> Flow[None]:
        value = self._progress_due(offset, size)
        if value is None:
            return
        state = self._require_state()
        try:
            yield Report(state.task.token, value)
        except TaskFinished:
            raise self._stop(Outcome.FINISHED, _FINISHED, clear=True) from None
        except TaskCancelled:
            raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True) from None
        except OtaError:
            return  # progress is advisory; the next E5 finds out if something is wrong
        self._reports.append(value)
        self._emit(Reported(code=value))
        self.state = replace(state, progress=value)

    def _report_full_progress(self) -> Flow[None]:
        """Progress 100 after verification (``report_full_progress``), once: never before the
        package is verified, so that it says no more than the 101 it comes before."""
        state = self._require_state()
        if state.progress >= 100:
            return
        try:
            yield Report(state.task.token, 100)
        except TaskFinished:
            raise self._stop(Outcome.FINISHED, _FINISHED, clear=True) from None
        except TaskCancelled:
            raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True) from None
        except OtaError:
            return  # advisory like any progress: the 101 that follows settles the state
        self._reports.append(100)
        self._emit(Reported(code=100))
        self._save_quietly(progress=100)

    def _verify_download(self) -> bool:
        """Size and MD5 against the task (§10); True when verified and persisted."""
        state = self._require_state()
        partial = self._partial
        assert partial is not None
        task = state.task
        digest = partial.hexdigest()
        if partial.offset == task.size and hmac.compare_digest(digest, task.md5):
            self._close_partial()
            self._save(phase=Phase.VERIFIED, offset=task.size)
            self._verified_this_run = True
            self._emit(Verified(size=task.size, md5=digest))
            return True
        problem = (
            f"the package has {partial.offset} bytes, the task says {task.size}"
            if partial.offset != task.size
            else f"MD5 {digest} differs from the task's {task.md5}"
        )
        if self._resumed_from > 0 and state.redownloads < 1:
            # A resumed file may hold bytes a power cut damaged: download it whole once more.
            self._emit(Restarted(reason=f"{problem}; downloading again from 0"))
            self._close_partial()
            self.store.discard_partial()
            self._save(offset=0, redownloads=state.redownloads + 1, progress=-1)
            self._partial = self.store.open_partial(0)
            self._resumed_from = 0
            return False
        self._close_partial()
        self.store.discard_partial()  # a package that failed MD5 is never kept, let alone installed
        self._fail_now(StatusCode.UPGRADE_MD5_MISMATCH, problem)

    # -- apply --------------------------------------------------------------------------------

    def _apply(self) -> Flow[UpgradeResult]:
        state = self._require_state()
        if StatusCode.DOWNLOADED not in state.sent:
            if self.options.report_full_progress:
                yield from self._report_full_progress()
            yield from self._report_downloaded()
        self._gate(downloading=False)
        self._check_deadline()
        try:
            if not self._verified_on_disk():
                self.store.discard_partial()
                self._fail_now(
                    StatusCode.UPGRADE_MD5_MISMATCH, "the verified package changed on disk"
                )
        except (OSError, MemoryError) as exc:
            self._fail_local(exc, downloading=False)
        task = self._require_state().task
        try:
            yield Install(self.store.partial_path, task, self.task_type)
        except InstallError as exc:
            self._fail_now(exc.code, f"install: {exc}")
        except MemoryError:
            self._fail_now(StatusCode.UPGRADE_NO_MEMORY, "install: out of memory")
        except Exception as exc:  # an installer is caller code: its failure is 206, not a crash
            self._fail_now(StatusCode.UPGRADE_OTHER, f"install: {_describe(exc)}")
        self._emit(Installed(target=task.target))
        # the installer is idempotent: a restart installs again, then reports 201
        with contextlib.suppress(OSError):
            self._save(phase=Phase.INSTALLED)
        return (yield from self._complete())

    def _verified_on_disk(self) -> bool:
        """Re-hash the package a previous run verified (this run's bytes are fresh)."""
        task = self._require_state().task
        if self._verified_this_run:
            return True
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        with self.store.partial_path.open("rb") as file:
            while block := file.read(1 << 20):
                md5.update(block)
                size += len(block)
        return size == task.size and hmac.compare_digest(md5.hexdigest(), task.md5)

    def _report_downloaded(self) -> Flow[None]:
        """E7 101 (§7 step 4). A repeat after a crash may meet 21: E4 shows whether it landed."""
        answer = yield from self._send_report(StatusCode.DOWNLOADED)
        if answer == Errno.SUCC:
            return
        if isinstance(answer, _Unreachable):
            raise self._stop(Outcome.FAILED, f"cannot report 101: {answer.reason}")
        if answer == Errno.TASK_CANCELLED:
            raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True)
        if answer == Errno.TASK_FINISHED:
            raise self._stop(Outcome.FINISHED, _FINISHED, clear=True)
        if answer == Errno.INVALID_OPERATION:
            # 21: upgrading already (our earlier 101 arrived), or paused. E4 reports only
            # downloading/upgrading tasks, and a downloading one would have taken 101 (§5.5).
            try:
                token = self._require_state().task.token if self._by_tid else None
                yield from self._call("tasking", lambda: Tasking(token), reset=True)
            except TokenExpired:
                pass  # running, with an expired token: still upgrading
            except NoValidToken:
                raise self._stop(
                    Outcome.DEFERRED, "the platform refused 101 (errno 21): the task is paused"
                ) from None
            except (_Exhausted, OtaError) as exc:
                raise self._stop(Outcome.FAILED, f"cannot confirm 101: {exc}") from None
            self._mark_sent(StatusCode.DOWNLOADED)
            return
        raise self._stop(Outcome.FAILED, f"the platform refused 101 (errno {answer})")

    def _complete(self) -> Flow[UpgradeResult]:
        """After install: 201, then E1 with the new version; the device runs the target now."""
        state = self._require_state()
        note = ""
        if StatusCode.UPGRADED not in state.sent:
            answer = yield from self._send_report(StatusCode.UPGRADED)
            if isinstance(answer, _Unreachable):
                raise self._stop(
                    Outcome.DEFERRED,
                    f"installed, but 201 could not be reported ({answer.reason}); "
                    "the next run reports it",
                )
            if answer == Errno.TASK_CANCELLED:
                yield from self._post_new_version()
                raise self._stop(
                    Outcome.CANCELLED, "installed, but the task was cancelled", clear=True
                )
            if answer == Errno.TASK_FINISHED:
                note = "201 was already recorded"
                self._mark_sent(StatusCode.UPGRADED)
            elif answer != Errno.SUCC:
                # 21 (e.g. paused): E1 with the target completes any open task (T6, D16).
                note = f"201 refused (errno {answer}); completed by reporting the version"
        yield from self._post_new_version()
        result = self._result(Outcome.SUCCEEDED, reason=note)
        self._clear()
        return result

    def _post_new_version(self) -> Flow[None]:
        if not self.options.report_version:
            return
        target = self._require_state().task.target
        # 201 already set the platform's version (T15): this E1 keeps it in step, best effort.
        with contextlib.suppress(_Exhausted, OtaError):
            yield from self._call("post version", lambda: PostVersion(target), reset=True)

    # -- reports ------------------------------------------------------------------------------

    def _mark_sent(self, code: int) -> None:
        state = self._require_state()
        sent = state.sent if code in state.sent else (*state.sent, code)
        self._save_quietly(sent=sent, pending=None)
        self._reports.append(code)
        self._emit(Reported(code=code))

    def _send_report(self, code: StatusCode) -> Flow[int | _Unreachable]:
        """E7 ``code``, persisted as pending first. Returns the errno, or :class:`_Unreachable`.

        Fuse checks the task (F-T) first (§13.7): a task that has ended answers as errno 20 or
        22 would, and the report is not sent.
        """
        self._save_quietly(pending=int(code))
        if self.dialect is Dialect.FUSE:
            try:
                yield self._check_op()
            except TaskFinished:
                return Errno.TASK_FINISHED
            except TaskCancelled:
                return Errno.TASK_CANCELLED
            except OtaError:
                pass  # the report itself will tell
        try:
            yield from self._call(
                f"report {int(code)}",
                lambda: Report(self._require_state().task.token, int(code)),
                reset=True,
            )
        except _Exhausted as exc:
            return _Unreachable(str(exc))
        except PlatformError as exc:
            return exc.errno
        except OtaError as exc:
            return _Unreachable(str(exc))
        self._mark_sent(code)
        return Errno.SUCC

    def _fail_now(self, code: StatusCode, reason: str) -> NoReturn:
        """Decide failure ``code``: :meth:`run` reports it (:meth:`_fail`) and stops."""
        raise _Deliver(code, reason)

    def _fail_exhausted(self, exc: _Exhausted) -> NoReturn:
        timeout = isinstance(exc.last, RequestTimeout)
        code = StatusCode.DOWNLOAD_TIMEOUT if timeout else StatusCode.DOWNLOAD_OTHER
        self._fail_now(code, str(exc))

    def _fail_local(self, exc: BaseException, *, downloading: bool) -> NoReturn:
        code = _local_code(exc, downloading=downloading)
        self._fail_now(code, f"local failure: {_describe(exc)}")

    def _fail(self, code: StatusCode, reason: str) -> Flow[NoReturn]:
        """Report ``code`` exactly once and stop with FAILED (or CANCELLED on errno 22)."""
        self._close_partial()
        answer = yield from self._send_report(code)
        if isinstance(answer, _Unreachable):
            raise self._stop(
                Outcome.FAILED,
                f"{reason}; the report of {int(code)} failed ({answer.reason}) "
                "and is sent again on the next run",
                code=code,
            )
        if answer == Errno.TASK_CANCELLED:
            raise self._stop(Outcome.CANCELLED, _CANCELLED, clear=True)
        if answer not in (Errno.SUCC, Errno.TASK_FINISHED):
            reason = f"{reason}; the platform refused the report (errno {answer})"
        raise self._stop(Outcome.FAILED, reason, code=code, clear=True)

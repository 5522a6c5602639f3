"""The safe, resumable upgrade as one call: :class:`Upgrader` (sync) and :class:`AsyncUpgrader`.

::

    from onenet_ota.device import (Credentials, DeviceConfig, FileInstaller, OtaClient, Outcome,
                                   Upgrader)

    config = DeviceConfig(credentials=Credentials.from_access_key(pid, key), dev_id="42",
                          version="1.0.0")
    with OtaClient(config, base_url="http://ota.example.net") as client:
        result = Upgrader(client, FileInstaller("/opt/fw.bin"), state_dir="/var/lib/ota").run()
    if result.outcome is Outcome.SUCCEEDED: ...

The flow itself lives in :mod:`onenet_ota.device._flow`, written once as a generator of
operations; the two classes here only perform those operations with a client, an installer and a
sleep function. The clock, the sleep and the jitter's random source are injectable, so tests run
without waiting. Run an upgrader again after any interruption (power cut, SIGKILL, network loss):
it continues from the state directory.

The state directory is local storage: its reads, writes and fsyncs run synchronously, also in
:class:`AsyncUpgrader` (bounded by ``checkpoint_bytes`` between fsyncs), except the periodic
checkpoints of the download, which run in a worker thread while the next chunks download; the
installer of the async upgrader runs in a worker thread unless its ``install`` is a coroutine
function. Both upgraders send the next chunk's request before writing the last one
(:class:`~onenet_ota.device._flow.Prefetch`).

``on_event`` only observes: an :class:`Exception` it raises (a closed pipe, a full log disk, a
bug) is logged and ignored, so it can never become the device's verdict. What is not an
:class:`Exception` (:class:`KeyboardInterrupt`, :class:`SystemExit`, a cancellation) still ends
the run, as it would anywhere else. An exception from the client's own event callback ends the
run as itself, without a report (the client passes it to its caller unchanged). However a run
ends, interrupted and cancelled included, the state directory's lock is released and the next
run resumes.

Logging: the logger ``onenet_ota.device.upgrader`` records each run's task, retries, waits,
restarts, status reports and outcome (progress at DEBUG). It never records tokens or keys.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final

import anyio
import anyio.to_thread

from onenet_ota.device._core import Call, ClientCore
from onenet_ota.device._flow import (
    CheckTask,
    CheckToken,
    Download,
    Finished,
    GatePolicy,
    Install,
    Installed,
    Operation,
    Outcome,
    PostVersion,
    Prefetch,
    Progress,
    Report,
    Reported,
    Restarted,
    Retrying,
    Sleep,
    TaskFound,
    Tasking,
    TokenCheck,
    UpgradeEvent,
    UpgradeFlow,
    UpgradeOptions,
    UpgradeResult,
    Verified,
    Waiting,
    judge_status,
    task_from_tid,
    tid_of,
)
from onenet_ota.device._http import Result
from onenet_ota.device.client import Ahead, AsyncOtaClient, OtaClient
from onenet_ota.device.errors import InvalidState, NoTask, NoValidToken, OtaError
from onenet_ota.device.install import AsyncInstaller, FileInstaller, Installer, InstallError
from onenet_ota.device.retry import Retry
from onenet_ota.device.state import Opener, StateStore, open_for_update
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.codes import Operation as ProtocolOperation
from onenet_ota.protocol.dialects import EndpointSpec
from onenet_ota.protocol.dialects import endpoint as dialect_endpoint
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TidTaskInfo
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import describe_status

__all__ = [
    "AsyncInstaller",
    "AsyncUpgrader",
    "FileInstaller",
    "Finished",
    "GatePolicy",
    "InstallError",
    "Installed",
    "Installer",
    "Outcome",
    "Progress",
    "Reported",
    "Restarted",
    "Retry",
    "Retrying",
    "TaskFound",
    "TokenCheck",
    "UpgradeEvent",
    "UpgradeOptions",
    "UpgradeResult",
    "Upgrader",
    "Verified",
    "Waiting",
]

EventHandler = Callable[[UpgradeEvent], None]

logger = logging.getLogger("onenet_ota.device.upgrader")

# E7 codes below it are download progress (§6.7); 100 itself moves the task to upgrading (T12).
_FIRST_STATUS_CODE: Final = 100
_SENT_AHEAD: Final = (CheckToken, Download)  # the operations a driver may send ahead
_MAX_LOGGED_TEXT: Final = 300  # a callback's exception text is the caller's: keep log lines short


def _log_event(event: UpgradeEvent, redact: Callable[[str], str]) -> None:
    """The event as a log record: what an operator reads without an ``on_event`` of their own."""
    if isinstance(event, Progress):
        logger.debug("downloaded %d of %d bytes", event.downloaded, event.total)
    elif isinstance(event, Retrying):
        # Like urllib3's retries: a warning, since each one means something went wrong.
        logger.warning(
            "%s failed (%d of %d attempts), retrying in %.1f s: %s",
            event.step,
            event.failures,
            event.attempts,
            event.wait,
            redact(event.error),
        )
    elif isinstance(event, Reported):
        if event.code > 100:
            logger.info("reported %s", describe_status(event.code))
        else:
            logger.debug("reported progress %d%%", event.code)
    elif isinstance(event, TaskFound):
        logger.info(
            "task: upgrade to %s (%d bytes, md5 %s), %s, resuming at byte %d",
            event.target,
            event.size,
            event.md5,
            event.phase,
            event.resumed_from,
        )
    elif isinstance(event, Waiting):
        logger.info("%s; asking again in %.0f s", event.reason, event.wait)
    elif isinstance(event, Restarted):
        logger.warning("the download starts over: %s", event.reason)
    elif isinstance(event, Verified):
        logger.info("package verified: %d bytes, md5 %s", event.size, event.md5)
    elif isinstance(event, Installed):
        logger.info("installed %s", event.target)
    elif isinstance(event, Finished):
        result = event.result
        level = _OUTCOME_LEVEL[result.outcome]
        code = "" if result.code is None else f", reported {describe_status(result.code)}"
        reason = f": {redact(result.reason)}" if result.reason else ""
        logger.log(level, "%s upgrade %s%s%s", result.task_type.name, result.outcome, code, reason)


_OUTCOME_LEVEL: Final = {
    Outcome.SUCCEEDED: logging.INFO,
    Outcome.NO_TASK: logging.INFO,
    Outcome.FINISHED: logging.INFO,
    Outcome.CANCELLED: logging.INFO,
    Outcome.DEFERRED: logging.WARNING,
    Outcome.FAILED: logging.ERROR,
}


class _CallerError(Exception):
    """Carries an exception that is not the device's failure through the flow, untouched.

    The client's own event callback (:mod:`onenet_ota.device.events`) and the injected ``sleep``
    run inside operations; what they raise is no platform answer and no local disk or memory
    failure, so no status code may be reported for it. Wrapped, it passes every handler of the
    flow (which stops as after a crash: the durable state stays as the last checkpoint left it),
    and :meth:`Upgrader.run` raises the original to its caller, as the client's documentation
    promises. The simulator's power cut, raised by its transport, travels the same way.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _for_the_flow(op: Operation, exc: Exception) -> Exception:
    """What the flow receives for ``op``'s failure ``exc`` (see :class:`_CallerError`)."""
    # Client errors and MemoryError are the flow's to judge; the installer's every failure too
    # (reported as 202-208).
    if isinstance(exc, OtaError | MemoryError) or isinstance(op, Install):
        return exc
    return _CallerError(exc)


class _UpgraderBase:
    def _setup(
        self,
        client: OtaClient | AsyncOtaClient,
        installer: Installer | AsyncInstaller,
        state_dir: str | os.PathLike[str],
        options: UpgradeOptions,
        on_event: EventHandler | None,
        clock: Callable[[], float],
        rng: random.Random | None,
        opener: Opener,
    ) -> None:
        if not isinstance(options, UpgradeOptions):
            raise TypeError("options must be an UpgradeOptions")
        if not callable(getattr(installer, "install", None)):
            raise TypeError("installer must have an install(package, task, task_type) method")
        self.client = client
        # Studio or fuse: the task is named by its tid (a client's dialect never changes).
        self._by_tid = client.dialect is not Dialect.CLASSIC
        self.installer = installer
        self.options = options
        self.store = StateStore(state_dir, client.config.type, opener=opener)
        self._on_event = on_event
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._current: UpgradeFlow | None = None
        self._callback_failures: dict[str, int] = {}
        # A download sent right behind its token check (UpgradeOptions.pipeline) and its
        # result, kept until the flow asks for exactly that download (see CheckToken.then).
        self._prefetched: tuple[Download, Result] | None = None
        # Operations sent ahead (Prefetch, and with UpgradeOptions.pipeline the ones after it,
        # UpgradeFlow.following) whose replies are not read yet, in the order they were sent.
        self._window: deque[tuple[CheckToken | Download, Ahead]] = deque()

    def _take_prefetched(self, op: Operation) -> Result | None:
        """The pipelined result for ``op``, if that is what was sent; any other is dropped."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == op:
            return prefetched[1]
        return None

    def _take_ahead(self, op: Operation) -> Ahead | None:
        """What was sent ahead for ``op``, if it is the first operation sent ahead; when it is
        not, everything sent ahead is dropped unread (its connection closed) before ``op``
        itself goes out. A progress report (0-99) leaves what was sent ahead in flight: it
        goes on another connection, and the download goes on after it."""
        window = self._window
        if not window or (isinstance(op, Report) and op.code < _FIRST_STATUS_CODE):
            return None
        if window[0][0] == op:
            return window.popleft()[1]
        self._drop_window()
        return None

    def _drop_window(self) -> None:
        window, self._window = self._window, deque()
        for _, ahead in window:
            self.client._drop(ahead)

    def _prefetch_first(self, op: Prefetch) -> tuple[CheckToken | Download, list[Call[Any]]] | None:
        """What a :class:`Prefetch` sends first: ``op.op``, unless it is in flight already."""
        window = self._window
        if window and window[0][0] == op.op:
            return None
        self._drop_window()
        return op.op, self._calls(op.op)

    def _to_top_up(self) -> tuple[CheckToken | Download, list[Call[Any]], Ahead] | None:
        """The next operation to send ahead behind the window, if the window has room
        (:attr:`UpgradeOptions.pipeline_depth`) and the connection pipelines; with the calls
        to send and the flight to chain them behind."""
        window, flow = self._window, self._current
        if not window or flow is None or len(window) >= self.options.pipeline_depth:
            return None
        if not (self.options.pipeline and self.client._can_pipeline):
            return None
        following = flow.following(window[-1][0])
        if following is None:
            return None
        return following, self._calls(following), window[-1][1]

    def _calls(self, op: CheckToken | Download) -> list[Call[Any]]:
        """The requests that perform ``op``: the check (E5; S-T/F-T by tid) and the chunk
        pipelined behind it, or the chunk alone (E6; S-D/F-D)."""
        core = self.client._core
        by_tid = self._by_tid
        if isinstance(op, Download):
            return [_download_call(op, by_tid, core)]
        if by_tid:
            check: Call[Any] = core.task_status(tid_of(op.token), None)
        else:
            check = core.check_token(op.token, None)
        if op.then is None:
            return [check]
        return [check, _download_call(op.then, by_tid, core)]

    def _judged(self, op: CheckToken | Download, value: Any) -> Any:
        """A delivered result as the flow reads it: Studio/fuse statuses through
        :func:`judge_status` (which raises for a finished or cancelled task)."""
        if self._by_tid and isinstance(op, CheckToken):
            return judge_status(value, _status_endpoint(self.client.dialect))
        return value

    def _emit(self, event: UpgradeEvent) -> None:
        _log_event(event, self._redact)
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # only observes: its failure must not fail the upgrade
            self._callback_failed(event, exc)

    def _callback_failed(self, event: UpgradeEvent, exc: Exception) -> None:
        """Log the first failure of each exception type per run; count the rest (see _finish)."""
        kind = type(exc).__qualname__
        seen = self._callback_failures.get(kind, 0)
        self._callback_failures[kind] = seen + 1
        if seen == 0:
            text = self._redact(str(exc))[:_MAX_LOGGED_TEXT]
            logger.warning(
                "on_event raised %s on the %r event; ignored, the upgrade goes on "
                "(later %s errors of this run are only counted): %s",
                kind,
                event.name,
                kind,
                text,
            )

    def _redact(self, text: str) -> str:
        """``text`` without the current download token (an error may quote a request path)."""
        flow = self._current
        if flow is not None and flow.state is not None and flow.state.task.token:
            text = text.replace(flow.state.task.token, "***")
        return text

    def _flow(self) -> Generator[Operation, Any, UpgradeResult]:
        config = self.client.config
        self._callback_failures = {}
        self._current = UpgradeFlow(
            store=self.store,
            task_type=config.type,
            current_version=config.version,
            options=self.options,
            emit=self._emit,
            clock=self._clock,
            rng=self._rng,
            dialect=config.dialect,
        )
        return self._current.run()

    def _finish(self, flow: Generator[Operation, Any, UpgradeResult]) -> None:
        """Close the flow however the run ended (as httpx's auth-flow driver does).

        After an interruption in the driver (KeyboardInterrupt, a cancellation) the flow is
        suspended at a ``yield`` and still holds the state directory's lock; closing it
        checkpoints the download and releases the lock, so the next run resumes at once.
        """
        flow.close()
        for kind, count in self._callback_failures.items():
            if count > 1:
                logger.warning("on_event raised %s %d times in this run", kind, count)
        self._callback_failures = {}
        self._current = None
        self._prefetched = None
        self._drop_window()


class Upgrader(_UpgraderBase):
    """Runs the whole upgrade of ``client``'s task type with a sync :class:`OtaClient`.

    ``installer`` applies the verified package (:class:`FileInstaller` places it at a path).
    ``state_dir`` holds the durable state (:mod:`onenet_ota.device.state`); keep it across
    restarts. ``on_event`` receives :class:`UpgradeEvent`s (progress for a bar, retries, reports,
    and finally :class:`Finished`); an :class:`Exception` it raises is logged and ignored.
    ``sleep``, ``clock`` and ``rng`` are injectable for tests;
    ``opener`` opens the partial package (tests inject a failing one).
    """

    def __init__(
        self,
        client: OtaClient,
        installer: Installer,
        *,
        state_dir: str | os.PathLike[str],
        options: UpgradeOptions | None = None,
        on_event: EventHandler | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        opener: Opener = open_for_update,
    ) -> None:
        if not isinstance(client, OtaClient):
            raise TypeError("client must be an OtaClient (use AsyncUpgrader for AsyncOtaClient)")
        self._setup(
            client, installer, state_dir, options or UpgradeOptions(), on_event, clock, rng, opener
        )
        self._client = client
        self._sleep = sleep
        if inspect.iscoroutinefunction(getattr(installer, "install", None)):
            raise TypeError("an async installer needs AsyncUpgrader")
        self._installer: Installer = installer

    def run(self) -> UpgradeResult:
        """Run (or resume) the upgrade to its end; see :class:`UpgradeResult`."""
        flow = self._flow()
        try:
            try:
                op = next(flow)
            except StopIteration as stop:  # ended before any operation (e.g. the state is locked)
                first: UpgradeResult = stop.value
                return first
            while True:
                try:
                    value = self._perform(op)
                except Exception as exc:
                    try:
                        op = flow.throw(_for_the_flow(op, exc))
                    except StopIteration as stop:
                        result: UpgradeResult = stop.value
                        return result
                    except _CallerError as caller:
                        raise caller.error from None
                else:
                    try:
                        op = flow.send(value)
                    except StopIteration as stop:
                        result = stop.value
                        return result
        finally:
            self._finish(flow)

    def _perform(self, op: Operation) -> Any:
        client = self._client
        if self._prefetched is not None and (prefetched := self._take_prefetched(op)) is not None:
            return client._deliver(prefetched)
        if isinstance(op, Prefetch):
            # A request that cannot be built or sent (a closed client) is not sent ahead: the
            # flow asks for it next and meets the same error where it judges errors.
            with contextlib.suppress(OtaError):
                if first := self._prefetch_first(op):
                    ahead_op, calls = first
                    pipeline = self.options.pipeline or len(calls) > 1
                    self._window.append((ahead_op, client._send_ahead(calls, pipeline=pipeline)))
                while more := self._to_top_up():
                    ahead_op, calls, behind = more
                    sent = client._send_ahead(calls, pipeline=True, after=behind)
                    self._window.append((ahead_op, sent))
            return None
        ahead = self._take_ahead(op) if self._window else None
        if isinstance(op, _SENT_AHEAD):
            if ahead is not None:
                results = client._collect(ahead)
            else:
                calls = self._calls(op)
                results = client._exchange(calls, pipeline=len(calls) > 1)
            # The check's own error is raised here: a pipelined chunk behind a failed check
            # is dropped unused.
            value = self._judged(op, client._deliver(results[0]))
            if isinstance(op, CheckToken) and op.then is not None:
                self._prefetched = (op.then, results[1])
            return value
        if client.dialect is not Dialect.CLASSIC:
            return self._perform_by_tid(op)
        if isinstance(op, Report):
            return client.report_status(op.token, op.code)
        if isinstance(op, CheckTask):
            return client.check_task()
        if isinstance(op, Tasking):
            return client.tasking()
        if isinstance(op, PostVersion):
            return client.post_version(version=op.version)
        if isinstance(op, Install):
            return self._installer.install(op.package, op.task, op.task_type)
        if isinstance(op, Sleep):
            return self._sleep(op.seconds)
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

    def _perform_by_tid(self, op: Operation) -> Any:
        """Studio and fuse (§13.7): the task is its tid, E4 is the status query."""
        client = self._client
        if isinstance(op, Tasking):
            tid = tid_of(_token(op))
            try:
                return _upgrading(client.task_status(tid), client.dialect)
            except InvalidState:
                try:
                    offered = client.check_tid_task()
                except NoTask:
                    offered = None
                return _offered_upgrading(offered, tid, client.dialect)
        if isinstance(op, Report):
            return client.report_status(tid_of(op.token), op.code)
        if isinstance(op, CheckTask):
            return task_from_tid(client.check_tid_task())
        op = _classic_free(op)
        if isinstance(op, PostVersion):
            return client.post_version(version=op.version)
        if isinstance(op, Install):
            return self._installer.install(op.package, op.task, op.task_type)
        return self._sleep(op.seconds)


class AsyncUpgrader(_UpgraderBase):
    """:class:`Upgrader` over an :class:`AsyncOtaClient`; ``await upgrader.run()``.

    ``sleep`` is awaited (default :func:`anyio.sleep`). A synchronous installer runs in a worker
    thread; an installer whose ``install`` is ``async`` is awaited.
    """

    def __init__(
        self,
        client: AsyncOtaClient,
        installer: Installer | AsyncInstaller,
        *,
        state_dir: str | os.PathLike[str],
        options: UpgradeOptions | None = None,
        on_event: EventHandler | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        opener: Opener = open_for_update,
    ) -> None:
        if not isinstance(client, AsyncOtaClient):
            raise TypeError("client must be an AsyncOtaClient (use Upgrader for OtaClient)")
        self._setup(
            client, installer, state_dir, options or UpgradeOptions(), on_event, clock, rng, opener
        )
        self._client = client
        self._sleep = sleep

    async def run(self) -> UpgradeResult:
        """Run (or resume) the upgrade to its end; see :class:`UpgradeResult`."""
        flow = self._flow()
        try:
            try:
                op = next(flow)
            except StopIteration as stop:  # ended before any operation (e.g. the state is locked)
                first: UpgradeResult = stop.value
                return first
            while True:
                try:
                    value = await self._perform(op)
                except Exception as exc:
                    try:
                        op = flow.throw(_for_the_flow(op, exc))
                    except StopIteration as stop:
                        result: UpgradeResult = stop.value
                        return result
                    except _CallerError as caller:
                        raise caller.error from None
                else:
                    try:
                        op = flow.send(value)
                    except StopIteration as stop:
                        result = stop.value
                        return result
        finally:
            self._finish(flow)

    async def _perform(self, op: Operation) -> Any:
        client = self._client
        if self._prefetched is not None and (prefetched := self._take_prefetched(op)) is not None:
            return await client._deliver_result(prefetched)
        if isinstance(op, Prefetch):
            with contextlib.suppress(OtaError):  # see Upgrader._perform
                if first := self._prefetch_first(op):
                    ahead_op, calls = first
                    pipeline = self.options.pipeline or len(calls) > 1
                    sent = await client._send_ahead(calls, pipeline=pipeline)
                    self._window.append((ahead_op, sent))
                while more := self._to_top_up():
                    ahead_op, calls, behind = more
                    sent = await client._send_ahead(calls, pipeline=True, after=behind)
                    self._window.append((ahead_op, sent))
            return None
        ahead = self._take_ahead(op) if self._window else None
        if isinstance(op, _SENT_AHEAD):
            if ahead is not None:
                results = await client._collect(ahead)
            else:
                calls = self._calls(op)
                results = await client._exchange(calls, pipeline=len(calls) > 1)
            value = self._judged(op, await client._deliver_result(results[0]))
            if isinstance(op, CheckToken) and op.then is not None:
                self._prefetched = (op.then, results[1])
            return value
        if client.dialect is not Dialect.CLASSIC:
            return await self._perform_by_tid(op)
        if isinstance(op, Report):
            return await client.report_status(op.token, op.code)
        if isinstance(op, CheckTask):
            return await client.check_task()
        if isinstance(op, Tasking):
            return await client.tasking()
        if isinstance(op, PostVersion):
            return await client.post_version(version=op.version)
        if isinstance(op, Install | Sleep):
            return await self._local(op)
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

    async def _perform_by_tid(self, op: Operation) -> Any:
        """Studio and fuse: see :meth:`Upgrader._perform_by_tid`."""
        client = self._client
        if isinstance(op, Tasking):
            tid = tid_of(_token(op))
            try:
                return _upgrading(await client.task_status(tid), client.dialect)
            except InvalidState:
                try:
                    offered = await client.check_tid_task()
                except NoTask:
                    offered = None
                return _offered_upgrading(offered, tid, client.dialect)
        if isinstance(op, Report):
            return await client.report_status(tid_of(op.token), op.code)
        if isinstance(op, CheckTask):
            return task_from_tid(await client.check_tid_task())
        op = _classic_free(op)
        if isinstance(op, PostVersion):
            return await client.post_version(version=op.version)
        return await self._local(op)

    async def _local(self, op: Install | Sleep) -> Any:
        if isinstance(op, Install):
            install = self.installer.install
            if inspect.iscoroutinefunction(install):
                return await install(op.package, op.task, op.task_type)
            return await anyio.to_thread.run_sync(install, op.package, op.task, op.task_type)
        return await self._sleep(op.seconds)


def _download_call(op: Download, by_tid: bool, core: ClientCore) -> Call[Any]:
    if by_tid:  # §13.7: the end is clamped to the package's size
        return core.download(tid_of(op.token), op.start, op.size, None, package_size=op.total)
    return core.download(op.token, op.start, op.size, None)


def _status_endpoint(dialect: Dialect) -> EndpointSpec:
    return dialect_endpoint(dialect, ProtocolOperation.CHECK_STATE)


def _token(op: Tasking) -> str:
    if op.token is None:  # pragma: no cover - the flow always names the task on Studio/fuse
        raise TypeError("Studio and fuse need the task's tid for E4's status check")
    return op.token


def _upgrading(status: int, dialect: Dialect) -> None:
    """E4's question on Studio/fuse: is the task upgrading? (E4 answers errno 4 when not.)"""
    endpoint = _status_endpoint(dialect)
    if judge_status(status, endpoint) != TaskState.UPGRADING:
        raise NoValidToken(
            int(Errno.NO_VALID_TOKEN), "the task is not upgrading", endpoint=endpoint
        )


def _offered_upgrading(offered: TidTaskInfo | None, tid: int, dialect: Dialect) -> None:
    """E4's question when the status query answered 17: Studio's S-T does so for an upgrading
    task and a paused one alike (S6). S-C tells them apart: it offers an open task with its
    state, never a paused one (S4, S5, D12)."""
    if offered is None or offered.tid != tid or offered.status != TaskState.UPGRADING:
        raise NoValidToken(
            int(Errno.NO_VALID_TOKEN),
            "the task is not upgrading",
            endpoint=_status_endpoint(dialect),
        )


def _classic_free(op: Operation) -> PostVersion | Install | Sleep:
    """The operations every dialect performs alike."""
    if isinstance(op, PostVersion | Install | Sleep):
        return op
    raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

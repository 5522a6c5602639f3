"""An in-memory OneNET platform for the upgrade flow's unit tests, and a driver with crash points.

:class:`FakePlatform` answers the flow's operations with the protocol's own state tables
(:mod:`onenet_ota.protocol.states`), so the flow is tested against the spec's machine, not
against hand-written expectations. Faults are queued per operation kind. :func:`drive` runs a
flow to its end, or "kills" it after a given number of operations, optionally after the last
operation reached the platform (the reply lost on the way back).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onenet_ota.device._flow import (
    CheckTask,
    CheckToken,
    Download,
    Install,
    Operation,
    PostVersion,
    Prefetch,
    Report,
    Sleep,
    Tasking,
    UpgradeEvent,
    UpgradeFlow,
    UpgradeOptions,
    UpgradeResult,
)
from onenet_ota.device.errors import (
    AuthFailed,
    DownloadError,
    NoValidToken,
    TokenExpired,
    platform_error,
)
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.device.install import FileInstaller, Installer
from onenet_ota.device.state import Opener, StateStore, open_for_update
from onenet_ota.protocol import ranges
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.states import (
    ACTIVE_STATES,
    OPEN_STATES,
    RUNNING_STATES,
    Action,
    TaskState,
    on_action,
    on_report,
    on_token_check,
)
from onenet_ota.protocol.status import TaskType, classify_step


def package_bytes(size: int, seed: int = 7) -> bytes:
    """Deterministic pseudo-random package content."""
    return random.Random(seed).randbytes(size)


@dataclass
class FakePlatform:
    """One device task on an in-memory platform.

    ``faults`` maps an operation class to exceptions raised (in order) instead of answering.
    ``served_md5`` lets a test announce an MD5 that does not match the bytes (a corrupt package).
    """

    package: bytes
    target: str = "1.0.1"
    retry: int = 3
    interval: int = 1
    signal: int = 0
    power: int = 0
    served_md5: str | None = None
    state: TaskState = TaskState.TO_BE_UPGRADED
    paused_from: TaskState | None = None
    faults: dict[type, list[BaseException]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)
    _counter: Any = field(default_factory=lambda: itertools.count(1))

    @property
    def md5(self) -> str:
        return self.served_md5 or hashlib.md5(self.package).hexdigest()

    @property
    def token(self) -> str:
        return self.tokens[-1]

    def _issue(self) -> str:
        token = f"ota_{next(self._counter):020d}"
        self.tokens.append(token)
        return token

    def task_info(self) -> TaskInfo:
        return TaskInfo(
            target=self.target,
            token=self.token,
            size=len(self.package),
            md5=self.md5,
            signal=self.signal,
            power=self.power,
            retry=self.retry,
            interval=self.interval,
        )

    # management actions
    def act(self, action: Action) -> None:
        new = on_action(self.state, action, paused_from=self.paused_from)
        if action is Action.PAUSE:
            self.paused_from = self.state
        self.state = new

    def expire_token(self) -> None:
        self.expired.add(self.token)

    def replace_package(self, package: bytes) -> None:
        """The operator swapped the package: new bytes, new size and MD5, the same task."""
        self.package = package
        self.served_md5 = None

    # operations
    def perform(self, op: Operation) -> Any:
        self.requests.append(type(op).__name__)
        queued = self.faults.get(type(op))
        if queued:
            raise queued.pop(0)
        if isinstance(op, PostVersion):
            return self._post_version(op)
        if isinstance(op, CheckTask):
            return self._check_task()
        if isinstance(op, Tasking):
            return self._tasking()
        if isinstance(op, CheckToken):
            return self._check_token(op.token)
        if isinstance(op, Download):
            return self._download(op)
        if isinstance(op, Report):
            return self._report(op)
        raise AssertionError(f"not a platform operation: {op!r}")

    def _post_version(self, op: PostVersion) -> None:
        version = op.version or "1.0.0"
        self.versions.append(version)
        if version == self.target and self.state in OPEN_STATES:  # T6
            self.state = on_action(self.state, Action.VERSION_REACHED)

    def _check_task(self) -> TaskInfo:
        if self.state not in ACTIVE_STATES:
            raise platform_error(Errno.NO_TASK, "", endpoint=Endpoint.CHECK_TASK)
        if not self.tokens or self.token in self.expired:
            self._issue()
        return self.task_info()

    def _tasking(self) -> TaskInfo:
        if self.state not in RUNNING_STATES:
            raise NoValidToken(4, "no valid token", endpoint=Endpoint.TASKING)
        if self.token in self.expired:
            raise TokenExpired(12, "token expired", endpoint=Endpoint.TASKING)
        return self.task_info()

    def _check_token(self, token: str) -> None:
        if token not in self.tokens:
            raise NoValidToken(4, "no valid token", endpoint=Endpoint.CHECK_TOKEN)
        expired = token != self.token or token in self.expired
        outcome = on_token_check(self.state, token_expired=expired)
        if not outcome.ok:
            raise platform_error(outcome.errno, "", endpoint=Endpoint.CHECK_TOKEN)
        assert outcome.state is not None
        self.state = outcome.state

    def _download(self, op: Download) -> DownloadedChunk:
        if (
            op.token not in self.tokens
            or op.token != self.token
            or op.token in self.expired
            or self.state not in ACTIVE_STATES
        ):
            raise DownloadError(DownloadErrorCode.INVALID_TOKEN, endpoint=Endpoint.DOWNLOAD)
        spec = ranges.RangeSpec(first=op.start, last=op.start + op.size - 1, suffix=None)
        start, end = spec.clamp(len(self.package))
        return DownloadedChunk(
            data=self.package[start : end + 1], start=start, end=end, total=len(self.package)
        )

    def _report(self, op: Report) -> None:
        if op.token not in self.tokens:
            raise AuthFailed(1, "auth failed", endpoint=Endpoint.REPORT_PROGRESS)
        kind = classify_step(op.code)
        assert kind is not None, op.code
        outcome = on_report(self.state, kind)
        if not outcome.ok:
            raise platform_error(outcome.errno, "", endpoint=Endpoint.REPORT_PROGRESS)
        assert outcome.state is not None
        self.state = outcome.state
        self.accepted.append(op.code)

    @property
    def status_reports(self) -> list[int]:
        """The accepted status codes (progress values left out)."""
        return [code for code in self.accepted if code > 100]


@dataclass
class Harness:
    """A flow's surroundings: state directory, installer, options, events, fake time."""

    platform: FakePlatform
    state_dir: Path
    output: Path
    options: UpgradeOptions = field(default_factory=UpgradeOptions)
    task_type: TaskType = TaskType.FOTA
    installer: Installer | None = None
    opener: Opener = open_for_update
    events: list[UpgradeEvent] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)
    now: float = 1_700_000_000.0
    on_op: Callable[[Operation, int], None] | None = None
    ops: int = 0
    # Perform a Prefetch's operation when it is yielded, as the real drivers send it (the
    # platform sees it before the flow writes the chunk); off, a prefetch is ignored.
    prefetch: bool = False
    _ahead: tuple[Operation, Any, Exception | None] | None = None

    def flow(self) -> UpgradeFlow:
        return UpgradeFlow(
            store=StateStore(self.state_dir, self.task_type, opener=self.opener),
            task_type=self.task_type,
            current_version="1.0.0",
            options=self.options,
            emit=self.events.append,
            clock=lambda: self.now,
            rng=random.Random(1),
        )

    def perform(self, op: Operation) -> Any:
        if isinstance(op, Prefetch):
            self._ahead = None
            if self.prefetch:
                try:
                    self._ahead = (op.op, self.perform(op.op), None)
                except Exception as exc:
                    self._ahead = (op.op, None, exc)
            return None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == op:  # performed when it was prefetched
            if ahead[2] is not None:
                raise ahead[2]
            return ahead[1]
        if self.on_op is not None:
            self.on_op(op, self.ops)
        self.ops += 1
        if isinstance(op, Sleep):
            self.slept.append(op.seconds)
            self.now += op.seconds
            return None
        if isinstance(op, Install):
            installer = self.installer or FileInstaller(self.output)
            return installer.install(op.package, op.task, op.task_type)
        return self.platform.perform(op)

    def run(
        self, *, kill_after: int | None = None, reply_lost: bool = True
    ) -> UpgradeResult | None:
        """Run one flow. With ``kill_after``, stop it after that many operations; with
        ``reply_lost`` the last operation is performed first (its reply never reaches the flow).
        Returns None when killed."""
        gen = self.flow().run()
        try:
            op = next(gen)
        except StopIteration as stop:
            first: UpgradeResult = stop.value
            return first
        count = 0
        while True:
            ignored = isinstance(op, Prefetch) and not self.prefetch  # no operation at all
            if kill_after is not None and count == kill_after and not ignored:
                if reply_lost:
                    with contextlib.suppress(Exception):  # the reply is lost either way
                        self.perform(op)
                gen.close()
                return None
            count += not ignored
            try:
                value = self.perform(op)
            except Exception as exc:
                try:
                    op = gen.throw(exc)
                except StopIteration as stop:
                    result: UpgradeResult = stop.value
                    return result
            else:
                try:
                    op = gen.send(value)
                except StopIteration as stop:
                    result = stop.value
                    return result

    def of(self, kind: type[UpgradeEvent]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

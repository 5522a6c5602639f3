"""The safe, resumable upgrade as one call: :class:`Upgrader` (sync) and :class:`AsyncUpgrader`.

::

    from onenet_ota.device import Credentials, DeviceConfig, OtaClient
    from onenet_ota.device.install import FileInstaller
    from onenet_ota.device.upgrader import Upgrader

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
:class:`AsyncUpgrader` (bounded by ``checkpoint_bytes`` between fsyncs); the installer of the async
upgrader runs in a worker thread unless its ``install`` is a coroutine function.
"""

from __future__ import annotations

import inspect
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

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
)
from onenet_ota.device.client import AsyncOtaClient, OtaClient
from onenet_ota.device.install import AsyncInstaller, FileInstaller, Installer, InstallError
from onenet_ota.device.retry import Retry
from onenet_ota.device.state import Opener, StateStore, open_for_update

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
        self.installer = installer
        self.options = options
        self.store = StateStore(state_dir, client.config.type, opener=opener)
        self._on_event = on_event
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()

    def _emit(self, event: UpgradeEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _flow(self) -> UpgradeFlow:
        config = self.client.config
        return UpgradeFlow(
            store=self.store,
            task_type=config.type,
            current_version=config.version,
            options=self.options,
            emit=self._emit,
            clock=self._clock,
            rng=self._rng,
        )


class Upgrader(_UpgraderBase):
    """Runs the whole upgrade of ``client``'s task type with a sync :class:`OtaClient`.

    ``installer`` applies the verified package (:class:`FileInstaller` places it at a path).
    ``state_dir`` holds the durable state (:mod:`onenet_ota.device.state`); keep it across
    restarts. ``on_event`` receives :class:`UpgradeEvent`s (progress for a bar, retries, reports,
    and finally :class:`Finished`). ``sleep``, ``clock`` and ``rng`` are injectable for tests;
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
        flow = self._flow().run()
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
                    op = flow.throw(exc)
                except StopIteration as stop:
                    result: UpgradeResult = stop.value
                    return result
            else:
                try:
                    op = flow.send(value)
                except StopIteration as stop:
                    result = stop.value
                    return result

    def _perform(self, op: Operation) -> Any:
        client = self._client
        if isinstance(op, Download):
            return client.download_range(op.token, op.start, op.size)
        if isinstance(op, CheckToken):
            return client.check_token(op.token)
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
        flow = self._flow().run()
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
                    op = flow.throw(exc)
                except StopIteration as stop:
                    result: UpgradeResult = stop.value
                    return result
            else:
                try:
                    op = flow.send(value)
                except StopIteration as stop:
                    result = stop.value
                    return result

    async def _perform(self, op: Operation) -> Any:
        client = self._client
        if isinstance(op, Download):
            return await client.download_range(op.token, op.start, op.size)
        if isinstance(op, CheckToken):
            return await client.check_token(op.token)
        if isinstance(op, Report):
            return await client.report_status(op.token, op.code)
        if isinstance(op, CheckTask):
            return await client.check_task()
        if isinstance(op, Tasking):
            return await client.tasking()
        if isinstance(op, PostVersion):
            return await client.post_version(version=op.version)
        if isinstance(op, Install):
            install = self.installer.install
            if inspect.iscoroutinefunction(install):
                return await install(op.package, op.task, op.task_type)
            return await anyio.to_thread.run_sync(install, op.package, op.task, op.task_type)
        if isinstance(op, Sleep):
            return await self._sleep(op.seconds)
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

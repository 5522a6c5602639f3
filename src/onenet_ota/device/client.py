"""``OtaClient`` and ``AsyncOtaClient``: thin I/O drivers around the sans-IO core.

Both build their calls with :class:`~onenet_ota.device._core.ClientCore` and judge the replies with
it. The bytes move through a transport: the SDK's own HTTP/1.1 transport
(:mod:`onenet_ota.device.transport`: blocking sockets or asyncio streams, llhttp for the framing)
by default, or an injected ``httpx2`` client (:mod:`onenet_ota.device._httpx`). Either answers
each call's outcome or its error from :mod:`onenet_ota.device.errors`; all the clients add is the
event delivery.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import ssl
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

from onenet_ota import __version__
from onenet_ota.device._core import AnyTask, Call, ClientCore, Outcome, TaskRef, VersionInfo
from onenet_ota.device._http import Failure, Result
from onenet_ota.device.config import DEFAULT_BASE_URLS, DeviceConfig, Timeout
from onenet_ota.device.errors import ClientClosedError, InvalidArgumentError
from onenet_ota.device.events import AsyncEventCallback, DownloadedChunk, EventCallback, OtaEvent
from onenet_ota.device.transport import AsyncTransport, InFlight, SyncTransport
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo

if TYPE_CHECKING:
    import httpx2

logger = logging.getLogger("onenet_ota.device")

T = TypeVar("T")
CaFile = str | os.PathLike[str]
DEFAULT_TIMEOUT = Timeout()
USER_AGENT = f"onenet-ota/{__version__}"


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # Loading a CA store costs about 0.1 s; a fleet of clients shares one context (an SSLContext
    # is safe to share). certifi's bundle when it is installed (what httpx2 would load), the
    # system's store otherwise: the SDK itself does not depend on certifi.
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


@functools.cache
def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tls(verify: bool, ca_file: CaFile | None) -> ssl.SSLContext:
    if not isinstance(verify, bool):
        raise InvalidArgumentError("verify must be True or False")
    if ca_file is None:
        return _default_tls() if verify else _unverified_tls()
    if not verify:
        raise InvalidArgumentError("ca_file makes no sense with verify=False")
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    except (OSError, ssl.SSLError, TypeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidArgumentError(f"cannot load the CA file {ca_file!s}: {reason}") from None


class _SyncSender(Protocol):
    def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]: ...
    def close(self) -> None: ...


class _AsyncSender(Protocol):
    async def exchange(
        self, calls: Sequence[Call[Any]], *, pipeline: bool = False
    ) -> list[Result]: ...
    async def aclose(self) -> None: ...


class Ahead:
    """Calls sent ahead of their use (:meth:`OtaClient._send_ahead`), not yet read.

    ``flight`` is what the SDK's own transport has on the wire; None when the transport cannot
    split a send from its read (an injected httpx2 client): the calls then go out when their
    results are asked for.
    """

    __slots__ = ("calls", "flight", "pipeline")

    def __init__(self, calls: list[Call[Any]], pipeline: bool, flight: InFlight | None) -> None:
        self.calls = calls
        self.pipeline = pipeline
        self.flight = flight


def _value(result: Result) -> Outcome[Any]:
    """The outcome, or its error raised (chained to the transport's exception, if any)."""
    if type(result) is Failure:
        raise result.error from result.cause
    return cast(Outcome[Any], result)


class _ClientBase:
    """What both clients share besides I/O: the core and the configuration."""

    _core: ClientCore

    def _setup(
        self,
        config: DeviceConfig,
        base_url: str | None,
        timeout: Timeout | int,
        verify: bool,
        ca_file: CaFile | None,
        injected: object | None,
    ) -> ssl.SSLContext:
        if isinstance(timeout, int) and not isinstance(timeout, bool):
            timeout = Timeout(timeout)
        if not isinstance(timeout, Timeout):
            raise InvalidArgumentError("timeout must be a Timeout or milliseconds as an int")
        if base_url is None:
            dialect = config.dialect if isinstance(config, DeviceConfig) else Dialect.CLASSIC
            base_url = DEFAULT_BASE_URLS[dialect]
        self._core = ClientCore(config, base_url=base_url, timeout=timeout)
        if injected is not None and (ca_file is not None or verify is not True):
            raise InvalidArgumentError("configure TLS on the injected HTTP client instead")
        self._closed = False
        # One switch, in the configuration: the core adds the Connection: close header, and the
        # transport then keeps no connection for another call.
        self._keep_alive = self._core.config.keep_alive
        return _tls(verify, ca_file)

    @property
    def config(self) -> DeviceConfig:
        """The device configuration (the C SDK's ``ota_init`` arguments)."""
        return self._core.config

    @property
    def last_task(self) -> AnyTask | None:
        """The task the last successful ``check_task``/``tasking`` returned."""
        return self._core.last_task

    @property
    def dialect(self) -> Dialect:
        """The device API this client speaks: classic, Studio or fuse (§13.7)."""
        return self._core.dialect

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def keep_alive(self) -> bool:
        """Whether connections are kept between calls (False: ``Connection: close`` on each)."""
        return self._keep_alive

    def _check_open(self, call: Call[Any], sender: object) -> None:
        if self._closed:
            raise ClientClosedError(endpoint=call.endpoint)
        if getattr(sender, "http_closed", False):
            raise ClientClosedError("the injected HTTP client is closed", endpoint=call.endpoint)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._core.origin + self._core.prefix!r}, "
            f"dialect={self.dialect.value}, dev_id={self._core.config.dev_id!r}, "
            f"device_name={self._core.config.device_name!r}, type={self._core.config.type.name})"
        )


class OtaClient(_ClientBase):
    """A OneNET OTA device client (sync), the C SDK's ``ota_*`` API.

    The configuration's ``dialect`` chooses the API (§13.7): classic (tokens), Studio or fuse
    (the task named by its ``tid``; :meth:`task_status` instead of :meth:`check_token`).
    ``base_url`` defaults to the dialect's OneNET host.

    ``config`` is what ``ota_init`` takes; ``close()`` (or leaving a ``with`` block) is
    ``ota_deinit``. ``timeout`` is the default per-call limit (a :class:`Timeout` or ms); every
    call takes ``timeout_ms`` to override it. TLS: ``verify`` (default on) and ``ca_file``.
    By default the client sends over its own HTTP/1.1 transport
    (:mod:`onenet_ota.device.transport`); ``http_client`` injects an ``httpx2.Client`` instead
    (proxies, custom TLS, mounts; needs the ``httpx`` extra); it is not closed by this client.
    ``config.keep_alive`` False sends ``Connection: close`` and uses a new connection for every
    call.
    ``on_event`` receives the C SDK's events (:mod:`onenet_ota.device.events`).
    Errors are :mod:`onenet_ota.device.errors`; nothing else escapes.
    """

    def __init__(
        self,
        config: DeviceConfig,
        *,
        base_url: str | None = None,
        timeout: Timeout | int = DEFAULT_TIMEOUT,
        verify: bool = True,
        ca_file: CaFile | None = None,
        http_client: httpx2.Client | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        tls = self._setup(config, base_url, timeout, verify, ca_file, http_client)
        keep_alive = self._keep_alive
        self._sender: _SyncSender
        if http_client is None:
            self._sender = SyncTransport(tls, user_agent=USER_AGENT, keep_alive=keep_alive)
        else:
            import httpx2

            from onenet_ota.device._httpx import HttpxTransport

            if not isinstance(http_client, httpx2.Client):
                raise InvalidArgumentError("http_client must be an httpx2.Client")
            self._sender = HttpxTransport(http_client, keep_alive=keep_alive)
        self._on_event = on_event

    def close(self) -> None:
        """Release the connections (the C SDK's ``ota_deinit``). Further calls raise."""
        if self._closed:
            return
        self._closed = True
        self._sender.close()

    def __enter__(self) -> OtaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _execute(self, call: Call[T]) -> T:
        self._check_open(call, self._sender)
        outcome: Outcome[T] = _value(self._sender.exchange([call])[0])
        if outcome.event is not None and self._on_event is not None:
            self._on_event(outcome.event)
        return outcome.value

    def _deliver(self, result: Result) -> Any:
        """A result of :meth:`_check_and_download`: its value, after its event."""
        outcome = _value(result)
        if outcome.event is not None and self._on_event is not None:
            self._on_event(outcome.event)
        return outcome.value

    def _exchange(self, calls: list[Call[Any]], *, pipeline: bool) -> list[Result]:
        """``calls`` on one connection (pipelined when ``pipeline`` and the transport can);
        their results, undelivered (:meth:`_deliver`)."""
        self._check_open(calls[0], self._sender)
        return self._sender.exchange(calls, pipeline=pipeline)

    def _send_ahead(
        self, calls: list[Call[Any]], *, pipeline: bool, after: Ahead | None = None
    ) -> Ahead:
        """Send ``calls`` without reading their replies; :meth:`_collect` reads them later,
        :meth:`_drop` forgets them. Never raises for a failure to send: :meth:`_collect`
        gives it as the calls' results. ``after`` (with ``pipeline``): calls sent ahead before,
        whose connection may carry these too (collect them in the order they were sent)."""
        self._check_open(calls[0], self._sender)
        sender = self._sender
        flight = None
        if isinstance(sender, SyncTransport):
            behind = after.flight if after is not None else None
            flight = sender.start(calls, pipeline=pipeline, after=behind)
        return Ahead(calls, pipeline, flight)

    @property
    def _can_pipeline(self) -> bool:
        """Whether requests sent ahead can share a connection (the SDK's own transport, and
        no server has refused pipelining yet)."""
        sender = self._sender
        return isinstance(sender, SyncTransport) and sender.pipelining

    def _collect(self, ahead: Ahead) -> list[Result]:
        """The results of calls sent with :meth:`_send_ahead`, undelivered."""
        if ahead.flight is None:
            return self._exchange(ahead.calls, pipeline=ahead.pipeline)
        assert isinstance(self._sender, SyncTransport)
        return self._sender.finish(ahead.flight)

    def _drop(self, ahead: Ahead) -> None:
        """Forget calls sent with :meth:`_send_ahead`: their replies are never read."""
        if ahead.flight is not None:
            assert isinstance(self._sender, SyncTransport)
            self._sender.abandon(ahead.flight)

    def _check_and_download(
        self, token: str, range_start: int, range_size: int, *, pipeline: bool
    ) -> tuple[Result, Result]:
        """E5 and then E6, pipelined on one connection when ``pipeline`` (and the transport
        can); their results, undelivered: the upgrader reads the download's only after the
        check passed (:meth:`_deliver`). Classic only."""
        check = self._core.check_token(token, None)
        download = self._core.download(token, range_start, range_size, None)
        self._check_open(check, self._sender)
        first, second = self._sender.exchange([check, download], pipeline=pipeline)
        return first, second

    def post_version(self, *, version: str | None = None, timeout_ms: int | None = None) -> None:
        """E1: report the configured version (and ``other_version``, if set).

        ``version`` reports another version for the client's type instead, e.g. the target
        after installing it, which completes the task (spec T6).
        """
        return self._execute(self._core.post_version(timeout_ms, version=version))

    def query_version(self, *, timeout_ms: int | None = None) -> VersionInfo:
        """E2: the versions the platform has stored for this device."""
        return self._execute(self._core.query_version(timeout_ms))

    def check_task(self, *, timeout_ms: int | None = None) -> TaskInfo:
        """E3: the upgrade task for the configured type and version; :class:`NoTask` if none.
        Classic only; Studio and fuse use :meth:`check_tid_task`."""
        return self._execute(self._core.check_task(timeout_ms))

    def check_tid_task(self, *, timeout_ms: int | None = None) -> TidTaskInfo:
        """S-C / F-C: the task for the configured type and version, named by its ``tid``;
        :class:`NoTask` if none (Studio's 10, fuse's 12012), :class:`TaskSucceeded` for fuse's
        12013 (already on the target)."""
        return self._execute(self._core.check_tid_task(timeout_ms))

    def task_status(self, tid: int, *, timeout_ms: int | None = None) -> int:
        """S-T / F-T: the task's state 1-6 (§5.1); moves a to-be-upgraded task to downloading."""
        return self._execute(self._core.task_status(tid, timeout_ms))

    def tasking(self, *, timeout_ms: int | None = None) -> TaskInfo:
        """E4: the task already downloading or upgrading (to resume after a power loss)."""
        return self._execute(self._core.tasking(timeout_ms))

    def check_token(self, token: str, *, timeout_ms: int | None = None) -> None:
        """E5: check the download token before each chunk; the task becomes downloading."""
        return self._execute(self._core.check_token(token, timeout_ms))

    def download_range(
        self,
        token: TaskRef,
        range_start: int,
        range_size: int,
        *,
        timeout_ms: int | None = None,
        package_size: int | None = None,
    ) -> DownloadedChunk:
        """E6: up to ``range_size`` bytes from ``range_start``, with where the server placed them.

        The server clamps the end at EOF, so the last chunk may be shorter. A 200 without
        Content-Range is the whole file, returned with ``start`` 0 and ``partial`` False.
        Studio and fuse: ``token`` is the tid; the request's end is clamped to ``package_size``
        (default: the last task check's size) and the reply must serve exactly that range.
        """
        call = self._core.download(
            token, range_start, range_size, timeout_ms, package_size=package_size
        )
        return self._execute(call)

    def download_package(
        self, token: TaskRef, range_start: int, range_size: int, *, timeout_ms: int | None = None
    ) -> bytes:
        """E6 as the C SDK's ``ota_download_package``: the bytes from ``range_start``.

        Like :meth:`download_range`, but a reply placed anywhere but ``range_start`` is a
        :class:`ProtocolError`, since bare bytes cannot say where they belong.
        """
        call = self._core.download(token, range_start, range_size, timeout_ms, exact_start=True)
        return self._execute(call).data

    def report_status(self, token: TaskRef, code: int, *, timeout_ms: int | None = None) -> None:
        """E7: progress 0-100 or a :class:`StatusCode` (101-107, 201-208); S-R/F-R (tid)."""
        return self._execute(self._core.report_status(token, code, timeout_ms))

    def report_result(self, token: str, code: int, *, timeout_ms: int | None = None) -> None:
        """E8: the older ``{"result": code}`` report; status codes 101-107/201-208 only."""
        return self._execute(self._core.report_result(token, code, timeout_ms))

    def dev_info(
        self,
        auth_info: str,
        *,
        product_id: str | None = None,
        method: Literal["GET", "POST"] = "POST",
        timeout_ms: int | None = None,
    ) -> str:
        """E9: the ``dev_id`` of the device whose identifier is ``auth_info`` (IMEI, name...).

        ``product_id`` defaults to the product of the Authorization value.
        """
        call = self._core.dev_info(
            auth_info, product_id=product_id, method=method, timeout_ms=timeout_ms
        )
        return self._execute(call)


class AsyncOtaClient(_ClientBase):
    """The async twin of :class:`OtaClient`: same arguments, same calls, awaited.

    ``http_client`` is an ``httpx2.AsyncClient``. ``on_event`` may be a plain or an ``async``
    function. ``aclose()`` (or leaving an ``async with`` block) is ``ota_deinit``.
    """

    def __init__(
        self,
        config: DeviceConfig,
        *,
        base_url: str | None = None,
        timeout: Timeout | int = DEFAULT_TIMEOUT,
        verify: bool = True,
        ca_file: CaFile | None = None,
        http_client: httpx2.AsyncClient | None = None,
        on_event: AsyncEventCallback | None = None,
    ) -> None:
        tls = self._setup(config, base_url, timeout, verify, ca_file, http_client)
        keep_alive = self._keep_alive
        self._sender: _AsyncSender
        if http_client is None:
            self._sender = AsyncTransport(tls, user_agent=USER_AGENT, keep_alive=keep_alive)
        else:
            import httpx2

            from onenet_ota.device._httpx import AsyncHttpxTransport

            if not isinstance(http_client, httpx2.AsyncClient):
                raise InvalidArgumentError("http_client must be an httpx2.AsyncClient")
            self._sender = AsyncHttpxTransport(http_client, keep_alive=keep_alive)
        self._on_event = on_event

    async def aclose(self) -> None:
        """Release the connections (the C SDK's ``ota_deinit``). Further calls raise."""
        if self._closed:
            return
        self._closed = True
        await self._sender.aclose()

    async def __aenter__(self) -> AsyncOtaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _execute(self, call: Call[T]) -> T:
        self._check_open(call, self._sender)
        outcome: Outcome[T] = _value((await self._sender.exchange([call]))[0])
        if outcome.event is not None and self._on_event is not None:
            await self._deliver(outcome.event)
        return outcome.value

    async def _deliver_result(self, result: Result) -> Any:
        """A result of :meth:`_check_and_download`: its value, after its event."""
        outcome = _value(result)
        if outcome.event is not None and self._on_event is not None:
            await self._deliver(outcome.event)
        return outcome.value

    async def _exchange(self, calls: list[Call[Any]], *, pipeline: bool) -> list[Result]:
        """See :meth:`OtaClient._exchange`."""
        self._check_open(calls[0], self._sender)
        return await self._sender.exchange(calls, pipeline=pipeline)

    async def _send_ahead(
        self, calls: list[Call[Any]], *, pipeline: bool, after: Ahead | None = None
    ) -> Ahead:
        """See :meth:`OtaClient._send_ahead`."""
        self._check_open(calls[0], self._sender)
        sender = self._sender
        if isinstance(sender, AsyncTransport):
            behind = after.flight if after is not None else None
            flight = await sender.start(calls, pipeline=pipeline, after=behind)
            return Ahead(calls, pipeline, flight)
        return Ahead(calls, pipeline, None)

    @property
    def _can_pipeline(self) -> bool:
        """See :attr:`OtaClient._can_pipeline`."""
        sender = self._sender
        return isinstance(sender, AsyncTransport) and sender.pipelining

    async def _collect(self, ahead: Ahead) -> list[Result]:
        """See :meth:`OtaClient._collect`."""
        if ahead.flight is None:
            return await self._exchange(ahead.calls, pipeline=ahead.pipeline)
        assert isinstance(self._sender, AsyncTransport)
        return await self._sender.finish(ahead.flight)

    def _drop(self, ahead: Ahead) -> None:
        """See :meth:`OtaClient._drop`."""
        if ahead.flight is not None:
            assert isinstance(self._sender, AsyncTransport)
            self._sender.abandon(ahead.flight)

    async def _check_and_download(
        self, token: str, range_start: int, range_size: int, *, pipeline: bool
    ) -> tuple[Result, Result]:
        """See :meth:`OtaClient._check_and_download`."""
        check = self._core.check_token(token, None)
        download = self._core.download(token, range_start, range_size, None)
        self._check_open(check, self._sender)
        first, second = await self._sender.exchange([check, download], pipeline=pipeline)
        return first, second

    async def _deliver(self, event: OtaEvent) -> None:
        assert self._on_event is not None
        result = self._on_event(event)
        if inspect.isawaitable(result):
            await result

    async def post_version(
        self, *, version: str | None = None, timeout_ms: int | None = None
    ) -> None:
        """E1: see :meth:`OtaClient.post_version`."""
        return await self._execute(self._core.post_version(timeout_ms, version=version))

    async def query_version(self, *, timeout_ms: int | None = None) -> VersionInfo:
        """E2: see :meth:`OtaClient.query_version`."""
        return await self._execute(self._core.query_version(timeout_ms))

    async def check_task(self, *, timeout_ms: int | None = None) -> TaskInfo:
        """E3: see :meth:`OtaClient.check_task`."""
        return await self._execute(self._core.check_task(timeout_ms))

    async def check_tid_task(self, *, timeout_ms: int | None = None) -> TidTaskInfo:
        """S-C / F-C: see :meth:`OtaClient.check_tid_task`."""
        return await self._execute(self._core.check_tid_task(timeout_ms))

    async def task_status(self, tid: int, *, timeout_ms: int | None = None) -> int:
        """S-T / F-T: see :meth:`OtaClient.task_status`."""
        return await self._execute(self._core.task_status(tid, timeout_ms))

    async def tasking(self, *, timeout_ms: int | None = None) -> TaskInfo:
        """E4: see :meth:`OtaClient.tasking`."""
        return await self._execute(self._core.tasking(timeout_ms))

    async def check_token(self, token: str, *, timeout_ms: int | None = None) -> None:
        """E5: see :meth:`OtaClient.check_token`."""
        return await self._execute(self._core.check_token(token, timeout_ms))

    async def download_range(
        self,
        token: TaskRef,
        range_start: int,
        range_size: int,
        *,
        timeout_ms: int | None = None,
        package_size: int | None = None,
    ) -> DownloadedChunk:
        """E6: see :meth:`OtaClient.download_range`."""
        call = self._core.download(
            token, range_start, range_size, timeout_ms, package_size=package_size
        )
        return await self._execute(call)

    async def download_package(
        self, token: TaskRef, range_start: int, range_size: int, *, timeout_ms: int | None = None
    ) -> bytes:
        """E6: see :meth:`OtaClient.download_package`."""
        call = self._core.download(token, range_start, range_size, timeout_ms, exact_start=True)
        return (await self._execute(call)).data

    async def report_status(
        self, token: TaskRef, code: int, *, timeout_ms: int | None = None
    ) -> None:
        """E7: see :meth:`OtaClient.report_status`."""
        return await self._execute(self._core.report_status(token, code, timeout_ms))

    async def report_result(self, token: str, code: int, *, timeout_ms: int | None = None) -> None:
        """E8: see :meth:`OtaClient.report_result`."""
        return await self._execute(self._core.report_result(token, code, timeout_ms))

    async def dev_info(
        self,
        auth_info: str,
        *,
        product_id: str | None = None,
        method: Literal["GET", "POST"] = "POST",
        timeout_ms: int | None = None,
    ) -> str:
        """E9: see :meth:`OtaClient.dev_info`."""
        call = self._core.dev_info(
            auth_info, product_id=product_id, method=method, timeout_ms=timeout_ms
        )
        return await self._execute(call)

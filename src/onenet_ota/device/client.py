"""``OtaClient`` and ``AsyncOtaClient``: thin I/O drivers over httpx2 around the sans-IO core.

Both build their calls with :class:`~onenet_ota.device._core.ClientCore` and judge the replies with
it; all they add is sending, streaming the body into the core's reader (so no more than the
protocol allows is ever read), the overall deadline, mapping httpx2's exceptions into
:mod:`onenet_ota.device.errors`, and delivering events.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import ssl
import time
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx2

from onenet_ota import __version__
from onenet_ota.device._core import AnyTask, Call, ClientCore, Head, TaskRef, VersionInfo
from onenet_ota.device.config import DEFAULT_BASE_URLS, DeviceConfig, Timeout
from onenet_ota.device.errors import (
    ClientClosedError,
    InvalidArgumentError,
    OtaError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    endpoint_label,
)
from onenet_ota.device.events import AsyncEventCallback, DownloadedChunk, EventCallback, OtaEvent
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo

logger = logging.getLogger("onenet_ota.device")

T = TypeVar("T")
CaFile = str | os.PathLike[str]
DEFAULT_TIMEOUT = Timeout()


def _http_timeout(timeout: Timeout) -> httpx2.Timeout:
    return httpx2.Timeout(timeout.seconds, connect=timeout.connect_seconds)


def _head(response: httpx2.Response) -> Head:
    return Head(
        response.status_code,
        tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw),
    )


def _wrap(call: Call[T], exc: Exception, *, got_head: bool) -> OtaError:
    """httpx2's exception as this SDK's; the caller chains it with ``from``."""
    endpoint = call.endpoint
    detail = str(exc) or type(exc).__name__
    authorization = call.request.header("Authorization")
    if authorization:  # belt and braces: no library message may carry the credential out
        detail = detail.replace(authorization, "***")
    if isinstance(exc, httpx2.TimeoutException):
        return RequestTimeout(
            f"timed out after {call.request.timeout.ms} ms ({type(exc).__name__})",
            endpoint=endpoint,
        )
    if isinstance(exc, httpx2.RemoteProtocolError):
        if got_head:
            # The status and headers arrived, the body did not match its framing: typically a
            # Content-Length larger than the bytes sent before the server closed.
            return ProtocolError(
                f"reply body does not match its framing: {detail}", endpoint=endpoint
            )
        if "without sending a response" in detail:
            return TransportError(
                "the server closed the connection without replying", endpoint=endpoint
            )
        return ProtocolError(f"reply is not valid HTTP/1.1: {detail}", endpoint=endpoint)
    return TransportError(f"{type(exc).__name__}: {detail}", endpoint=endpoint)


_HTTPX_ERRORS = (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError)


def _may_retry(exc: Exception, got_head: bool, retried: bool, deadline: float) -> bool:
    """Whether to send the request once more, on a new connection.

    §10: the SDK MUST reconnect when the server closes a connection. A kept-alive connection that
    the server closed while idle fails only when it is reused: the request goes out and the
    connection ends with no reply at all. Then the server never read the request, so one retry on
    a fresh connection is safe, even for a POST. (A server that read it and died without a word
    looks the same; a repeated request changes no task state twice, §5.5, it may only answer an
    errno.) Any reply byte, or a timeout, rules a retry out.
    """
    if retried or got_head or time.monotonic() >= deadline:
        return False
    if isinstance(exc, httpx2.RemoteProtocolError):
        return "without sending a response" in str(exc)
    return isinstance(exc, httpx2.ReadError | httpx2.WriteError)


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # Loading the system CA store costs about 0.1 s; a fleet of clients shares one context
    # (an SSLContext is safe to share). trust_env=False: library code never reads the environment.
    return httpx2.create_ssl_context(verify=True, trust_env=False)


def _tls(verify: bool, ca_file: CaFile | None) -> ssl.SSLContext | bool:
    if not isinstance(verify, bool):
        raise InvalidArgumentError("verify must be True or False")
    if ca_file is None:
        return _default_tls() if verify else False
    if not verify:
        raise InvalidArgumentError("ca_file makes no sense with verify=False")
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    except (OSError, ssl.SSLError, TypeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidArgumentError(f"cannot load the CA file {ca_file!s}: {reason}") from None


def _http_options(tls: ssl.SSLContext | bool) -> dict[str, Any]:
    """Options of the HTTP client a client creates for itself (sync and async alike)."""
    return {
        "verify": tls,
        "trust_env": False,  # library code never reads the environment: inject a client
        "headers": {"User-Agent": f"onenet-ota/{__version__}"},
    }


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
    ) -> ssl.SSLContext | bool:
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

    def _check_open(self, call: Call[T], http_closed: bool) -> None:
        if self._closed:
            raise ClientClosedError(endpoint=call.endpoint)
        if http_closed:
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
    ``http_client`` injects an ``httpx2.Client`` (proxies, custom TLS, mounts); it is not closed
    by this client. ``on_event`` receives the C SDK's events (:mod:`onenet_ota.device.events`).
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
        if http_client is not None and not isinstance(http_client, httpx2.Client):
            raise InvalidArgumentError("http_client must be an httpx2.Client")
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx2.Client(**_http_options(tls))
        self._on_event = on_event

    def close(self) -> None:
        """Release the connections (the C SDK's ``ota_deinit``). Further calls raise."""
        if self._closed:
            return
        self._closed = True
        if self._owns_http:
            self._http.close()

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
        self._check_open(call, self._http.is_closed)
        request = call.request
        deadline = time.monotonic() + request.timeout.seconds
        retried = False
        while True:
            got_head = False
            try:
                with self._http.stream(
                    request.method,
                    request.url,
                    headers=list(request.headers),
                    content=request.body,
                    timeout=_http_timeout(request.timeout),
                ) as response:
                    got_head = True
                    logger.debug("%s: HTTP %s", endpoint_label(call.endpoint), response.status_code)
                    reader = call.begin(_head(response))
                    for data in response.iter_raw():
                        reader.feed(data)
                        if time.monotonic() > deadline:
                            raise call.timeout_error()
                    outcome = reader.finish()
                break
            except _HTTPX_ERRORS as exc:
                if _may_retry(exc, got_head, retried, deadline):
                    retried = True
                    continue
                raise _wrap(call, exc, got_head=got_head) from exc
        if outcome.event is not None and self._on_event is not None:
            self._on_event(outcome.event)
        return outcome.value

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
        if http_client is not None and not isinstance(http_client, httpx2.AsyncClient):
            raise InvalidArgumentError("http_client must be an httpx2.AsyncClient")
        self._owns_http = http_client is None
        self._http = (
            http_client if http_client is not None else httpx2.AsyncClient(**_http_options(tls))
        )
        self._on_event = on_event

    async def aclose(self) -> None:
        """Release the connections (the C SDK's ``ota_deinit``). Further calls raise."""
        if self._closed:
            return
        self._closed = True
        if self._owns_http:
            await self._http.aclose()

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
        self._check_open(call, self._http.is_closed)
        request = call.request
        deadline = time.monotonic() + request.timeout.seconds
        retried = False
        while True:
            got_head = False
            try:
                async with self._http.stream(
                    request.method,
                    request.url,
                    headers=list(request.headers),
                    content=request.body,
                    timeout=_http_timeout(request.timeout),
                ) as response:
                    got_head = True
                    logger.debug("%s: HTTP %s", endpoint_label(call.endpoint), response.status_code)
                    reader = call.begin(_head(response))
                    async for data in response.aiter_raw():
                        reader.feed(data)
                        if time.monotonic() > deadline:
                            raise call.timeout_error()
                    outcome = reader.finish()
                break
            except _HTTPX_ERRORS as exc:
                if _may_retry(exc, got_head, retried, deadline):
                    retried = True
                    continue
                raise _wrap(call, exc, got_head=got_head) from exc
        if outcome.event is not None and self._on_event is not None:
            await self._deliver(outcome.event)
        return outcome.value

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

"""``ManagementClient`` and ``AsyncManagementClient``: thin httpx2 drivers of the sans-IO core.

Both build every call with :class:`~onenet_ota.management._core.ManagementCore` and judge every
reply with it; all they add is sending, waiting out a busy server (``Retry-After``, idempotent
calls only), streaming package files, following page cursors and mapping httpx2's exceptions to
:class:`~onenet_ota.management.errors.TransportError`.

The operations are written once. Each is a method of ``ManagementCore`` (its typed parameters,
route, body and reply model), named in :class:`_Operations`, the base of both clients, by a
descriptor: :class:`_Operation` for one call, :class:`_Paged` for an ``iter_*`` helper. Read on a
``ManagementClient`` the descriptor is a function returning the result; on an
``AsyncManagementClient``, a coroutine function. Its overloaded ``__get__`` says so to a type
checker, so ``api.get_product`` has the builder's parameters and returns ``Product`` (or an
awaitable of it). Only what moves bytes differently (uploads, downloads, ``request``) is
written per client.

::

    from onenet_ota.management import ManagementClient, NotFound

    with ManagementClient("http://127.0.0.1:8080", token) as api:
        product = api.create_product(name="meters")
        api.import_devices(product.pid, [{"name": f"m{i:04d}"} for i in range(100)])
        package = api.upload_package(Path("fw.bin"), pid=product.pid, module_type="fota",
                                     target="1.0.1")
        task = api.create_task(package.id, from_versions=["1.0.0"])
        for view in api.iter_task_devices(task.id, state="failed"):
            print(view.dev_id, view.result_code)
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Concatenate, Final, Generic, ParamSpec, Self, TypeVar, overload

import httpx2

from onenet_ota.management._core import (
    Action,
    Call,
    Download,
    Kind,
    ManagementCore,
    ModuleType,
    Pages,
    next_cursor,
)
from onenet_ota.management.errors import TransportError
from onenet_ota.management.models import Package

__all__ = [
    "DEFAULT_TIMEOUT",
    "Action",
    "AsyncManagementClient",
    "ManagementClient",
    "UploadSource",
]

T = TypeVar("T")
P = ParamSpec("P")
DEFAULT_TIMEOUT: Final = httpx2.Timeout(30.0, read=300.0)
"""30 s to connect and write, 300 s to read: a fleet-wide task or a big import takes a while."""
UPLOAD_CHUNK: Final = 1024 * 1024

UploadSource = bytes | os.PathLike[str] | IO[bytes] | Iterable[bytes]
"""A package file: its bytes, a path, a binary file object read from its current position, or
an iterable of chunks (``AsyncManagementClient`` takes an async iterable too)."""


def _file_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(UPLOAD_CHUNK):
        yield chunk


def _path_chunks(path: os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from _file_chunks(handle)


def _known_size(content: object, size: int | None) -> int | None:
    """The upload's length when it can be known before sending (Content-Length)."""
    if size is not None:
        return size
    if isinstance(content, bytes | bytearray | memoryview):
        return len(content)
    if isinstance(content, os.PathLike):
        return Path(content).stat().st_size  # a missing file: OSError, before anything is sent
    return None


def _part_path(destination: os.PathLike[str]) -> Path:
    """Where a download to ``destination`` is written until it is whole: beside it, so that the
    final rename stays on one file system."""
    target = Path(destination)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")


def _transport_error(call: Call[Any], exc: Exception) -> TransportError:
    detail = str(exc) or type(exc).__name__
    return TransportError(f"cannot reach {call.server}: {detail}")


class _Described:
    """What both operation descriptors share: the builder's name, docstring and signature.

    On the class, the descriptor is the operation as an unbound method
    (``ManagementClient.get_product(api, pid)``; ``inspect.signature`` shows ``self`` first);
    on an instance, a function with the builder's parameters after ``self``. Either way the
    signature shows what the client returns (``Product``, ``Iterator[Device]``), not what the
    builder does (``Call[Product]``, ``Pages[Device]``), for ``help()`` and editors."""

    _builds = "Call"  # the builder's result type, whose parameter the client returns

    def __init__(self, build: Callable[..., Any]) -> None:
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__
        self.__wrapped__ = build
        self._signatures: dict[str, inspect.Signature] = {}
        # On the class: ``self`` first, and what either client returns.
        either = "Iterator[{}] | AsyncIterator[{}]" if self._builds == "Pages" else "{}"
        self.__signature__ = self._signature(either, 0)

    def __set_name__(self, owner: type[object], name: str) -> None:
        if name != self.__name__:  # one name per operation, in the core and in the clients
            raise TypeError(f"{owner.__name__}.{name} must be named {self.__name__}")

    def __repr__(self) -> str:
        return f"<operation {self.__name__}>"

    def _signature(self, returns: str, skip: int) -> inspect.Signature:
        """The builder's signature without its first ``skip`` parameters, returning ``returns``
        (a format of the builder's result's parameter, e.g. ``"Iterator[{}]"``)."""
        key = f"{skip}:{returns}"
        if key not in self._signatures:
            whole = inspect.signature(self.__wrapped__)
            built = str(whole.return_annotation)  # "Call[Product]": the core's are strings
            item = built.removeprefix(f"{self._builds}[").removesuffix("]")
            self._signatures[key] = whole.replace(
                parameters=list(whole.parameters.values())[skip:],
                return_annotation=returns.format(item, item),
            )
        return self._signatures[key]

    def _described(self, function: Callable[P, T], returns: str) -> Callable[P, T]:
        function.__name__ = function.__qualname__ = self.__name__
        function.__doc__ = self.__doc__
        function.__signature__ = self._signature(returns, 1)  # type: ignore[attr-defined]
        return function


class _Operation(_Described, Generic[P, T]):
    """One operation: ``build`` (a method of ManagementCore) makes its call; the client sends it
    and returns its result (``ManagementClient``) or a coroutine of it
    (``AsyncManagementClient``)."""

    def __init__(self, build: Callable[Concatenate[ManagementCore, P], Call[T]]) -> None:
        super().__init__(build)
        self._build = build

    @overload
    def __get__(self, instance: None, owner: type[object]) -> Self: ...
    @overload
    def __get__(self, instance: ManagementClient, owner: type[object]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, instance: AsyncManagementClient, owner: type[object]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(
        self, instance: ManagementClient | AsyncManagementClient | None, owner: type[object]
    ) -> Any:
        if instance is None:
            return self
        return self._described(instance._operation(self._build), "{}")

    def __call__(
        self, client: ManagementClient | AsyncManagementClient, /, *args: Any, **kwargs: Any
    ) -> Any:
        """The operation called on the class: ``ManagementClient.get_product(api, pid)``."""
        return self.__get__(client, type(client))(*args, **kwargs)


class _Paged(_Described, Generic[P, T]):
    """An ``iter_*`` helper: ``build`` (a method of ManagementCore) makes its :class:`Pages`; the
    client follows them as an iterator (``ManagementClient``) or an async iterator
    (``AsyncManagementClient``)."""

    _builds = "Pages"

    def __init__(self, build: Callable[Concatenate[ManagementCore, P], Pages[T]]) -> None:
        super().__init__(build)
        self._build = build

    @overload
    def __get__(self, instance: None, owner: type[object]) -> Self: ...
    @overload
    def __get__(
        self, instance: ManagementClient, owner: type[object]
    ) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(
        self, instance: AsyncManagementClient, owner: type[object]
    ) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(
        self, instance: ManagementClient | AsyncManagementClient | None, owner: type[object]
    ) -> Any:
        if instance is None:
            return self
        returns = (
            "AsyncIterator[{}]" if isinstance(instance, AsyncManagementClient) else "Iterator[{}]"
        )
        return self._described(instance._paged(self._build), returns)

    def __call__(
        self, client: ManagementClient | AsyncManagementClient, /, *args: Any, **kwargs: Any
    ) -> Any:
        """The helper called on the class: ``ManagementClient.iter_products(api)``."""
        return self.__get__(client, type(client))(*args, **kwargs)


_C = ManagementCore


class _Operations:
    """Every operation of the management API with a typed method, once for both clients (each
    described where :class:`ManagementCore` builds it)."""

    health = _Operation(_C.health)
    openapi = _Operation(_C.openapi)

    create_account = _Operation(_C.create_account)
    list_accounts = _Operation(_C.list_accounts)
    iter_accounts = _Paged(_C.iter_accounts)
    get_account = _Operation(_C.get_account)
    delete_account = _Operation(_C.delete_account)
    rotate_account_key = _Operation(_C.rotate_account_key)
    reveal_account_key = _Operation(_C.reveal_account_key)

    create_product = _Operation(_C.create_product)
    list_products = _Operation(_C.list_products)
    iter_products = _Paged(_C.iter_products)
    get_product = _Operation(_C.get_product)
    delete_product = _Operation(_C.delete_product)
    rotate_product_key = _Operation(_C.rotate_product_key)
    reveal_product_key = _Operation(_C.reveal_product_key)
    set_product_account = _Operation(_C.set_product_account)
    clear_product_account = _Operation(_C.clear_product_account)

    create_device = _Operation(_C.create_device)
    import_devices = _Operation(_C.import_devices)
    list_devices = _Operation(_C.list_devices)
    iter_devices = _Paged(_C.iter_devices)
    get_device = _Operation(_C.get_device)
    delete_device = _Operation(_C.delete_device)
    rotate_device_key = _Operation(_C.rotate_device_key)
    get_device_labels = _Operation(_C.get_device_labels)
    set_device_labels = _Operation(_C.set_device_labels)
    list_device_history = _Operation(_C.list_device_history)
    iter_device_history = _Paged(_C.iter_device_history)

    list_packages = _Operation(_C.list_packages)
    iter_packages = _Paged(_C.iter_packages)
    get_package = _Operation(_C.get_package)
    delete_package = _Operation(_C.delete_package)

    create_task = _Operation(_C.create_task)
    list_tasks = _Operation(_C.list_tasks)
    iter_tasks = _Paged(_C.iter_tasks)
    get_task = _Operation(_C.get_task)
    delete_task = _Operation(_C.delete_task)
    list_task_devices = _Operation(_C.list_task_devices)
    iter_task_devices = _Paged(_C.iter_task_devices)
    act_on_task = _Operation(_C.act_on_task)
    pause_task = _Operation(_C.pause_task)
    resume_task = _Operation(_C.resume_task)
    cancel_task = _Operation(_C.cancel_task)
    act_on_device_task = _Operation(_C.act_on_device_task)
    pause_device_task = _Operation(_C.pause_device_task)
    resume_device_task = _Operation(_C.resume_device_task)
    cancel_device_task = _Operation(_C.cancel_device_task)

    create_token = _Operation(_C.create_token)
    list_tokens = _Operation(_C.list_tokens)
    iter_tokens = _Paged(_C.iter_tokens)
    revoke_token = _Operation(_C.revoke_token)

    list_audit = _Operation(_C.list_audit)
    iter_audit = _Paged(_C.iter_audit)

    create_campaign = _Operation(_C.create_campaign)
    preview_campaign_spec = _Operation(_C.preview_campaign_spec)
    list_campaigns = _Operation(_C.list_campaigns)
    iter_campaigns = _Paged(_C.iter_campaigns)
    get_campaign = _Operation(_C.get_campaign)
    delete_campaign = _Operation(_C.delete_campaign)
    preview_campaign = _Operation(_C.preview_campaign)
    list_campaign_events = _Operation(_C.list_campaign_events)
    act_on_campaign = _Operation(_C.act_on_campaign)
    start_campaign = _Operation(_C.start_campaign)
    pause_campaign = _Operation(_C.pause_campaign)
    resume_campaign = _Operation(_C.resume_campaign)
    advance_campaign = _Operation(_C.advance_campaign)
    abort_campaign = _Operation(_C.abort_campaign)
    retry_failed_campaign = _Operation(_C.retry_failed_campaign)
    add_campaign_devices = _Operation(_C.add_campaign_devices)


class ManagementClient(_Operations):
    """A synchronous client of the management API (``/api/v1``) of an onenet-ota server.

    ``server`` is the base URL (``http://host:port``), ``token`` the admin token. ``client`` is
    an injectable ``httpx2.Client`` (tests, proxies, TLS settings; the caller then closes it);
    otherwise the client makes its own with ``timeout``. ``sleep`` waits between tries when the
    server is busy. A ``server`` that is not an http(s) URL is a ``ValueError``.

    Every method sends one request (the ``iter_*`` helpers one per page) and returns the reply as
    a model of :mod:`onenet_ota.management.models`, or raises a
    :class:`~onenet_ota.management.errors.ManagementError`. An idempotent call (GET, PUT, DELETE)
    the server answered with 503 is sent again after its ``Retry-After`` (at most 10 s), up to
    three tries in all; a POST never is. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        client: httpx2.Client | None = None,
        timeout: httpx2.Timeout = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._core = ManagementCore(server, token)
        self.server = self._core.server
        self._own = client is None
        self._client = client if client is not None else httpx2.Client(timeout=timeout)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ManagementClient({self.server!r})"

    def close(self) -> None:
        """Close the connection pool (unless it was given)."""
        if self._own:
            self._client.close()

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- the driver

    def _operation(
        self, build: Callable[Concatenate[ManagementCore, P], Call[T]]
    ) -> Callable[P, T]:
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            return self._send(build(self._core, *args, **kwargs))

        return run

    def _paged(
        self, build: Callable[Concatenate[ManagementCore, P], Pages[T]]
    ) -> Callable[P, Iterator[T]]:
        def run(*args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
            return self._pages(build(self._core, *args, **kwargs))

        return run

    def _send(self, call: Call[T], content: Any = None) -> T:
        wire = call.request
        attempt = 1
        while True:
            try:
                response = self._client.request(
                    wire.method,
                    wire.url,
                    params=wire.params,
                    headers=wire.headers,
                    content=wire.body if content is None else content,
                )
            except httpx2.HTTPError as exc:
                raise _transport_error(call, exc) from None
            delay = call.retry_delay(
                response.status_code, response.headers.get("Retry-After"), attempt
            )
            if delay is None:
                return call.judge(response.status_code, response.reason_phrase, response.content)
            attempt += 1
            self._sleep(delay)

    def _pages(self, pages: Pages[T]) -> Iterator[T]:
        after: str | None = None
        while True:
            current = self._send(pages.page(after))
            yield from current.items
            after = next_cursor(current, after)
            if after is None:
                return

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any route under ``/api/v1`` (``path`` starts with ``/``): the reply's JSON, None for
        204. For routes without a typed method yet; errors are raised as for the typed ones.
        A ``content`` body is sent as given and never sent twice."""
        call = self._core.request(
            method,
            path,
            json_body=json_body,
            params=params,
            headers=headers,
            streamed=content is not None,
        )
        return self._send(call, content)

    # ---------------------------------------------------------------- package files

    def upload_package(
        self,
        content: UploadSource,
        *,
        pid: str,
        module_type: ModuleType,
        target: str,
        file_name: str | None = None,
        kind: Kind = "full",
        from_version: str | None = None,
        manuf: str | None = None,
        model: str | None = None,
        size: int | None = None,
    ) -> Package:
        """Upload a package file, streamed; the server measures size, md5 and sha256.

        ``file_name`` (the name devices see) defaults to a path's name. ``size`` is needed only
        for an iterable or file object whose length should be announced (else it is sent
        chunked). The upload is never sent twice: a :class:`Busy` reply is raised.
        """
        name = _file_name(content, file_name)
        call = self._core.upload_package(
            pid=pid, module_type=module_type, target=target, file_name=name, kind=kind,
            from_version=from_version, manuf=manuf, model=model,
            size=_known_size(content, size),
        )  # fmt: skip
        return self._send(call, _sync_body(content))

    def download_package(self, package_id: int, destination: os.PathLike[str] | IO[bytes]) -> int:
        """Download a package's file, streamed; returns its size.

        The bytes are checked against the length and sha256 the server announced. A path is
        written whole or not at all (a partial file is removed); a file object gets the bytes as
        they arrive.
        """
        download = self._core.download_package(package_id)
        if not isinstance(destination, os.PathLike):
            return self._download(download, destination)
        part = _part_path(destination)
        try:
            with open(part, "wb") as sink:
                size = self._download(download, sink)
            os.replace(part, destination)
        finally:
            part.unlink(missing_ok=True)
        return size

    def _download(self, download: Download, sink: IO[bytes]) -> int:
        call = download.call
        wire = call.request
        attempt = 1
        while True:
            try:
                with self._client.stream(wire.method, wire.url, headers=wire.headers) as response:
                    status = response.status_code
                    if 200 <= status < 300:
                        reader = download.reader(
                            response.headers.get("Content-Length"), response.headers.get("ETag")
                        )
                        for chunk in response.iter_bytes():
                            reader.feed(chunk)
                            sink.write(chunk)
                        return reader.finish()
                    response.read()
            except httpx2.HTTPError as exc:
                raise _transport_error(call, exc) from None
            delay = call.retry_delay(status, response.headers.get("Retry-After"), attempt)
            if delay is None:
                raise call.error(status, response.reason_phrase, response.content)
            attempt += 1
            self._sleep(delay)


def _file_name(content: object, given: str | None) -> str:
    if given is not None:
        return given
    if isinstance(content, os.PathLike):
        return Path(content).name
    name = getattr(content, "name", None)
    if isinstance(name, str) and name:
        return Path(name).name
    raise ValueError("file_name is required unless the content is a path or a named file")


def _sync_body(content: UploadSource) -> bytes | Iterable[bytes]:
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content)
    if isinstance(content, os.PathLike):
        return _path_chunks(content)
    if hasattr(content, "read"):
        return _file_chunks(content)  # type: ignore[arg-type]
    return content


async def _async_chunks(content: object) -> AsyncIterator[bytes]:
    """An upload body for httpx2's async client; files are read off the event loop."""
    if isinstance(content, AsyncIterable):
        async for chunk in content:
            yield chunk
        return
    if isinstance(content, os.PathLike):
        handle = await asyncio.to_thread(open, content, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, UPLOAD_CHUNK):
                yield chunk
        finally:
            handle.close()
        return
    if hasattr(content, "read"):
        reader: IO[bytes] = content  # type: ignore[assignment]
        while chunk := await asyncio.to_thread(reader.read, UPLOAD_CHUNK):
            yield chunk
        return
    for chunk in content:  # type: ignore[attr-defined]
        yield chunk


class AsyncManagementClient(_Operations):
    """The asynchronous twin of :class:`ManagementClient`: the same methods, awaited, over one
    ``httpx2.AsyncClient``; the ``iter_*`` helpers are async iterators. ``upload_package`` also
    takes an async iterable of chunks."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        client: httpx2.AsyncClient | None = None,
        timeout: httpx2.Timeout = DEFAULT_TIMEOUT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._core = ManagementCore(server, token)
        self.server = self._core.server
        self._own = client is None
        self._client = client if client is not None else httpx2.AsyncClient(timeout=timeout)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"AsyncManagementClient({self.server!r})"

    async def aclose(self) -> None:
        """Close the connection pool (unless it was given)."""
        if self._own:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncManagementClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- the driver

    def _operation(
        self, build: Callable[Concatenate[ManagementCore, P], Call[T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self._send(build(self._core, *args, **kwargs))

        return run

    def _paged(
        self, build: Callable[Concatenate[ManagementCore, P], Pages[T]]
    ) -> Callable[P, AsyncIterator[T]]:
        def run(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            return self._pages(build(self._core, *args, **kwargs))

        return run

    async def _send(self, call: Call[T], content: Any = None) -> T:
        wire = call.request
        attempt = 1
        while True:
            try:
                response = await self._client.request(
                    wire.method,
                    wire.url,
                    params=wire.params,
                    headers=wire.headers,
                    content=wire.body if content is None else content,
                )
            except httpx2.HTTPError as exc:
                raise _transport_error(call, exc) from None
            delay = call.retry_delay(
                response.status_code, response.headers.get("Retry-After"), attempt
            )
            if delay is None:
                return call.judge(response.status_code, response.reason_phrase, response.content)
            attempt += 1
            await self._sleep(delay)

    async def _pages(self, pages: Pages[T]) -> AsyncIterator[T]:
        after: str | None = None
        while True:
            current = await self._send(pages.page(after))
            for item in current.items:
                yield item
            after = next_cursor(current, after)
            if after is None:
                return

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any route under ``/api/v1``: the reply's JSON, None for 204 (see
        :meth:`ManagementClient.request`)."""
        call = self._core.request(
            method,
            path,
            json_body=json_body,
            params=params,
            headers=headers,
            streamed=content is not None,
        )
        body = content if content is None or isinstance(content, bytes) else _async_chunks(content)
        return await self._send(call, body)

    # ---------------------------------------------------------------- package files

    async def upload_package(
        self,
        content: UploadSource | AsyncIterable[bytes],
        *,
        pid: str,
        module_type: ModuleType,
        target: str,
        file_name: str | None = None,
        kind: Kind = "full",
        from_version: str | None = None,
        manuf: str | None = None,
        model: str | None = None,
        size: int | None = None,
    ) -> Package:
        """Upload a package file, streamed (see :meth:`ManagementClient.upload_package`)."""
        name = _file_name(content, file_name)
        call = self._core.upload_package(
            pid=pid, module_type=module_type, target=target, file_name=name, kind=kind,
            from_version=from_version, manuf=manuf, model=model,
            size=_known_size(content, size),
        )  # fmt: skip
        if isinstance(content, bytes | bytearray | memoryview):
            return await self._send(call, bytes(content))
        return await self._send(call, _async_chunks(content))

    async def download_package(
        self, package_id: int, destination: os.PathLike[str] | IO[bytes]
    ) -> int:
        """Download a package's file (see :meth:`ManagementClient.download_package`); the file
        is written off the event loop."""
        download = self._core.download_package(package_id)
        if not isinstance(destination, os.PathLike):
            return await self._download(download, destination)
        part = _part_path(destination)
        try:
            sink = await asyncio.to_thread(open, part, "wb")
            try:
                size = await self._download(download, sink)
            finally:
                await asyncio.to_thread(sink.close)
            await asyncio.to_thread(os.replace, part, destination)
        finally:
            await asyncio.to_thread(part.unlink, missing_ok=True)
        return size

    async def _download(self, download: Download, sink: IO[bytes]) -> int:
        call = download.call
        wire = call.request
        attempt = 1
        while True:
            try:
                async with self._client.stream(
                    wire.method, wire.url, headers=wire.headers
                ) as response:
                    status = response.status_code
                    if 200 <= status < 300:
                        reader = download.reader(
                            response.headers.get("Content-Length"), response.headers.get("ETag")
                        )
                        async for chunk in response.aiter_bytes():
                            reader.feed(chunk)
                            await asyncio.to_thread(sink.write, chunk)
                        return reader.finish()
                    await response.aread()
            except httpx2.HTTPError as exc:
                raise _transport_error(call, exc) from None
            delay = call.retry_delay(status, response.headers.get("Retry-After"), attempt)
            if delay is None:
                raise call.error(status, response.reason_phrase, response.content)
            attempt += 1
            await self._sleep(delay)

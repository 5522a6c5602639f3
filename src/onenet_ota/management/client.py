"""``ManagementClient`` and ``AsyncManagementClient``: thin httpx2 drivers of the sans-IO core.

Both build every call with :class:`~onenet_ota.management._core.ManagementCore` and judge every
reply with it; all they add is sending, waiting out a busy server (``Retry-After``, idempotent
calls only), streaming package files, following page cursors and mapping httpx2's exceptions to
:class:`~onenet_ota.management.errors.TransportError`.

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
import os
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, TypeVar

import httpx2

from onenet_ota.management._core import (
    DEFAULT_PAGE_SIZE,
    Call,
    Download,
    Kind,
    ManagementCore,
    ModuleType,
    OnOpen,
    PageLike,
    TaskStatus,
    next_cursor,
)
from onenet_ota.management.errors import TransportError
from onenet_ota.management.models import (
    Account,
    AccountPage,
    Device,
    DeviceDetail,
    DeviceImportItem,
    DevicePage,
    DeviceTaskPage,
    DeviceTaskView,
    Health,
    Package,
    PackagePage,
    Product,
    ProductPage,
    StateName,
    Task,
    TaskActionResult,
    TaskCreated,
    TaskDetail,
    TaskPage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Action",
    "AsyncManagementClient",
    "ManagementClient",
    "UploadSource",
]

T = TypeVar("T")
DEFAULT_TIMEOUT: Final = httpx2.Timeout(30.0, read=300.0)
"""30 s to connect and write, 300 s to read: a fleet-wide task or a big import takes a while."""
UPLOAD_CHUNK: Final = 1024 * 1024
Action = Literal["pause", "resume", "cancel"]

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


class ManagementClient:
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

    def _pages(self, page: Callable[[str | None], Call[PageLike[T]]]) -> Iterator[T]:
        after: str | None = None
        while True:
            current = self._send(page(after))
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

    # ---------------------------------------------------------------- meta

    def health(self) -> Health:
        """Liveness and the server's version (needs no token)."""
        return self._send(self._core.health())

    def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI 3.1 document."""
        return self._send(self._core.openapi())

    # ---------------------------------------------------------------- accounts

    def create_account(
        self, *, uid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Account:
        """Create an account for userid tokens (fuse dialect); uid and key generated if omitted."""
        return self._send(self._core.create_account(uid=uid, access_key=access_key, name=name))

    def list_accounts(self, *, limit: int | None = None, after: str | None = None) -> AccountPage:
        """One page of accounts (without keys)."""
        return self._send(self._core.list_accounts(limit=limit, after=after))

    def iter_accounts(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[Account]:
        """Every account, page after page."""
        return self._pages(lambda after: self._core.list_accounts(limit=page_size, after=after))

    def get_account(self, uid: str) -> Account:
        """An account with its access key and product count."""
        return self._send(self._core.get_account(uid))

    def delete_account(self, uid: str) -> None:
        """Delete an account that owns no product."""
        self._send(self._core.delete_account(uid))

    def rotate_account_key(self, uid: str, *, access_key: str | None = None) -> Account:
        """Replace an account's access key (generated if omitted)."""
        return self._send(self._core.rotate_account_key(uid, access_key=access_key))

    # ---------------------------------------------------------------- products

    def create_product(
        self, *, pid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Product:
        """Create a product; pid and access key generated if omitted."""
        return self._send(self._core.create_product(pid=pid, access_key=access_key, name=name))

    def list_products(self, *, limit: int | None = None, after: str | None = None) -> ProductPage:
        """One page of products (without keys)."""
        return self._send(self._core.list_products(limit=limit, after=after))

    def iter_products(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[Product]:
        """Every product, page after page."""
        return self._pages(lambda after: self._core.list_products(limit=page_size, after=after))

    def get_product(self, pid: str) -> Product:
        """A product with its access key and device count."""
        return self._send(self._core.get_product(pid))

    def delete_product(self, pid: str) -> None:
        """Delete a product that has no devices, packages or tasks left."""
        self._send(self._core.delete_product(pid))

    def rotate_product_key(self, pid: str, *, access_key: str | None = None) -> Product:
        """Replace a product's access key (generated if omitted)."""
        return self._send(self._core.rotate_product_key(pid, access_key=access_key))

    def set_product_account(self, pid: str, uid: str) -> Product:
        """Make account ``uid`` the product's owner: its userid tokens then speak for it."""
        return self._send(self._core.set_product_account(pid, uid))

    def clear_product_account(self, pid: str) -> Product:
        """Leave the product without an owning account."""
        return self._send(self._core.clear_product_account(pid))

    # ---------------------------------------------------------------- devices

    def create_device(
        self,
        pid: str,
        name: str,
        *,
        dev_id: int | None = None,
        device_key: str | None = None,
        generate_device_key: bool = False,
        auth_info: str | None = None,
    ) -> Device:
        """Create a device; dev_id generated if omitted."""
        return self._send(
            self._core.create_device(
                pid, name, dev_id=dev_id, device_key=device_key,
                generate_device_key=generate_device_key, auth_info=auth_info,
            )
        )  # fmt: skip

    def import_devices(
        self, pid: str, devices: Iterable[DeviceImportItem | Mapping[str, Any]]
    ) -> list[Device]:
        """Create many devices of product ``pid`` (at most 10,000), all or none."""
        return self._send(self._core.import_devices(pid, devices))

    def list_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> DevicePage:
        """One page of devices, filtered."""
        return self._send(
            self._core.list_devices(
                pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
                limit=limit, after=after,
            )
        )  # fmt: skip

    def iter_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Device]:
        """Every device that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_devices(
                pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
                limit=page_size, after=after,
            )
        )  # fmt: skip

    def get_device(self, dev_id: int) -> DeviceDetail:
        """A device with its reported versions and task history."""
        return self._send(self._core.get_device(dev_id))

    def delete_device(self, dev_id: int) -> None:
        """Delete a device without open tasks, with its upgrade history."""
        self._send(self._core.delete_device(dev_id))

    def rotate_device_key(self, dev_id: int, *, device_key: str | None = None) -> Device:
        """Replace a device's key (generated if omitted); the old one stops working at once."""
        return self._send(self._core.rotate_device_key(dev_id, device_key=device_key))

    # ---------------------------------------------------------------- packages

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

    def list_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> PackagePage:
        """One page of packages."""
        return self._send(
            self._core.list_packages(pid=pid, module_type=module_type, limit=limit, after=after)
        )

    def iter_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Package]:
        """Every package that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_packages(
                pid=pid, module_type=module_type, limit=page_size, after=after
            )
        )

    def get_package(self, package_id: int) -> Package:
        """A package's metadata."""
        return self._send(self._core.get_package(package_id))

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

    def delete_package(self, package_id: int) -> None:
        """Delete a package no task uses."""
        self._send(self._core.delete_package(package_id))

    # ---------------------------------------------------------------- tasks

    def create_task(
        self,
        package_id: int,
        *,
        dev_ids: Sequence[int] | None = None,
        from_versions: Sequence[str] | None = None,
        signal: int = 0,
        power: int = 0,
        retry: int = 0,
        interval: int = 0,
        start_time: int | None = None,
        deadline: int | None = None,
        on_open: OnOpen = "fail",
    ) -> TaskCreated:
        """Create an upgrade task for ``dev_ids``, or for every device of the package's product
        at one of ``from_versions``. Times are Unix seconds."""
        return self._send(
            self._core.create_task(
                package_id, dev_ids=dev_ids, from_versions=from_versions, signal=signal,
                power=power, retry=retry, interval=interval, start_time=start_time,
                deadline=deadline, on_open=on_open,
            )
        )  # fmt: skip

    def list_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> TaskPage:
        """One page of tasks with their per-state counts."""
        return self._send(
            self._core.list_tasks(
                pid=pid, package_id=package_id, status=status, limit=limit, after=after
            )
        )

    def iter_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Task]:
        """Every task that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_tasks(
                pid=pid, package_id=package_id, status=status, limit=page_size, after=after
            )
        )

    def get_task(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> TaskDetail:
        """A task with its counts and one page of its devices (``devices_next`` continues)."""
        return self._send(self._core.get_task(task_id, state=state, limit=limit, after=after))

    def delete_task(self, task_id: int) -> None:
        """Delete a task without open device tasks (the package stays)."""
        self._send(self._core.delete_task(task_id))

    def list_task_devices(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> DeviceTaskPage:
        """One page of a task's devices with state and progress."""
        return self._send(
            self._core.list_task_devices(task_id, state=state, limit=limit, after=after)
        )

    def iter_task_devices(
        self, task_id: int, *, state: StateName | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[DeviceTaskView]:
        """Every device of a task (in ``state``, if given), page after page."""
        return self._pages(
            lambda after: self._core.list_task_devices(
                task_id, state=state, limit=page_size, after=after
            )
        )

    def act_on_task(self, task_id: int, action: Action) -> TaskActionResult:
        """Pause, resume or cancel every device of a task where the state machine allows it."""
        return self._send(self._core.act_on_task(task_id, action))

    def pause_task(self, task_id: int) -> TaskActionResult:
        """Pause every device of the task that is waiting or downloading (T2)."""
        return self._send(self._core.act_on_task(task_id, "pause"))

    def resume_task(self, task_id: int) -> TaskActionResult:
        """Resume the task's paused devices (T3)."""
        return self._send(self._core.act_on_task(task_id, "resume"))

    def cancel_task(self, task_id: int) -> TaskActionResult:
        """Cancel every open device of the task (T4)."""
        return self._send(self._core.act_on_task(task_id, "cancel"))

    def act_on_device_task(self, task_id: int, dev_id: int, action: Action) -> DeviceTaskView:
        """Pause, resume or cancel one device's part of a task."""
        return self._send(self._core.act_on_device_task(task_id, dev_id, action))

    def pause_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Pause one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "pause")

    def resume_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Resume one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "resume")

    def cancel_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Cancel one device's part of a task."""
        return self.act_on_device_task(task_id, dev_id, "cancel")


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


class AsyncManagementClient:
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

    async def _pages(self, page: Callable[[str | None], Call[PageLike[T]]]) -> AsyncIterator[T]:
        after: str | None = None
        while True:
            current = await self._send(page(after))
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

    # ---------------------------------------------------------------- meta

    async def health(self) -> Health:
        """Liveness and the server's version (needs no token)."""
        return await self._send(self._core.health())

    async def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI 3.1 document."""
        return await self._send(self._core.openapi())

    # ---------------------------------------------------------------- accounts

    async def create_account(
        self, *, uid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Account:
        """Create an account for userid tokens (fuse dialect); uid and key generated if omitted."""
        return await self._send(
            self._core.create_account(uid=uid, access_key=access_key, name=name)
        )

    async def list_accounts(
        self, *, limit: int | None = None, after: str | None = None
    ) -> AccountPage:
        """One page of accounts (without keys)."""
        return await self._send(self._core.list_accounts(limit=limit, after=after))

    def iter_accounts(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[Account]:
        """Every account, page after page."""
        return self._pages(lambda after: self._core.list_accounts(limit=page_size, after=after))

    async def get_account(self, uid: str) -> Account:
        """An account with its access key and product count."""
        return await self._send(self._core.get_account(uid))

    async def delete_account(self, uid: str) -> None:
        """Delete an account that owns no product."""
        await self._send(self._core.delete_account(uid))

    async def rotate_account_key(self, uid: str, *, access_key: str | None = None) -> Account:
        """Replace an account's access key (generated if omitted)."""
        return await self._send(self._core.rotate_account_key(uid, access_key=access_key))

    # ---------------------------------------------------------------- products

    async def create_product(
        self, *, pid: str | None = None, access_key: str | None = None, name: str = ""
    ) -> Product:
        """Create a product; pid and access key generated if omitted."""
        return await self._send(
            self._core.create_product(pid=pid, access_key=access_key, name=name)
        )

    async def list_products(
        self, *, limit: int | None = None, after: str | None = None
    ) -> ProductPage:
        """One page of products (without keys)."""
        return await self._send(self._core.list_products(limit=limit, after=after))

    def iter_products(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[Product]:
        """Every product, page after page."""
        return self._pages(lambda after: self._core.list_products(limit=page_size, after=after))

    async def get_product(self, pid: str) -> Product:
        """A product with its access key and device count."""
        return await self._send(self._core.get_product(pid))

    async def delete_product(self, pid: str) -> None:
        """Delete a product that has no devices, packages or tasks left."""
        await self._send(self._core.delete_product(pid))

    async def rotate_product_key(self, pid: str, *, access_key: str | None = None) -> Product:
        """Replace a product's access key (generated if omitted)."""
        return await self._send(self._core.rotate_product_key(pid, access_key=access_key))

    async def set_product_account(self, pid: str, uid: str) -> Product:
        """Make account ``uid`` the product's owner: its userid tokens then speak for it."""
        return await self._send(self._core.set_product_account(pid, uid))

    async def clear_product_account(self, pid: str) -> Product:
        """Leave the product without an owning account."""
        return await self._send(self._core.clear_product_account(pid))

    # ---------------------------------------------------------------- devices

    async def create_device(
        self,
        pid: str,
        name: str,
        *,
        dev_id: int | None = None,
        device_key: str | None = None,
        generate_device_key: bool = False,
        auth_info: str | None = None,
    ) -> Device:
        """Create a device; dev_id generated if omitted."""
        return await self._send(
            self._core.create_device(
                pid, name, dev_id=dev_id, device_key=device_key,
                generate_device_key=generate_device_key, auth_info=auth_info,
            )
        )  # fmt: skip

    async def import_devices(
        self, pid: str, devices: Iterable[DeviceImportItem | Mapping[str, Any]]
    ) -> list[Device]:
        """Create many devices of product ``pid`` (at most 10,000), all or none."""
        return await self._send(self._core.import_devices(pid, devices))

    async def list_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> DevicePage:
        """One page of devices, filtered."""
        return await self._send(
            self._core.list_devices(
                pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
                limit=limit, after=after,
            )
        )  # fmt: skip

    def iter_devices(
        self,
        *,
        pid: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
        name_contains: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[Device]:
        """Every device that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_devices(
                pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
                limit=page_size, after=after,
            )
        )  # fmt: skip

    async def get_device(self, dev_id: int) -> DeviceDetail:
        """A device with its reported versions and task history."""
        return await self._send(self._core.get_device(dev_id))

    async def delete_device(self, dev_id: int) -> None:
        """Delete a device without open tasks, with its upgrade history."""
        await self._send(self._core.delete_device(dev_id))

    async def rotate_device_key(self, dev_id: int, *, device_key: str | None = None) -> Device:
        """Replace a device's key (generated if omitted); the old one stops working at once."""
        return await self._send(self._core.rotate_device_key(dev_id, device_key=device_key))

    # ---------------------------------------------------------------- packages

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

    async def list_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> PackagePage:
        """One page of packages."""
        return await self._send(
            self._core.list_packages(pid=pid, module_type=module_type, limit=limit, after=after)
        )

    def iter_packages(
        self,
        *,
        pid: str | None = None,
        module_type: ModuleType | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[Package]:
        """Every package that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_packages(
                pid=pid, module_type=module_type, limit=page_size, after=after
            )
        )

    async def get_package(self, package_id: int) -> Package:
        """A package's metadata."""
        return await self._send(self._core.get_package(package_id))

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

    async def delete_package(self, package_id: int) -> None:
        """Delete a package no task uses."""
        await self._send(self._core.delete_package(package_id))

    # ---------------------------------------------------------------- tasks

    async def create_task(
        self,
        package_id: int,
        *,
        dev_ids: Sequence[int] | None = None,
        from_versions: Sequence[str] | None = None,
        signal: int = 0,
        power: int = 0,
        retry: int = 0,
        interval: int = 0,
        start_time: int | None = None,
        deadline: int | None = None,
        on_open: OnOpen = "fail",
    ) -> TaskCreated:
        """Create an upgrade task (see :meth:`ManagementClient.create_task`)."""
        return await self._send(
            self._core.create_task(
                package_id, dev_ids=dev_ids, from_versions=from_versions, signal=signal,
                power=power, retry=retry, interval=interval, start_time=start_time,
                deadline=deadline, on_open=on_open,
            )
        )  # fmt: skip

    async def list_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> TaskPage:
        """One page of tasks with their per-state counts."""
        return await self._send(
            self._core.list_tasks(
                pid=pid, package_id=package_id, status=status, limit=limit, after=after
            )
        )

    def iter_tasks(
        self,
        *,
        pid: str | None = None,
        package_id: int | None = None,
        status: TaskStatus | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[Task]:
        """Every task that passes the filters, page after page."""
        return self._pages(
            lambda after: self._core.list_tasks(
                pid=pid, package_id=package_id, status=status, limit=page_size, after=after
            )
        )

    async def get_task(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> TaskDetail:
        """A task with its counts and one page of its devices (``devices_next`` continues)."""
        return await self._send(self._core.get_task(task_id, state=state, limit=limit, after=after))

    async def delete_task(self, task_id: int) -> None:
        """Delete a task without open device tasks (the package stays)."""
        await self._send(self._core.delete_task(task_id))

    async def list_task_devices(
        self,
        task_id: int,
        *,
        state: StateName | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> DeviceTaskPage:
        """One page of a task's devices with state and progress."""
        return await self._send(
            self._core.list_task_devices(task_id, state=state, limit=limit, after=after)
        )

    def iter_task_devices(
        self, task_id: int, *, state: StateName | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[DeviceTaskView]:
        """Every device of a task (in ``state``, if given), page after page."""
        return self._pages(
            lambda after: self._core.list_task_devices(
                task_id, state=state, limit=page_size, after=after
            )
        )

    async def act_on_task(self, task_id: int, action: Action) -> TaskActionResult:
        """Pause, resume or cancel every device of a task where the state machine allows it."""
        return await self._send(self._core.act_on_task(task_id, action))

    async def pause_task(self, task_id: int) -> TaskActionResult:
        """Pause every device of the task that is waiting or downloading (T2)."""
        return await self._send(self._core.act_on_task(task_id, "pause"))

    async def resume_task(self, task_id: int) -> TaskActionResult:
        """Resume the task's paused devices (T3)."""
        return await self._send(self._core.act_on_task(task_id, "resume"))

    async def cancel_task(self, task_id: int) -> TaskActionResult:
        """Cancel every open device of the task (T4)."""
        return await self._send(self._core.act_on_task(task_id, "cancel"))

    async def act_on_device_task(self, task_id: int, dev_id: int, action: Action) -> DeviceTaskView:
        """Pause, resume or cancel one device's part of a task."""
        return await self._send(self._core.act_on_device_task(task_id, dev_id, action))

    async def pause_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Pause one device's part of a task."""
        return await self.act_on_device_task(task_id, dev_id, "pause")

    async def resume_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Resume one device's part of a task."""
        return await self.act_on_device_task(task_id, dev_id, "resume")

    async def cancel_device_task(self, task_id: int, dev_id: int) -> DeviceTaskView:
        """Cancel one device's part of a task."""
        return await self.act_on_device_task(task_id, dev_id, "cancel")

"""``ManagementClient`` and ``AsyncManagementClient`` against the real server, over loopback HTTP.

Each test runs with both clients (``api`` fixture, tests/management/conftest.py). A busy server
(503) is the one reply the real server cannot be made to give without breaking its database, so
those tests drive the clients against a scripted transport instead.
"""

from __future__ import annotations

import hashlib
import inspect
import io
from pathlib import Path

import httpx2
import pytest

import onenet_ota
from onenet_ota.management import (
    BUSY_ATTEMPTS,
    AsyncManagementClient,
    BadRequest,
    Busy,
    Conflict,
    Invalid,
    ManagementClient,
    ManagementError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ServerError,
    TransportError,
    Unauthorized,
)
from onenet_ota.management._core import ManagementCore
from onenet_ota.management.client import _Operation
from onenet_ota.management.models import (
    Account,
    Device,
    DeviceDetail,
    DeviceImportItem,
    DevicePage,
    Package,
    Product,
    TaskActionResult,
    TaskCreated,
    TaskDetail,
)
from onenet_ota.protocol.status import TaskType
from tests.management.conftest import (
    K1,
    K2,
    MAX_UPLOAD,
    TOKEN,
    Driver,
    fresh_pid,
    make_client,
    public_methods,
)
from tests.management.test_client_operations import AREAS

pytestmark = pytest.mark.anyio

FIRMWARE = b"firmware image " * 100


def test_both_clients_have_the_same_methods() -> None:
    # One set of operations, written twice: a method added to one client must reach the other.
    assert public_methods(ManagementClient) - {"close"} == public_methods(AsyncManagementClient) - {
        "aclose"
    }
    for name in public_methods(ManagementClient) - {"close"}:
        sync = inspect.signature(getattr(ManagementClient, name))
        async_ = inspect.signature(getattr(AsyncManagementClient, name))
        assert list(sync.parameters) == list(async_.parameters), name


async def test_every_method_against_the_server(api: Driver, tmp_path: Path) -> None:
    # Meta.
    health = await api("health")
    assert (health.status, health.version) == ("ok", onenet_ota.__version__)
    document = await api("openapi")
    assert document["openapi"] == "3.1.0"
    assert "/api/v1/devices/import" in document["paths"]

    # Accounts.
    uid = "9" + fresh_pid()
    account = await api("create_account", uid=uid, access_key=K1, name="owner")
    assert isinstance(account, Account)
    assert (account.uid, account.access_key, account.name) == (uid, K1, "owner")
    assert (await api("get_account", uid)).product_count == 0
    rotated_account = await api("rotate_account_key", uid)
    assert rotated_account.access_key not in (None, K1)
    assert (await api("rotate_account_key", uid, access_key=K2)).access_key == K2
    assert (await api("reveal_account_key", uid)).access_key == K2
    assert [a.uid for a in (await api("list_accounts", limit=1000)).items].count(uid) == 1
    assert uid in [a.uid for a in await api.collect("iter_accounts", page_size=1)]

    # Products.
    pid = fresh_pid()
    product = await api("create_product", pid=pid, access_key=K1, name="meters")
    assert isinstance(product, Product)
    assert (product.pid, product.access_key, product.name) == (pid, K1, "meters")
    assert (await api("get_product", pid)).device_count == 0
    assert (await api("rotate_product_key", pid, access_key=K2)).access_key == K2
    generated = (await api("rotate_product_key", pid)).access_key
    assert generated not in (None, K2)
    assert (await api("get_product", pid)).access_key is None  # only a reveal shows it
    revealed = await api("reveal_product_key", pid)
    assert revealed.access_key == generated
    reveals = await api("list_audit", action="product.reveal_key")
    assert [e.target for e in reveals.items].count(f"product:{pid}") == 1
    assert (await api("set_product_account", pid, uid)).account_uid == uid
    assert (await api("clear_product_account", pid)).account_uid is None
    assert pid in [p.pid for p in (await api("list_products", limit=1000)).items]
    assert pid in [p.pid for p in await api.collect("iter_products", page_size=2)]

    # Devices.
    first = await api("create_device", pid, "a", generate_device_key=True, auth_info="imei-a")
    assert isinstance(first, Device)
    assert (first.pid, first.name, first.auth_info) == (pid, "a", "imei-a")
    assert first.device_key is not None
    rotated = await api("rotate_device_key", first.dev_id)
    assert rotated.device_key not in (None, first.device_key)
    assert (await api("rotate_device_key", first.dev_id, device_key=K1)).device_key == K1
    imported = await api(
        "import_devices", pid, [DeviceImportItem(name="b"), {"name": "c", "auth_info": "imei-c"}]
    )
    assert [d.name for d in imported] == ["b", "c"]
    assert imported[1].auth_info == "imei-c"
    page = await api("list_devices", pid=pid, name_contains="b")
    assert isinstance(page, DevicePage)
    assert [d.name for d in page.items] == ["b"]
    idle = await api.collect("iter_devices", pid=pid, state="idle", page_size=2)
    assert sorted(d.name for d in idle) == ["a", "b", "c"]
    assert (await api("list_devices", pid=pid, state="downloading")).items == []
    every = await api.collect("iter_devices", pid=pid, page_size=1)
    assert sorted(d.name for d in every) == ["a", "b", "c"]
    detail = await api("get_device", first.dev_id)
    assert isinstance(detail, DeviceDetail)
    assert detail.tasks == []

    # Packages: a path, bytes, chunks with their size, a file object.
    path = tmp_path / "fw-1.0.1.bin"
    path.write_bytes(FIRMWARE + pid.encode())
    package = await api("upload_package", path, pid=pid, module_type="fota", target="1.0.1")
    assert isinstance(package, Package)
    assert (package.file_name, package.size, package.module_type) == (
        "fw-1.0.1.bin",
        len(FIRMWARE) + len(pid),
        1,
    )
    from_bytes = await api(
        "upload_package", b"app", pid=pid, module_type=TaskType.SOTA, target="2.0",
        file_name="app.bin",
    )  # fmt: skip
    assert (from_bytes.module_type, from_bytes.size) == (2, 3)
    chunked = await api(
        "upload_package", iter([b"ab", b"cd"]), pid=pid, module_type="sota", target="2.1",
        kind="diff", from_version="2.0", file_name="delta.bin", size=4,
    )  # fmt: skip
    assert (chunked.kind, chunked.from_version, chunked.size) == (2, "2.0", 4)
    handle = io.BytesIO(b"xyz")
    handle.name = "/somewhere/named.bin"
    named = await api("upload_package", handle, pid=pid, module_type="sota", target="2.2")
    assert (named.file_name, named.size) == ("named.bin", 3)
    assert (await api("get_package", package.id)).md5 == package.md5
    copy = tmp_path / "copy.bin"
    assert await api("download_package", package.id, copy) == package.size
    assert copy.read_bytes() == path.read_bytes()
    into = io.BytesIO()
    assert await api("download_package", from_bytes.id, into) == 3
    assert into.getvalue() == b"app"
    fota = await api("list_packages", pid=pid, module_type="fota")
    assert [p.id for p in fota.items] == [package.id]
    assert len(await api.collect("iter_packages", pid=pid, page_size=1)) == 4
    for extra in (from_bytes, chunked, named):
        assert await api("delete_package", extra.id) is None

    # Tasks.
    task = await api("create_task", package.id, dev_ids=[first.dev_id, imported[0].dev_id])
    assert isinstance(task, TaskCreated)
    assert (task.total, task.skipped, task.cancelled) == (2, [], [])
    assert [t.id for t in (await api("list_tasks", pid=pid)).items] == [task.id]
    assert [t.id for t in await api.collect("iter_tasks", pid=pid, status="active")] == [task.id]
    shown = await api("get_task", task.id, limit=1)
    assert isinstance(shown, TaskDetail)
    assert len(shown.devices) == 1
    assert shown.devices_next is not None
    assert len((await api("list_task_devices", task.id)).items) == 2
    waiting = await api.collect("iter_task_devices", task.id, state="to_be_upgraded", page_size=1)
    assert sorted(v.dev_id for v in waiting) == sorted([first.dev_id, imported[0].dev_id])
    assert (await api("pause_device_task", task.id, first.dev_id)).state == "paused"
    assert (await api("resume_device_task", task.id, first.dev_id)).state == "to_be_upgraded"
    paused = await api("pause_task", task.id)
    assert isinstance(paused, TaskActionResult)
    assert (paused.status, paused.changed) == ("paused", 2)
    resumed = await api("resume_task", task.id)
    assert (resumed.status, resumed.changed) == ("active", 2)
    view = await api("act_on_device_task", task.id, first.dev_id, "pause")
    assert view.state == "paused"
    assert (await api("cancel_device_task", task.id, first.dev_id)).state == "cancelled"
    assert (await api("act_on_task", task.id, "pause")).changed == 1
    cancelled = await api("cancel_task", task.id)
    assert (cancelled.status, cancelled.changed) == ("cancelled", 1)
    history = await api("get_device", first.dev_id)
    assert [(h.task_id, h.state) for h in history.tasks] == [(task.id, "cancelled")]

    # The escape hatch: any route, the JSON as it came.
    assert (await api("request", "GET", f"/products/{pid}"))["pid"] == pid
    assert await api("request", "GET", "/products", params={"limit": 1, "after": None})

    # Tear down, in the order the server allows.
    assert await api("delete_task", task.id) is None
    assert await api("delete_package", package.id) is None
    for device in (first, *imported):
        assert await api("delete_device", device.dev_id) is None
    assert await api("delete_product", pid) is None
    assert await api("delete_account", uid) is None

    # Tokens, the audit log, labels, timelines and campaigns: test_client_operations.py.
    cls = AsyncManagementClient if api.is_async else ManagementClient
    assert public_methods(cls) - {"close", "aclose"} - AREAS <= api.used
    assert public_methods(cls) >= AREAS


async def test_pagination_follows_the_cursor_across_pages(api: Driver) -> None:
    pid = fresh_pid()
    await api("create_product", pid=pid)
    created = await api("import_devices", pid, [{"name": f"d{i}"} for i in range(5)])
    first = await api("list_devices", pid=pid, limit=2)
    assert len(first.items) == 2
    assert first.next is not None
    second = await api("list_devices", pid=pid, limit=2, after=first.next)
    assert {d.dev_id for d in second.items}.isdisjoint(d.dev_id for d in first.items)
    # Five devices in pages of two: three pages, each device once, in the server's order.
    every = await api.collect("iter_devices", pid=pid, page_size=2)
    assert [d.dev_id for d in every] == sorted(d.dev_id for d in created)


async def test_errors_are_mapped_to_the_tree(api: Driver, server: str) -> None:
    pid = fresh_pid()
    await api("create_product", pid=pid, access_key=K1)

    with pytest.raises(NotFound) as missing:
        await api("get_product", fresh_pid())
    assert (missing.value.status, missing.value.code) == (404, "not_found")

    with pytest.raises(Conflict) as duplicate:
        await api("create_product", pid=pid)
    assert (duplicate.value.status, duplicate.value.code) == (409, "conflict")
    assert str(duplicate.value) == f"product {pid} already exists"

    with pytest.raises(Invalid) as invalid:
        await api("create_account", uid="0123")
    assert (invalid.value.status, invalid.value.code) == (422, "invalid")
    assert invalid.value.details[0]["field"] == "uid"

    with pytest.raises(PayloadTooLarge) as large:
        await api(
            "upload_package", b"x" * (MAX_UPLOAD + 1), pid=pid, module_type="fota",
            target="1.0.1", file_name="big.bin",
        )  # fmt: skip
    assert large.value.status == 413

    with pytest.raises(NotFound):
        await api("download_package", 2**31 - 1, io.BytesIO())

    with pytest.raises(BadRequest) as malformed:
        await api(
            "request",
            "POST",
            "/products",
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
    assert (malformed.value.status, malformed.value.code) == (400, "bad_request")


async def test_a_download_is_the_file_with_its_digest(api: Driver, server: str) -> None:
    pid = fresh_pid()
    await api("create_product", pid=pid)
    package = await api(
        "upload_package", FIRMWARE, pid=pid, module_type="fota", target="1.0.1",
        file_name="fw.bin",
    )  # fmt: skip
    reply = httpx2.get(
        f"{server}/api/v1/packages/{package.id}/file", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert reply.status_code == 200
    assert reply.content == FIRMWARE
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Disposition"] == 'attachment; filename="fw.bin"'
    assert reply.headers["ETag"] == f'"{package.sha256}"'
    assert reply.headers["ETag"] == f'"{hashlib.sha256(FIRMWARE).hexdigest()}"'


def _lose(data_dir: Path, sha256: str) -> None:
    (stored,) = data_dir.rglob(sha256)
    stored.unlink()


def _files(directory: Path) -> list[Path]:
    return list(directory.iterdir())


async def test_a_lost_package_file_fails_and_leaves_no_file(
    api: Driver, data_dir: Path, tmp_path: Path
) -> None:
    pid = fresh_pid()
    await api("create_product", pid=pid)
    package = await api(
        "upload_package", FIRMWARE + b"lost", pid=pid, module_type="fota", target="1.0.1",
        file_name="fw.bin",
    )  # fmt: skip
    _lose(data_dir, package.sha256)
    destination = tmp_path / "fw.bin"
    with pytest.raises(ServerError) as failed:
        await api("download_package", package.id, destination)
    assert (failed.value.status, failed.value.code) == (500, "internal")
    assert _files(tmp_path) == []  # neither the file nor a partial one


async def test_a_wrong_token_is_unauthorized(flavour: str, server: str) -> None:
    api = make_client(flavour, server, token="wrong-token")
    try:
        with pytest.raises(Unauthorized) as refused:
            await api("list_products")
        assert refused.value.status == 401
        assert (await api("health")).status == "ok"  # public
    finally:
        await api.close()


async def test_a_server_that_is_not_onenet_ota_is_a_protocol_error(
    flavour: str, server: str
) -> None:
    # The device API answers /elsewhere/api/v1/... with an empty 404: no JSON error body.
    api = make_client(flavour, server + "/elsewhere")
    try:
        with pytest.raises(ProtocolError, match="is this an onenet-ota server") as odd:
            await api("list_products")
        assert odd.value.status == 404
    finally:
        await api.close()


async def test_an_unreachable_server_is_a_transport_error(flavour: str) -> None:
    api = make_client(flavour, "http://127.0.0.1:9")
    try:
        with pytest.raises(TransportError, match=r"cannot reach http://127\.0\.0\.1:9"):
            await api("health")
    finally:
        await api.close()


def test_every_error_is_a_management_error() -> None:
    for cls in (NotFound, Conflict, Invalid, PayloadTooLarge, BadRequest, Busy, Unauthorized):
        assert issubclass(cls, ManagementError)
    assert issubclass(ProtocolError, ManagementError)
    assert issubclass(TransportError, ManagementError)


# -- retrying a busy server (the only way to make the real server answer 503 is to break its
# database, so these drive the clients against a scripted transport) -------------------------


def _busy(retry_after: str | None = "2") -> httpx2.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": "unavailable", "message": "the database is busy; retry"}}
    return httpx2.Response(503, json=body, headers=headers)


class Scripted:
    """Clients of both flavours over a transport that answers from a list, and what they sent."""

    def __init__(self, flavour: str, replies: list[httpx2.Response]) -> None:
        self.seen: list[httpx2.Request] = []
        self.slept: list[float] = []

        def handle(request: httpx2.Request) -> httpx2.Response:
            request.read()
            self.seen.append(request)
            return replies.pop(0)

        transport = httpx2.MockTransport(handle)
        if flavour == "async":

            async def sleep(seconds: float) -> None:
                self.slept.append(seconds)

            self.driver = Driver(
                AsyncManagementClient(
                    "http://x", "t", client=httpx2.AsyncClient(transport=transport), sleep=sleep
                )
            )
        else:
            self.driver = Driver(
                ManagementClient(
                    "http://x", "t", client=httpx2.Client(transport=transport),
                    sleep=self.slept.append,
                )
            )  # fmt: skip


async def test_a_busy_server_is_asked_again_after_its_retry_after(flavour: str) -> None:
    product = {"pid": "1", "name": "", "created_at": 0}
    script = Scripted(flavour, [_busy("2"), _busy("nan"), httpx2.Response(200, json=product)])
    assert (await script.driver("get_product", "1")).pid == "1"
    assert script.slept == [2.0, 1.0]
    assert [r.url.path for r in script.seen] == ["/api/v1/products/1"] * 3


async def test_a_server_busy_every_time_ends_in_its_message(flavour: str) -> None:
    script = Scripted(flavour, [_busy("600") for _ in range(BUSY_ATTEMPTS)])
    with pytest.raises(Busy, match="database is busy") as failed:
        await script.driver("list_products")
    assert (failed.value.status, failed.value.code) == (503, "unavailable")
    assert len(script.seen) == BUSY_ATTEMPTS
    assert script.slept == [10.0] * (BUSY_ATTEMPTS - 1)  # capped


async def test_a_create_is_not_sent_twice(flavour: str) -> None:
    # Its 503 may stand for a commit whose outcome the server could not learn.
    script = Scripted(flavour, [_busy()])
    with pytest.raises(Busy, match="database is busy"):
        await script.driver("create_task", 1, dev_ids=[1])
    assert len(script.seen) == 1
    assert script.slept == []


async def test_a_streamed_upload_is_not_sent_twice(flavour: str) -> None:
    script = Scripted(flavour, [_busy()])
    with pytest.raises(Busy):
        await script.driver(
            "request", "PUT", "/packages/1", content=iter([b"firmware"])
        )  # idempotent, yet a stream
    assert len(script.seen) == 1


async def test_a_download_is_retried_when_busy_and_checked(flavour: str) -> None:
    data = b"package bytes"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    script = Scripted(
        flavour, [_busy("1"), httpx2.Response(200, content=data, headers={"ETag": etag})]
    )
    sink = io.BytesIO()
    assert await script.driver("download_package", 7, sink) == len(data)
    assert sink.getvalue() == data
    assert script.slept == [1.0]
    assert [r.url.path for r in script.seen] == ["/api/v1/packages/7/file"] * 2


async def test_a_download_that_differs_from_its_etag_leaves_no_file(
    flavour: str, tmp_path: Path
) -> None:
    etag = f'"{hashlib.sha256(b"the real bytes").hexdigest()}"'
    script = Scripted(
        flavour, [httpx2.Response(200, content=b"other bytes", headers={"ETag": etag})]
    )
    with pytest.raises(ProtocolError, match="sha256"):
        await script.driver("download_package", 7, tmp_path / "fw.bin")
    assert _files(tmp_path) == []


async def test_the_token_goes_in_the_authorization_header(flavour: str) -> None:
    script = Scripted(flavour, [httpx2.Response(200, json={"status": "ok", "version": "x"})])
    await script.driver("health")
    assert script.seen[0].headers["Authorization"] == "Bearer t"
    await script.driver.close()


def test_an_operation_reads_as_a_method_of_both_clients() -> None:
    # On the class, an unbound method with ``self``; on a client, the core builder's parameters,
    # name and docstring; on the async client, a coroutine function.
    assert list(inspect.signature(ManagementClient.get_product).parameters) == ["self", "pid"]
    sync = ManagementClient("http://127.0.0.1:9")
    async_ = AsyncManagementClient("http://127.0.0.1:9")
    for method in (sync.set_device_labels, async_.set_device_labels):
        assert list(inspect.signature(method).parameters) == ["dev_id", "labels", "replace"]
        assert method.__name__ == "set_device_labels"
        assert method.__doc__ == ManagementCore.set_device_labels.__doc__
    # What help() and editors show is what the client returns, not the core's Call or Pages.
    assert inspect.signature(ManagementClient.get_product).return_annotation == "Product"
    assert inspect.signature(sync.iter_devices).return_annotation == "Iterator[Device]"
    assert inspect.signature(async_.iter_devices).return_annotation == "AsyncIterator[Device]"
    assert not inspect.iscoroutinefunction(sync.get_product)
    assert inspect.iscoroutinefunction(async_.get_product)
    with pytest.raises(TransportError):
        ManagementClient.health(sync)  # called on the class, as an unbound method
    sync.close()


def test_an_operation_under_another_name_is_refused() -> None:
    # Python before 3.12 wraps an error of __set_name__ in a RuntimeError.
    with pytest.raises((TypeError, RuntimeError)) as raised:

        class Renamed:
            fetch_product = _Operation(ManagementCore.get_product)

    error = raised.value.__cause__ or raised.value
    assert isinstance(error, TypeError)
    assert str(error) == "Renamed.fetch_product must be named get_product"

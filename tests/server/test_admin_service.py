"""server/admin_service.py on SQLite and PostgreSQL: the management rules, in SQL."""

from __future__ import annotations

import base64
import functools
import itertools
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine, Table, delete, event, func, insert, select, update
from sqlalchemy.exc import OperationalError

from onenet_ota.protocol import values
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import (
    OPEN_STATES,
    Action,
    IllegalTransition,
    TaskState,
    on_action,
)
from onenet_ota.protocol.status import ReportKind
from onenet_ota.server import changes as change_feed
from onenet_ota.server import schema
from onenet_ota.server.admin_service import (
    GENERATED_DEV_ID_MAX,
    AdminService,
    Conflict,
    DeviceCreate,
    DeviceImport,
    DeviceImportItem,
    DeviceKeyRotate,
    Invalid,
    KeyRotate,
    NotFound,
    PackageCreate,
    ProductCreate,
    TaskCreate,
)
from onenet_ota.server.blobs import BlobStore, StoredBlob
from onenet_ota.server.device_service import DeviceService, Report
from tests.server.races import Outcome, run_as_deadlock_victim, wait_until_blocked

NOW = 1_800_000_000
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[int]:
    return []


@pytest.fixture
def service(engine: Engine, tmp_path: Path, clock: Clock, changes: list[int]) -> AdminService:
    return AdminService(
        engine, BlobStore(tmp_path / "packages"), clock=clock, on_change=lambda: changes.append(1)
    )


def _product(service: AdminService, pid: str = "123123") -> str:
    return service.create_product(ProductCreate(pid=pid, access_key=K1)).pid


def _devices(service: AdminService, pid: str, *names: str) -> list[int]:
    created = service.import_devices(
        DeviceImport(pid=pid, devices=[DeviceImportItem(name=n) for n in names])
    )
    return [d.dev_id for d in created]


def _package(service: AdminService, pid: str, data: bytes = b"firmware", **meta: object) -> int:
    spec = PackageCreate.model_validate(
        {"pid": pid, "module_type": 1, "target": "1.0.1", "file_name": "fw.bin", **meta}
    )
    return service.create_package(spec, service.blobs.put_bytes(data)).id


def _device_with_package(service: AdminService) -> tuple[int, int]:
    """Product 123123 with one device ``d`` and one FOTA package: (dev_id, package id)."""
    _product(service)
    (dev,) = _devices(service, "123123", "d")
    return dev, _package(service, "123123")


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _set_state(
    engine: Engine, dev_id: int, state: TaskState, paused_from: int | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(schema.device_tasks)
            .where(schema.device_tasks.c.dev_id == dev_id)
            .values(state=int(state), paused_from=paused_from)
        )


# ------------------------------------------------------------------------------ products


def test_generated_product_has_decimal_pid_and_onenet_key(service: AdminService) -> None:
    product = service.create_product(ProductCreate())
    assert product.pid.isdigit()
    assert len(product.pid) == 9
    assert product.access_key is not None
    assert len(product.access_key) == 44
    assert len(base64.b64decode(product.access_key, validate=True)) == 32


def test_product_with_operator_ids_keeps_them(service: AdminService) -> None:
    product = service.create_product(ProductCreate(pid="123123", access_key=K1, name="fleet"))
    shown = service.get_product("123123")
    assert (shown.pid, shown.access_key, shown.name) == ("123123", None, "fleet")
    assert service.reveal_product_key("123123").access_key == K1
    assert product.created_at == NOW


def test_duplicate_product_is_a_conflict_and_no_second_row(
    service: AdminService, engine: Engine
) -> None:
    _product(service)
    with pytest.raises(Conflict):
        service.create_product(ProductCreate(pid="123123"))
    assert _count(engine, schema.products) == 1


@given(pid=st.text(max_size=40))
@settings(max_examples=60, deadline=None)
def test_pid_grammar(pid: str) -> None:
    valid = values.PID_RE.fullmatch(pid) is not None
    try:
        ProductCreate(pid=pid)
    except ValidationError:
        assert not valid
    else:
        assert valid


@given(key=st.one_of(st.text(max_size=60), st.binary(min_size=0, max_size=40).map(
    lambda b: base64.b64encode(b).decode())))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_access_key_must_be_nonempty_base64(key: str) -> None:
    try:
        decoded = base64.b64decode(key, validate=True)
        valid = bool(decoded) and len(key) <= 128
    except ValueError:
        valid = False
    try:
        ProductCreate(access_key=key)
    except ValidationError:
        assert not valid
    else:
        assert valid


def test_rotate_key(service: AdminService, changes: list[int]) -> None:
    _product(service)
    rotated = service.rotate_product_key("123123", KeyRotate())
    assert rotated.access_key != K1
    assert rotated.access_key is not None
    assert service.reveal_product_key("123123").access_key == rotated.access_key
    given_key = base64.b64encode(bytes(range(32))).decode()
    assert service.rotate_product_key("123123", KeyRotate(access_key=given_key)).access_key == (
        given_key
    )
    assert changes  # the device API's caches are told
    with pytest.raises(NotFound):
        service.rotate_product_key("999", KeyRotate())


def test_rotate_device_key(service: AdminService, changes: list[int], engine: Engine) -> None:
    _product(service)
    device = service.create_device(DeviceCreate(pid="123123", name="d", device_key=K1))
    other = service.create_device(DeviceCreate(pid="123123", name="e"))
    published = _feed(engine)
    assert published[-2:] == [device.dev_id, other.dev_id]  # creations are published too
    rotated = service.rotate_device_key(device.dev_id, DeviceKeyRotate())
    assert rotated.device_key not in (None, K1)
    assert rotated.model_copy(update={"device_key": None}) == device.model_copy(
        update={"device_key": None}
    )
    assert service.get_device(device.dev_id).device_key == rotated.device_key
    given_key = base64.b64encode(bytes(range(32))).decode()
    again = service.rotate_device_key(device.dev_id, DeviceKeyRotate(device_key=given_key))
    assert again.device_key == given_key
    assert service.get_device(other.dev_id).device_key is None  # only that device
    assert _feed(engine)[len(published) :] == [device.dev_id, device.dev_id]
    assert changes  # this process's device API is told at once
    with pytest.raises(NotFound):
        service.rotate_device_key(999, DeviceKeyRotate())
    with pytest.raises(ValidationError):
        DeviceKeyRotate(device_key="not base64!")


def test_product_pages_cover_everything_once(service: AdminService) -> None:
    for pid in ("5", "1", "4", "2", "3"):
        _product(service, pid)
    seen: list[str] = []
    after = None
    while True:
        page = service.list_products(limit=2, after=after)
        seen += [p.pid for p in page.items]
        assert all(p.access_key is None for p in page.items)  # lists carry no keys
        if page.next is None:
            break
        after = page.next
    assert seen == ["1", "2", "3", "4", "5"]


def test_bad_limit_is_invalid(service: AdminService) -> None:
    with pytest.raises(Invalid):
        service.list_products(limit=0)
    with pytest.raises(Invalid):
        service.list_devices(after="x")


# ------------------------------------------------------------------------------ devices


def test_device_with_given_dev_id_and_defaults(service: AdminService) -> None:
    _product(service)
    device = service.create_device(DeviceCreate(pid="123123", name="dev01", dev_id=987654321))
    assert (device.dev_id, device.auth_info, device.device_key) == (987654321, "dev01", None)


def test_generated_dev_id_and_device_key(service: AdminService) -> None:
    _product(service)
    device = service.create_device(
        DeviceCreate(pid="123123", name="dev01", generate_device_key=True)
    )
    assert 1 <= device.dev_id <= GENERATED_DEV_ID_MAX
    assert device.device_key is not None
    assert len(base64.b64decode(device.device_key)) == 32


def test_device_in_unknown_product_is_invalid(service: AdminService) -> None:
    with pytest.raises(Invalid, match="does not exist"):
        service.create_device(DeviceCreate(pid="404", name="dev01"))


def test_duplicate_names_and_dev_ids_conflict(service: AdminService, engine: Engine) -> None:
    _product(service)
    _product(service, "777")
    service.create_device(DeviceCreate(pid="123123", name="dev01", dev_id=5))
    with pytest.raises(Conflict, match="dev01"):
        service.create_device(DeviceCreate(pid="123123", name="dev01"))
    with pytest.raises(Conflict, match="5"):  # dev_ids are unique across the server (§1)
        service.create_device(DeviceCreate(pid="777", name="other", dev_id=5))
    service.create_device(DeviceCreate(pid="777", name="dev01"))  # names are per product
    assert _count(engine, schema.devices) == 2


@given(name=st.text(max_size=70))
@settings(max_examples=60, deadline=None)
def test_device_name_grammar(name: str) -> None:
    valid = values.DEVICE_NAME_RE.fullmatch(name) is not None
    try:
        DeviceCreate(pid="1", name=name)
    except ValidationError:
        assert not valid
    else:
        assert valid


def test_dev_id_range_and_strict_types() -> None:
    for bad in (0, -1, 2**63, True):
        with pytest.raises(ValidationError):
            DeviceCreate.model_validate({"pid": "1", "name": "d", "dev_id": bad})
    assert DeviceCreate(pid="1", name="d", dev_id=2**63 - 1).dev_id == 2**63 - 1


def test_import_is_all_or_nothing(service: AdminService, engine: Engine) -> None:
    _product(service)
    service.create_device(DeviceCreate(pid="123123", name="taken"))
    with pytest.raises(Conflict, match="taken"):
        _devices(service, "123123", "a", "b", "taken")
    assert _count(engine, schema.devices) == 1
    with pytest.raises(Invalid, match="repeated"):
        _devices(service, "123123", "c", "c")
    with pytest.raises(Invalid, match="repeated"):
        service.import_devices(
            DeviceImport(
                pid="123123",
                devices=[
                    DeviceImportItem(name="x", dev_id=9),
                    DeviceImportItem(name="y", dev_id=9),
                ],
            )
        )
    assert _count(engine, schema.devices) == 1


def test_large_import_spans_batches(service: AdminService, engine: Engine) -> None:
    _product(service)
    ids = _devices(service, "123123", *(f"d{i}" for i in range(620)))
    assert len(set(ids)) == 620
    assert _count(engine, schema.devices) == 620


def test_list_devices_filters(service: AdminService, engine: Engine) -> None:
    _product(service)
    _product(service, "9")
    a, b, _ = _devices(service, "123123", "alpha", "beta_1", "betaX1")
    _devices(service, "9", "alpha")
    with engine.begin() as conn:
        conn.execute(
            update(schema.devices).where(schema.devices.c.dev_id == a).values(f_version="1.0")
        )
    assert [d.dev_id for d in service.list_devices(f_version="1.0").items] == [a]
    assert len(service.list_devices(pid="123123").items) == 3
    # LIKE wildcards in the filter are literal characters
    assert service.list_devices(name_contains="%").items == []
    assert [d.dev_id for d in service.list_devices(name_contains="a_1").items] == [b]
    assert len(service.list_devices(name_contains="alpha").items) == 2


def _all_pages(list_page: Callable[..., Any]) -> list[Any]:
    """Every item of a listing, two per page, following the cursors to the end."""
    items: list[Any] = []
    after = None
    for _ in range(100):  # a bound for a cursor that never ends
        page = list_page(limit=2, after=after)
        assert len(page.items) <= 2
        items += page.items
        if page.next is None:
            return items
        after = page.next
    pytest.fail("the pages never ended")


def test_every_listing_pages_through_everything_once_in_order(
    service: AdminService, engine: Engine
) -> None:
    _product(service)
    devs = _devices(service, "123123", "a", "b", "c", "d", "e")
    packages = [_package(service, "123123", data=bytes([n]) * 8, target=f"{n}") for n in range(5)]
    task_ids = [
        service.create_task(TaskCreate(package_id=packages[n], dev_ids=[devs[n]])).task.id
        for n in range(3)
    ]
    many = service.create_task(TaskCreate(package_id=packages[3], dev_ids=devs[3:])).task.id
    many_devices = functools.partial(service.list_task_devices, many)
    assert [d.dev_id for d in _all_pages(service.list_devices)] == sorted(devs)
    assert [p.id for p in _all_pages(service.list_packages)] == packages
    assert [t.id for t in _all_pages(service.list_tasks)] == [*task_ids, many]
    assert [v.dev_id for v in _all_pages(many_devices)] == sorted(devs[3:])


def test_listing_filters(service: AdminService, engine: Engine) -> None:
    _product(service)
    a, b = _devices(service, "123123", "a", "b")
    with engine.begin() as conn:
        conn.execute(
            update(schema.devices).where(schema.devices.c.dev_id == b).values(s_version="2.0")
        )
    assert [d.dev_id for d in service.list_devices(s_version="2.0").items] == [b]
    first, second = _package(service, "123123", data=b"1"), _package(service, "123123", data=b"2")
    t1 = service.create_task(TaskCreate(package_id=first, dev_ids=[a])).task.id
    service.act_on_task(t1, Action.CANCEL)
    t2 = service.create_task(TaskCreate(package_id=second, dev_ids=[a, b])).task.id
    assert [t.id for t in service.list_tasks(package_id=first).items] == [t1]
    assert [t.id for t in service.list_tasks(status="cancelled").items] == [t1]
    assert [t.id for t in service.list_tasks(status="active").items] == [t2]
    with pytest.raises(Invalid, match="status must be"):
        service.list_tasks(status="done")
    _set_state(engine, b, TaskState.DOWNLOADING)
    assert [v.dev_id for v in service.list_task_devices(t2, state="downloading").items] == [b]
    with pytest.raises(Invalid, match="state must be one of"):
        service.list_task_devices(t2, state="finished")


def test_device_detail_has_task_history(service: AdminService) -> None:
    _product(service)
    (dev,) = _devices(service, "123123", "dev01")
    package_id = _package(service, "123123")
    first = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    service.act_on_task(first.id, Action.CANCEL)
    second = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    detail = service.get_device(dev)
    assert [(t.task_id, t.state) for t in detail.tasks] == [
        (second.id, "to_be_upgraded"),
        (first.id, "cancelled"),
    ]
    with pytest.raises(NotFound):
        service.get_device(1)


# ------------------------------------------------------------------------------ packages


def test_package_is_measured_by_the_server(service: AdminService) -> None:
    _product(service)
    package_id = _package(service, "123123", b"abc")
    package = service.get_package(package_id)
    assert package.size == 3
    assert package.md5 == "900150983cd24fb0d6963f7d28e17f72"
    assert service.blobs.exists(package.sha256)


@pytest.mark.parametrize(
    "meta",
    [
        {"kind": 2},  # differential without from_version
        {"kind": 1, "from_version": "1.0.0"},
        {"target": "1.0.0 beta"},
        {"module_type": 3},
        {"manuf": "00 1"},
        {"file_name": 'a"b.bin'},
        {"file_name": "a\\b.bin"},
        {"file_name": "a\r\nX-Injected: 1"},
        {"file_name": "fïrmware.bin"},
        {"file_name": "../../etc/passwd"},
        {"file_name": ".."},
        {"file_name": "x" * 65},
        {"file_name": ""},
    ],
)
def test_bad_package_metadata_is_refused(meta: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PackageCreate.model_validate(
            {"pid": "1", "module_type": 1, "target": "1.0.1", "file_name": "fw.bin", **meta}
        )


def test_empty_or_orphan_upload_leaves_nothing(service: AdminService, engine: Engine) -> None:
    _product(service)
    spec = PackageCreate(pid="123123", module_type=1, target="1", file_name="f")
    empty = service.blobs.put_bytes(b"")
    with pytest.raises(Invalid, match="empty"):
        service.create_package(spec, empty)
    assert not service.blobs.exists(empty.sha256)
    orphan = service.blobs.put_bytes(b"data")
    with pytest.raises(Invalid, match="does not exist"):
        service.create_package(spec.model_copy(update={"pid": "404"}), orphan)
    assert not service.blobs.exists(orphan.sha256)
    assert _count(engine, schema.packages) == 0


def _upload_the_database_fails_to_record(
    service: AdminService, monkeypatch: pytest.MonkeyPatch
) -> tuple[PackageCreate, StoredBlob]:
    """A stored upload whose recording will fail as if the database connection broke."""
    _product(service)

    def database_down(*_args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(service, "_record_package", database_down)
    spec = PackageCreate(pid="123123", module_type=1, target="1", file_name="f")
    return spec, service.blobs.put_bytes(b"data")


def test_an_upload_the_database_failed_to_record_leaves_no_file(
    service: AdminService, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, blob = _upload_the_database_fails_to_record(service, monkeypatch)
    with pytest.raises(OperationalError):
        service.create_package(spec, blob)
    assert not service.blobs.exists(blob.sha256)
    assert _count(engine, schema.packages) == 0


def test_when_the_cleanup_fails_too_the_original_error_is_raised(
    service: AdminService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec, blob = _upload_the_database_fails_to_record(service, monkeypatch)

    def pool_exhausted(*_args: object) -> None:
        raise TimeoutError("QueuePool limit reached")

    monkeypatch.setattr(service, "discard_blob_if_unused", pool_exhausted)
    with pytest.raises(OperationalError):  # a 503 for the API, not the cleanup's 500
        service.create_package(spec, blob)
    assert service.blobs.exists(blob.sha256)  # orphaned, and reused by the next upload
    assert f"cannot remove the unrecorded upload {blob.sha256}" in caplog.text


def test_delete_package_keeps_shared_files(service: AdminService) -> None:
    _product(service)
    first = _package(service, "123123", b"same")
    second = _package(service, "123123", b"same", target="2")
    sha = service.get_package(first).sha256
    service.delete_package(first)
    assert service.blobs.exists(sha)  # the second package still uses it
    service.delete_package(second)
    assert not service.blobs.exists(sha)
    with pytest.raises(NotFound):
        service.get_package(second)
    with pytest.raises(NotFound):
        service.delete_package(second)
    assert list((service.blobs.root / "tmp").iterdir()) == []


# A package delete killed at a step: the child process deletes package 1 and SIGKILLs itself just
# before, or just after, the first file-system call that takes the package's file from its place.
_DELETE_AND_DIE = """
import os, signal, sys
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine

url, root, sha256, when, package_id = sys.argv[1:]
blobs = BlobStore(root)
target = str(blobs.path(sha256))

def dying(real):
    def call(path, *args, **kwargs):
        if os.fspath(path) != target:
            return real(path, *args, **kwargs)
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return call

os.replace = dying(os.replace)
os.rename = dying(os.rename)
os.unlink = dying(os.unlink)
os.remove = dying(os.remove)
AdminService(create_engine(url), blobs).delete_package(int(package_id))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_package_delete_killed_at_any_step_never_leaves_a_row_without_its_file(
    service: AdminService, db_url: str, when: str
) -> None:
    # Devices are offered the tasks of every package row and download its file: a row whose file
    # is gone answers byte 1 forever. A file without a row is harmless (the start-up sweep
    # removes it), so the row must go first.
    _product(service)
    package_id = _package(service, "123123", b"firmware to delete")
    sha = service.get_package(package_id).sha256
    child = subprocess.run(
        [sys.executable, "-c", _DELETE_AND_DIE, db_url, str(service.blobs.root), sha, when,
         str(package_id)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    with service.engine.connect() as conn:
        rows = conn.execute(select(schema.packages.c.sha256)).scalars().all()
    for digest in rows:
        assert service.blobs.exists(digest), "a package row whose file is gone"
    # What the crash left behind, the start-up sweep clears: no file without a row stays.
    service.sweep_storage(stale_after=0)
    stored = [p.name for p in service.blobs.root.glob("??/*")]
    assert sorted(stored) == sorted(set(rows))
    assert list((service.blobs.root / "tmp").iterdir()) == []


def test_package_delete_commits_before_it_removes_the_file(
    service: AdminService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The removal after the commit may fail; the package is deleted all the same, and the file
    # waits for the sweep.
    _product(service)
    package_id = _package(service, "123123")
    sha = service.get_package(package_id).sha256

    def fail(_sha256: str) -> None:
        raise OSError("disk trouble")

    monkeypatch.setattr(service.blobs, "delete", fail)
    service.delete_package(package_id)
    with pytest.raises(NotFound):
        service.get_package(package_id)
    assert service.blobs.exists(sha)
    monkeypatch.undo()
    assert service.sweep_storage(stale_after=0) == (0, 1)
    assert not service.blobs.exists(sha)


def test_package_in_use_cannot_be_deleted(service: AdminService) -> None:
    dev, package_id = _device_with_package(service)
    service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev]))
    with pytest.raises(Conflict, match="used by 1 task"):
        service.delete_package(package_id)
    assert service.blobs.exists(service.get_package(package_id).sha256)


# ------------------------------------------------------------------------------ tasks


def test_task_for_explicit_devices(service: AdminService, changes: list[int]) -> None:
    _product(service)
    devs = _devices(service, "123123", "a", "b")
    package_id = _package(service, "123123")
    created = service.create_task(
        TaskCreate(package_id=package_id, dev_ids=devs, retry=3, interval=1)
    )
    task = created.task
    assert (task.total, task.counts.to_be_upgraded, task.status) == (2, 2, "active")
    assert (task.retry, task.interval, task.start_time, task.target) == (3, 1, NOW, "1.0.1")
    assert sorted(created.dev_ids) == sorted(devs)
    assert changes


def test_task_targets_must_belong_to_the_product(service: AdminService, engine: Engine) -> None:
    _product(service)
    _product(service, "9")
    (foreign,) = _devices(service, "9", "x")
    package_id = _package(service, "123123")
    with pytest.raises(Invalid, match=str(foreign)):
        service.create_task(TaskCreate(package_id=package_id, dev_ids=[foreign]))
    with pytest.raises(Invalid, match="package 99"):
        service.create_task(TaskCreate(package_id=99, dev_ids=[foreign]))
    assert _count(engine, schema.tasks) == 0


def test_task_by_from_version_uses_the_package_type(service: AdminService, engine: Engine) -> None:
    _product(service)
    a, b, c = _devices(service, "123123", "a", "b", "c")
    with engine.begin() as conn:
        for dev, f, s in ((a, "1.0", "9"), (b, "9", "1.0"), (c, "1.1", "1.1")):
            conn.execute(
                update(schema.devices)
                .where(schema.devices.c.dev_id == dev)
                .values(f_version=f, s_version=s)
            )
    fota = _package(service, "123123", b"f")
    sota = _package(service, "123123", b"s", module_type=2)
    assert service.create_task(TaskCreate(package_id=fota, from_versions=["1.0"])).dev_ids == [a]
    created = service.create_task(TaskCreate(package_id=sota, from_versions=["1.0", "1.1"]))
    assert sorted(created.dev_ids) == sorted([b, c])
    with pytest.raises(Invalid, match="no device"):
        service.create_task(TaskCreate(package_id=fota, from_versions=["7"]))


def test_task_needs_exactly_one_target_kind() -> None:
    with pytest.raises(ValidationError):
        TaskCreate(package_id=1)
    with pytest.raises(ValidationError):
        TaskCreate(package_id=1, dev_ids=[1], from_versions=["1"])
    with pytest.raises(ValidationError):
        TaskCreate.model_validate({"package_id": 1, "dev_ids": [1], "retry": 2**31})


def test_deadline_must_lie_ahead(service: AdminService) -> None:
    _product(service)
    (dev,) = _devices(service, "123123", "a")
    package_id = _package(service, "123123")
    with pytest.raises(Invalid, match="deadline"):
        service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW))
    with pytest.raises(Invalid, match="deadline"):
        service.create_task(
            TaskCreate(
                package_id=package_id, dev_ids=[dev], start_time=NOW + 100, deadline=NOW + 50
            )
        )


def test_one_open_task_per_device_and_type(service: AdminService, engine: Engine) -> None:
    _product(service)
    a, b = _devices(service, "123123", "a", "b")
    package_id = _package(service, "123123")
    first = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a])).task
    with pytest.raises(Conflict, match=str(a)):
        service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, b]))
    assert _count(engine, schema.device_tasks) == 1

    skipped = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, b], on_open="skip"))
    assert (skipped.dev_ids, skipped.task.skipped) == ([b], [a])

    replaced = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a], on_open="cancel"))
    assert replaced.task.cancelled == [a]
    old = service.get_task(first.id)
    assert old.counts.cancelled == 1
    assert old.devices[0].finished_at == NOW

    # Another type is another channel (D23 is per type).
    sota = _package(service, "123123", b"s", module_type=2)
    service.create_task(TaskCreate(package_id=sota, dev_ids=[a]))


def test_expired_open_task_does_not_block_a_new_one(service: AdminService, clock: Clock) -> None:
    _product(service)
    (dev,) = _devices(service, "123123", "a")
    package_id = _package(service, "123123")
    first = service.create_task(
        TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW + 10)
    ).task
    clock.now += 11
    service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev]))
    assert service.get_task(first.id).counts.failed == 1  # T5 applied first


def test_pause_resume_cancel_follow_the_state_table(service: AdminService, engine: Engine) -> None:
    _product(service)
    waiting, downloading, upgrading = _devices(service, "123123", "w", "d", "u")
    package_id = _package(service, "123123")
    task = service.create_task(
        TaskCreate(package_id=package_id, dev_ids=[waiting, downloading, upgrading])
    ).task
    _set_state(engine, downloading, TaskState.DOWNLOADING)
    _set_state(engine, upgrading, TaskState.UPGRADING)

    paused = service.act_on_task(task.id, Action.PAUSE)
    assert (paused.status, paused.changed, paused.counts.paused, paused.counts.upgrading) == (
        "paused", 2, 2, 1,
    )  # fmt: skip
    states = {d.dev_id: (d.state, d.paused_from) for d in service.get_task(task.id).devices}
    assert states[downloading] == ("paused", "downloading")
    with pytest.raises(Conflict, match="paused"):
        service.act_on_task(task.id, Action.PAUSE)

    resumed = service.act_on_task(task.id, Action.RESUME)
    assert resumed.status == "active"
    assert resumed.changed == 2
    states = {d.dev_id: (d.state, d.paused_from) for d in service.get_task(task.id).devices}
    assert states == {
        waiting: ("to_be_upgraded", None),
        downloading: ("downloading", None),
        upgrading: ("upgrading", None),
    }

    cancelled = service.act_on_task(task.id, Action.CANCEL)
    assert cancelled.counts.cancelled == 3
    assert cancelled.status == "cancelled"
    with pytest.raises(Conflict):
        service.act_on_task(task.id, Action.CANCEL)
    with pytest.raises(NotFound):
        service.act_on_task(999, Action.CANCEL)


def test_device_level_action_reports_illegal_transitions(
    service: AdminService, engine: Engine
) -> None:
    _product(service)
    (dev,) = _devices(service, "123123", "u")
    package_id = _package(service, "123123")
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    _set_state(engine, dev, TaskState.UPGRADING)
    with pytest.raises(Conflict, match="can't pause a task in state upgrading"):
        service.act_on_device_task(task.id, dev, Action.PAUSE)
    assert service.act_on_device_task(task.id, dev, Action.CANCEL).state == "cancelled"
    with pytest.raises(NotFound):
        service.act_on_device_task(task.id, dev + 1, Action.CANCEL)


def test_resume_after_the_deadline_fails_the_tasks(service: AdminService, clock: Clock) -> None:
    _product(service)
    (dev,) = _devices(service, "123123", "a")
    package_id = _package(service, "123123")
    task = service.create_task(
        TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW + 10)
    ).task
    service.act_on_task(task.id, Action.PAUSE)
    clock.now += 60
    result = service.act_on_task(task.id, Action.RESUME)
    assert result.counts.failed == 1
    assert result.changed == 0


_counter = itertools.count()
OPEN_OR_NOT = st.sampled_from(
    [
        (TaskState.TO_BE_UPGRADED, None),
        (TaskState.DOWNLOADING, None),
        (TaskState.UPGRADING, None),
        (TaskState.SUCCEEDED, None),
        (TaskState.FAILED, None),
        (TaskState.CANCELLED, None),
        (TaskState.PAUSED, TaskState.TO_BE_UPGRADED),
        (TaskState.PAUSED, TaskState.DOWNLOADING),
    ]
)


@given(
    rows=st.lists(OPEN_OR_NOT, min_size=1, max_size=6),
    action=st.sampled_from([Action.PAUSE, Action.RESUME, Action.CANCEL]),
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_bulk_actions_move_each_row_as_on_action_says(
    service: AdminService, engine: Engine, rows: list[tuple[TaskState, TaskState | None]],
    action: Action,
) -> None:  # fmt: skip
    pid = f"p{next(_counter)}"
    _product(service, pid)
    devs = _devices(service, pid, *(f"d{i}" for i in range(len(rows))))
    package_id = _package(service, pid, pid.encode())
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=devs)).task
    for dev, (state, paused_from) in zip(devs, rows, strict=True):
        _set_state(engine, dev, state, None if paused_from is None else int(paused_from))
    with engine.begin() as conn:  # make the task's own status admit the action
        status = "paused" if action is Action.RESUME else "active"
        conn.execute(update(schema.tasks).where(schema.tasks.c.id == task.id).values(status=status))
    result = service.act_on_task(task.id, action)
    after = {d.dev_id: d.state for d in service.get_task(task.id, limit=10).devices}
    expected_changes = 0
    for dev, (state, paused_from) in zip(devs, rows, strict=True):
        try:
            expected = on_action(state, action, paused_from=paused_from)
            expected_changes += 1
        except IllegalTransition:
            expected = state
        assert after[dev] == expected.name.lower()
    assert result.changed == expected_changes


# ------------------------------------------------------------------------------ deleting


def _counts(engine: Engine, queries: dict[str, Any]) -> dict[str, int]:
    """Each named COUNT query's result."""
    with engine.connect() as conn:
        return {name: int(conn.execute(query).scalar_one()) for name, query in queries.items()}


def _rows_of(table: Any, where: Any) -> Any:
    return select(func.count()).select_from(table).where(where)


def _history(where: Any) -> dict[str, Any]:
    """COUNTs of the device tasks matching ``where`` and of their download tokens."""
    dt, tok = schema.device_tasks, schema.tokens
    return {
        "device_tasks": _rows_of(dt, where),
        "tokens": _rows_of(tok.join(dt, dt.c.id == tok.c.device_task_id), where),
    }


def _dev_rows(engine: Engine, dev_id: int) -> dict[str, int]:
    """What the database holds of one device: its row, device tasks, tokens and feed rows."""
    devices, feed = schema.devices, schema.cache_changes
    return _counts(
        engine,
        {
            "devices": _rows_of(devices, devices.c.dev_id == dev_id),
            **_history(schema.device_tasks.c.dev_id == dev_id),
            "feed": _rows_of(feed, feed.c.dev_id == dev_id),
        },
    )


def _give_tokens(engine: Engine, dev_id: int, count: int = 2) -> None:
    """Download tokens for every device task of ``dev_id``, as E3 issues them (D13)."""
    dt = schema.device_tasks
    with engine.begin() as conn:
        ids = conn.execute(select(dt.c.id).where(dt.c.dev_id == dev_id)).scalars().all()
        for dt_id in ids:
            for i in range(count):
                conn.execute(
                    insert(schema.tokens).values(
                        token=f"ota_{dev_id % 10**8:08d}{dt_id:06d}{i:06d}",
                        device_task_id=dt_id,
                        issued_at=NOW,
                    )
                )


def test_delete_device_removes_its_history_and_tokens_only(
    service: AdminService, engine: Engine, changes: list[int]
) -> None:
    _product(service)
    gone, kept = _devices(service, "123123", "gone", "kept")
    package_id = _package(service, "123123")
    first = service.create_task(TaskCreate(package_id=package_id, dev_ids=[gone, kept])).task
    service.act_on_task(first.id, Action.CANCEL)
    second = service.create_task(TaskCreate(package_id=package_id, dev_ids=[gone, kept])).task
    _set_state(engine, gone, TaskState.SUCCEEDED)
    _set_state(engine, kept, TaskState.FAILED)
    _give_tokens(engine, gone)
    _give_tokens(engine, kept)
    assert _dev_rows(engine, gone)["tokens"] == 4
    changes.clear()

    service.delete_device(gone)

    # The feed names each device for its creation, and the deleted one for its deletion.
    assert _dev_rows(engine, gone) == {"devices": 0, "device_tasks": 0, "tokens": 0, "feed": 2}
    assert _dev_rows(engine, kept) == {"devices": 1, "device_tasks": 2, "tokens": 4, "feed": 1}
    assert changes == [1]  # this process's device API is told after the commit
    with pytest.raises(NotFound):
        service.get_device(gone)
    assert service.get_task(second.id).total == 1  # the task stays, with the other device
    with pytest.raises(NotFound, match=str(gone)):
        service.delete_device(gone)
    assert changes == [1]


@pytest.mark.parametrize("state", sorted(OPEN_STATES))
def test_device_with_an_open_task_cannot_be_deleted(
    service: AdminService, engine: Engine, changes: list[int], state: TaskState
) -> None:
    dev, package_id = _device_with_package(service)
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    paused_from = int(TaskState.DOWNLOADING) if state is TaskState.PAUSED else None
    _set_state(engine, dev, state, paused_from)
    _give_tokens(engine, dev)
    changes.clear()
    before = _dev_rows(engine, dev)

    with pytest.raises(Conflict) as refused:
        service.delete_device(dev)

    name = state.name.lower()
    assert refused.value.message == (
        f"device {dev} has an open task: task {task.id} ({name}); cancel it first"
    )
    assert refused.value.details == [{"task_id": task.id, "state": name}]
    assert _dev_rows(engine, dev) == before  # nothing deleted, nothing published
    assert changes == []
    service.act_on_task(task.id, Action.CANCEL)
    service.delete_device(dev)
    assert _dev_rows(engine, dev)["devices"] == 0


def test_an_open_task_past_its_deadline_does_not_block_the_delete(
    service: AdminService, engine: Engine, clock: Clock
) -> None:
    dev, package_id = _device_with_package(service)
    service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW + 10))
    with pytest.raises(Conflict):
        service.delete_device(dev)
    clock.now += 10  # T5: the deadline has passed, the task has failed
    service.delete_device(dev)
    assert _dev_rows(engine, dev)["device_tasks"] == 0


@given(
    rows=st.lists(
        st.tuples(st.sampled_from(list(TaskState)), st.sampled_from([1, 2])),
        min_size=0,
        max_size=4,
    )
)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_a_device_is_deleted_whole_exactly_when_no_task_is_open(
    service: AdminService, engine: Engine, rows: list[tuple[TaskState, int]]
) -> None:
    # Each row is one task of its own (module type 1 or 2), moved to an arbitrary state.
    pid = f"x{next(_counter)}"
    _product(service, pid)
    (dev,) = _devices(service, pid, "d")
    dt = schema.device_tasks
    for i, (state, module_type) in enumerate(rows):
        package_id = _package(service, pid, f"{pid}/{i}".encode(), module_type=module_type)
        task = service.create_task(
            TaskCreate(package_id=package_id, dev_ids=[dev], on_open="cancel")
        )
        paused_from = int(TaskState.TO_BE_UPGRADED) if state is TaskState.PAUSED else None
        with engine.begin() as conn:
            conn.execute(
                update(dt)
                .where(dt.c.task_id == task.task.id)
                .values(state=int(state), paused_from=paused_from)
            )
    with engine.connect() as conn:
        found = conn.execute(select(dt.c.state).where(dt.c.dev_id == dev)).scalars().all()
    states = [TaskState(s) for s in found]
    _give_tokens(engine, dev, 1)
    before = _dev_rows(engine, dev)
    if any(s.is_open for s in states):
        with pytest.raises(Conflict, match="cancel it first"):
            service.delete_device(dev)
        assert _dev_rows(engine, dev) == before
    else:
        service.delete_device(dev)
        assert _dev_rows(engine, dev) == {
            "devices": 0, "device_tasks": 0, "tokens": 0, "feed": before["feed"] + 1,
        }  # fmt: skip


def test_delete_product(service: AdminService, engine: Engine, changes: list[int]) -> None:
    _product(service)
    service.delete_product("123123")
    assert _count(engine, schema.products) == 0
    assert changes == [1]
    with engine.connect() as conn:  # every device API forgets the product's verified tokens
        feed = conn.execute(select(schema.cache_changes.c.dev_id)).scalars().all()
    assert feed == [None]
    with pytest.raises(NotFound, match="product 123123 not found"):
        service.delete_product("123123")
    with pytest.raises(NotFound):
        service.get_product("123123")


def test_product_in_use_cannot_be_deleted_and_the_message_says_by_what(
    service: AdminService, engine: Engine, changes: list[int]
) -> None:
    _product(service)
    a, b = _devices(service, "123123", "a", "b")
    changes.clear()
    with pytest.raises(Conflict) as refused:
        service.delete_product("123123")
    assert refused.value.message == "product 123123 still has 2 devices; delete them first"
    assert refused.value.details == [{"devices": 2, "packages": 0, "tasks": 0}]
    package_id = _package(service, "123123")
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a])).task
    with pytest.raises(Conflict, match="still has 2 devices, 1 package, 1 task;"):
        service.delete_product("123123")
    service.act_on_task(task.id, Action.CANCEL)
    service.delete_device(a)
    service.delete_device(b)
    # A task keeps its package, and the package its product, until the task is deleted.
    with pytest.raises(Conflict, match="still has 1 package, 1 task;"):
        service.delete_product("123123")
    with pytest.raises(Conflict, match=f"package {package_id} is used by 1 task"):
        service.delete_package(package_id)
    assert _count(engine, schema.products) == 1
    service.delete_task(task.id)
    service.delete_package(package_id)
    service.delete_product("123123")
    assert _count(engine, schema.products) == 0


# -- races with a request that opens a task for the device meanwhile


def test_a_task_opened_before_the_delete_commits_wins_with_409(
    service: AdminService, engine: Engine
) -> None:
    dev, package_id = _device_with_package(service)
    with engine.begin() as conn:  # create_task's writes, held uncommitted while the delete runs
        task_id = conn.execute(
            insert(schema.tasks)
            .values(pid="123123", package_id=package_id, module_type=1, start_time=NOW,
                    status="active", created_at=NOW)
            .returning(schema.tasks.c.id)
        ).scalar_one()  # fmt: skip
        conn.execute(
            insert(schema.device_tasks).values(
                task_id=task_id, dev_id=dev, module_type=1, state=1, updated_at=NOW
            )
        )
        deleting = Outcome(lambda: service.delete_device(dev)).start()
        wait_until_blocked(engine, deleting.thread)
    deleting.join()
    assert isinstance(deleting.error, Conflict)
    assert deleting.error.message == (
        f"device {dev} has an open task: task {task_id} (to_be_upgraded); cancel it first"
    )
    assert _dev_rows(engine, dev)["device_tasks"] == 1
    assert _dev_rows(engine, dev)["devices"] == 1


def test_a_task_opened_while_the_delete_runs_loses_without_leaving_a_row(
    service: AdminService, engine: Engine
) -> None:
    dev, package_id = _device_with_package(service)
    paused, release = threading.Event(), threading.Event()
    deleting: Outcome | None = None

    def pause_the_delete(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # Hold the delete's transaction right after it has locked (read) the device row.
        mine = deleting is not None and threading.get_ident() == deleting.ident
        if mine and "FROM devices" in statement and not paused.is_set():
            paused.set()
            release.wait(60)

    event.listen(engine, "after_cursor_execute", pause_the_delete)
    try:
        # Assigned before the thread starts: the listener finds the thread through it.
        deleting = Outcome(lambda: service.delete_device(dev))
        deleting.start()
        assert paused.wait(60)
        opening = Outcome(
            lambda: service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev]))
        ).start()
        wait_until_blocked(engine, opening.thread)
        release.set()
        deleting.join()
        opening.join()
    finally:
        release.set()
        event.remove(engine, "after_cursor_execute", pause_the_delete)
    assert deleting.error is None
    # PostgreSQL: the task's insert waited for the device row and then broke its foreign key.
    # SQLite: the task's transaction started after the delete's and found no device.
    if engine.dialect.name == "postgresql":
        assert isinstance(opening.error, Conflict), opening.error
        assert opening.error.message == "the package or a targeted device was deleted meanwhile"
    else:
        assert isinstance(opening.error, Invalid), opening.error
    assert _dev_rows(engine, dev)["devices"] == 0
    assert _count(engine, schema.device_tasks) == 0
    assert _count(engine, schema.tasks) == 0


@pytest.mark.parametrize(  # SQLite serialises write transactions: they cannot deadlock
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_deadlocked_delete_runs_again_and_succeeds(
    service: AdminService, engine: Engine, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="onenet_ota.server.admin_service")
    dev, package_id = _device_with_package(service)
    service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW + 10))
    clock.now += 10  # the delete's T5 step will lock the expired device task first
    # The delete holds the device task and wants the device row; the other session holds the
    # device row and wants the device task: a deadlock, which the delete loses and runs again.
    deleting, runs = run_as_deadlock_victim(
        engine,
        lambda: service.delete_device(dev),
        hold=select(schema.devices.c.dev_id)
        .where(schema.devices.c.dev_id == dev)
        .with_for_update(),
        collide=update(schema.device_tasks)
        .where(schema.device_tasks.c.dev_id == dev)
        .values(updated_at=NOW + 5),
        table="device_tasks",
    )
    assert deleting.error is None, deleting.error
    assert runs == 2
    rows = _dev_rows(engine, dev)
    assert (rows["devices"], rows["device_tasks"]) == (0, 0)
    assert "delete_device: transaction aborted by the database (40P01)" in caplog.text


def test_a_device_import_racing_its_products_delete_says_the_product_went(
    service: AdminService, engine: Engine
) -> None:
    _product(service)
    with engine.begin() as conn:  # delete_product's write, held uncommitted while the import runs
        conn.execute(delete(schema.products).where(schema.products.c.pid == "123123"))
        importing = Outcome(
            lambda: service.create_device(DeviceCreate(pid="123123", name="d"))
        ).start()
        wait_until_blocked(engine, importing.thread)
    importing.join()
    if engine.dialect.name == "postgresql":
        # The import saw the product, then its insert waited for the row and broke its key.
        assert isinstance(importing.error, Conflict), importing.error
        assert importing.error.message == "product 123123 was deleted meanwhile"
    else:  # the import's transaction began after the delete's commit
        assert isinstance(importing.error, Invalid), importing.error
    assert _count(engine, schema.devices) == 0


# ------------------------------------------------------------------------------ deleting tasks


def _task_rows(engine: Engine, task_id: int) -> dict[str, int]:
    """What the database holds of one task: its row, its device tasks and their tokens."""
    tasks = schema.tasks
    return _counts(
        engine,
        {
            "tasks": _rows_of(tasks, tasks.c.id == task_id),
            **_history(schema.device_tasks.c.task_id == task_id),
        },
    )


def _feed(engine: Engine) -> list[int | None]:
    """The change feed's device ids, oldest first (None: anything may have changed)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(schema.cache_changes.c.dev_id).order_by(schema.cache_changes.c.id)
        ).scalars()
        return list(rows)


def _set_task_state(
    engine: Engine, task_id: int, dev_id: int, state: TaskState, paused_from: int | None = None
) -> None:
    dt = schema.device_tasks
    with engine.begin() as conn:
        conn.execute(
            update(dt)
            .where(dt.c.task_id == task_id, dt.c.dev_id == dev_id)
            .values(state=int(state), paused_from=paused_from)
        )


def test_delete_task_removes_its_device_tasks_and_tokens_only(
    service: AdminService, engine: Engine, changes: list[int]
) -> None:
    _product(service)
    a, b, c = _devices(service, "123123", "a", "b", "c")
    package_id = _package(service, "123123")
    first = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, b])).task
    service.act_on_task(first.id, Action.CANCEL)
    second = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, c])).task
    _set_task_state(engine, second.id, a, TaskState.SUCCEEDED)
    _set_task_state(engine, second.id, c, TaskState.FAILED)
    for dev in (a, b, c):
        _give_tokens(engine, dev)
    assert _task_rows(engine, first.id) == {"tasks": 1, "device_tasks": 2, "tokens": 4}
    kept = _task_rows(engine, second.id)
    assert kept == {"tasks": 1, "device_tasks": 2, "tokens": 4}
    feed_before = len(_feed(engine))
    changes.clear()

    service.delete_task(first.id)

    assert _task_rows(engine, first.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}
    assert _task_rows(engine, second.id) == kept
    assert _count(engine, schema.devices) == 3
    package = service.get_package(package_id)  # the package stays, with its file
    assert service.blobs.exists(package.sha256)
    assert _feed(engine)[feed_before:] == sorted([a, b])  # the devices that had the task
    assert changes == [1]  # this process's device API is told after the commit
    with pytest.raises(NotFound, match=f"task {first.id} not found"):
        service.get_task(first.id)
    assert [t.task_id for t in service.get_device(a).tasks] == [second.id]
    assert service.get_device(b).tasks == []
    assert [t.id for t in service.list_tasks().items] == [second.id]
    with pytest.raises(NotFound, match=f"task {first.id} not found"):
        service.delete_task(first.id)
    assert changes == [1]


@pytest.mark.parametrize("state", sorted(OPEN_STATES))
def test_task_with_an_open_device_task_cannot_be_deleted(
    service: AdminService, engine: Engine, changes: list[int], state: TaskState
) -> None:
    _product(service)
    dev, done = _devices(service, "123123", "d", "done")
    package_id = _package(service, "123123")
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev, done])).task
    paused_from = int(TaskState.DOWNLOADING) if state is TaskState.PAUSED else None
    _set_task_state(engine, task.id, dev, state, paused_from)
    _set_task_state(engine, task.id, done, TaskState.SUCCEEDED)
    _give_tokens(engine, dev)
    _give_tokens(engine, done)
    before = _task_rows(engine, task.id)
    feed = _feed(engine)
    changes.clear()

    with pytest.raises(Conflict) as refused:
        service.delete_task(task.id)

    name = state.name.lower()
    assert refused.value.message == (
        f"task {task.id} has 1 open device task: {dev} ({name}); cancel the task first"
    )
    assert refused.value.details == [{"dev_id": dev, "state": name}]
    assert _task_rows(engine, task.id) == before  # nothing deleted, nothing published
    assert _feed(engine) == feed
    assert changes == []
    service.act_on_task(task.id, Action.CANCEL)
    service.delete_task(task.id)
    assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}


def test_the_409_lists_a_sample_of_the_open_devices(service: AdminService) -> None:
    _product(service)
    devs = _devices(service, "123123", *(f"d{i:02d}" for i in range(25)))
    package_id = _package(service, "123123")
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=devs)).task
    with pytest.raises(Conflict) as refused:
        service.delete_task(task.id)
    shown = sorted(devs)[:20]
    assert refused.value.details == [{"dev_id": d, "state": "to_be_upgraded"} for d in shown]
    assert refused.value.message == (
        f"task {task.id} has 25 open device tasks: "
        + ", ".join(f"{d} (to_be_upgraded)" for d in shown)
        + " and 5 more; cancel the task first"
    )


def test_an_expired_open_task_does_not_block_its_delete(
    service: AdminService, engine: Engine, clock: Clock
) -> None:
    dev, package_id = _device_with_package(service)
    task = service.create_task(
        TaskCreate(package_id=package_id, dev_ids=[dev], deadline=NOW + 10)
    ).task
    with pytest.raises(Conflict, match="to_be_upgraded"):
        service.delete_task(task.id)
    clock.now += 10  # T5: the deadline has passed, the device task has failed
    service.delete_task(task.id)
    assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}
    assert service.get_device(dev).tasks == []


def test_a_task_of_many_devices_is_published_as_everything(
    service: AdminService, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(change_feed, "MAX_DEVICES_PER_CHANGE", 2)
    _product(service)
    a, b, c = _devices(service, "123123", "a", "b", "c")
    package_id = _package(service, "123123")
    at_limit = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, b])).task
    service.act_on_task(at_limit.id, Action.CANCEL)
    beyond = service.create_task(TaskCreate(package_id=package_id, dev_ids=[a, b, c])).task
    service.act_on_task(beyond.id, Action.CANCEL)
    start = len(_feed(engine))
    service.delete_task(at_limit.id)
    assert _feed(engine)[start:] == sorted([a, b])
    service.delete_task(beyond.id)
    assert _feed(engine)[start + 2 :] == [None]


@given(
    rows=st.lists(OPEN_OR_NOT, min_size=1, max_size=5),
    kept=OPEN_OR_NOT,
)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_a_task_is_deleted_whole_exactly_when_no_device_task_is_open(
    service: AdminService,
    engine: Engine,
    rows: list[tuple[TaskState, TaskState | None]],
    kept: tuple[TaskState, TaskState | None],
) -> None:
    # One task whose devices are in arbitrary states, and another task (of another package and
    # device) in an arbitrary state, which is never touched.
    pid = f"t{next(_counter)}"
    _product(service, pid)
    devs = _devices(service, pid, *(f"d{i}" for i in range(len(rows))))
    (other_dev,) = _devices(service, pid, "other")
    package_id = _package(service, pid, pid.encode())
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=devs)).task
    other = service.create_task(
        TaskCreate(package_id=_package(service, pid, f"{pid}/2".encode()), dev_ids=[other_dev])
    ).task
    for dev, (state, paused_from) in zip(devs, rows, strict=True):
        _set_task_state(engine, task.id, dev, state, paused_from)
    _set_task_state(engine, other.id, other_dev, *kept)
    for dev in (*devs, other_dev):
        _give_tokens(engine, dev, 1)
    before = _task_rows(engine, task.id)
    other_before = _task_rows(engine, other.id)
    feed = _feed(engine)
    open_devs = sorted(d for d, (state, _) in zip(devs, rows, strict=True) if state.is_open)
    if open_devs:
        with pytest.raises(Conflict) as refused:
            service.delete_task(task.id)
        assert [d["dev_id"] for d in refused.value.details] == open_devs
        assert _task_rows(engine, task.id) == before
        assert _feed(engine) == feed
    else:
        service.delete_task(task.id)
        assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}
        assert _feed(engine) == [*feed, *sorted(devs)]
    assert _task_rows(engine, other.id) == other_before
    assert _count(engine, schema.devices) >= len(devs) + 1


# -- races with device requests and other management calls


def _pause_after_the_lock(
    engine: Engine, holder: Callable[[], Outcome | None]
) -> tuple[threading.Event, threading.Event, Callable[..., None]]:
    """An engine listener that holds the thread of ``holder()`` right after delete_task has
    locked (read) the task row; returns (paused, release, listener)."""
    paused, release = threading.Event(), threading.Event()

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        outcome = holder()
        mine = outcome is not None and threading.get_ident() == outcome.ident
        if mine and statement.lstrip().startswith("SELECT tasks.id") and not paused.is_set():
            paused.set()
            release.wait(60)

    return paused, release, listener


def test_device_requests_during_the_delete_see_the_whole_task_or_nothing(
    service: AdminService, engine: Engine, clock: Clock
) -> None:
    dev, package_id = _device_with_package(service)
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    _set_task_state(engine, task.id, dev, TaskState.SUCCEEDED)
    _give_tokens(engine, dev, 1)
    with engine.connect() as conn:
        token = conn.execute(select(schema.tokens.c.token)).scalar_one()
    devices_api = DeviceService(engine, clock=clock, cache_ttl=0)
    late_report = Report(ReportKind.UPGRADED, 201)
    deleting: Outcome | None = None
    paused, release, listener = _pause_after_the_lock(engine, lambda: deleting)
    event.listen(engine, "after_cursor_execute", listener)
    try:
        # Assigned before the thread starts: the listener finds the thread through it.
        deleting = Outcome(lambda: service.delete_task(task.id))
        deleting.start()
        assert paused.wait(60)
        # E5 only reads: it never waits, and sees the task as it was (§5.4: finished).
        assert devices_api.check_token(dev, token) == Errno.TASK_FINISHED
        reporting = Outcome(lambda: devices_api.report(dev, token, late_report)).start()
        if engine.dialect.name == "postgresql":
            reporting.join()  # READ COMMITTED: it reads the task as it was, without waiting
            release.set()
        else:
            release.set()  # SQLite: its write transaction waits for the delete's
            reporting.join()
        deleting.join()
    finally:
        release.set()
        event.remove(engine, "after_cursor_execute", listener)
        devices_api.close()
    assert deleting.error is None
    assert reporting.error is None
    # §5.5: a report on a finished task is errno 20; once the task is gone its tokens are
    # unknown (§5.6): E7/E8 errno 1, E5 errno 4.
    expected = Errno.TASK_FINISHED if engine.dialect.name == "postgresql" else Errno.AUTH_FAILED
    assert reporting.result == expected
    assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}
    devices_api = DeviceService(engine, clock=clock, cache_ttl=0)
    try:
        assert devices_api.check_token(dev, token) == Errno.NO_VALID_TOKEN
        assert devices_api.report(dev, token, late_report) == Errno.AUTH_FAILED
    finally:
        devices_api.close()


def test_a_token_inserted_while_the_delete_runs_is_never_half_deleted(
    service: AdminService, engine: Engine
) -> None:
    dev, package_id = _device_with_package(service)
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    _set_task_state(engine, task.id, dev, TaskState.FAILED)
    _give_tokens(engine, dev, 1)
    dt = schema.device_tasks
    with engine.begin() as conn:  # a token written for the device task, uncommitted meanwhile
        dt_id = conn.execute(select(dt.c.id).where(dt.c.task_id == task.id)).scalar_one()
        conn.execute(
            insert(schema.tokens).values(
                token="ota_latecomer0000000000", device_task_id=dt_id, issued_at=NOW
            )
        )
        deleting = Outcome(lambda: service.delete_task(task.id)).start()
        wait_until_blocked(engine, deleting.thread)
    deleting.join()
    if engine.dialect.name == "postgresql":
        # The delete of the device task waited for the token's foreign-key lock and then found
        # the token: the foreign key breaks, everything is rolled back, 409.
        assert isinstance(deleting.error, Conflict), deleting.error
        assert deleting.error.message == (
            f"task {task.id} changed while it was being deleted; retry"
        )
        assert _task_rows(engine, task.id) == {"tasks": 1, "device_tasks": 1, "tokens": 2}
        service.delete_task(task.id)  # the retry succeeds
    else:
        # SQLite: the delete's write transaction began after the token's had committed.
        assert deleting.error is None
    assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}


def test_an_action_or_a_second_delete_during_the_delete_finds_no_task(
    service: AdminService, engine: Engine
) -> None:
    dev, package_id = _device_with_package(service)
    task = service.create_task(TaskCreate(package_id=package_id, dev_ids=[dev])).task
    _set_task_state(engine, task.id, dev, TaskState.SUCCEEDED)  # the task is still "active"
    deleting: Outcome | None = None
    paused, release, listener = _pause_after_the_lock(engine, lambda: deleting)
    event.listen(engine, "after_cursor_execute", listener)
    try:
        # Assigned before the thread starts: the listener finds the thread through it.
        deleting = Outcome(lambda: service.delete_task(task.id))
        deleting.start()
        assert paused.wait(60)
        # PostgreSQL: both wait for the task row the delete has locked (without the lock, the
        # pause would commit now and return the task).
        pausing = Outcome(lambda: service.act_on_task(task.id, Action.PAUSE)).start()
        wait_until_blocked(engine, pausing.thread)
        again = Outcome(lambda: service.delete_task(task.id)).start()
        wait_until_blocked(engine, again.thread, sessions=2)
        release.set()
        deleting.join()
        pausing.join()
        again.join()
    finally:
        release.set()
        event.remove(engine, "after_cursor_execute", listener)
    assert deleting.error is None
    assert isinstance(pausing.error, NotFound), pausing.error
    assert isinstance(again.error, NotFound), again.error
    assert _task_rows(engine, task.id) == {"tasks": 0, "device_tasks": 0, "tokens": 0}


def test_an_import_draws_its_generated_dev_ids_in_a_few_queries(
    service: AdminService, engine: Engine
) -> None:
    # One query per generated dev_id kept a 10,000-device import's write transaction open for
    # over ten seconds on SQLite: every other writer (device reports, the campaign evaluator's
    # lease) waited for it and gave up with "database is locked". Counted, not timed.
    service.create_product(ProductCreate(pid="424242", access_key=K1))
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        created = service.import_devices(
            DeviceImport(
                pid="424242", devices=[DeviceImportItem(name=f"g{i}") for i in range(2000)]
            )
        )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len({d.dev_id for d in created}) == 2000
    assert len(statements) < 40, len(statements)

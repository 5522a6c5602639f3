"""Setting up a fleet through the management API (``/api/v1``), and reading the server's view.

:func:`provision` creates what a rehearsal needs: a product (generated pid and key), the devices
(imported in batches), a package of random bytes (or a given file) and one task for all of them.
:func:`adopt` uses an existing task instead: its product, package and the devices still waiting
to upgrade. :func:`server_states` reads every simulated device's state back, for the summary's
agreement check. Everything goes through :class:`~onenet_ota.management.ManagementClient`, the
admin CLI's client too; nothing touches the database directly.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from onenet_ota.management import ManagementClient, ManagementError
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import PackageKind, TaskType
from onenet_ota.sim.config import FleetConfig, SimulationError

__all__ = ["DeviceView", "FleetTarget", "adopt", "provision", "server_states"]

IMPORT_BATCH: Final = 10_000  # the management API's import limit
PAGE: Final = 1000  # the management API's largest page
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FleetTarget:
    """The devices to run and what they upgrade to. ``access_key`` is a secret (not in repr).

    ``names`` are the devices' names, in the order of ``dev_ids``: Studio and fuse name a device
    by its product id and name (§12.2, §13.1), and sign its token with the product's key (D4).
    """

    pid: str
    access_key: str = field(repr=False)
    task_id: int
    dev_ids: tuple[int, ...]
    names: tuple[str, ...]
    task_type: TaskType
    version: str
    target: str
    size: int
    md5: str
    created: bool


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device task as the server shows it."""

    state: TaskState
    progress: int
    result_code: int | None


def _step(what: str, operation: Callable[[], T]) -> T:
    """``operation()``, with a refusal or an unreachable server as a :class:`SimulationError`."""
    try:
        return operation()
    except ManagementError as exc:
        hint = ""
        if exc.status == 401:
            hint = " (check --admin-token / ONENET_OTA_ADMIN_TOKEN)"
        raise SimulationError(f"{what}: {exc}{hint}") from None


def provision(admin: ManagementClient, config: FleetConfig) -> FleetTarget:
    """Create a product, ``config.devices`` devices, a package and a task for them."""
    rng = random.Random(config.seed)
    product = _step("creating the product", lambda: admin.create_product(name="sim"))
    if product.access_key is None:  # a created product is always shown with its key
        raise SimulationError("creating the product: the server did not tell its access key")
    pid, key = product.pid, product.access_key
    run = secrets.token_hex(4)
    dev_ids: list[int] = []
    names: list[str] = []
    for first in range(0, config.devices, IMPORT_BATCH):
        count = min(IMPORT_BATCH, config.devices - first)
        items = [{"name": f"sim-{run}-{first + i:06d}"} for i in range(count)]
        created = _step("creating the devices", functools.partial(admin.import_devices, pid, items))
        dev_ids.extend(device.dev_id for device in created)
        names.extend(device.name for device in created)
    if config.package is not None:
        try:
            data = config.package.read_bytes()
        except OSError as exc:
            raise SimulationError(f"--package {config.package}: {exc.strerror or exc}") from None
        file_name = config.package.name[:64]
    else:
        data = rng.randbytes(config.package_size)
        file_name = "sim-firmware.bin"
    package = _step(
        "uploading the package",
        lambda: admin.upload_package(
            data,
            pid=pid,
            module_type=config.task_type,
            target=config.target,
            file_name=file_name,
        ),
    )
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if package.md5 != md5 or package.size != len(data):
        raise SimulationError("the server stored a package that differs from the upload")
    task = _step(
        "creating the task",
        lambda: admin.create_task(
            package.id, dev_ids=dev_ids, signal=config.task_signal, power=config.task_power
        ),
    )
    return FleetTarget(
        pid=pid,
        access_key=key,
        task_id=task.id,
        dev_ids=tuple(dev_ids),
        names=tuple(names),
        task_type=config.task_type,
        version=config.version,
        target=config.target,
        size=len(data),
        md5=md5,
        created=True,
    )


def adopt(admin: ManagementClient, config: FleetConfig) -> FleetTarget:
    """Use task ``config.task_id``: its product, package and first devices still waiting."""
    task_id = config.task_id
    assert task_id is not None
    task = _step(f"reading task {task_id}", lambda: admin.get_task(task_id, limit=1))
    if task.status != "active":
        raise SimulationError(f"task {task_id} is {task.status}; resume it first")
    package = _step("reading the package", lambda: admin.get_package(task.package_id))
    # The simulator signs its devices' tokens with the product's key: an audited reveal.
    product = _step("reading the product's key", lambda: admin.reveal_product_key(task.pid))
    if product.access_key is None:
        raise SimulationError(f"reading product {task.pid}: the server did not tell its key")
    waiting = admin.iter_task_devices(task_id, state="to_be_upgraded", page_size=PAGE)
    views = _step(
        "listing the task's devices",
        lambda: list(itertools.islice(waiting, config.devices)),
    )
    dev_ids = [view.dev_id for view in views]
    names = [view.name for view in views]
    if len(dev_ids) < config.devices:
        raise SimulationError(
            f"task {task_id} has {len(dev_ids)} device(s) waiting to upgrade; "
            f"use --devices {len(dev_ids)} or less"
            if dev_ids
            else f"task {task_id} has no device waiting to upgrade"
        )
    # A differential package applies to its from-version only (E3 errno 9 otherwise, §6.3).
    version = config.version
    if package.kind == PackageKind.DIFF and package.from_version is not None:
        version = package.from_version
    return FleetTarget(
        pid=task.pid,
        access_key=product.access_key,
        task_id=task_id,
        dev_ids=tuple(dev_ids),
        names=tuple(names),
        task_type=TaskType(task.module_type),
        version=version,
        target=package.target,
        size=package.size,
        md5=package.md5,
        created=False,
    )


def task_counts(admin: ManagementClient, task_id: int) -> dict[str, int]:
    """The server's device counts per state for the whole task."""
    task = _step(f"reading task {task_id}", lambda: admin.get_task(task_id, limit=1))
    return task.counts.model_dump()


def server_states(
    admin: ManagementClient, task_id: int, dev_ids: set[int]
) -> dict[int, DeviceView]:
    """The server's view of each of ``dev_ids`` in task ``task_id`` (pages of 1000)."""

    def read() -> dict[int, DeviceView]:
        views: dict[int, DeviceView] = {}
        for item in admin.iter_task_devices(task_id, page_size=PAGE):
            if item.dev_id in dev_ids:
                views[item.dev_id] = DeviceView(
                    TaskState[item.state.upper()], item.progress, item.result_code
                )
                if len(views) == len(dev_ids):
                    break
        return views

    return _step("reading the task's devices", read)

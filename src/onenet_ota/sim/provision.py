"""Setting up a fleet through the management API (``/api/v1``), and reading the server's view.

:func:`provision` creates what a rehearsal needs: a product (generated pid and key), the devices
(imported in batches), a package of random bytes (or a given file) and one task for all of them.
:func:`adopt` uses an existing task instead: its product, package and the devices still waiting
to upgrade. :func:`server_states` reads every simulated device's state back, for the summary's
agreement check. Everything goes through :class:`~onenet_ota.cli.admin.AdminClient`, the admin
CLI's client; nothing touches the database directly.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from onenet_ota.cli.admin import AdminClient, AdminClientError
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import PackageKind, TaskType
from onenet_ota.sim.config import FleetConfig, SimulationError

__all__ = ["DeviceView", "FleetTarget", "adopt", "provision", "server_states"]

IMPORT_BATCH: Final = 10_000  # the management API's import limit
PAGE: Final = 1000  # the management API's largest page
_UPLOAD_CHUNK: Final = 1024 * 1024


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


def _call(admin: AdminClient, what: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return admin.request(method, path, **kwargs)
    except AdminClientError as exc:
        hint = ""
        if exc.status == 401:
            hint = " (check --admin-token / ONENET_OTA_ADMIN_TOKEN)"
        raise SimulationError(f"{what}: {exc}{hint}") from None


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), _UPLOAD_CHUNK):
        yield bytes(view[start : start + _UPLOAD_CHUNK])


def provision(admin: AdminClient, config: FleetConfig) -> FleetTarget:
    """Create a product, ``config.devices`` devices, a package and a task for them."""
    rng = random.Random(config.seed)
    product = _call(admin, "creating the product", "POST", "/products", json_body={"name": "sim"})
    pid, key = product["pid"], product["access_key"]
    run = secrets.token_hex(4)
    dev_ids: list[int] = []
    names: list[str] = []
    for first in range(0, config.devices, IMPORT_BATCH):
        count = min(IMPORT_BATCH, config.devices - first)
        body = {
            "pid": pid,
            "devices": [{"name": f"sim-{run}-{first + i:06d}"} for i in range(count)],
        }
        created = _call(admin, "creating the devices", "POST", "/devices/import", json_body=body)
        dev_ids.extend(int(item["dev_id"]) for item in created["items"])
        names.extend(str(item["name"]) for item in created["items"])
    if config.package is not None:
        try:
            data = config.package.read_bytes()
        except OSError as exc:
            raise SimulationError(f"--package {config.package}: {exc.strerror or exc}") from None
        file_name = config.package.name[:64]
    else:
        data = rng.randbytes(config.package_size)
        file_name = "sim-firmware.bin"
    package = _call(
        admin,
        "uploading the package",
        "POST",
        "/packages",
        params={
            "pid": pid,
            "type": "fota" if config.task_type is TaskType.FOTA else "sota",
            "target": config.target,
            "file_name": file_name,
        },
        content=_chunks(data),
        headers={"Content-Type": "application/octet-stream"},
    )
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if package["md5"] != md5 or package["size"] != len(data):
        raise SimulationError("the server stored a package that differs from the upload")
    task = _call(
        admin,
        "creating the task",
        "POST",
        "/tasks",
        json_body={
            "package_id": package["id"],
            "dev_ids": dev_ids,
            "signal": config.task_signal,
            "power": config.task_power,
        },
    )
    return FleetTarget(
        pid=pid,
        access_key=key,
        task_id=int(task["id"]),
        dev_ids=tuple(dev_ids),
        names=tuple(names),
        task_type=config.task_type,
        version=config.version,
        target=config.target,
        size=len(data),
        md5=md5,
        created=True,
    )


def adopt(admin: AdminClient, config: FleetConfig) -> FleetTarget:
    """Use task ``config.task_id``: its product, package and first devices still waiting."""
    assert config.task_id is not None
    task = _call(admin, f"reading task {config.task_id}", "GET", f"/tasks/{config.task_id}")
    if task["status"] != "active":
        raise SimulationError(f"task {config.task_id} is {task['status']}; resume it first")
    package = _call(admin, "reading the package", "GET", f"/packages/{task['package_id']}")
    product = _call(admin, "reading the product", "GET", f"/products/{task['pid']}")
    dev_ids: list[int] = []
    names: list[str] = []
    after: str | None = None
    while len(dev_ids) < config.devices:
        page = _call(
            admin,
            "listing the task's devices",
            "GET",
            f"/tasks/{config.task_id}/devices",
            params={"state": "to_be_upgraded", "limit": PAGE, "after": after},
        )
        dev_ids.extend(int(item["dev_id"]) for item in page["items"])
        names.extend(str(item["name"]) for item in page["items"])
        after = page["next"]
        if after is None:
            break
    if len(dev_ids) < config.devices:
        raise SimulationError(
            f"task {config.task_id} has {len(dev_ids)} device(s) waiting to upgrade; "
            f"use --devices {len(dev_ids)} or less"
            if dev_ids
            else f"task {config.task_id} has no device waiting to upgrade"
        )
    # A differential package applies to its from-version only (E3 errno 9 otherwise, §6.3).
    version = package["from_version"] if package["kind"] == PackageKind.DIFF else config.version
    return FleetTarget(
        pid=task["pid"],
        access_key=product["access_key"],
        task_id=config.task_id,
        dev_ids=tuple(dev_ids[: config.devices]),
        names=tuple(names[: config.devices]),
        task_type=TaskType(task["module_type"]),
        version=version,
        target=package["target"],
        size=int(package["size"]),
        md5=package["md5"],
        created=False,
    )


def task_counts(admin: AdminClient, task_id: int) -> dict[str, int]:
    """The server's device counts per state for the whole task."""
    task = _call(admin, f"reading task {task_id}", "GET", f"/tasks/{task_id}")
    counts: dict[str, int] = task["counts"]
    return counts


def server_states(admin: AdminClient, task_id: int, dev_ids: set[int]) -> dict[int, DeviceView]:
    """The server's view of each of ``dev_ids`` in task ``task_id`` (pages of 1000)."""
    views: dict[int, DeviceView] = {}
    after: str | None = None
    while True:
        page = _call(
            admin,
            "reading the task's devices",
            "GET",
            f"/tasks/{task_id}/devices",
            params={"limit": PAGE, "after": after},
        )
        for item in page["items"]:
            dev_id = int(item["dev_id"])
            if dev_id in dev_ids:
                views[dev_id] = DeviceView(
                    TaskState[str(item["state"]).upper()],
                    int(item["progress"]),
                    item["result_code"],
                )
        after = page["next"]
        if after is None or len(views) == len(dev_ids):
            return views

"""A virtual device's storage (:mod:`onenet_ota.sim.storage`): the state store without fsyncs,
the installer that checks the package, and the check itself."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from onenet_ota.device.install import InstallError
from onenet_ota.device.state import Phase as StatePhase
from onenet_ota.device.state import StateStore, UpgradeState
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.status import StatusCode, TaskType
from onenet_ota.sim import FleetConfig, simulate, storage
from onenet_ota.sim.storage import (
    CheckingInstaller,
    DefectiveInstaller,
    InstalledCheck,
    SimStateStore,
)
from tests.sim.platform import Platform

PACKAGE = bytes(range(256)) * 64  # 16 KiB
MD5 = hashlib.md5(PACKAGE, usedforsecurity=False).hexdigest()
TASK = TaskInfo("1.0.1", "token-" * 4, len(PACKAGE), MD5)


def _state(**changes: Any) -> UpgradeState:
    return UpgradeState(TaskType.FOTA, "1.0.0", TASK, **changes)


def test_the_state_store_reads_back_what_it_saved(tmp_path: Path) -> None:
    store = SimStateStore(tmp_path / "device", TaskType.FOTA)
    assert store.load() is None
    long = _state(offset=8192, progress=50, sent=(101,), pending=201)
    store.save(long)
    assert store.load() == long
    # Written in place: a shorter state leaves nothing of the longer one behind.
    short = _state()
    store.save(short)
    assert store.load() == short
    # The SDK's own store reads the same file: one format, one place.
    assert StateStore(tmp_path / "device", TaskType.FOTA).load() == short
    with pytest.raises(ValueError, match="another task type"):
        SimStateStore(tmp_path / "device", TaskType.SOTA).save(short)


def test_a_torn_state_file_is_still_quarantined(tmp_path: Path) -> None:
    store = SimStateStore(tmp_path, TaskType.FOTA)
    store.save(_state(phase=StatePhase.VERIFIED, offset=len(PACKAGE)))
    store.state_path.write_bytes(b'{"format": 1, "task_ty')
    assert store.load() is None
    assert (tmp_path / "fota.json.1.corrupt").exists()


def test_a_faulty_fleet_keeps_its_state_without_the_sdks_fsyncs(
    sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every device's state goes through the simulator's store (the SDK's save, with its
    fsyncs, is never called), and devices whose power was cut resume from it."""
    calls: dict[str, int] = {"sdk": 0, "sim": 0}
    sdk_save, sim_save = StateStore.save, SimStateStore.save

    def counted(kind: str, save: Any) -> Any:
        def wrapper(self: StateStore, state: UpgradeState) -> None:
            calls[kind] += 1
            save(self, state)

        return wrapper

    monkeypatch.setattr(StateStore, "save", counted("sdk", sdk_save))
    monkeypatch.setattr(SimStateStore, "save", counted("sim", sim_save))
    config = FleetConfig(
        devices=12,
        concurrency=6,
        power_cut_rate=0.5,
        drop_rate=0.05,
        seed=3,
        package_size=32 * 1024,
        chunk_size=4096,
        progress_step=25,
        retry_interval=0.02,
    )
    report = simulate(config, server=sqlite_platform.url, admin_token=sqlite_platform.admin_token)
    assert report.reasons() == []
    assert report.ok
    assert report.install_mismatches == 0
    assert all(record.installed_ok for record in report.state.devices)
    assert report.metrics.injected["power-cut"] > 0
    assert calls["sdk"] == 0
    assert calls["sim"] >= 12 * 4  # task, progress reports, verified, 101, 201 per device


def test_the_installer_checks_the_package_it_is_given(tmp_path: Path) -> None:
    check = InstalledCheck(len(PACKAGE), MD5)
    right, wrong = tmp_path / "right.part", tmp_path / "wrong.part"
    right.write_bytes(PACKAGE)
    wrong.write_bytes(bytes(len(PACKAGE)))
    installer = CheckingInstaller(check)
    assert installer.installed is None
    asyncio.run(installer.install(wrong, TASK, TaskType.FOTA))
    assert installer.installed is False
    asyncio.run(installer.install(right, TASK, TaskType.FOTA))
    assert installer.installed is True
    with pytest.raises(InstallError, match=r"cannot read missing\.part") as unreadable:
        asyncio.run(installer.install(tmp_path / "missing.part", TASK, TaskType.FOTA))
    assert unreadable.value.code is StatusCode.UPGRADE_OTHER
    with pytest.raises(InstallError, match="defective") as failed:
        asyncio.run(DefectiveInstaller(205).install(right, TASK, TaskType.FOTA))
    assert failed.value.code is StatusCode.UPGRADE_MD5_MISMATCH


@pytest.mark.parametrize("limit", [storage.REFERENCE_LIMIT, 1], ids=["reference", "hashed"])
def test_the_installed_check_agrees_with_the_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setattr(storage, "REFERENCE_LIMIT", limit)
    check = InstalledCheck(len(PACKAGE), MD5.upper())
    assert check.inline is (limit > 1)  # hashed in a worker thread when big
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(PACKAGE[:-1] + b"\x00")  # same size, last byte differs
    short = tmp_path / "short.bin"
    short.write_bytes(PACKAGE[:-1])
    right = tmp_path / "right.bin"
    right.write_bytes(PACKAGE)
    # A wrong file first: it must not become the reference.
    assert check(wrong) is False
    assert check(short) is False
    assert check(right) is True
    assert check(right) is True
    assert check(wrong) is False  # against the reference now (or hashed again)
    with pytest.raises(FileNotFoundError):
        check(tmp_path / "absent.bin")

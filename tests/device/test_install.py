"""The default installer places a verified package atomically; failures carry a status code."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from onenet_ota.device.install import FileInstaller, Installer, InstallError
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.status import StatusCode, TaskType

TASK = TaskInfo(target="1.0.1", token="ota_3fQ9cZr0LmT7wXa2bN5k", size=5, md5="0" * 32)


def test_file_installer_places_the_package(tmp_path: Path) -> None:
    package = tmp_path / "fota.part"
    package.write_bytes(b"new firmware")
    target = tmp_path / "out" / "firmware.bin"
    target.parent.mkdir()
    installer = FileInstaller(target, mode=0o640)
    assert isinstance(installer, Installer)
    installer.install(package, TASK, TaskType.FOTA)
    assert target.read_bytes() == b"new firmware"
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(target.parent) == ["firmware.bin"]  # no temporary left behind
    assert package.read_bytes() == b"new firmware"  # the source is left for the upgrader


def test_file_installer_replaces_an_existing_file_and_is_idempotent(tmp_path: Path) -> None:
    package = tmp_path / "p"
    package.write_bytes(b"v2")
    target = tmp_path / "fw.bin"
    target.write_bytes(b"v1 and longer")
    FileInstaller(target).install(package, TASK, TaskType.SOTA)
    FileInstaller(target).install(package, TASK, TaskType.SOTA)
    assert target.read_bytes() == b"v2"
    assert sorted(os.listdir(tmp_path)) == ["fw.bin", "p"]


def test_leftovers_of_an_interrupted_install_are_removed(tmp_path: Path) -> None:
    package = tmp_path / "p"
    package.write_bytes(b"v2")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".fw.bin.onenet-ota-tmp.abc123").write_bytes(b"half a fir")
    (out / ".fw.bin.keep").write_bytes(b"not ours")
    FileInstaller(out / "fw.bin").install(package, TASK, TaskType.FOTA)
    assert sorted(os.listdir(out)) == [".fw.bin.keep", "fw.bin"]


def test_missing_output_directory_is_install_error(tmp_path: Path) -> None:
    package = tmp_path / "p"
    package.write_bytes(b"x")
    with pytest.raises(InstallError, match="does not exist") as info:
        FileInstaller(tmp_path / "nope" / "fw.bin").install(package, TASK, TaskType.FOTA)
    assert info.value.code is StatusCode.UPGRADE_OTHER


def test_output_that_is_a_directory_is_install_error(tmp_path: Path) -> None:
    package = tmp_path / "p"
    package.write_bytes(b"x")
    with pytest.raises(InstallError, match="is a directory"):
        FileInstaller(tmp_path).install(package, TASK, TaskType.FOTA)


def test_a_failed_copy_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "fw.bin"
    target.write_bytes(b"old")
    with pytest.raises(InstallError, match="cannot place the package"):
        FileInstaller(target).install(tmp_path / "vanished.part", TASK, TaskType.FOTA)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["fw.bin"]


@pytest.mark.parametrize("how", ["sendfile", "no sendfile", "sendfile refused"])
def test_the_copy_is_whole_with_or_without_the_kernel_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)  # larger than one sendfile call may move
    package = tmp_path / "fota.part"
    package.write_bytes(data)
    calls: list[int] = []
    real = getattr(os, "sendfile", None)

    def refused(out: int, src: int, offset: int, count: int) -> int:
        calls.append(offset)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # e.g. a filesystem without it

    if how == "no sendfile":
        monkeypatch.delattr(os, "sendfile", raising=False)
    elif how == "sendfile refused":
        monkeypatch.setattr(os, "sendfile", refused, raising=False)
    elif real is None:
        pytest.skip("this system has no sendfile")
    target = tmp_path / "fw.bin"
    FileInstaller(target).install(package, TASK, TaskType.FOTA)
    assert target.read_bytes() == data
    assert calls == ([0] if how == "sendfile refused" else [])


def test_install_error_carries_an_upgrade_failure_code() -> None:
    error = InstallError("embedded version is 1.0.0", StatusCode.UPGRADE_VERSION_MISMATCH)
    assert error.code is StatusCode.UPGRADE_VERSION_MISMATCH
    assert InstallError("x").code is StatusCode.UPGRADE_OTHER
    for bad in (StatusCode.DOWNLOADED, StatusCode.UPGRADED, StatusCode.DOWNLOAD_OTHER):
        with pytest.raises(ValueError, match="202-208"):
            InstallError("x", bad)

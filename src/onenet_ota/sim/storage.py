"""A virtual device's local storage: its upgrade state, its installer, the check of what it
installed.

The upgrader of every virtual device is the SDK's own (:class:`~onenet_ota.device.AsyncUpgrader`),
with its own state files; what this module changes is only how those files reach the disk, and
how the simulator checks the installed result, because at thousands of devices per second each
system call and worker thread around a device's storage is a share of the simulator's CPU:

- :class:`SimStateStore` is the SDK's :class:`~onenet_ota.device.state.StateStore` (the same
  ``fota.json``, ``fota.part`` and ``fota.lock``, the same loading, quarantine and lock) without
  the fsyncs, and writing the state file in place instead of through a temporary file and a
  rename. A simulated power cut (:class:`~onenet_ota.sim.transport.PowerCut`) ends an
  upgrader's run inside the simulator's process; the kernel's page cache outlives it, so an
  fsync protects against nothing the simulation injects (on the memory-backed directory the
  devices use by default it does nothing at all), and no write is ever cut in half. What a
  power cut does test, that the next run resumes from the files alone, is unchanged: the next
  run is a new upgrader reading the same directory.
- :class:`CheckingInstaller` installs by checking: the verified package the upgrader hands over
  is compared with the package on the server (:class:`InstalledCheck`) on the event loop, where
  the SDK's :class:`~onenet_ota.device.install.FileInstaller` would copy it to a file (temporary
  file, fsyncs, rename) in a worker thread, and the simulator would then read the copy back.
- :class:`InstalledCheck` says whether a file is the package: the first file whose size and MD5
  match becomes the reference, and later files are compared with it byte for byte (a read and a
  memory comparison, instead of an MD5 per device).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from onenet_ota.device.install import InstallError
from onenet_ota.device.state import StateStore, UpgradeState
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.status import StatusCode, TaskType

__all__ = [
    "REFERENCE_LIMIT",
    "CheckingInstaller",
    "DefectiveInstaller",
    "InstalledCheck",
    "SimStateStore",
]

REFERENCE_LIMIT: Final = 4 * 1024 * 1024
"""Packages up to this size are kept in memory (once per process) as the reference for
:class:`InstalledCheck`, and checked on the event loop; larger ones are hashed on every device,
in a worker thread (:attr:`InstalledCheck.inline`)."""


# The SDK's compact form; one encoder (json.dumps with separators makes one per call).
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


class SimStateStore(StateStore):
    """The SDK's state store without fsyncs (see the module documentation).

    :meth:`save` writes the state file in place instead of through a temporary file and a
    rename: a torn file needs a crash in the middle of a write, and the one crash the simulation
    injects (:class:`~onenet_ota.sim.transport.PowerCut`) comes only while a request is sent or
    awaited. One upgrader at a time holds the directory's lock, and the flow settles a checkpoint
    running behind the download before it saves again, so two saves never overlap.
    """

    def __init__(self, directory: str | os.PathLike[str], task_type: TaskType) -> None:
        super().__init__(directory, task_type)
        self._made = False

    def _ensure_directory(self) -> None:
        # The SDK checks on every lock, save and open; a device's directory, once made, is
        # only removed after its last run.
        if not self._made:
            super()._ensure_directory()
            self._made = True

    def save(self, state: UpgradeState) -> None:
        """Persist ``state`` (in place, no fsync). Raises :class:`OSError` as is."""
        if state.task_type is not self.task_type:
            raise ValueError("state of another task type")
        self._ensure_directory()
        data = _ENCODER.encode(state.to_json()).encode()
        # Overwritten, then cut to length, rather than opened with O_TRUNC: on tmpfs a
        # truncation to 0 frees the file's page and the write allocates a new one, twice the
        # system time of the cut (a state file is a few hundred bytes, one page).
        fd = os.open(self.state_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {self.state_path}")
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def _fsync_directory(self) -> None:
        return  # see the class documentation: nothing the simulation injects needs it


class CheckingInstaller:
    """A virtual device's installer: it reads the verified package the upgrader hands over and
    checks it against the package on the server (:class:`InstalledCheck`), the bytes a real
    device would now write to its flash.

    :attr:`installed` is None until an install ran, then whether the bytes were the package
    (kept across the device's runs: after a power cut between the install and its report, the
    next run does not install again). A package that cannot be read fails the install (206).
    """

    def __init__(self, check: InstalledCheck) -> None:
        self.check = check
        self.installed: bool | None = None

    async def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
        """Check ``package``; raises :class:`~onenet_ota.device.InstallError` if unreadable."""
        try:
            if self.check.inline:
                ok = self.check(package)
            else:
                ok = await anyio.to_thread.run_sync(self.check, package)
        except OSError as exc:
            raise InstallError(f"cannot read {package.name}: {exc.strerror or exc}") from exc
        self.installed = ok


class DefectiveInstaller:
    """The simulator's defective package: the install fails with ``code`` (205 or 206) and
    nothing is installed, every time (so a retry fails the same way)."""

    def __init__(self, code: int) -> None:
        self.code = StatusCode(code)

    async def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
        """Fail as a bad build does."""
        raise InstallError("the package is defective (simulated)", self.code)


class InstalledCheck:
    """Whether an installed file is the package of ``size`` bytes and MD5 ``md5``.

    The first file that matches both (hashed) becomes the reference kept in memory, when the
    package is at most :data:`REFERENCE_LIMIT` bytes; every later file is read and compared
    with it. A file that differs from the reference is hashed too, so the answer is the same as
    hashing every file.
    """

    def __init__(self, size: int, md5: str) -> None:
        self.size = size
        self.md5 = md5.lower()
        self._reference: bytes | None = None

    @property
    def inline(self) -> bool:
        """Whether a check is quick enough to run on the event loop (the package is small)."""
        return self.size <= REFERENCE_LIMIT

    def __call__(self, path: Path) -> bool:
        """Whether ``path`` holds exactly the package. Raises :class:`OSError` if unreadable."""
        if os.stat(path).st_size != self.size:
            return False
        if not self.inline:
            return _md5_of(path) == self.md5
        data = path.read_bytes()
        if self._reference is not None and data == self._reference:
            return True
        if len(data) != self.size or hashlib.md5(data, usedforsecurity=False).hexdigest() != (
            self.md5
        ):
            return False
        self._reference = data
        return True


def _md5_of(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            md5.update(block)
    return md5.hexdigest()

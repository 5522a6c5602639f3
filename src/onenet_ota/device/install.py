"""Applying a verified package: the :class:`Installer` protocol and the default
:class:`FileInstaller`.

The upgrader calls an installer only with a package whose size and MD5 matched the task (spec §10,
"Integrity"), and only after reporting 101. Whatever the installer raises becomes the upgrade's
failure report: :class:`InstallError` carries its status code (202-208, default 206), a
:class:`MemoryError` becomes 203, anything else 206.

An installer may run again after a crash (the upgrader cannot know whether the previous run
finished), so it must be idempotent: installing the same package twice leaves the same result.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.status import StatusCode, TaskType

__all__ = ["AsyncInstaller", "FileInstaller", "InstallError", "Installer"]

_TMP_MARK = ".onenet-ota-tmp."
_UPGRADE_FAILURES = frozenset(code for code in StatusCode if 202 <= code <= 208)


class InstallError(Exception):
    """The package could not be applied. ``code`` is the status report it causes (202-208).

    Use :attr:`StatusCode.UPGRADE_LOW_BATTERY` (202), ``UPGRADE_NO_MEMORY`` (203),
    ``UPGRADE_VERSION_MISMATCH`` (204, e.g. the package's embedded version is not the task's
    target) or the default ``UPGRADE_OTHER`` (206).
    """

    def __init__(self, message: str, code: StatusCode = StatusCode.UPGRADE_OTHER) -> None:
        code = StatusCode(code)
        if code not in _UPGRADE_FAILURES:
            raise ValueError(f"an install failure is reported with 202-208, not {int(code)}")
        super().__init__(message)
        self.code = code


@runtime_checkable
class Installer(Protocol):
    """Applies a verified package. Must be idempotent (it may run again after a crash)."""

    def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
        """Apply ``package`` (complete, MD5-verified, read-only for the installer)."""
        ...  # pragma: no cover - protocol


@runtime_checkable
class AsyncInstaller(Protocol):
    """An installer for :class:`~onenet_ota.device.upgrader.AsyncUpgrader` whose ``install`` is
    a coroutine (a synchronous :class:`Installer` runs there in a worker thread instead)."""

    async def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
        """Apply ``package``, as :meth:`Installer.install`."""
        ...  # pragma: no cover - protocol


_NO_KERNEL_COPY = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTSOCK, errno.EXDEV}
)


def _kernel_copy(src: int, out: int) -> bool:
    """Copy file ``src`` to the empty file ``out`` with ``sendfile`` (the kernel moves the
    bytes; the package does not pass through Python's buffers, which cost the device a second
    copy of every byte). False, with nothing written, where the system cannot do that."""
    sendfile = getattr(os, "sendfile", None)
    if sendfile is None:
        return False
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            sent = sendfile(out, src, offset, size - offset)
        except OSError as exc:
            if offset == 0 and exc.errno in _NO_KERNEL_COPY:
                return False
            raise
        if sent == 0:  # the package shrank under us: a short copy fails the install
            raise OSError(errno.EIO, "the package ended early while being copied")
        offset += sent
    return True


class FileInstaller:
    """Places the package at ``target`` atomically: a reader sees the old file or the new one.

    The bytes are copied to a temporary file in the target's directory, fsynced, renamed over
    ``target`` and the directory is fsynced, so a power cut never leaves a torn file. Temporary
    files an interrupted install left behind (``.NAME.onenet-ota-tmp.*``) are removed first.
    """

    def __init__(self, target: str | os.PathLike[str], *, mode: int = 0o644) -> None:
        self.target = Path(target)
        self.mode = mode

    def install(self, package: Path, task: TaskInfo, task_type: TaskType) -> None:
        """Copy ``package`` to :attr:`target` atomically; raises :class:`InstallError`."""
        directory = self.target.parent
        if not directory.is_dir():
            raise InstallError(f"output directory {directory} does not exist")
        if self.target.is_dir():
            raise InstallError(f"output path {self.target} is a directory")
        self._remove_leftovers()
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=self._tmp_prefix, dir=directory)
        except OSError as exc:
            raise InstallError(f"cannot write to {directory}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as out, package.open("rb") as src:
                if not _kernel_copy(src.fileno(), out.fileno()):
                    shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), self.mode)
                os.fsync(out.fileno())
            os.replace(tmp_name, self.target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise InstallError(
                f"cannot place the package at {self.target}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        _fsync_directory(directory)

    @property
    def _tmp_prefix(self) -> str:
        return f".{self.target.name}{_TMP_MARK}"

    def _remove_leftovers(self) -> None:
        prefix = self._tmp_prefix
        with contextlib.suppress(OSError):
            for entry in self.target.parent.iterdir():
                if entry.name.startswith(prefix) and entry.is_file():
                    entry.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileInstaller({str(self.target)!r})"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)

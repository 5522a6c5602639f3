"""The upgrader's durable state: what survives a restart or a power cut.

One state directory holds, per task type (FOTA, SOTA):

- ``fota.json``: the task (token, target, size, md5, advisory values), the phase, the verified
  offset, and which status reports the server has acknowledged or may have received;
- ``fota.part``: the partial package;
- ``fota.lock``: an advisory lock, so that two upgraders never share one state.

Ordering rules, which make every crash point recoverable:

1. The partial package is fsynced **before** the offset that covers it is persisted, so a durable
   offset never claims bytes the disk may not have. On restart the partial file is truncated to
   the durable offset and the running MD5 is recomputed over it.
2. The JSON is replaced atomically: temporary file in the same directory, fsync, rename, fsync of
   the directory. A reader sees the old state or the new one, never a torn one.
3. A status report is recorded as *pending* before it is sent and as *sent* after the server
   acknowledged it, so a restart re-sends exactly the reports that may be missing (the upgrader
   interprets the server's answer to a repeat; see :mod:`onenet_ota.device.upgrader`).

An unreadable state file is moved aside with its partial package as one numbered quarantine
(``fota.json.N.corrupt``, ``fota.part.N.corrupt``, kept for inspection) and the upgrade starts
over. Only the :data:`KEEP_QUARANTINED` newest quarantines per task type are kept, because a
device's storage is small.

File names come from the task type alone; nothing read from the network ever becomes a path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Final

from onenet_ota.protocol import values
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.dialects import TID
from onenet_ota.protocol.messages import TaskInfo, WireFormatError
from onenet_ota.protocol.status import TaskType

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX; the lock degrades to a no-op
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT",
    "KEEP_QUARANTINED",
    "Checkpoint",
    "Opener",
    "PartialFile",
    "Phase",
    "StateError",
    "StateLocked",
    "StateStore",
    "UpgradeState",
    "open_for_update",
]

logger = logging.getLogger("onenet_ota.device.state")

FORMAT: Final = 1
KEEP_QUARANTINED: Final = 3
"""How many quarantines (an unreadable state file and its partial package) a state directory
keeps per task type; older ones are deleted when a new one is made."""
_READ_BLOCK: Final = 1 << 20
_TMP_PREFIX: Final = ".tmp-"

Opener = Callable[[Path], BinaryIO]
"""Opens the partial package for reading and writing, creating it if missing, never truncating."""


class StateError(Exception):
    """The state directory cannot be used: unreadable, unwritable, or a state file that is not
    one of ours. The message says which file and why."""


class StateLocked(StateError):
    """Another upgrader holds this state directory's lock for this task type."""


class Phase(StrEnum):
    """How far the upgrade got. Each phase is persisted before the step after it starts."""

    DOWNLOADING = "downloading"  # the partial package is valid up to ``offset``
    VERIFIED = "verified"  # complete, size and MD5 checked, fsynced: safe to report 101
    INSTALLED = "installed"  # the installer finished: the device now has the target version


@dataclass(frozen=True, slots=True)
class UpgradeState:
    """The persisted record of one upgrade in progress.

    ``sent`` holds the status codes the server acknowledged (errno 0, or an answer proving it
    already had them); ``pending`` is a status code that may have left the device without its
    answer being recorded. ``progress`` is the last progress step acknowledged, -1 for none: 0-99,
    or 100 after the verified package was reported complete (``report_full_progress``).
    ``redownloads`` counts full restarts after a resumed download failed verification.
    ``dialect`` is the device API the task came from (§13.7): on Studio and fuse the task's
    ``token`` holds its ``tid`` in decimal, so a state from another dialect is never resumed as
    this one's (files written before dialects existed read as classic).
    """

    task_type: TaskType
    from_version: str
    task: TaskInfo
    phase: Phase = Phase.DOWNLOADING
    offset: int = 0
    progress: int = -1
    sent: tuple[int, ...] = ()
    pending: int | None = None
    started_at: float = 0.0
    redownloads: int = 0
    dialect: Dialect = Dialect.CLASSIC

    def __post_init__(self) -> None:
        if self.dialect is not Dialect.CLASSIC and not _is_tid(self.task.token):
            raise ValueError(f"a {self.dialect.value} task's tid is not a decimal 1..2^31-1")
        if not 0 <= self.offset <= self.task.size:
            raise ValueError(f"offset {self.offset} is outside the package (size {self.task.size})")

    def with_task(self, task: TaskInfo) -> UpgradeState:
        """The same upgrade under a refreshed task (a new token after errno 12, spec §5.6)."""
        return replace(self, task=task)

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to disk."""
        return {
            "format": FORMAT,
            "task_type": int(self.task_type),
            "from_version": self.from_version,
            "task": self.task.to_data(),
            "phase": self.phase.value,
            "offset": self.offset,
            "progress": self.progress,
            "sent": list(self.sent),
            "pending": self.pending,
            "started_at": self.started_at,
            "redownloads": self.redownloads,
            "dialect": self.dialect.value,
        }

    @classmethod
    def from_json(cls, obj: object) -> UpgradeState:
        """Parse :meth:`to_json`'s output; raises :class:`ValueError` naming the bad field."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("format") != FORMAT:
            raise ValueError(f"unknown format {obj.get('format')!r}")

        def integer(name: str, low: int, high: int) -> int:
            value = obj.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name!r} is not an integer in {low}..{high}")
            return value

        try:
            task_type = TaskType(integer("task_type", 1, 2))
            phase = Phase(str(obj.get("phase")))
            dialect = Dialect(obj.get("dialect", Dialect.CLASSIC.value))
        except ValueError as exc:
            raise ValueError(f"bad task type, phase or dialect: {exc}") from None
        from_version = obj.get("from_version")
        if not values.is_version(from_version):
            raise ValueError("'from_version' is not a version")
        assert isinstance(from_version, str)
        task_data = obj.get("task")
        if not isinstance(task_data, dict):
            raise ValueError("'task' is not an object")
        try:
            task = TaskInfo.from_data(task_data)
        except WireFormatError as exc:
            raise ValueError(f"'task': {exc}") from None
        sent = obj.get("sent")
        if not isinstance(sent, list) or not all(values.is_json_int(code) for code in sent):
            raise ValueError("'sent' is not a list of integers")
        pending = obj.get("pending")
        if pending is not None and not values.is_json_int(pending):
            raise ValueError("'pending' is not an integer")
        started_at = obj.get("started_at")
        if type(started_at) not in (int, float):
            raise ValueError("'started_at' is not a number")
        assert isinstance(started_at, int | float)
        return cls(
            task_type=task_type,
            from_version=from_version,
            task=task,
            phase=phase,
            offset=integer("offset", 0, task.size),
            progress=integer("progress", -1, 100),
            sent=tuple(sent),
            pending=pending,
            started_at=float(started_at),
            redownloads=integer("redownloads", 0, 1_000_000),
            dialect=dialect,
        )


def _is_tid(text: str) -> bool:
    # §12.2: the tid's one spelling (protocol.dialects.TID's grammar).
    return TID.accepts(text)


def open_for_update(path: Path) -> BinaryIO:
    """The default :data:`Opener`: read/write, created with mode 0600, never truncated."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        return os.fdopen(fd, "r+b", buffering=0)
    except BaseException:
        os.close(fd)
        raise


class PartialFile:
    """The partial package, written strictly in order, with a running MD5 of what was written.

    ``offset`` is how many bytes were written; ``durable_offset`` how many of them were fsynced.
    Write errors (ENOSPC included) propagate as :class:`OSError` and leave ``offset`` unchanged;
    the caller decides what a failure means.
    """

    def __init__(self, file: BinaryIO, offset: int, md5: Any) -> None:
        self._file = file
        self._offset = offset
        self._durable = offset
        self._md5 = md5
        # Where the file's position is known to be: a write continues from the last one
        # without a seek (a system call per chunk); unknown after a failed write.
        self._position: int | None = None

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    @property
    def durable_offset(self) -> int:
        """Bytes known to be on disk (fsynced)."""
        return self._durable

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` at :attr:`offset` and feed it to the MD5."""
        view = memoryview(data)
        file = self._file
        size = len(view)
        written = 0
        try:
            if self._position != self._offset:
                self._position = None
                file.seek(self._offset)
            while written < size:
                count = file.write(view[written:] if written else view)
                if not count:
                    raise OSError(errno.EIO, "short write to the partial package")
                written += count
        except BaseException:
            self._position = None
            # Forget the bytes of a failed write: the next write or the restart overwrites them.
            with contextlib.suppress(OSError):
                file.truncate(self._offset)
            raise
        self._md5.update(view)
        self._offset += size
        self._position = self._offset

    def sync(self) -> int:
        """Flush and fsync; returns the new durable offset."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._durable = self._offset
        return self._durable

    def sync_behind(self, after: Callable[[], None]) -> Checkpoint:
        """Flush, then fsync and run ``after`` in a worker thread, while this thread goes on
        writing. The bytes up to the current offset become durable when the returned
        :class:`Checkpoint` is settled (:meth:`settle`), never before; ``after`` (persisting
        the offset) runs only once the fsync succeeded. The file must not be closed before."""
        self._file.flush()
        return Checkpoint(self, self._offset, after)

    def settle(self, checkpoint: Checkpoint) -> None:
        """Wait for ``checkpoint``; its offset is durable once this returns (it raises the
        worker's :class:`OSError` otherwise, and the durable offset stays where it was)."""
        checkpoint.wait()
        self._durable = max(self._durable, checkpoint.offset)

    def hexdigest(self) -> str:
        """The MD5 of bytes 0..offset-1, lower-case hex."""
        digest: str = self._md5.hexdigest()
        return digest

    def close(self) -> None:
        """Close the file (without syncing)."""
        self._file.close()

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Checkpoint:
    """An fsync of the partial package, then ``after`` (persisting the offset it covers), in a
    worker thread: on a device's flash an fsync takes milliseconds, in which the next chunks
    download. See :meth:`PartialFile.sync_behind`."""

    def __init__(self, partial: PartialFile, offset: int, after: Callable[[], None]) -> None:
        self.offset = offset
        self._fd = partial._file.fileno()
        self._after = after
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="onenet-ota-checkpoint")
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._fd)  # never the reverse order: the offset never claims unsynced bytes
            self._after()
        except BaseException as exc:  # handed to the flow's thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Until the worker is done; raises what it raised."""
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


class StateStore:
    """The durable state of one task type's upgrade in ``directory``.

    ``opener`` opens the partial package (default :func:`open_for_update`); tests inject one that
    fails to simulate a full disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        task_type: TaskType,
        *,
        opener: Opener = open_for_update,
    ) -> None:
        self.directory = Path(directory)
        self.task_type = TaskType(task_type)
        self._opener = opener
        stem = "fota" if self.task_type is TaskType.FOTA else "sota"
        self.state_path = self.directory / f"{stem}.json"
        self.partial_path = self.directory / f"{stem}.part"
        self.lock_path = self.directory / f"{stem}.lock"
        # Exactly the names _quarantine gives, and no others: "fota.json.3.corrupt" (generation
        # 3) or, as versions before numbering wrote it, "fota.json.corrupt" (generation 0).
        self._quarantined_name = re.compile(rf"{stem}\.(?:json|part)(?:\.([1-9][0-9]*))?\.corrupt")

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.directory}: {exc}") from exc
        if not self.directory.is_dir():
            raise StateError(f"state directory {self.directory} is not a directory")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this task type's lock; raises :class:`StateLocked` if another process has it.

        The kernel drops the lock when the holder dies, even by SIGKILL.
        """
        self._ensure_directory()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.lock_path}: {exc.strerror or exc}") from exc
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StateLocked(
                        f"another upgrader is using {self.directory} for "
                        f"{self.task_type.name}; try again when it has finished"
                    ) from None
            yield
        finally:
            os.close(fd)

    def load(self) -> UpgradeState | None:
        """The persisted state, or None when there is none.

        A state file that cannot be parsed is moved aside together with its partial package
        (``fota.json.N.corrupt``, ``fota.part.N.corrupt``, N counting up) and None is returned: a
        device must be able to start over rather than stay stuck. The :data:`KEEP_QUARANTINED`
        newest quarantines are kept for inspection; older ones are deleted.
        """
        self._remove_stale_temporaries()
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc}") from exc
        try:
            state = UpgradeState.from_json(json.loads(raw))
            if state.task_type is not self.task_type:
                raise ValueError(f"it is for {state.task_type.name}")
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
            self._quarantine()
            return None
        return state

    def _quarantine(self) -> None:
        # Numbered, not timestamped: a device without a real-time clock may boot in 1970, and a
        # rename keeps the file's old mtime, so neither clock orders quarantines reliably.
        generation = 1 + max((found[0] for found in self._scan_quarantined()), default=0)
        moved: list[str] = []
        for path in (self.state_path, self.partial_path):
            target = path.with_name(f"{path.name}.{generation}.corrupt")
            try:
                os.replace(path, target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateError(f"cannot move unreadable {path} aside: {exc}") from exc
            moved.append(target.name)
        self._fsync_directory()
        # Not the parse error: it may quote a field of the task, such as the token.
        logger.warning(
            "%s cannot be parsed; starting over, moved aside as %s",
            self.state_path,
            " and ".join(moved),
        )
        self._prune_quarantined()

    def _scan_quarantined(self) -> list[tuple[int, str, bool]]:
        """(generation, name, is a regular file) of every entry named like our quarantines."""
        found: list[tuple[int, str, bool]] = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    match = self._quarantined_name.fullmatch(entry.name)
                    if match is None:
                        continue
                    try:
                        regular = entry.is_file(follow_symlinks=False)
                    except OSError:
                        regular = False
                    found.append((int(match[1] or 0), entry.name, regular))
        except OSError as exc:
            raise StateError(f"cannot list state directory {self.directory}: {exc}") from exc
        return found

    def _prune_quarantined(self) -> None:
        # Only regular files are ours to delete: a symlink or a directory under one of our names
        # was put there by someone else, and is neither counted nor touched. unlink never follows
        # a symlink, and each name is one entry of this directory, so nothing outside is reached.
        try:
            found = [
                (generation, name)
                for generation, name, regular in self._scan_quarantined()
                if regular
            ]
        except StateError as exc:
            logger.warning("old quarantined state files not removed: %s", exc)
            return
        keep = sorted({generation for generation, _ in found}, reverse=True)[:KEEP_QUARANTINED]
        for generation, name in sorted(found):
            if generation in keep:
                continue
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("cannot remove old quarantined state file %s: %s", name, exc)
                continue
            logger.info("removed old quarantined state file %s from %s", name, self.directory)

    def _remove_stale_temporaries(self) -> None:
        prefix = _TMP_PREFIX + self.state_path.name
        with contextlib.suppress(OSError):
            for entry in self.directory.iterdir():
                if entry.name.startswith(prefix):
                    entry.unlink(missing_ok=True)

    def save(self, state: UpgradeState) -> None:
        """Persist ``state`` atomically (temp file, fsync, rename, directory fsync).

        Raises :class:`OSError` as is (ENOSPC included): the caller maps it to a status code.
        """
        if state.task_type is not self.task_type:
            raise ValueError("state of another task type")
        self._ensure_directory()
        data = json.dumps(state.to_json(), separators=(",", ":")).encode()
        fd, tmp_name = tempfile.mkstemp(
            prefix=_TMP_PREFIX + self.state_path.name, dir=self.directory
        )
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on directories; the rename still stands
            pass
        finally:
            os.close(fd)

    def open_partial(self, offset: int) -> PartialFile:
        """Open the partial package positioned at ``offset``, with the MD5 of bytes before it.

        Bytes past ``offset`` (written but never covered by a durable offset) are cut off. If the
        file is shorter than ``offset`` (the disk lost data it had acknowledged), everything is
        discarded and the returned file starts at 0: the caller sees that in ``offset``.
        """
        self._ensure_directory()
        file = self._opener(self.partial_path)
        try:
            size = file.seek(0, os.SEEK_END)
            if size < offset:
                offset = 0
            if size != offset:
                file.truncate(offset)
                file.flush()
                os.fsync(file.fileno())
            md5 = hashlib.md5(usedforsecurity=False)
            file.seek(0)
            left = offset
            while left:
                block = file.read(min(_READ_BLOCK, left))
                if not block:
                    raise OSError(errno.EIO, f"{self.partial_path} shrank while being read")
                md5.update(block)
                left -= len(block)
            return PartialFile(file, offset, md5)
        except BaseException:
            file.close()
            raise

    def discard_partial(self) -> None:
        """Delete the partial package."""
        self.partial_path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget the upgrade: remove the partial package, then the state file."""
        self.discard_partial()
        self.state_path.unlink(missing_ok=True)
        self._fsync_directory()

"""Content-addressed package storage under the data directory.

Files are stored by SHA-256 at ``packages/ab/abcdef...``; names come only from hex digests, never
from user input, so no path can escape the data directory. Writes go to a temporary file in the
same directory, are fsynced and renamed into place, so a file is either whole or absent.

A server that dies mid-write leaves a partial file in ``tmp``, and one that dies between deleting a
package's row and its file leaves a file no package refers to; both are harmless and removed at
the next start (``sweep_tmp`` here, the orphans by ``AdminService.sweep_storage``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class BlobTooLarge(Exception):
    """An upload exceeded the configured size limit; nothing was stored."""


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """What the store computed while writing a file."""

    sha256: str
    md5: str
    size: int


class BlobStore:
    """Package files, addressed by SHA-256, under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the file with digest ``sha256`` lives (whether or not it exists)."""
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError("not a lower-case SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the file is stored."""
        return self.path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove the file if present."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def clock(self) -> float:
        """The storage's own time: the modification time of a file created now.

        File ages are measured against it rather than this host's clock, because on a storage
        shared by several hosts the file server stamps the files with its own time.
        """
        with tempfile.NamedTemporaryFile(dir=self._tmp, prefix="clock-") as probe:
            return os.fstat(probe.fileno()).st_mtime

    def sweep_tmp(self, stale_after: float) -> int:
        """Remove the files in ``tmp`` unmodified for ``stale_after`` seconds; returns how many.

        Only a server that died while writing leaves files there (a partial upload). A live
        upload writes its file whenever data arrives and the HTTP layer ends one that stays quiet
        past its idle timeout, so a ``stale_after`` well above that timeout never removes an
        upload still being received, by any process or host sharing this directory.
        """
        now = self.clock()
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # removed by another sweep
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if now - entry.stat(follow_symlinks=False).st_mtime < stale_after:
                        continue
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def stale(self, stale_after: float) -> Iterator[str]:
        """Digests of the stored files unmodified for ``stale_after`` seconds."""
        now = self.clock()
        with os.scandir(self.root) as folders:
            for folder in folders:
                if folder.name == "tmp" or not folder.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(folder.path) as files:
                    for entry in files:
                        if _SHA256_RE.fullmatch(entry.name) is None:
                            continue  # not a file this store wrote: leave it alone
                        with contextlib.suppress(FileNotFoundError):
                            if now - entry.stat(follow_symlinks=False).st_mtime >= stale_after:
                                yield entry.name

    def is_stale(self, sha256: str, stale_after: float) -> bool:
        """Whether the stored file exists and is unmodified for ``stale_after`` seconds."""
        try:
            modified = self.path(sha256).stat().st_mtime
        except FileNotFoundError:
            return False
        return self.clock() - modified >= stale_after

    def put_bytes(self, data: bytes) -> StoredBlob:
        """Store ``data``; returns its digests."""
        return self.put_chunks([data], limit=None)

    def put_chunks(self, chunks: Iterable[bytes], *, limit: int | None) -> StoredBlob:
        """Store the concatenation of ``chunks`` atomically; raises :class:`BlobTooLarge`."""
        writer = _Writer(self, limit)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.abort()

    async def put_stream(self, chunks: AsyncIterator[bytes], *, limit: int | None) -> StoredBlob:
        """Like :meth:`put_chunks` for an async source (an upload being received)."""
        writer = _Writer(self, limit)
        try:
            async for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.abort()


class _Writer:
    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self._store = store
        self._limit = limit
        fd, name = tempfile.mkstemp(dir=store._tmp, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self._name: str | None = name
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._limit is not None and self._size > self._limit:
            raise BlobTooLarge(self._limit)
        self._sha256.update(chunk)
        self._md5.update(chunk)
        self._file.write(chunk)

    def commit(self) -> StoredBlob:
        assert self._name is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha = self._sha256.hexdigest()
        final = self._store.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._name, final)
        self._name = None
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return StoredBlob(sha256=sha, md5=self._md5.hexdigest(), size=self._size)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name)
            self._name = None

"""Content-addressed package storage under the data directory.

Files are stored by SHA-256 at ``packages/ab/abcdef...``; names come only from hex digests, never
from user input, so no path can escape the data directory. Writes go to a temporary file in the
same directory, are fsynced and renamed into place, so a file is either whole or absent.

A server that dies mid-write leaves a partial file in ``tmp``, and one that dies between deleting a
package's row and its file leaves a file no package refers to; both are harmless and removed at
the next start (``sweep_tmp`` here, the orphans by ``AdminService.sweep_storage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Upload bytes that may wait on the event loop while the writer thread is busy (see put_stream).
_PENDING_MAX = 1 << 20


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
        """Like :meth:`put_chunks` for an async source (an upload being received).

        Hashing, writing and the final fsync run in a thread of the upload's own, never on the
        event loop, which also serves devices: a large package would otherwise stall their
        requests. Chunks that arrive while the thread writes are collected and handed over
        together when it is done; once :data:`_PENDING_MAX` bytes wait, the source is not read
        until the thread has caught up (the HTTP layer then stops reading the socket), so an
        upload never sits in memory whole.
        """
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onenet-ota-upload")
        writer: _Writer | None = None
        writing: asyncio.Future[None] | None = None
        try:
            writer = await loop.run_in_executor(pool, _Writer, self, limit)
            pending: list[bytes] = []
            pending_size = 0
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BlobTooLarge(limit)
                pending.append(chunk)
                pending_size += len(chunk)
                if writing is not None and (writing.done() or pending_size >= _PENDING_MAX):
                    await writing  # raises what the thread raised (a full disk, say)
                    writing = None
                if writing is None:
                    writing = loop.run_in_executor(pool, writer.write_all, pending)
                    pending = []
                    pending_size = 0
            if writing is not None:
                await writing
                writing = None
            return await loop.run_in_executor(pool, writer.commit, pending)
        finally:
            # A write still in flight no longer matters: the removal below runs after it, and
            # cancel() also keeps asyncio from logging a failure of it that nobody awaited (the
            # error being raised is the one to report).
            if writing is not None:
                writing.cancel()
            removed = loop.run_in_executor(pool, writer.abort) if writer is not None else None
            pool.shutdown(wait=False)
            if removed is not None:
                # After anything still in flight (one thread, in order); a no-op once committed.
                await removed


class _Writer:
    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self._store = store
        self._limit = limit
        fd, name = tempfile.mkstemp(dir=store._tmp, prefix="upload-")
        # Unbuffered: every write reaches the file at once, which keeps a slow upload's
        # modification time current (sweep_tmp judges liveness by it).
        self._file = os.fdopen(fd, "wb", buffering=0)
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
        view = memoryview(chunk)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]

    def write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def commit(self, last: Iterable[bytes] = ()) -> StoredBlob:
        """Write ``last``, then make the file durable under its content address."""
        assert self._name is not None
        self.write_all(last)
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

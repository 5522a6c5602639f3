"""Every in-process cache of the device API, in one object with one invalidation story.

:class:`DeviceCaches` owns them all; :class:`~.device_service.DeviceService` consults and fills the
ones about database facts inside its methods (one method per question), and
:class:`~.device_api.DeviceApi` the ones about wire bytes. Each is a
:class:`~.bounded_cache.BoundedCache` with its budget in :data:`~.bounded_cache.BUDGETS`, because
most keys are strings a client sends (see that module).

Facts read from the database (each entry lives at most ``ttl`` seconds, the bound for changes
nobody announces):

- ``principals``: verified Authorization value -> :class:`~.device_service.Principal`, tagged with
  the dev_id whose key verified it (a device-level token), re-checked against ``et`` on use;
- ``devices``: dev_id -> :class:`~.device_service.DeviceRef` for P3 (§4.2);
- ``grants``: E6 token -> :class:`~.device_service.DownloadGrant`, tagged with its dev_id;
- ``answers``: dev_id -> {question: :class:`Answer`}, the E3 and E5 answers that changed nothing.

Wire bytes, derived from the facts above and never stale by themselves:

- ``replies``: whole E3/E5 replies by request bytes, each with the
  :class:`~.device_service.Basis` it rests on; :meth:`DeviceCaches.holds` re-checks that basis
  against the fact caches on every use, so dropping the facts retires the reply;
- ``dialect_replies``: the same for Studio's S-C/S-T and fuse's F-C/F-T, as a
  :class:`ReplyTemplate` (a fuse reply gets a fresh ``request_id`` on every use, §13.2);
- ``dialect_grants``: what S-D/F-D's checks rest on (a :class:`GrantMemo`: the
  :class:`~.device_service.Basis` whose answer holds the task's grant, with what the path
  names), by (path, Authorization), re-checked in the same way;
- ``chunks``: small E6 replies by (file, Range value), served only while the token's grant is
  cached and usable, so dropping the grant retires them; a reply is kept from the second time
  its chunk is read (:meth:`DeviceCaches.keep_chunk`), so one device's own download, which
  asks every chunk once, neither pays for keeping them nor pushes out the chunks a fleet shares;
- ``task_bodies``: encoded E3/E4 replies, one per task (and cdn) split around the token that
  each device's reply splices in, ``queries``: parsed query strings,
  and ``tokens``: parsed Authorization values (their fields, not a verdict: P1 still verifies
  the signature and ``et`` with the key read from the database), all pure functions of their
  keys;
- ``files``: package files kept open for E6 (:class:`OpenFiles`), content-addressed and stat'ed on
  every use.

Invalidation: :meth:`DeviceCaches.invalidate` drops one device's facts (all of them, or with
:attr:`~.changes.Scope.TASKS` only those its tasks decide: its answers and its tokens' download
grants), :meth:`DeviceCaches.clear` everything. This process's own transitions call them at
once, the management side in the same process and the change feed (:mod:`.changes`, read by
:meth:`DeviceService.sync`) for what other processes changed. A device's request that changes
its stored versions counts as a transition (an answer cached while another version was stored
would skip recording its own, E3 step 5).
Every invalidation bumps :attr:`DeviceCaches.generation`: a fact read before an invalidation and
kept after it could be stale, so the ``keep_*`` methods refuse it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from onenet_ota import auth
from onenet_ota.protocol.envelopes import new_request_id
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import TaskInfo, TidTaskInfo
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.bounded_cache import BUDGETS, BoundedCache, weigh
from onenet_ota.server.changes import Scope
from onenet_ota.server.http import Response
from onenet_ota.server.timeline import body_length

if TYPE_CHECKING:
    from onenet_ota.server.device_service import (
        Basis,
        DeviceRef,
        DownloadGrant,
        Principal,
        TidGrant,
    )
    from onenet_ota.server.timeline import ServedBytes

__all__ = [
    "Answer",
    "Clock",
    "DeviceCaches",
    "GrantMemo",
    "MemoKey",
    "OpenFiles",
    "PackageFile",
    "ReplyTemplate",
    "check_task_key",
    "check_token_key",
    "chunk_key",
]

Clock = Callable[[], float]
MemoKey = tuple[str, str, str]  # (path, query string, Authorization)
# (sha256, size, file name, Range value, dialect): each dialect frames the same bytes its way.
ChunkKey = tuple[str, int, str, str | None, str]
# Builds the reply of a chunk not cached yet from the package file open at descriptor ``fd``
# (of the key's size), or None when the range is not one to cache: (fd, key) -> reply.
ChunkBuilder = Callable[[int, ChunkKey], Response | None]


class PackageFile(Protocol):
    """What a download grant (E6's or S-D/F-D's) says of the package file it serves."""

    @property
    def sha256(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def file_name(self) -> str: ...


def chunk_key(grant: PackageFile, range_value: str | None, dialect: str) -> ChunkKey:
    """The ``chunks`` key of a download reply: the grant's file, the Range value as sent
    (None: no Range) and the dialect whose framing the reply has."""
    return (grant.sha256, grant.size, grant.file_name, range_value, dialect)


# What cached values hold beyond their strings, for the caches' byte accounting (CPython 3.11):
# a small slotted object about 60-100 bytes; a dict entry about 100; a TaskInfo with its strings
# about 500.
OBJECT_BYTES: Final = 100
ENTRY_BYTES: Final = 100
_TASK_INFO_BYTES: Final = 500
_MAX_ANSWERS: Final = 16  # per device: a device asks few distinct questions; bound the odd one
# Chunk keys read once and remembered by their hash (keep_chunk): 16384 ints take about 1 MiB,
# and cover a 64 MiB package in 4 KiB chunks.
_SEEN_CHUNKS: Final = 16384


@dataclass(frozen=True, slots=True)
class Answer:
    """A cached E3 or E5 answer that changed nothing, and until when (clock time) it holds."""

    errno: Errno
    info: TaskInfo | None
    valid_until: float
    tid_info: TidTaskInfo | None = None  # S-C/F-C's answer (the path dialects)
    grant: TidGrant | None = None  # S-D/F-D's task lookup
    status: int | None = None  # S-T/F-T's ``status`` (1-6)


@dataclass(frozen=True, slots=True)
class GrantMemo:
    """What a memoised S-D/F-D rests on (``basis``, re-checked by :meth:`DeviceCaches.holds`
    on every use) and what its path names, so that a repeated download needs no route: the
    device task (``tid``) and the dialect (its value, part of a cached chunk's key)."""

    basis: Basis
    tid: int
    dialect: str


@dataclass(frozen=True, slots=True)
class ReplyTemplate:
    """A memoised Studio or fuse JSON reply.

    A Studio reply is sent as it is. A fuse reply carries a ``request_id`` that is random per
    response (§13.2), so its body is kept split around that id (``head``, ``tail``) and
    :meth:`render` splices a fresh one in: the same length, so the headers stay valid.
    """

    response: Response
    head: bytes = b""
    tail: bytes = b""
    spliced: bool = False

    @classmethod
    def of(cls, response: Response, request_id: str | None) -> ReplyTemplate:
        """The template of ``response``, whose body holds ``request_id`` (None: no id)."""
        body = response.body
        assert isinstance(body, bytes)
        if request_id is None:
            return cls(response)
        # The envelope's keys come in a fixed order (§13.2): code, msg, request_id, data, so
        # the first occurrence of the key is the id's, whatever the data holds.
        start = body.index(_REQUEST_ID_KEY) + len(_REQUEST_ID_KEY)
        if body[start : start + len(request_id)] != request_id.encode():
            raise ValueError("the reply's request_id is not where the envelope puts it")
        return cls(response, body[:start], body[start + len(request_id) :], True)

    def render(self) -> Response:
        """The response to send now."""
        if not self.spliced:
            return self.response
        body = self.head + new_request_id().encode() + self.tail
        response = self.response
        rendered = Response(response.status, response.headers, body)
        rendered.keep_alive_head = response.keep_alive_head  # the same headers and length
        return rendered


_REQUEST_ID_KEY: Final = b'"request_id":"'


def check_tid_task_key(task_type: TaskType, version: str) -> tuple[Any, ...]:
    """The ``answers`` key of an S-C/F-C question."""
    return ("S-C", task_type, version)


def download_tid_key(tid: int) -> tuple[Any, ...]:
    """The ``answers`` key of an S-D/F-D task lookup."""
    return ("S-D", tid)


def check_state_tid_key(tid: int, refuses: bool) -> tuple[Any, ...]:
    """The ``answers`` key of an S-T (``refuses``) or F-T question: the two dialects answer
    the same task differently (S6, F7)."""
    return ("S-T", tid, refuses)


def reached_latest_key(task_type: TaskType, version: str) -> tuple[Any, ...]:
    """The ``answers`` key of F6's question: did the latest task of ``task_type`` end with
    ``version`` reached?"""
    return ("F6", task_type, version)


def check_task_key(
    task_type: TaskType, version: str, manuf: str | None, model: str | None
) -> tuple[Any, ...]:
    """The ``answers`` key of an E3 question."""
    return ("E3", task_type, version, manuf, model)


def check_token_key(token: str) -> tuple[Any, ...]:
    """The ``answers`` key of an E5 question."""
    return ("E5", token)


class DeviceCaches:
    """The device API's caches (see the module docstring). ``ttl`` is the longest a fact lives
    (0 or less: no fact is cached), ``clock`` returns Unix seconds; ``blobs``, when given, is where
    :attr:`files` opens package files.

    The ``BoundedCache`` attributes are public so that hot paths reach them in one lookup; their
    entries are put through the ``keep_*`` methods (facts) or directly (wire bytes).
    """

    def __init__(self, *, ttl: float, clock: Clock, blobs: BlobStore | None = None) -> None:
        self.ttl = ttl
        self._clock = clock
        self.principals: BoundedCache[str, Principal] = BoundedCache(BUDGETS.principals, ttl=ttl)
        self.devices: BoundedCache[int, DeviceRef] = BoundedCache(BUDGETS.devices, ttl=ttl)
        # Studio and fuse name a device by (pid, name) in the path (§12.1): its dev_id, tagged
        # with it.
        self.names: BoundedCache[tuple[str, str], int] = BoundedCache(BUDGETS.names, ttl=ttl)
        self.grants: BoundedCache[str, DownloadGrant] = BoundedCache(BUDGETS.grants, ttl=ttl)
        # Each dict is replaced, never changed, once cached (its size was charged when put).
        self.answers: BoundedCache[int, dict[tuple[Any, ...], Answer]] = BoundedCache(
            BUDGETS.answers, ttl=ttl
        )
        self.replies: BoundedCache[MemoKey, tuple[Basis, Response]] = BoundedCache(BUDGETS.replies)
        # Studio and fuse: whole S-C/S-T/F-C/F-T replies, kept as a template (a fuse reply gets
        # a fresh request_id spliced in on every use, §13.2).
        self.dialect_replies: BoundedCache[MemoKey, tuple[Basis, ReplyTemplate]] = BoundedCache(
            BUDGETS.dialect_replies
        )
        # Studio and fuse downloads: what S-D/F-D's checks rest on, by (path, Authorization).
        self.dialect_grants: BoundedCache[tuple[str, str], GrantMemo] = BoundedCache(
            BUDGETS.dialect_grants
        )
        self.chunks: BoundedCache[ChunkKey, Response] = BoundedCache(BUDGETS.chunks)
        # The hashes of chunk keys read once and not kept (see keep_chunk): at most
        # _SEEN_CHUNKS ints, whatever clients send.
        self._seen_chunks: set[int] = set()
        # (errno, the task info's fields but its token, cdn) -> the body before and after the
        # token.
        self.task_bodies: BoundedCache[tuple[Errno, tuple[Any, ...], bool], tuple[bytes, bytes]]
        self.task_bodies = BoundedCache(BUDGETS.task_bodies)
        self.queries: BoundedCache[str, dict[str, str]] = BoundedCache(BUDGETS.queries)
        self.tokens: BoundedCache[str, auth.AnyToken] = BoundedCache(BUDGETS.tokens)
        self.files = OpenFiles(blobs) if blobs is not None else None
        self.generation = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the open package files, if any."""
        if self.files is not None:
            self.files.close()

    # -- invalidation --------------------------------------------------------------------------

    def invalidate(self, dev_id: int, scope: Scope = Scope.DEVICE) -> None:
        """Forget what is cached about one device: its answers and its tokens' download grants,
        and unless only its tasks changed (``scope``), its row and the tokens verified with its
        key too (it may have been deleted, and its name given to a new device with another key,
        or have had its key rotated). Replies and chunks resting on them are retired by the
        checks that serve them."""
        with self._lock:
            self.generation += 1
            self.grants.pop_tag(dev_id)
            self.answers.pop(dev_id)
            if scope is Scope.TASKS:
                # A transition or a version report: the device's row and keys are unchanged,
                # and dropping them would cost every device a P1 and a P3 read per transition.
                return
            self.devices.pop(dev_id)
            self.names.pop_tag(dev_id)
            self.principals.pop_tag(dev_id)

    def clear(self) -> None:
        """Forget everything cached (the open files stay: they cannot be stale)."""
        with self._lock:
            self.generation += 1
            for cache in (
                self.grants,
                self.answers,
                self.principals,
                self.devices,
                self.names,
                self.replies,
                self.dialect_replies,
                self.dialect_grants,
                self.chunks,
            ):
                cache.clear()
            self._seen_chunks.clear()

    def forget_chunks(self) -> None:
        """Forget the cached chunks and which chunks were read: the next read of any chunk is
        its first."""
        self.chunks.clear()
        self._seen_chunks.clear()

    # -- wire bytes ----------------------------------------------------------------------------

    def serve_chunk(
        self,
        key: ChunkKey,
        served: ServedBytes,
        device_task_id: int,
        build: ChunkBuilder | None = None,
    ) -> Response | None:
        """The download reply for ``key`` from the chunk cache, or None to go the full way: what
        every cached-download fast path does once its grant is known to be usable.

        The reply is served while the package file is open and its path still names a file of
        the size the key names (D6 steps 3-4: a file deleted, replaced or resized goes the full
        way, which answers its error). A reply not cached yet is built by ``build`` from the
        open file and kept, if given; one device's own download finds every chunk new. The
        reply's bytes are counted as served for ``device_task_id``.
        """
        files = self.files
        if files is None:
            return None
        sha256, size = key[0], key[1]
        cached = self.chunks.get(key)
        if cached is None:
            if build is None:
                return None
            opened = files.open_if_current(sha256)
            if opened is None or opened[1] != size:
                return None
            cached = build(opened[0], key)
            if cached is None:
                return None
        elif files.size_if_open(sha256) != size:
            return None
        served.add(device_task_id, body_length(cached))
        return cached

    def keep_chunk(self, key: ChunkKey, response: Response) -> None:
        """Keep the download reply ``response`` for ``key`` if its chunk was read before.

        Every device of a task fetches the same chunks, so the second read of one is a sign of
        more to come; a chunk read once is one device's own download (a package nobody else
        fetches, or fetches much later), which would pay for weighing and storing every chunk and
        push the shared ones out of the budget for nothing. The first read only leaves the
        key's hash behind. A hash that another key shares only keeps a reply at its first read,
        as every read did before.
        """
        seen = self._seen_chunks
        marker = hash(key)
        if marker not in seen:
            if len(seen) >= _SEEN_CHUNKS:
                seen.clear()  # bounded; the cost is one more read of a chunk seen before
            seen.add(marker)
            return
        seen.discard(marker)
        self.chunks.put(key, response, response_bytes(response))

    # -- facts: lookups ------------------------------------------------------------------------

    def principal(self, authorization: str) -> Principal | None:
        """The principal of this exact Authorization value, if cached and within its ``et``."""
        principal = self.principals.get(authorization)
        if principal is None or principal.expires_at < self._clock():
            return None
        return principal

    def device(self, dev_id: int) -> DeviceRef | None:
        """The cached device row for P3, if any."""
        return self.devices.get(dev_id)

    def grant(self, token: str) -> DownloadGrant | None:
        """The cached E6 grant of ``token``, if any (its usability is the caller's to check)."""
        return self.grants.get(token)

    def answer(self, dev_id: int, key: tuple[Any, ...]) -> Answer | None:
        """The cached answer to question ``key`` of device ``dev_id``, if it still holds."""
        entries = self.answers.get(dev_id)
        answer = None if entries is None else entries.get(key)
        if answer is None or answer.valid_until <= self._clock():
            return None
        return answer

    def check_task(
        self,
        dev_id: int,
        task_type: TaskType,
        version: str,
        *,
        manuf: str | None = None,
        model: str | None = None,
    ) -> tuple[Errno, TaskInfo | None] | None:
        """The cached E3 answer to this question, if any still holds: not older than ``ttl``,
        not invalidated, the token not expired, the deadline not passed, a not-yet-started task
        still not started."""
        answer = self.answer(dev_id, check_task_key(task_type, version, manuf, model))
        return None if answer is None else (answer.errno, answer.info)

    def check_token(self, dev_id: int, token: str) -> Errno | None:
        """The cached successful E5 answer for ``token``, if it still holds."""
        answer = self.answer(dev_id, check_token_key(token))
        return None if answer is None else answer.errno

    def holds(self, basis: Basis) -> bool:
        """Whether every fact a memoised reply rests on is still the one cached (see
        :class:`~.device_service.Basis`): the times, and while nothing was invalidated since
        the basis was taken and no fact reached its TTL, nothing else; else a few dictionary
        lookups."""
        now = self._clock()
        if basis.principal.expires_at < now or basis.answer.valid_until <= now:
            return False
        if basis.generation == self.generation and time.monotonic() < basis.fresh_until:
            return True  # no invalidation since: every fact is still the one cached
        if self.principals.get(basis.authorization) is not basis.principal:
            return False
        if basis.named:
            # Studio and fuse name the device in the path: P3 rests on the (pid, name) entry,
            # dropped with the device's other facts (invalidate).
            device = basis.device
            if self.names.get((device.pid, device.name)) != basis.dev_id:
                return False
        elif self.devices.get(basis.dev_id) is not basis.device:
            return False
        entries = self.answers.get(basis.dev_id)
        return entries is not None and entries.get(basis.key) is basis.answer

    def fresh_until(self, authorization: str, device_expires: float | None, dev_id: int) -> float:
        """When the first of a basis's entries reaches its TTL (monotonic seconds): the
        principal of ``authorization``, the device's entry (``device_expires``) and the answers
        of ``dev_id``; 0 when one is missing."""
        times = (
            self.principals.expires(authorization),
            device_expires,
            self.answers.expires(dev_id),
        )
        return 0.0 if None in times else min(t for t in times if t is not None)

    # -- facts: keeping ------------------------------------------------------------------------
    # ``generation`` is the value read before the database was: if an invalidation ran since,
    # the fact may be stale already and is not kept (the caller still uses it once).

    def _replacing(self, cache: BoundedCache[Any, Any], key: Hashable) -> None:
        # Called with the lock held, before a fact replaces another: a memo resting on the old
        # one must not pass holds() on the generation alone.
        if key in cache:
            self.generation += 1

    def keep_principal(
        self, generation: int, authorization: str, principal: Principal, tag: Hashable
    ) -> None:
        """Cache a verified Authorization value, tagged with the dev_id whose key verified it."""
        if self.ttl <= 0:
            return  # caching nothing: skip the weighing too
        size = OBJECT_BYTES + weigh(principal.pid) + weigh(principal.device_name)
        with self._lock:
            if generation == self.generation:
                self._replacing(self.principals, authorization)
                self.principals.put(authorization, principal, size, tag=tag)

    def keep_name(self, generation: int, pid: str, name: str, dev_id: int) -> None:
        """Cache the dev_id of device ``name`` of product ``pid``, unless an invalidation came
        after ``generation`` (the row read may be older than it)."""
        if self.ttl <= 0:
            return
        size = OBJECT_BYTES + weigh(pid) + weigh(name)
        with self._lock:
            if generation == self.generation:
                self._replacing(self.names, (pid, name))
                self.names.put((pid, name), dev_id, size, tag=dev_id)

    def keep_device(self, ref: DeviceRef) -> None:
        """Cache a device row read for P3."""
        if self.ttl <= 0:
            return
        with self._lock:
            self._replacing(self.devices, ref.dev_id)
            self.devices.put(ref.dev_id, ref, OBJECT_BYTES + weigh(ref.pid) + weigh(ref.name))

    def keep_grant(self, generation: int, token: str, grant: DownloadGrant) -> None:
        """Cache E6's grant for ``token``, tagged with its device."""
        if self.ttl <= 0:
            return
        size = OBJECT_BYTES + weigh(grant.sha256) + weigh(grant.file_name)
        with self._lock:
            if generation == self.generation:
                self.grants.put(token, grant, size, tag=grant.dev_id)

    def keep_answer(
        self, generation: int, dev_id: int, key: tuple[Any, ...], answer: Answer
    ) -> None:
        """Cache an answer that changed nothing, next to the device's other answers."""
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            entries = self.answers.get(dev_id) or {}
            if len(entries) >= _MAX_ANSWERS:
                return
            if key in entries:
                self.generation += 1  # a memo may rest on the answer replaced
            # A new dict: holds() compares the answers themselves, which stay the same objects.
            entries = {**entries, key: answer}
            size = sum(ENTRY_BYTES + weigh(k) + OBJECT_BYTES for k in entries)
            if answer.info is not None or answer.tid_info is not None or answer.grant is not None:
                size += len(entries) * _TASK_INFO_BYTES
            self.answers.put(dev_id, entries, size, renew=False)  # the oldest answer's TTL


class OpenFiles:
    """Package files kept open for E6, so that a 4 KiB chunk costs a stat and a pread.

    Every use stats the path: a missing file is still byte 1 and a changed size byte 2 at once.
    A descriptor is reopened when the path names another file (inode changed) and at least every
    ``ttl`` seconds. Files are content-addressed, so an open descriptor never serves other bytes
    than the path. Used from the event loop only.
    """

    def __init__(self, blobs: BlobStore, ttl: float = 5.0, max_open: int = 64) -> None:
        self._blobs = blobs
        self._ttl = ttl
        self._max_open = max_open
        self._paths: dict[str, str] = {}  # sha256 -> path (pathlib is slow per request)
        self._open: dict[str, tuple[int, int, int, float]] = {}  # sha256 -> fd, dev, ino, until

    def _path(self, sha256: str) -> str:
        path = self._paths.get(sha256)
        if path is None:
            if len(self._paths) >= 4096:
                self._paths.clear()
            path = self._paths[sha256] = str(self._blobs.path(sha256))
        return path

    def size_if_open(self, sha256: str) -> int | None:
        """The size of the file if it is open and its path still names it, else None.

        fstat costs a tenth of a path lookup; a link count of zero means the path no longer
        names this file (deleted or replaced; the store never makes hard links).
        """
        found = self.open_if_current(sha256)
        return None if found is None else found[1]

    def open_if_current(self, sha256: str) -> tuple[int, int] | None:
        """(descriptor, size) of the file if it is open and its path still names it, else None
        (see :meth:`size_if_open`): a read of a range a cache does not hold yet needs no path
        lookup either."""
        entry = self._open.get(sha256)
        if entry is None:
            return None
        try:
            st = os.fstat(entry[0])
        except OSError:
            return None
        return (entry[0], st.st_size) if st.st_nlink else None

    def get(self, sha256: str) -> tuple[str, int, int]:
        """(path, descriptor, size) of the file; FileNotFoundError if missing, OSError."""
        path = self._path(sha256)
        st = os.stat(path)
        entry = self._open.get(sha256)
        if entry is not None:
            fd, dev, ino, until = entry
            if (dev, ino) == (st.st_dev, st.st_ino) and time.monotonic() < until:
                return path, fd, st.st_size
            del self._open[sha256]
            os.close(fd)
        if len(self._open) >= self._max_open:
            self.close()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        opened = os.fstat(fd)
        self._open[sha256] = (fd, opened.st_dev, opened.st_ino, time.monotonic() + self._ttl)
        return path, fd, opened.st_size

    def close(self) -> None:
        """Close every descriptor."""
        entries, self._open = self._open, {}
        for fd, *_ in entries.values():
            os.close(fd)


# A cached header (a tuple of two strings in a list), about, beyond its text (CPython 3.11).
HEADER_BYTES: Final = 150


def response_bytes(response: Response) -> int:
    """About what a cached response holds: the object, its headers and its body."""
    size = OBJECT_BYTES + weigh(response.body) if isinstance(response.body, bytes) else 1000
    for name, value in response.headers:
        size += HEADER_BYTES + len(name) + len(value)
    return size

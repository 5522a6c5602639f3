"""One kind of in-process cache for the device API, bounded by the memory it holds.

Every cache of :mod:`.device_api` and :mod:`.device_service` is a :class:`BoundedCache`. Many of
their keys are strings a client sends (an Authorization value, a query string), so a bound on the
number of entries bounds nothing: one device with valid credentials can make every entry as large
as a request head (16 KiB) by padding its requests with junk that changes nothing in the answer.
So each cache counts bytes: every entry is charged what its key and value hold (:func:`weigh`
for the key, the caller's estimate for the value) plus a fixed overhead, and the oldest entries
go first when a new one would pass the budget. The estimate follows CPython's object sizes
closely enough for large entries (a string of n ASCII characters holds n + 49 bytes); the fixed
overhead covers the bookkeeping of small ones.

The budgets of all device-API caches are in :data:`BUDGETS`, per process (each worker of
``serve --workers N`` has its own): their sum is the most that client traffic can make the
caches hold, whatever the clients send.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

__all__ = ["BUDGETS", "ENTRY_OVERHEAD", "BoundedCache", "Budgets", "weigh"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MIB: Final = 1024 * 1024
ENTRY_OVERHEAD: Final = 200
"""Bytes charged per entry beyond its key and value: the ordered dict's slot and link, the
entry's tuple (measured on CPython 3.11: about 180 for an int key)."""
_NEVER: Final = float("inf")
_TAG_OVERHEAD: Final = 100  # a tag's set, charged once per tagged entry (a set slot per key)


@dataclass(frozen=True, slots=True)
class Budgets:
    """The byte budget of each device-API cache (per process)."""

    # Entries of a typical request, as charged: a principal 550-700 bytes (one per device with
    # device-level tokens, one per product with the C SDK's product-level one), a device row 450,
    # a grant 650, a device's E3 answer 1.2 KiB, a memoised reply 1.5 KiB, a parsed query 1 KiB,
    # a 4 KiB chunk 5.5 KiB. So about 25 000 devices' principals, 16 000 memoised replies.
    principals: int = 16 * _MIB  # verified Authorization value -> principal (P1)
    devices: int = 8 * _MIB  # dev_id -> (pid, name) for P3
    grants: int = 8 * _MIB  # E6 token -> download grant
    answers: int = 16 * _MIB  # dev_id -> cached E3/E5 answers by question
    replies: int = 24 * _MIB  # whole E3/E5 replies by request bytes (the memo)
    dialect_replies: int = 8 * _MIB  # the same for Studio/fuse S-C, S-T, F-C, F-T
    dialect_grants: int = 8 * _MIB  # S-D/F-D: (path, Authorization) -> what its checks rest on
    queries: int = 2 * _MIB  # query string -> parsed parameters
    task_bodies: int = 2 * _MIB  # encoded E3/E4 task replies per task and cdn, token spliced in
    chunks: int = 16 * _MIB  # small E6 replies by (file, served range)
    names: int = 8 * _MIB  # Studio/fuse (pid, name) in the path -> dev_id
    routes: int = 2 * _MIB  # Studio/fuse request path -> its matched route
    tokens: int = 4 * _MIB  # Authorization value -> its parsed fields (not verified: P1 is not)

    @property
    def total(self) -> int:
        """The sum of every budget: the most the device-API caches hold together."""
        return sum(getattr(self, name) for name in self.__slots__)


BUDGETS: Final = Budgets()


def weigh(obj: object) -> int:
    """About how many bytes ``obj`` holds: strings and bytes by length, tuples by their items,
    anything else one small object (ints, enums, None; larger values are the caller's to add)."""
    if isinstance(obj, str):
        # CPython stores an ASCII string in one byte per character, others in up to four.
        return 49 + (len(obj) if obj.isascii() else 4 * len(obj))
    if isinstance(obj, bytes):
        return 33 + len(obj)
    if isinstance(obj, tuple):
        # A loop, not sum() over a generator: a chunk's key is weighed on every new chunk.
        size = 40 + 8 * len(obj)
        for item in obj:
            size += weigh(item)
        return size
    return 32


class BoundedCache(Generic[K, V]):
    """A map that holds at most ``max_bytes`` (as charged by :func:`weigh` and the callers),
    dropping its oldest entries first. Thread-safe; a lookup takes no lock.

    ``ttl`` (seconds of monotonic time) is how long an entry lives: None for ever (until evicted
    or dropped), 0 or less to cache nothing at all. An entry may carry a ``tag`` (a dev_id):
    :meth:`pop_tag` drops every entry put with it, for caches whose keys do not name what they
    depend on (a verified Authorization value depends on its device's key).
    """

    __slots__ = ("_bytes", "_hits", "_items", "_lock", "_max", "_misses", "_tags", "_ttl")

    def __init__(self, max_bytes: int, *, ttl: float | None = None) -> None:
        self._max = max_bytes
        self._ttl = ttl
        self._bytes = 0
        # key -> (expiry on the monotonic clock or None, value, bytes charged, tag or None)
        self._items: OrderedDict[K, tuple[float | None, V, int, Hashable]] = OrderedDict()
        self._tags: dict[Hashable, set[K]] = {}
        self._lock = threading.Lock()
        # Lookups counted for the metrics (server/metrics.py): plain increments, no lock, so a
        # count may lose one when two threads look up at once; only the event loop's thread
        # looks up often.
        self._hits = 0
        self._misses = 0

    @property
    def hits(self) -> int:
        """Lookups that found a live entry."""
        return self._hits

    @property
    def misses(self) -> int:
        """Lookups that found nothing, or an expired entry."""
        return self._misses

    @property
    def max_bytes(self) -> int:
        """The budget."""
        return self._max

    @property
    def nbytes(self) -> int:
        """The bytes charged for the entries held now (never more than :attr:`max_bytes`)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether an entry (live or expired, not yet dropped) is held for ``key``; not counted
        as a lookup."""
        return key in self._items

    def expires(self, key: K) -> float | None:
        """When ``key``'s entry expires (monotonic seconds; infinity for a cache without a TTL),
        or None when there is none."""
        item = self._items.get(key)
        if item is None:
            return None
        return _NEVER if item[0] is None else item[0]

    def get(self, key: K) -> V | None:
        """The value for ``key``, or None when absent or expired."""
        item = self._items.get(key)
        if item is None:
            self._misses += 1
            return None
        expires = item[0]
        if expires is not None and expires <= time.monotonic():
            with self._lock:
                if self._items.get(key) is item:
                    self._remove(key)
            self._misses += 1
            return None
        self._hits += 1
        return item[1]

    def put(
        self, key: K, value: V, size: int = 0, *, tag: Hashable = None, renew: bool = True
    ) -> None:
        """Keep ``value`` for ``key``; ``size`` is what the value holds beyond the key, in bytes
        (the key is weighed here). An entry larger than the whole budget is not kept.

        ``renew=False`` keeps the expiry of the entry it replaces, if any: for a value that
        grows from an older one and must not outlive it.
        """
        ttl = self._ttl
        if ttl is not None and ttl <= 0:
            return
        charge = ENTRY_OVERHEAD + weigh(key) + size + (0 if tag is None else _TAG_OVERHEAD)
        expires = None if ttl is None else time.monotonic() + ttl
        with self._lock:
            old = self._items.get(key)
            if old is not None:
                if not renew:
                    expires = old[0]
                self._remove(key)  # re-inserted at the young end
            if charge > self._max:
                return
            while self._bytes + charge > self._max:
                self._remove(next(iter(self._items)))  # the oldest
            self._items[key] = (expires, value, charge, tag)
            self._bytes += charge
            if tag is not None:
                self._tags.setdefault(tag, set()).add(key)

    def pop(self, key: K) -> None:
        """Drop ``key``'s entry, if any."""
        with self._lock:
            if key in self._items:
                self._remove(key)

    def pop_tag(self, tag: Hashable) -> None:
        """Drop every entry put with ``tag``."""
        with self._lock:
            for key in self._tags.pop(tag, ()):
                item = self._items.pop(key, None)
                if item is not None:
                    self._bytes -= item[2]

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._tags.clear()
            self._bytes = 0

    def _remove(self, key: K) -> None:
        # Called with the lock held, for a key that is present.
        _, _, charge, tag = self._items.pop(key)
        self._bytes -= charge
        if tag is not None:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

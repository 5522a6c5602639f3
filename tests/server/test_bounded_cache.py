"""server/bounded_cache.py: the device API's caches hold at most their byte budget."""

from __future__ import annotations

import time

import pytest

from onenet_ota.server.bounded_cache import ENTRY_OVERHEAD, BoundedCache, weigh


def charge(key: str, size: int = 0) -> int:
    return ENTRY_OVERHEAD + weigh(key) + size


def test_the_oldest_entries_go_first_when_the_budget_is_reached() -> None:
    cache: BoundedCache[str, int] = BoundedCache(4 * charge("k0"))
    for n in range(4):
        cache.put(f"k{n}", n)
    assert cache.nbytes == 4 * charge("k0")
    cache.put("k1", 11)  # an update moves the entry to the young end and evicts nothing
    assert [cache.get(f"k{n}") for n in range(4)] == [0, 11, 2, 3]
    cache.put("k4", 4)
    assert cache.get("k0") is None
    assert [cache.get(f"k{n}") for n in (2, 3, 1, 4)] == [2, 3, 11, 4]
    cache.put("k5", 5, size=charge("k0"))  # twice as large: the two oldest go
    assert [key for key in ("k1", "k2", "k3", "k4", "k5") if cache.get(key) is None] == [
        "k2",
        "k3",
    ]
    assert cache.nbytes <= cache.max_bytes


def test_keys_are_charged_by_their_length() -> None:
    """A long key costs what it holds: a client padding its requests gets fewer entries."""
    cache: BoundedCache[tuple[str, str], int] = BoundedCache(1024 * 1024)
    for n in range(1000):
        cache.put(("/ota/south/check", f"{n:04d}" + " " * 10_000), n)
    assert cache.nbytes <= 1024 * 1024
    assert 90 <= len(cache) <= 110  # about 10 KiB each
    assert weigh(("a", "é" * 10)) > weigh(("a", "e" * 10))  # non-ASCII text holds more


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache: BoundedCache[str, bytes] = BoundedCache(1000)
    cache.put("small", b"")
    cache.put("big", b"", size=2000)
    assert cache.get("big") is None
    assert cache.get("small") == b""


def test_tags_drop_every_entry_put_with_them() -> None:
    cache: BoundedCache[str, int] = BoundedCache(10_000)
    cache.put("a", 1, tag=7)
    cache.put("b", 2, tag=7)
    cache.put("c", 3, tag=8)
    cache.put("d", 4)
    cache.pop_tag(7)
    assert [cache.get(key) for key in "abcd"] == [None, None, 3, 4]
    assert cache.nbytes == charge("c") + 100 + charge("d")  # a tagged entry pays for its tag
    cache.pop_tag(7)  # nothing left under it


def test_an_evicted_entry_leaves_its_tag() -> None:
    """Entries dropped for room leave nothing behind in the tag index (it would grow)."""
    cache: BoundedCache[str, int] = BoundedCache(3 * (charge("k000") + 100))
    for n in range(1000):
        cache.put(f"k{n:03d}", n, tag=n)
    assert len(cache._tags) == len(cache) == 3


def test_ttl_expires_entries_and_zero_caches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache: BoundedCache[str, int] = BoundedCache(10_000, ttl=30)
    cache.put("a", 1)
    now[0] += 29.9
    assert cache.get("a") == 1
    now[0] += 0.1
    assert cache.get("a") is None
    assert cache.nbytes == 0
    cache.put("b", 1)
    cache.put("c", 1)
    now[0] += 20
    cache.put("b", 2, renew=False)  # replaced, but no younger than the entry it replaces
    cache.put("c", 2)  # replaced and renewed
    now[0] += 15
    assert (cache.get("b"), cache.get("c")) == (None, 2)
    off: BoundedCache[str, int] = BoundedCache(10_000, ttl=0)
    off.put("a", 1)
    assert off.get("a") is None

"""Live task counters for the console's Server-Sent Events, one poll per watched task.

However many pages watch a task, this process reads its counters once per :data:`PERIOD`
and hands the result to every watcher; a watcher gets a value only when it changed. So the
database sees at most two reads a second per watched task, and a page at most two updates a
second, never one per device report. A task nobody watches is not polled.

The same hub serves the campaign pages, keyed by campaign (one read of its per-stage counters
and failed members per period). It polls rather than waking on the cache change feed
(:mod:`onenet_ota.server.changes`): the feed names devices whose cached facts changed, which
leaves out progress reports (T11), so a page's progress would stop moving; and reading the feed
is itself a poll of the database. The bound above already holds however many pages watch.

A read that costs more than :data:`BUDGET` of its period stretches the period: the counters of a
task of 100,000 devices take tens of milliseconds to read, and read twice a second they would
hold a tenth of a core for as long as one page stays open. Stretched, polling a watched task
takes about 0.5 % of a core (rendering and sending come on top); such a page then updates
every few seconds, and at least every :data:`MAX_WAIT` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Final, Generic, TypeVar

__all__ = ["BUDGET", "MAX_WAIT", "PERIOD", "LiveHub"]

PERIOD: Final = 0.5
"""Seconds between two reads of a watched value (at most 2 updates a second per page)."""
BUDGET: Final = 0.005
"""The share of the time a watched key's reads may take (of a core, for a database read)."""
MAX_WAIT: Final = 5.0
"""The longest a stretched period gets: a read's wall time also grows with the machine's load,
and a page must still move within seconds."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Watch(Generic[V]):
    def __init__(self) -> None:
        self.subscribers = 0
        self.value: V | None = None
        self.version = 0
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None


class LiveHub(Generic[K, V]):
    """Polls ``read(key)`` for each key someone watches and fans the values out.

    ``read`` runs off the event loop (it may query the database). A failing read is skipped:
    the watchers keep the last value and the next period tries again. A read that took ``t``
    seconds is followed by at least ``t / budget - t`` seconds without one.
    """

    def __init__(
        self,
        read: Callable[[K], Awaitable[V]],
        *,
        period: float = PERIOD,
        budget: float = BUDGET,
    ) -> None:
        self._read = read
        self._period = period
        self._budget = budget
        self._watches: dict[K, _Watch[V]] = {}

    async def watch(self, key: K, *, lifetime: float) -> AsyncIterator[V | None]:
        """Values of ``key`` as they change, for ``lifetime`` seconds.

        Yields None every period without a change, so the caller can send a keep-alive and
        notice a client that went away.
        """
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch()
            watch.task = asyncio.get_running_loop().create_task(self._poll(key, watch))
        watch.subscribers += 1
        seen = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + lifetime
        try:
            while loop.time() < end:
                async with watch.changed:
                    if watch.version == seen:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(watch.changed.wait(), self._period * 2)
                if watch.version != seen:
                    seen = watch.version
                    yield watch.value
                else:
                    yield None
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0:
                if self._watches.get(key) is watch:
                    del self._watches[key]
                if watch.task is not None:
                    watch.task.cancel()

    async def _poll(self, key: K, watch: _Watch[V]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                value: V | None = await self._read(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: keep the last value, try next period
                value = watch.value
            if value != watch.value or watch.version == 0:
                watch.value = value
                async with watch.changed:
                    watch.version += 1
                    watch.changed.notify_all()
            cost = loop.time() - started
            await asyncio.sleep(max(self._period, min(MAX_WAIT, cost / self._budget - cost)))

    @property
    def watched(self) -> int:
        """How many keys are being polled (for tests and metrics)."""
        return len(self._watches)

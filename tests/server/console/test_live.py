"""The live hub: one poll per watched key, changes only, nothing kept once nobody watches."""

from __future__ import annotations

import asyncio

from onenet_ota.server.console.live import LiveHub


def test_watchers_share_one_poll_and_see_changes_only() -> None:
    reads: list[int] = []
    value = {"n": 0}

    async def read(key: int) -> int:
        reads.append(key)
        return value["n"]

    async def scenario() -> tuple[list[int | None], list[int | None], int]:
        hub: LiveHub[int, int] = LiveHub(read, period=0.01, budget=1.0)  # never stretched
        seen_a: list[int | None] = []
        seen_b: list[int | None] = []

        async def watch(into: list[int | None]) -> None:
            async for item in hub.watch(5, lifetime=0.5):
                if item is not None:
                    into.append(item)
                    if item == 0:
                        value["n"] = 1
                    elif item == 1:
                        value["n"] = 2

        await asyncio.gather(watch(seen_a), watch(seen_b))
        return seen_a, seen_b, hub.watched

    seen_a, seen_b, watched = asyncio.run(scenario())
    assert seen_a == [0, 1, 2]
    assert seen_b == [0, 1, 2]
    assert watched == 0  # the poller is gone with its last watcher
    assert set(reads) == {5}
    # One poll for both watchers: about lifetime / period reads, not twice that.
    assert len(reads) <= 0.5 / 0.01 + 5


def test_a_failing_read_keeps_the_last_value() -> None:
    calls = {"n": 0}

    async def read(key: str) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            return "first"
        raise OSError("database hiccup")

    async def scenario() -> list[str | None]:
        hub: LiveHub[str, str] = LiveHub(read, period=0.01, budget=1.0)  # never stretched
        return [item async for item in hub.watch("k", lifetime=0.2)]

    items = asyncio.run(scenario())
    assert [i for i in items if i is not None] == ["first"]
    assert calls["n"] > 2


def test_a_costly_read_stretches_the_period_to_the_budget() -> None:
    # A read that takes 20 ms with a budget of 10 % of the loop's time: at most one read per
    # 200 ms, where the 1 ms period alone would allow some twenty in the same time.
    reads = {"n": 0}

    async def read(key: int) -> int:
        reads["n"] += 1
        await asyncio.sleep(0.02)
        return reads["n"]

    async def scenario() -> None:
        hub: LiveHub[int, int] = LiveHub(read, period=0.001, budget=0.1)
        async for _ in hub.watch(1, lifetime=0.5):
            pass

    asyncio.run(scenario())
    assert 1 <= reads["n"] <= 4

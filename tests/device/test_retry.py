"""The retry budget: immutable, pure backoff with jitter, always ends (spec §6.3, §7, §10)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onenet_ota.device.retry import (
    DEFAULT_ATTEMPTS,
    MAX_ATTEMPTS,
    PauseLimitReached,
    Retry,
    RetryExhausted,
)

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def test_from_task_uses_the_tasks_values() -> None:
    retry = Retry.from_task(3, 2)
    assert retry.attempts == 3
    assert retry.interval == 2.0


@pytest.mark.parametrize("value", [0, -1, -(2**31)])
def test_from_task_zero_or_negative_retry_gets_the_default(value: int) -> None:
    assert Retry.from_task(value, 0).attempts == DEFAULT_ATTEMPTS


def test_from_task_caps_a_huge_retry_count() -> None:
    assert Retry.from_task(2**31 - 1, 1).attempts == MAX_ATTEMPTS


def test_from_task_caps_a_huge_interval_at_backoff_max() -> None:
    retry = Retry.from_task(3, 2**31 - 1, backoff_max=30)
    assert retry.interval == 30


def test_from_task_zero_interval_gets_the_default() -> None:
    assert Retry.from_task(3, 0, default_interval=0.5).interval == 0.5


def test_increment_returns_a_new_value_and_leaves_the_old_one() -> None:
    first = Retry(attempts=3)
    second = first.increment("boom")
    assert first.failures == 0
    assert second.failures == 1
    assert second.remaining == 2


def test_at_most_attempts_tries_in_total() -> None:
    """§7: "with at most retry attempts in total": 3 attempts allow 2 retries."""
    retry = Retry(attempts=3)
    retry = retry.increment("first failure")
    retry = retry.increment("second failure")
    with pytest.raises(RetryExhausted) as info:
        retry.increment("third failure")
    assert info.value.reason == "third failure"
    assert info.value.retry.failures == 3


def test_one_attempt_means_no_retry() -> None:
    with pytest.raises(RetryExhausted):
        Retry(attempts=1).increment("only failure")


def test_reset_restores_the_budget() -> None:
    retry = Retry(attempts=2).increment("x")
    assert retry.reset().failures == 0
    fresh = Retry()
    assert fresh.reset() is fresh


def test_backoff_without_jitter_doubles_and_caps() -> None:
    retry = Retry(attempts=10, interval=1, backoff_factor=2, backoff_max=5, jitter=0)
    waits = []
    for _ in range(5):
        retry = retry.increment("x")
        waits.append(retry.backoff(0.0))
    assert waits == [1, 2, 4, 5, 5]


def test_backoff_before_any_failure_is_zero() -> None:
    assert Retry().backoff(0.9) == 0


def test_jitter_spreads_around_the_base_wait() -> None:
    retry = Retry(attempts=5, interval=10, jitter=0.5, backoff_max=100).increment("x")
    assert retry.backoff(0.0) == pytest.approx(5)
    assert retry.backoff(0.5) == pytest.approx(10)
    assert retry.backoff(0.999999) == pytest.approx(15, rel=1e-4)


@settings(deadline=None)  # the machine is shared: no per-example timing
@given(
    retry=int32,
    interval=int32,
    draws=st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), max_size=80),
)
def test_any_task_values_give_a_budget_that_ends(
    retry: int, interval: int, draws: list[float]
) -> None:
    """Whatever the platform sends, retrying ends within MAX_ATTEMPTS and waits are bounded."""
    budget = Retry.from_task(retry, interval)
    count = 0
    while True:
        try:
            budget = budget.increment("failure")
        except RetryExhausted:
            break
        count += 1
        u = draws[count % len(draws)] if draws else 0.5
        wait = budget.backoff(u)
        assert 0 <= wait <= budget.backoff_max
        assert math.isfinite(wait)
    assert count + 1 == budget.attempts <= MAX_ATTEMPTS


def test_pause_waits_do_not_consume_attempts_and_end() -> None:
    retry = Retry(attempts=2, pause_limit=25, pause_poll=10)
    waits = []
    for _ in range(3):
        retry, wait = retry.pause()
        waits.append(wait)
        assert retry.failures == 0
    assert waits == [10, 10, 5]
    with pytest.raises(PauseLimitReached, match="paused for 25 s"):
        retry.pause()


@settings(deadline=None)
@given(
    limit=st.floats(min_value=0, max_value=1e6),
    polls=st.integers(min_value=1, max_value=500),
)
def test_pause_budget_always_ends(limit: float, polls: int) -> None:
    poll = max(limit / polls, 1e-3)
    retry = Retry(pause_limit=limit, pause_poll=poll)
    total = 0.0
    for _ in range(polls + 3):
        try:
            retry, wait = retry.pause()
        except PauseLimitReached:
            break
        assert wait > 0
        total += wait
    else:
        pytest.fail("the pause budget did not end")
    assert total == pytest.approx(limit, abs=1e-6 * max(1.0, limit))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"interval": -1},
        {"interval": math.inf},
        {"backoff_factor": 0.5},
        {"jitter": 1.5},
        {"pause_poll": 0},
        {"backoff_max": math.nan},
    ],
)
def test_invalid_values_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Retry(**kwargs)  # type: ignore[arg-type]

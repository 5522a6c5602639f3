"""When to try a failed step again, and how long to wait first: an immutable :class:`Retry`.

Modelled on urllib3's ``Retry``: the value never changes; :meth:`Retry.increment` returns a new
one (or raises :class:`RetryExhausted` carrying the reason), the backoff computation is pure, and
only the caller sleeps.

Budget. OneNET's task carries ``retry`` (the retry budget for failed chunks) and ``interval`` (the
seconds to wait between retries), both advisory (spec §6.3). The C SDK's example repeats a failed
chunk after ``interval`` seconds, "with at most ``retry`` attempts in total" (spec §7); this class
keeps that meaning: ``attempts`` counts every try of one step, the first one included, and a success
resets the count (:meth:`Retry.reset`). A task that says 0 (the default of every advisory value,
§4.5) or something absurd gets a sane default and a ceiling, so that retrying always ends.

Waiting while paused. errno 17 from E5 means the task is paused or in a state that does not allow
downloading; the SDK retries later without consuming ``retry`` (spec §10). Those waits draw on a
separate, time-based budget (:attr:`Retry.pause_limit`) so that they end too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

DEFAULT_ATTEMPTS: Final = 5
MAX_ATTEMPTS: Final = 50
DEFAULT_INTERVAL: Final = 1.0
DEFAULT_BACKOFF_FACTOR: Final = 2.0
DEFAULT_BACKOFF_MAX: Final = 120.0
DEFAULT_JITTER: Final = 0.25
DEFAULT_PAUSE_LIMIT: Final = 600.0
DEFAULT_PAUSE_POLL: Final = 10.0


class RetryExhausted(Exception):
    """No attempt is left; ``reason`` is the last attempt's failure (urllib3's MaxRetryError)."""

    def __init__(self, retry: Retry, reason: object) -> None:
        super().__init__(f"gave up after {retry.failures} failed attempts: {reason}")
        self.retry = retry
        self.reason = reason


class PauseLimitReached(Exception):
    """The task stayed paused (errno 17) for longer than :attr:`Retry.pause_limit` allows."""

    def __init__(self, retry: Retry) -> None:
        super().__init__(f"the task stayed paused for {retry.paused_for:g} s; giving up for now")
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Retry:
    """The retry budget of one upgrade: attempts per step, backoff with jitter, paused time.

    ``attempts``: tries allowed for one step, the first included (>= 1). ``interval``: the base
    wait before the first retry, in seconds. Each further retry waits ``backoff_factor`` times
    longer, never more than ``backoff_max``; ``jitter`` spreads every wait uniformly by up to
    that fraction either way, so that a fleet does not retry in lockstep. ``failures`` and
    ``paused_for`` are the state: consecutive failures of the current step, and the seconds
    spent waiting on a paused task in this run.
    """

    attempts: int = DEFAULT_ATTEMPTS
    interval: float = DEFAULT_INTERVAL
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    backoff_max: float = DEFAULT_BACKOFF_MAX
    jitter: float = DEFAULT_JITTER
    pause_limit: float = DEFAULT_PAUSE_LIMIT
    pause_poll: float = DEFAULT_PAUSE_POLL
    failures: int = 0
    paused_for: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        for name in ("interval", "backoff_max", "pause_limit", "pause_poll", "paused_for"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if not (math.isfinite(self.backoff_factor) and self.backoff_factor >= 1):
            raise ValueError("backoff_factor must be a finite number >= 1")
        if self.pause_poll <= 0:
            raise ValueError("pause_poll must be > 0, or waiting on a paused task never ends")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.failures < 0:
            raise ValueError("failures must be >= 0")

    @classmethod
    def from_task(
        cls,
        retry: int,
        interval: int,
        *,
        default_attempts: int = DEFAULT_ATTEMPTS,
        max_attempts: int = MAX_ATTEMPTS,
        default_interval: float = DEFAULT_INTERVAL,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        jitter: float = DEFAULT_JITTER,
        pause_limit: float = DEFAULT_PAUSE_LIMIT,
        pause_poll: float = DEFAULT_PAUSE_POLL,
    ) -> Retry:
        """The budget a task's advisory ``retry`` and ``interval`` ask for (spec §6.3, §7).

        Both are int32 and default to 0 (§4.5): ``retry <= 0`` means ``default_attempts``, and
        ``max_attempts`` caps a huge value. ``interval <= 0`` means ``default_interval``; a wait
        longer than ``backoff_max`` is cut to it, since a platform asking a device to sleep for
        years is a misconfiguration the device should survive.
        """
        attempts = retry if retry > 0 else default_attempts
        attempts = max(1, min(attempts, max_attempts))
        base = float(interval) if interval > 0 else default_interval
        return cls(
            attempts=attempts,
            interval=min(base, backoff_max),
            backoff_factor=backoff_factor,
            backoff_max=backoff_max,
            jitter=jitter,
            pause_limit=pause_limit,
            pause_poll=pause_poll,
        )

    @property
    def remaining(self) -> int:
        """Attempts left for the current step."""
        return max(0, self.attempts - self.failures)

    @property
    def is_exhausted(self) -> bool:
        """Whether the current step may not be tried again."""
        return self.failures >= self.attempts

    def increment(self, reason: object) -> Retry:
        """Record one failed attempt; raises :class:`RetryExhausted` if none is left."""
        new = replace(self, failures=self.failures + 1)
        if new.is_exhausted:
            raise RetryExhausted(new, reason)
        return new

    def reset(self) -> Retry:
        """The budget after a step succeeded: the next step starts with every attempt."""
        return self if self.failures == 0 else replace(self, failures=0)

    def backoff(self, u: float) -> float:
        """Seconds to wait before the next attempt. Pure: ``u`` in [0, 1) is the jitter draw.

        ``interval * backoff_factor ** (failures - 1)``, capped at ``backoff_max``, then spread
        by ``jitter``: with ``u = 0.5`` the wait is exact.
        """
        if self.failures <= 0:
            return 0.0
        exponent = min(self.failures - 1, 64)  # beyond this the cap applies anyway
        wait = min(self.backoff_max, self.interval * self.backoff_factor**exponent)
        spread = 1.0 + self.jitter * (2.0 * min(max(u, 0.0), 1.0) - 1.0)
        return max(0.0, min(self.backoff_max, wait * spread))

    def pause(self) -> tuple[Retry, float]:
        """Wait on a paused task: the new value and the seconds to sleep before asking again.

        Raises :class:`PauseLimitReached` once ``pause_limit`` seconds were spent. The attempt
        budget is untouched: errno 17 does not consume ``retry`` (spec §10).
        """
        left = self.pause_limit - self.paused_for
        if left <= 0:
            raise PauseLimitReached(self)
        wait = min(self.pause_poll, left)
        return replace(self, paused_for=self.paused_for + wait), wait

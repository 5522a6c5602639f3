"""What a fleet run measures: compact latency histograms and per-endpoint counters.

A fleet of 10,000 devices sends a few hundred thousand requests; keeping every latency would cost
memory for nothing. :class:`Histogram` keeps counts in log-linear buckets instead (the HDR
histogram's layout): exact below 128 µs, then 64 buckets per power of two, so any percentile it
reports is within 1.6 % of the true value, in at most a few hundred integers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from onenet_ota.protocol.endpoints import Endpoint

__all__ = ["EndpointStats", "FleetMetrics", "Histogram"]

_SUB_BITS: Final = 6
_SUB: Final = 1 << _SUB_BITS  # buckets per power of two
_EXACT: Final = 2 * _SUB  # values below this have a bucket of their own
_MAX_US: Final = 1 << 40  # about 12 days: anything longer is clamped


def _index(us: int) -> int:
    if us < _EXACT:
        return us
    shift = us.bit_length() - _SUB_BITS - 1
    return shift * _SUB + (us >> shift)


def _value(index: int) -> float:
    """The middle of bucket ``index``, in microseconds."""
    if index < _EXACT:
        return float(index)
    shift = index // _SUB - 1
    low = (index - shift * _SUB) << shift
    return low + ((1 << shift) - 1) / 2


@dataclass(slots=True)
class Histogram:
    """Latencies in seconds, bucketed (relative error below 1.6 %); mergeable."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def record(self, seconds: float) -> None:
        """Add one latency (negative values count as 0)."""
        seconds = max(0.0, seconds)
        us = min(int(seconds * 1e6), _MAX_US)
        self.buckets[_index(us)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        """Add every value of ``other``."""
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    @property
    def mean(self) -> float:
        """The mean in seconds (0 when empty)."""
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) in seconds, 0 when empty (nearest-rank)."""
        if not 0 <= q <= 100:
            raise ValueError("a percentile is between 0 and 100")
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(_value(index) / 1e6, self.max)
        return self.max  # pragma: no cover - rank <= count

    def summary(self) -> dict[str, float]:
        """``{"p50": s, "p95": s, "p99": s, "max": s, "mean": s}``."""
        return {
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "p99": self.percentile(99),
            "max": self.max,
            "mean": self.mean,
        }


@dataclass(slots=True)
class EndpointStats:
    """One endpoint's requests: how many, how many failed on the wire, their latency, bytes."""

    requests: int = 0
    failures: int = 0
    bytes: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def merge(self, other: EndpointStats) -> None:
        """Add ``other``'s counts and latencies."""
        self.requests += other.requests
        self.failures += other.failures
        self.bytes += other.bytes
        self.latency.merge(other.latency)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (latencies in milliseconds)."""
        return {
            "requests": self.requests,
            "failures": self.failures,
            "bytes": self.bytes,
            "latency_ms": {k: round(v * 1000, 3) for k, v in self.latency.summary().items()},
        }


@dataclass(slots=True)
class FleetMetrics:
    """Everything the fleet's HTTP layer saw, by endpoint, plus the faults it injected.

    ``failures`` are requests that got no complete answer (injected drops included);
    ``injected`` counts the faults by kind (``refused``, ``reset``, ``truncated``,
    ``power-cut``).
    """

    endpoints: dict[Endpoint | None, EndpointStats] = field(default_factory=dict)
    injected: Counter[str] = field(default_factory=Counter)

    def stats(self, endpoint: Endpoint | None) -> EndpointStats:
        """The counters of ``endpoint`` (None: a path that is no device endpoint)."""
        stats = self.endpoints.get(endpoint)
        if stats is None:
            stats = self.endpoints[endpoint] = EndpointStats()
        return stats

    @property
    def requests(self) -> int:
        """Requests sent (or attempted), all endpoints."""
        return sum(s.requests for s in self.endpoints.values())

    @property
    def failures(self) -> int:
        """Requests without a complete answer, all endpoints."""
        return sum(s.failures for s in self.endpoints.values())

    @property
    def bytes(self) -> int:
        """Response body bytes received, all endpoints."""
        return sum(s.bytes for s in self.endpoints.values())

    def merge(self, other: FleetMetrics) -> None:
        """Add everything ``other`` measured (another process's share of the fleet)."""
        for endpoint, stats in other.endpoints.items():
            self.stats(endpoint).merge(stats)
        self.injected.update(other.injected)

    def overall(self) -> Histogram:
        """The latencies of every endpoint together."""
        total = Histogram()
        for stats in self.endpoints.values():
            total.merge(stats.latency)
        return total

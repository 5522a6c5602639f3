"""Histogram: percentiles within the bucket precision of the exact answer, merging, edges."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.sim.metrics import EndpointStats, FleetMetrics, Histogram

# Latencies from 0 to 100 s, with resolution 1 µs (the histogram's unit).
latencies = st.lists(st.integers(0, 100_000_000).map(lambda us: us / 1e6), min_size=1, max_size=300)
quantiles = st.sampled_from([0, 1, 25, 50, 90, 95, 99, 99.9, 100])


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@given(latencies, quantiles)
def test_percentile_is_within_bucket_precision(values: list[float], q: float) -> None:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    want = exact(values, q)
    got = histogram.percentile(q)
    # Exact below 128 µs; above, 64 buckets per power of two: under 1/64 relative error.
    assert abs(got - want) <= max(want / 64, 1e-6) + 1e-9, (got, want)
    assert histogram.count == len(values)
    assert histogram.max == max(values)
    assert histogram.mean == pytest.approx(sum(values) / len(values))


@given(latencies, latencies, quantiles)
def test_merge_equals_recording_everything(a: list[float], b: list[float], q: float) -> None:
    left, right, both = Histogram(), Histogram(), Histogram()
    for value in a:
        left.record(value)
        both.record(value)
    for value in b:
        right.record(value)
        both.record(value)
    left.merge(right)
    assert left.percentile(q) == both.percentile(q)
    assert (left.count, left.max) == (both.count, both.max)


def test_empty_and_invalid() -> None:
    histogram = Histogram()
    assert histogram.percentile(50) == 0.0
    assert histogram.mean == 0.0
    with pytest.raises(ValueError, match="between 0 and 100"):
        histogram.percentile(101)
    histogram.record(-1.0)  # a clock step backwards counts as 0, never as a crash
    assert histogram.percentile(100) == 0.0


def test_stats_json_is_in_milliseconds() -> None:
    stats = EndpointStats(requests=2)
    stats.latency.record(0.010)
    stats.latency.record(0.020)
    data = stats.to_dict()
    assert data["requests"] == 2
    assert data["latency_ms"]["max"] == 20.0
    assert 9.8 <= data["latency_ms"]["p50"] <= 10.2


def test_fleet_metrics_totals() -> None:
    metrics = FleetMetrics()
    metrics.stats(None).requests += 1
    first = metrics.stats(None)
    assert metrics.stats(None) is first
    first.failures += 1
    first.bytes += 10
    first.latency.record(0.5)
    assert (metrics.requests, metrics.failures, metrics.bytes) == (1, 1, 10)
    assert metrics.overall().count == 1

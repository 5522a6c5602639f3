"""bench.fleet_bench's choice of server workers per database."""

from __future__ import annotations

from bench.common import DB_KINDS
from bench.fleet_bench import DEFAULT_WORKERS, server_workers


def test_the_fleet_bench_serves_postgres_with_two_workers_unless_told() -> None:
    # PostgreSQL: a worker waits a round trip per statement, a second one overlaps the waits;
    # SQLite: no waits to overlap, one write lock to contend for.
    assert set(DEFAULT_WORKERS) == set(DB_KINDS)
    assert server_workers("postgres", None) == 2
    assert server_workers("sqlite", None) == 1
    assert server_workers("postgres", 1) == 1
    assert server_workers("sqlite", 3) == 3

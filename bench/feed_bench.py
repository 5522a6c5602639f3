"""Change feed benchmark: what one read of the cache change feed costs on PostgreSQL,
with and without a transaction left open elsewhere in the cluster.

Run::

    .venv/bin/python -m bench.feed_bench
    .venv/bin/python -m bench.feed_bench --rows 50000 --per-read 20

Every server process reads the feed every 0.1 s while it serves (:mod:`onenet_ota.server.changes`).
A transaction left open anywhere in the cluster (an operator's idle ``psql`` session, a long
bulk import) holds PostgreSQL's ``xmin`` back. A reader that asked for "every row since the
oldest running transaction" would read ever more rows, and past its batch of 5,000 would drop all
caches on every read. The feed asks instead for the rows of the transactions its last snapshot
showed running, or that started after it.

One throwaway cluster, one database, three measurements in the same run, each over ``--reads``
reads, with ``--per-read`` rows committed by another session before each read:

- ``baseline``: nothing else open;
- ``long-open``: a session holds a transaction (with a transaction id) open while ``--rows`` rows
  are committed first, then the same reads are timed;
- ``since-xmin``: in that same state, the query a reader based on ``xmin`` would run (rows since
  the held ``xmin``), for comparison.

It prints the median read time of each and its ratio to the baseline, and the rows each read
returned. Target: ``long-open`` within 2x of ``baseline`` (exit status 0 when met).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, literal_column, select, text
from tests.server.seed import core_reader

from bench.common import database, machine, postgres
from onenet_ota.server.changes import ChangeFeed, publish
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.schema import cache_changes

TARGET = 2.0


def _emit(engine: Engine, count: int, first: int) -> None:
    with engine.begin() as conn:
        publish(conn, range(first, first + count), time.time(), origin=2)


@contextmanager
def _idle_transaction(engine: Engine) -> Iterator[int]:
    """A session holding a transaction with an id open; yields the xmin it holds back."""
    with engine.connect() as idle:
        idle.begin()
        idle.execute(select(literal_column("pg_current_xact_id()")))
        xmin = idle.execute(
            text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        ).scalar_one()
        yield int(xmin)
        idle.rollback()


def _time_reads(
    engine: Engine, read: Callable[[], int], reads: int, per_read: int, start: int
) -> tuple[float, float]:
    """Median seconds per read and mean rows per read, with ``per_read`` rows before each."""
    times: list[float] = []
    found = 0
    for n in range(reads):
        _emit(engine, per_read, start + n * per_read)
        began = time.perf_counter()
        found += read()
        times.append(time.perf_counter() - began)
    return statistics.median(times), found / reads


def run(args: argparse.Namespace) -> bool:
    with postgres() as cluster, database("postgres", cluster, "feed_bench") as url:
        engine = create_engine(url)
        migrate(engine)
        feed = ChangeFeed(engine, core_reader(engine), origin=1, interval=0, batch=10**9)
        feed.read()

        def feed_read() -> int:
            return len(feed.read().dev_ids)

        next_id = 1
        base, base_rows = _time_reads(engine, feed_read, args.reads, args.per_read, next_id)
        next_id += args.reads * args.per_read
        with _idle_transaction(engine) as xmin:
            for first in range(next_id, next_id + args.rows, 1000):
                _emit(engine, min(1000, next_id + args.rows - first), first)
            next_id += args.rows
            feed.read()
            long_open, long_rows = _time_reads(
                engine, feed_read, args.reads, args.per_read, next_id
            )
            next_id += args.reads * args.per_read
            since = select(cache_changes.c.id, cache_changes.c.dev_id).where(
                cache_changes.c.xid >= xmin
            )

            def since_xmin() -> int:
                with engine.connect() as conn:
                    return len(conn.execute(since).all())

            old, old_rows = _time_reads(engine, since_xmin, args.reads, args.per_read, next_id)
        engine.dispose()
    print(
        f"onenet-ota change feed benchmark: PostgreSQL, {args.reads} reads, {args.per_read} rows "
        f"committed before each, {args.rows} rows while a transaction stays open; {machine()}"
    )
    print(f"{'read':<12} {'median us':>10} {'vs baseline':>12} {'rows/read':>10}")
    for name, seconds, rows in (
        ("baseline", base, base_rows),
        ("long-open", long_open, long_rows),
        ("since-xmin", old, old_rows),
    ):
        print(f"{name:<12} {seconds * 1e6:>10.0f} {seconds / base:>11.2f}x {rows:>10.0f}")
    met = long_open / base <= TARGET
    print(
        f"target long-open {long_open / base:.2f}x baseline (<= {TARGET}x): "
        f"{'met' if met else 'missed'}"
    )
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reads", type=int, default=300, help="timed reads per measurement")
    parser.add_argument("--per-read", type=int, default=10, help="rows committed before a read")
    parser.add_argument("--rows", type=int, default=20000, help="rows while the session is open")
    return 0 if run(parser.parse_args(argv)) else 1


if __name__ == "__main__":
    sys.exit(main())

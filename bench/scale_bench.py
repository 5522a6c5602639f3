"""Scale benchmark: check-task latency with 1,000 vs 1,000,000 devices in the database.

Run::

    .venv/bin/python -m bench.scale_bench                       # both databases; ~10 min each
    .venv/bin/python -m bench.scale_bench --db sqlite --large 100000

For each database kind (``--db``, default SQLite and PostgreSQL) it builds two databases of the
same shape, ``--small`` (1,000) and ``--large`` (1,000,000) devices:

- migrated with Alembic (:func:`onenet_ota.server.db.migrate`), then filled with set-based SQL,
  not through the API: one product (pid 123123, key K1 of Appendix B.1), one 256 KiB FOTA package
  (in the data directory's blob store), one task, and per device a ``devices`` row (version 1.0.0
  already reported), its ``device_tasks`` row (to-be-upgraded, with a current token) and its
  ``tokens`` row, i.e. the steady state after every device polled once. SQLite uses a recursive
  CTE (``INSERT ... SELECT``), PostgreSQL ``generate_series``; PostgreSQL then runs ``ANALYZE``,
  as its autovacuum would shortly after such a load;
- served by its own server process (``LocalServer``, one worker).

Both servers run at once, and the load generator of :mod:`bench.loadgen` (its own process) sends
E3 check-task requests in the C SDK's format over ``--concurrency`` (4) keep-alive connections,
paced to ``--rate`` (400) requests/s, low enough for clean percentiles, round robin over
``--sample`` (20,000) devices spread over the whole id range (the small database: all of its
devices). Both sizes get the same rate, and each device comes round every 2.5 s or later. The
servers run with ``cache_ttl`` 1 s (the default is 30 s), so that the answer cache has forgotten a
device by then: every request reaches the database, as real devices polling every few minutes
do. On the large database most requests
touch rows no earlier request brought into SQLite's page cache (or PostgreSQL's buffers).
After an unmeasured ``--warmup``, ``--rounds`` (5) rounds of ``--duration`` seconds alternate
between the small and the large database, so that machine drift hits both alike; each size
reports the median of its rounds' p50 and p99.

It prints the row-generation time, per size the requests/s, p50 and p99, and the ratio
large p50 / small p50 against the target (below 1.5x). ``--py-spy PATH`` samples the large
database's server during one round. Exit status 0 when every database meets the target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy import text
from tests.pgcluster import PgCluster

from bench.common import DB_KINDS, PySpy, database, machine, postgres
from bench.loadgen import LoadGenerator, Result, Scenario
from bench.profiles import top_functions
from bench.server_bench import K1, PID, check_task_request
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.sim import LocalServer

FIRST_DEV_ID: Final = 100_000_001
PACKAGE_SIZE: Final = 256 * 1024
TARGET: Final = 1.5
CACHE_TTL: Final = 1.0  # each device comes round after its cached answer expired: database path
EXPECT: Final = b'"errno":0,"error":"succ","data"'


@dataclass
class Size:
    """One database of the comparison, its server and its measured rounds."""

    label: str
    devices: int
    url: str = ""
    seed_seconds: float = 0.0
    server: LocalServer | None = None
    results: list[Result] = field(default_factory=list)

    def p(self, q: float) -> float:
        """The median over rounds of the ``q``-th percentile, in milliseconds."""
        return statistics.median(r.latency.percentile(q) for r in self.results) * 1000

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.results)


def _fill_sql(dialect: str, devices: int) -> list[str]:
    """Set-based statements that create ``devices`` devices with a task and a token each."""
    now = int(time.time())
    if dialect == "sqlite":
        series = (
            f"WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq "
            f"WHERE i < {devices - 1}) "
        )
        token = "'ota_' || substr(lower(hex(randomblob(10))), 1, 20)"
        devices_sql = (
            "INSERT INTO devices (dev_id, pid, name, auth_info, f_version, created_at, "
            f"last_seen_at) {series} SELECT {FIRST_DEV_ID} + i, '{PID}', 'dev' || i, 'dev' || i, "
            f"'1.0.0', {now}, {now} FROM seq"
        )
    else:
        token = "'ota_' || substr(md5(random()::text || clock_timestamp()::text), 1, 20)"
        devices_sql = (
            "INSERT INTO devices (dev_id, pid, name, auth_info, f_version, created_at, "
            f"last_seen_at) SELECT {FIRST_DEV_ID} + i, '{PID}', 'dev' || i, 'dev' || i, "
            f"'1.0.0', {now}, {now} FROM generate_series(0, {devices - 1}) AS i"
        )
    return [
        devices_sql,
        # Each device task holds a current token issued now (valid for 48 h, D13).
        "INSERT INTO device_tasks (task_id, dev_id, module_type, state, progress, "
        "current_token, token_issued_at, updated_at) "
        f"SELECT 1, dev_id, 1, 1, 0, {token}, {now}, {now} FROM devices",
        "INSERT INTO tokens (token, device_task_id, issued_at) "
        "SELECT current_token, id, token_issued_at FROM device_tasks",
    ]


def build(size: Size, data_dir: Path) -> None:
    """Migrate and fill ``size.url``; the package file goes into ``data_dir``'s blob store."""
    started = time.monotonic()
    engine = create_engine(size.url)
    try:
        migrate(engine)
        blob = BlobStore(data_dir / "packages").put_bytes(random.Random(1).randbytes(PACKAGE_SIZE))
        now = int(time.time())
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO products (pid, name, access_key, created_at) "
                    "VALUES (:pid, 'scale', :key, :now)"
                ),
                {"pid": PID, "key": K1, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO packages (id, pid, module_type, kind, target, file_name, size, "
                    "md5, sha256, created_at) VALUES (1, :pid, 1, 1, '1.0.1', 'firmware.bin', "
                    ":size, :md5, :sha256, :now)"
                ),
                {"pid": PID, "size": blob.size, "md5": blob.md5, "sha256": blob.sha256, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO tasks (id, pid, package_id, module_type, start_time, created_at) "
                    "VALUES (1, :pid, 1, 1, :now, :now)"
                ),
                {"pid": PID, "now": now},
            )
            for statement in _fill_sql(engine.dialect.name, size.devices):
                conn.execute(text(statement))
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        with engine.connect() as conn:
            counted = conn.execute(text("SELECT count(*) FROM tokens")).scalar_one()
        if counted != size.devices:
            raise RuntimeError(f"expected {size.devices} tokens, found {counted}")
    finally:
        engine.dispose()
    size.seed_seconds = time.monotonic() - started


def sample_ids(devices: int, count: int) -> list[int]:
    """``count`` device ids spread over the whole range, in a shuffled order."""
    count = min(count, devices)
    step = devices / count
    ids = [FIRST_DEV_ID + int(i * step) for i in range(count)]
    random.Random(3).shuffle(ids)
    return ids


@contextlib.contextmanager
def _cluster(kinds: list[str]) -> Iterator[PgCluster | None]:
    if "postgres" not in kinds:
        yield None
        return
    with postgres() as cluster:
        yield cluster


def run_kind(kind: str, cluster: PgCluster | None, args: argparse.Namespace) -> dict[str, Any]:
    sizes = [Size("small", args.small), Size("large", args.large)]
    profile: list[str] = []
    with contextlib.ExitStack() as stack:
        for size in sizes:
            size.url = stack.enter_context(database(kind, cluster, name=f"scale_{size.label}"))
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onenet-ota-")))
            print(f"  {kind}: generating {size.devices} devices ...", end="", flush=True)
            build(size, data_dir)
            print(f" {size.seed_seconds:.1f} s", flush=True)
            size.server = stack.enter_context(
                LocalServer(db=size.url, data_dir=data_dir, cache_ttl=CACHE_TTL)
            )
        generators = {}
        for size in sizes:
            assert size.server is not None
            generators[size.label] = stack.enter_context(
                LoadGenerator("127.0.0.1", size.server.port)
            )
        scenarios = {
            size.label: Scenario(
                "check-task",
                "keep-alive",
                [check_task_request(d) for d in sample_ids(size.devices, args.sample)],
                b"200",
                EXPECT,
            )
            for size in sizes
        }
        for size in sizes:  # one unmeasured pass: connections, caches, last_seen_at writes
            generators[size.label].run(
                scenarios[size.label],
                warmup=0,
                duration=args.warmup,
                concurrency=args.concurrency,
                rate=args.rate,
            )
        for round_ in range(1, args.rounds + 1):
            for size in sizes:
                spy = None
                spy_file = Path(tempfile.gettempdir()) / f"onenet-ota-scale-{kind}.txt"
                if args.py_spy and size.label == "large" and round_ == 1:
                    assert size.server is not None
                    assert size.server.pid is not None
                    spy = PySpy(args.py_spy, size.server.pid, spy_file)
                result = generators[size.label].run(
                    scenarios[size.label],
                    warmup=0.5,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    rate=args.rate,
                )
                if spy is not None:
                    spy.stop()
                    profile = top_functions(spy_file, 15)
                    spy_file.unlink(missing_ok=True)
                size.results.append(result)
                print(
                    f"  {kind} round {round_} {size.label:<5} ({size.devices} devices): "
                    f"{result.rate:7.0f} req/s, p50 {result.latency.percentile(50) * 1000:6.2f} "
                    f"ms, p99 {result.latency.percentile(99) * 1000:7.2f} ms, "
                    f"errors {result.errors}"
                    + (f" ({result.first_error})" if result.errors else ""),
                    flush=True,
                )
    small, large = sizes
    measured = all(s.results and s.rate > 0 for s in sizes)
    ratio = large.p(50) / small.p(50) if measured and small.p(50) else None
    p99_ratio = large.p(99) / small.p(99) if measured and small.p(99) else None
    return {
        "db": kind,
        "sizes": [
            {
                "devices": s.devices,
                "seed_seconds": round(s.seed_seconds, 1),
                "requests_per_s": round(s.rate, 1),
                "p50_ms": round(s.p(50), 3),
                "p99_ms": round(s.p(99), 3),
                "errors": sum(r.errors for r in s.results),
            }
            for s in sizes
        ],
        "p50_ratio": None if ratio is None else round(ratio, 3),
        "p99_ratio": None if p99_ratio is None else round(p99_ratio, 3),
        "met": ratio is not None
        and ratio < TARGET
        and all(r.errors == 0 for s in sizes for r in s.results),
        "profile": profile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", type=int, default=1000, help="devices in the small database")
    parser.add_argument("--large", type=int, default=1_000_000, help="devices in the large one")
    parser.add_argument("--sample", type=int, default=20_000, help="devices polled (round robin)")
    parser.add_argument("--concurrency", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--rate", type=float, default=400.0, help="requests/s (0: unpaced)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians)")
    parser.add_argument("--db", action="append", choices=DB_KINDS, help="repeatable [both]")
    parser.add_argument("--py-spy", metavar="PATH", help="sample the large database's server")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = parser.parse_args(argv)
    kinds = args.db or list(DB_KINDS)
    print(f"onenet-ota scale benchmark on {machine()}", flush=True)
    outcomes = []
    with _cluster(kinds) as cluster:
        for kind in kinds:
            outcomes.append(run_kind(kind, cluster, args))
    print(
        f"\ncheck-task (E3) latency, {args.concurrency} keep-alive clients at {args.rate:g} "
        f"requests/s, round robin over up to {args.sample} devices, median of {args.rounds} x "
        f"{args.duration:g} s"
    )
    print(f"{'db':<9} {'devices':>9} {'fill s':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for outcome in outcomes:
        for s in outcome["sizes"]:
            print(
                f"{outcome['db']:<9} {s['devices']:>9} {s['seed_seconds']:>7.1f} "
                f"{s['requests_per_s']:>7.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
            )
    for outcome in outcomes:
        p50, p99 = outcome["p50_ratio"], outcome["p99_ratio"]
        if p50 is None:
            print(f"ratio {outcome['db']:<9} not measured (a server answered no request): MISSED")
            continue
        print(
            f"ratio {outcome['db']:<9} p50 large/small = {p50:.2f}x "
            f"(target < {TARGET:g}x): {'met' if outcome['met'] else 'MISSED'}; "
            f"p99 large/small = {p99:.2f}x"
        )
        for line in outcome["profile"]:
            print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=2) + "\n")
    return 0 if all(o["met"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

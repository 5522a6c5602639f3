"""Fleet benchmark: a whole fleet upgrading at once, on SQLite and on PostgreSQL.

Run::

    .venv/bin/python -m bench.fleet_bench                  # the default sizes; 15-30 minutes
    .venv/bin/python -m bench.fleet_bench --devices 1000 --fault-devices 200 --db sqlite

Scenarios, for each database (``--db``, default both):

- ``fleet``: ``--devices`` (10,000) virtual devices upgrade a 256 KiB package, ``--concurrency``
  (64) at a time, with 64 KiB chunks (the upgrader's default). Every device must end succeeded.
  The devices run in ``--processes`` (2) simulator processes, and send with ``--http`` (``sdk``:
  the SDK's own transport, a connection per device; ``httpx2``: one shared httpx2 client, about
  three times the simulator's CPU per request).
- ``faults``: ``--fault-devices`` (1,000) devices with ``--drop-rate`` (5 %) of requests losing
  their connection and ``--power-cut-rate`` (2 %) of upgrader runs losing power and resuming.
  Every device must end succeeded, and the server must show no lost or duplicated report.

Each scenario runs :func:`onenet_ota.sim.simulate`: every device is the real
:class:`~onenet_ota.device.upgrader.AsyncUpgrader` over HTTP (the simulator's process), against
the platform in its own process (``onenet_ota.sim.server.LocalServer``, ``--workers`` worker
processes: by default 2 on PostgreSQL, 1 on SQLite, see :data:`DEFAULT_WORKERS`), set up
through its management API. PostgreSQL runs in a throwaway cluster of :mod:`tests.pgcluster`
with fsync on and ``synchronous_commit=off`` (what SQLite's ``synchronous=NORMAL`` gives).

It prints, per scenario: wall time, devices/s, requests/s, download throughput, latency
percentiles overall and per endpoint, the CPU use of the server, the simulator and PostgreSQL's
processes (CPU seconds per wall second: near 1.0 means that process was saturated; the machine
has ``os.cpu_count()`` in all), the server's and the simulator's CPU microseconds per request
with the load average (what to compare while other work shares the cores), on PostgreSQL the
statements the database ran per device and per request (``pg_stat_statements``, the fleet's
set-up through the management API included; BEGIN and COMMIT count: each is a round trip) and
the ones run most, from the server's ``/metrics`` its caches' hit rates and its own mean time per
endpoint (parsed to answered: what the devices' latency adds to it is connecting and queueing),
and the verdict:
succeeded/total, and whether the server's records agree with the devices (no mismatch, no lost
or duplicated report). Then the ratios:
succeeded/total per scenario, PostgreSQL/SQLite wall time.

``--py-spy PATH`` samples the server process(es) with py-spy during the ``fleet`` scenarios and
prints the functions where the server spends its time. ``--json FILE`` writes every number.
Exit status: 0 when every scenario met its target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from tests.pgcluster import BENCH_OPTIONS, PG_BIN, PG_USER, PgCluster, running_cluster

from bench.common import (
    DB_KINDS,
    PySpy,
    database,
    machine,
    postgres_pid,
    process_cpu,
)
from bench.profiles import top_functions
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.sim import FleetConfig, FleetReport, LocalServer, simulate
from onenet_ota.sim.config import HTTP_CLIENTS
from onenet_ota.sim.report import retry_summary
from onenet_ota.sim.view import LiveView


@dataclass
class Outcome:
    """One scenario's report and the CPU the server and the client used."""

    db: str
    scenario: str
    report: FleetReport
    server_cpu: float
    client_cpu: float
    db_cpu: float | None
    workers: int
    profile: list[str]
    load: float = float("nan")  # the 1-minute load average when the scenario ended
    statements: int | None = None  # PostgreSQL: statements run on the fleet's database
    most_run: list[str] = field(default_factory=list)  # PostgreSQL: the most frequent ones
    caches: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (hits, misses)
    handled: dict[str, float] = field(default_factory=dict)  # E1-E9 -> mean seconds in the server

    def statements_per(self, count: int) -> float | None:
        """Statements per device (``count`` devices) or per request, if counted."""
        return None if self.statements is None else self.statements / max(count, 1)

    @property
    def met(self) -> bool:
        """Every device succeeded and the server agrees (no lost or duplicated report)."""
        return self.report.ok

    def cpu_per_request(self, seconds: float) -> float:
        """CPU microseconds per request sent: what to compare while other work shares the
        cores (CPU per wall second and the wall time are not)."""
        return seconds / max(self.report.metrics.requests, 1) * 1e6

    def to_dict(self) -> dict[str, Any]:
        elapsed = max(self.report.state.elapsed, 1e-9)
        return {
            "db": self.db,
            "scenario": self.scenario,
            "met": self.met,
            "server_workers": self.workers,
            "load_average": self.load,
            "server_cpu_per_s": round(self.server_cpu / elapsed, 2),
            "client_cpu_per_s": round(self.client_cpu / elapsed, 2),
            "server_cpu_us_per_request": round(self.cpu_per_request(self.server_cpu)),
            "client_cpu_us_per_request": round(self.cpu_per_request(self.client_cpu)),
            "postgres_cpu_per_s": None if self.db_cpu is None else round(self.db_cpu / elapsed, 2),
            "statements": self.statements,
            "most_run_statements": self.most_run,
            "cache_hits_misses": self.caches,
            "server_mean_seconds": self.handled,
            "report": self.report.to_dict(),
            "profile": self.profile,
        }


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (the simulator's processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def print_outcome(outcome: Outcome) -> None:
    report = outcome.report
    data = report.to_dict()
    elapsed = max(report.state.elapsed, 1e-9)
    agreement = report.agreement
    print(
        f"\n== {outcome.scenario} on {outcome.db}: {data['devices']} devices, concurrency "
        f"{data['concurrency']} in {report.config.processes} simulator process(es), "
        f"{outcome.workers} server worker(s)"
    )
    print(
        f"   wall {elapsed:.1f} s, {data['devices_per_s']:.1f} devices/s, "
        f"{data['requests_per_s']:.0f} requests/s ({data['requests']} requests, "
        f"{data['request_failures']} without an answer), "
        f"{data['bytes_per_s'] / 1024 / 1024:.1f} MiB/s downloaded"
    )
    postgres = "" if outcome.db_cpu is None else f", PostgreSQL {outcome.db_cpu / elapsed:.2f}"
    print(
        f"   CPU per wall second: server {outcome.server_cpu / elapsed:.2f}, "
        f"simulator {outcome.client_cpu / elapsed:.2f}{postgres}; load average {outcome.load:.1f}"
    )
    print(
        f"   CPU per request: server {outcome.cpu_per_request(outcome.server_cpu):.0f} us, "
        f"simulator {outcome.cpu_per_request(outcome.client_cpu):.0f} us"
    )
    if outcome.statements is not None:
        per_device = outcome.statements_per(len(report.state.devices)) or 0.0
        per_request = outcome.statements_per(report.metrics.requests) or 0.0
        print(
            f"   database statements: {outcome.statements} ({per_device:.1f} per device, "
            f"{per_request:.2f} per request); the most run:"
        )
        for line in outcome.most_run:
            print(f"   {line}")
    if outcome.caches:
        rates = ", ".join(
            f"{name} {hits / max(hits + misses, 1):.0%} of {hits + misses}"
            for name, (hits, misses) in sorted(outcome.caches.items())
            if hits + misses
        )
        print(f"   cache hits: {rates}")
    if outcome.handled:
        means = ", ".join(f"{e} {s * 1000:.2f}" for e, s in sorted(outcome.handled.items()))
        print(f"   server's own mean ms per request (parsed to answered): {means}")
    print(f"   {'endpoint':<22} {'requests':>9} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
    for endpoint, stats in sorted(
        report.metrics.endpoints.items(), key=lambda item: item[0].value if item[0] else "~"
    ):
        label = endpoint.label if isinstance(endpoint, Endpoint) else "other"
        h = stats.latency
        print(
            f"   {label:<22} {stats.requests:>9} {_ms(h.percentile(50))} "
            f"{_ms(h.percentile(95))} {_ms(h.percentile(99))}"
        )
    overall = report.metrics.overall()
    print(
        f"   {'all':<22} {report.metrics.requests:>9} {_ms(overall.percentile(50))} "
        f"{_ms(overall.percentile(95))} {_ms(overall.percentile(99))}"
    )
    if data["faults"]:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(data["faults"].items()))
        print(f"   faults injected: {faults}; upgrader retries {data['retries']}")
        for line in retry_summary(data).splitlines():
            if line:
                print(f"   {line}")
    if agreement is not None:
        print(
            f"   server: {agreement.server_counts}; agreement "
            f"{'OK' if agreement.ok else 'FAILED'} ({agreement.mismatches} mismatches, "
            f"{agreement.lost_reports} lost, {agreement.duplicated_reports} duplicated reports)"
        )
        for example in agreement.examples[:5]:
            print(f"     {example}")
    for reason in report.reasons():
        print(f"   not succeeded: {reason}")
    print(
        f"   target: every device succeeded ({report.succeeded}/{data['devices']}), "
        f"server agrees: {'met' if outcome.met else 'MISSED'}"
    )
    for line in outcome.profile:
        print(f"   {line}")


@contextlib.contextmanager
def _cluster(kinds: list[str]) -> Iterator[PgCluster | None]:
    if "postgres" not in kinds:
        yield None
        return
    counting = _can_count_statements()
    with running_cluster(BENCH_OPTIONS + (_COUNT_STATEMENTS if counting else "")) as cluster:
        if counting:
            with _superuser(cluster) as conn:
                conn.execute(b"CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield cluster


def _can_count_statements() -> bool:
    """Whether this PostgreSQL install has ``pg_stat_statements`` (a contrib module; without
    it the statements are not counted)."""
    return (PG_BIN.parent / "lib" / "pg_stat_statements.so").is_file()


# pg_stat_statements counts every statement the server sends (top level: what a round trip is).
_COUNT_STATEMENTS: Final = (
    " -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top"
    " -c pg_stat_statements.max=5000"
)


@contextlib.contextmanager
def _superuser(cluster: PgCluster) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(
        host=cluster.host, port=cluster.port, user=PG_USER, dbname="postgres", autocommit=True
    ) as conn:
        yield conn


def _statements(cluster: PgCluster, name: str) -> dict[str, int]:
    """Statements run on database ``name`` so far, by their text (pg_stat_statements' calls;
    the texts have their values replaced by placeholders)."""
    with _superuser(cluster) as conn:
        rows = conn.execute(
            b"SELECT s.query, sum(s.calls) FROM pg_stat_statements s"
            b" JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s GROUP BY s.query",
            (name,),
        ).fetchall()
    return {str(query): int(calls) for query, calls in rows}


_CACHE_LINE: Final = re.compile(
    r'^onenet_ota_cache_(hits|misses)_total\{cache="([a-z_]+)"\} ([0-9.e+]+)$', re.MULTILINE
)


_DURATION_LINE: Final = re.compile(
    r'^onenet_ota_request_duration_seconds_(sum|count)\{dialect="classic",endpoint="(E[0-9])"\}'
    r" ([0-9.e+-]+)$",
    re.MULTILINE,
)


def server_metrics(base_url: str) -> tuple[dict[str, tuple[int, int]], dict[str, float]]:
    """From the server's ``/metrics`` (open to loopback clients by default), summed over its
    workers: its device-API caches' (hits, misses), and the mean seconds it took to handle each
    classic endpoint's requests (parsed to answered: no connect, no queueing before the
    parse). Empty when it cannot be read."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as reply:
            text_ = reply.read().decode()
    except OSError:
        return {}, {}
    counts: dict[str, list[int]] = {}
    for kind, name, value in _CACHE_LINE.findall(text_):
        counts.setdefault(name, [0, 0])[kind == "misses"] += int(float(value))
    durations: dict[str, list[float]] = {}
    for kind, endpoint, value in _DURATION_LINE.findall(text_):
        durations.setdefault(endpoint, [0.0, 0.0])[kind == "count"] += float(value)
    means = {e: total / count for e, (total, count) in durations.items() if count}
    return {name: (hits, misses) for name, (hits, misses) in counts.items()}, means


def _most_run(before: dict[str, int], after: dict[str, int], count: int) -> list[str]:
    """The ``count`` statements run most often between ``before`` and ``after``, one line each."""
    ran = {query: calls - before.get(query, 0) for query, calls in after.items()}
    top = sorted(ran.items(), key=lambda item: -item[1])[:count]
    return [f"{calls:>8} {' '.join(query.split())[:110]}" for query, calls in top if calls]


DEFAULT_WORKERS: Final = {"sqlite": 1, "postgres": 2}
"""Server workers per database when ``--workers`` is not given.

A worker runs its database statements on its event loop's thread, one at a time. On PostgreSQL
each statement is a round trip the worker waits for; a second worker overlaps those waits
(measured at 10,000 devices on the 2-core development machine: 444 s with two workers under a
load average of 6.4, 503 s with one under 4.0, for 7 % more server CPU per request). On SQLite a
statement costs no wait, and two workers would contend for its one write lock.
"""


def server_workers(db: str, workers: int | None) -> int:
    """The server's worker processes for ``db``: ``workers`` if given, else the default."""
    return DEFAULT_WORKERS[db] if workers is None else workers


def run_scenario(
    db: str, scenario: str, config: FleetConfig, args: argparse.Namespace,
    cluster: PgCluster | None,
) -> Outcome:  # fmt: skip
    with (
        database(db, cluster, name="fleet") as url,
        LocalServer(db=url, workers=server_workers(db, args.workers)) as server,
        tempfile.TemporaryDirectory(prefix="onenet-ota-pyspy-") as spy_dir,
    ):
        assert server.pid is not None
        spy = None
        profile: list[str] = []
        spy_file = Path(spy_dir) / "server.txt"
        if args.py_spy and scenario == "fleet":
            spy = PySpy(args.py_spy, server.pid, spy_file)
        server_cpu = process_cpu(server.pid)
        client_cpu = _own_cpu()
        pg_pid = None if cluster is None or db != "postgres" else postgres_pid(cluster)
        db_cpu = None if pg_pid is None else process_cpu(pg_pid)
        counted = cluster is not None and db == "postgres" and _can_count_statements()
        ran_before = _statements(cluster, "fleet") if counted and cluster else None
        statements = most_run = None
        # A progress line every few seconds (LiveView off a terminal): a run takes minutes.
        view = LiveView(Console(force_terminal=False, width=200), config.devices)
        try:
            report = simulate(
                config, server=server.url, admin_token=server.admin_token, on_tick=view.update
            )
        finally:
            server_cpu = process_cpu(server.pid) - server_cpu
            client_cpu = _own_cpu() - client_cpu
            if pg_pid is not None and db_cpu is not None:
                db_cpu = process_cpu(pg_pid) - db_cpu
            if ran_before is not None and cluster is not None:
                ran_after = _statements(cluster, "fleet")
                statements = sum(ran_after.values()) - sum(ran_before.values())
                most_run = _most_run(ran_before, ran_after, 12)
            if spy is not None:
                messages = spy.stop()
                profile = top_functions(spy_file, 20) or [f"py-spy: {messages}"]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        caches, handled = server_metrics(server.url)
        return Outcome(
            db,
            scenario,
            report,
            server_cpu,
            client_cpu,
            db_cpu,
            server.workers,
            profile,
            load,
            statements,
            most_run or [],
            caches,
            handled,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices of the fleet run")
    parser.add_argument("--fault-devices", type=int, default=1000, help="devices of the fault run")
    parser.add_argument("--concurrency", type=int, default=64, help="devices upgrading at once")
    parser.add_argument(
        "--processes", type=int, default=2, help="simulator processes (one per core)"
    )
    parser.add_argument("--chunk-size", type=int, default=64 * 1024, help="bytes per E6")
    parser.add_argument("--package-size", type=int, default=256 * 1024)
    parser.add_argument("--drop-rate", type=float, default=0.05)
    parser.add_argument("--power-cut-rate", type=float, default=0.02)
    parser.add_argument(
        "--workers",
        type=int,
        help="server worker processes [PostgreSQL 2, SQLite 1: see server_workers]",
    )
    parser.add_argument(
        "--http", choices=HTTP_CLIENTS, default="sdk", help="how the devices send [sdk]"
    )
    parser.add_argument("--db", action="append", choices=DB_KINDS, help="repeatable [both]")
    parser.add_argument("--only", choices=("fleet", "faults"), help="run only this scenario [both]")
    parser.add_argument("--py-spy", metavar="PATH", help="sample the server with py-spy")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = parser.parse_args(argv)
    kinds = args.db or list(DB_KINDS)
    common = {
        "concurrency": args.concurrency,
        "processes": args.processes,
        "chunk_size": args.chunk_size,
        "package_size": args.package_size,
        "seed": 5,
        "http": args.http,
    }
    scenarios = {
        "fleet": FleetConfig(devices=args.devices, **common),
        "faults": FleetConfig(
            devices=args.fault_devices,
            drop_rate=args.drop_rate,
            power_cut_rate=args.power_cut_rate,
            **common,
        ),
    }
    if args.only:
        scenarios = {args.only: scenarios[args.only]}
    print(f"onenet-ota fleet benchmark on {machine()}", flush=True)
    outcomes: list[Outcome] = []
    with _cluster(kinds) as cluster:
        for db in kinds:
            for name, config in scenarios.items():
                print(f"-- {name} on {db}: {config.devices} devices ...", flush=True)
                outcome = run_scenario(db, name, config, args, cluster)
                print_outcome(outcome)
                outcomes.append(outcome)
    print("\nsummary")
    for outcome in outcomes:
        report = outcome.report
        total = len(report.state.devices)
        print(
            f"  {outcome.scenario:<7} {outcome.db:<9} {report.succeeded}/{total} succeeded "
            f"({report.succeeded / total:.3f}), {report.state.elapsed:7.1f} s, "
            f"{report.metrics.requests / max(report.state.elapsed, 1e-9):6.0f} req/s, "
            f"agreement {'OK' if report.agreement and report.agreement.ok else 'FAILED'}: "
            f"{'met' if outcome.met else 'MISSED'}"
        )
    by_key = {(o.db, o.scenario): o for o in outcomes}
    for name in scenarios:
        sqlite, pg = by_key.get(("sqlite", name)), by_key.get(("postgres", name))
        if sqlite and pg:
            ratio = pg.report.state.elapsed / max(sqlite.report.state.elapsed, 1e-9)
            print(f"  {name}: PostgreSQL wall time / SQLite wall time = {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([o.to_dict() for o in outcomes], indent=2) + "\n")
    return 0 if all(o.met for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

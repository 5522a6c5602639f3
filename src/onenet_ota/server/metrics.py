"""The server's Prometheus metrics: what is counted, how processes add up, and what a scrape sees.

Exposed at ``GET /metrics`` (:mod:`.ops_api`) in the Prometheus text format, written by
``prometheus_client``:

| Metric | Type | Labels |
|---|---|---|
| ``onenet_ota_requests_total`` | counter | ``dialect``, ``endpoint``, ``answer`` |
| ``onenet_ota_request_duration_seconds`` | histogram | ``dialect``, ``endpoint`` |
| ``onenet_ota_device_tasks`` | gauge | ``state`` |
| ``onenet_ota_cache_hits_total`` / ``onenet_ota_cache_misses_total`` | counter | ``cache`` |
| ``onenet_ota_database_errors_total`` | counter | ``kind`` |
| ``onenet_ota_build_info`` | gauge (1) | ``version``, ``python``, ``database`` |

Label values never come from a client: ``dialect`` is ``classic``, ``studio``, ``fuse``,
``admin``, ``ops`` or ``none``; ``endpoint`` is a label of the dialect tables (``E3``, ``S-C``,
``F-D``), a management operation (``list_products``), an operations path (``healthz``) or
``unmatched`` for every path that names no endpoint; ``answer`` is the HTTP status the server
sent, or ``aborted`` when a request body was cut off. So a flood of junk paths adds no series.

The hot path. Counting through ``prometheus_client``'s own metric objects takes locks per value,
and memory-mapped file writes in its multi-process mode. Measured in one process on the loaded,
shared development machine: a counter increment plus a histogram observation 11-17 us, the same
through :class:`RequestStats` (plain Python lists: two increments, a sum and a bisect) 1.3-2.9 us.
So each process counts in those lists and the numbers become metric families only when scraped.
The caches count their own hits and misses (:class:`~.bounded_cache.BoundedCache`), and
database errors are counted where they surface (SQLAlchemy's ``handle_error`` event, the device
service's direct reads).

Several worker processes (``serve --workers N``): each writes a snapshot of its counts to its
own file in a directory private to the server (made by the supervisor, removed when it stops)
every :data:`FLUSH_INTERVAL` seconds and when it stops; a scrape, on whichever worker the
kernel hands it to, first writes that worker's snapshot, then adds up every file. Every file
only grows (counters), and a file of a worker that exited stays, so totals never go down; the
counts of another worker are at most :data:`FLUSH_INTERVAL` old (and a worker killed without
warning loses at most that much).

Gauges computed from the database (:class:`QueryGauge`) are read at scrape time by the scraping
process, whose view of the database is everybody's, and cached for a few seconds so that
frequent scrapes cost one query per interval. Other parts of the server add their own with
:meth:`Metrics.add_collector` (see that method for how).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text
from sqlalchemy.engine import ExceptionContext

import onenet_ota
from onenet_ota.protocol.states import TaskState
from onenet_ota.server.bounded_cache import BoundedCache

__all__ = [
    "BUCKETS",
    "FLUSH_INTERVAL",
    "MEMO_BYTES",
    "UNMATCHED",
    "Metrics",
    "QueryGauge",
    "RequestStats",
    "Snapshot",
    "database_error_kind",
]

log = logging.getLogger(__name__)

BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
"""Upper bounds of the latency histogram, in seconds: a cached device answer takes well under a
millisecond, an upload or a fleet-wide task several seconds."""

FLUSH_INTERVAL: Final = 1.0
"""Seconds between two snapshots of a worker's counts (several worker processes only)."""

DEVICE_TASKS_TTL: Final = 5.0
"""Seconds a scrape-time count of device tasks is reused."""

RequestKey = tuple[str, str, int | str]  # (dialect, endpoint, answer)
Classify = Callable[[str, str, int | str], tuple[str, str] | None]

UNMATCHED: Final = ("none", "unmatched")
"""The labels of a request whose path names no endpoint."""

MEMO_BYTES: Final = 2 * 1024 * 1024
"""Bytes of paths :class:`RequestStats` keeps with their labels, per process."""

# PEP 249's exception classes: the ``kind`` of a database error (bounded, whatever the driver).
_DBAPI_KINDS: Final = (
    "IntegrityError",
    "OperationalError",
    "ProgrammingError",
    "DataError",
    "NotSupportedError",
    "InternalError",
    "InterfaceError",
    "DatabaseError",
)


def database_error_kind(exc: BaseException) -> str:
    """The PEP 249 class of a driver's exception (``OperationalError``, ...), else ``other``."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in _DBAPI_KINDS:
        if kind in names:
            return kind
    return "other"


class RequestStats:
    """This process's request counts and latency buckets; :meth:`record` is the hot path.

    One list per (dialect, endpoint, answer): ``[count, seconds, bucket 0, ..., bucket +Inf]``,
    buckets not cumulative. Only the event loop's thread records; a snapshot may be taken from
    any thread (copying a list or a dict's items is one step under the GIL, and every value
    only grows).

    ``classify(method, path, answer)`` names a request's (dialect, endpoint), None for a path
    of no endpoint. Its answers are kept per path (device paths repeat: a polling device's, the
    chunks of one download), so that a repeated request costs three dictionary lookups. The
    paths are a client's, so what is kept is bounded by their bytes (:data:`MEMO_BYTES`; when
    full it starts again empty), and paths of no endpoint are not kept at all.
    """

    __slots__ = ("_classify", "_memo", "_memo_bytes", "_slots")

    def __init__(self, classify: Classify | None = None) -> None:
        self._slots: dict[RequestKey, list[float]] = {}
        self._classify = classify
        # path -> method -> answer -> slot
        self._memo: dict[str, dict[str, dict[int | str, list[float]]]] = {}
        self._memo_bytes = 0

    def slot(self, key: RequestKey) -> list[float]:
        """The counts of ``key``, created at zero."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = [0.0] * (3 + len(BUCKETS))
        return slot

    def record(self, key: RequestKey, seconds: float) -> None:
        """Count one request of ``key`` answered in ``seconds``."""
        slot = self.slot(key)
        slot[0] += 1
        slot[1] += seconds
        slot[2 + bisect_left(BUCKETS, seconds)] += 1  # le: the first bound >= seconds

    def request(self, method: str, path: str, answer: int | str, seconds: float) -> None:
        """Count one request by what ``classify`` names it."""
        by_method = self._memo.get(path)
        by_answer = None if by_method is None else by_method.get(method)
        slot = None if by_answer is None else by_answer.get(answer)
        if slot is None:
            self._first(method, path, answer, seconds)
            return
        slot[0] += 1
        slot[1] += seconds
        slot[2 + bisect_left(BUCKETS, seconds)] += 1

    def _first(self, method: str, path: str, answer: int | str, seconds: float) -> None:
        assert self._classify is not None
        labels = self._classify(method, path, answer)
        key = (*(labels or UNMATCHED), answer)
        self.record(key, seconds)
        if labels is not None:
            by_method = self._memo.get(path)
            if by_method is None:
                if self._memo_bytes > MEMO_BYTES:
                    self._memo.clear()
                    self._memo_bytes = 0
                by_method = self._memo[path] = {}
                self._memo_bytes += 400 + len(path)  # the path and three small dicts (about)
            by_method.setdefault(method, {})[answer] = self.slot(key)

    def labels(self, method: str, path: str, answer: int | str) -> tuple[str, str]:
        """The (dialect, endpoint) of a request, as :meth:`request` counts it."""
        assert self._classify is not None
        return self._classify(method, path, answer) or UNMATCHED

    def snapshot(self) -> dict[RequestKey, list[float]]:
        """A copy of every slot."""
        return {key: list(slot) for key, slot in list(self._slots.items())}


@dataclass
class Snapshot:
    """Counts of one process (or the sum of several), as written to and read from a file."""

    requests: dict[RequestKey, list[float]] = field(default_factory=dict)
    caches: dict[str, list[int]] = field(default_factory=dict)  # name -> [hits, misses]
    db_errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: Snapshot) -> None:
        """Add ``other``'s counts to these."""
        for key, slot in other.requests.items():
            mine = self.requests.get(key)
            if mine is None:
                self.requests[key] = list(slot)
            else:
                for i, value in enumerate(slot):
                    mine[i] += value
        for name, (hits, misses) in other.caches.items():
            counts = self.caches.setdefault(name, [0, 0])
            counts[0] += hits
            counts[1] += misses
        for kind, count in other.db_errors.items():
            self.db_errors[kind] = self.db_errors.get(kind, 0) + count

    def dumps(self) -> str:
        """JSON text of these counts."""
        return json.dumps(
            {
                "requests": [[*key, *slot] for key, slot in self.requests.items()],
                "caches": self.caches,
                "db_errors": self.db_errors,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, data: str) -> Snapshot:
        """Counts from :meth:`dumps`'s text; ``ValueError`` if it is not such text."""
        try:
            raw = json.loads(data)
            requests: dict[RequestKey, list[float]] = {}
            for row in raw["requests"]:
                dialect, endpoint, answer, *slot = row
                if len(slot) != 3 + len(BUCKETS):
                    raise ValueError("a request row of the wrong length")
                requests[(str(dialect), str(endpoint), answer)] = [float(v) for v in slot]
            caches = {str(k): [int(v[0]), int(v[1])] for k, v in raw["caches"].items()}
            db_errors = {str(k): int(v) for k, v in raw["db_errors"].items()}
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a metrics snapshot: {exc!r}") from None
        return cls(requests, caches, db_errors)


class QueryGauge:
    """A gauge family read from the database at scrape time, reused for ``ttl`` seconds.

    ``query`` returns ``(label values, value)`` pairs; it runs in the scraping thread (never on
    the event loop). If it fails, the scrape leaves the family out (and logs why) rather than
    failing whole.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Iterable[str],
        query: Callable[[], Iterable[tuple[Iterable[str], float]]],
        *,
        ttl: float = DEVICE_TASKS_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self._query = query
        self._ttl = ttl
        self._clock = clock
        self._cached: list[tuple[list[str], float]] | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        """The family, from the cache or a fresh query."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now >= self._expires:
                try:
                    self._cached = [(list(lv), float(v)) for lv, v in self._query()]
                except Exception:
                    log.warning("metrics: cannot read %s", self.name, exc_info=True)
                    self._cached = None
                    return
                self._expires = now + self._ttl
            rows = self._cached
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for label_values, value in rows:
            family.add_metric(label_values, value)
        yield family


def device_task_states(engine: Engine) -> QueryGauge:
    """``onenet_ota_device_tasks{state}``: device tasks per state, every state listed."""
    statement = text("SELECT state, COUNT(*) FROM device_tasks GROUP BY state")

    def query() -> list[tuple[list[str], float]]:
        with engine.connect() as conn:
            counts = {int(state): int(n) for state, n in conn.execute(statement)}
        rows: list[tuple[list[str], float]] = []
        for state in TaskState:
            rows.append(([state.name.lower()], float(counts.pop(state.value, 0))))
        for number, n in sorted(counts.items()):  # a state this version does not know
            rows.append(([str(number)], float(n)))
        return rows

    return QueryGauge(
        "onenet_ota_device_tasks", "Device tasks per state (read at scrape time).", ["state"], query
    )


class _BuildInfo:
    def __init__(self, database: str) -> None:
        python = ".".join(str(part) for part in sys.version_info[:3])
        self._family = GaugeMetricFamily(
            "onenet_ota_build_info",
            "The running version; always 1.",
            labels=["version", "python", "database"],
        )
        self._family.add_metric([onenet_ota.__version__, python, database], 1.0)

    def collect(self) -> Iterator[Metric]:
        yield self._family


class Metrics:
    """One process's metrics and the registry a scrape renders.

    ``classify`` names requests (see :class:`RequestStats`); ``caches`` are the process's
    caches by name (their hit and miss counts are exported);
    ``share_dir`` is the directory where the workers of one server exchange their counts (None
    for a server of one process). ``engine`` feeds the scrape-time gauges.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        classify: Classify | None = None,
        caches: Mapping[str, BoundedCache[Any, Any]] | None = None,
        share_dir: Path | None = None,
    ) -> None:
        self.requests = RequestStats(classify)
        self._caches = dict(caches or {})
        self._db_errors: dict[str, int] = {}
        self._db_lock = threading.Lock()
        self._share_dir = share_dir
        # A name no other process of this server has, now or later (pids are reused).
        self._own_file = (
            None
            if share_dir is None
            else share_dir / f"worker-{os.getpid()}-{secrets.token_hex(4)}.json"
        )
        self._flush_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Totals(self))
        self.registry.register(_BuildInfo(engine.dialect.name))
        self.registry.register(device_task_states(engine))

    def add_collector(self, collector: Collector) -> None:
        """Export ``collector``'s families on every scrape.

        The hook for parts that keep their state in the database (campaigns and their stages,
        for example): give an object with a ``collect()`` that yields
        ``prometheus_client.core`` metric families, or a :class:`QueryGauge` for a gauge read
        by one query, cached for a few seconds. It runs in the scraping thread, not on the
        event loop, and must not take labels from what clients send. Wire it where the part is
        composed (:func:`onenet_ota.server.app.create_app`):
        ``resources.metrics.add_collector(QueryGauge(...))``.
        """
        self.registry.register(collector)

    def add_caches(self, caches: Mapping[str, BoundedCache[Any, Any]]) -> None:
        """Export the hit and miss counts of more caches."""
        self._caches.update(caches)

    # -- counting (any thread) ---------------------------------------------------------------

    def database_error(self, exc: BaseException) -> None:
        """Count one error the database (or its driver) raised."""
        kind = database_error_kind(exc)
        with self._db_lock:
            self._db_errors[kind] = self._db_errors.get(kind, 0) + 1

    def on_engine_error(self, context: ExceptionContext) -> None:
        """SQLAlchemy's ``handle_error`` event: count the driver's exception."""
        self.database_error(context.original_exception)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This process's counts now."""
        with self._db_lock:
            db_errors = dict(self._db_errors)
        caches = {name: [c.hits, c.misses] for name, c in self._caches.items()}
        return Snapshot(self.requests.snapshot(), caches, db_errors)

    def flush(self) -> None:
        """Write this process's snapshot to its file (several worker processes only)."""
        if self._own_file is None:
            return
        with self._flush_lock:
            temporary = self._own_file.with_suffix(".tmp")
            temporary.write_text(self.snapshot().dumps(), encoding="utf-8")
            os.replace(temporary, self._own_file)  # readers see the old file or the new

    def totals(self) -> Snapshot:
        """Everybody's counts: this process's, or with workers, the sum of every file after
        writing this one's."""
        if self._share_dir is None:
            return self.snapshot()
        self.flush()
        total = Snapshot()
        for path in sorted(self._share_dir.glob("worker-*.json")):
            try:
                total.add(Snapshot.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                # Files are replaced whole, so this is a file another program put or damaged:
                # say so, and count the rest.
                log.warning("metrics: cannot read %s; left out of this scrape", path.name)
        return total

    def render(self) -> bytes:
        """The Prometheus text exposition of everything. Blocking: run it off the event loop."""
        return generate_latest(self.registry)


class _Totals:
    """The counted families (requests, latencies, caches, database errors), summed over every
    process at collect time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        total = self._metrics.totals()
        requests = CounterMetricFamily(
            "onenet_ota_requests",
            "Requests answered, by dialect, endpoint and answer (HTTP status, or aborted).",
            labels=["dialect", "endpoint", "answer"],
        )
        durations = HistogramMetricFamily(
            "onenet_ota_request_duration_seconds",
            "Time from a request's head to its response, by dialect and endpoint.",
            labels=["dialect", "endpoint"],
        )
        by_endpoint: dict[tuple[str, str], list[float]] = {}
        for (dialect, endpoint, answer), slot in sorted(
            total.requests.items(), key=lambda item: tuple(str(part) for part in item[0])
        ):
            requests.add_metric([dialect, endpoint, str(answer)], slot[0])
            mine = by_endpoint.get((dialect, endpoint))
            if mine is None:
                by_endpoint[(dialect, endpoint)] = list(slot)
            else:
                for i, value in enumerate(slot):
                    mine[i] += value
        for (dialect, endpoint), slot in by_endpoint.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), slot[2:], strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            durations.add_metric([dialect, endpoint], buckets, slot[1])
        yield requests
        yield durations
        hits = CounterMetricFamily(
            "onenet_ota_cache_hits", "Lookups answered by a cache.", labels=["cache"]
        )
        misses = CounterMetricFamily(
            "onenet_ota_cache_misses", "Lookups a cache could not answer.", labels=["cache"]
        )
        for name, (hit, miss) in sorted(total.caches.items()):
            hits.add_metric([name], hit)
            misses.add_metric([name], miss)
        yield hits
        yield misses
        errors = CounterMetricFamily(
            "onenet_ota_database_errors",
            "Errors raised by the database or its driver, by PEP 249 class.",
            labels=["kind"],
        )
        for kind, count in sorted(total.db_errors.items()):
            errors.add_metric([kind], count)
        yield errors


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)

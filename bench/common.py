"""What the fleet, peer and scale benchmarks share: databases, the server under test, CPU
accounting and profiling of a process by its id.

- :func:`database`: a throwaway database by kind, ``sqlite`` (a file in a temporary directory)
  or ``postgres`` (a new database in a cluster of :mod:`tests.pgcluster`, started for the run
  with durable settings and removed at the end).
- :func:`process_cpu`: CPU seconds used so far by a process and its live descendants (workers),
  from /proc, so a benchmark can say whether the server or the client was the bottleneck.
- :class:`PySpy`: ``py-spy record`` attached to a server process for a while, when py-spy is
  installed (``pip install --target /tmp/pyspy py-spy``, then ``--py-spy /tmp/pyspy/bin/py-spy``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from tests.pgcluster import BENCH_OPTIONS, PgCluster, running_cluster

__all__ = ["DB_KINDS", "PySpy", "database", "machine", "postgres_pid", "process_cpu"]

DB_KINDS: Final = ("sqlite", "postgres")
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@contextlib.contextmanager
def postgres() -> Iterator[PgCluster]:
    """A throwaway cluster with :data:`tests.pgcluster.BENCH_OPTIONS`."""
    with running_cluster(BENCH_OPTIONS) as cluster:
        yield cluster


@contextlib.contextmanager
def database(kind: str, cluster: PgCluster | None = None, name: str = "bench") -> Iterator[str]:
    """A fresh, empty database of ``kind``; yields its URL and removes it afterwards.

    For ``postgres`` pass a running ``cluster`` (one per run: starting one takes seconds).
    """
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="onenet-ota-bench-db-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    if kind != "postgres" or cluster is None:
        raise ValueError(f"unknown database kind {kind!r} (or no cluster for postgres)")
    cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    cluster.admin_sql(f'CREATE DATABASE "{name}"')
    try:
        yield cluster.url(name)
    finally:
        with contextlib.suppress(Exception):
            cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        found: list[int] = []
        for task in tasks:
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
        return found
    except OSError:
        return []


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants; 0 if it is gone."""
    total = 0.0
    for each in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return total


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def postgres_pid(cluster: PgCluster) -> int | None:
    """The postmaster's process id (its backends are its children), if it can be read."""
    try:
        first = (cluster.socket_dir / "data" / "postmaster.pid").read_text().split()[0]
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def machine() -> str:
    """One line about where this ran: CPUs, Python, load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]} ({platform.machine()}), "
        f"load average {load:.1f}"
    )


class PySpy:
    """``py-spy record`` of process ``pid`` into ``output`` (speedscope JSON), until stopped.

    ``executable`` is py-spy's path; with ``subprocesses`` the workers are sampled too.
    """

    def __init__(self, executable: str, pid: int, output: Path, *, rate: int = 200) -> None:
        path = shutil.which(executable) or executable
        if not Path(path).is_file():
            raise FileNotFoundError(f"py-spy not found at {executable}")
        self.output = output
        self._process = subprocess.Popen(
            [path, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate),
             "--format", "raw", "--output", str(output), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> str:
        """Stop recording (SIGINT makes py-spy write its output); returns its messages."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            _, err = self._process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, err = self._process.communicate()
        return err.decode(errors="replace").strip()

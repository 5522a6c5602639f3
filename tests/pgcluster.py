"""A throwaway PostgreSQL cluster: started in a temporary directory, removed afterwards.

Shared by the test fixtures (``pg_cluster`` in tests/conftest.py) and the benchmarks
(``bench.fleet_bench``, ``bench.scale_bench``), so there is one way to run one.

PostgreSQL's initdb and pg_ctl refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) in a directory that user owns. :func:`unavailable_reason` says why a cluster cannot
be started here (binaries or user missing), or None.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "BENCH_OPTIONS",
    "PG_BIN",
    "PG_USER",
    "TEST_OPTIONS",
    "ClusterProcess",
    "PgCluster",
    "free_port",
    "running_cluster",
    "unavailable_reason",
]

PG_BIN = Path(os.environ.get("ONENET_OTA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"

# Durability is irrelevant for a throwaway test cluster. fsync=off keeps it fast, and minimal WAL
# makes CREATE DATABASE ... STRATEGY FILE_COPY (one per test) take ~0.2 s, not ~0.7 s.
TEST_OPTIONS: Final = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
    "-c wal_level=minimal -c max_wal_senders=0"
)
# Benchmarks keep fsync and full-page writes, as a deployment would, and commit like SQLite's
# synchronous=NORMAL (no flush per commit; a crash may lose the last transactions, never corrupt).
BENCH_OPTIONS: Final = (
    "-c synchronous_commit=off -c max_connections=200 -c shared_buffers=256MB "
    "-c wal_level=minimal -c max_wal_senders=0"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class PgCluster:
    """A running throwaway cluster: superuser ``postgres``, trust auth, TCP on 127.0.0.1."""

    host: str
    port: int
    socket_dir: Path

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (psycopg 3) for ``database`` in this cluster."""
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    def admin_sql(self, statement: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(statement.encode())


def unavailable_reason() -> str | None:
    """Why no cluster can be started on this machine, or None when one can."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            return f"{PG_BIN / tool} not found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL"
    return None


class ClusterProcess:
    """Starts and stops one cluster; every step of cleanup is tolerant of earlier failures.

    ``options`` are the server's ``-c`` settings (:data:`TEST_OPTIONS` or :data:`BENCH_OPTIONS`).
    """

    def __init__(self, options: str = TEST_OPTIONS) -> None:
        self.options = options
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root and runuser is missing")
            self.as_postgres = [runuser, "-u", PG_USER, "--"]
        self.root = Path(tempfile.mkdtemp(prefix="onenet-ota-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.started = False
        self._server_options = ""

    def run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self.as_postgres, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {result.stderr.strip()[-2000:]}")

    def start(self) -> PgCluster:
        if self.as_postgres:
            user = pwd.getpwnam(PG_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            "--no-sync",
        )
        port = free_port()
        self._server_options = (
            f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 {self.options}"
        )
        self.started = True
        self._launch()
        return PgCluster(host="127.0.0.1", port=port, socket_dir=self.root)

    def _launch(self) -> None:
        self.run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            self._server_options,
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )

    def halt(self) -> None:
        """Stop the server as an outage would (fast shutdown: every session is cut), keeping
        the data for :meth:`resume`."""
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the halted server again, on the same port, with the same data."""
        self._launch()

    def stop(self) -> None:
        try:
            if self.started:
                with contextlib.suppress(Exception):
                    pg_ctl = str(PG_BIN / "pg_ctl")
                    self.run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(options: str = TEST_OPTIONS) -> Iterator[PgCluster]:
    """A cluster for the block; stopped and removed however the block ends.

    Raises RuntimeError (or OSError) when it cannot start; see :func:`unavailable_reason`.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"PostgreSQL unavailable: {reason}")
    process = ClusterProcess(options)
    try:
        yield process.start()
    finally:
        process.stop()

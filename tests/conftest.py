"""Shared fixtures: databases for the server tests.

``db_url`` runs a test twice: on a fresh SQLite file and on a freshly created PostgreSQL database in
a throwaway cluster that this session starts itself (once, on first use) and removes at the end.
``engine`` is an engine on that database with the schema created through the Alembic migrations.

PostgreSQL's initdb and pg_ctl refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) in a directory that user owns. When the binaries or the user are missing the
PostgreSQL variants skip; with ``CI=true`` that is a failure instead (.ci/run).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine

PG_BIN = Path(os.environ.get("ONENET_OTA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    """Skip the PostgreSQL variant, or fail it under CI where PostgreSQL must be exercised."""
    if _in_ci():
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _free_port() -> int:
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


class _ClusterProcess:
    """Starts and stops one cluster; every step of cleanup is tolerant of earlier failures."""

    def __init__(self) -> None:
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
        port = _free_port()
        # Durability is irrelevant for a throwaway cluster. fsync=off keeps it fast, and minimal
        # WAL makes CREATE DATABASE ... STRATEGY FILE_COPY (one per test) take ~0.2 s, not ~0.7 s.
        options = (
            f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            "-c wal_level=minimal -c max_wal_senders=0"
        )
        self.started = True
        self.run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )
        return PgCluster(host="127.0.0.1", port=port, socket_dir=self.root)

    def stop(self) -> None:
        try:
            if self.started:
                with contextlib.suppress(Exception):
                    pg_ctl = str(PG_BIN / "pg_ctl")
                    self.run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the whole session, started on first use."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            _unavailable(f"{PG_BIN / tool} not found")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            _unavailable(f"running as root and there is no {PG_USER!r} user to run PostgreSQL")
    process: _ClusterProcess | None = None
    try:
        try:
            process = _ClusterProcess()
            cluster = process.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _unavailable(str(exc))
        yield cluster
    finally:
        if process is not None:
            process.stop()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'onenet-ota.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield _sqlite_url(tmp_path)
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = f"test_{uuid.uuid4().hex}"
    cluster.admin_sql(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
    try:
        yield cluster.url(name)
    finally:
        # FORCE ends connections a failed test may have leaked (PostgreSQL 13+).
        with contextlib.suppress(Exception):
            cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` whose schema was created by the migrations."""
    from onenet_ota.server.db import create_engine, migrate

    eng = create_engine(db_url)
    try:
        migrate(eng)
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio only."""
    return "asyncio"

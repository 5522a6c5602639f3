"""Shared fixtures: databases for the server tests.

``db_url`` runs a test twice: on a fresh SQLite file and on a freshly created PostgreSQL database in
a throwaway cluster that this session starts itself (once, on first use) and removes at the end.
``engine`` is an engine on that database with the schema created through the Alembic migrations.

The cluster itself is :mod:`tests.pgcluster` (the benchmarks start theirs with it too). When the
binaries or the user to run them are missing the PostgreSQL variants skip; with ``CI=true`` that
is a failure instead (.ci/run).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.pgcluster import ClusterProcess, PgCluster, unavailable_reason


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    """Skip the PostgreSQL variant, or fail it under CI where PostgreSQL must be exercised."""
    if _in_ci():
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the whole session, started on first use."""
    reason = unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    process: ClusterProcess | None = None
    try:
        try:
            process = ClusterProcess()
            cluster = process.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _unavailable(str(exc))
        yield cluster
    finally:
        if process is not None:
            process.stop()


@pytest.fixture
def own_pg_cluster() -> Iterator[tuple[ClusterProcess, PgCluster]]:
    """A PostgreSQL cluster of the test's own, which it may halt and resume (an outage)."""
    reason = unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    try:
        process = ClusterProcess()
    except (OSError, RuntimeError) as exc:
        _unavailable(str(exc))
    try:
        try:
            cluster = process.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _unavailable(str(exc))
        yield process, cluster
    finally:
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

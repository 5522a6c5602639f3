"""The platform through a PostgreSQL outage: the database server stops (every session cut) in
the middle of an upgrade, and comes back on the same address.

While it is down, every device request gets its protocol's failure answer (errno 7 for the JSON
endpoints, D6's read-failed byte for a download) and the management API a 503 with
``Retry-After``: never a 500, never a traceback, never a hung request. Once it is back, the very
next requests succeed, with no error left over from connections broken by the outage, and the
upgrade completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from onenet_ota.device import (
    DeviceConfig,
    DownloadError,
    DownloadErrorCode,
    OtaClient,
    PlatformInternalError,
    StatusCode,
)
from onenet_ota.server.db import create_engine, migrate
from tests.integration.conftest import Platform, serve_platform
from tests.pgcluster import ClusterProcess, PgCluster
from tests.server.seed import FIRMWARE

pytestmark = pytest.mark.postgres

CHUNK = 4096


@pytest.fixture
def outage(
    own_pg_cluster: tuple[ClusterProcess, PgCluster], tmp_path: Path
) -> Iterator[tuple[ClusterProcess, Platform]]:
    process, cluster = own_pg_cluster
    cluster.admin_sql('CREATE DATABASE "ota"')
    engine = create_engine(cluster.url("ota"))
    try:
        migrate(engine)
    finally:
        engine.dispose()
    # No caches: every request reaches the database (or finds it gone).
    with serve_platform(cluster.url("ota"), tmp_path / "data", cache_ttl=0) as platform:
        yield process, platform


def _poll_token(config: DeviceConfig, platform: Platform, token: str) -> int:
    """E5 ten times from a client of its own; returns how many succeeded (raises otherwise)."""
    with OtaClient(config, base_url=platform.api.url, timeout=10_000) as client:
        for _ in range(10):
            client.check_token(token)
    return 10


def _admin_is_unavailable(platform: Platform, path: str) -> None:
    reply = platform.admin.get(path)
    assert reply.status_code == 503, reply.text
    assert reply.headers["Retry-After"] == "1"
    assert reply.json()["error"]["code"] == "unavailable"
    assert "Traceback" not in reply.text


def test_an_outage_fails_every_request_cleanly_and_the_next_ones_succeed(
    outage: tuple[ClusterProcess, Platform],
) -> None:
    process, platform = outage
    world = platform.world()
    with OtaClient(world.config(), base_url=platform.api.url, timeout=10_000) as client:
        client.post_version()
        task = client.check_task()
        client.check_token(task.token)
        package = client.download_package(task.token, 0, CHUNK)
        client.report_status(task.token, 10)  # progress: a write that succeeded

        process.halt()
        try:
            for call in (
                client.post_version,
                client.check_task,
                lambda: client.check_token(task.token),
                lambda: client.report_status(task.token, 20),
            ):
                with pytest.raises(PlatformInternalError):
                    call()
            with pytest.raises(DownloadError) as failed:
                client.download_package(task.token, len(package), CHUNK)
            assert failed.value.reason is DownloadErrorCode.READ_FAILED
            _admin_is_unavailable(platform, f"/tasks/{world.task_id}")
            _admin_is_unavailable(platform, "/products")
        finally:
            process.resume()

        # The next request of each kind succeeds at once, on whichever of the server's
        # threads (and their database connections, some cut by the outage) it lands.
        assert client.check_task().token == task.token
        with ThreadPoolExecutor(8) as pool:
            polls = [
                pool.submit(_poll_token, world.config(), platform, task.token) for _ in range(8)
            ]
            assert [poll.result() for poll in polls] == [10] * 8
        assert platform.state(world) == "downloading"
        while len(package) < task.size:
            client.check_token(task.token)
            package += client.download_package(task.token, len(package), CHUNK)
        assert package == FIRMWARE
        client.report_status(task.token, StatusCode.DOWNLOADED)
        client.report_status(task.token, StatusCode.UPGRADED)
    assert platform.state(world) == "succeeded"
    assert platform.device(world)["f_version"] == "1.0.1"


def test_a_restart_between_requests_costs_no_request(
    outage: tuple[ClusterProcess, Platform],
) -> None:
    """The database restarts while nobody asks anything (a nightly maintenance): its sessions
    are cut, and the server learns it only from its next statement, which must not fail."""
    process, platform = outage
    world = platform.world()
    with OtaClient(world.config(), base_url=platform.api.url, timeout=10_000) as client:
        task = client.check_task()
        client.check_token(task.token)
        process.halt()
        process.resume()
        client.post_version()
        assert client.check_task().token == task.token
        client.check_token(task.token)
        assert client.download_package(task.token, 0, CHUNK) == FIRMWARE[:CHUNK]
        client.report_status(task.token, 50)
    assert platform.device_task(world)["progress"] == 50

"""Campaign evaluation under ``onenet-ota serve --workers 3`` on PostgreSQL: every worker runs
the evaluator, the lease lets one act, and every automatic decision is applied and recorded once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import and_, select, update

from onenet_ota.protocol.states import TaskState
from onenet_ota.server import schema
from onenet_ota.server.db import create_engine
from tests.pgcluster import PgCluster
from tests.server.serve_process import ServerProcess

TOKEN = "campaign-workers-admin-token"
pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex}"
    pg_cluster.admin_sql(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
    try:
        yield pg_cluster.url(name)
    finally:
        with contextlib.suppress(Exception):
            pg_cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _call(client: httpx2.Client, method: str, path: str, **kwargs: Any) -> Any:
    reply = client.request(method, "/api/v1" + path, **kwargs)
    assert reply.status_code < 300, reply.text
    return reply.json() if reply.content else None


@pytest.mark.timeout(300)
def test_three_workers_decide_once(pg_url: str, tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data", "--workers", "3", "--db", pg_url, "--admin-token", TOKEN
    )
    engine = create_engine(pg_url)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx2.Client(base_url=server.url(), headers=headers, timeout=30) as client:
            product = _call(client, "POST", "/products", json={})
            devices = [{"name": f"d{i}"} for i in range(60)]
            _call(
                client, "POST", "/devices/import", json={"pid": product["pid"], "devices": devices}
            )
            package = _call(
                client,
                "POST",
                "/packages",
                params={"pid": product["pid"], "type": "fota", "target": "2", "file_name": "f"},
                content=b"firmware",
            )
            stages = [{"count": 10}, {"count": 30}, {"rest": True}]
            spec = {"package_id": package["id"], "selector": {}, "stages": stages}
            campaign = _call(client, "POST", "/campaigns", json=spec)
            _call(client, "POST", f"/campaigns/{campaign['id']}/start")
            for stage in range(3):
                # Every member of the stage reports success (T15), as the device API writes it.
                with engine.begin() as conn:
                    cd, dt = schema.campaign_devices, schema.device_tasks
                    conn.execute(
                        update(dt)
                        .where(
                            dt.c.id.in_(
                                select(dt.c.id).join(
                                    cd,
                                    and_(cd.c.task_id == dt.c.task_id, cd.c.dev_id == dt.c.dev_id),
                                )
                            )
                        )
                        .values(state=int(TaskState.SUCCEEDED), result_code=201)
                    )
                deadline = time.monotonic() + 60  # stops a broken run; the evaluator takes < 1 s
                while time.monotonic() < deadline:
                    campaign = _call(client, "GET", f"/campaigns/{campaign['id']}")
                    # Advanced and the next stage's members activated, or ended.
                    if campaign["activated_stage"] > stage or campaign["state"] != "running":
                        break
                    time.sleep(0.05)
            events = _call(client, "GET", f"/campaigns/{campaign['id']}/events")["items"]
        assert campaign["state"] == "finished"
        assert [(e["actor"], e["action"]) for e in events] == [
            ("operator", "start"),
            ("auto", "advance"),
            ("auto", "advance"),
            ("auto", "finish"),
        ]
        assert [e["version"] for e in events] == [1, 2, 3, 4]
        assert [s["counts"]["targeted"] for s in campaign["stages"]] == [10, 20, 30]
        with engine.connect() as conn:
            assert conn.execute(select(schema.leases.c.holder)).scalar_one() != ""
    finally:
        engine.dispose()
        assert server.stop() == 0

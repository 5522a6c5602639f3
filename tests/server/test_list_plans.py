"""How SQLite answers the lists whose cost must not grow with the fleet: the statements the
service runs are captured and explained, so a filter that walks every device (or counts every
device task) to find a few fails here, without timing anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, text

from onenet_ota.server.admin_service import AdminService, ProductCreate
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.schema import device_labels, device_tasks, devices, packages, tasks


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[AdminService, Engine]]:
    """A SQLite fleet of 300 devices: one task over all of them, two downloading, one failed,
    a label on all and a rare one on two; ANALYZE'd, as a long-running database is."""
    engine = create_engine(f"sqlite:///{tmp_path / 'plans.db'}")
    migrate(engine)
    service = AdminService(engine, BlobStore(tmp_path / "packages"))
    service.create_product(ProductCreate(pid="p1"))
    with engine.begin() as conn:
        conn.execute(
            insert(devices),
            [
                {"dev_id": n, "pid": "p1", "name": f"d{n}", "auth_info": f"d{n}", "created_at": 0}
                for n in range(1, 301)
            ],
        )
        conn.execute(
            insert(packages).values(
                id=1, pid="p1", module_type=1, kind=1, target="2", file_name="f", size=1,
                md5="0" * 32, sha256="0" * 64, created_at=0,
            )
        )  # fmt: skip
        conn.execute(
            insert(tasks).values(id=1, pid="p1", package_id=1, module_type=1, start_time=0,
                                 created_at=0)
        )  # fmt: skip
        states = {150: 2, 299: 2, 200: 5}
        conn.execute(
            insert(device_tasks),
            [
                {"task_id": 1, "dev_id": n, "module_type": 1, "state": states.get(n, 1),
                 "updated_at": 0}
                for n in range(1, 301)
            ],
        )  # fmt: skip
        conn.execute(
            insert(device_labels),
            [{"dev_id": n, "key": "site", "value": str(n % 3)} for n in range(1, 301)]
            + [{"dev_id": n, "key": "ring", "value": "canary"} for n in (7, 280)],
        )
        conn.execute(text("ANALYZE"))
    try:
        yield service, engine
    finally:
        engine.dispose()


def plans(engine: Engine, call: Any) -> tuple[Any, list[str], list[str]]:
    """``call()``'s result, the SELECTs it ran, and their query plans' lines."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        result = call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    lines: list[str] = []
    with engine.connect() as conn:
        for statement, parameters in statements:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            lines += [
                row[-1] for row in cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            ]
    return result, [s for s, _ in statements], lines


def test_a_rare_state_is_read_from_the_device_tasks_index(
    fleet: tuple[AdminService, Engine],
) -> None:
    service, engine = fleet
    page, _, lines = plans(engine, lambda: service.list_devices(state="downloading"))
    assert [d.dev_id for d in page.items] == [150, 299]
    assert not any(line.startswith("SCAN devices") for line in lines), lines
    assert not any(line.startswith("SCAN device_tasks") for line in lines), lines


def test_a_label_is_read_from_the_label_index(fleet: tuple[AdminService, Engine]) -> None:
    service, engine = fleet
    page, _, lines = plans(engine, lambda: service.list_devices(labels=[("ring", "canary")]))
    assert [d.dev_id for d in page.items] == [7, 280]
    assert not any(line.startswith("SCAN devices") for line in lines), lines
    assert any("ix_device_labels_key_value" in line for line in lines), lines


def test_a_tasks_failed_devices_are_read_without_walking_the_task(
    fleet: tuple[AdminService, Engine],
) -> None:
    service, engine = fleet
    page, statements, lines = plans(
        engine, lambda: service.list_task_devices(1, state="failed", limit=500)
    )
    assert [d.dev_id for d in page.items] == [200]
    # No per-state count of the whole task (the page does not show one) ...
    assert not any("GROUP BY" in s for s in statements), statements
    # ... and the failed rows come from the (task_id, state) index, not a walk of the task.
    assert any("ix_device_tasks_task_id_state (task_id=? AND state=?)" in line for line in lines)
    assert not any("sqlite_autoindex_device_tasks_1" in line for line in lines), lines


def test_idle_devices_come_from_one_merge_of_two_indexes(
    fleet: tuple[AdminService, Engine],
) -> None:
    service, engine = fleet
    with engine.begin() as conn:  # three devices end their task: they are idle
        conn.execute(
            device_tasks.update().where(device_tasks.c.dev_id.in_([5, 6, 290])).values(state=4)
        )
    page, _, lines = plans(engine, lambda: service.list_devices(state="idle", limit=2))
    assert [d.dev_id for d in page.items] == [5, 6]
    following = service.list_devices(state="idle", limit=2, after=page.next)
    assert [d.dev_id for d in following.items] == [200, 290]  # 200 failed: not open either
    assert any("MERGE (EXCEPT)" in line for line in lines), lines
    assert not any("CORRELATED" in line for line in lines), lines

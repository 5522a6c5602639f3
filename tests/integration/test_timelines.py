"""Device timelines through the real platform (``platform``: SQLite and PostgreSQL): real
upgrades in each dialect, the OneNET C SDK's download loop that never fetches a package's last
byte, bytes served written in batches, and the history API."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import event, select

from onenet_ota.device import (
    Credentials,
    DeviceConfig,
    Dialect,
    FileInstaller,
    OtaClient,
    Outcome,
    Upgrader,
)
from onenet_ota.device.retry import Retry
from onenet_ota.device.upgrader import UpgradeOptions
from onenet_ota.protocol.endpoints import CHECK_PATH, DOWNLOAD_PREFIX, PROGRESS_PREFIX
from onenet_ota.server.schema import device_task_bytes, device_tasks
from tests.integration.conftest import CURRENT, Platform, World

OPTIONS = UpgradeOptions(chunk_size=4096, retry=Retry(interval=0.01, jitter=0))
# Each dialect's endpoint labels: the offer, the token/status check, the download, the report.
LABELS = {
    Dialect.CLASSIC: ("E3", "E5", "E6", "E7"),
    Dialect.STUDIO: ("S-C", "S-T", "S-D", "S-R"),
    Dialect.FUSE: ("F-C", "F-T", "F-D", "F-R"),
}


def _config(world: World, dialect: Dialect) -> DeviceConfig:
    if dialect is Dialect.CLASSIC:
        return world.config()
    credentials = Credentials.for_dialect(dialect, world.pid, world.access_key)
    return DeviceConfig(
        credentials=credentials,
        dev_id=None,
        version=CURRENT,
        dialect=dialect,
        product_id=world.pid,
        device_name=world.name,
    )


def _upgrade(platform: Platform, world: World, tmp_path: Path, dialect: Dialect) -> None:
    with OtaClient(_config(world, dialect), base_url=platform.api.url, timeout=10_000) as ota:
        result = Upgrader(
            ota,
            FileInstaller(tmp_path / "fw.bin"),
            state_dir=tmp_path / "state",
            options=OPTIONS,
            sleep=lambda seconds: None,
        ).run()
    assert result.outcome is Outcome.SUCCEEDED, result.reason


def _history(platform: Platform, world: World, **params: Any) -> list[dict[str, Any]]:
    page = platform.call("GET", f"/devices/{world.dev_id}/history", params=params)
    return list(page["items"])


def _assert_chain(events: list[dict[str, Any]], final: str) -> None:
    """The state changes follow each other: each starts where the previous ended."""
    moves = [(e["from_state"], e["to_state"]) for e in events if e["to_state"] is not None]
    assert moves, events
    assert moves[0][0] == "to_be_upgraded"
    for (_, before), (after, _) in itertools.pairwise(moves):
        assert before == after, moves
    assert moves[-1][1] == final


@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
def test_a_real_upgrade_is_on_the_timeline_with_its_dialect_and_endpoints(
    platform: Platform, tmp_path: Path, dialect: Dialect
) -> None:
    data = random.Random(os.urandom(8)).randbytes(3 * 4096 + 1)
    world = platform.world(data=data)
    _upgrade(platform, world, tmp_path, dialect)
    events = _history(platform, world)
    offer, check, download, report = LABELS[dialect]
    task_events = [e for e in events if e["kind"] != "version"]
    assert {e["dialect"] for e in task_events} == {dialect.value}
    assert task_events[0]["kind"] == "offered"
    assert task_events[0]["endpoint"] == offer
    assert [e["kind"] for e in task_events].count("offered") == 1  # polls write no more
    moved = [e for e in task_events if e["to_state"] is not None]
    # T9 by the first check (or a Studio/fuse download), then the device's reports.
    assert moved[0]["endpoint"] in (check, download)
    assert (moved[0]["from_state"], moved[0]["to_state"]) == ("to_be_upgraded", "downloading")
    reports = [e for e in moved if e["kind"] == "report"]
    assert [e["endpoint"] for e in reports] == [report] * len(reports)
    last = reports[-1]
    assert (last["code"], last["status_name"], last["status_text"]) == (
        201,
        "upgraded",
        "upgrade succeeded",
    )
    assert last["short_download"] is None  # the SDK fetched every byte
    _assert_chain(task_events, "succeeded")


# -- the OneNET C SDK's download loop -----------------------------------------------------------


def _c_sdk_upgrade(platform: Platform, world: World) -> None:
    """What the OneNET C SDK example does (spec §7): E3, then E5 + E6 of 4096 bytes while
    ``start < size - 1``, then E7 101 and 201."""
    base = platform.api.url
    headers = {"Authorization": world.credentials.authorization}
    dev = world.dev_id
    with httpx2.Client(base_url=base, headers=headers, timeout=30) as http:
        check = http.get(CHECK_PATH, params={"type": 1, "version": CURRENT, "dev_id": dev})
        data = check.json()["data"]
        token, size = data["token"], data["size"]
        start = 0
        while start < size - 1:
            assert http.get(f"{DOWNLOAD_PREFIX}{token}/check", params={"dev_id": dev}).json() == {
                "errno": 0,
                "error": "succ",
            }
            chunk = http.get(
                f"{DOWNLOAD_PREFIX}{token}", headers={"Range": f"{start}-{start + 4095}"}
            )
            assert chunk.status_code in (200, 206)
            start += len(chunk.content)
        for step in (101, 201):
            reply = http.post(
                f"{PROGRESS_PREFIX}{token}/progress", params={"dev_id": dev}, json={"step": step}
            )
            assert reply.json()["errno"] == 0


@pytest.mark.parametrize("size", [2 * 4096 + 1, 1], ids=["4096k+1", "1-byte"])
def test_success_after_the_c_sdk_loop_left_the_last_byte_is_flagged_not_refused(
    platform: Platform, size: int
) -> None:
    world = platform.world(data=random.Random(size).randbytes(size - 1) + os.urandom(1))
    _c_sdk_upgrade(platform, world)
    assert platform.state(world) == "succeeded"  # flagged, not refused
    reports = [e for e in _history(platform, world) if e["kind"] == "report"]
    assert [e["code"] for e in reports] == [101, 201]
    for e in reports:
        assert e["short_download"] == {"served": size - 1, "size": size}


@contextmanager
def _statements(platform: Platform) -> Iterator[list[str]]:
    """Every SQL statement the platform's engine runs meanwhile."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = platform.resources.engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_bytes_served_are_written_once_per_report_not_per_chunk(platform: Platform) -> None:
    size = 12 * 4096
    world = platform.world(data=os.urandom(size))
    headers = {"Authorization": world.credentials.authorization}
    dev = world.dev_id
    with httpx2.Client(base_url=platform.api.url, headers=headers, timeout=30) as http:
        data = http.get(CHECK_PATH, params={"type": 1, "version": CURRENT, "dev_id": dev}).json()
        token = data["data"]["token"]
        assert (
            http.get(f"{DOWNLOAD_PREFIX}{token}/check", params={"dev_id": dev}).json()["errno"] == 0
        )
        with _statements(platform) as during_chunks:
            for start in range(0, size, 4096):
                http.get(f"{DOWNLOAD_PREFIX}{token}", headers={"Range": f"{start}-{start + 4095}"})
        writes = [s for s in during_chunks if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
        assert writes == []  # twelve chunks, not one write
        assert _served(platform, world) is None  # still in the worker's memory
        with _statements(platform) as at_report:
            http.post(
                f"{PROGRESS_PREFIX}{token}/progress", params={"dev_id": dev}, json={"step": 101}
            )
    upserts = [s for s in at_report if "device_task_bytes" in s and "INSERT" in s.upper()]
    assert len(upserts) == 1
    assert _served(platform, world) == size
    (report,) = [e for e in _history(platform, world) if e["kind"] == "report"]
    assert report["short_download"] is None  # all 12 chunks counted


def _served(platform: Platform, world: World) -> int | None:
    with platform.resources.engine.connect() as conn:
        found = conn.execute(
            select(device_task_bytes.c.served)
            .join(device_tasks, device_tasks.c.id == device_task_bytes.c.device_task_id)
            .where(device_tasks.c.task_id == world.task_id)
        ).scalar_one_or_none()
    return None if found is None else int(found)


def test_history_pages_filters_by_task_and_names_unknown_devices(platform: Platform) -> None:
    world = platform.world()
    for _ in range(3):  # three version changes: three events, no task
        for version in ("1.1", "1.2"):
            reply = httpx2.post(
                platform.api.url + "/ota/device/version",
                params={"dev_id": world.dev_id},
                headers={"Authorization": world.credentials.authorization},
                json={"f_version": version, "s_version": version},
            )
            assert reply.json()["errno"] == 0
    everything = _history(platform, world)
    assert [e["kind"] for e in everything] == ["version"] * 6
    assert everything[0]["detail"] == "f_version=1.1 s_version=1.1"
    first = platform.call("GET", f"/devices/{world.dev_id}/history", params={"limit": 4})
    assert [e["id"] for e in first["items"]] == [e["id"] for e in everything[:4]]
    rest = platform.call(
        "GET", f"/devices/{world.dev_id}/history", params={"limit": 4, "after": first["next"]}
    )
    assert [e["id"] for e in rest["items"]] == [e["id"] for e in everything[4:]]
    assert rest["next"] is None
    assert _history(platform, world, task_id=world.task_id) == []  # no task event yet
    platform.call("GET", "/devices/9000000000000000001/history", expect=404)
    platform.call("GET", f"/devices/{world.dev_id}/history", params={"after": "x"}, expect=422)

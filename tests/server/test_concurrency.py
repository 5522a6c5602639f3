"""200 devices upgrading at once against one server, C-SDK style, one request per
connection, duplicate requests racing each other. No 5xx, consistent final states, no duplicate
rows. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, func, select

from onenet_ota import auth
from onenet_ota.protocol.states import TaskState
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import device_tasks, devices, tokens
from tests.server.seed import (
    DB_PARAMS,
    FIRMWARE,
    FIRMWARE_MD5,
    K1,
    FakeClock,
    Seeder,
    module_database,
    running_api,
)

DEVICES = 200
PID = "777000"
FIRST_DEV_ID = 8_000_000
AUTH = auth.build_token(PID, K1)
CHUNK = 4096


@pytest.fixture(scope="module", params=DB_PARAMS)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    with module_database(request, tmp_path_factory) as eng:
        yield eng


@dataclass
class Stats:
    statuses: Counter[int] = field(default_factory=Counter)


async def exchange(port: int, request: bytes, stats: Stats) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, as the C SDK sends it; returns status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        if "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        else:
            body = await reader.readuntil(b"0\r\n\r\n")
        stats.statuses[status] += 1
        return status, headers, body
    finally:
        writer.close()


def sdk(method: str, target: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host:ota.heclouds.com", f"Authorization:{AUTH}"]
    if body is not None:
        lines += ["Content-Type:application/json", f"Content-Length:{len(body):>7}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def errno_of(port: int, request: bytes, stats: Stats) -> tuple[int, dict[str, object]]:
    status, _, body = await exchange(port, request, stats)
    assert status == 200, body
    reply = json.loads(body)
    return int(reply["errno"]), reply


async def upgrade(port: int, dev_id: int, fail: bool, stats: Stats) -> None:
    """The C SDK's flow (§7) for one device, with a duplicate E3 racing the first."""
    q = f"dev_id={dev_id}"
    errno, _ = await errno_of(
        port, sdk("POST", f"/ota/device/version?{q}", b'{"f_version":"1.0.0"}'), stats
    )
    assert errno == 0
    check = sdk("GET", f"/ota/south/check?type=1&version=1.0.0&cdn=false&{q}")
    (e1, r1), (e2, r2) = await asyncio.gather(
        errno_of(port, check, stats), errno_of(port, check, stats)
    )
    assert (e1, e2) == (0, 0)
    data1, data2 = r1["data"], r2["data"]
    assert isinstance(data1, dict)
    assert isinstance(data2, dict)
    token = data1["token"]
    assert data2["token"] == token  # the duplicate got the same token
    received = bytearray()
    for start in range(0, len(FIRMWARE), CHUNK):
        errno, _ = await errno_of(port, sdk("GET", f"/ota/south/download/{token}/check?{q}"), stats)
        assert errno == 0
        request = (
            f"GET /ota/south/download/{token} HTTP/1.1\r\nHost:ota.heclouds.com\r\n"
            f"Range:{start}-{start + CHUNK - 1}\r\n\r\n"
        ).encode()
        status, headers, body = await exchange(port, request, stats)
        assert status == 206
        assert "Content-Length" in headers
        received += body
    assert hashlib.md5(received).hexdigest() == FIRMWARE_MD5
    progress = f"/ota/south/device/download/{token}/progress?{q}"
    first, second = (
        (b'{"step":101}', b'{"step":205}') if fail else (b'{"step":101}', b'{"step":201}')
    )
    # Duplicate reports race: exactly one of each pair is accepted, the other refused (21/20).
    results = await asyncio.gather(
        errno_of(port, sdk("POST", progress, first), stats),
        errno_of(port, sdk("POST", progress, first), stats),
    )
    assert sorted(e for e, _ in results) == [0, 21]
    results = await asyncio.gather(
        errno_of(port, sdk("POST", progress, second), stats),
        errno_of(port, sdk("POST", progress, second), stats),
    )
    assert sorted(e for e, _ in results) == [0, 20]


def test_200_devices_at_once(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    clock = FakeClock()
    seeder = Seeder(engine, BlobStore(tmp_path_factory.mktemp("blobs")), clock)
    seeder.product(PID)
    dev_ids = [FIRST_DEV_ID + i for i in range(DEVICES)]
    for dev_id in dev_ids:
        seeder.device(dev_id, PID, f"d{dev_id}")
    _, dt_ids = seeder.task(seeder.package(PID), dev_ids, pid=PID)
    failing = {dev_id for dev_id in dev_ids if dev_id % 10 == 0}
    stats = Stats()

    async def everyone(port: int) -> None:
        await asyncio.gather(
            *(upgrade(port, dev_id, dev_id in failing, stats) for dev_id in dev_ids)
        )

    with running_api(engine, seeder.blobs, clock, cache_ttl=1.0) as (_, srv):
        asyncio.run(everyone(srv.port))

    assert set(stats.statuses) <= {200, 206}  # no 5xx, no 4xx
    assert stats.statuses[206] == DEVICES * 3
    with engine.begin() as conn:
        rows = conn.execute(
            select(device_tasks.c.dev_id, device_tasks.c.state, device_tasks.c.result_code).where(
                device_tasks.c.id.in_(dt_ids)
            )
        ).all()
        token_counts = conn.execute(
            select(tokens.c.device_task_id, func.count())
            .where(tokens.c.device_task_id.in_(dt_ids))
            .group_by(tokens.c.device_task_id)
        ).all()
        versions = dict(
            conn.execute(
                select(devices.c.dev_id, devices.c.f_version).where(devices.c.pid == PID)
            ).all()
        )
    assert len(rows) == DEVICES
    for dev_id, state, code in rows:
        if dev_id in failing:
            assert (TaskState(state), code) == (TaskState.FAILED, 205)
            assert versions[dev_id] == "1.0.0"
        else:
            assert (TaskState(state), code) == (TaskState.SUCCEEDED, 201)
            assert versions[dev_id] == "1.0.1"
    assert sorted(count for _, count in token_counts) == [1] * DEVICES  # one token each

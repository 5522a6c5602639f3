"""Test data and raw-HTTP helpers for the device API tests.

Rows are inserted with plain SQL through the schema tables, so these tests depend on nothing but
the schema. The default world is the one of the C SDK captures (Appendix C): product ``123123``
with key K1, device ``987654321``, and ``firmware.bin`` as a FOTA package to ``1.0.1``.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, Select, insert, select, update

from onenet_ota import auth
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import TaskType
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.device_service import DeviceService
from onenet_ota.server.schema import device_tasks, devices, packages, products, tasks, tokens
from tests.captures import CAPTURES
from tests.serverthread import ServerThread

# The captures' package (spec Appendix C), vendored in tests/data.
FIRMWARE = (CAPTURES / "firmware.bin").read_bytes()
FIRMWARE_MD5 = "000e87c6dfb9c77108f320f7c27a64ea"

PID = "123123"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
DEV_ID = 987654321
DEV_NAME = "dev01"
# The C SDK's Authorization (Appendix B.1 vector 3): product level, sha1, et 2524579200.
SDK_AUTH = (
    "version=2018-10-31&res=products%2F123123&et=2524579200&method=sha1"
    "&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"
)
T0 = 1_800_000_000  # the fake clock's start: 2027-01-15, before the C SDK's et
HOUR = 3600
TOKEN_LIFE = 48 * HOUR


# Module-scoped database fixtures take these params: every DB test runs on SQLite and PostgreSQL.
DB_PARAMS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def module_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A migrated database for a whole test module: a SQLite file, or a new database in the
    shared throwaway PostgreSQL cluster (``pg_cluster`` from tests/conftest.py)."""
    cluster: Any = None
    name = ""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'onenet-ota.db'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = f"test_{uuid.uuid4().hex}"
        cluster.admin_sql(f'CREATE DATABASE "{name}"')
        url = cluster.url(name)
    engine = create_engine(url)
    try:
        migrate(engine)
        yield engine
    finally:
        engine.dispose()
        if cluster is not None:
            cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_ids = itertools.count(1)


class FakeClock:
    """A settable clock (Unix seconds) for token lifetimes, deadlines and start times."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Seeder:
    """Inserts rows directly; returns their ids."""

    engine: Engine
    blobs: BlobStore
    clock: FakeClock = field(default_factory=FakeClock)

    def _insert(self, table: Any, **row: Any) -> Any:
        with self.engine.begin() as conn:
            result = conn.execute(insert(table).values(**row))
            key = result.inserted_primary_key
            return key[0] if key else None

    def product(self, pid: str = PID, access_key: str = K1) -> str:
        self._insert(products, pid=pid, name=f"product {pid}", access_key=access_key, created_at=T0)
        return pid

    def device(
        self,
        dev_id: int = DEV_ID,
        pid: str = PID,
        name: str = DEV_NAME,
        *,
        device_key: str | None = None,
        auth_info: str | None = None,
        f_version: str | None = None,
        s_version: str | None = None,
    ) -> int:
        self._insert(
            devices,
            dev_id=dev_id,
            pid=pid,
            name=name,
            auth_info=auth_info if auth_info is not None else name,
            device_key=device_key,
            f_version=f_version,
            s_version=s_version,
            created_at=T0,
        )
        return dev_id

    def package(
        self,
        pid: str = PID,
        *,
        module_type: int = 1,
        kind: int = 1,
        from_version: str | None = None,
        target: str = "1.0.1",
        manuf: str | None = None,
        model: str | None = None,
        data: bytes = FIRMWARE,
        file_name: str = "firmware.bin",
        store: bool = True,
        size: int | None = None,
    ) -> int:
        sha256 = hashlib.sha256(data).hexdigest()
        if store:
            self.blobs.put_bytes(data)
        return int(
            self._insert(
                packages,
                pid=pid,
                module_type=module_type,
                kind=kind,
                from_version=from_version,
                target=target,
                manuf=manuf,
                model=model,
                file_name=file_name,
                size=len(data) if size is None else size,
                md5=hashlib.md5(data).hexdigest(),
                sha256=sha256,
                created_at=T0,
            )
        )

    def task(
        self,
        package_id: int,
        dev_ids: list[int] | tuple[int, ...] = (DEV_ID,),
        *,
        pid: str = PID,
        signal: int = 10,
        power: int = 10,
        retry: int = 3,
        interval: int = 1,
        start_time: int | None = None,
        deadline: int | None = None,
        state: TaskState = TaskState.TO_BE_UPGRADED,
    ) -> tuple[int, list[int]]:
        """A task of ``package_id`` for ``dev_ids``; returns (task id, device task ids)."""
        with self.engine.begin() as conn:
            module_type = conn.execute(
                select(packages.c.module_type).where(packages.c.id == package_id)
            ).scalar_one()
            task_id = conn.execute(
                insert(tasks)
                .returning(tasks.c.id)
                .values(
                    pid=pid,
                    package_id=package_id,
                    module_type=module_type,
                    signal=signal,
                    power=power,
                    retry=retry,
                    interval=interval,
                    start_time=T0 - HOUR if start_time is None else start_time,
                    deadline=deadline,
                    created_at=T0,
                )
            ).scalar_one()
            ids = []
            for dev_id in dev_ids:
                ids.append(
                    conn.execute(
                        insert(device_tasks)
                        .returning(device_tasks.c.id)
                        .values(
                            task_id=task_id,
                            dev_id=dev_id,
                            module_type=module_type,
                            state=int(state),
                            updated_at=T0,
                        )
                    ).scalar_one()
                )
        return int(task_id), [int(i) for i in ids]

    def world(
        self,
        *,
        module_type: int = 1,
        task: bool = True,
        device_key: str | None = None,
        package_options: dict[str, Any] | None = None,
        **task_options: Any,
    ) -> World:
        """A fresh product, device, package and (unless ``task=False``) device task, with ids
        unique in the database, so that tests can share one database."""
        n = next(_ids)
        pid = f"9{n:05d}"
        dev_id = 5_000_000 + n
        self.product(pid)
        self.device(dev_id, pid, f"dev{n}", device_key=device_key)
        package_id = self.package(pid, module_type=module_type, **(package_options or {}))
        dt_id = self.task(package_id, (dev_id,), pid=pid, **task_options)[1][0] if task else None
        return World(self, pid, dev_id, f"dev{n}", package_id, dt_id)

    def capture_world(self, **task_options: Any) -> int:
        """Product 123123 (K1), device 987654321, firmware.bin to 1.0.1; returns the device task."""
        self.product()
        self.device()
        package_id = self.package()
        return self.task(package_id, **task_options)[1][0]

    # -- reading back -------------------------------------------------------------------------

    def device_task(self, device_task_id: int) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(
                select(device_tasks).where(device_tasks.c.id == device_task_id)
            ).one()

    def state(self, device_task_id: int) -> TaskState:
        return TaskState(self.device_task(device_task_id).state)

    def set_state(
        self, device_task_id: int, state: TaskState, paused_from: TaskState | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(device_tasks)
                .where(device_tasks.c.id == device_task_id)
                .values(state=int(state), paused_from=None if paused_from is None else paused_from)
            )

    def versions(self, dev_id: int = DEV_ID) -> tuple[str | None, str | None]:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(devices.c.f_version, devices.c.s_version).where(devices.c.dev_id == dev_id)
            ).one()
        return row.f_version, row.s_version

    def tokens(self, device_task_id: int) -> list[str]:
        with self.engine.begin() as conn:
            return list(
                conn.execute(
                    select(tokens.c.token)
                    .where(tokens.c.device_task_id == device_task_id)
                    .order_by(tokens.c.issued_at)
                ).scalars()
            )


@dataclass
class World:
    """One product with one device and (usually) one device task."""

    seeder: Seeder
    pid: str
    dev_id: int
    name: str
    package_id: int
    dt_id: int | None
    key: str = K1

    @property
    def auth(self) -> str:
        """A product-level sha1 token, as the C SDK builds it."""
        return auth.build_token(self.pid, self.key)

    @property
    def task_id(self) -> int:
        assert self.dt_id is not None
        return self.dt_id

    def state(self) -> TaskState:
        return self.seeder.state(self.task_id)


def product_auth(pid: str = PID, key: str = K1, **options: Any) -> str:
    """An Authorization value built by the shared auth module (§3.2)."""
    return auth.build_token(pid, key, **options)


def issue_token(base_url: str, world: World, **params: Any) -> str:
    """Run E3 for ``world`` (FOTA, version 1.0.0) and return the token it hands out."""
    query = {"dev_id": world.dev_id, "type": 1, "version": "1.0.0", **params}
    reply = httpx2.get(
        f"{base_url}/ota/south/check", params=query, headers={"Authorization": world.auth}
    ).json()
    assert reply["errno"] == 0, reply
    return str(reply["data"]["token"])


@contextmanager
def running_api(
    engine: Engine,
    blobs: BlobStore,
    clock: FakeClock,
    **options: Any,
) -> Iterator[tuple[DeviceApi, ServerThread]]:
    """A DeviceApi served on loopback by the project's HTTP server."""
    options.setdefault("cache_ttl", 0)  # most tests change rows directly between requests
    api = DeviceApi(engine, blobs, clock=clock, **options)
    try:
        with ServerThread(api.handle) as server:
            yield api, server
    finally:
        api.close()


# -- raw HTTP over a socket ----------------------------------------------------------------------


@dataclass
class RawReply:
    """One response as bytes, split; ``first_segment`` is what the first recv() returned."""

    raw: bytes
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    first_segment: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:  # exact case, as the C SDK compares (§8.2 item 2)
                return value
        return None


def _complete(buffer: bytes) -> RawReply | None:
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in head[1:]]
    pairs = [(k, v) for k, v in headers]
    rest = buffer[head_end + 4 :]
    length = next((int(v) for k, v in pairs if k.lower() == "content-length"), None)
    chunked = any(k.lower() == "transfer-encoding" for k, _ in pairs)
    if length is not None:
        if len(rest) < length:
            return None
        body, used = rest[:length], head_end + 4 + length
    elif chunked:
        end = rest.find(b"0\r\n\r\n")
        if end < 0:
            return None
        body, used = rest[: end + 5], head_end + 4 + end + 5
    else:
        return None
    return RawReply(buffer[:used], head[0], pairs, body, b"")


def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> RawReply:
    """Send ``request`` in one segment on a fresh connection, as the C SDK does, and read one
    response (framed by Content-Length or a chunked body); then close, as the SDK does."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        buffer = b""
        first = b""
        while True:
            data = sock.recv(65536)
            if not first:
                first = data
            if not data:
                raise ConnectionError(f"connection closed after {len(buffer)} bytes")
            buffer += data
            reply = _complete(buffer)
            if reply is not None:
                reply.first_segment = first
                return reply


def sdk_request(
    method: str,
    target: str,
    *,
    authorization: str = SDK_AUTH,
    body: bytes | None = None,
    content_type: bool = True,
    extra: tuple[str, ...] = (),
) -> bytes:
    """A request in the C SDK's exact style (§8.1): no space after colons, padded length."""
    lines = [f"{method} {target} HTTP/1.1", "Host:ota.heclouds.com"]
    if content_type:
        lines.append("Content-Type:application/json")
    lines.append(f"Authorization:{authorization}")
    lines.extend(extra)
    if body is not None:
        lines.append(f"Content-Length:{len(body):>7}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def core_reader(engine: Engine) -> Callable[[Select[Any]], Callable[..., list[Any]]]:
    """A reader for :class:`~onenet_ota.server.changes.ChangeFeed` on pooled Core connections
    (the device service's own readers use raw ones)."""

    def compile_(statement: Select[Any]) -> Callable[..., list[Any]]:
        def run(**params: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(statement, params).all())

        return run

    return compile_


def offer(service: DeviceService, world: World) -> str:
    """The download token of ``world``'s device task, offered by E3 to a device at 1.0.0."""
    errno, info = service.check_task(world.dev_id, TaskType.FOTA, "1.0.0")
    assert errno is Errno.SUCC
    assert info is not None
    return info.token

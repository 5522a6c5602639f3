"""The real platform on loopback, set up through its management API, and device clients of both
flavours aimed at it.

``platform`` is module-scoped and runs once per database (SQLite and PostgreSQL, the shared
``DB_PARAMS``): ``create_app`` over a migrated database, served by the project's HTTP server on
two listeners of the same app:

- ``api``: where the devices' ``base_url`` points (keep-alive, the server's defaults);
- ``cdn``: the configured public download address, handed to ``cdn=true`` devices as ``ipPort``
  (D10), so that a test can tell which listener served a download.

Every device request either listener receives is recorded (method, path, peer, headers) before
the app answers it. Products, devices, packages and tasks are created, paused, resumed and
cancelled through ``/api/v1`` only, never by SQL. Each test makes its own :class:`World` (a new
device with its own task), so tests share the server but not state, and run in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from onenet_ota.device import (
    AsyncOtaClient,
    Credentials,
    DeviceConfig,
    OtaClient,
    OtaEvent,
    TaskType,
)
from onenet_ota.server.admin_api import PREFIX
from onenet_ota.server.app import AppResources, bind_socket, create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.http import Handler, Limits, Request, Response
from tests.device.conftest import TRANSPORTS, Driver, MakeClient, httpx_options
from tests.server.seed import DB_PARAMS, FIRMWARE, FakeClock, module_database
from tests.serverthread import ServerThread

ADMIN_TOKEN = "admin-token-for-integration-tests"
CURRENT = "1.0.0"
TARGET = "1.0.1"
# Advisory values of every task made here; distinct, so that a swapped field shows.
ADVISORY = {"signal": 10, "power": 20, "retry": 3, "interval": 1}

_numbers = itertools.count(1)


@dataclass(frozen=True)
class Seen:
    """One device request as the platform received it."""

    listener: str
    method: str
    path: str
    query: str
    peer: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


class Watch:
    """The device requests received since the watch began (read live)."""

    def __init__(self, log: list[Seen]) -> None:
        self._log = log
        self._start = len(log)

    @property
    def requests(self) -> list[Seen]:
        """Every device request since the start, in arrival order."""
        return self._log[self._start :]


@dataclass(frozen=True)
class World:
    """One product with one device and (usually) one upgrade task, made through /api/v1."""

    pid: str
    access_key: str
    dev_id: int
    name: str
    device_key: str | None
    package: dict[str, Any]
    task_id: int | None
    data: bytes

    @property
    def credentials(self) -> Credentials:
        """A product-level sha1 token, as the C SDK builds it (§3.2)."""
        return Credentials.from_access_key(self.pid, self.access_key)

    def config(self, **changes: Any) -> DeviceConfig:
        """This device's configuration: FOTA, version ``CURRENT``, no cdn; ``changes`` apply."""
        values: dict[str, Any] = {
            "credentials": self.credentials,
            "dev_id": str(self.dev_id),
            "version": CURRENT,
            "type": TaskType.FOTA,
        }
        values.update(changes)
        return DeviceConfig(**values)


@dataclass
class Platform:
    """The running platform of one database, and helpers over its management API."""

    clock: FakeClock
    resources: AppResources
    handler: Handler
    public_address: str
    seen: list[Seen] = field(default_factory=list)
    api: ServerThread = field(init=False)
    cdn: ServerThread = field(init=False)
    admin: httpx2.Client = field(init=False)

    # -- serving -----------------------------------------------------------------------------

    def recorder(self, listener: str) -> Handler:
        """The app's handler, recording every device request under ``listener``'s name."""
        handler = self.handler

        async def handle(request: Request) -> Response:
            if not request.path.startswith(PREFIX):
                self.seen.append(
                    Seen(
                        listener,
                        request.method,
                        request.path,
                        request.query_string,
                        request.peer,
                        tuple(request.headers),
                    )
                )
            return await handler(request)

        return handle

    @contextlib.contextmanager
    def listener(
        self, name: str, *, ssl: SSLContext | None = None, limits: Limits | None = None
    ) -> Iterator[ServerThread]:
        """Another listener of the same app, with its own TLS context and limits."""
        with ServerThread(self.recorder(name), ssl=ssl, limits=limits) as server:
            yield server

    def watch(self) -> Watch:
        """Start recording what devices send from now on."""
        return Watch(self.seen)

    @contextlib.contextmanager
    def clock_advanced(self, seconds: float) -> Iterator[None]:
        """Move the platform's clock forward for the block, then back, for the next tests."""
        before = self.clock.now
        self.clock.advance(seconds)
        try:
            yield
        finally:
            self.clock.now = before

    # -- management ----------------------------------------------------------------------------

    def call(self, method: str, path: str, *, expect: int = 200, **kwargs: Any) -> Any:
        """One /api/v1 call; fails the test with the API's error when the status differs."""
        reply = self.admin.request(method, path, **kwargs)
        assert reply.status_code == expect, (method, path, reply.status_code, reply.text)
        return reply.json() if reply.content else None

    def product(self) -> dict[str, Any]:
        """A new product with a generated access key."""
        n = next(_numbers)
        return dict(self.call("POST", "/products", json={"pid": f"7{n:05d}"}, expect=201))

    def upload(
        self,
        pid: str,
        data: bytes,
        *,
        module_type: str = "fota",
        target: str = TARGET,
        **options: str,
    ) -> dict[str, Any]:
        """Upload a package; ``options`` are ``kind``, ``from_version``, ``manuf``, ``model``."""
        params = {"pid": pid, "type": module_type, "target": target, "file_name": "firmware.bin"}
        return dict(
            self.call("POST", "/packages", params={**params, **options}, content=data, expect=201)
        )

    @functools.cached_property
    def shared(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The product most worlds live in, and its FOTA package of the captures' firmware.

        Sharing them keeps setup to two requests per world; each world still has its own
        device and task, so no test sees another's state.
        """
        product = self.product()
        return product, self.upload(product["pid"], FIRMWARE)

    def world(
        self,
        *,
        task: bool = True,
        own_product: bool = False,
        data: bytes | None = None,
        module_type: str = "fota",
        package: dict[str, str] | None = None,
        device: dict[str, Any] | None = None,
        **task_options: Any,
    ) -> World:
        """A fresh device with a task for it (unless ``task=False``).

        The device lives in the shared product unless ``own_product``. Its package is the
        shared FOTA one unless ``data`` (other file contents), ``module_type`` (``sota``) or
        ``package`` (upload parameters: ``kind``, ``from_version``, ``manuf``, ``model``) ask
        for a new one. ``device`` adds to
        the device's creation body (e.g. ``generate_device_key``); ``task_options`` to the
        task's (``start_time``, ``deadline``).
        """
        product, uploaded = self.shared
        if own_product:
            product = self.product()
        if own_product or data is not None or module_type != "fota" or package is not None:
            data = FIRMWARE if data is None else data
            uploaded = self.upload(product["pid"], data, module_type=module_type, **(package or {}))
        n = next(_numbers)
        body = {"pid": product["pid"], "name": f"dev{n}", **(device or {})}
        created = self.call("POST", "/devices", json=body, expect=201)
        task_id = None
        if task:
            body = {
                "package_id": uploaded["id"],
                "dev_ids": [created["dev_id"]],
                **ADVISORY,
                **task_options,
            }
            task_id = self.call("POST", "/tasks", json=body, expect=201)["id"]
        return World(
            pid=product["pid"],
            access_key=product["access_key"],
            dev_id=created["dev_id"],
            name=created["name"],
            device_key=created["device_key"],
            package=uploaded,
            task_id=task_id,
            data=FIRMWARE if data is None else data,
        )

    def device_task(self, world: World) -> dict[str, Any]:
        """The device's part of the world's task: ``state``, ``progress``, ``result_code``..."""
        (item,) = self.call("GET", f"/tasks/{world.task_id}/devices")["items"]
        assert item["dev_id"] == world.dev_id
        return dict(item)

    def state(self, world: World) -> str:
        """The device task's state name, as the management API shows it."""
        return str(self.device_task(world)["state"])

    def act(self, world: World, verb: str) -> None:
        """``pause``, ``resume`` or ``cancel`` the world's task (T2-T4)."""
        self.call("POST", f"/tasks/{world.task_id}/{verb}")

    def device(self, world: World) -> dict[str, Any]:
        """The device with its stored versions and task history."""
        return dict(self.call("GET", f"/devices/{world.dev_id}"))

    def blob(self, world: World) -> Path:
        """Where the blob store keeps the world's package file."""
        return self.resources.blobs.path(world.package["sha256"])


@contextlib.contextmanager
def serve_platform(db_url: str, data_dir: Path, **settings: Any) -> Iterator[Platform]:
    """The real platform (``create_app``) on loopback over the migrated database ``db_url``,
    with an injected clock, its ``api`` and ``cdn`` listeners and a management client;
    ``settings`` are more :class:`Settings` fields."""
    cdn_sock = bind_socket("127.0.0.1", 0)
    public_address = f"127.0.0.1:{cdn_sock.getsockname()[1]}"
    clock = FakeClock()
    handler, resources = create_app(
        Settings(
            db=db_url,
            data_dir=data_dir,
            admin_token=SecretStr(ADMIN_TOKEN),
            public_address=public_address,
            **settings,
        ),
        clock=clock,
    )
    platform = Platform(clock, resources, handler, public_address)
    try:
        with (
            ServerThread(platform.recorder("api")) as platform.api,
            ServerThread(platform.recorder("cdn"), sock=cdn_sock) as platform.cdn,
            httpx2.Client(
                base_url=platform.api.url + PREFIX,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            ) as platform.admin,
        ):
            yield platform
    finally:
        cdn_sock.close()
        # The server threads are gone; release what create_app opened.
        asyncio.run(resources.aclose())


@pytest.fixture(scope="module", params=DB_PARAMS)
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """:func:`serve_platform` over a SQLite or PostgreSQL database, for a whole module."""
    with (
        module_database(request, tmp_path_factory) as engine,
        serve_platform(
            engine.url.render_as_string(hide_password=False), tmp_path_factory.mktemp("platform")
        ) as platform,
    ):
        yield platform


@pytest.fixture(params=TRANSPORTS)
async def make_client(
    request: pytest.FixtureRequest, platform: Platform
) -> AsyncIterator[MakeClient]:
    """A factory of clients of this run's flavour and transport (the SDK's own, or an injected
    httpx2 client), aimed at the platform's ``api`` listener unless ``base_url`` says otherwise;
    every event goes to the driver's ``events``."""
    flavour, transport = request.param.split("-")
    drivers: list[Driver] = []
    https: list[httpx2.Client | httpx2.AsyncClient] = []

    def make(config: DeviceConfig, **kwargs: Any) -> Driver:
        events: list[OtaEvent] = []
        kwargs.setdefault("base_url", platform.api.url)
        kwargs.setdefault("on_event", events.append)
        kwargs.setdefault("timeout", 10_000)  # a loaded CI machine, not a device's 3 s
        if transport == "httpx":
            options = httpx_options(kwargs)
            http = httpx2.AsyncClient(**options) if flavour == "async" else httpx2.Client(**options)
            https.append(http)
            kwargs["http_client"] = http
        cls = AsyncOtaClient if flavour == "async" else OtaClient
        driver = Driver(cls(config, **kwargs), events, transport)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()
    for http in https:
        if isinstance(http, httpx2.AsyncClient):
            await http.aclose()
        else:
            http.close()


def md5(data: bytes) -> str:
    """Lower-case hex MD5, as E3 reports it."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)

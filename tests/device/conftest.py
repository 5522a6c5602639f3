"""Fixtures for the device client tests: a scripted loopback server, and clients of both flavours.

Every client test runs four times: with :class:`OtaClient` and with :class:`AsyncOtaClient`, each
over the SDK's own transport ("lean") and over an injected httpx2 client ("httpx"), through
:class:`Driver`, which awaits a call when the client is async and simply makes it otherwise (the
scripted server runs in its own threads, so a blocking call is fine).
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest

from onenet_ota.device import (
    AsyncOtaClient,
    Credentials,
    DeviceConfig,
    OtaClient,
    OtaEvent,
    TaskType,
)
from tests.captures import CAPTURES
from tests.device.scripted_server import ScriptedServer

FIRMWARE = (CAPTURES / "firmware.bin").read_bytes()
FIRMWARE_MD5 = "000e87c6dfb9c77108f320f7c27a64ea"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
# Appendix B.1 vector 3: the Authorization value of the C SDK captures.
VECTOR_3 = (
    "version=2018-10-31&res=products%2F123123&et=2524579200&method=sha1"
    "&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"
)
TOKEN = "ota_3fQ9cZr0LmT7wXa2bN5k"


def make_config(**changes: Any) -> DeviceConfig:
    """The captures' device (Appendix C): pid 123123 with K1, dev_id 987654321, FOTA 1.0.0."""
    values: dict[str, Any] = {
        "credentials": Credentials.from_access_key("123123", K1),
        "dev_id": "987654321",
        "version": "1.0.0",
        "type": TaskType.FOTA,
        "cdn": True,
    }
    values.update(changes)
    return DeviceConfig(**values)


def task_data(**changes: Any) -> dict[str, Any]:
    """E3 ``data`` for the captures' package, in §6.3's field order."""
    data: dict[str, Any] = {
        "target": "1.0.1",
        "token": TOKEN,
        "size": len(FIRMWARE),
        "md5": FIRMWARE_MD5,
        "signal": 10,
        "power": 20,
        "retry": 3,
        "interval": 1,
        "type": 1,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


class Driver:
    """One interface over a sync or an async client: ``await driver("check_task")``."""

    def __init__(
        self, client: OtaClient | AsyncOtaClient, events: list[OtaEvent], transport: str = "lean"
    ) -> None:
        self.client = client
        self.events = events
        self.transport = transport

    @property
    def connect_error(self) -> type[BaseException]:
        """What the transport chains to a TransportError when it cannot connect."""
        return httpx2.ConnectError if self.transport == "httpx" else OSError

    @property
    def timeout_error(self) -> type[BaseException]:
        """What the transport chains to a RequestTimeout."""
        return httpx2.TimeoutException if self.transport == "httpx" else TimeoutError

    @property
    def is_async(self) -> bool:
        """Whether the client is the async one."""
        return isinstance(self.client, AsyncOtaClient)

    async def __call__(self, operation: str, /, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, operation)(*args, **kwargs)
        if inspect.isawaitable(result):
            return await result
        return result

    async def close(self) -> None:
        """``close()`` or ``aclose()``."""
        if isinstance(self.client, AsyncOtaClient):
            await self.client.aclose()
        else:
            self.client.close()


MakeClient = Callable[..., Driver]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A started scripted server; the test fails if a request found the script empty."""
    with ScriptedServer() as srv:
        yield srv
    assert not srv.unexpected, f"requests without a scripted reply: {srv.unexpected}"


def httpx_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The client's TLS options as an injected httpx2 client's."""
    verify: bool | ssl.SSLContext = kwargs.pop("verify", True)
    ca_file = kwargs.pop("ca_file", None)
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    return {"verify": verify, "trust_env": False}


TRANSPORTS = ["sync-lean", "async-lean", "sync-httpx", "async-httpx"]


@pytest.fixture(params=TRANSPORTS)
async def make_client(
    request: pytest.FixtureRequest, server: ScriptedServer
) -> AsyncIterator[MakeClient]:
    """A factory of clients of this run's flavour and transport, aimed at ``server`` by default.

    Clients over httpx2 get an injected ``httpx2.Client``/``AsyncClient`` (TLS options moved
    onto it), closed at the end of the test.
    """
    flavour, transport = request.param.split("-")
    drivers: list[Driver] = []
    https: list[httpx2.Client | httpx2.AsyncClient] = []

    def make(config: DeviceConfig | None = None, **kwargs: Any) -> Driver:
        events: list[OtaEvent] = []
        kwargs.setdefault("base_url", server.url)
        kwargs.setdefault("on_event", events.append)
        if transport == "httpx" and "http_client" not in kwargs:
            options = httpx_options(kwargs)
            http = httpx2.AsyncClient(**options) if flavour == "async" else httpx2.Client(**options)
            https.append(http)
            kwargs["http_client"] = http
        cls = AsyncOtaClient if flavour == "async" else OtaClient
        driver = Driver(cls(config or make_config(), **kwargs), events, transport)
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

"""Fixtures for the device client tests: a scripted loopback server, and clients of both flavours.

Every client test runs twice, once with :class:`OtaClient` and once with :class:`AsyncOtaClient`,
through :class:`Driver`, which awaits a call when the client is async and simply makes it
otherwise (the scripted server runs in its own threads, so a blocking call is fine).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

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

    def __init__(self, client: OtaClient | AsyncOtaClient, events: list[OtaEvent]) -> None:
        self.client = client
        self.events = events

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


@pytest.fixture(params=["sync", "async"])
async def make_client(
    request: pytest.FixtureRequest, server: ScriptedServer
) -> AsyncIterator[MakeClient]:
    """A factory of clients of this run's flavour, aimed at ``server`` by default."""
    flavour: str = request.param
    drivers: list[Driver] = []

    def make(config: DeviceConfig | None = None, **kwargs: Any) -> Driver:
        events: list[OtaEvent] = []
        kwargs.setdefault("base_url", server.url)
        kwargs.setdefault("on_event", events.append)
        cls = AsyncOtaClient if flavour == "async" else OtaClient
        driver = Driver(cls(config or make_config(), **kwargs), events)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()

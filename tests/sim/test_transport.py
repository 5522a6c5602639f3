"""FleetTransport's error paths, over httpx2.MockTransport: each injected fault, power cuts, and
the metering of what got through."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.sim.metrics import FleetMetrics
from onenet_ota.sim.transport import DeviceLink, FleetTransport, PowerCut, device_context

CHECK_URL = "http://ota.test/ota/south/check?dev_id=1&type=1&version=1.0.0"
DOWNLOAD_URL = "http://ota.test/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa"
BODY = b'{"errno":0,"error":"succ"}'


class Scripted(random.Random):
    """A random source that draws ``values`` in order and picks ``kind`` from any choice."""

    def __init__(self, values: list[float], kind: str = "") -> None:
        super().__init__(0)
        self.values = list(values)
        self.kind = kind

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.99

    def choice(self, seq: Any) -> Any:
        return self.kind or seq[0]


class Body(httpx2.AsyncByteStream):
    """A reply body streamed in two parts, as a real connection delivers it."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2
        yield self.data[:half]
        yield self.data[half:]


class Server:
    """The inner transport: answers every request, counting what reached it."""

    def __init__(self, body: bytes = BODY) -> None:
        self.seen: list[str] = []
        self.body = body

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.seen.append(request.url.path)
        headers = {"Content-Length": str(len(self.body))}
        return httpx2.Response(200, headers=headers, stream=Body(self.body))


def client(server: Server, metrics: FleetMetrics, **options: Any) -> httpx2.AsyncClient:
    transport = FleetTransport(httpx2.MockTransport(server), metrics, **options)
    return httpx2.AsyncClient(transport=transport)


@pytest.mark.anyio
async def test_requests_are_metered_by_endpoint() -> None:
    server, metrics = Server(), FleetMetrics()
    async with client(server, metrics) as http:
        for _ in range(3):
            reply = await http.get(CHECK_URL)
            assert reply.content == BODY
        await http.get("http://ota.test/elsewhere")
    check = metrics.endpoints[Endpoint.CHECK_TASK]
    assert (check.requests, check.failures, check.bytes) == (3, 0, 3 * len(BODY))
    assert check.latency.count == 3
    assert metrics.endpoints[None].requests == 1
    assert metrics.injected == {}


@pytest.mark.anyio
async def test_refused_never_reaches_the_server() -> None:
    server, metrics = Server(), FleetMetrics()
    async with client(server, metrics, drop_rate=0.5, rng=Scripted([0.1], "refused")) as http:
        with pytest.raises(httpx2.ConnectError, match="simulated"):
            await http.get(CHECK_URL)
    assert server.seen == []
    stats = metrics.endpoints[Endpoint.CHECK_TASK]
    assert (stats.requests, stats.failures, stats.latency.count) == (1, 1, 0)
    assert metrics.injected == {"refused": 1}


@pytest.mark.anyio
async def test_reset_loses_the_reply_of_a_processed_request() -> None:
    server, metrics = Server(), FleetMetrics()
    async with client(server, metrics, drop_rate=0.5, rng=Scripted([0.1], "reset")) as http:
        with pytest.raises(httpx2.ReadError, match="simulated"):
            await http.get(CHECK_URL)
    assert server.seen == ["/ota/south/check"]  # the server did its part
    assert metrics.endpoints[Endpoint.CHECK_TASK].failures == 1
    assert metrics.injected == {"reset": 1}


@pytest.mark.anyio
async def test_truncated_breaks_the_body_halfway() -> None:
    server, metrics = Server(bytes(1000)), FleetMetrics()
    rng = Scripted([0.1], "truncated")
    async with (
        client(server, metrics, drop_rate=0.5, rng=rng) as http,
        http.stream("GET", DOWNLOAD_URL) as reply,
    ):
        assert reply.status_code == 200  # the head arrived
        with pytest.raises(httpx2.ReadError, match="simulated"):
            await reply.aread()
    stats = metrics.endpoints[Endpoint.DOWNLOAD]
    assert (stats.failures, stats.latency.count) == (1, 0)
    assert stats.bytes <= 500


@pytest.mark.anyio
async def test_no_drop_above_the_rate() -> None:
    server, metrics = Server(), FleetMetrics()
    async with client(server, metrics, drop_rate=0.05, rng=Scripted([0.06, 0.5])) as http:
        await http.get(CHECK_URL)
        await http.get(CHECK_URL)
    assert metrics.injected == {}
    assert len(server.seen) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(("draw", "reached"), [(0.1, False), (0.9, True)])
async def test_power_cut_at_the_planned_request(draw: float, reached: bool) -> None:
    server, metrics = Server(), FleetMetrics()
    link = DeviceLink(cut_at=2)
    async with client(server, metrics, rng=Scripted([draw])) as http:
        with device_context(link):
            await http.get(CHECK_URL)  # request 1: before the cut
            with pytest.raises(PowerCut):
                await http.get(CHECK_URL)  # request 2: the cut, before or after the server
            await http.get(CHECK_URL)  # the plan is used up: the next request goes through
        await http.get(CHECK_URL)  # outside any device: never cut, not counted on the link
    assert link.requests == 3
    assert link.cut_at is None
    assert len(server.seen) == (4 if reached else 3)
    assert metrics.injected == {"power-cut": 1}


def test_drop_rate_must_leave_a_chance() -> None:
    with pytest.raises(ValueError, match="below 1"):
        FleetTransport(httpx2.MockTransport(Server()), FleetMetrics(), drop_rate=1.0)


@pytest.mark.anyio
async def test_devices_use_their_pool() -> None:
    first, second, metrics = Server(), Server(), FleetMetrics()
    pools: list[httpx2.AsyncBaseTransport] = [
        httpx2.MockTransport(first),
        httpx2.MockTransport(second),
    ]
    async with httpx2.AsyncClient(transport=FleetTransport(pools, metrics)) as http:
        with device_context(DeviceLink(pool=3)):  # pools are shared round robin
            await http.get(CHECK_URL)
        await http.get(CHECK_URL)  # no device: the first pool
    assert (len(first.seen), len(second.seen)) == (1, 1)
    with pytest.raises(ValueError, match="at least one inner transport"):
        FleetTransport([], metrics)

"""The fleet's HTTP layer: FleetTransport over httpx2.MockTransport and FleetSender over a
stand-in for the SDK's transport: each injected fault, power cuts, and the metering of what got
through."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import pytest

from onenet_ota.device import AsyncOtaClient, Credentials, DeviceConfig
from onenet_ota.device._core import Call, Outcome
from onenet_ota.device._http import Failure, Result
from onenet_ota.device.errors import TransportError
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.protocol.dialects import EndpointSpec
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.sim.metrics import FleetMetrics
from onenet_ota.sim.transport import (
    DeviceLink,
    FleetSender,
    FleetTransport,
    PowerCut,
    device_context,
)

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


# -- FleetSender: the SDK's own transport, metered and faulty ----------------------------------

TOKEN = "ota_aaaaaaaaaaaaaaaaaaaa"
CHUNK = DownloadedChunk(bytes(100), 0, 99, 1000)


class Inner:
    """The SDK transport's stand-in: answers every call it is given, recording them."""

    def __init__(self) -> None:
        self.sent: list[Endpoint | EndpointSpec] = []
        self.pipelined: list[bool] = []
        self.closed = False

    async def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        self.sent += [call.endpoint for call in calls]
        self.pipelined.append(pipeline)
        return [Outcome(CHUNK if call.endpoint is Endpoint.DOWNLOAD else None) for call in calls]

    async def aclose(self) -> None:
        self.closed = True


def calls() -> tuple[Call[Any], Call[Any]]:
    """E5 and E6 of one chunk, as the upgrader pipelines them."""
    config = DeviceConfig(
        credentials=Credentials.from_access_key("123456", "a2V5" * 11), dev_id="7", version="1.0"
    )
    core = AsyncOtaClient(config, base_url="http://ota.test")._core
    return core.check_token(TOKEN), core.download(TOKEN, 0, 100)


def sender(inner: Inner, link: DeviceLink, metrics: FleetMetrics, **options: Any) -> FleetSender:
    return FleetSender(inner, link, metrics, **options)


@pytest.mark.anyio
async def test_sender_meters_each_call_and_pipelines() -> None:
    inner, metrics, link = Inner(), FleetMetrics(), DeviceLink()
    fleet = sender(inner, link, metrics)
    results = await fleet.exchange(calls(), pipeline=True)
    assert [type(r) for r in results] == [Outcome, Outcome]
    assert inner.sent == [Endpoint.CHECK_TOKEN, Endpoint.DOWNLOAD]
    assert inner.pipelined == [True]
    download = metrics.endpoints[Endpoint.DOWNLOAD]
    assert (download.requests, download.failures, download.bytes) == (1, 0, 100)
    assert download.latency.count == 1
    assert metrics.endpoints[Endpoint.CHECK_TOKEN].latency.count == 1
    assert link.requests == 2
    assert metrics.injected == {}
    await fleet.aclose()
    assert inner.closed


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "sent"),
    [
        ("refused", [Endpoint.CHECK_TOKEN]),  # the dropped E6 never left
        ("reset", [Endpoint.CHECK_TOKEN, Endpoint.DOWNLOAD]),  # the server served it
        ("truncated", [Endpoint.CHECK_TOKEN, Endpoint.DOWNLOAD]),
    ],
)
async def test_sender_drops_lose_the_reply(kind: str, sent: list[Endpoint]) -> None:
    inner, metrics = Inner(), FleetMetrics()
    # E5 draws above the rate and goes through; E6 draws below it and is dropped.
    fleet = sender(inner, DeviceLink(), metrics, drop_rate=0.5, rng=Scripted([0.9, 0.1], kind))
    check, download = await fleet.exchange(calls(), pipeline=True)
    assert isinstance(check, Outcome)
    assert isinstance(download, Failure)
    assert isinstance(download.error, TransportError)
    assert "simulated" in str(download.error)
    assert inner.sent == sent
    stats = metrics.endpoints[Endpoint.DOWNLOAD]
    assert (stats.requests, stats.failures, stats.bytes, stats.latency.count) == (1, 1, 0, 0)
    assert metrics.injected == {kind: 1}


@pytest.mark.anyio
async def test_sender_drops_every_call_behind_a_dropped_one() -> None:
    inner, metrics = Inner(), FleetMetrics()
    fleet = sender(inner, DeviceLink(), metrics, drop_rate=0.5, rng=Scripted([0.1], "reset"))
    results = await fleet.exchange(calls(), pipeline=True)
    assert all(isinstance(result, Failure) for result in results)
    assert inner.sent == [Endpoint.CHECK_TOKEN]  # what followed on the connection never left
    assert metrics.endpoints[Endpoint.DOWNLOAD].failures == 1


@pytest.mark.anyio
@pytest.mark.parametrize(("draw", "sent"), [(0.1, 1), (0.9, 2)])
async def test_sender_power_cut_at_the_planned_call(draw: float, sent: int) -> None:
    """Request 2 (the E6 of a pipelined pair) is the cut: before it leaves, or after the server
    answered it; either way the run ends with nothing returned."""
    inner, metrics = Inner(), FleetMetrics()
    link = DeviceLink(cut_at=2)
    fleet = sender(inner, link, metrics, rng=Scripted([draw]))
    with pytest.raises(PowerCut):
        await fleet.exchange(calls(), pipeline=True)
    assert len(inner.sent) == sent
    assert (link.requests, link.cut_at) == (2, None)
    assert metrics.injected == {"power-cut": 1}
    assert metrics.endpoints[Endpoint.DOWNLOAD].failures == 1
    await fleet.exchange(calls())  # the plan is used up
    assert len(inner.sent) == sent + 2
    with pytest.raises(ValueError, match="below 1"):
        FleetSender(inner, link, metrics, drop_rate=1.0)

"""The fleet's HTTP layer: every request metered, with injected faults.

A virtual device sends in one of two ways (``FleetConfig.http``):

- ``sdk`` (the default): the device SDK's own HTTP/1.1 transport
  (:class:`~onenet_ota.device.transport.AsyncTransport`), one per device run with its own
  connection, as on a real device, wrapped in a :class:`FleetSender` that meters each call and
  injects the faults below. It costs the simulator about a third of the CPU per request of
  httpx2, and it pipelines E5 and E6 as the upgrader asks. The sender is put in the client's
  ``_sender`` slot: the one place where the simulator reaches into the SDK.
- ``httpx2``: every device's :class:`~onenet_ota.device.AsyncOtaClient` sends through one shared
  ``httpx2.AsyncClient`` (the SDK's injected-client path) whose transport is a
  :class:`FleetTransport` around the real ``httpx2.AsyncHTTPTransport``. The transport knows
  which device is sending from a context variable that each device's task sets
  (:func:`device_context`), so the pool is shared and the per-device bookkeeping costs one
  lookup.

For each request it:

- classifies the endpoint with the protocol's own path tables (:func:`match_path`, and the
  Studio and fuse tables of :mod:`onenet_ota.protocol.dialects`, by the classic endpoint of the
  same operation);
- injects a **connection drop** with the fleet's drop rate, as one of three faults a real network
  produces (chosen with equal odds):

  - ``refused``: the connection fails before the request leaves (``httpx2.ConnectError``);
  - ``reset``: the server received and processed the request, the reply is lost
    (``httpx2.ReadError`` before any reply byte): the client's own reconnect-once rule (§10)
    and the server's handling of a repeated request are exercised;
  - ``truncated``: the reply's headers arrive, then the connection breaks mid-body: the
    upgrader's retry path is exercised;

- cuts the **power** when the device's planned cut point comes: :class:`PowerCut` is raised either
  before the request leaves or after the server answered it (the device died before it could
  read the reply). The upgrader does not catch it, so its run ends there without persisting
  anything more, like a real power cut; the simulator then starts a fresh upgrader on the same
  state directory;
- measures the request's latency, from sending to the reply's last byte, into the endpoint's
  histogram, and counts the reply's body bytes.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol

import httpx2

from onenet_ota.device._core import Call
from onenet_ota.device._http import Failure, Result
from onenet_ota.device.errors import TransportError
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.dialects import match as match_dialect_path
from onenet_ota.protocol.endpoints import Endpoint, match_path
from onenet_ota.sim.metrics import EndpointStats, FleetMetrics

__all__ = [
    "DeviceLink",
    "FleetSender",
    "FleetTransport",
    "PowerCut",
    "Sender",
    "device_context",
    "in_device_context",
]

DROP_KINDS: Final = ("refused", "reset", "truncated")
_DROP_MESSAGES: Final = {
    "refused": "connection refused (simulated drop)",
    "reset": "connection reset by peer (simulated drop)",
    "truncated": "the connection broke mid-reply (simulated drop)",
}
_NEW_DIALECTS: Final = frozenset({Dialect.STUDIO, Dialect.FUSE})


class PowerCut(Exception):
    """The simulated device lost power. Raised by the transport; ends the upgrader's run."""


@dataclass(slots=True)
class DeviceLink:
    """What the transport knows about one device: its request count and planned power cut.

    ``cut_at`` is the number of the request (counted over the device's whole life) at which the
    power fails, or None. ``pool`` picks the connection pool the device's requests use;
    ``fresh`` sends them through the pools that open a new connection for every request.
    """

    requests: int = 0
    cut_at: int | None = None
    pool: int = 0
    fresh: bool = False


_current: ContextVar[DeviceLink | None] = ContextVar("onenet_ota_sim_device", default=None)


@contextlib.contextmanager
def device_context(link: DeviceLink) -> Iterator[None]:
    """Requests sent inside this block (in this task) belong to ``link``'s device."""
    token = _current.set(link)
    try:
        yield
    finally:
        _current.reset(token)


def in_device_context() -> bool:
    """Whether the caller runs inside a simulated device's :func:`device_context`."""
    return _current.get() is not None


def _endpoint(request: httpx2.Request) -> Endpoint | None:
    """The classic endpoint of the request, or of the operation a Studio or fuse request
    performs (S-C counts as E3, S-T and F-T as E5, S-R and F-R as E7, ...)."""
    path = request.url.path
    route = match_path(path)
    if route is not None:
        return route.by_method.get(request.method)
    tid_route = match_dialect_path(path, _NEW_DIALECTS)
    spec = None if tid_route is None else tid_route.by_method.get(request.method)
    return None if spec is None else Endpoint(spec.operation.value)


class _MeteredStream(httpx2.AsyncByteStream):
    """The reply body, counted; the latency is recorded when it has been read to the end."""

    def __init__(
        self,
        inner: httpx2.AsyncByteStream,
        stats: EndpointStats,
        started: float,
        truncate_after: int | None,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._started = started
        self._truncate_after = truncate_after
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stats = self._stats
        received = 0
        try:
            async for chunk in self._inner:
                if (
                    self._truncate_after is not None
                    and received + len(chunk) > self._truncate_after
                ):
                    stats.failures += 1
                    self._done = True
                    raise httpx2.ReadError("connection reset by peer (simulated drop)")
                received += len(chunk)
                stats.bytes += len(chunk)
                yield chunk
        except httpx2.TransportError:
            if not self._done:
                stats.failures += 1
                self._done = True
            raise
        if not self._done:
            self._done = True
            stats.latency.record(time.perf_counter() - self._started)

    async def aclose(self) -> None:
        await self._inner.aclose()


class FleetTransport(httpx2.AsyncBaseTransport):
    """Meters every request into ``metrics`` and injects drops and power cuts (module doc).

    ``inner`` does the real I/O: one transport, or several connection pools, one per group of
    devices (:attr:`DeviceLink.pool`). httpx2's pool scans all its connections for every request,
    so a few small pools cost the client far less CPU than one big one. ``drop_rate`` is the
    probability that a request's connection drops; ``rng`` draws the faults (seed it for a
    repeatable run). ``fresh`` are the pools of devices that use a connection per request
    (:attr:`DeviceLink.fresh`); without them such devices share ``inner``.
    """

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport | list[httpx2.AsyncBaseTransport],
        metrics: FleetMetrics,
        *,
        drop_rate: float = 0.0,
        rng: random.Random | None = None,
        fresh: list[httpx2.AsyncBaseTransport] | None = None,
    ) -> None:
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError("drop_rate must be at least 0 and below 1")
        self._pools = list(inner) if isinstance(inner, list) else [inner]
        if not self._pools:
            raise ValueError("at least one inner transport is needed")
        self._fresh = list(fresh) if fresh else self._pools
        self._metrics = metrics
        self._drop_rate = drop_rate
        self._rng = rng if rng is not None else random.Random()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` (or fail it as planned); see the module documentation."""
        metrics = self._metrics
        stats = metrics.stats(_endpoint(request))
        stats.requests += 1
        link = _current.get()
        cut_after = False
        if link is not None:
            link.requests += 1
            if link.cut_at is not None and link.requests >= link.cut_at:
                link.cut_at = None
                metrics.injected["power-cut"] += 1
                stats.failures += 1
                if self._rng.random() < 0.5:
                    raise PowerCut("power cut before the request left")
                cut_after = True
        drop = None
        if not cut_after and self._drop_rate and self._rng.random() < self._drop_rate:
            drop = self._rng.choice(DROP_KINDS)
            metrics.injected[drop] += 1
            if drop == "refused":
                stats.failures += 1
                raise httpx2.ConnectError("connection refused (simulated drop)", request=request)
        pools = self._fresh if link is not None and link.fresh else self._pools
        pool = pools[link.pool % len(pools)] if link is not None else pools[0]
        started = time.perf_counter()
        try:
            response = await pool.handle_async_request(request)
        except httpx2.TransportError:
            stats.failures += 1
            raise
        if cut_after or drop == "reset":
            # The server processed the request; its reply never reaches the device.
            with contextlib.suppress(httpx2.HTTPError):
                await response.aread()
            await response.aclose()
            if cut_after:
                raise PowerCut("power cut before the reply arrived")
            stats.failures += 1
            raise httpx2.ReadError("connection reset by peer (simulated drop)", request=request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        truncate_after = None
        if drop == "truncated":
            length = response.headers.get("Content-Length")
            # Half the body (at least none of it) arrives before the break.
            truncate_after = int(length) // 2 if length and length.isdigit() else 0
        response.stream = _MeteredStream(response.stream, stats, started, truncate_after)
        return response

    async def aclose(self) -> None:
        """Close the real transports' connections."""
        for pool in {id(p): p for p in (*self._pools, *self._fresh)}.values():
            await pool.aclose()


def _call_endpoint(call: Call[object]) -> Endpoint:
    """The classic endpoint of a call, or of the operation a Studio or fuse call performs."""
    endpoint = call.endpoint
    return endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint.operation.value)


class Sender(Protocol):
    """What :class:`FleetSender` wraps: the SDK's own transport
    (:class:`~onenet_ota.device.transport.AsyncTransport`) or a test's stand-in."""

    async def exchange(
        self, calls: Sequence[Call[Any]], *, pipeline: bool = False
    ) -> list[Result]: ...

    async def aclose(self) -> None: ...


class FleetSender:
    """One device's sender: the SDK's own transport ``inner``, metered into ``metrics``, with
    the fleet's drops (``drop_rate``, drawn from ``rng``) and ``link``'s planned power cut.

    It stands where the client's own transport stands (``exchange``, ``aclose``). Per call, as
    :class:`FleetTransport` does per request: a power cut before the call leaves or after the
    server answered it (:class:`PowerCut` raised, nothing returned); a ``refused`` call is never
    sent; a ``reset`` or ``truncated`` one is sent and processed by the server, and its reply is
    lost (a transport error, as the SDK reports a connection that broke). Calls pipelined behind
    a dropped one get no reply either. A call's latency is its exchange's: the calls of a
    pipelined exchange (E5 and E6) each record the time until the last reply arrived.
    """

    def __init__(
        self,
        inner: Sender,
        link: DeviceLink,
        metrics: FleetMetrics,
        *,
        drop_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError("drop_rate must be at least 0 and below 1")
        self._inner = inner
        self._link = link
        self._metrics = metrics
        self._drop_rate = drop_rate
        self._rng = rng if rng is not None else random.Random()

    async def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        """Send ``calls`` (or fail them as planned); see the class documentation."""
        metrics = self._metrics
        stats = [metrics.stats(_call_endpoint(call)) for call in calls]
        for each in stats:
            each.requests += 1
        link = self._link
        first = link.requests
        link.requests += len(calls)
        cut: int | None = None  # the call at which the power fails
        cut_after = False
        if link.cut_at is not None and link.requests >= link.cut_at:
            cut = min(max(link.cut_at - first - 1, 0), len(calls) - 1)
            link.cut_at = None
            metrics.injected["power-cut"] += 1
            stats[cut].failures += 1
            cut_after = self._rng.random() >= 0.5
        drop: str | None = None
        at = len(calls)
        if cut is None and self._drop_rate:
            for index in range(len(calls)):
                if self._rng.random() < self._drop_rate:
                    drop, at = self._rng.choice(DROP_KINDS), index
                    break
        if cut is not None:
            send = calls[: cut + 1] if cut_after else calls[:cut]
        else:
            send = calls[:at] if drop == "refused" else calls[: at + 1]
        started = time.perf_counter()
        results = await self._inner.exchange(send, pipeline=pipeline) if send else []
        elapsed = time.perf_counter() - started
        if cut is not None:
            raise PowerCut(
                "power cut before the reply arrived"
                if cut_after
                else "power cut before the request left"
            )
        if drop is not None:
            metrics.injected[drop] += 1
            results = results[:at]
            for index in range(at, len(calls)):
                message = _DROP_MESSAGES[drop] if index == at else "no reply (simulated drop)"
                error = TransportError(message, endpoint=calls[index].endpoint)
                results.append(Failure(error, unanswered=index > at or drop != "truncated"))
        for each, result in zip(stats, results, strict=True):
            if isinstance(result, Failure):
                each.failures += 1
                continue
            each.latency.record(elapsed)
            value = result.value
            if isinstance(value, DownloadedChunk):
                each.bytes += len(value.data)
            elif isinstance(value, bytes):
                each.bytes += len(value)
        return results

    async def aclose(self) -> None:
        """Close the device's connections."""
        await self._inner.aclose()

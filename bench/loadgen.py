"""The benchmarks' load generator: raw non-blocking sockets, one epoll loop, its own process.

It costs the client far less per request than an asyncio HTTP client, so one client process can
keep a one-process server busy on a 2-core machine, and every benchmark that compares two servers
drives both with the same code (``bench.server_bench``, ``bench.peer_goosebit``,
``bench.scale_bench``).

A :class:`Scenario` is a list of pre-built request bytes that ``concurrency`` clients cycle
through, in one of two modes:

- ``keep-alive``: persistent connections, each sending its next request as soon as the previous
  response is complete;
- ``per-connection``: like the C SDK, each request on a fresh TCP connection that the client
  closes after the response (with SO_LINGER 0, so that the run does not exhaust ephemeral ports
  with TIME_WAIT sockets).

With a ``rate`` the clients together send at most that many requests per second, each
connection waiting for its slot (``concurrency / rate`` seconds apart) after a response: a
paced load, for latency measurements that must not depend on how fast the server answers.

Responses are framed by ``Content-Length`` (header name matched case-insensitively: uvicorn sends
it in lower case) and checked for the expected status and a byte string the body must contain.
Each run has ``warmup`` unmeasured seconds, then ``duration`` measured ones; the :class:`Result`
has the completed count and a latency histogram (send to last byte; connect included in
per-connection mode) of the measured requests.

:class:`LoadGenerator` runs the loop in a spawned process (so that it shares no interpreter with a
server under test) and hands it scenarios one by one.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import multiprocessing
import multiprocessing.connection
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from onenet_ota.sim.metrics import Histogram

__all__ = ["LoadGenerator", "Result", "Scenario", "load_generator", "run_scenario"]


@dataclass(frozen=True)
class Scenario:
    """One measured run: which requests, which connection mode."""

    name: str
    mode: str  # "keep-alive" or "per-connection"
    requests: list[bytes]  # cycled through by the clients
    expect_status: bytes  # b"200" or b"206"
    expect_body: bytes  # a byte string every response body must contain
    # Per request, by index in ``requests``: (status, body bytes) instead of the two above, for
    # a scenario that mixes endpoints (a device's E5 and E6 in turn).
    expectations: list[tuple[bytes, bytes]] | None = None


@dataclass(frozen=True)
class Result:
    """What a run measured: completed requests and their latency, errors, client CPU."""

    completed: int
    errors: int
    elapsed: float
    client_cpu: float
    first_error: str
    latency: Histogram = field(default_factory=Histogram)
    body_bytes: int = 0

    @property
    def rate(self) -> float:
        """Completed requests per measured second."""
        return self.completed / self.elapsed if self.elapsed else 0.0


class _Conn:
    """One client connection of the load generator."""

    __slots__ = ("body_start", "buffer", "connecting", "expected", "index", "sent_at", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.buffer = b""
        self.expected = -1
        self.body_start = 0
        self.connecting = True
        self.sent_at = now
        self.index = 0  # of the request in flight, in the scenario's list


_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
_CLOSE: Final = b"\r\nconnection: close"


def run_scenario(host: str, port: int, scenario: Scenario, options: dict[str, Any]) -> Result:
    """Drive one scenario with a plain epoll loop over non-blocking sockets.

    ``options``: ``warmup`` and ``duration`` (seconds), ``concurrency`` (clients), and
    optionally ``rate`` (requests per second for all clients together; 0 for as fast as the
    server answers) and ``warmup_requests``: the measured seconds start only once that many
    responses have come back as well (one pass over a scenario's devices, so that no device's
    first request, which fills the server's caches, lands in the measurement however slowly
    the warm-up went; given up 60 s after the warm-up seconds).
    """
    warmup: float = options["warmup"]
    duration: float = options["duration"]
    concurrency: int = options["concurrency"]
    rate: float = options.get("rate", 0.0)
    spacing = concurrency / rate if rate > 0 else 0.0  # seconds between one client's requests
    due: list[tuple[float, int]] = []  # (when, fd): paced sends waiting for their slot
    keep_alive = scenario.mode == "keep-alive"
    requests = scenario.requests
    count = len(requests)
    expect_status = scenario.expect_status
    expect_body = scenario.expect_body
    expectations = scenario.expectations
    poller = select.epoll()
    conns: dict[int, _Conn] = {}
    clock = time.monotonic
    warmup_requests: int = options.get("warmup_requests", 0)
    start_at = clock() + warmup
    stop_at = start_at + duration
    warm_by = start_at  # the warm-up's seconds end here, its responses whenever they are in
    if warmup_requests > 0:
        start_at = stop_at = math.inf
    answered = 0  # responses, warm-up included
    sent = completed = errors = body_bytes = 0
    first_error = ""
    latency = Histogram()

    def open_conn() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex((host, port))  # EINPROGRESS: completion shows as writability
        conns[sock.fileno()] = _Conn(sock, clock())
        poller.register(sock.fileno(), select.EPOLLOUT)

    def close_conn(fd: int, conn: _Conn, *, reset: bool) -> None:
        poller.unregister(fd)
        del conns[fd]
        if reset:  # like the C SDK the client closes first; RST avoids TIME_WAIT pile-ups
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        conn.sock.close()

    def fail(fd: int, conn: _Conn, error: str) -> None:
        nonlocal errors, first_error
        errors += 1
        first_error = first_error or error
        close_conn(fd, conn, reset=True)
        if clock() < stop_at:
            open_conn()

    def send_next(fd: int, conn: _Conn) -> bool:
        nonlocal sent
        conn.index = sent % count
        try:
            conn.sock.send(requests[conn.index])
        except OSError as exc:
            fail(fd, conn, repr(exc))
            return False
        conn.sent_at = clock()
        sent += 1
        return True

    cpu = time.process_time()
    for _ in range(concurrency):
        open_conn()
    while conns:
        timeout = 1.0
        if due:
            timeout = min(timeout, max(0.0, due[0][0] - clock()))
        for fd, events in poller.poll(timeout):
            conn = conns.get(fd)
            if conn is None:
                continue
            try:
                if conn.connecting:
                    if events & (select.EPOLLERR | select.EPOLLHUP):
                        fail(fd, conn, "connect failed")
                        continue
                    conn.connecting = False
                    poller.modify(fd, select.EPOLLIN)
                    conn.index = sent % count
                    conn.sock.send(requests[conn.index])
                    sent += 1
                    continue
                data = conn.sock.recv(262144)
            except OSError as exc:
                fail(fd, conn, repr(exc))
                continue
            if not data:
                fail(fd, conn, "closed by the server before a complete response")
                continue
            buffer = conn.buffer + data
            if conn.expected < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    conn.buffer = buffer
                    continue
                head = buffer[:end].lower()
                start = head.find(_CONTENT_LENGTH)
                if start < 0:
                    fail(fd, conn, f"no Content-Length: {buffer[:300]!r}")
                    continue
                value_end = head.find(b"\r", start + 2)
                value = head[start + len(_CONTENT_LENGTH) : value_end if value_end > 0 else end]
                conn.body_start = end + 4
                conn.expected = conn.body_start + int(value.strip())
            if len(buffer) < conn.expected:
                conn.buffer = buffer
                continue
            response = buffer[: conn.expected]
            body_start = conn.body_start
            conn.buffer = b""
            conn.expected = -1
            now = clock()
            if expectations is not None:
                expect_status, expect_body = expectations[conn.index]
            if response[9:12] != expect_status or expect_body not in response:
                fail(fd, conn, repr(response[:300]))
                continue
            answered += 1
            if answered == warmup_requests:
                start_at = max(now, warm_by)
                stop_at = start_at + duration
            if start_at <= now < stop_at:
                completed += 1
                body_bytes += len(response) - body_start
                latency.record(now - conn.sent_at)
            closing = _CLOSE in response[:body_start].lower()
            if keep_alive and now < stop_at and not closing:
                slot = conn.sent_at + spacing
                if slot > now:
                    heapq.heappush(due, (slot, fd))
                else:
                    send_next(fd, conn)
            else:
                close_conn(fd, conn, reset=True)
                if now < stop_at:
                    open_conn()
        now = clock()
        if start_at == math.inf and now > warm_by + 60:
            start_at, stop_at = now, now + duration  # a warm-up that never ends: measure anyway
        while due and due[0][0] <= now:
            _, fd = heapq.heappop(due)
            conn = conns.get(fd)
            if conn is not None:
                if now < stop_at:
                    send_next(fd, conn)
                else:
                    close_conn(fd, conn, reset=True)
        if now > stop_at + 30:
            break  # a stuck server: give up on what is left
    poller.close()
    return Result(
        completed,
        errors,
        duration,
        time.process_time() - cpu,
        first_error,
        latency=latency,
        body_bytes=body_bytes,
    )


def load_generator(conn: multiprocessing.connection.Connection, host: str, port: int) -> None:
    """The load process: runs each scenario it receives and sends back its :class:`Result`."""
    while True:
        message = conn.recv()
        if message is None:
            return
        scenario, options = message
        conn.send(run_scenario(host, port, scenario, options))


class LoadGenerator:
    """:func:`load_generator` in a spawned process aimed at ``host``:``port``; a context manager.

    ``run(scenario, warmup=, duration=, concurrency=)`` runs one scenario there and returns its
    :class:`Result`; leaving the block ends the process.
    """

    def __init__(self, host: str, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._ours, theirs = context.Pipe()
        self._process = context.Process(
            target=load_generator, args=(theirs, host, port), daemon=True
        )
        self._process.start()
        theirs.close()

    def run(
        self,
        scenario: Scenario,
        *,
        warmup: float,
        duration: float,
        concurrency: int,
        rate: float = 0.0,
    ) -> Result:
        """Run ``scenario`` in the generator process and wait for its result."""
        options = {
            "warmup": warmup,
            "duration": duration,
            "concurrency": concurrency,
            "rate": rate,
        }
        self._ours.send((scenario, options))
        result: Result = self._ours.recv()
        return result

    def close(self) -> None:
        """End the generator process."""
        with contextlib.suppress(OSError):
            self._ours.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._ours.close()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The SDK's own HTTP/1.1 transport: reply framing (property tests), pipelining, keep-alive.

The whole client suite (test_client.py) already runs over this transport and over an injected
httpx2 client; this module covers what only the SDK's transport does: its llhttp framing layer
(:mod:`onenet_ota.device._http`) over every way a reply can be cut into reads, pipelined token
checks and downloads, and a server that does not pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.device import AsyncOtaClient, OtaClient
from onenet_ota.device._core import Call, ClientCore, Head, Outcome
from onenet_ota.device._http import END, MAX_HEAD, Broken, Failure, ReplyParser
from onenet_ota.device.config import Timeout
from onenet_ota.device.errors import DownloadError, ProtocolError, TokenExpired
from onenet_ota.device.events import DownloadedChunk, EventKind, OtaEvent
from onenet_ota.device.install import FileInstaller
from onenet_ota.device.transport import (
    _ENCODED_MAX,
    SyncTransport,
    _AsyncConn,
    _Plan,
    _split,
    _SyncConn,
)
from onenet_ota.device.upgrader import AsyncUpgrader, UpgradeOptions, Upgrader
from onenet_ota.device.upgrader import Outcome as RunOutcome
from tests.device.conftest import FIRMWARE, TOKEN, make_config, task_data
from tests.device.scripted_server import (
    RecordedRequest,
    Reply,
    ScriptedServer,
    download_reply,
    envelope,
    error_byte_reply,
    raw_response,
)

# -- the framing layer, property-tested ------------------------------------------------------


def frame(body: bytes, framing: str, chunks: list[int]) -> bytes:
    """``body`` as a 200 reply framed by Content-Length, chunked (cut at ``chunks``) or close."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "close":
        return head + b"Connection: close\r\n\r\n" + body
    pieces, at = [], 0
    for size in [*chunks, len(body)]:
        piece = body[at : at + size] if size else b""
        if piece:
            pieces.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
        if at >= len(body):
            break
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(pieces) + b"0\r\n\r\n"


def parse(wire: bytes, cuts: list[int], *, eof: bool) -> list[Any]:
    """The parser's events for ``wire`` fed in pieces cut at ``cuts``, then EOF if ``eof``.

    Each piece is fed as the sync transport feeds it: a view of one read buffer, overwritten
    by the next read (so an event that kept a view instead of a copy would be corrupted)."""
    parser = ReplyParser()
    buffer = bytearray(len(wire) + 1)
    view = memoryview(buffer)
    at = 0
    for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
        size = cut - at
        buffer[:size] = wire[at:cut]
        parser.feed(view[:size])
        buffer[:] = b"\xee" * len(buffer)  # the next read overwrites the buffer
        at = cut
    if eof:
        parser.feed_eof()
    return list(parser.events)


def replies(events: list[Any]) -> list[tuple[Head, bytes]]:
    """The complete replies among ``events``: head and joined body."""
    done, head, body = [], None, b""
    for event in events:
        if isinstance(event, Head):
            head, body = event, b""
        elif isinstance(event, bytes):
            body += event
        elif event is END:
            assert head is not None
            done.append((head, body))
            head = None
    return done


FRAMINGS = st.sampled_from(["length", "chunked", "close"])
CUTS = st.lists(st.integers(min_value=0, max_value=100_000), max_size=8)


@given(
    body=st.binary(max_size=3000),
    framing=FRAMINGS,
    chunks=st.lists(st.integers(min_value=1, max_value=700), max_size=6),
    cuts=CUTS,
)
def test_any_framing_cut_anywhere_gives_the_body_back(
    body: bytes, framing: str, chunks: list[int], cuts: list[int]
) -> None:
    wire = frame(body, framing, chunks)
    events = parse(wire, cuts, eof=framing == "close")
    assert replies(events) == [(replies(events)[0][0], body)]
    ended = events.index(END)
    assert not any(isinstance(e, Broken) for e in events[:ended])
    # After a reply that ran to the close, nothing more can come on the connection.
    closed = Broken("the server closed the connection without replying", closed=True)
    assert events[ended + 1 :] == ([closed] if framing == "close" else [])


@given(code=st.sampled_from([b"1", b"2", b"3", b"4", b"5", b"6"]), cuts=CUTS, framing=FRAMINGS)
def test_one_byte_download_errors_in_every_framing(
    code: bytes, cuts: list[int], framing: str
) -> None:
    # §6.6.4: OneNET's one-byte errors come chunked or close-delimited; Studio's chunked (§12.3).
    wire = frame(code, framing, [1])
    assert [body for _, body in replies(parse(wire, cuts, eof=framing == "close"))] == [code]


@given(
    bodies=st.lists(st.binary(max_size=500), min_size=1, max_size=4),
    framings=st.lists(st.sampled_from(["length", "chunked"]), min_size=4, max_size=4),
    cuts=CUTS,
)
def test_replies_back_to_back_come_out_in_order(
    bodies: list[bytes], framings: list[str], cuts: list[int]
) -> None:
    # Keep-alive and pipelining: several replies in one stream, each its own.
    wire = b"".join(frame(b, f, [7]) for b, f in zip(bodies, framings, strict=False))
    assert [body for _, body in replies(parse(wire, cuts, eof=False))] == bodies


@given(body=st.binary(min_size=1, max_size=2000), data=st.data())
def test_a_close_before_the_end_of_a_framed_body_is_broken(body: bytes, data: Any) -> None:
    framing = data.draw(st.sampled_from(["length", "chunked"]))
    wire = frame(body, framing, [5])
    head_end = wire.index(b"\r\n\r\n") + 4
    cut = data.draw(st.integers(min_value=head_end, max_value=len(wire) - 1))
    events = parse(wire[:cut], [], eof=True)
    assert replies(events) == []
    assert isinstance(events[-1], Broken)
    assert events[-1].closed


@given(junk=st.binary(min_size=1, max_size=50))
def test_bytes_that_are_not_a_reply_are_broken(junk: bytes) -> None:
    # llhttp skips empty lines before a reply (RFC 9112 §2.2) and knows the RTSP/ICE status
    # lines, which start with other letters: the first byte here starts none of those.
    wire = b"X" + junk + b"\r\n\r\n"
    events = parse(wire, [], eof=False)
    assert events == [Broken(events[0].detail)]


def test_a_head_longer_than_the_limit_is_broken() -> None:
    wire = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * MAX_HEAD + b"\r\n"
    events = parse(wire, list(range(0, len(wire), 1000)), eof=False)
    assert isinstance(events[-1], Broken)
    assert "head longer" in events[-1].detail


def test_nothing_then_eof_is_a_close_without_reply() -> None:
    events = parse(b"", [], eof=True)
    assert events == [Broken("the server closed the connection without replying", True)]


def test_interim_replies_are_skipped() -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" + frame(b"{}", "length", [])
    assert [(h.status, b) for h, b in replies(parse(wire, [3, 30], eof=False))] == [(200, b"{}")]


@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(["X-A", "x-a", "X-B", "Content-Type", "content-type", "ETag"]),
            st.text(alphabet="abc 0123", max_size=6).map(str.strip),
        ),
        max_size=6,
    ),
    cuts=CUTS,
)
def test_a_parsed_head_is_the_head_of_its_headers(
    headers: list[tuple[str, str]], cuts: list[int]
) -> None:
    # The parser builds the head's index as the headers arrive (repeated names, any case, cut
    # anywhere); it answers as a Head built from the same headers does.
    wire = b"HTTP/1.1 200 OK\r\n" + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in headers
    )
    ((head, body),) = replies(parse(wire + b"Content-Length: 2\r\n\r\n{}", cuts, eof=False))
    expected = Head(200, (*headers, ("Content-Length", "2")))
    assert (head, body) == (expected, b"{}")
    for name in ("x-a", "X-B", "CONTENT-TYPE", "etag", "content-length", "missing"):
        assert head.get_all(name) == expected.get_all(name)
        assert head.get(name) == expected.get(name)
    assert head.first_values() == expected.first_values()


# -- the socket's timeout ---------------------------------------------------------------------


class _Socket:
    """A socket's timeout and its operations, scripted: each operation takes its next outcome
    (a number of bytes, or an exception to raise)."""

    def __init__(self, *outcomes: int | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.timeouts: list[float | None] = []
        self.sent = b""

    def settimeout(self, value: float | None) -> None:
        self.timeouts.append(value)

    def _next(self) -> int:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def recv_into(self, buffer: bytearray) -> int:
        count = self._next()
        buffer[:count] = b"x" * count
        return count

    def send(self, data: bytes) -> int:
        count = min(self._next(), len(data))
        self.sent += bytes(data[:count])
        return count


def test_the_socket_timeout_is_set_again_only_when_it_could_outlast_the_deadline() -> None:
    sock = _Socket(4, 4, 4)
    conn = _SyncConn(sock)  # type: ignore[arg-type]
    buffer = bytearray(16)
    now = time.monotonic()
    assert conn.recv_into(buffer, now + 30) == 4
    assert conn.recv_into(buffer, now + 30.5) == 4  # the next call, the same limit: kept
    assert len(sock.timeouts) == 1
    first = sock.timeouts[0]
    assert first is not None
    assert first <= 30
    assert conn.recv_into(buffer, now + 5) == 4  # a nearer deadline: set again, within it
    assert len(sock.timeouts) == 2
    second = sock.timeouts[1]
    assert second is not None
    assert second <= 5


def test_a_socket_timeout_short_of_the_deadline_does_not_end_the_call() -> None:
    # The socket's timeout may be up to a second short of the call's deadline; when it fires
    # first, the read (or write) goes on until the deadline itself.
    sock = _Socket(TimeoutError("timed out"), TimeoutError("timed out"), 7)
    conn = _SyncConn(sock)  # type: ignore[arg-type]
    assert conn.recv_into(bytearray(16), time.monotonic() + 60) == 7
    sock = _Socket(TimeoutError("timed out"), 3, TimeoutError("timed out"), 100)
    conn = _SyncConn(sock)  # type: ignore[arg-type]
    conn.send(b"GET / HTTP/1.1\r\n\r\n", time.monotonic() + 60)
    assert sock.sent == b"GET / HTTP/1.1\r\n\r\n"
    assert not sock.outcomes


def test_a_socket_timeout_at_the_deadline_ends_the_call() -> None:
    class _Slow(_Socket):
        def recv_into(self, buffer: bytearray) -> int:
            time.sleep(0.02)  # the deadline passes while the socket waits
            return super().recv_into(buffer)

    sock = _Slow(TimeoutError("timed out"), 5)
    conn = _SyncConn(sock)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        conn.recv_into(bytearray(16), time.monotonic() + 0.01)
    assert sock.outcomes == [5]  # not read again after the deadline
    with pytest.raises(TimeoutError):  # a deadline already past: no wait at all
        conn.recv_into(bytearray(16), time.monotonic() - 1)
    assert sock.outcomes == [5]


def _full_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair whose first socket's send buffer is full (the peer reads nothing)."""
    sender, peer = socket.socketpair()
    sender.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sender.send(b"\0" * 65536)
    return sender, peer


def test_a_request_that_does_not_fit_waits_for_room_until_its_deadline() -> None:
    # A plain socket's request is written without waiting; what does not fit the send buffer
    # waits for room as any write does, and only until the call's deadline.
    sender, peer = _full_pair()
    with sender, peer:
        conn = _SyncConn(sender, plain=True)
        conn._arm(time.monotonic() + 30)  # the socket has its timeout: the direct write is on
        with pytest.raises(TimeoutError):
            conn.send(b"GET / HTTP/1.1\r\n\r\n", time.monotonic() + 0.05)


def test_a_request_written_directly_arrives_whole_and_in_order() -> None:
    # Partly written at once, the rest as the peer makes room: every byte, in order.
    sender, peer = socket.socketpair()
    with sender, peer:
        conn = _SyncConn(sender, plain=True)
        conn._arm(time.monotonic() + 30)
        request = bytes(range(256)) * 4096  # more than a socket's send buffer takes at once
        received = bytearray()

        def drain() -> None:
            while len(received) < len(request):
                received.extend(peer.recv(1 << 20))

        reader = threading.Thread(target=drain)
        reader.start()
        conn.send(request, time.monotonic() + 30)
        reader.join(timeout=30)
        assert bytes(received) == request


# -- pipelining over the scripted server ------------------------------------------------------

CHUNK = FIRMWARE[:100]
CHUNK_REPLY = download_reply(CHUNK, 0, 99, len(FIRMWARE))


async def check_and_download(
    client: OtaClient | AsyncOtaClient, *, pipeline: bool = True
) -> tuple[Any, Any]:
    if isinstance(client, AsyncOtaClient):
        return await client._check_and_download(TOKEN, 0, 100, pipeline=pipeline)
    return client._check_and_download(TOKEN, 0, 100, pipeline=pipeline)


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest, server: ScriptedServer) -> OtaClient | AsyncOtaClient:
    cls = AsyncOtaClient if request.param == "async" else OtaClient
    return cls(make_config(), base_url=server.url)


async def close(client: OtaClient | AsyncOtaClient) -> None:
    if isinstance(client, AsyncOtaClient):
        await client.aclose()
    else:
        client.close()


@pytest.mark.anyio
async def test_check_and_download_pipelined_on_one_connection(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    server.add(envelope(0), CHUNK_REPLY)
    check, download = await check_and_download(client)
    await close(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome)
    assert download.value == DownloadedChunk(CHUNK, 0, 99, len(FIRMWARE), partial=True)
    assert server.connections == 1
    # Both requests went out before the first reply was read: one write, both in it.
    first = server.requests[0]
    assert first.path.endswith("/check")
    assert server.requests[1].path.endswith(f"/download/{TOKEN}")


@pytest.mark.anyio
async def test_a_server_that_closes_after_the_first_reply_gets_the_rest_again(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    # A server that does not pipeline: it answers the check and closes the connection, the
    # download it never read is sent once more on a new connection, and the client stops
    # pipelining (the next pair goes one request at a time, still one reply each).
    server.add(Reply(envelope(0).data, close=True), CHUNK_REPLY)
    check, download = await check_and_download(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome)
    assert download.value.data == CHUNK
    assert server.connections == 2
    assert [r.path.rsplit("/", 1)[-1] for r in server.requests] == ["check", TOKEN]
    assert not client._sender.pipelining  # type: ignore[union-attr]
    server.add(Reply(envelope(0).data, close=True), Reply(CHUNK_REPLY.data, close=True))
    check, download = await check_and_download(client)
    await close(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome)
    assert server.connections == 3  # the download's connection was kept, then one more
    assert len(server.requests) == 4


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_reply_that_runs_to_the_close_leaves_the_call_behind_it_unanswered(
    server: ScriptedServer, flavour: str
) -> None:
    # The check is answered without a length, its body ending with the connection (an
    # HTTP/1.0-style server). The download pipelined behind it can have no reply on that
    # connection: it goes again on a new one at once, instead of the client reading the
    # closed connection over and over until its deadline (sync), or forever without letting
    # the event loop run (async).
    succ = b'{"errno":0,"error":"succ"}'
    to_the_close = raw_response(
        200, succ, [("Content-Type", "application/json")], content_length=False
    )
    server.add(Reply(to_the_close, close=True), CHUNK_REPLY)
    cls = AsyncOtaClient if flavour == "async" else OtaClient
    client = cls(make_config(), base_url=server.url, timeout=2000)
    check, download = await check_and_download(client)
    await close(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome), download
    assert download.value.data == CHUNK
    assert server.connections == 2
    assert [r.path.rsplit("/", 1)[-1] for r in server.requests] == ["check", TOKEN]
    assert not client._sender.pipelining  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_failed_check_still_reads_the_pipelined_reply_off_the_connection(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    server.add(envelope(12), CHUNK_REPLY, envelope(0))
    check, download = await check_and_download(client)
    assert isinstance(check, Failure)
    assert isinstance(check.error, TokenExpired)
    assert isinstance(download, Outcome)  # read, so that the next reply is the next call's
    if isinstance(client, AsyncOtaClient):
        await client.check_token(TOKEN)
    else:
        client.check_token(TOKEN)
    await close(client)
    assert server.connections == 1


@pytest.mark.anyio
async def test_a_broken_first_reply_fails_the_pair_without_a_retry(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    # The first reply's head arrived, its body was cut: the check fails; the download, sent but
    # never answered on that connection, is asked once more on a new one.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"
    server.add(Reply(head, close=True), CHUNK_REPLY)
    check, download = await check_and_download(client)
    await close(client)
    assert isinstance(check, Failure)
    assert isinstance(check.error, ProtocolError)
    assert isinstance(download, Outcome)
    assert len(server.requests) == 2


@pytest.mark.anyio
async def test_without_pipelining_the_pair_is_sequential(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    server.add(envelope(0), CHUNK_REPLY)
    check, download = await check_and_download(client, pipeline=False)
    await close(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome)
    assert server.connections == 1


# -- sent ahead: the request goes out before its reply is wanted ------------------------------


async def _arrived(server: ScriptedServer, count: int) -> bool:
    """Whether the server has read ``count`` requests, waiting up to 10 s for them (the
    server reads in its own thread)."""
    for _ in range(1000):
        if len(server.requests) >= count:
            return True
        await anyio.sleep(0.01)
    return False


@pytest.mark.anyio
@pytest.mark.parametrize("pipeline", [False, True], ids=["one", "pipelined"])
async def test_calls_sent_ahead_reach_the_server_before_their_replies_are_read(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer, pipeline: bool
) -> None:
    # What the upgrader's Prefetch relies on: the request is on the wire while the device
    # writes the last chunk; the reply is read only when it is wanted.
    server.add(envelope(0), CHUNK_REPLY)
    core = client._core
    calls: list[Call[Any]] = [core.check_token(TOKEN), core.download(TOKEN, 0, 100)]
    sent = calls if pipeline else calls[:1]
    if isinstance(client, AsyncOtaClient):
        ahead = await client._send_ahead(sent, pipeline=pipeline)
    else:
        ahead = client._send_ahead(sent, pipeline=pipeline)
    assert await _arrived(server, len(sent))
    if isinstance(client, AsyncOtaClient):
        results = await client._collect(ahead)
        if not pipeline:
            results += await client._exchange(calls[1:], pipeline=False)
    else:
        results = client._collect(ahead)
        if not pipeline:
            results += client._exchange(calls[1:], pipeline=False)
    await close(client)
    assert isinstance(results[0], Outcome)
    assert isinstance(results[1], Outcome)
    assert results[1].value.data == CHUNK
    assert server.connections == 1  # the connection went back to the pool, and was reused


@pytest.mark.anyio
async def test_calls_sent_ahead_and_dropped_leave_no_reply_behind(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    # Dropped (the flow asked for something else): its connection is closed unread, so its
    # reply can never be taken for the next call's.
    server.add(envelope(0), CHUNK_REPLY, envelope(12))
    core = client._core
    calls: list[Call[Any]] = [core.check_token(TOKEN), core.download(TOKEN, 0, 100)]
    if isinstance(client, AsyncOtaClient):
        client._drop(await client._send_ahead(calls, pipeline=True))
        assert await _arrived(server, 2)
        with pytest.raises(TokenExpired):
            await client.check_token(TOKEN)
    else:
        client._drop(client._send_ahead(calls, pipeline=True))
        assert await _arrived(server, 2)
        with pytest.raises(TokenExpired):
            client.check_token(TOKEN)
    await close(client)
    assert server.connections == 2


# -- keep_alive=False: a connection per call ---------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_keep_alive_off_sends_connection_close_and_reconnects(
    server: ScriptedServer, flavour: str
) -> None:
    server.add(envelope(0), envelope(0), envelope(0))
    events: list[OtaEvent] = []
    if flavour == "async":
        async with AsyncOtaClient(
            make_config(keep_alive=False), base_url=server.url, on_event=events.append
        ) as aclient:
            for _ in range(3):
                await aclient.check_token(TOKEN)
    else:
        with OtaClient(
            make_config(keep_alive=False), base_url=server.url, on_event=events.append
        ) as client:
            assert not client.keep_alive
            for _ in range(3):
                client.check_token(TOKEN)
    assert server.connections == 3
    assert all(r.header("Connection") == "close" for r in server.requests)
    assert [e.kind for e in events] == [EventKind.CHECK_TOKEN] * 3


# -- bad replies only this transport sees this way -------------------------------------------


@pytest.mark.anyio
async def test_a_one_byte_error_after_a_kept_reply(
    client: OtaClient | AsyncOtaClient, server: ScriptedServer
) -> None:
    # A close-delimited one-byte error (§6.6.4) ends with the connection; the next call opens
    # a new one.
    server.add(envelope(0), error_byte_reply(b"3", chunked=False), envelope(0))
    check, download = await check_and_download(client)
    assert isinstance(check, Outcome)
    assert isinstance(download, Failure)
    assert isinstance(download.error, DownloadError)
    assert download.error.code == 3
    if isinstance(client, AsyncOtaClient):
        await client.check_token(TOKEN)
    else:
        client.check_token(TOKEN)
    await close(client)
    assert server.connections == 2


def test_the_head_bound_is_a_protocol_error(server: ScriptedServer) -> None:
    huge = raw_response(200, b'{"errno":0}', [("X-Filler", "a" * (MAX_HEAD + 1))])
    server.add(Reply(huge))
    with (
        OtaClient(make_config(), base_url=server.url) as client,
        pytest.raises(ProtocolError, match="head longer"),
    ):
        client.check_token(TOKEN)


# -- the upgrader, pipelining against a server that closes after every reply --------------------


def is_download(path: str) -> bool:
    """E6's path (not E5's, which ends in /check)."""
    return path.startswith("/ota/south/download/") and not path.endswith("/check")


def closing_platform(request: RecordedRequest) -> Reply:
    """A classic platform that answers one request per connection (no pipelining, no
    keep-alive), like the C SDK's servers (§10): E1, E3, E5 and E7 succeed, E6 serves ranges."""
    path = request.path
    if path == "/ota/south/check":
        reply = envelope(0, data=task_data())
    elif is_download(path):
        range_header = request.header("Range") or ""
        first, last = (int(x) for x in range_header.split("-"))  # classic: "s-e" (§6.6.1)
        last = min(last, len(FIRMWARE) - 1)
        reply = download_reply(FIRMWARE[first : last + 1], first, last, len(FIRMWARE))
    else:
        reply = envelope(0)
    return Reply(reply.data, close=True)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.anyio
async def test_pipelined_upgrade_against_a_server_that_does_not_pipeline(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    server.handler = closing_platform
    options = UpgradeOptions(chunk_size=1024, pipeline=True, progress_step=0)
    output = tmp_path / "fw.bin"
    if flavour == "async":
        async with AsyncOtaClient(make_config(), base_url=server.url) as aclient:
            result = await AsyncUpgrader(
                aclient, FileInstaller(output), state_dir=tmp_path / "state", options=options
            ).run()
    else:
        with OtaClient(make_config(), base_url=server.url) as client:
            result = Upgrader(
                client, FileInstaller(output), state_dir=tmp_path / "state", options=options
            ).run()
    assert result.outcome is RunOutcome.SUCCEEDED, result.reason
    assert output.read_bytes() == FIRMWARE
    kinds = ["E6" if is_download(r.path) else r.path for r in server.requests]
    downloads = [i for i, kind in enumerate(kinds) if kind == "E6"]
    # Every chunk fetched once (the pipelined one the server dropped was not read by it), each
    # right after its token check.
    assert len(downloads) == -(-len(FIRMWARE) // 1024)
    assert all(kinds[i - 1].endswith("/check") for i in downloads)


class _StandInTransport(asyncio.Transport):
    """Records what the connection writes; never sends it anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def test_an_async_write_waits_only_while_the_socket_buffer_is_full() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stand_in = _StandInTransport()
        conn = _AsyncConn(loop)
        conn.connection_made(stand_in)
        await conn.write(b"first", time.monotonic() + 60)  # not paused: no wait at all
        conn.pause_writing()
        writing = loop.create_task(conn.write(b"second", time.monotonic() + 60))
        await asyncio.sleep(0)
        conn.data_received(b"HTTP/1.1 ")  # bytes arriving do not end the wait for room
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not writing.done()
        conn.resume_writing()
        await writing
        assert stand_in.written == [b"first", b"second"]
        conn.disarm()
        conn.pause_writing()
        with pytest.raises(TimeoutError):  # the deadline has passed: the write gives up
            await conn.write(b"third", time.monotonic() - 1)
        conn.disarm()
        conn.connection_lost(None)
        with pytest.raises(ConnectionResetError):  # as a stream writer's drain raises
            await conn.write(b"fourth", time.monotonic() + 60)

    asyncio.run(scenario())


def test_an_async_connection_arms_its_timer_once_for_waits_with_later_deadlines() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        armed: list[float] = []
        call_at = loop.call_at

        def counting_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> Any:
            if callback == conn._expire:  # not asyncio.sleep's timers
                armed.append(when)
            return call_at(when, callback, *args, **kw)

        loop.call_at = counting_call_at  # type: ignore[method-assign,assignment]
        conn = _AsyncConn(loop)
        conn.connection_made(_StandInTransport())
        soon = time.monotonic() + 0.05
        for step in range(20):  # twenty requests, each waiting once, each deadline later
            conn.pause_writing()
            writing = loop.create_task(conn.write(b"x", soon + step))
            await asyncio.sleep(0)
            conn.resume_writing()
            await writing
            conn.disarm()
        assert len(armed) == 1
        # The timer armed for the first deadline fires while a later wait goes on; that wait
        # is not timed out by it, and the timer is armed again for the wait's own deadline.
        conn.pause_writing()
        writing = loop.create_task(conn.write(b"late", time.monotonic() + 60))
        await asyncio.sleep(0.2)
        assert not writing.done()
        assert len(armed) == 2
        conn.resume_writing()
        await writing
        conn.disarm()
        # A deadline earlier than the armed timer's arms it again, and ends its wait.
        conn.pause_writing()
        with pytest.raises(TimeoutError):
            await conn.write(b"early", time.monotonic() + 0.01)
        conn.disarm()
        conn.close()
        assert conn._timer is None  # a closed connection leaves no timer behind

    asyncio.run(scenario())


def test_async_bytes_reach_the_parser_only_when_a_reply_is_read() -> None:
    async def scenario() -> None:
        conn = _AsyncConn(asyncio.get_running_loop())
        conn.connection_made(_StandInTransport())
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        conn.data_received(reply)
        conn.eof_received()
        # Still idle: a request that fails on this kept connection may be sent again (§10).
        assert conn.parser.idle
        assert not conn.parser.events
        await conn.receive(time.monotonic() + 60)  # what arrived, without waiting
        assert conn.parser.events[0] == Head(200, (("Content-Length", "2"),))
        await conn.receive(time.monotonic() + 60)  # then the end
        assert conn.parser.closed
        conn.disarm()

    asyncio.run(scenario())


def test_a_kept_request_encoding_is_only_ever_its_own_request() -> None:
    core = ClientCore(make_config(), base_url="http://127.0.0.1:8080", timeout=Timeout())
    transport = SyncTransport(None, user_agent="test")

    def wire(call: Call[Any]) -> bytes:
        plan = _Plan([call], False)
        return transport._payload(plan, plan.next_batch())

    check = core.check_token(TOKEN, None)
    assert core.check_token(TOKEN, None).request is check.request  # the core keeps it
    assert wire(check) == wire(core.check_token(TOKEN, None))
    assert wire(check).startswith(f"GET /ota/south/download/{TOKEN}/check?".encode())
    other = wire(core.check_token("ota_another_token", None))
    assert other.startswith(b"GET /ota/south/download/ota_another_token/check?")
    for start in (0, 4096, 8192):  # a download's request is new each time: its own Range
        assert f"\r\nRange: {start}-{start + 4095}\r\n".encode() in wire(
            core.download(TOKEN, start, 4096, None)
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/ota/south/check?type=1&version=1.0.0&dev_id=42",
        "https://iot-api.heclouds.com/fuse-ota/1/2/check?x=1",
        "HTTP://Example.COM:80/a/b",
        "https://[::1]:8443/ota/device/version?dev_id=7",
        "http://user@host:81/p?q",
        "http://host:82?only=query",
        "http://host:83/path?",
        "http://host:84/path#fragment",
        "http://host/a%20b?c=%2F",
        " http://host:85/padded ",
        "http://host:86/tab\there",
    ],
)
def test_a_url_splits_as_urlsplit_splits_it(url: str) -> None:
    parts = urlsplit(url)
    origin, target, host = _split(url)
    assert (origin.scheme, origin.host) == (parts.scheme.lower(), parts.hostname or "")
    assert origin.port == (parts.port or (443 if origin.scheme == "https" else 80))
    assert target == (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    assert "#" not in target
    assert host == origin.host_header


def test_a_transport_keeps_the_urls_it_split_within_its_bound() -> None:
    transport = SyncTransport(None, user_agent="test")
    first = "http://127.0.0.1:8080/ota/south/download/t/check?dev_id=1"
    kept = transport._target(first)
    assert transport._target(first) is kept  # parsed once
    for n in range(3 * _ENCODED_MAX):
        url = f"http://127.0.0.1:8080/ota/south/check?dev_id={n}"
        assert transport._target(url) == _split(url)
        assert len(transport._split_urls) <= _ENCODED_MAX
    transport.close()


def test_the_async_client_runs_on_uvloop(server: ScriptedServer) -> None:
    """uvloop's transports are not subclasses of asyncio.Transport: the async connection must
    not require it (a user's loop, or a simulator's, may be uvloop)."""
    uvloop = pytest.importorskip("uvloop")
    server.add(envelope(0), CHUNK_REPLY)

    async def run() -> Any:
        client = AsyncOtaClient(make_config(), base_url=server.url)
        try:
            return await check_and_download(client)
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        check, download = runner.run(run())
    assert isinstance(check, Outcome)
    assert isinstance(download, Outcome)
    assert download.value == DownloadedChunk(CHUNK, 0, 99, len(FIRMWARE), partial=True)

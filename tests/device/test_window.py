"""The pipelining window (``UpgradeOptions.pipeline_depth``): several chunks in flight on one
connection, each chunk still used only after its own token check passed.

A classic platform runs on the scripted server (:class:`WindowPlatform`) so that a test can see
which requests were written before the reply to the one before them (``queued``), close the
connection mid-window, or turn the token invalid while later chunks are already on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onenet_ota.device import AsyncOtaClient, OtaClient, OtaEvent, PackageDownloaded
from onenet_ota.device.install import FileInstaller
from onenet_ota.device.upgrader import (
    AsyncUpgrader,
    UpgradeOptions,
    Upgrader,
    UpgradeResult,
)
from onenet_ota.device.upgrader import Outcome as RunOutcome
from onenet_ota.protocol.errno import Errno
from tests.device.conftest import FIRMWARE, TOKEN, make_config, task_data
from tests.device.scripted_server import (
    RecordedRequest,
    Reply,
    ScriptedServer,
    download_reply,
    envelope,
)

CHUNK = 1024
CHUNKS = -(-len(FIRMWARE) // CHUNK)
NEW_TOKEN = "ota_fresh0000000000000000"
POISON = 0xFF  # what a lax server serves for a token it no longer honours


class WindowPlatform:
    """Classic E1, E3, E5, E6 and E7 on the scripted server.

    ``close_at``: the number of the request (counted from 1, over the whole run) whose reply
    closes the connection. ``hold_at``: the number of the request whose reply waits until the
    client has written the next request on the connection (:attr:`Reply.after_next`).
    ``expire_at_check``: the number of the E5 that answers errno 12
    (token expired); from then on E3 hands out :data:`NEW_TOKEN`, E5 refuses the old token and
    E6 still serves it, but poisoned bytes: only the device's own check keeps them out.
    """

    def __init__(
        self,
        *,
        close_at: int | None = None,
        linger: bool = False,
        hold_at: int | None = None,
        expire_at_check: int | None = None,
    ) -> None:
        self.close_at = close_at
        self.linger = linger
        self.hold_at = hold_at
        self.expire_at_check = expire_at_check
        self.token = TOKEN
        self.count = 0
        self.checks = 0
        self.reports: list[int] = []
        self.downloads: list[tuple[str, int]] = []  # (token, range start)

    def __call__(self, request: RecordedRequest) -> Reply:
        self.count += 1
        reply = self._answer(request)
        return Reply(
            reply.data,
            close=self.count == self.close_at,
            linger=self.linger,
            after_next=self.count == self.hold_at,
        )

    def _answer(self, request: RecordedRequest) -> Reply:
        path = request.path
        if path == "/ota/south/check":
            return envelope(0, data=task_data(token=self.token))
        if path.startswith("/ota/south/download/") and path.endswith("/check"):
            self.checks += 1
            token = path.split("/")[4]
            if self.checks == self.expire_at_check:
                self.token = NEW_TOKEN
            if token != self.token:
                return envelope(Errno.TOKEN_EXPIRED)
            return envelope(0)
        if path.startswith("/ota/south/download/"):
            token = path.rsplit("/", 1)[-1]
            first, last = (int(x) for x in (request.header("Range") or "").split("-"))
            last = min(last, len(FIRMWARE) - 1)
            self.downloads.append((token, first))
            data = FIRMWARE[first : last + 1]
            if token != self.token:
                data = bytes([POISON]) * len(data)
            return download_reply(data, first, last, len(FIRMWARE))
        if path.endswith("/progress"):
            self.reports.append(json.loads(request.body)["step"])
        return envelope(0)


async def upgrade(
    server: ScriptedServer,
    tmp_path: Path,
    flavour: str,
    *,
    depth: int = 4,
    progress_step: int = 0,
    events: list[OtaEvent] | None = None,
) -> tuple[UpgradeResult, bool]:
    """One pipelined upgrade; its result, and whether the transport still pipelines."""
    options = UpgradeOptions(
        chunk_size=CHUNK, pipeline=True, pipeline_depth=depth, progress_step=progress_step
    )
    output = tmp_path / "fw.bin"
    on_event = events.append if events is not None else None
    if flavour == "async":
        async with AsyncOtaClient(make_config(), base_url=server.url, on_event=on_event) as ac:
            result = await AsyncUpgrader(
                ac, FileInstaller(output), state_dir=tmp_path / "state", options=options
            ).run()
            pipelining = ac._can_pipeline
    else:
        with OtaClient(make_config(), base_url=server.url, on_event=on_event) as client:
            result = Upgrader(
                client, FileInstaller(output), state_dir=tmp_path / "state", options=options
            ).run()
            pipelining = client._can_pipeline
    assert result.outcome is RunOutcome.SUCCEEDED, result.reason
    assert output.read_bytes() == FIRMWARE
    return result, pipelining


def kinds(server: ScriptedServer) -> list[tuple[str, bool]]:
    """Each E5/E6 as ("E5" | "E6", whether it was written before the previous reply)."""
    found = []
    for request in server.requests:
        if request.path.startswith("/ota/south/download/"):
            kind = "E5" if request.path.endswith("/check") else "E6"
            found.append((kind, request.queued))
    return found


def delivered(events: list[OtaEvent]) -> list[tuple[int, bytes]]:
    return [(e.chunk.start, e.chunk.data) for e in events if isinstance(e, PackageDownloaded)]


def whole_chunks() -> list[tuple[int, bytes]]:
    return [(start, FIRMWARE[start : start + CHUNK]) for start in range(0, len(FIRMWARE), CHUNK)]


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_later_chunks_go_out_before_earlier_replies_on_one_connection(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    """The next chunks' checks are written while an earlier chunk's reply is still unread,
    all on one connection; every chunk is fetched and delivered once, in order."""
    # E1, E3, the first chunk's E5 and E6, then the window: the second chunk's E6 (the 6th
    # request) is answered only once the third chunk's E5 arrived behind it.
    platform = WindowPlatform(hold_at=6)
    server.handler = platform
    events: list[OtaEvent] = []
    await upgrade(server, tmp_path, flavour, events=events)
    assert server.waited_in_vain == 0
    assert server.requests[6].path == f"/ota/south/download/{TOKEN}/check"
    assert server.requests[6].queued
    assert server.connections == 1
    assert [start for _, start in platform.downloads] == list(range(0, len(FIRMWARE), CHUNK))
    assert delivered(events) == whole_chunks()
    assert platform.reports == [101, 201]


@pytest.mark.anyio
async def test_progress_reports_leave_the_window_in_flight(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    """A progress report goes out on another connection while later chunks are in flight;
    those are used afterwards, not dropped and fetched again."""
    platform = WindowPlatform()
    server.handler = platform
    events: list[OtaEvent] = []
    await upgrade(server, tmp_path, flavour, progress_step=20, events=events)
    assert [start for _, start in platform.downloads] == list(range(0, len(FIRMWARE), CHUNK))
    assert delivered(events) == whole_chunks()
    assert platform.reports == [20, 40, 60, 80, 101, 201]


@pytest.mark.anyio
async def test_depth_one_keeps_only_the_next_chunk_in_flight(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    """``pipeline_depth=1``: each chunk's check goes out only once the chunk before it was
    read (the check and its own chunk still go together)."""
    server.handler = WindowPlatform(hold_at=6)  # the second chunk's E6, as above
    server.after_next_wait = 0.5  # the client cannot write the next E5 before this reply
    await upgrade(server, tmp_path, flavour, depth=1)
    assert server.waited_in_vain == 1
    assert all(queued for kind, queued in kinds(server) if kind == "E6")


@pytest.mark.parametrize("linger", [True, False], ids=["lingering-close", "abrupt-close"])
@pytest.mark.anyio
async def test_a_server_that_stops_pipelining_mid_window(
    server: ScriptedServer, tmp_path: Path, flavour: str, linger: bool
) -> None:
    """The server closes the connection after a reply while later chunks' requests are queued
    on it: those are sent again on new connections, one at a time; no chunk is delivered twice
    or skipped and no status is reported twice. A server that closes gracefully (FIN, then
    reading to the end) lets the client see a reply and then the close: it stops pipelining."""
    # E1, E3, then the first chunk's pair on its own, then the window: the 8th request is
    # answered with a close while the following pairs are already written.
    platform = WindowPlatform(close_at=8, linger=linger)
    server.handler = platform
    events: list[OtaEvent] = []
    _, pipelining = await upgrade(server, tmp_path, flavour, events=events)
    if linger:
        assert not pipelining
    assert server.connections > 1
    # Closing abruptly with requests still unread, the server's socket resets the connection,
    # and the client may lose replies already sent: those chunks are asked again, and used once.
    assert {start for _, start in platform.downloads} == set(range(0, len(FIRMWARE), CHUNK))
    assert delivered(events) == whole_chunks()
    assert platform.reports == [101, 201]


@pytest.mark.anyio
async def test_a_kept_connection_closed_before_the_window_does_not_stop_pipelining(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    """The server closes the kept connection right after the first chunk (an idle timeout,
    not a refusal to pipeline): the window written on it is sent again on a new connection,
    and pipelining goes on."""
    platform = WindowPlatform(close_at=4)  # E1, E3, E5 and E6 of the first chunk
    server.handler = platform
    events: list[OtaEvent] = []
    _, pipelining = await upgrade(server, tmp_path, flavour, events=events)
    assert pipelining
    assert delivered(events) == whole_chunks()
    assert platform.reports == [101, 201]


@pytest.mark.anyio
async def test_a_token_that_expires_mid_window_keeps_the_later_chunks_out(
    server: ScriptedServer, tmp_path: Path, flavour: str
) -> None:
    """The 4th chunk's check says the token expired while the 4th and later chunks are already
    requested with it (and a lax server serves them, poisoned): none of those bytes is used;
    the device renews the token (E3) and fetches them again with the new one."""
    platform = WindowPlatform(expire_at_check=4)
    server.handler = platform
    events: list[OtaEvent] = []
    await upgrade(server, tmp_path, flavour, events=events)
    stale = [start for token, start in platform.downloads[3:] if token == TOKEN]
    # The window had the chunk behind the refused one on the wire with the old token too.
    assert 3 * CHUNK in stale
    assert 4 * CHUNK in stale
    assert delivered(events) == whole_chunks()
    assert all(bytes([POISON]) * 16 not in data for _, data in delivered(events))
    assert platform.reports == [101, 201]


@pytest.mark.parametrize("depth", [0, 65, 2.0, True])
def test_pipeline_depth_is_checked(depth: object) -> None:
    with pytest.raises(ValueError, match="pipeline_depth"):
        UpgradeOptions(pipeline=True, pipeline_depth=depth)  # type: ignore[arg-type]

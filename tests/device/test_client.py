"""OtaClient and AsyncOtaClient over real HTTP on loopback, against a scripted server.

Every test runs with both clients (``make_client``). The server records the exact bytes of each
request and answers with canned bytes, so these tests check the wire form (against the official
C SDK's captures where the SDK should match them) and every malformed reply.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme

from onenet_ota.device import (
    AsyncOtaClient,
    AuthFailed,
    ClientClosedError,
    Credentials,
    DownloadedChunk,
    DownloadError,
    DownloadErrorCode,
    Errno,
    EventKind,
    HTTPStatusError,
    InvalidArgumentError,
    NoTask,
    OtaClient,
    PackageDownloaded,
    PackageKind,
    PlatformError,
    ProtocolError,
    RequestTimeout,
    StatusCode,
    StatusReported,
    TaskCancelled,
    TaskChecked,
    TaskFinished,
    TaskInfo,
    TaskType,
    TokenChecked,
    TokenExpired,
    TransportError,
    VersionInfo,
    VersionPosted,
)
from onenet_ota.device.errors import ERRNO_EXCEPTIONS
from onenet_ota.protocol.endpoints import Endpoint
from tests.captures import CAPTURES
from tests.device.conftest import (
    FIRMWARE,
    FIRMWARE_MD5,
    TOKEN,
    VECTOR_3,
    MakeClient,
    make_config,
    task_data,
)
from tests.device.scripted_server import (
    Drop,
    Hang,
    Reply,
    ScriptedServer,
    download_reply,
    envelope,
    error_byte_reply,
    json_reply,
    raw_response,
    whole_file_reply,
)

pytestmark = pytest.mark.anyio

SIGN = "4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"


def essentials(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """What must match the C SDK: request line, the headers OneNET reads (names as sent), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("Authorization", "Content-Type", "Range"):
            headers[name] = value.strip()
    return request_line, headers, body


# -- the whole upgrade, byte for byte against the C SDK -----------------------------------------


async def test_full_upgrade_matches_the_c_sdk_captures(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    # The captures' run (Appendix C): token abc123, 4 KiB chunks, 101 then 201.
    server.add(
        envelope(0),
        envelope(0, data=task_data(token="abc123")),
        envelope(0),
        download_reply(FIRMWARE[0:4096], 0, 4095, 10000),
        envelope(0),
        download_reply(FIRMWARE[4096:8192], 4096, 8191, 10000),
        envelope(0),
        download_reply(FIRMWARE[8192:], 8192, 9999, 10000),
        envelope(0),
        envelope(0),
    )
    # The C SDK reports both versions (§6.1); with other_version set, so does this client.
    client = make_client(make_config(other_version="1.0.0"))

    await client("post_version")
    task = await client("check_task")
    package = b""
    for start in range(0, task.size, 4096):
        await client("check_token", task.token)
        package += await client("download_package", task.token, start, 4096)
    await client("report_status", task.token, StatusCode.DOWNLOADED)
    await client("report_status", task.token, StatusCode.UPGRADED)

    assert package == FIRMWARE
    captures = sorted(CAPTURES.glob("*.request.bin"))
    assert len(captures) == len(server.requests) == 10
    for recorded, capture in zip(server.requests, captures, strict=True):
        assert essentials(recorded.raw) == essentials(capture.read_bytes()), capture.name
    assert [event.kind for event in client.events] == [
        EventKind.POST_VERSION,
        EventKind.CHECK_TASK,
        *[EventKind.CHECK_TOKEN, EventKind.DOWNLOAD_PACKAGE] * 3,
        EventKind.REPORT_STATUS,
        EventKind.REPORT_STATUS,
    ]


async def test_keeps_the_connection_alive(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(envelope(0), envelope(0), envelope(0))
    client = make_client()
    for _ in range(3):
        await client("post_version")
    assert server.connections == 1


async def test_reconnects_when_the_server_closes_after_each_reply(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    # Like the C SDK's servers: close after every reply, with no Connection: close header (§10).
    ok = envelope(0)
    server.add(*[Reply(ok.data, close=True) for _ in range(8)])
    client = make_client()
    for _ in range(4):
        await client("check_token", TOKEN)
    assert server.connections >= 4


# -- requests, one endpoint at a time ------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "body"),
    [
        ({}, b'{"f_version":"1.0.0"}'),
        ({"type": TaskType.SOTA}, b'{"s_version":"1.0.0"}'),
        ({"other_version": "2.0"}, b'{"f_version":"1.0.0","s_version":"2.0"}'),
        ({"type": TaskType.SOTA, "other_version": "V7"}, b'{"f_version":"V7","s_version":"1.0.0"}'),
    ],
)
async def test_post_version_reports_its_types_key_or_both(
    make_client: MakeClient, server: ScriptedServer, changes: dict[str, Any], body: bytes
) -> None:
    server.add(envelope(0))
    client = make_client(make_config(**changes))
    assert await client("post_version") is None
    (request,) = server.requests
    assert request.method == "POST"
    assert request.target == "/ota/device/version?dev_id=987654321"
    assert request.header("Content-Type") == "application/json"
    assert request.header("Authorization") == VECTOR_3
    assert request.body == body
    (event,) = client.events
    assert isinstance(event, VersionPosted)
    assert event.endpoint is Endpoint.POST_VERSION
    assert event.reply == b'{"errno":0,"error":"succ"}'
    config = client.client.config
    assert (event.f_version, event.s_version) == (config.f_version, config.s_version)


@pytest.mark.parametrize(
    ("changes", "body"),
    [
        ({}, b'{"f_version":"1.0.1"}'),
        ({"type": TaskType.SOTA, "other_version": "F9"}, b'{"f_version":"F9","s_version":"1.0.1"}'),
    ],
)
async def test_post_version_of_a_newly_installed_version(
    make_client: MakeClient, server: ScriptedServer, changes: dict[str, Any], body: bytes
) -> None:
    server.add(envelope(0))
    client = make_client(make_config(**changes))
    await client("post_version", version="1.0.1")
    assert server.requests[0].body == body
    with pytest.raises(InvalidArgumentError, match="version"):
        await client("post_version", version="1.0.1 final")
    assert len(server.requests) == 1


async def test_query_version(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(
        envelope(0, data={"f_version": "1.0.0", "s_version": "2.1"}),
        envelope(0, data={}),
    )
    client = make_client()
    assert await client("query_version") == VersionInfo("1.0.0", "2.1")
    assert await client("query_version") == VersionInfo(None, None)
    assert [r.target for r in server.requests] == ["/ota/device/version?dev_id=987654321"] * 2
    assert {r.method for r in server.requests} == {"GET"}
    assert client.events == []  # E2 is not one of the C SDK's events


async def test_check_task_returns_every_field(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(envelope(0, data=task_data(type=2, ipPort="ota.example.net:80")))
    client = make_client()
    task = await client("check_task")
    assert task == TaskInfo(
        target="1.0.1",
        token=TOKEN,
        size=10000,
        md5=FIRMWARE_MD5,
        signal=10,
        power=20,
        retry=3,
        interval=1,
        kind=PackageKind.DIFF,
        ip_port="ota.example.net:80",
    )
    assert client.client.last_task == task
    (request,) = server.requests
    # The C SDK's order, dev_id last, values unencoded (§8.1).
    assert request.target == "/ota/south/check?type=1&version=1.0.0&cdn=true&dev_id=987654321"
    assert request.header("Content-Type") == "application/json"
    assert request.body == b""
    (event,) = client.events
    assert isinstance(event, TaskChecked)
    assert (event.endpoint, event.task) == (Endpoint.CHECK_TASK, task)


@pytest.mark.parametrize(
    ("changes", "query"),
    [
        ({"cdn": False}, "type=1&version=1.0.0&cdn=false&dev_id=987654321"),
        ({"type": 2, "version": "V2_0-rc.1"}, "type=2&version=V2_0-rc.1&cdn=true&dev_id=987654321"),
        (
            {"manuf": "001", "model": "00108"},
            "type=1&version=1.0.0&cdn=true&manuf=001&model=00108&dev_id=987654321",
        ),
        ({"model": "10201"}, "type=1&version=1.0.0&cdn=true&model=10201&dev_id=987654321"),
    ],
)  # fmt: skip
async def test_check_task_query(
    make_client: MakeClient, server: ScriptedServer, changes: dict[str, Any], query: str
) -> None:
    server.add(envelope(0, data=task_data()))
    client = make_client(make_config(**changes))
    await client("check_task")
    assert server.requests[0].query_string == query


async def test_tasking(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(envelope(0, data=task_data()))
    client = make_client(make_config(cdn=False))
    task = await client("tasking")
    assert task.token == TOKEN
    assert server.requests[0].target == "/ota/south/tasking?type=1&cdn=false&dev_id=987654321"
    (event,) = client.events
    assert isinstance(event, TaskChecked)
    assert event.endpoint is Endpoint.TASKING


async def test_check_token(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(envelope(0))
    client = make_client()
    assert await client("check_token", TOKEN) is None
    (request,) = server.requests
    assert request.method == "GET"
    assert request.target == f"/ota/south/download/{TOKEN}/check?dev_id=987654321"
    assert request.header("Authorization") == VECTOR_3
    assert client.events == [
        TokenChecked(Endpoint.CHECK_TOKEN, b'{"errno":0,"error":"succ"}', TOKEN)
    ]


@pytest.mark.parametrize("code", [0, 42, 100, *StatusCode])
async def test_report_status(make_client: MakeClient, server: ScriptedServer, code: int) -> None:
    server.add(envelope(0))
    client = make_client()
    await client("report_status", TOKEN, code)
    (request,) = server.requests
    assert request.target == f"/ota/south/device/download/{TOKEN}/progress?dev_id=987654321"
    assert request.body == b'{"step":%d}' % code
    (event,) = client.events
    assert isinstance(event, StatusReported)
    assert (event.endpoint, event.token, event.code) == (Endpoint.REPORT_PROGRESS, TOKEN, code)


async def test_report_result(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(envelope(0))
    client = make_client()
    await client("report_result", TOKEN, StatusCode.UPGRADE_MD5_MISMATCH)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.target == f"/ota/south/report?token={TOKEN}&dev_id=987654321"
    assert request.body == b'{"result":205}'
    (event,) = client.events
    assert isinstance(event, StatusReported)
    assert (event.endpoint, event.code) == (Endpoint.REPORT_RESULT, 205)


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_dev_info(make_client: MakeClient, server: ScriptedServer, method: str) -> None:
    server.add(envelope(0, data={"dev_id": "987654321"}), envelope(0, data={"dev_id": "42"}))
    # A device that does not know its dev_id yet: E9 needs none.
    client = make_client(make_config(dev_id=None))
    assert await client("dev_info", "dev01", method=method) == "987654321"
    assert await client("dev_info", "867530900000001", product_id="77") == "42"
    first, second = server.requests
    assert (first.method, first.target) == (method, "/ota/devInfo")
    assert first.header("Content-Type") == "application/json"
    assert first.body == b'{"pid":123123,"authInfo":"dev01"}'
    assert second.body == b'{"pid":77,"authInfo":"867530900000001"}'


async def test_without_dev_id_other_calls_fail_before_sending(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    client = make_client(make_config(dev_id=None))
    with pytest.raises(InvalidArgumentError, match="dev_id") as info:
        await client("check_task")
    assert info.value.endpoint is Endpoint.CHECK_TASK
    assert server.requests == []


# -- downloads -----------------------------------------------------------------------------------


async def test_download_range_clamped_last_chunk(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(envelope(0, data=task_data()), download_reply(FIRMWARE[8192:], 8192, 9999, 10000))
    client = make_client()
    await client("check_task")
    chunk = await client("download_range", TOKEN, 8192, 4096)
    assert chunk == DownloadedChunk(FIRMWARE[8192:], 8192, 9999, 10000, partial=True)
    request = server.requests[1]
    assert request.target == f"/ota/south/download/{TOKEN}"
    # Unit-less Range (§10), Authorization as the C SDK sends it, no Content-Type (§6.6).
    assert request.header("Range") == "8192-12287"
    assert request.header("Authorization") == VECTOR_3
    assert request.header("Content-Type") is None
    event = client.events[-1]
    assert isinstance(event, PackageDownloaded)
    assert (event.token, event.chunk) == (TOKEN, chunk)


async def test_whole_file_reply_is_placed_at_zero(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    small = FIRMWARE[:100]
    server.add(whole_file_reply(small), whole_file_reply(small), whole_file_reply(small))
    client = make_client()
    chunk = await client("download_range", TOKEN, 50, 4096)
    assert chunk == DownloadedChunk(small, 0, 99, 100, partial=False)
    assert await client("download_package", TOKEN, 0, 4096) == small
    # Bare bytes cannot say they start at 0 rather than at 50: refuse rather than misplace them.
    with pytest.raises(ProtocolError, match="not from the requested 50"):
        await client("download_package", TOKEN, 50, 4096)


async def test_download_restarted_at_zero_past_eof(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    # §6.6.2: a start past EOF is reset to 0; §10: place the bytes where Content-Range says.
    server.add(download_reply(FIRMWARE[:100], 0, 99, 100))
    chunk = await make_client()("download_range", TOKEN, 200, 4096)
    assert (chunk.start, chunk.end, chunk.total, chunk.data) == (0, 99, 100, FIRMWARE[:100])


async def test_download_goes_to_ip_port_without_authorization(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    with ScriptedServer() as cdn:
        server.add(
            envelope(0, data=task_data(ipPort=cdn.host_port)),
            envelope(0),
            envelope(0, data=task_data(token="ota_other")),
            download_reply(FIRMWARE[:4096], 0, 4095, 10000),
        )
        cdn.add(download_reply(FIRMWARE[:4096], 0, 4095, 10000))
        client = make_client()
        await client("check_task")
        await client("check_token", TOKEN)
        assert await client("download_package", TOKEN, 0, 4096) == FIRMWARE[:4096]
        # A new task without ipPort: back to the API host.
        await client("check_task")
        assert await client("download_package", "ota_other", 0, 4096) == FIRMWARE[:4096]
        (cdn_request,) = cdn.requests
        await client.close()  # before the cdn server stops
    assert cdn_request.target == f"/ota/south/download/{TOKEN}"
    assert cdn_request.header("Range") == "0-4095"
    assert cdn_request.header("Authorization") is None  # D5: the path token is the credential
    assert [r.path for r in server.requests] == [
        "/ota/south/check",
        f"/ota/south/download/{TOKEN}/check",
        "/ota/south/check",
        "/ota/south/download/ota_other",
    ]


@pytest.mark.parametrize("code", range(1, 7))
@pytest.mark.parametrize("form", ["raw-chunked", "raw-close-delimited", "ascii-chunked"])
async def test_one_byte_download_errors(
    make_client: MakeClient, server: ScriptedServer, code: int, form: str
) -> None:
    body = bytes([0x30 + code]) if form.startswith("ascii") else bytes([code])
    server.add(error_byte_reply(body, chunked=form.endswith("chunked")))
    client = make_client()
    with pytest.raises(DownloadError) as info:
        await client("download_package", TOKEN, 0, 4096)
    assert info.value.code == code
    assert info.value.reason is DownloadErrorCode(code)
    assert info.value.endpoint is Endpoint.DOWNLOAD
    assert str(info.value).startswith(f"E6 download package: download error {code}: ")
    assert client.events == []


def _chunked(body: bytes, headers: str = "") -> Reply:
    size = f"{len(body):x}".encode()
    head = f"HTTP/1.1 200 OK\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode()
    return Reply(head + size + b"\r\n" + body + b"\r\n0\r\n\r\n")


def _partial(content_range: str, body: bytes, *, status: int = 206) -> Reply:
    return Reply(raw_response(status, body, [("Content-Range", content_range)]))


BAD_DOWNLOADS: dict[str, tuple[Reply, str]] = {
    "two bytes without Content-Length": (_chunked(b"\x03\x03"), "not a one-byte error code"),
    "byte 7 without Content-Length": (_chunked(b"\x07"), "not a one-byte error code"),
    "byte 0 without Content-Length": (_chunked(b"\x00"), "not a one-byte error code"),
    "ASCII 7 without Content-Length": (_chunked(b"7"), "not a one-byte error code"),
    "data without Content-Length": (_chunked(FIRMWARE[:4096]), "not a one-byte error code"),
    "empty without Content-Length": (Reply(b"HTTP/1.1 200 OK\r\n\r\n", close=True), "not a one"),
    "whole file for a range": (whole_file_reply(FIRMWARE), "announced 10000 bytes for a 4096"),
    "another range": (_partial("bytes 0-4095/10000", FIRMWARE[:4096]), "served 0-4095"),
    "a shorter range": (_partial("bytes 4096-6143/10000", FIRMWARE[4096:6144]), "clamp gives"),
    "Content-Length below the range": (
        _partial("bytes 4096-8191/10000", FIRMWARE[4096:4196]),
        "Content-Range 4096-8191 is 4096 bytes but Content-Length says 100",
    ),
    "206 without Content-Range": (
        Reply(raw_response(206, FIRMWARE[4096:8192])),
        "206 reply without Content-Range",
    ),
    "Content-Range without total": (_partial("bytes 4096-8191", FIRMWARE[4096:8192]), "malformed"),
    "Content-Range without unit": (_partial("4096-8191/10000", FIRMWARE[4096:8192]), "malformed"),
    "Content-Range inverted": (_partial("bytes 8191-4096/10000", b"x" * 4096), "malformed"),
    "Content-Range unknown total": (_partial("bytes 4096-8191/*", FIRMWARE[4096:8192]), "size"),
    "empty whole file": (Reply(raw_response(200, b"")), "download reply is empty"),
    "Content-Length lies": (
        Reply(raw_response(206, b"", [("Content-Range", "bytes 4096-8191/10000")])[:-2]
              .replace(b"Content-Length: 0", b"Content-Length: 4096") + b"\r\n" + b"x" * 100,
              close=True),
        "does not match its framing",
    ),
    "compressed": (
        Reply(raw_response(206, gzip.compress(FIRMWARE[4096:8192]),
                           [("Content-Encoding", "gzip"),
                            ("Content-Range", "bytes 4096-8191/10000")])),
        "compressed",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_DOWNLOADS)
async def test_bad_download_replies_are_protocol_errors(
    make_client: MakeClient, server: ScriptedServer, case: str
) -> None:
    reply, message = BAD_DOWNLOADS[case]
    server.add(reply)
    client = make_client()
    with pytest.raises(ProtocolError, match=message) as info:
        await client("download_range", TOKEN, 4096, 4096)
    assert info.value.code == -3
    assert info.value.endpoint is Endpoint.DOWNLOAD
    assert str(info.value).startswith("E6 download package: ")
    assert client.events == []


async def test_download_total_must_match_the_task_size(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(envelope(0, data=task_data()), download_reply(b"y" * 4096, 0, 4095, 20000))
    client = make_client()
    await client("check_task")
    with pytest.raises(ProtocolError, match="gave its size as 10000"):
        await client("download_range", TOKEN, 0, 4096)


# -- platform errors -----------------------------------------------------------------------------

NONZERO_ERRNOS = [errno for errno in Errno if errno is not Errno.SUCC]


@pytest.mark.parametrize("errno", NONZERO_ERRNOS)
async def test_every_errno_raises_its_class(
    make_client: MakeClient, server: ScriptedServer, errno: Errno
) -> None:
    server.add(envelope(errno))
    client = make_client()
    with pytest.raises(PlatformError) as info:
        await client("check_task")
    error = info.value
    assert type(error) is ERRNO_EXCEPTIONS[errno]
    assert (error.code, error.errno, error.text) == (errno, errno, errno.text)
    assert error.endpoint is Endpoint.CHECK_TASK
    assert str(error) == f"E3 check task: errno {int(errno)}: {errno.text}"
    assert client.events == []


OPERATIONS: dict[str, tuple[str, tuple[Any, ...], Endpoint]] = {
    "post_version": ("post_version", (), Endpoint.POST_VERSION),
    "query_version": ("query_version", (), Endpoint.QUERY_VERSION),
    "check_task": ("check_task", (), Endpoint.CHECK_TASK),
    "tasking": ("tasking", (), Endpoint.TASKING),
    "check_token": ("check_token", (TOKEN,), Endpoint.CHECK_TOKEN),
    "report_status": ("report_status", (TOKEN, 101), Endpoint.REPORT_PROGRESS),
    "report_result": ("report_result", (TOKEN, 201), Endpoint.REPORT_RESULT),
    "dev_info": ("dev_info", ("dev01",), Endpoint.DEV_INFO),
}


@pytest.mark.parametrize(
    ("operation", "errno", "cls"),
    [
        ("post_version", 1, AuthFailed),
        ("query_version", 1, AuthFailed),
        ("check_task", 11, NoTask),
        ("tasking", 12, TokenExpired),
        ("check_token", 12, TokenExpired),
        ("check_token", 22, TaskCancelled),
        ("report_status", 20, TaskFinished),
        ("report_result", 24, PlatformError),
        ("dev_info", 1, AuthFailed),
    ],
)
async def test_errnos_on_every_json_endpoint(
    make_client: MakeClient,
    server: ScriptedServer,
    operation: str,
    errno: int,
    cls: type[PlatformError],
) -> None:
    method, args, endpoint = OPERATIONS[operation]
    server.add(envelope(errno))
    with pytest.raises(cls) as info:
        await make_client()(method, *args)
    assert type(info.value) is cls
    assert info.value.endpoint is endpoint
    assert info.value.code == errno


async def test_unknown_errno_and_missing_text(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(json_reply({"errno": 99, "error": "new in 2030"}), json_reply({"errno": 12}))
    client = make_client()
    with pytest.raises(PlatformError) as info:
        await client("check_token", TOKEN)
    assert type(info.value) is PlatformError
    assert (info.value.code, info.value.text) == (99, "new in 2030")
    with pytest.raises(TokenExpired, match="errno 12: token expired"):
        await client("check_token", TOKEN)


# -- malformed JSON replies ------------------------------------------------------------------------

BIG = b'{"errno":0,"error":"' + b"x" * 70000 + b'"}'
BAD_JSON: dict[str, tuple[Reply, str]] = {
    "not JSON": (json_reply(b"<html>busy</html>"), "not JSON"),
    "not UTF-8": (json_reply(b'{"errno":0,"error":"\xff"}'), "not JSON"),
    "empty": (json_reply(b""), "not JSON"),
    "an array": (json_reply(b"[0]"), "not a JSON object"),
    "no errno": (json_reply({"error": "succ"}), "no integer 'errno'"),
    "errno a string": (json_reply({"errno": "0"}), "no integer 'errno'"),
    "errno a bool": (json_reply({"errno": False}), "no integer 'errno'"),
    "errno a float": (json_reply(b'{"errno":0.0}'), "no integer 'errno'"),
    "errno negative": (json_reply({"errno": -3}), "negative errno"),
    "error a number": (json_reply({"errno": 0, "error": 0}), "'error' is not a string"),
    "data a list": (json_reply({"errno": 0, "data": []}), "'data' is not an object"),
    "no data": (envelope(0), "no 'data'"),
    "target a number": (envelope(0, data=task_data(target=101)), "'target'"),
    "token missing": (envelope(0, data=task_data(token=None)), "'token'"),
    "token with a slash": (envelope(0, data=task_data(token="a/b")), "'token'"),
    "size a string": (envelope(0, data=task_data(size="10000")), "'size'"),
    "size a bool": (envelope(0, data=task_data(size=True)), "'size'"),
    "size zero": (envelope(0, data=task_data(size=0)), "'size'"),
    "md5 not hex": (envelope(0, data=task_data(md5="z" * 32)), "'md5'"),
    "signal beyond int32": (envelope(0, data=task_data(signal=2**31)), "'signal'"),
    "retry a float": (envelope(0, data=task_data(retry=1.5)), "'retry'"),
    "type 3": (envelope(0, data=task_data(type=3)), "'type'"),
    "ipPort a number": (envelope(0, data=task_data(ipPort=8080)), "'ipPort'"),
    "ipPort too long": (envelope(0, data=task_data(ipPort="a" * 40)), "'ipPort'"),
    "too large": (json_reply(BIG), "larger than 65536 bytes"),
    "too large, chunked": (_chunked(BIG), "larger than 65536 bytes"),
    "compressed": (
        Reply(raw_response(200, gzip.compress(b'{"errno":0}'), [("Content-Encoding", "gzip")])),
        "compressed",
    ),
    "Content-Length lies": (
        Reply(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"errno":0}', close=True),
        "does not match its framing",
    ),
    "not HTTP": (Reply(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", close=True), "not valid HTTP/1.1"),
}


@pytest.mark.parametrize("case", BAD_JSON)
async def test_bad_json_replies_are_protocol_errors(
    make_client: MakeClient, server: ScriptedServer, case: str
) -> None:
    reply, message = BAD_JSON[case]
    server.add(reply)
    client = make_client()
    with pytest.raises(ProtocolError, match=message) as info:
        await client("check_task")
    assert info.value.code == -3
    assert info.value.endpoint is Endpoint.CHECK_TASK
    assert str(info.value).startswith("E3 check task: ")
    assert client.events == []
    assert client.client.last_task is None


@pytest.mark.parametrize(
    ("operation", "data", "message"),
    [
        ("query_version", {"f_version": 1}, "'f_version'"),
        ("query_version", {"s_version": ""}, "'s_version'"),
        ("dev_info", {"dev_id": 987654321}, "'dev_id'"),
        ("dev_info", {"dev_id": "98765x"}, "'dev_id'"),
        ("dev_info", {}, "'dev_id'"),
    ],
)
async def test_bad_data_of_other_endpoints(
    make_client: MakeClient, server: ScriptedServer, operation: str, data: Any, message: str
) -> None:
    method, args, endpoint = OPERATIONS[operation]
    server.add(envelope(0, data=data))
    with pytest.raises(ProtocolError, match=message) as info:
        await make_client()(method, *args)
    assert info.value.endpoint is endpoint


@pytest.mark.parametrize("status", [301, 400, 404, 405, 413, 500, 503])
@pytest.mark.parametrize("operation", ["check_task", "download_package"])
async def test_non_2xx_is_an_http_status_error(
    make_client: MakeClient, server: ScriptedServer, status: int, operation: str
) -> None:
    headers = [("Location", "http://elsewhere.example/")] if status == 301 else []
    server.add(Reply(raw_response(status, b"", headers)))
    client = make_client()
    args = (TOKEN, 0, 4096) if operation == "download_package" else ()
    with pytest.raises(HTTPStatusError) as info:
        await client(operation, *args)
    assert info.value.code == info.value.status_code == status
    assert len(server.requests) == 1  # no redirect followed (D20)


async def test_surplus_bytes_after_content_length_fail_the_next_call_only(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    # Like the C SDK, the client stops at Content-Length (§8.2 item 5); the surplus is still on
    # the connection and breaks the next reply read from it, which the client then drops.
    server.add(
        Reply(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"errno":0}JUNK'),
        envelope(0),
        envelope(0),
    )
    client = make_client()
    await client("check_token", TOKEN)
    with pytest.raises(ProtocolError, match=r"not valid HTTP/1\.1"):
        await client("check_token", TOKEN)
    await client("check_token", TOKEN)
    assert server.connections == 2


# -- transport failures and timeouts --------------------------------------------------------------


async def test_connection_refused(make_client: MakeClient) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    client = make_client(base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(TransportError) as info:
        await client("post_version")
    assert type(info.value) is TransportError
    assert info.value.code == -11
    assert info.value.endpoint is Endpoint.POST_VERSION
    assert isinstance(info.value.__cause__, client.connect_error)


async def test_closed_without_reply_is_retried_once(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(Drop(), envelope(0), Drop(), Drop())
    client = make_client()
    await client("report_status", TOKEN, 101)  # the retry on a new connection succeeds
    with pytest.raises(TransportError, match="closed the connection without replying") as info:
        await client("report_status", TOKEN, 201)
    assert info.value.code == -11
    assert len(server.requests) == 4


async def test_no_reply_times_out(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(Hang())
    client = make_client(timeout=60_000)
    with pytest.raises(RequestTimeout, match="timed out after 200 ms") as info:
        await client("check_task", timeout_ms=200)
    assert isinstance(info.value, TransportError)
    assert info.value.code == -13
    assert isinstance(info.value.__cause__, client.timeout_error)
    assert len(server.requests) == 1  # a timeout is never retried


async def test_client_default_timeout(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(Hang())
    with pytest.raises(RequestTimeout, match="150 ms"):
        await make_client(timeout=150)("check_token", TOKEN)


async def test_body_short_of_its_content_length_times_out(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    server.add(Reply(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"errno":0}'))
    with pytest.raises(RequestTimeout):
        await make_client()("check_task", timeout_ms=200)


async def test_a_trickling_reply_is_cut_at_the_deadline(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    # Each byte arrives well within the read timeout; the whole call does not.
    head = raw_response(206, b"", [("Content-Range", "bytes 0-99/100")])
    head = head.replace(b"Content-Length: 0", b"Content-Length: 100")
    server.add(Reply(head + b"x", more=(b"x",) * 99, gap=0.05))
    with pytest.raises(RequestTimeout, match="no complete reply within 300 ms"):
        await make_client()("download_range", TOKEN, 0, 100, timeout_ms=300)


# -- invalid arguments: refused before anything is sent ------------------------------------------

INVALID_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("download_package", (TOKEN, 0, 0), {}),
    ("download_package", (TOKEN, 0, 1), {}),
    ("download_package", (TOKEN, 0, -4096), {}),
    ("download_package", (TOKEN, 0, True), {}),
    ("download_package", (TOKEN, 0, 4096.0), {}),
    ("download_package", (TOKEN, 0, 2**31), {}),
    ("download_range", (TOKEN, -1, 4096), {}),
    ("download_range", (TOKEN, 2**31, 4096), {}),
    ("download_range", ("", 0, 4096), {}),
    ("download_range", ("a/b", 0, 4096), {}),
    ("download_range", ("with space", 0, 4096), {}),
    ("check_token", ("",), {}),
    ("check_token", ("tok\r\nX: y",), {}),
    ("report_status", (TOKEN, -1), {}),
    ("report_status", (TOKEN, 108), {}),
    ("report_status", (TOKEN, 150), {}),
    ("report_status", (TOKEN, 200), {}),
    ("report_status", (TOKEN, 209), {}),
    ("report_status", (TOKEN, True), {}),
    ("report_status", (TOKEN, "101"), {}),
    ("report_result", (TOKEN, 50), {}),
    ("report_result", (TOKEN, 100), {}),
    ("report_result", (TOKEN, 300), {}),
    ("check_task", (), {"timeout_ms": 0}),
    ("check_task", (), {"timeout_ms": True}),
    ("dev_info", ("",), {}),
    ("dev_info", ("dev01",), {"product_id": "abc"}),
    ("dev_info", ("dev01",), {"method": "PUT"}),
]


@pytest.mark.parametrize(("method", "args", "kwargs"), INVALID_CALLS)
async def test_invalid_arguments_fail_before_any_request(
    make_client: MakeClient,
    server: ScriptedServer,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    client = make_client()
    with pytest.raises(InvalidArgumentError) as info:
        await client(method, *args, **kwargs)
    assert info.value.code == -2
    assert isinstance(info.value, ValueError)
    assert server.requests == []


# -- lifecycle, injection, TLS ----------------------------------------------------------------


async def test_closed_client_refuses_calls(make_client: MakeClient, server: ScriptedServer) -> None:
    client = make_client()
    await client.close()
    await client.close()  # idempotent
    assert client.client.closed
    with pytest.raises(ClientClosedError) as info:
        await client("post_version")
    assert info.value.code == -5
    assert server.requests == []


async def test_injected_http_client_is_used_and_left_open(server: ScriptedServer) -> None:
    server.add(envelope(0), envelope(0))
    with httpx2.Client(headers={"X-Fleet": "a"}, verify=False) as http:
        with OtaClient(make_config(), base_url=server.url, http_client=http) as client:
            client.post_version()
        assert not http.is_closed
    closed = httpx2.Client(verify=False)
    closed.close()
    with pytest.raises(ClientClosedError, match="injected"):
        OtaClient(make_config(), base_url=server.url, http_client=closed).post_version()
    async with httpx2.AsyncClient(verify=False) as ahttp:
        async with AsyncOtaClient(make_config(), base_url=server.url, http_client=ahttp) as aclient:
            await aclient.post_version()
        assert not ahttp.is_closed
    assert server.requests[0].header("X-Fleet") == "a"


def test_wrong_injected_client_or_tls_options() -> None:
    with httpx2.Client() as http, pytest.raises(InvalidArgumentError, match="AsyncClient"):
        AsyncOtaClient(make_config(), http_client=http)  # type: ignore[arg-type]
    with httpx2.Client() as http, pytest.raises(InvalidArgumentError, match="injected"):
        OtaClient(make_config(), http_client=http, verify=False)
    with pytest.raises(InvalidArgumentError, match="base_url"):
        OtaClient(make_config(), base_url="ftp://ota.heclouds.com")
    with pytest.raises(InvalidArgumentError, match=r"Timeout\.ms"):
        OtaClient(make_config(), timeout=0)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(tls_ca: trustme.CA) -> Iterator[ScriptedServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    with ScriptedServer(ssl_context=context) as srv:
        yield srv


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


async def test_tls_with_a_ca_file(
    make_client: MakeClient, tls_server: ScriptedServer, ca_file: Path
) -> None:
    tls_server.add(envelope(0))
    client = make_client(base_url=tls_server.url, ca_file=ca_file)
    await client("post_version")
    await client.close()
    assert tls_server.requests[0].header("Authorization") == VECTOR_3


async def test_tls_verifies_by_default(make_client: MakeClient, tls_server: ScriptedServer) -> None:
    client = make_client(base_url=tls_server.url)
    with pytest.raises(TransportError) as info:
        await client("post_version")
    await client.close()
    assert isinstance(info.value.__cause__, client.connect_error)
    assert tls_server.requests == []


async def test_tls_verification_can_be_off(
    make_client: MakeClient, tls_server: ScriptedServer
) -> None:
    tls_server.add(envelope(0))
    client = make_client(base_url=tls_server.url, verify=False)
    await client("post_version")
    await client.close()


def test_an_async_tls_connection_the_server_closes_logs_no_warning(
    tls_server: ScriptedServer, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    succ = {"errno": 0, "error": "succ"}
    tls_server.add(json_reply(succ, close=True), json_reply(succ, close=True))

    async def scenario() -> None:
        async with AsyncOtaClient(make_config(), base_url=tls_server.url, ca_file=ca_file) as c:
            await c.post_version()
            await c.post_version()  # the kept connection was closed: sent on a new one

    asyncio.run(scenario())
    assert len(tls_server.requests) >= 2
    # A TLS transport closes on the server's end however the protocol answers eof_received;
    # asking it to stay open only logs a warning for every connection the server closed.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_unreadable_ca_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="CA file"):
        OtaClient(make_config(), ca_file=tmp_path / "missing.pem")


# -- events and credentials -------------------------------------------------------------------


async def test_async_client_accepts_an_async_callback(server: ScriptedServer) -> None:
    seen: list[Any] = []

    async def on_event(event: Any) -> None:
        seen.append(event)

    server.add(envelope(0, data=task_data()))
    async with AsyncOtaClient(make_config(), base_url=server.url, on_event=on_event) as client:
        task = await client.check_task()
    assert [getattr(e, "task", None) for e in seen] == [task]


async def test_callback_errors_propagate(make_client: MakeClient, server: ScriptedServer) -> None:
    def on_event(event: Any) -> None:
        raise LookupError("full")

    server.add(envelope(0))
    with pytest.raises(LookupError, match="full"):
        await make_client(on_event=on_event)("post_version")


async def test_the_authorization_value_never_leaks(
    make_client: MakeClient, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.add(envelope(1), json_reply(b"nope"), Drop(), Drop())
    client = make_client()
    errors: list[Exception] = []
    for _ in range(3):
        try:
            await client("check_task")
        except Exception as exc:  # collecting every error to inspect its text
            errors.append(exc)
    assert len(errors) == 3
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [repr(client.client), repr(client.client.config), caplog.text]
    for text in texts:
        assert SIGN not in text
        assert "4+7IKBIL5vNCYd9mzZZg40vs9vc=" not in text


async def test_a_ready_authorization_value(make_client: MakeClient, server: ScriptedServer) -> None:
    server.add(envelope(0))
    value = "version=2018-10-31&res=products/123123&et=2524579200&method=sha1&sign=raw+form="
    await make_client(make_config(credentials=Credentials(value)))("post_version")
    assert server.requests[0].header("Authorization") == value

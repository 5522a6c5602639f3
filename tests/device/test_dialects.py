"""Both clients, sync and async, speaking Studio (§12) and fuse (§13) to the scripted server.

Golden requests: Studio's are compared with the official C SDK's things-model captures where this
SDK is meant to match them (request line, Authorization, Content-Type, body); the two places it
differs on purpose are asserted as such (§13.7: ``Range: bytes=s-e``; the download path without
the C SDK's trailing slash, which the server accepts, §12.2). Fuse's are fixed bytes of §13.1
and §13.3. Every malformed or error reply of §12.3, §13.4-§13.5 and §13.7 is then answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.device import (
    AuthFailed,
    Credentials,
    DeviceConfig,
    Dialect,
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    NoTask,
    NoValidToken,
    PlatformError,
    ProtocolError,
    StatusReported,
    TaskCancelled,
    TaskChecked,
    TaskFinished,
    TaskSucceeded,
    TaskType,
    TidTaskInfo,
    TokenChecked,
)
from onenet_ota.device._core import Call, ClientCore, Head
from onenet_ota.device.config import Timeout
from onenet_ota.device.errors import VERDICT_EXCEPTIONS, platform_error
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.protocol import codes
from onenet_ota.protocol.codes import Operation, OtaErrno, Verdict
from onenet_ota.protocol.dialects import EndpointSpec, endpoint
from tests.device.conftest import FIRMWARE, FIRMWARE_MD5, K1, MakeClient
from tests.device.scripted_server import (
    Reply,
    ScriptedServer,
    dialect_download,
    dialect_download_error,
    envelope,
    fuse_envelope,
    raw_response,
)

pytestmark = pytest.mark.anyio

THINGS = Path(__file__).resolve().parents[1] / "data" / "c-sdk-captures-things-model"
TID = 4242
# §13.3, Appendix B.1's K1: the device-level 2022-05-01 token (fuse's default, §13.7) and the
# account token for uid 4242. Signs re-derived by hand with hmac/base64 outside this SDK.
FUSE_DEVICE_TOKEN = (
    "version=2022-05-01&res=products%2F123123%2Fdevices%2Fdev01&et=2524579200&method=sha1"
    "&sign=UxEOOa%2FOFb0v6LnKbbQ0Nh7IyMg%3D"
)
USER_TOKEN = (
    "version=2022-05-01&res=userid%2F4242&et=2524579200&method=sha1"
    "&sign=ERjbr9MnPBIXnyI1pqo%2BxyMfzbQ%3D"
)
# Appendix B.1 vector 4: the C SDK's Studio token (device level, sha1, 2018-10-31).
STUDIO_TOKEN = (
    "version=2018-10-31&res=products%2F123123%2Fdevices%2Fdev01&et=2524579200&method=sha1"
    "&sign=37MTwnM8%2Fn9AhfAk1EWPEevSNIc%3D"
)


def dialect_config(dialect: Dialect, **changes: Any) -> DeviceConfig:
    """The things-model captures' device: pid 123123, dev01, K1, FOTA 1.0.0 (and s 1.0.0)."""
    values: dict[str, Any] = {
        "credentials": Credentials.for_dialect(dialect, "123123", K1, device_name="dev01"),
        "dev_id": None,
        "version": "1.0.0",
        "other_version": "1.0.0",
        "type": TaskType.FOTA,
        "dialect": dialect,
        "product_id": "123123",
        "device_name": "dev01",
    }
    values.update(changes)
    return DeviceConfig(**values)


def tid_task(**changes: Any) -> dict[str, Any]:
    """S-C/F-C ``data`` for the captures' package (§12.2, §13.1)."""
    data: dict[str, Any] = {
        "target": "1.0.1",
        "tid": TID,
        "size": len(FIRMWARE),
        "md5": FIRMWARE_MD5,
        "status": 1,
        "type": 1,
    }
    data.update(changes)
    return data


def ok(dialect: Dialect, data: Any = None) -> Reply:
    return envelope(0, data=data) if dialect is Dialect.STUDIO else fuse_envelope(0, data=data)


def capture(name: str) -> tuple[str, dict[str, str], bytes]:
    """(request line, headers by lower-case name, body) of one things-model capture."""
    raw = (THINGS / name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {}
    for field in fields:
        name_, _, value = field.partition(":")
        headers[name_.lower()] = value.strip()
    return line, headers, body


def line_of(server: ScriptedServer, index: int) -> str:
    request = server.requests[index]
    return f"{request.method} {request.target} HTTP/1.1"


BOTH = pytest.mark.parametrize("dialect", [Dialect.STUDIO, Dialect.FUSE], ids=lambda d: d.value)


# -- configuration ---------------------------------------------------------------------------


def test_default_tokens_follow_13_7() -> None:
    """Studio's default is the C SDK's token (B.1 vector 4); fuse's the 2022-05-01 one."""
    studio = Credentials.for_dialect(Dialect.STUDIO, "123123", K1, device_name="dev01")
    fuse = Credentials.for_dialect(Dialect.FUSE, "123123", K1, device_name="dev01")
    assert studio.authorization == STUDIO_TOKEN
    assert fuse.authorization == FUSE_DEVICE_TOKEN
    assert Credentials.from_user_key("4242", K1).authorization == USER_TOKEN
    legacy = Credentials.from_user_key("4242", K1, version="2018-10-31").authorization
    assert legacy.startswith("version=2018-10-31&res=userid%2F4242&")


@BOTH
@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"device_name": None}, "device_name"),
        ({"device_name": "dev/01"}, "device_name"),
        ({"product_id": None}, "product_id"),
        ({"product_id": "12-3"}, "product_id"),
    ],
)
def test_new_dialects_need_the_device_in_the_path(
    dialect: Dialect, changes: dict[str, Any], needle: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        dialect_config(dialect, **changes)


def test_studio_refuses_the_reserved_pids() -> None:
    """S1: Studio's pid never takes south, device or devInfo; fuse's prefix has no such rule."""
    with pytest.raises(InvalidArgumentError, match="reserved"):
        dialect_config(Dialect.STUDIO, product_id="south")
    assert dialect_config(Dialect.FUSE, product_id="south").product_id == "south"


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="dialect must be one of"):
        DeviceConfig(
            credentials=Credentials(STUDIO_TOKEN),
            dev_id=None,
            version="1.0.0",
            dialect="things",  # type: ignore[arg-type]
            product_id="123123",
            device_name="dev01",
        )


# -- golden requests -------------------------------------------------------------------------


async def test_studio_requests_match_the_c_sdk_captures(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(
        ok(Dialect.STUDIO),
        ok(Dialect.STUDIO, tid_task()),
        ok(Dialect.STUDIO, {"status": 2}),
        dialect_download(Dialect.STUDIO, FIRMWARE[:4096], 0, 4095, len(FIRMWARE)),
        ok(Dialect.STUDIO),
    )
    client = make_client(dialect_config(Dialect.STUDIO))
    await client("post_version")
    task = await client("check_tid_task")
    assert task == TidTaskInfo("1.0.1", TID, len(FIRMWARE), FIRMWARE_MD5, 1)
    assert await client("task_status", TID) == 2
    chunk = await client("download_range", TID, 0, 4096)
    assert chunk.data == FIRMWARE[:4096]
    await client("report_status", TID, 101)

    names = [
        "01_post_version.request.bin",
        "02_check_task.request.bin",
        "03_check_token.request.bin",
        "04_download_0-4095.request.bin",
        "09_report_status.request.bin",
    ]
    for index, name in enumerate(names):
        line, headers, body = capture(name)
        request = server.requests[index]
        assert request.header("Authorization") == headers["authorization"], name
        assert request.body == body, name
        if name.startswith("04"):
            # §13.7 on purpose: the bytes= unit, and the path without the C SDK's "/".
            assert line == "GET /ota/123123/dev01/4242/download/ HTTP/1.1"
            assert line_of(server, index) == "GET /ota/123123/dev01/4242/download HTTP/1.1"
            assert request.header("Range") == "bytes=0-4095"
            assert headers["range"] == "0-4095"
            assert request.header("Content-Type") is None  # as the capture: no Content-Type
        else:
            assert line_of(server, index) == line, name
            assert request.header("Content-Type") == headers["content-type"], name
    assert [type(e) for e in client.events] == [
        type(client.events[0]),
        TaskChecked,
        TokenChecked,
        type(client.events[3]),
        StatusReported,
    ]
    checked = client.events[2]
    assert isinstance(checked, TokenChecked)
    assert (checked.tid, checked.status) == (TID, 2)


async def test_fuse_requests_are_the_spec_s(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(
        ok(Dialect.FUSE),
        ok(Dialect.FUSE, {"f_version": "1.0.0", "s_version": "1.0.0"}),
        ok(Dialect.FUSE, tid_task()),
        ok(Dialect.FUSE, {"status": 2}),
        dialect_download(Dialect.FUSE, FIRMWARE[8192:], 8192, len(FIRMWARE) - 1, len(FIRMWARE)),
        ok(Dialect.FUSE),
    )
    client = make_client(dialect_config(Dialect.FUSE))
    await client("post_version")
    versions = await client("query_version")
    assert (versions.f_version, versions.s_version) == ("1.0.0", "1.0.0")
    await client("check_tid_task")
    assert await client("task_status", TID) == 2
    chunk = await client("download_range", TID, 8192, 4096)
    assert (chunk.start, chunk.end, chunk.data) == (8192, 9999, FIRMWARE[8192:])
    await client("report_status", TID, 201)

    expected = [
        (
            "POST /fuse-ota/123123/dev01/version HTTP/1.1",
            b'{"f_version":"1.0.0","s_version":"1.0.0"}',
        ),
        ("GET /fuse-ota/123123/dev01/version HTTP/1.1", b""),
        ("GET /fuse-ota/123123/dev01/check?type=1&version=1.0.0 HTTP/1.1", b""),
        ("GET /fuse-ota/123123/dev01/4242/check HTTP/1.1", b""),
        ("GET /fuse-ota/123123/dev01/4242/download HTTP/1.1", b""),
        ("POST /fuse-ota/123123/dev01/4242/status HTTP/1.1", b'{"step":201}'),
    ]
    for index, (line, body) in enumerate(expected):
        request = server.requests[index]
        assert line_of(server, index) == line
        assert request.body == body
        assert request.header("Authorization") == FUSE_DEVICE_TOKEN
    # §13.7: the end clamped to size-1 (9999), never the 12287 the C SDK asks for.
    assert server.requests[4].header("Range") == "bytes=8192-9999"


async def test_fuse_sends_an_account_token_when_configured(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(ok(Dialect.FUSE, tid_task()))
    config = dialect_config(Dialect.FUSE, credentials=Credentials.from_user_key("4242", K1))
    client = make_client(config)
    await client("check_tid_task")
    assert server.requests[0].header("Authorization") == USER_TOKEN


@BOTH
async def test_classic_only_operations_are_refused_before_sending(
    dialect: Dialect, server: ScriptedServer, make_client: MakeClient
) -> None:
    client = make_client(dialect_config(dialect))
    for operation, args in [
        ("check_task", ()),
        ("tasking", ()),
        ("check_token", ("abc",)),
        ("report_result", ("abc", 201)),
        ("dev_info", ("imei",)),
    ]:
        with pytest.raises(InvalidArgumentError, match=dialect.value):
            await client(operation, *args)
    with pytest.raises(InvalidArgumentError, match="tid"):
        await client("report_status", "a-token", 101)
    with pytest.raises(InvalidArgumentError, match="tid"):
        await client("download_range", 0, 0, 4096)
    assert server.requests == []


# -- error replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "operation", "args", "reply", "error", "code"),
    [
        (Dialect.STUDIO, "check_tid_task", (), envelope(10, "no task"), NoTask, 10),
        (Dialect.STUDIO, "task_status", (TID,), envelope(4), NoValidToken, 4),
        (Dialect.STUDIO, "task_status", (TID,), envelope(20), TaskFinished, 20),
        (Dialect.STUDIO, "report_status", (TID, 101), envelope(22), TaskCancelled, 22),
        (Dialect.STUDIO, "post_version", (), envelope(1), AuthFailed, 1),
        (Dialect.FUSE, "check_tid_task", (), fuse_envelope(12012), NoTask, 12012),
        (Dialect.FUSE, "check_tid_task", (), fuse_envelope(12013), TaskSucceeded, 12013),
        (Dialect.FUSE, "check_tid_task", (), fuse_envelope(10403), AuthFailed, 10403),
        (Dialect.FUSE, "task_status", (TID,), fuse_envelope(10403), AuthFailed, 10403),
        (Dialect.FUSE, "task_status", (TID,), fuse_envelope(12012), NoValidToken, 12012),
        (Dialect.FUSE, "task_status", (TID,), fuse_envelope(20), TaskFinished, 20),
        (Dialect.FUSE, "report_status", (TID, 101), fuse_envelope(12012), NoValidToken, 12012),
        (Dialect.FUSE, "report_status", (TID, 101), fuse_envelope(22), TaskCancelled, 22),
        (Dialect.FUSE, "post_version", (), fuse_envelope(10403), AuthFailed, 10403),
        (Dialect.FUSE, "query_version", (), fuse_envelope(5116, "x"), PlatformError, 5116),
    ],
)
async def test_envelope_codes_raise_the_named_error(
    dialect: Dialect,
    operation: str,
    args: tuple[Any, ...],
    reply: Reply,
    error: type[PlatformError],
    code: int,
    server: ScriptedServer,
    make_client: MakeClient,
) -> None:
    server.add(reply)
    client = make_client(dialect_config(dialect))
    with pytest.raises(error) as caught:
        await client(operation, *args)
    assert type(caught.value) is error
    assert caught.value.code == code
    assert caught.value.dialect is dialect
    spec = caught.value.endpoint
    assert isinstance(spec, EndpointSpec)
    assert spec.dialect is dialect
    assert str(caught.value).startswith(f"{spec.label} ")  # "F-C check task: ..."


async def test_fuse_error_text_says_code_and_the_spec_s_words(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(fuse_envelope(12013, ""))
    client = make_client(dialect_config(Dialect.FUSE))
    with pytest.raises(TaskSucceeded) as caught:
        await client("check_tid_task")
    assert str(caught.value) == "F-C check task: code 12013: task succ"


@pytest.mark.parametrize(
    ("dialect", "body"),
    [
        (Dialect.FUSE, b'{"errno":0,"error":"succ"}'),  # a classic envelope on fuse
        (Dialect.STUDIO, b'{"code":0,"msg":"succ","request_id":"x"}'),  # fuse's on Studio
        (Dialect.FUSE, b'{"code":"0","msg":"succ"}'),
        (Dialect.FUSE, b"[]"),
    ],
)
async def test_a_foreign_envelope_is_a_protocol_error(
    dialect: Dialect, body: bytes, server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(Reply(raw_response(200, body, [("Content-Type", "application/json")])))
    client = make_client(dialect_config(dialect))
    with pytest.raises(ProtocolError):
        await client("check_tid_task")


@BOTH
@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6])
async def test_ota_errno_is_a_download_error(
    dialect: Dialect, code: int, server: ScriptedServer, make_client: MakeClient
) -> None:
    """§12.3, F8: status 200, Ota-Errno N (and Studio's byte, fuse's JSON body)."""
    server.add(dialect_download_error(dialect, code))
    client = make_client(dialect_config(dialect))
    with pytest.raises(DownloadError) as caught:
        await client("download_range", TID, 0, 4096, package_size=len(FIRMWARE))
    assert caught.value.reason is OtaErrno(code)
    assert caught.value.code == code


@BOTH
async def test_ota_errno_wins_over_the_http_status(
    dialect: Dialect, server: ScriptedServer, make_client: MakeClient
) -> None:
    """§13.7: a non-zero Ota-Errno is an error whatever the status (here a 206 with data)."""
    headers = [("Ota-Errno", "5"), ("Content-Range", "bytes 0-3/10000")]
    server.add(
        Reply(raw_response(206, FIRMWARE[:4], headers)),
        Reply(raw_response(404, b"", [("Ota-Errno", "6")])),
    )
    client = make_client(dialect_config(dialect))
    for expected in (OtaErrno.NOT_DOWNLOADABLE, OtaErrno.AUTH_FAILED):
        with pytest.raises(DownloadError) as caught:
            await client("download_range", TID, 0, 4, package_size=len(FIRMWARE))
        assert caught.value.reason is expected


async def test_studio_error_byte_without_the_header_reads_the_new_table(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """§12.3: the one-byte body carries the same N, read with §13.5's table."""
    body = b"1\r\n\x02\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    server.add(Reply(head + b"Transfer-Encoding: chunked\r\n\r\n" + body))
    client = make_client(dialect_config(Dialect.STUDIO))
    with pytest.raises(DownloadError) as caught:
        await client("download_range", TID, 0, 4096, package_size=len(FIRMWARE))
    assert caught.value.reason is OtaErrno.FILE_NOT_FOUND


def _studio_206(start: int, end: int, served: tuple[str, str], data: bytes) -> Reply:
    return Reply(
        raw_response(
            206,
            data,
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Range-Start", served[0]),
                ("Content-Range-End", served[1]),
                ("Content-Range", f"bytes {start}-{end}/{len(FIRMWARE)}"),
            ],
        )
    )


@pytest.mark.parametrize(
    "reply",
    [
        # Content-Range-Start/End name another range than the one asked for (and served).
        _studio_206(100, 199, ("100", "199"), FIRMWARE[100:200]),
        # Start/End contradict Content-Range.
        _studio_206(0, 99, ("0", "98"), FIRMWARE[:100]),
        _studio_206(0, 99, ("x", "99"), FIRMWARE[:100]),
        # A 200 with the whole file answers a request for part of it.
        Reply(raw_response(200, FIRMWARE, [("Content-Type", "application/octet-stream")])),
        # A malformed Ota-Errno.
        Reply(raw_response(206, FIRMWARE[:100], [("Ota-Errno", "five")])),
        # An Ota-Errno §13.5 does not have.
        Reply(raw_response(200, b"", [("Ota-Errno", "9")])),
        # A package of another size than the task check gave.
        Reply(raw_response(206, FIRMWARE[:100], [("Content-Range", "bytes 0-99/20000")])),
    ],
)
async def test_malformed_download_replies_are_refused(
    reply: Reply, server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(reply)
    client = make_client(dialect_config(Dialect.STUDIO))
    with pytest.raises(ProtocolError):
        await client("download_range", TID, 0, 100, package_size=len(FIRMWARE))


async def test_fuse_whole_file_answers_a_whole_file_request(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(
        dialect_download(Dialect.FUSE, FIRMWARE, 0, len(FIRMWARE) - 1, len(FIRMWARE), partial=False)
    )
    client = make_client(dialect_config(Dialect.FUSE))
    chunk = await client("download_range", TID, 0, len(FIRMWARE), package_size=len(FIRMWARE))
    assert (chunk.data, chunk.partial) == (FIRMWARE, False)


async def test_http_error_without_ota_errno_is_an_http_error(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    server.add(Reply(raw_response(500, b"")))
    client = make_client(dialect_config(Dialect.FUSE))
    with pytest.raises(HTTPStatusError):
        await client("download_range", TID, 0, 100, package_size=len(FIRMWARE))


# -- property: the range grammar --------------------------------------------------------------


def _core(dialect: Dialect) -> ClientCore:
    return ClientCore(dialect_config(dialect), base_url="http://127.0.0.1:1", timeout=Timeout())


def _feed_all(call: Call[DownloadedChunk], head: Head, length: int) -> DownloadedChunk:
    reader = call.begin(head)
    reader.feed(b"\0" * length)
    return reader.finish().value


@given(
    dialect=st.sampled_from([Dialect.STUDIO, Dialect.FUSE]),
    total=st.integers(2, 50_000),
    data=st.data(),
)
def test_range_is_clamped_and_only_the_exact_range_is_accepted(
    dialect: Dialect, total: int, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, total - 1))
    size = data.draw(st.integers(2, 70_000))
    end = min(start + size, total) - 1
    call = _core(dialect).download(TID, start, size, package_size=total)
    assert call.request.header("Range") == f"bytes={start}-{end}"
    assert call.request.url.endswith(
        endpoint(dialect, Operation.DOWNLOAD).path(pid="123123", name="dev01", tid=TID)
    )
    served_start = data.draw(st.integers(0, total - 1))
    served_end = data.draw(st.integers(served_start, total - 1))
    length = served_end - served_start + 1
    head = Head(
        206,
        (
            ("Content-Length", str(length)),
            ("Content-Range", f"bytes {served_start}-{served_end}/{total}"),
        ),
    )
    if (served_start, served_end) == (start, end):
        assert _feed_all(call, head, length).start == start
    else:
        with pytest.raises(ProtocolError):
            _feed_all(call, head, length)


@given(tid=st.one_of(st.integers(-5, 0), st.integers(2**31, 2**40), st.booleans(), st.text()))
def test_a_tid_outside_its_grammar_is_refused(tid: object) -> None:
    core = _core(Dialect.FUSE)
    with pytest.raises(InvalidArgumentError):
        core.task_status(tid)  # type: ignore[arg-type]


@pytest.mark.parametrize("uid", ["0", "042", "-1", "12a", str(2**63)])
def test_an_account_token_needs_a_canonical_uid(uid: str) -> None:
    with pytest.raises(InvalidArgumentError, match="user id"):
        Credentials.from_user_key(uid, K1)
    with pytest.raises(InvalidArgumentError) as caught:
        Credentials.from_user_key("4242", "not base64!")
    assert "not base64!" not in str(caught.value)


@pytest.mark.parametrize("dialect", [Dialect.STUDIO, Dialect.FUSE], ids=lambda d: d.value)
def test_every_code_of_the_tables_raises_its_verdict_s_class(dialect: Dialect) -> None:
    """Each non-zero code of each operation's row (codes.REPLY_CODES) names its class and text."""
    for operation, row in codes.REPLY_CODES[dialect].items():
        for verdict, code in row.items():
            if verdict is Verdict.OK:
                continue
            spec = endpoint(dialect, operation)
            exc = platform_error(code, "", endpoint=spec)
            expected = codes.verdict_of_code(dialect, operation, code)
            assert expected is not None
            assert type(exc) is VERDICT_EXCEPTIONS[expected], (operation, code)
            assert exc.code == code
            assert exc.text == codes.reply_text(dialect, code)

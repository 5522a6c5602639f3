"""Download framing of the three dialects (spec §6.6.3-§6.6.4, §12.3, §13.4, D7, F8, F11)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.codes import DOWNLOAD_CODES, Dialect, OtaErrno
from onenet_ota.protocol.dialects import DIALECTS
from onenet_ota.protocol.envelopes import FUSE_ENVELOPE
from onenet_ota.protocol.framing import (
    CLASSIC_FRAMING,
    FUSE_FRAMING,
    MAX_HEADERS,
    STUDIO_FRAMING,
    DownloadFraming,
    DownloadReply,
    error_reply,
    raw_byte_chunk,
    read_error,
    served_range,
    success_reply,
)
from onenet_ota.protocol.messages import WireFormatError

RID = "0123456789abcdef0123456789abcdef"
FRAMINGS = [CLASSIC_FRAMING, STUDIO_FRAMING, FUSE_FRAMING]


def test_classic_error_is_the_98_bytes_of_6_6_4() -> None:
    expected = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"1\r\n\x03\r\n0\r\n\r\n"
    )
    assert error_reply(CLASSIC_FRAMING, 3).to_bytes() == expected
    assert len(expected) == 98


def test_studio_error_carries_ota_errno_and_the_byte() -> None:
    # §12.3: Ota-Errno for the Studio SDK, the one-byte chunk for the C SDK, one write.
    assert error_reply(STUDIO_FRAMING, 5).to_bytes() == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Ota-Errno: 5\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"1\r\n\x05\r\n0\r\n\r\n"
    )


def test_fuse_error_is_a_json_envelope_with_content_length() -> None:
    reply = error_reply(FUSE_FRAMING, 1, request_id=RID)
    body = b'{"code":1,"msg":"device not found","request_id":"' + RID.encode() + b'"}'
    assert reply.to_bytes() == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json;charset=UTF-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Ota-Errno: 1\r\n"
        b"\r\n" + body
    )
    assert FUSE_ENVELOPE.decode(reply.body).code == 1
    fresh = json.loads(error_reply(FUSE_FRAMING, 5).body)
    assert len(fresh["request_id"]) == 32


def test_classic_success_is_6_6_3s_last_chunk() -> None:
    reply = success_reply(
        CLASSIC_FRAMING, file_name="firmware.bin", length=10000, start=8192, end=9999, partial=True
    )
    assert reply.to_bytes() == (
        b"HTTP/1.1 206 Partial Content\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: 1808\r\n"
        b'Content-Disposition: attachment; filename="firmware.bin"\r\n'
        b"Content-Range: bytes 8192-9999/10000\r\n"
        b"\r\n"
    )


def test_studio_success_adds_start_and_end_before_content_range() -> None:
    reply = success_reply(
        STUDIO_FRAMING, file_name="firmware.bin", length=10000, start=8192, end=9999, partial=True
    )
    assert [name for name, _ in reply.headers][-3:] == [
        "Content-Range-Start",
        "Content-Range-End",
        "Content-Range",
    ]
    assert dict(reply.headers)["Content-Range-Start"] == "8192"
    assert dict(reply.headers)["Content-Range-End"] == "9999"
    # Without a Range there is nothing to compare: no Start/End (docs/dialects.md).
    whole = success_reply(STUDIO_FRAMING, file_name="f", length=10, start=0, end=9, partial=False)
    assert whole.status == 200
    assert "Content-Range-Start" not in dict(whole.headers)


def test_fuse_success_sends_ota_errno_zero() -> None:
    reply = success_reply(FUSE_FRAMING, file_name="f", length=100, start=0, end=9, partial=True)
    names = [name for name, _ in reply.headers]
    assert names == [
        "Content-Type",
        "Content-Length",
        "Content-Disposition",
        "Ota-Errno",
        "Content-Range",
    ]  # F11
    assert dict(reply.headers)["Ota-Errno"] == "0"


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("partial", [True, False])
def test_connection_close_goes_before_the_range_group(
    framing: DownloadFraming, partial: bool
) -> None:
    reply = success_reply(
        framing, file_name="f", length=100, start=0 if not partial else 10, end=99, partial=partial
    )
    lines = reply.to_bytes(closing=True).split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    names = [line.split(b":")[0].decode() for line in lines]
    group = [n for n in names if n.startswith("Content-Range")]
    assert names.count("Connection") == 1
    assert names[len(names) - len(group) - 1] == "Connection"
    assert names[len(names) - len(group) :] == group
    assert len(names) <= MAX_HEADERS  # §8.2 item 3


@pytest.mark.parametrize("framing", FRAMINGS)
def test_error_replies_stay_within_ten_headers_when_closing(framing: DownloadFraming) -> None:
    head = error_reply(framing, 3, request_id=RID).to_bytes(closing=True).split(b"\r\n\r\n")[0]
    assert len(head.split(b"\r\n")) - 1 <= MAX_HEADERS
    assert b"Connection: close" in head


def _lower(reply: DownloadReply) -> dict[str, str]:
    return {name.lower(): value for name, value in reply.headers}


def _payload(reply: DownloadReply) -> bytes:
    """The body as an HTTP client hands it over: a single chunk unframed (§8.2 item 6)."""
    if _lower(reply).get("transfer-encoding") != "chunked":
        return reply.body
    size, _, rest = reply.body.partition(b"\r\n")
    assert rest[int(size, 16) :] == b"\r\n0\r\n\r\n"
    return rest[: int(size, 16)]


@pytest.mark.parametrize("dialect", list(Dialect))
def test_every_download_error_reads_back(dialect: Dialect) -> None:
    framing = DIALECTS[dialect].framing
    for code in set(DOWNLOAD_CODES[dialect].values()) - {0}:
        reply = error_reply(framing, code, request_id=RID)
        body = _payload(reply)
        assert read_error(framing, status=reply.status, headers=_lower(reply), body=body) == code


@pytest.mark.parametrize("framing", FRAMINGS)
def test_successes_read_as_data(framing: DownloadFraming) -> None:
    reply = success_reply(
        framing, file_name="f", length=4, start=1, end=2, partial=True, body=b"ab"
    )
    assert read_error(framing, status=reply.status, headers=_lower(reply), body=reply.body) is None
    assert served_range(_lower(reply)) == (1, 2)


def test_a_nonzero_ota_errno_is_an_error_whatever_the_status() -> None:
    # §13.7: the header decides, even on a 206 with a Content-Length.
    headers = {"ota-errno": "5", "content-length": "2"}
    assert read_error(FUSE_FRAMING, status=206, headers=headers, body=b"xx") == 5
    assert read_error(CLASSIC_FRAMING, status=206, headers=headers, body=b"xx") is None


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ota-errno": "x"}, b""),
        ({"ota-errno": "-1"}, b""),
        ({"ota-errno": "\u0665"}, b""),
        ({}, b"\x07"),
        ({}, b"\x01\x02"),
        ({}, b""),
    ],
)
def test_malformed_error_replies_are_protocol_errors(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(WireFormatError):
        read_error(STUDIO_FRAMING, status=200, headers=headers, body=body)


def test_classic_accepts_an_ascii_digit_too() -> None:
    # §10: OneNET does not say raw or ASCII; the SDK takes both.
    assert read_error(CLASSIC_FRAMING, status=200, headers={}, body=b"3") == 3


@pytest.mark.parametrize("code", [0, 7, 255])
def test_raw_byte_chunks_hold_1_to_6(code: int) -> None:
    with pytest.raises(ValueError, match="1-6"):
        raw_byte_chunk(code)


def test_fuse_refuses_ota_errno_zero_as_an_error() -> None:
    with pytest.raises(ValueError, match="not an error"):
        error_reply(FUSE_FRAMING, int(OtaErrno.OK))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 10, "start": 0, "end": 10, "partial": True}, "inside"),
        ({"length": 10, "start": 5, "end": 4, "partial": True}, "inside"),
        ({"length": 10, "start": 1, "end": 9, "partial": False}, "whole file"),
        ({"length": 10, "start": 0, "end": 1, "partial": True, "body": b"x"}, "body"),
    ],
)
def test_success_refuses_inconsistent_ranges(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        success_reply(CLASSIC_FRAMING, file_name="f", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "headers",
    [
        {"content-range": "bytes 0-9"},
        {"content-range-start": "a", "content-range-end": "9"},
        {"content-range-start": "0", "content-range-end": "9", "content-range": "bytes 1-9/10"},
    ],
)
def test_served_range_refuses_malformed_or_contradictory_headers(headers: dict[str, str]) -> None:
    with pytest.raises(WireFormatError):
        served_range(headers)


@given(st.integers(1, 2**31 - 1).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_studio_served_range_round_trips(pair: tuple[int, int]) -> None:
    length, start = pair
    end = min(length - 1, start + 4095)
    reply = success_reply(
        STUDIO_FRAMING, file_name="f", length=length, start=start, end=end, partial=True
    )
    assert served_range(_lower(reply)) == (start, end)
    assert int(_lower(reply)["content-length"]) == end - start + 1

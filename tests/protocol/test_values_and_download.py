"""Value formats (spec §4.5) and the one-byte download errors (§6.6.4)."""

from __future__ import annotations

import pytest

from onenet_ota.protocol import values
from onenet_ota.protocol.download import DownloadError, decode_error_body


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1.0.0", True),
        ("V1.0_rc-2", True),
        ("a" * 20, True),
        ("a" * 21, False),
        ("", False),
        ("1.0 0", False),
        ("1.0/0", False),
        (None, False),
        (100, False),
    ],
)
def test_version_format(value: object, ok: bool) -> None:
    assert values.is_version(value) is ok


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("987654321", 987654321),
        ("1", 1),
        ("0", None),
        ("9223372036854775807", 2**63 - 1),
        ("9223372036854775808", None),
        ("12345678901234567890", None),
        ("-1", None),
        ("", None),
        (None, None),
        ("1e3", None),
        (" 1", None),
    ],
)
def test_dev_id(value: str | None, parsed: int | None) -> None:
    assert values.parse_dev_id(value) == parsed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(None, False), ("true", True), ("TRUE", True), ("False", False), ("1", None), ("", None)],
)
def test_cdn(value: str | None, parsed: bool | None) -> None:
    assert values.parse_cdn(value) == parsed


def test_json_ints_exclude_bools() -> None:
    assert values.is_json_int(3)
    assert not values.is_json_int(True)
    assert values.is_int32(-(2**31))
    assert not values.is_int32(2**31)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("fw.bin", True),
        ('a"b', False),
        ("a\\b", False),
        ("ü.bin", False),
        ("a" * 65, False),
        ("../x", True),
    ],  # a file name is only ever quoted in a header, never used as a path
)
def test_file_name(value: str, ok: bool) -> None:
    assert values.is_file_name(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("ota.example.net:80", True),
        ("1.2.3.4", True),
        ("a" * 32, False),
        ("host:port", False),
        ("", False),
    ],
)
def test_ip_port(value: str, ok: bool) -> None:
    assert values.is_ip_port(value) is ok


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\x03", DownloadError.INVALID_TOKEN),
        (b"3", DownloadError.INVALID_TOKEN),
        (b"\x01", DownloadError.NOT_FOUND),
        (b"6", DownloadError.NB_RESTRICTED),
        (b"\x00", None),
        (b"7", None),
        (b"", None),
        (b"33", None),
        (b"\x07", None),
    ],
)
def test_error_byte_raw_and_ascii(body: bytes, code: DownloadError | None) -> None:
    assert decode_error_body(body) == code

"""The errno envelope and E3/E4 task data codecs (spec §4.3, §6.3, §8.2 item 8)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.errno import ERRNO_TEXT, Errno
from onenet_ota.protocol.messages import (
    TaskInfo,
    TidTaskInfo,
    WireFormatError,
    decode_envelope,
    dumps,
    encode_envelope,
    parse_status_data,
    status_data,
    version_body,
)
from onenet_ota.protocol.status import PackageKind

EXAMPLE = (
    b'{"errno":0,"error":"succ","data":{"target":"1.0.1","token":"ota_3fQ9cZr0LmT7wXa2bN5k",'
    b'"size":10000,"md5":"000e87c6dfb9c77108f320f7c27a64ea","signal":10,"power":10,"retry":3,'
    b'"interval":1,"type":1,"ipPort":"ota.example.net:80"}}'
)


def test_success_envelope_is_canonical() -> None:
    assert encode_envelope(Errno.SUCC) == b'{"errno":0,"error":"succ"}'


def test_every_errno_has_a_text() -> None:
    assert set(ERRNO_TEXT) == set(Errno)
    assert encode_envelope(Errno.TOKEN_EXPIRED) == b'{"errno":12,"error":"token expired"}'


def test_task_info_encodes_the_spec_example_byte_for_byte() -> None:
    info = TaskInfo(
        target="1.0.1",
        token="ota_3fQ9cZr0LmT7wXa2bN5k",
        size=10000,
        md5="000e87c6dfb9c77108f320f7c27a64ea",
        signal=10,
        power=10,
        retry=3,
        interval=1,
        kind=PackageKind.FULL,
        ip_port="ota.example.net:80",
    )
    assert encode_envelope(Errno.SUCC, info.to_data()) == EXAMPLE
    envelope = decode_envelope(EXAMPLE)
    assert envelope.errno == 0
    assert envelope.data is not None
    assert TaskInfo.from_data(envelope.data) == info


def test_task_info_without_ip_port_omits_the_key() -> None:
    info = TaskInfo(target="2", token="t", size=1, md5="0" * 32)
    assert "ipPort" not in info.to_data()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"error":"succ"}',
        b'{"errno":"0"}',
        b'{"errno":true}',
        b'{"errno":0,"error":1}',
        b'{"errno":0,"data":[]}',
        b"\xff\xfe",
    ],
)
def test_bad_envelopes_raise_wire_format_error(body: bytes) -> None:
    with pytest.raises(WireFormatError):
        decode_envelope(body)


GOOD: dict[str, Any] = json.loads(EXAMPLE)["data"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target", 101),  # a numeric target crashes the C SDK (§8.2 item 8)
        ("target", ""),
        ("token", None),
        ("token", "a/b"),
        ("size", "10000"),
        ("size", True),
        ("size", 0),
        ("size", 2**31),
        ("md5", "xyz"),
        ("signal", 1.5),
        ("retry", False),
        ("type", 3),
        ("ipPort", 80),
        ("ipPort", "a" * 32),
    ],
)
def test_task_info_rejects_wrong_types(field: str, value: object) -> None:
    data = dict(GOOD, **{field: value})
    with pytest.raises(WireFormatError, match=field):
        TaskInfo.from_data(data)


def test_missing_advisory_fields_default_to_zero() -> None:
    data = {k: GOOD[k] for k in ("target", "token", "size", "md5")}
    info = TaskInfo.from_data(data)
    assert (info.signal, info.power, info.retry, info.interval) == (0, 0, 0, 0)
    assert info.kind is PackageKind.FULL


def test_version_body_reports_only_known_versions() -> None:
    assert version_body("1.0.0", None) == {"f_version": "1.0.0"}
    assert version_body("1", "2") == {"f_version": "1", "s_version": "2"}
    with pytest.raises(ValueError, match="at least one"):
        version_body(None, None)


int32 = st.integers(-(2**31), 2**31 - 1)


@given(
    st.builds(
        TaskInfo,
        target=st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True),
        token=st.from_regex(r"ota_[A-Za-z0-9]{20}", fullmatch=True),
        size=st.integers(1, 2**31 - 1),
        md5=st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        signal=int32,
        power=int32,
        retry=int32,
        interval=int32,
        kind=st.sampled_from(PackageKind),
        ip_port=st.none() | st.from_regex(r"[a-z0-9.\-]{1,20}(:[0-9]{1,5})?", fullmatch=True),
    )
)
def test_task_info_round_trips_and_fits_512_bytes(info: TaskInfo) -> None:
    body = encode_envelope(Errno.SUCC, info.to_data())
    envelope = decode_envelope(body)
    assert envelope.data is not None
    assert TaskInfo.from_data(envelope.data) == info
    # §6.3: at maximum sizes the whole response stays under 512 bytes; the body alone well under.
    assert len(body) <= 512 - 120


# -- Studio S-C / fuse F-C task data and S-T / F-T status (§12.2, §13.1, S5, F7) ----------------
TID_EXAMPLE = (
    b'{"target":"1.0.1","tid":4242,"size":10000,"md5":"000e87c6dfb9c77108f320f7c27a64ea",'
    b'"status":1,"type":1}'
)


def test_tid_task_info_encodes_the_things_model_reply() -> None:
    # The data the things-model captures were taken with (their README).
    info = TidTaskInfo("1.0.1", 4242, 10000, "000e87c6dfb9c77108f320f7c27a64ea", 1)
    assert dumps(info.to_data()) == TID_EXAMPLE
    assert TidTaskInfo.from_data(json.loads(TID_EXAMPLE)) == info


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tid": "4242"}, "tid"),  # §8.2 item 8: a number
        ({"tid": 0}, "tid"),
        ({"tid": 2**31}, "tid"),
        ({"tid": True}, "tid"),
        ({"size": 0}, "size"),
        ({"size": 2**31}, "size"),
        ({"target": 101}, "target"),
        ({"target": ""}, "target"),
        ({"md5": "xyz"}, "md5"),
        ({"status": 4}, "status"),  # S5: only active states are offered
        ({"status": 0}, "status"),
        ({"type": 3}, "type"),
        ({"type": None}, "type"),
    ],
)
def test_tid_task_info_refuses_bad_fields(change: dict[str, Any], field: str) -> None:
    data = {**json.loads(TID_EXAMPLE), **change}
    with pytest.raises(WireFormatError, match=field):
        TidTaskInfo.from_data(data)


def test_tid_task_info_defaults_and_normalises() -> None:
    data = json.loads(TID_EXAMPLE)
    del data["type"]
    data["md5"] = data["md5"].upper()
    info = TidTaskInfo.from_data(data)
    assert info.kind is PackageKind.FULL
    assert info.md5 == "000e87c6dfb9c77108f320f7c27a64ea"
    with pytest.raises(WireFormatError, match="tid"):
        TidTaskInfo.from_data({k: v for k, v in json.loads(TID_EXAMPLE).items() if k != "tid"})


@given(
    tid=st.integers(1, 2**31 - 1),
    size=st.integers(1, 2**31 - 1),
    status=st.integers(1, 3),
    kind=st.sampled_from(PackageKind),
    target=st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True),
)
def test_tid_task_info_round_trips(
    tid: int, size: int, status: int, kind: PackageKind, target: str
) -> None:
    info = TidTaskInfo(target, tid, size, "0" * 32, status, kind)
    assert TidTaskInfo.from_data(json.loads(dumps(info.to_data()))) == info


@pytest.mark.parametrize("status", range(1, 7))
def test_status_data_round_trips(status: int) -> None:
    assert status_data(status) == {"status": status}
    assert parse_status_data(json.loads(dumps(status_data(status)))) == status


@pytest.mark.parametrize("bad", [0, 7, -1, True, "1"])
def test_status_data_refuses_non_states(bad: Any) -> None:
    with pytest.raises(ValueError, match="state code"):
        status_data(bad)
    with pytest.raises(WireFormatError, match="status"):
        parse_status_data({"status": bad})


def test_parse_status_data_needs_data() -> None:
    with pytest.raises(WireFormatError, match="data"):
        parse_status_data(None)

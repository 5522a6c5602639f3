"""Reply envelopes: classic/Studio ``errno`` (§4.3, §12.1) and fuse ``code/msg/request_id``
(§13.2): golden bytes, round trips and refusals."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.envelopes import (
    CLASSIC_ENVELOPE,
    FUSE_ENVELOPE,
    EnvelopeCodec,
    Reply,
    new_request_id,
)
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import WireFormatError, encode_envelope

RID = "0123456789abcdef0123456789abcdef"


def test_classic_golden_bytes_equal_the_existing_encoder() -> None:
    for errno in Errno:
        assert CLASSIC_ENVELOPE.encode(int(errno), errno.text) == encode_envelope(errno)
    assert CLASSIC_ENVELOPE.encode(0, "succ") == b'{"errno":0,"error":"succ"}'  # §2.5
    data = {"status": 2}
    assert (
        CLASSIC_ENVELOPE.encode(0, "succ", data)
        == b'{"errno":0,"error":"succ","data":{"status":2}}'
    )


def test_fuse_golden_bytes() -> None:
    assert (
        FUSE_ENVELOPE.encode(12012, "not exist", request_id=RID)
        == b'{"code":12012,"msg":"not exist","request_id":"' + RID.encode() + b'"}'
    )
    assert FUSE_ENVELOPE.encode(0, "succ", {"status": 1}, request_id=RID).endswith(
        b',"data":{"status":1}}'
    )
    assert FUSE_ENVELOPE.content_type == "application/json;charset=UTF-8"  # §13.2, F11
    assert CLASSIC_ENVELOPE.content_type == "application/json"  # S12


def test_request_ids_are_32_lower_hex_and_random() -> None:
    ids = {new_request_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


@pytest.mark.parametrize(
    ("codec", "kwargs", "message"),
    [
        (FUSE_ENVELOPE, {}, "request_id"),
        (FUSE_ENVELOPE, {"request_id": RID.upper()}, "request_id"),
        (FUSE_ENVELOPE, {"request_id": RID[:31]}, "request_id"),
        (CLASSIC_ENVELOPE, {"request_id": RID}, "no request_id"),
    ],
)
def test_encoding_refuses_wrong_request_ids(
    codec: EnvelopeCodec, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        codec.encode(0, "succ", **kwargs)


def test_encoding_refuses_a_bool_code() -> None:
    with pytest.raises(TypeError, match="int"):
        CLASSIC_ENVELOPE.encode(True, "succ")


@pytest.mark.parametrize(
    ("codec", "body", "message"),
    [
        (CLASSIC_ENVELOPE, b"", "not JSON"),
        (CLASSIC_ENVELOPE, b"\xff", "not JSON"),
        (CLASSIC_ENVELOPE, b"[]", "not a JSON object"),
        (CLASSIC_ENVELOPE, b'{"error":"succ"}', "integer 'errno'"),
        (CLASSIC_ENVELOPE, b'{"errno":true}', "integer 'errno'"),
        (CLASSIC_ENVELOPE, b'{"errno":"0"}', "integer 'errno'"),
        (CLASSIC_ENVELOPE, b'{"errno":0.0}', "integer 'errno'"),
        (CLASSIC_ENVELOPE, b'{"errno":0,"error":1}', "'error'"),
        (CLASSIC_ENVELOPE, b'{"errno":0,"data":[]}', "'data'"),
        # §8.2 item 8: a code/msg envelope is not the classic one, and the reverse.
        (
            CLASSIC_ENVELOPE,
            b'{"code":0,"msg":"succ","request_id":"' + RID.encode() + b'"}',
            "errno",
        ),
        (FUSE_ENVELOPE, b'{"errno":0,"error":"succ"}', "integer 'code'"),
        (FUSE_ENVELOPE, b'{"code":false,"msg":"succ"}', "integer 'code'"),
        (FUSE_ENVELOPE, b'{"code":0,"msg":null}', "'msg'"),
        (FUSE_ENVELOPE, b'{"code":0,"msg":"succ","request_id":5}', "'request_id'"),
        (FUSE_ENVELOPE, b'{"code":0,"msg":"succ","data":"x"}', "'data'"),
    ],
)
def test_decoding_refuses_what_is_not_the_envelope(
    codec: EnvelopeCodec, body: bytes, message: str
) -> None:
    with pytest.raises(WireFormatError, match=message):
        codec.decode(body)


def test_decoding_ignores_unknown_keys_and_missing_text() -> None:
    assert CLASSIC_ENVELOPE.decode(b'{"errno":12,"x":1}') == Reply(12, "", None)
    assert FUSE_ENVELOPE.decode(b'{"code":12013,"msg":"task succ"}') == Reply(
        12013, "task succ", None, None
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
datas = st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@given(code=st.integers(-(2**31), 2**31), text=st.text(max_size=20), data=datas)
def test_classic_round_trip(code: int, text: str, data: dict[str, Any] | None) -> None:
    body = CLASSIC_ENVELOPE.encode(code, text, data)
    assert body.startswith(b'{"errno":%d,"error":' % code)  # fixed key order (D26)
    assert CLASSIC_ENVELOPE.decode(body) == Reply(code, text, data)


@given(code=st.integers(0, 99999), text=st.text(max_size=20), data=datas)
def test_fuse_round_trip(code: int, text: str, data: dict[str, Any] | None) -> None:
    rid = new_request_id()
    body = FUSE_ENVELOPE.encode(code, text, data, request_id=rid)
    assert FUSE_ENVELOPE.decode(body) == Reply(code, text, data, rid)

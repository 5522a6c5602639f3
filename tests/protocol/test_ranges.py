"""The Range grammar and OneNET's clamping (spec §6.6.1, §6.6.2, Appendix B.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.ranges import (
    RangeSpec,
    format_content_range,
    format_request_range,
    parse_content_range,
    parse_range,
)

# Appendix B.3, L = 100: header value -> served (start, end)
B3 = [
    ("0-9", (0, 9)),
    ("bytes=0-9", (0, 9)),
    ("BYTES = 0 - 9", (0, 9)),
    ("007-010", (7, 10)),
    ("5-5", (5, 5)),
    ("90-199", (90, 99)),
    ("150-200", (0, 99)),
    ("50-10", (0, 10)),
    ("0-", (0, 99)),
    ("95-", (95, 99)),
    ("100-", (0, 99)),
    ("-10", (90, 99)),
    ("-500", (0, 99)),
    ("0-99999999999999999999999", (0, 99)),
    ("\t bytes\t=\t3-4 \t", (3, 4)),
    ("Bytes=0-", (0, 99)),
]


@pytest.mark.parametrize(("value", "served"), B3)
def test_appendix_b3(value: str, served: tuple[int, int]) -> None:
    spec = parse_range(value)
    assert spec is not None
    assert spec.clamp(100) == served


@pytest.mark.parametrize(
    "value",
    [
        "-0",
        "-",
        "0-9,20-29",
        "items=0-9",
        "bytes=x",
        "",
        " ",
        "0 9",
        "bytes=",
        "=0-9",
        "1-2-3",
        "bytes=-",
        "0x10-20",
        "+1-2",
        "1.5-2",
        "bytes 0-9",
        "0-9;",
        "０-9",
    ],
)
def test_malformed_values_are_served_as_if_absent(value: str) -> None:
    assert parse_range(value) is None


def test_c_sdk_sequence_on_10000_bytes() -> None:
    # §6.6.2/§8.3: the start is kept when only the end runs past EOF.
    served = [parse_range(f"{s}-{s + 4095}") for s in (0, 4096, 8192)]
    assert [spec.clamp(10000) for spec in served if spec] == [(0, 4095), (4096, 8191), (8192, 9999)]


def test_clamping_an_empty_file_is_refused() -> None:
    spec = parse_range("0-9")
    assert spec is not None
    with pytest.raises(ValueError, match="empty"):
        spec.clamp(0)


def test_huge_numbers_do_not_raise() -> None:
    spec = parse_range("1" * 5000 + "-")
    assert spec is not None
    assert spec.clamp(10) == (0, 9)
    spec = parse_range("-" + "9" * 5000)
    assert spec is not None
    assert spec.clamp(10) == (0, 9)


@given(st.text(max_size=40))
def test_parse_never_raises(value: str) -> None:
    parse_range(value)


specs = st.one_of(
    st.builds(
        RangeSpec, first=st.integers(0, 10**18), last=st.integers(0, 10**18), suffix=st.none()
    ),
    st.builds(RangeSpec, first=st.integers(0, 10**18), last=st.none(), suffix=st.none()),
    st.builds(RangeSpec, first=st.none(), last=st.none(), suffix=st.integers(1, 10**18)),
)


@given(spec=specs, length=st.integers(1, 2**31 - 1))
def test_clamp_always_serves_a_non_empty_range_inside_the_file(
    spec: RangeSpec, length: int
) -> None:
    start, end = spec.clamp(length)
    assert 0 <= start <= end <= length - 1


@given(start=st.integers(0, 2**31), size=st.integers(1, 2**20), length=st.integers(1, 2**31 - 1))
def test_form_a_keeps_the_start_when_it_is_inside_the_file(
    start: int, size: int, length: int
) -> None:
    spec = parse_range(format_request_range(start, start + size - 1))
    assert spec is not None
    served = spec.clamp(length)
    if start < length:
        assert served == (start, min(start + size - 1, length - 1))
    else:
        assert served[0] == 0


@given(start=st.integers(0, 10**9), extra=st.integers(0, 10**9))
def test_content_range_round_trip(start: int, extra: int) -> None:
    end = start + extra
    assert parse_content_range(format_content_range(start, end, end + 1)) == (start, end, end + 1)


@pytest.mark.parametrize("value", ["bytes 5-4/10", "bytes 0-10/10", "0-9/10", "bytes a-b/c", ""])
def test_bad_content_range_is_none(value: str) -> None:
    assert parse_content_range(value) is None


def test_request_range_refuses_inverted_ranges() -> None:
    with pytest.raises(ValueError, match="invalid range"):
        format_request_range(10, 9)

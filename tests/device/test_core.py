"""The sans-IO core without any I/O: request building, and the judgement of replies.

Property-based tests drive the download interpretation (§10) with every range a OneNET server can
serve, and fuzz the JSON replies: whatever arrives, the outcome is a result or one of the SDK's
errors, never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onenet_ota.device import (
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    OtaError,
    PlatformError,
    ProtocolError,
    StatusCode,
    TaskType,
    Timeout,
)
from onenet_ota.device._core import (
    MAX_JSON_REPLY,
    Call,
    ClientCore,
    Head,
    Outcome,
    _decode_envelope,
)
from onenet_ota.device.events import TokenChecked
from onenet_ota.protocol import ranges
from onenet_ota.protocol.download import decode_error_body
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.messages import decode_envelope
from tests.device.conftest import TOKEN, VECTOR_3, make_config, task_data


def core(base_url: str = "http://ota.heclouds.com", **changes: Any) -> ClientCore:
    return ClientCore(make_config(**changes), base_url=base_url, timeout=Timeout())


def run(call: Call[Any], head: Head, body: bytes) -> Outcome[Any]:
    """Drive a call the way the drivers do, in one piece."""
    reader = call.begin(head)
    reader.feed(body)
    return reader.finish()


def judge(call: Call[Any], head: Head, body: bytes) -> Outcome[Any] | OtaError:
    """The outcome, or the SDK error it raised; any other exception propagates."""
    try:
        return run(call, head, body)
    except OtaError as exc:
        return exc


def json_head(body: bytes, status: int = 200) -> Head:
    return Head(status, (("Content-Type", "application/json"), ("Content-Length", str(len(body)))))


# -- requests ------------------------------------------------------------------------------------


def test_default_base_url_is_onenet() -> None:
    request = ClientCore(make_config(), base_url="http://ota.heclouds.com", timeout=Timeout())
    call = request.check_task()
    assert call.request.url.startswith("http://ota.heclouds.com/ota/south/check?")


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/ota/device/version?dev_id=987654321"),
        ("HTTPS://ota.example.net/", "https://ota.example.net/ota/device/version?dev_id=987654321"),
        ("https://gw.example.net/onenet/", "https://gw.example.net/onenet/ota/device/version?dev_id=987654321"),
        ("http://[::1]:81", "http://[::1]:81/ota/device/version?dev_id=987654321"),
    ],
)  # fmt: skip
def test_base_url_forms(base_url: str, url: str) -> None:
    assert core(base_url).post_version().request.url == url


@pytest.mark.parametrize(
    "base_url",
    [
        "ota.heclouds.com",
        "ftp://ota.heclouds.com",
        "http://",
        "http://host:99999",
        "http://host/?q=1",
        "http://user:pw@host",
        "http://host/a b",
    ],
)
def test_bad_base_urls(base_url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="base_url"):
        core(base_url)


def test_json_requests_carry_the_c_sdk_headers() -> None:
    request = core().check_token(TOKEN).request
    assert request.headers[:2] == (
        ("Content-Type", "application/json"),
        ("Authorization", VECTOR_3),
    )
    assert request.method == "GET"
    assert request.body is None


def test_wire_request_repr_redacts_the_authorization() -> None:
    text = repr(core().post_version().request)
    assert "sign=***" in text
    assert "4%2B7IKBIL5vNCYd9mzZZg40vs9vc" not in text


def test_per_call_timeout_overrides_the_default() -> None:
    c = ClientCore(make_config(), base_url="http://h", timeout=Timeout(5000, connect_ms=1000))
    assert c.check_task().request.timeout == Timeout(5000, 1000)
    assert c.check_task(timeout_ms=250).request.timeout == Timeout(250, 1000)


versions = st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True)
codes = st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True)


@given(
    version=versions,
    dev_id=st.integers(1, 2**63 - 1),
    task_type=st.sampled_from(TaskType),
    cdn=st.booleans(),
    manuf=st.none() | codes,
    model=st.none() | codes,
)
def test_check_task_query_order(
    version: str, dev_id: int, task_type: TaskType, cdn: bool, manuf: str | None, model: str | None
) -> None:
    c = core(version=version, dev_id=str(dev_id), type=task_type, cdn=cdn, manuf=manuf, model=model)
    url = c.check_task().request.url
    expected = [f"type={int(task_type)}", f"version={version}", f"cdn={str(cdn).lower()}"]
    expected += [f"manuf={manuf}"] * (manuf is not None) + [f"model={model}"] * (model is not None)
    expected.append(f"dev_id={dev_id}")
    assert url == "http://ota.heclouds.com/ota/south/check?" + "&".join(expected)


def test_tokens_are_percent_encoded_in_paths_and_queries() -> None:
    c = core()
    assert c.check_token("a%b?c").request.url.startswith(
        "http://ota.heclouds.com/ota/south/download/a%25b%3Fc/check?"
    )
    assert "?token=a%26b&dev_id=" in c.report_result("a&b", 201).request.url


@pytest.mark.parametrize("code", [0, 99, 100, *StatusCode])
def test_every_valid_step(code: int) -> None:
    assert core().report_status(TOKEN, code).request.body == b'{"step":%d}' % code


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 65, 7, None])
def test_a_token_kept_as_valid_lets_no_other_through(bad: Any) -> None:
    # The core validates a token once per task and keeps it; each other value is judged anew.
    c = core()
    for _ in range(2):
        c.check_token(TOKEN)
        c.download(TOKEN, 0, 4096)
        with pytest.raises(InvalidArgumentError, match="token"):
            c.check_token(bad)
        with pytest.raises(InvalidArgumentError, match="token"):
            c.download(bad, 0, 4096)


def test_a_kept_token_check_reports_its_own_token() -> None:
    c = core()
    for token in (TOKEN, "ota_other", TOKEN):
        call = c.check_token(token)
        outcome = call.finish(Head(200), b'{"errno":0,"error":"succ"}')
        assert isinstance(outcome.event, TokenChecked)
        assert outcome.event.token == token


def test_download_request() -> None:
    request = core().download(TOKEN, 4096, 4096).request
    assert request.url == f"http://ota.heclouds.com/ota/south/download/{TOKEN}"
    assert dict(request.headers) == {
        "Authorization": VECTOR_3,
        "Range": "4096-8191",
        "Accept-Encoding": "identity",
    }


# -- JSON replies --------------------------------------------------------------------------------


def test_json_reply_at_the_size_limit() -> None:
    padding = MAX_JSON_REPLY - len(b'{"errno":0,"error":""}')
    body = b'{"errno":0,"error":"' + b"x" * padding + b'"}'
    assert len(body) == MAX_JSON_REPLY
    run(core().check_token(TOKEN), json_head(body), body)
    bigger = body[:-2] + b'x"}'
    with pytest.raises(ProtocolError, match="larger than"):
        core().check_token(TOKEN).begin(json_head(bigger))  # refused from the header alone
    reader = core().check_token(TOKEN).begin(Head(200))  # no Content-Length: counted as it comes
    reader.feed(bigger[:1000])
    with pytest.raises(ProtocolError, match="larger than"):
        reader.feed(bigger[1000:])


def test_header_lookup_ignores_case() -> None:
    body = b'{"errno":0}'
    head = Head(200, (("content-length", str(len(body))), ("CONTENT-TYPE", "application/json")))
    assert run(core().check_token(TOKEN), head, body).value is None


def test_conflicting_or_bad_content_length() -> None:
    with pytest.raises(ProtocolError, match="conflicting"):
        core().check_token(TOKEN).begin(
            Head(200, (("Content-Length", "1"), ("Content-Length", "2")))
        )
    with pytest.raises(ProtocolError, match="invalid Content-Length"):
        core().check_token(TOKEN).begin(Head(200, (("Content-Length", "-1"),)))
    with pytest.raises(ProtocolError, match="Content-Length says 5"):
        core().check_token(TOKEN).finish(Head(200, (("Content-Length", "5"),)), b"{}")


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids),
    max_leaves=12,
)
fields = st.sampled_from(
    ["target", "token", "size", "md5", "signal", "power", "retry", "interval", "type", "ipPort"]
)


@settings(max_examples=300)
@given(
    errno=st.one_of(st.integers(-5, 6000), json_values),
    changes=st.dictionaries(fields, json_values, max_size=3),
    drop_data=st.booleans(),
)
def test_fuzzed_task_replies_never_crash(
    errno: Any, changes: dict[str, Any], drop_data: bool
) -> None:
    data = task_data(**changes)
    obj: dict[str, Any] = {"errno": errno, "error": "x"}
    if not drop_data:
        obj["data"] = data
    body = json.dumps(obj).encode()
    c = core()
    result = judge(c.check_task(), json_head(body), body)
    if isinstance(result, PlatformError):
        assert type(errno) is int
        assert errno > 0
        assert result.code == errno
    elif isinstance(result, Outcome):
        assert type(errno) is int
        assert errno == 0
        assert c.last_task == result.value
    else:
        assert type(result) is ProtocolError


@given(body=st.binary(max_size=300), status=st.integers(100, 599))
def test_fuzzed_bytes_never_crash(body: bytes, status: int) -> None:
    result = judge(core().check_task(), json_head(body, status), body)
    assert isinstance(result, Outcome | ProtocolError | PlatformError | HTTPStatusError)


# -- downloads: every reply a OneNET server may give ---------------------------------------------


def download_head(start: int, end: int, total: int, *, length: int | None = None) -> Head:
    served = end - start + 1 if length is None else length
    return Head(
        206,
        (
            ("Content-Length", str(served)),
            ("Content-Range", ranges.format_content_range(start, end, total)),
        ),
    )


@settings(max_examples=300)
@given(
    total=st.integers(1, 50_000),
    start=st.integers(0, 60_000),
    size=st.integers(2, 20_000),
)
def test_onenet_clamped_replies_are_accepted_exactly(total: int, start: int, size: int) -> None:
    served_start, served_end = ranges.RangeSpec(start, start + size - 1, None).clamp(total)
    served = served_end - served_start + 1
    call = core().download(TOKEN, start, size)
    head = download_head(served_start, served_end, total)
    if served > size:  # only when a start past EOF restarts at 0 (§6.6.2): never read it
        with pytest.raises(ProtocolError, match="announced"):
            call.begin(head)
        return
    data = bytes(range(256)) * (served // 256 + 1)
    chunk = run(call, head, data[:served]).value
    assert (chunk.start, chunk.end, chunk.total, chunk.partial) == (
        served_start,
        served_end,
        total,
        True,
    )
    assert chunk.data == data[:served]
    if served_start != start:
        with pytest.raises(ProtocolError, match="not from the requested"):
            run(core().download(TOKEN, start, size, exact_start=True), head, data[:served])


@given(
    total=st.integers(1, 50_000),
    start=st.integers(0, 50_000),
    size=st.integers(2, 8_192),
    served=st.tuples(st.integers(0, 50_000), st.integers(0, 50_000)),
)
def test_any_other_served_range_is_refused(
    total: int, start: int, size: int, served: tuple[int, int]
) -> None:
    a, b = min(served), max(served)
    if b >= total:
        b = total - 1
    if a > b:
        a = b
    expected = ranges.RangeSpec(start, start + size - 1, None).clamp(total)
    call = core().download(TOKEN, start, size)
    body = b"x" * (b - a + 1)
    if (a, b) == expected and len(body) <= size:
        assert run(call, download_head(a, b, total), body).value.start == a
    else:
        with pytest.raises(ProtocolError):
            run(call, download_head(a, b, total), body)


@given(body=st.binary(min_size=0, max_size=3), chunked=st.booleans())
def test_replies_without_content_length(body: bytes, chunked: bool) -> None:
    headers = (("Transfer-Encoding", "chunked"),) if chunked else ()
    call = core().download(TOKEN, 0, 4096)
    code = decode_error_body(body)
    with pytest.raises(OtaError) as info:
        run(call, Head(200, headers), body)
    if code is None:
        assert type(info.value) is ProtocolError
    else:
        assert type(info.value) is DownloadError
        assert info.value.code == int(code)
        assert info.value.endpoint is Endpoint.DOWNLOAD


def test_the_reader_never_takes_more_than_the_range() -> None:
    reader = core().download(TOKEN, 0, 4096).begin(download_head(0, 4095, 10000))
    reader.feed(b"x" * 4096)
    with pytest.raises(ProtocolError, match="longer than its Content-Length"):
        reader.feed(b"x")
    error_reader = core().download(TOKEN, 0, 4096).begin(Head(200))
    error_reader.feed(b"\x03")
    with pytest.raises(ProtocolError, match="not a one-byte error code"):
        error_reader.feed(b"\x03")


def test_total_is_checked_against_the_last_task_of_that_token_only() -> None:
    c = core()
    body = json.dumps({"errno": 0, "data": task_data()}).encode()
    run(c.check_task(), json_head(body), body)
    with pytest.raises(ProtocolError, match="gave its size as 10000"):
        c.download(TOKEN, 0, 4096).begin(download_head(0, 4095, 9999))
    other = c.download("ota_another", 0, 4096)
    assert run(other, download_head(0, 4095, 9999), b"x" * 4096).value.total == 9999


def test_a_short_reply_decodes_the_same_every_time_it_comes() -> None:
    succ = b'{"errno":0,"error":"succ"}'
    expired = b'{"errno":12,"error":"token expired"}'
    for _ in range(3):  # the second and third reply find the first one's envelope kept
        outcome = run(core().check_token(TOKEN), json_head(succ), succ)
        assert outcome.value is None
        assert outcome.event is not None
        assert isinstance(outcome.event, TokenChecked)
        assert outcome.event.reply == succ
        error = judge(core().check_token(TOKEN), json_head(expired), expired)
        assert isinstance(error, PlatformError)
        assert error.code == 12
    with_data = json.dumps({"errno": 0, "error": "succ", "data": task_data()}).encode()
    tasks = [run(core().check_task(), json_head(with_data), with_data).value for _ in range(2)]
    assert tasks[0] == tasks[1]
    assert tasks[0].token == TOKEN
    # A reply with data is decoded anew each time: its dict is never shared between readers.
    assert _decode_envelope(with_data).data is not _decode_envelope(with_data).data
    assert _decode_envelope(succ) == decode_envelope(succ)

"""The sans-IO core: requests built from typed arguments, and every way a reply can go wrong.

No network here: :class:`Call` judges a status and a body given as plain values.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from onenet_ota.management._core import (
    BUSY_ATTEMPTS,
    MAX_RETRY_AFTER_S,
    DownloadReader,
    ManagementCore,
    next_cursor,
    parse_retry_after,
)
from onenet_ota.management.errors import (
    ApiError,
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ServerError,
    Unauthorized,
)
from onenet_ota.management.models import DevicePage, DeviceTaskPage
from onenet_ota.protocol.status import PackageKind, TaskType

core = ManagementCore("http://ota.example:8080/", "secret-token")


def _error(code: str, message: str, **extra: object) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


# -- building requests ------------------------------------------------------------------------


def test_a_request_names_the_api_path_and_carries_the_token() -> None:
    wire = core.get_product("123123").request
    assert (wire.method, wire.url) == ("GET", "http://ota.example:8080/api/v1/products/123123")
    assert ("Authorization", "Bearer secret-token") in wire.headers
    assert wire.body is None


def test_the_token_is_not_in_a_repr() -> None:
    call = core.get_product("1")
    assert "secret-token" not in repr(call.request)
    assert "secret-token" not in repr(core)


def test_no_token_no_authorization_header() -> None:
    wire = ManagementCore("https://x", None).health().request
    assert all(name != "Authorization" for name, _ in wire.headers)


@pytest.mark.parametrize("server", ["ftp://x", "x:8080", "http://", "127.0.0.1"])
def test_a_server_that_is_not_an_http_url_is_refused(server: str) -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        ManagementCore(server, "t")


def test_a_path_value_cannot_reach_another_route() -> None:
    # "1/rotate-key" is a uid that does not exist, not the rotate-key route of account 1.
    assert core.get_account("1/rotate-key").request.url.endswith("/accounts/1%2Frotate-key")


def test_absent_parameters_are_left_out() -> None:
    wire = core.list_devices(pid="1", name_contains="meter", limit=None).request
    assert wire.params == (("pid", "1"), ("q", "meter"))


def test_json_bodies_leave_out_what_was_not_given() -> None:
    wire = core.create_device("1", "dev", generate_device_key=False).request
    assert json.loads(wire.body or b"") == {"pid": "1", "name": "dev"}
    assert ("Content-Type", "application/json") in wire.headers
    rotate = core.rotate_product_key("1").request
    assert json.loads(rotate.body or b"") == {}


def test_an_upload_is_streamed_with_its_metadata_in_the_query() -> None:
    wire = core.upload_package(
        pid="1", module_type=TaskType.SOTA, target="2.0", file_name="a.bin",
        kind=PackageKind.DIFF, from_version="1.0", size=3,
    ).request  # fmt: skip
    assert wire.streamed
    assert dict(wire.params) == {
        "pid": "1", "type": "sota", "target": "2.0", "kind": "diff", "from_version": "1.0",
        "file_name": "a.bin",
    }  # fmt: skip
    assert ("Content-Length", "3") in wire.headers
    assert ("Content-Type", "application/octet-stream") in wire.headers


def test_an_unknown_task_action_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="pause, resume or cancel"):
        core.act_on_task(1, "restart")  # type: ignore[arg-type]


# -- judging replies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (405, ApiError),
        (408, BadRequest),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, Invalid),
        (500, ServerError),
        (503, Busy),
        (507, ServerError),
    ],
)
def test_an_error_body_becomes_its_exception(status: int, cls: type[ApiError]) -> None:
    details = [{"field": "pid", "message": "too long"}]
    body = _error("some_code", "what went wrong", details=details)
    with pytest.raises(cls) as raised:
        core.get_product("1").judge(status, "Reason", body)
    assert type(raised.value) is cls
    assert (raised.value.status, raised.value.code) == (status, "some_code")
    assert str(raised.value) == "what went wrong"
    assert raised.value.details == details


def test_an_error_without_a_message_says_its_reason() -> None:
    with pytest.raises(NotFound, match=r"^Not Found$"):
        core.get_product("1").judge(404, "Not Found", _error("not_found", ""))


def test_details_that_are_not_objects_are_dropped() -> None:
    body = _error("invalid", "bad", details=["text", {"field": "x", "message": "y"}])
    with pytest.raises(Invalid) as raised:
        core.get_product("1").judge(422, "", body)
    assert raised.value.details == [{"field": "x", "message": "y"}]


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>proxy error</html>", b"\xff\xfe", b'{"detail": "nope"}', b'{"error": "x"}'],
)
def test_an_error_reply_that_is_not_the_apis_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="is this an onenet-ota server") as raised:
        core.get_product("1").judge(502, "Bad Gateway", body)
    assert raised.value.status == 502
    assert "HTTP 502 Bad Gateway from http://ota.example:8080" in str(raised.value)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"pid": 1}'])
def test_a_success_that_does_not_match_its_model_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not the management API's"):
        core.get_product("1").judge(200, "OK", body)


def test_the_openapi_document_must_be_an_object() -> None:
    with pytest.raises(ProtocolError):
        core.openapi().judge(200, "OK", b"[1]")
    assert core.openapi().judge(200, "OK", b'{"openapi": "3.1.0"}') == {"openapi": "3.1.0"}


def test_a_delete_answers_none() -> None:
    assert core.delete_product("1").judge(204, "No Content", b"") is None


def test_the_escape_hatch_answers_json_or_none() -> None:
    assert core.request("GET", "/anything").judge(200, "OK", b'{"a": [1]}') == {"a": [1]}
    assert core.request("DELETE", "/anything").judge(204, "No Content", b"") is None


def test_a_reply_from_a_newer_server_with_more_fields_is_read() -> None:
    body = b'{"pid": "1", "name": "", "created_at": 0, "labels": ["new"]}'
    assert core.get_product("1").judge(200, "OK", body).pid == "1"


# -- retrying ---------------------------------------------------------------------------------


def test_an_idempotent_call_is_retried_on_503_only() -> None:
    call = core.get_product("1")
    assert call.attempts == BUSY_ATTEMPTS
    assert call.retry_delay(503, "3", 1) == 3.0
    assert call.retry_delay(503, "3", BUSY_ATTEMPTS) is None  # the last try is judged
    assert call.retry_delay(500, "3", 1) is None
    assert call.retry_delay(200, None, 1) is None


def test_a_create_and_a_stream_are_never_retried() -> None:
    assert core.create_product().attempts == 1
    assert core.create_product().retry_delay(503, "1", 1) is None
    streamed = core.request("PUT", "/packages/1", streamed=True)
    assert streamed.attempts == 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 1.0),
        ("2", 2.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("600", MAX_RETRY_AFTER_S),
        ("nan", 1.0),
        ("inf", 1.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),
    ],
)
def test_retry_after(value: str | None, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


# -- pages ------------------------------------------------------------------------------------


def test_the_last_page_ends_the_iteration() -> None:
    assert next_cursor(DevicePage(items=[], next=None), "5") is None


def test_a_cursor_that_does_not_move_is_refused() -> None:
    # Else a pagination loop against a faulty server (or proxy cache) would never end.
    page = DeviceTaskPage.model_validate(
        {"items": [{"dev_id": 1, "name": "a", "state": "failed", "paused_from": None,
                    "progress": 0, "result_code": None, "updated_at": 0, "finished_at": None}],
         "next": "1"}
    )  # fmt: skip
    assert next_cursor(page, None) == "1"
    with pytest.raises(ProtocolError, match="does not advance"):
        next_cursor(page, "1")
    with pytest.raises(ProtocolError, match="does not advance"):
        next_cursor(DevicePage(items=[], next="2"), "1")


# -- downloads --------------------------------------------------------------------------------


def _reader(content_length: str | None, data: bytes | None = None) -> DownloadReader:
    etag = None if data is None else f'"{hashlib.sha256(data).hexdigest()}"'
    return core.download_package(1).reader(content_length, etag)


def test_a_download_is_whole_when_length_and_digest_agree() -> None:
    reader = _reader("6", b"abcdef")
    reader.feed(b"abc")
    reader.feed(b"def")
    assert reader.finish() == 6


def test_a_download_longer_than_announced_stops_at_once() -> None:
    reader = _reader("3")
    with pytest.raises(ProtocolError, match="more than the 3 bytes"):
        reader.feed(b"abcd")


def test_a_short_download_is_refused() -> None:
    reader = _reader("6")
    reader.feed(b"abc")
    with pytest.raises(ProtocolError, match="after 3 of 6 bytes"):
        reader.finish()


def test_a_download_whose_digest_differs_is_refused() -> None:
    reader = _reader(None, b"abc")
    reader.feed(b"abd")
    with pytest.raises(ProtocolError, match="sha256"):
        reader.finish()


@pytest.mark.parametrize("etag", [None, "", 'W/"abc"', '"not-a-digest"'])
def test_an_etag_that_is_no_sha256_is_not_checked(etag: str | None) -> None:
    reader = core.download_package(1).reader(None, etag)
    reader.feed(b"anything")
    assert reader.finish() == 8


def test_a_content_length_that_is_no_number_is_refused() -> None:
    with pytest.raises(ProtocolError, match="Content-Length"):
        _reader("-1")


def test_a_download_names_the_file_route_and_is_retried_when_busy() -> None:
    call = core.download_package(42).call
    assert call.request.url.endswith("/api/v1/packages/42/file")
    assert call.attempts == BUSY_ATTEMPTS

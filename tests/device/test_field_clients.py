"""The client switches that shape requests as the field's clients do (§13.1), in every dialect:
``keep_alive=False`` (``Connection: close``) and ``range_for_whole_file=False`` (one GET without
Range), and the upgrader's ``report_full_progress`` option's validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from onenet_ota.device import Credentials, DeviceConfig, Dialect, InvalidArgumentError, Timeout
from onenet_ota.device._core import Call, ClientCore, Head
from onenet_ota.device.events import DownloadedChunk
from onenet_ota.device.upgrader import UpgradeOptions
from onenet_ota.protocol.status import TaskType
from tests.device.conftest import FIRMWARE, K1, TOKEN, task_data

TID = 4242


def _config(dialect: Dialect, **changes: Any) -> DeviceConfig:
    values: dict[str, Any] = {
        "credentials": Credentials.for_dialect(
            dialect, "123123", K1, device_name=None if dialect is Dialect.CLASSIC else "dev01"
        ),
        "dev_id": "987654321",
        "version": "1.0.0",
        "type": TaskType.FOTA,
        "dialect": dialect,
    }
    if dialect is not Dialect.CLASSIC:
        values.update(product_id="123123", device_name="dev01")
    values.update(changes)
    return DeviceConfig(**values)


def _core(dialect: Dialect, **changes: Any) -> ClientCore:
    core = ClientCore(_config(dialect, **changes), base_url="http://127.0.0.1:1", timeout=Timeout())
    if dialect is Dialect.CLASSIC:
        # The classic client learns the package's size from E3 (for the download's checks).
        body = json.dumps({"errno": 0, "error": "succ", "data": task_data()}).encode()
        _finish(core.check_task(), Head(200, (("Content-Length", str(len(body))),)), body)
    return core


def _finish(call: Call[Any], head: Head, body: bytes) -> Any:
    reader = call.begin(head)
    reader.feed(body)
    return reader.finish().value


def _task(dialect: Dialect) -> str | int:
    return TOKEN if dialect is Dialect.CLASSIC else TID


def _calls(core: ClientCore, dialect: Dialect) -> list[Call[Any]]:
    task = _task(dialect)
    calls: list[Call[Any]] = [
        core.post_version(),
        core.report_status(task, 101),
        core.download(task, 0, 4096, package_size=len(FIRMWARE)),
    ]
    if dialect is Dialect.CLASSIC:
        calls += [core.check_task(), core.check_token(TOKEN), core.tasking()]
    else:
        calls += [core.check_tid_task(), core.task_status(TID)]
    return calls


@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
def test_keep_alive_false_closes_every_request_s_connection(dialect: Dialect) -> None:
    for call in _calls(_core(dialect, keep_alive=False), dialect):
        assert call.request.header("Connection") == "close", call.request
    for call in _calls(_core(dialect), dialect):
        assert call.request.header("Connection") is None, call.request


@pytest.mark.parametrize("dialect", list(Dialect), ids=str)
def test_a_whole_file_download_goes_without_range_when_asked(dialect: Dialect) -> None:
    size = len(FIRMWARE)
    streaming = _core(dialect, range_for_whole_file=False)
    whole = streaming.download(_task(dialect), 0, size, package_size=size)
    assert whole.request.header("Range") is None
    # The reply is the whole file (200 without Content-Range, §10, §13.4) and is accepted.
    chunk: DownloadedChunk = _finish(whole, Head(200, (("Content-Length", str(size)),)), FIRMWARE)
    assert (chunk.start, chunk.end, chunk.data) == (0, size - 1, FIRMWARE)
    # Any other span still says which bytes it wants.
    for start, length in ((0, size - 1), (1, size)):
        call = streaming.download(_task(dialect), start, length, package_size=size)
        assert call.request.header("Range") is not None
    # By default even a whole-file request carries its Range.
    default = _core(dialect).download(_task(dialect), 0, size, package_size=size)
    assert default.request.header("Range") is not None


@pytest.mark.parametrize("name", ["keep_alive", "range_for_whole_file"])
def test_the_switches_must_be_booleans(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match=name):
        _config(Dialect.CLASSIC, **{name: 1})


def test_report_full_progress_must_be_a_boolean() -> None:
    assert UpgradeOptions(report_full_progress=True).report_full_progress
    with pytest.raises(ValueError, match="report_full_progress"):
        UpgradeOptions(report_full_progress=1)  # type: ignore[arg-type]

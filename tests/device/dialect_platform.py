"""A Studio or fuse platform with one device task, answering the scripted server's requests.

It routes with :func:`onenet_ota.protocol.dialects.match`, moves the task with the state tables
of :mod:`onenet_ota.protocol.states`, numbers its answers with :mod:`onenet_ota.protocol.codes`
and frames them with the envelopes and download framing the server will use, so the upgrader is
tested over real loopback HTTP against the spec's machine, not against hand-written replies.

``faults`` queues raw replies per operation (they replace the platform's answer, the request
having changed nothing); ``served`` replaces the package bytes a download serves (a corrupt
package under the right size and MD5 of the task).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onenet_ota.protocol import codes, states
from onenet_ota.protocol.codes import Dialect, Operation, Verdict
from onenet_ota.protocol.dialects import DIALECTS, match
from onenet_ota.protocol.envelopes import EnvelopeCodec
from onenet_ota.protocol.framing import error_reply, success_reply
from onenet_ota.protocol.messages import TidTaskInfo, status_data
from onenet_ota.protocol.ranges import parse_range
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import classify_step
from tests.device.scripted_server import Action, RecordedRequest, Reply, raw_response

REQUEST_ID = "0123456789abcdef0123456789abcdef"
Fault = Action | Callable[["DialectPlatform"], Action]
"""A canned reply, or a function of the platform that may change it first (under its lock)."""


@dataclass
class DialectPlatform:
    """One device task (``tid``) of ``package`` for the device pid/name, in ``dialect``."""

    dialect: Dialect
    package: bytes
    authorization: str
    tid: int = 4242
    target: str = "1.0.1"
    state: TaskState = TaskState.TO_BE_UPGRADED
    paused_from: TaskState | None = None
    served: bytes | None = None
    faults: dict[Operation, deque[Fault]] = field(default_factory=lambda: defaultdict(deque))
    log: list[tuple[Operation, int]] = field(default_factory=list)  # (operation, code)
    reports: list[int] = field(default_factory=list)  # accepted status reports (101+)
    versions: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def md5(self) -> str:
        return hashlib.md5(self.package, usedforsecurity=False).hexdigest()

    def task(self) -> TidTaskInfo:
        return TidTaskInfo(self.target, self.tid, len(self.package), self.md5, 1)

    def fault(self, operation: Operation, *actions: Fault) -> None:
        with self._lock:
            self.faults[operation].extend(actions)

    def pause(self) -> None:
        with self._lock:
            self.paused_from, self.state = self.state, TaskState.PAUSED

    def set_state(self, state: TaskState) -> None:
        with self._lock:
            self.state = state

    def operations(self) -> list[Operation]:
        return [op for op, _ in self.log]

    # -- the handler -------------------------------------------------------------------------

    def __call__(self, request: RecordedRequest) -> Action:
        route = match(request.path, {self.dialect})
        assert route is not None, f"unknown path {request.path}"
        spec = route.by_method[request.method]
        operation = spec.operation
        with self._lock:
            if self.faults[operation]:
                self.log.append((operation, -1))
                fault = self.faults[operation].popleft()
                return fault(self) if callable(fault) else fault
            if request.header("Authorization") != self.authorization:
                return self._refuse(operation, Verdict.AUTH_FAILED)
            if route.tid is not None and route.tid != self.tid:
                return self._refuse(operation, Verdict.UNKNOWN_TASK)
            if operation is Operation.DOWNLOAD:
                return self._download(request)
            return self._json(operation, request)

    def _codec(self) -> EnvelopeCodec:
        return DIALECTS[self.dialect].envelope

    def _reply(self, operation: Operation, code: int, data: dict[str, Any] | None) -> Reply:
        self.log.append((operation, code))
        codec = self._codec()
        text = codes.reply_text(self.dialect, code)
        rid = REQUEST_ID if codec.has_request_id else None
        body = codec.encode(code, text, data, request_id=rid)
        return Reply(raw_response(200, body, [("Content-Type", codec.content_type)]))

    def _refuse(self, operation: Operation, verdict: Verdict) -> Action:
        if operation is Operation.DOWNLOAD:  # S2/S7, F2/F8: the same names, Ota-Errno numbers
            return self.download_error(codes.DownloadVerdict(verdict.value))
        return self._reply(operation, codes.reply_code(self.dialect, operation, verdict), None)

    def _json(self, operation: Operation, request: RecordedRequest) -> Action:
        if operation is Operation.REPORT_VERSION:
            self.versions.update(json.loads(request.body))
            if self.state.is_open and self.target in self.versions.values():  # T6, D16
                self.state = TaskState.SUCCEEDED
            return self._reply(operation, 0, None)
        if operation is Operation.QUERY_VERSION:
            return self._reply(operation, 0, dict(self.versions))
        if operation is Operation.CHECK_TASK:
            version = dict(request.query).get("version")
            if self.state.is_active:
                return self._reply(operation, 0, self.task().to_data())
            if (
                self.state is TaskState.SUCCEEDED
                and version == self.target
                and (self.dialect is Dialect.FUSE)
            ):
                return self._refuse(operation, Verdict.ALREADY_ON_TARGET)  # F6: 12013
            return self._refuse(operation, Verdict.NO_TASK)
        if operation is Operation.CHECK_STATE:
            if self.dialect is Dialect.FUSE:  # F7: answers every state
                self.state = states.on_status_query(self.state)
                shown = states.wire_status(self.state, self.paused_from)
                return self._reply(operation, 0, status_data(shown))
            outcome = states.on_token_check(self.state, token_expired=False)  # S6
            if not outcome.ok:
                return self._refuse(operation, codes.verdict_of_errno(outcome.errno))
            assert outcome.state is not None
            self.state = outcome.state
            return self._reply(operation, 0, status_data(int(self.state)))
        assert operation is Operation.REPORT_STATUS
        step = json.loads(request.body)["step"]
        kind = classify_step(step)
        assert kind is not None
        outcome = states.on_report(self.state, kind)
        if not outcome.ok:
            return self._refuse(operation, codes.verdict_of_errno(outcome.errno))
        assert outcome.state is not None
        self.state = outcome.state
        if step > 100:
            self.reports.append(step)
        return self._reply(operation, 0, None)

    def download_error(self, verdict: codes.DownloadVerdict) -> Action:
        """The dialect's download error for ``verdict`` (Ota-Errno, §12.3, F8)."""
        code = codes.download_code(self.dialect, verdict)
        self.log.append((Operation.DOWNLOAD, code))
        return Reply(error_reply(DIALECTS[self.dialect].framing, code).to_bytes())

    def _download(self, request: RecordedRequest) -> Action:
        moved = states.on_download(self.state, moves=True)
        if moved is None:  # S7, F8: not downloadable
            return self.download_error(codes.DownloadVerdict.NOT_DOWNLOADABLE)
        self.state = moved
        data = self.served if self.served is not None else self.package
        header = request.header("Range")
        spec = parse_range(header) if header is not None else None
        start, end = spec.clamp(len(data)) if spec is not None else (0, len(data) - 1)
        reply = success_reply(
            DIALECTS[self.dialect].framing,
            file_name="firmware.bin",
            length=len(data),
            start=start,
            end=end,
            partial=spec is not None,
            body=data[start : end + 1],
        )
        self.log.append((Operation.DOWNLOAD, 0))
        return Reply(reply.to_bytes())

"""The Studio "things-model" and fuse-ota device APIs (spec §12, §13) on the classic listener.

One set of rules, one codec per dialect. A request's dialect is known from its path
(:func:`onenet_ota.protocol.dialects.match`); everything that differs between dialects is read
from that dialect's :class:`~onenet_ota.protocol.dialects.DialectSpec`: its token policy (S2,
F2), its envelope (§12.1, §13.2), its reply codes (:mod:`onenet_ota.protocol.codes`: the shared
verdicts numbered per dialect and operation) and its download framing (§12.3, §13.4). The rules
themselves are the classic ones, shared with :mod:`.device_api`: the same request decoding
(:mod:`.device_requests`), P1 and P3 (:meth:`.DeviceService.authenticate`,
:meth:`.DeviceService.binds`), the same state tables and transitions (one task for every dialect,
S10, F14), and the same package files and Range handling.

Order of the checks, every endpoint: the path (404 outside the grammars, docs/dialects.md), the
method (405 with ``Allow``), the body limit (413), then Authorization and the device named in the
path (S2, S3, F2, F4: an unknown product or device answers exactly as a bad signature), then the
endpoint's parameters and the task named by ``tid`` (a tid that is not this device's task answers
its dialect's "unknown task" code, never another device's task).

Classic's own handler runs first on the shared listener, so its fixed paths win (S1).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

from onenet_ota.protocol import values
from onenet_ota.protocol.codes import (
    REPLY_CODES,
    Dialect,
    DownloadVerdict,
    Operation,
    Verdict,
    download_code,
    reply_code,
    reply_text,
    verdict_of_errno,
)
from onenet_ota.protocol.dialects import DIALECTS, DialectSpec, EndpointSpec, Route, match
from onenet_ota.protocol.envelopes import new_request_id
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.framing import error_reply, success_reply
from onenet_ota.protocol.messages import MAX_JSON_REQUEST_BODY, status_data
from onenet_ota.protocol.ranges import parse_range
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import classify_step
from onenet_ota.server import wire
from onenet_ota.server.bounded_cache import BUDGETS, BoundedCache, weigh
from onenet_ota.server.device_caches import (
    ENTRY_BYTES,
    OBJECT_BYTES,
    ChunkKey,
    GrantMemo,
    MemoKey,
    OpenFiles,
    ReplyTemplate,
    check_state_tid_key,
    check_tid_task_key,
    chunk_key,
    download_tid_key,
    response_bytes,
)
from onenet_ota.server.device_requests import (
    Rejected,
    decode_report,
    decode_versions,
    parse_task_type,
    pread_all,
    range_header,
)
from onenet_ota.server.device_service import DeviceService, TidGrant
from onenet_ota.server.http import (
    SMALL_SEGMENT,
    BodyTooLarge,
    FileSegment,
    Request,
    RequestAborted,
    Response,
)
from onenet_ota.server.timeline import body_length, set_call

__all__ = ["FUSE_PREFIX", "SERVED_DIALECTS", "DialectApi"]

log = logging.getLogger(__name__)

SERVED_DIALECTS: Final = frozenset({Dialect.STUDIO, Dialect.FUSE})
"""The dialects this listener serves besides classic."""

# The classic errnos the shared rules answer, as verdicts; the state tables' outcomes are read
# by codes.verdict_of_errno.
_VERDICTS: Final = {
    Errno.AUTH_FAILED: Verdict.AUTH_FAILED,
    Errno.INVALID_PARAMETER: Verdict.INVALID_PARAMETER,
    Errno.INTERNAL_ERROR: Verdict.INTERNAL_ERROR,
    Errno.VERSION_MISMATCH: Verdict.FROM_VERSION_MISMATCH,
    Errno.INVALID_VERSION_FORMAT: Verdict.BAD_VERSION_FORMAT,
    Errno.NO_TASK: Verdict.NO_TASK,
}

FUSE_PREFIX: Final = "/fuse-ota/"
"""Where every fuse path starts (F1); no classic or Studio path does."""
# A cached Route beyond its path: the object and its strings (CPython 3.11, about).
_ROUTE_BYTES: Final = 400

# S6: Studio's S-T answers as E5 by state; F7: fuse's F-T refuses nothing by state.
_STATE_CHECK_REFUSES: Final = {Dialect.STUDIO: True, Dialect.FUSE: False}
# The questions a device repeats verbatim, whose replies are memoised.
_MEMOISED: Final = frozenset({Operation.CHECK_TASK, Operation.CHECK_STATE})
# What a cached memo holds beyond its key and response bytes: the Basis and the template
# objects (CPython 3.11, about).
_BASIS_BYTES: Final = 400
# The service's answer a reply was made from: its answers-cache key, errno and payload (the
# S-C/F-C task info or the S-T/F-T status).
_Fact = tuple[tuple[Any, ...], Errno, Any]


def _verdict(errno: Errno) -> Verdict:
    found = _VERDICTS.get(errno)
    return verdict_of_errno(errno) if found is None else found


class DialectApi:
    """The Studio and fuse endpoints over the classic API's ``service``, its open package
    ``files`` and its cache of small download replies (``chunks``)."""

    def __init__(
        self,
        service: DeviceService,
        files: OpenFiles,
        chunks: BoundedCache[ChunkKey, Response],
        *,
        dialects: Iterable[Dialect] = SERVED_DIALECTS,
    ) -> None:
        self.service = service
        self._files = files
        self._chunks = chunks
        self._memos = service.caches.dialect_replies
        self._grant_memos = service.caches.dialect_grants
        served = frozenset(dialects) - {Dialect.CLASSIC}
        # F1: fuse paths live under their own prefix, so a path is matched against one
        # dialect's table only.
        self._fuse = served & {Dialect.FUSE}
        self._others = served - {Dialect.FUSE}
        # A device repeats its paths (one per task and endpoint): matched once, then looked up.
        # Keyed by what clients send, so bounded (only paths that matched are kept).
        self._routes: BoundedCache[str, Route] = BoundedCache(BUDGETS.routes)

    def route(self, path: str) -> Route | None:
        """The route of ``path`` in the served dialects, or None (404)."""
        found = self._routes.get(path)
        if found is not None:
            return found
        found = match(path, self._fuse if path.startswith(FUSE_PREFIX) else self._others)
        if found is not None:
            self._routes.put(path, found, _ROUTE_BYTES + weigh(path))
        return found

    async def handle(self, request: Request, route: Route) -> Response:
        """Answer one request on ``route``. Never raises for a client's input."""
        endpoint = route.by_method.get(request.method)
        if endpoint is None:
            return wire.empty(405, allow=route.allow)
        spec = DIALECTS[route.dialect]
        set_call(route.dialect.value, endpoint.label)  # for the timeline events it causes
        if endpoint.operation is Operation.DOWNLOAD:
            try:
                return self._download(spec, request, route)
            except Exception:
                log.exception("%s failed", endpoint.label)
                return self._download_error(spec, DownloadVerdict.READ_FAILED)
        body = b""
        if request.content_length or request.chunked:
            try:
                body = await request.body(MAX_JSON_REQUEST_BODY)  # §4.3
            except BodyTooLarge:
                return wire.empty(413)
        memo_key: MemoKey | None = None
        authorization = request.header("Authorization")
        if authorization and endpoint.operation in _MEMOISED:
            # A polling device repeats its S-C/F-C (and Studio's S-T before every chunk)
            # verbatim: the same bytes get the same reply for as long as everything it was
            # computed from still holds (classic's memo, device_api).
            memo_key = (request.path, request.query_string, authorization)
            memo = self._memos.get(memo_key)
            if memo is not None:
                if self.service.caches.holds(memo[0]):
                    return memo[1].render()
                self._memos.pop(memo_key)
        fact: _Fact | None = None
        try:
            verdict, data, fact = self._json(spec, endpoint, request, route, body)
        except RequestAborted:
            raise
        except Exception:
            log.exception("%s failed", endpoint.label)
            verdict, data = Verdict.INTERNAL_ERROR, None
        response, request_id = self._reply(spec, endpoint.operation, verdict, data)
        if memo_key is not None and fact is not None:
            self._memoise(memo_key, route, endpoint.operation, fact, response, request_id)
        return response

    def _memoise(
        self,
        memo_key: MemoKey,
        route: Route,
        operation: Operation,
        fact: _Fact,
        response: Response,
        request_id: str | None,
    ) -> None:
        """Keep ``response`` for ``memo_key`` if the service has cached the answer it carries:
        the basis is taken after the answer, and kept only if its cached answer says the same
        (another thread may have invalidated and replaced it meanwhile)."""
        key, errno, payload = fact
        assert route.pid is not None
        assert route.name is not None
        basis = self.service.basis_named(memo_key[2], route.pid, route.name, key)
        if basis is None:
            return
        answer = basis.answer
        cached = answer.tid_info if operation is Operation.CHECK_TASK else answer.status
        if answer.errno is not errno or cached != payload:
            return
        template = ReplyTemplate.of(response, request_id)
        self._memos.put(memo_key, (basis, template), _BASIS_BYTES + 2 * response_bytes(response))

    # -- shared rules ------------------------------------------------------------------------

    def _device(self, spec: DialectSpec, request: Request, route: Route) -> int | None:
        """P1 and P3 with the device named in the path (S2, S3, F2, F4); None is "auth
        failed", the same answer for a bad signature and an unknown product or device."""
        principal = self.service.authenticate(request.header("Authorization"), spec.token_policy)
        if principal is None:
            return None
        assert route.pid is not None
        assert route.name is not None
        return self.service.device_named(principal, route.pid, route.name)

    def _json(
        self,
        spec: DialectSpec,
        endpoint: EndpointSpec,
        request: Request,
        route: Route,
        body: bytes,
    ) -> tuple[Verdict, dict[str, Any] | None, _Fact | None]:
        """The endpoint's verdict and data, and for S-C/S-T/F-C/F-T the service's answer they
        were made from (what a memoised reply rests on)."""
        dev_id = self._device(spec, request, route)
        if dev_id is None:
            return Verdict.AUTH_FAILED, None, None
        operation = endpoint.operation
        service = self.service
        if operation is Operation.REPORT_VERSION:  # S9, F5: as E1
            versions = decode_versions(body)
            if versions is None:
                return Verdict.INVALID_PARAMETER, None, None
            return _verdict(service.report_version(dev_id, *versions)), None, None
        if operation is Operation.QUERY_VERSION:  # as E2
            found = service.query_version(dev_id)
            return (Verdict.AUTH_FAILED, None, None) if found is None else (Verdict.OK, found, None)
        if operation is Operation.CHECK_TASK:  # S4, S5, F6: E3's rules, D17's order
            query = self._query(request)
            try:
                task_type = parse_task_type(query.get("type"))
            except Rejected as rejected:
                return _verdict(rejected.errno), None, None
            version = query.get("version")
            if version is None:
                return Verdict.INVALID_PARAMETER, None, None
            if not values.is_version(version):
                return Verdict.BAD_VERSION_FORMAT, None, None
            errno, info = service.check_task_tid(dev_id, task_type, version)
            verdict = _verdict(errno)
            # F6's 12013 rests on the same answer: the latest task changes only with a change
            # of the device's tasks, which drops every cached answer of the device.
            if (
                verdict is Verdict.NO_TASK
                and Verdict.ALREADY_ON_TARGET in REPLY_CODES[spec.dialect][operation]
                and service.reached_latest(dev_id, task_type, version)
            ):
                verdict = Verdict.ALREADY_ON_TARGET  # F6: 12013, where the dialect has it
            fact: _Fact = (check_tid_task_key(task_type, version), errno, info)
            return verdict, None if info is None else info.to_data(), fact
        assert route.tid is not None
        if operation is Operation.CHECK_STATE:  # S6, F7
            refuses = _STATE_CHECK_REFUSES[spec.dialect]
            found_state = service.check_state_tid(dev_id, route.tid, refuses=refuses)
            if found_state is None:
                return Verdict.UNKNOWN_TASK, None, None
            errno, status = found_state
            state_fact: _Fact = (check_state_tid_key(route.tid, refuses), errno, status)
            return _verdict(errno), None if status is None else status_data(status), state_fact
        if operation is Operation.REPORT_STATUS:  # S8, F9: the E7 table
            report = decode_report(body, "step", classify_step, Errno.INVALID_PARAMETER)
            outcome = service.report_tid(dev_id, route.tid, report)
            return (Verdict.UNKNOWN_TASK if outcome is None else _verdict(outcome)), None, None
        raise AssertionError(f"unrouted endpoint {endpoint.label}")  # pragma: no cover

    def _query(self, request: Request) -> dict[str, str]:
        """The parsed query; polling devices repeat theirs verbatim, so parses are reused (the
        classic handler's cache, read-only once kept)."""
        query_string = request.query_string
        if "%" not in query_string and "+" not in query_string:
            return request.query  # split at less than the cost of caching it (see DeviceApi)
        queries = self.service.caches.queries
        query = queries.get(query_string)
        if query is None:
            query = request.query
            size = sum(ENTRY_BYTES + weigh(key) + weigh(value) for key, value in query.items())
            queries.put(query_string, query, OBJECT_BYTES + size)
        return query

    def _reply(
        self,
        spec: DialectSpec,
        operation: Operation,
        verdict: Verdict,
        data: dict[str, Any] | None,
    ) -> tuple[Response, str | None]:
        """The reply, and the ``request_id`` in it (fuse, §13.2) or None."""
        code = reply_code(spec.dialect, operation, verdict)
        envelope = spec.envelope
        request_id = new_request_id() if envelope.has_request_id else None  # §13.2
        body = envelope.encode(
            code,
            reply_text(spec.dialect, code),
            data if verdict is Verdict.OK else None,
            request_id=request_id,
        )
        return wire.json_reply(body, envelope.content_type), request_id

    # -- downloads ---------------------------------------------------------------------------

    def _download_error(self, spec: DialectSpec, verdict: DownloadVerdict) -> Response:
        """S7, F8: the dialect's error framing, all of it in one write (§8.2 item 7)."""
        reply = error_reply(spec.framing, download_code(spec.dialect, verdict))
        return Response(reply.status, list(reply.headers), reply.body)

    def _download(self, spec: DialectSpec, request: Request, route: Route) -> Response:
        """S-D and F-D (S2, S7, F8, F10): Authorization, the task by tid, then classic's file
        checks and Range (D6 steps 3-6, §6.6.1); success on a to-be-upgraded task moves it to
        downloading."""

        def fail(verdict: DownloadVerdict) -> Response:
            return self._download_error(spec, verdict)

        assert route.tid is not None
        authorization = request.header("Authorization")
        memo_key = (request.path, authorization or "")
        memo = self._grant_memos.get(memo_key) if authorization else None
        if memo is not None and self.service.caches.holds(memo.basis):
            # A device fetches chunk after chunk with the same path and Authorization: P1, P3
            # and the task lookup rest on cached facts, re-checked here in a few lookups.
            dev_id, grant = memo.basis.dev_id, memo.basis.answer.grant
        else:
            found_dev_id = self._device(spec, request, route)
            if found_dev_id is None:
                return fail(DownloadVerdict.AUTH_FAILED)
            dev_id = found_dev_id
            grant = self.service.download_tid(dev_id, route.tid)
            if authorization and grant is not None and request.method == "GET":
                # GET only: cached_download answers GETs from this memo without a route
                self._memoise_grant(memo_key, route, spec, grant)
        if grant is None:
            return fail(DownloadVerdict.UNKNOWN_TASK)
        if not grant.downloadable:
            return fail(DownloadVerdict.NOT_DOWNLOADABLE)
        value = range_header(request.headers)
        key = chunk_key(grant, value, spec.dialect.value)
        cached = self._chunks.get(key)
        if cached is not None and self._files.size_if_open(grant.sha256) == grant.size:
            # Every device of a task fetches the same chunks: kept from a chunk's second read.
            self._downloaded(grant, dev_id, route.tid)
            self.service.served.add(route.tid, body_length(cached))
            return cached
        try:
            path, fd, size = self._files.get(grant.sha256)
        except FileNotFoundError:
            return fail(DownloadVerdict.PACKAGE_MISSING)
        except OSError:
            log.exception("%s cannot open a package file", spec.dialect.value)
            return fail(DownloadVerdict.READ_FAILED)
        if size != grant.size:
            return fail(DownloadVerdict.SIZE_MISMATCH)
        parsed = None if value is None else parse_range(value)
        start, end = parsed.clamp(size) if parsed is not None else (0, size - 1)
        length = end - start + 1
        body: bytes | FileSegment
        if length <= SMALL_SEGMENT:
            try:
                body = pread_all(fd, length, start)
            except OSError:
                log.exception("%s cannot read a package file", spec.dialect.value)
                return fail(DownloadVerdict.READ_FAILED)
        else:
            body = FileSegment(path, start, length, fallback=fail(DownloadVerdict.READ_FAILED))
        reply = success_reply(
            spec.framing,
            file_name=wire.safe_file_name(grant.file_name),
            length=size,
            start=start,
            end=end,
            partial=parsed is not None,
        )
        self._downloaded(grant, dev_id, route.tid)
        self.service.served.add(route.tid, length)  # in memory; flushed in batches
        response = Response(reply.status, list(reply.headers), body)
        if isinstance(body, bytes):
            self.service.caches.keep_chunk(key, response)
        return response

    def _memoise_grant(
        self, memo_key: tuple[str, str], route: Route, spec: DialectSpec, grant: TidGrant
    ) -> None:
        """Keep what S-D/F-D's checks rest on for ``memo_key`` (path, Authorization), if the
        service has cached all of it and its cached grant is the one just used."""
        assert route.pid is not None
        assert route.name is not None
        assert route.tid is not None
        basis = self.service.basis_named(
            memo_key[1], route.pid, route.name, download_tid_key(route.tid)
        )
        if basis is not None and basis.answer.grant is grant:
            memo = GrantMemo(basis, route.tid, spec.dialect.value)
            self._grant_memos.put(memo_key, memo, _BASIS_BYTES)

    def cached_download(self, request: Request) -> Response | None:
        """S-D/F-D from the caches alone, or None to let :meth:`handle` decide; for a GET.

        A device fetches chunk after chunk on one path with one Authorization value, and every
        device of a task fetches the same chunks: a memoised grant (P1, P3 and the task lookup,
        re-checked by :meth:`.DeviceCaches.holds`: the token's ``et``, the device's facts, the
        task's answer) and a cached chunk of the file, still open at the grant's size, answer
        it without matching the path. What the full way would do beyond this is left to it: a
        grant still to-be-upgraded (S7, F8: the first chunk moves the task to downloading, an
        event named by the request's endpoint), a task not downloadable (its error reply), a
        chunk not cached yet (the file read and its errors).
        """
        authorization = request.header("Authorization")
        if not authorization:
            return None
        memo = self._grant_memos.get((request.path, authorization))
        if memo is None:
            return None
        basis = memo.basis
        grant = basis.answer.grant
        if grant is None or not grant.downloadable or grant.state is TaskState.TO_BE_UPGRADED:
            return None
        caches = self.service.caches
        if not caches.holds(basis):
            return None
        key = chunk_key(grant, range_header(request.headers), memo.dialect)
        return caches.serve_chunk(key, self.service.served, memo.tid)

    def _downloaded(self, grant: TidGrant, dev_id: int, tid: int) -> None:
        if grant.state is TaskState.TO_BE_UPGRADED:  # S7, F8: the move to downloading
            self.service.downloaded_tid(dev_id, tid)

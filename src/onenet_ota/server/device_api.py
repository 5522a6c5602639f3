"""The classic device API, E1-E9 (spec §4-§6), as a handler for :mod:`onenet_ota.server.http`.

``DeviceApi(engine, blobs).handle`` answers every ``/ota`` path: routing (404, 405 with ``Allow``,
HEAD -> 405, D20), the body limit (413 past 4096 bytes, §4.3), the common pre-checks P1-P3 (§4.2),
each endpoint's parameter checks in the spec's order, and E6's byte-exact download (§6.6, D6-D8).
The rules over the database live in :mod:`onenet_ota.server.device_service`; the response bytes in
:mod:`onenet_ota.server.wire`.

Business outcomes are HTTP 200 with an errno (D1). Anything unexpected becomes errno 7 on a JSON
endpoint and byte 4 on a download; a traceback is logged (without credentials), never sent.

Performance (target: check-task and 4 KiB downloads at >= 0.5x a bare fixed-JSON endpoint on the
same HTTP layer; figures in docs/performance.md). Requests that change nothing are decided on
single-statement reads outside Core's execution machinery, and repeated questions are answered
from in-process caches that the change feed keeps current across processes (all of them, those
of this module included, live in one :class:`~.device_caches.DeviceCaches`; see
:mod:`.device_caches` and :mod:`.changes`). On top of them: a polling device repeats its E3/E5
request byte for byte, so its whole reply is memoised with what it rests on
(:meth:`.DeviceCaches.holds` re-checks that in a few lookups); and every device of a task fetches
the same chunks, so a small E6 reply is kept per (file, range) from the chunk's second read (the
first may be one device's own download, never asked again) and served while the token's grant is
usable and the open file keeps its size (an fstat, a tenth of the path lookup).

Every cache used here is keyed by what a client sends (a Range value, a query string, an
Authorization value), and a client may vary those with junk that changes nothing in the answer
(padding inside the Range, unknown query parameters or token fields). So each is a
:class:`~.bounded_cache.BoundedCache`, bounded by the bytes it holds with its keys, and the
budgets of all of them are in :data:`~.bounded_cache.BUDGETS`. The keys stay the raw bytes
rather than the question they mean (the Range parsed, the token's fields): normalising costs a
parse on every hot request (about 3 us for a Range here) and would bound nothing by itself, since
a client may ask as many distinct questions as it likes.

Database calls are synchronous and run inline on the event loop: statements take well under a
millisecond, and a pool of worker threads was slower on both databases (hand-offs and GIL
contention cost more than overlapping them gains; docs/performance.md).
"""

from __future__ import annotations

import logging
import operator
import re
import time
from dataclasses import fields, replace
from typing import Any, Final

from sqlalchemy import Engine

from onenet_ota.protocol import values
from onenet_ota.protocol.download import DownloadError
from onenet_ota.protocol.endpoints import DOWNLOAD_PREFIX, Endpoint, match_path
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import MAX_JSON_REQUEST_BODY, TaskInfo, encode_envelope
from onenet_ota.protocol.ranges import parse_range
from onenet_ota.protocol.status import classify_result, classify_step
from onenet_ota.server import wire
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.bounded_cache import weigh
from onenet_ota.server.changes import DEFAULT_INTERVAL
from onenet_ota.server.device_caches import (
    ENTRY_BYTES,
    OBJECT_BYTES,
    ChunkKey,
    Clock,
    DeviceCaches,
    MemoKey,
    check_task_key,
    check_token_key,
    chunk_key,
    response_bytes,
)
from onenet_ota.server.device_requests import (
    Rejected,
    decode_report,
    decode_versions,
    json_object,
    parse_task_type,
    pread_all,
    range_header,
)
from onenet_ota.server.device_service import (
    DEFAULT_CACHE_TTL,
    DeviceService,
    Principal,
)
from onenet_ota.server.dialect_api import FUSE_PREFIX, DialectApi
from onenet_ota.server.http import (
    SMALL_SEGMENT,
    BodyTooLarge,
    FileSegment,
    Request,
    RequestAborted,
    Response,
)
from onenet_ota.server.timeline import set_call

__all__ = ["DeviceApi"]

log = logging.getLogger(__name__)

_S_ID_RE: Final = re.compile(r"[0-9]{1,19}")  # §6.6: an NB base-station id, validated, ignored
# D6 step 6: sent by the HTTP layer instead of a segment it cannot read (never mutated there).
_READ_FAILED: Final = wire.download_error(DownloadError.READ_FAILED)


_CLASSIC: Final = "classic"  # the dialect part of a cached chunk's key
# How S-D and F-D paths end (§12.1, §13.1): other dialect paths skip the cached-download try.
_DIALECT_DOWNLOAD_ENDS: Final = ("/download", "/download/")
_TOKEN_KEY: Final = b'"token":"'  # where an E3/E4 reply's token starts
# Every field of a TaskInfo but its token, as a tuple (dataclasses.replace costs about 20 times
# more, and a field added to TaskInfo is part of the key without anyone remembering it here).
_WITHOUT_TOKEN: Final = operator.attrgetter(
    *(field.name for field in fields(TaskInfo) if field.name != "token")
)


class DeviceApi:
    """OneNET's classic device API over ``engine`` and the package files in ``blobs``.

    ``public_address`` is D10's download address (``host`` or ``host:port``, at most 31
    characters), returned as ``ipPort`` to devices that ask with ``cdn=true``. ``clock`` returns
    Unix seconds (token lifetimes, ``et``, deadlines, start times). ``cache_ttl`` is the longest a
    cached entry lives (0 disables the caches) and ``feed_interval`` how often the change feed of
    other processes is read (see :mod:`.device_caches` and :mod:`.changes`).
    """

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        public_address: str | None = None,
        clock: Clock = time.time,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        feed_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if public_address is not None and not values.is_ip_port(public_address):
            raise ValueError(
                f"public_address {public_address!r} is not host or host:port of at most "
                f"{values.IP_PORT_MAX_LEN} characters (D10)"
            )
        # Every cache, the wire-level ones of this class included, lives in one DeviceCaches
        # shared with the service; the hot paths keep direct references to theirs.
        caches = DeviceCaches(ttl=cache_ttl, clock=clock, blobs=blobs)
        self.service = DeviceService(
            engine, clock=clock, cache_ttl=cache_ttl, feed_interval=feed_interval, caches=caches
        )
        self._caches = caches
        self._public_address = public_address
        self._clock = clock
        assert caches.files is not None
        self._files = caches.files
        self._grants = caches.grants
        self._chunks = caches.chunks
        self._task_bodies = caches.task_bodies
        self._queries = caches.queries
        self._memos = caches.replies
        self._dialects = DialectApi(self.service, self._files, self._chunks)
        self._served = self.service.served

    def close(self) -> None:
        """Write the bytes served and the first offers still pending, close the read
        connections and the open package files."""
        try:
            self._served.flush()
        except Exception:
            log.warning("cannot write the bytes served at shutdown", exc_info=True)
        try:
            self.service.flush_offers()
        except Exception:
            log.warning("cannot write the first offers at shutdown", exc_info=True)
        self.service.close()  # and the caches' open files

    def flush_served(self) -> int:
        """Write the bytes served since the last flush (:class:`.timeline.ServedBytes`) and
        the first offers kept back (:meth:`.DeviceService.flush_offers`); returns how many
        device tasks' bytes were written. The offers are tried even when the bytes fail."""
        try:
            written = self._served.flush()
        finally:
            self.service.flush_offers()
        return written

    def endpoint_of(self, method: str, path: str) -> tuple[str, str] | None:
        """The dialect and endpoint label (``E3``, ``S-C``, ``F-D``) that :meth:`handle` routes
        ``method`` on ``path`` to, for the metrics and the access log; None for a path that
        names no endpoint (404). A method the path does not take (405) is named by the path's
        endpoints, as ``E1|E2``. Classic's paths win, as in :meth:`handle` (S1)."""
        route = match_path(path)
        if route is not None:
            found = route.by_method.get(method)
            if found is not None:
                return _CLASSIC, found.value
            return _CLASSIC, "|".join(sorted({e.value for e in route.by_method.values()}))
        other = self._dialects.route(path)  # cached: handle() just matched the same path
        if other is None:
            return None
        spec = other.by_method.get(method)
        if spec is not None:
            return other.dialect.value, spec.label
        return other.dialect.value, "|".join(sorted({s.label for s in other.by_method.values()}))

    # -- entry point ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request. Never raises for a client's input (only :class:`RequestAborted`,
        which the HTTP layer turns into a 400 or a dropped connection)."""
        self.service.sync()  # what other processes changed (cheap unless due)
        path = request.path
        if path.startswith(DOWNLOAD_PREFIX) and request.method == "GET":
            # Most requests of a rollout are chunks. Only issued tokens have cached grants, and
            # an issued token is one plain path segment, so a hit is E6 exactly as match_path
            # would route it (a trailing slash or /check never finds a grant: they go below).
            try:
                cached = self._cached_download(request, path[len(DOWNLOAD_PREFIX) :])
            except Exception:
                log.exception("E6 download failed")
                return wire.download_error(DownloadError.READ_FAILED)  # D6 step 6
            if cached is not None:
                return cached
        # Every classic path starts /ota/, so a fuse path (F1: its own prefix) skips classic's
        # matcher.
        route = None if path.startswith(FUSE_PREFIX) else match_path(path)
        if route is None:
            # Classic's paths win (S1); the other dialects' paths are tried only after them.
            if request.method == "GET" and path.endswith(_DIALECT_DOWNLOAD_ENDS):
                # A Studio/fuse chunk answered from the caches, as E6's above, before the
                # dialect's route is matched.
                try:
                    cached = self._dialects.cached_download(request)
                except Exception:
                    log.exception("cached S-D/F-D failed; trying the full way")
                    cached = None
                if cached is not None:
                    return cached
            other = self._dialects.route(path)
            if other is None:
                return wire.empty(404)
            return await self._dialects.handle(request, other)
        endpoint = route.by_method.get(request.method)
        if endpoint is None:  # D20: HEAD and every other method -> 405
            return wire.empty(405, allow=route.allow)
        if endpoint is Endpoint.DOWNLOAD:
            assert route.token is not None
            try:  # a cached chunk was answered above, before routing
                return await self._download(request, route.token)
            except Exception:
                log.exception("E6 download failed")
                return wire.download_error(DownloadError.READ_FAILED)  # D6 step 6
        # §4.3: a JSON endpoint's body is at most 4096 bytes; the declared length is checked
        # before anything is read.
        body = b""
        if request.content_length or request.chunked:  # most polls have no body: skip the reading
            try:
                body = await request.body(MAX_JSON_REQUEST_BODY)
            except BodyTooLarge:
                return wire.empty(413)
        try:
            return await self._json(endpoint, request, route.token, body)
        except RequestAborted:
            raise
        except Exception:
            log.exception("%s failed", endpoint.label)
            return wire.envelope(Errno.INTERNAL_ERROR)

    # -- JSON endpoints ------------------------------------------------------------------------

    async def _json(
        self, endpoint: Endpoint, request: Request, token: str | None, body: bytes
    ) -> Response:
        set_call(_CLASSIC, endpoint.value)  # "E7": for the timeline events this request causes
        authorization = request.header("Authorization")
        memo_key: MemoKey | None = None
        if authorization and (endpoint is Endpoint.CHECK_TASK or endpoint is Endpoint.CHECK_TOKEN):
            # A polling device repeats its request verbatim: the same bytes get the same reply
            # for as long as everything the reply was computed from still holds.
            memo_key = (request.path, request.query_string, authorization)
            memo = self._memos.get(memo_key)
            if memo is not None:
                if self._caches.holds(memo[0]):
                    return memo[1]
                self._memos.pop(memo_key)
        if (
            endpoint is Endpoint.CHECK_TASK
            and authorization
            and self._caches.principal(authorization) is None
        ):
            # The cold poll: P1, P3 and E3 on one read (valid parameters only: §4.2's order).
            query = self._query(request)
            dev_id = values.parse_dev_id(query.get("dev_id"))
            if dev_id is not None and self._caches.device(dev_id) is None:
                signed = self._check_task_fused(
                    dev_id, query, memo_key, authorization=authorization
                )
                if signed is not None:
                    return signed
        principal = await self._principal(authorization)
        if principal is None:
            return wire.envelope(Errno.AUTH_FAILED)  # P1
        if endpoint is Endpoint.DEV_INFO:
            return await self._dev_info(principal, body)
        query = self._query(request)
        dev_id = values.parse_dev_id(query.get("dev_id"))
        if dev_id is None:
            return wire.envelope(Errno.INVALID_PARAMETER)  # P2
        device = self._caches.device(dev_id)
        if device is None and endpoint is Endpoint.CHECK_TASK:
            fused = self._check_task_fused(dev_id, query, memo_key, principal=principal)
            if fused is not None:
                return fused
        if device is None:
            device = self.service.device(dev_id)
        if not self.service.binds(principal, device):
            return wire.envelope(Errno.AUTH_FAILED)  # P3
        try:
            if endpoint is Endpoint.POST_VERSION:
                return await self._post_version(dev_id, body)
            if endpoint is Endpoint.QUERY_VERSION:
                data = self.service.query_version(dev_id)
                if data is None:
                    return wire.envelope(Errno.AUTH_FAILED)
                return wire.envelope(Errno.SUCC, data)
            if endpoint is Endpoint.CHECK_TASK:
                return await self._check_task(dev_id, query, memo_key)
            if endpoint is Endpoint.TASKING:
                return await self._tasking(dev_id, query)
            if endpoint is Endpoint.CHECK_TOKEN:
                assert token is not None
                errno = self.service.check_token(dev_id, token)
                key = check_token_key(token)
                return self._memoise(memo_key, dev_id, key, errno, None, wire.envelope(errno))
            if endpoint is Endpoint.REPORT_PROGRESS:
                report = decode_report(body, "step", classify_step, Errno.INVALID_PARAMETER)
                return wire.envelope(self.service.report(dev_id, token, report))
            if endpoint is Endpoint.REPORT_RESULT:
                report = decode_report(body, "result", classify_result, Errno.INVALID_RESULT)
                errno = self.service.report(dev_id, query.get("token"), report)
                return wire.envelope(errno)
        except Rejected as rejected:
            return wire.envelope(rejected.errno)
        raise AssertionError(f"unrouted endpoint {endpoint}")  # pragma: no cover

    def _query(self, request: Request) -> dict[str, str]:
        """The parsed query; polling devices repeat theirs verbatim, so parses of queries with
        escapes are reused. One without (every device's poll) is split at less than the cost of
        keeping it: weighing and storing each device's own query (its dev_id) in a cache that
        a fleet's round of polls overflows before any repeat."""
        query_string = request.query_string
        if "%" not in query_string and "+" not in query_string:
            return request.query
        query = self._queries.get(query_string)
        if query is None:
            query = request.query
            size = sum(ENTRY_BYTES + weigh(key) + weigh(value) for key, value in query.items())
            self._queries.put(query_string, query, OBJECT_BYTES + size)  # read-only now
        return query

    async def _principal(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        return self.service.authenticate(authorization)

    async def _post_version(self, dev_id: int, body: bytes) -> Response:
        versions = decode_versions(body)  # D16
        if versions is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        return wire.envelope(self.service.report_version(dev_id, *versions))

    def _check_task_fused(
        self,
        dev_id: int,
        query: dict[str, str],
        memo_key: MemoKey | None,
        *,
        principal: Principal | None = None,
        authorization: str | None = None,
    ) -> Response | None:
        """E3 for a device not in the cache: P3 (and P1, given ``authorization`` rather than a
        verified ``principal``) on E3's own read (the cold polling path). None when a parameter
        is invalid: its errno must wait for P1 and P3 (§4.2's order)."""
        version = query.get("version")
        try:
            task_type, cdn = parse_task_type(query.get("type")), _cdn(query.get("cdn"))
        except Rejected:
            return None
        if version is None or not values.is_version(version):
            return None
        manuf, model = query.get("manuf") or None, query.get("model") or None
        errno, info = self.service.check_task(
            dev_id,
            task_type,
            version,
            manuf=manuf,
            model=model,
            principal=principal,
            authorization=authorization,
        )
        key = check_task_key(task_type, version, manuf, model)
        return self._memoise(memo_key, dev_id, key, errno, info, self._task_reply(errno, info, cdn))

    async def _check_task(
        self, dev_id: int, query: dict[str, str], memo_key: MemoKey | None
    ) -> Response:
        # §6.3 / D17, steps 2-4, in this order.
        task_type = parse_task_type(query.get("type"))
        version = query.get("version")
        if version is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        if not values.is_version(version):
            return wire.envelope(Errno.INVALID_VERSION_FORMAT)
        cdn = _cdn(query.get("cdn"))
        manuf, model = query.get("manuf") or None, query.get("model") or None
        errno, info = self.service.check_task(dev_id, task_type, version, manuf=manuf, model=model)
        key = check_task_key(task_type, version, manuf, model)
        return self._memoise(memo_key, dev_id, key, errno, info, self._task_reply(errno, info, cdn))

    def _memoise(
        self,
        memo_key: MemoKey | None,
        dev_id: int,
        key: tuple[Any, ...],
        errno: Errno,
        info: TaskInfo | None,
        response: Response,
    ) -> Response:
        """Keep ``response`` for ``memo_key`` if the service has cached the answer it carries.

        The basis is taken after the answer, and kept only if its cached answer says the same
        thing (the management side, in other threads, may have invalidated and replaced it).
        Responses are never mutated by the HTTP layer, so one object serves every repeat.
        """
        if memo_key is None:
            return response
        basis = self.service.basis(memo_key[2], dev_id, key)
        if basis is None or basis.answer.errno is not errno or basis.answer.info != info:
            return response
        # The key's strings are weighed by the cache; Basis holds the same Authorization object.
        self._memos.put(memo_key, (basis, response), _BASIS_BYTES + response_bytes(response))
        return response

    async def _tasking(self, dev_id: int, query: dict[str, str]) -> Response:
        task_type = parse_task_type(query.get("type"))  # §6.4 / D18
        cdn = _cdn(query.get("cdn"))
        errno, info = self.service.tasking(dev_id, task_type)
        return self._task_reply(errno, info, cdn)

    def _task_reply(self, errno: Errno, info: TaskInfo | None, cdn: bool) -> Response:
        if info is None:
            return wire.envelope(errno)
        # Every device of a task gets the same reply but for its own token (D13): the body is
        # kept once per task (the info without its token) and cdn, split around the token,
        # which is spliced in. Kept per device, a fleet polling at once would find none cached.
        token = info.token
        key = (errno, _WITHOUT_TOKEN(info), cdn)
        parts = self._task_bodies.get(key)
        if parts is None:
            shown = info
            if cdn and self._public_address is not None:  # D10
                shown = replace(info, ip_port=self._public_address)
            body = encode_envelope(errno, shown.to_data())
            # The data's keys come in §6.3's order, "target" (a version: no quote) before
            # "token", and the envelope's own keys name no token: the first one is the token's.
            start = body.index(_TOKEN_KEY) + len(_TOKEN_KEY)
            if body[start : start + len(token)] != token.encode():
                raise ValueError("the reply's token is not where the envelope puts it")
            parts = (body[:start], body[start + len(token) :])
            # The key's TaskInfo holds about what the body says.
            self._task_bodies.put(key, parts, OBJECT_BYTES + 2 * weigh(body))
        head, tail = parts
        return wire.json_reply(head + token.encode() + tail)

    async def _dev_info(self, principal: Principal, body: bytes) -> Response:
        # §6.9: P1 done; then the body (2), the pid (1), the lookup (1).
        obj = json_object(body)
        if obj is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        pid, auth_info = obj.get("pid"), obj.get("authInfo")
        # A pid is 1-32 characters [A-Za-z0-9] (§1); OneNET's classic ones are decimal and may
        # come as a JSON integer.
        pid_text = str(pid) if values.is_json_int(pid) and isinstance(pid, int) else pid
        if not values.is_pid(pid_text):
            return wire.envelope(Errno.INVALID_PARAMETER)
        # A lone surrogate (JSON "\ud800") is no text at all: it has no UTF-8 form (§2.4).
        if not isinstance(auth_info, str) or not _is_unicode(auth_info):
            return wire.envelope(Errno.INVALID_PARAMETER)
        if pid_text != principal.pid:
            return wire.envelope(Errno.AUTH_FAILED)
        if "\x00" in auth_info:
            # No device has one (the management API refuses NUL; PostgreSQL cannot store it).
            return wire.envelope(Errno.AUTH_FAILED)
        dev_id = self.service.dev_info(principal, auth_info)
        if dev_id is None:
            return wire.envelope(Errno.AUTH_FAILED)
        return wire.envelope(Errno.SUCC, {"dev_id": str(dev_id)})  # a string (§6.9)

    # -- E6 ------------------------------------------------------------------------------------

    async def _download(self, request: Request, token: str) -> Response:
        """E6 (§6.6, D5-D8): no Authorization; the path token is the credential."""
        if request.query_string:  # the C SDK sends none
            s_id = request.query.get("s_id")
            if s_id is not None and _S_ID_RE.fullmatch(s_id) is None:
                return wire.download_error(DownloadError.BAD_PARAMETER)  # step 1
        grant = self.service.download_grant(token)
        if grant is None or not grant.usable(self._clock()):
            return wire.download_error(DownloadError.INVALID_TOKEN)  # step 2
        range_value = range_header(request.headers)
        try:
            path, fd, size = self._files.get(grant.sha256)
        except FileNotFoundError:
            return wire.download_error(DownloadError.NOT_FOUND)  # step 3
        except OSError:
            log.exception("E6 cannot open a package file")
            return wire.download_error(DownloadError.READ_FAILED)
        if size != grant.size:
            return wire.download_error(DownloadError.SIZE_MISMATCH)  # step 4
        spec = None if range_value is None else parse_range(range_value)  # step 5
        start, end = spec.clamp(size) if spec is not None else (0, size - 1)
        length = end - start + 1
        body: bytes | FileSegment
        if length <= SMALL_SEGMENT:
            # Step 6, here, so that a failure is byte 4 before anything was sent; the bytes
            # then leave with the headers in one write.
            try:
                body = pread_all(fd, length, start)
            except OSError:
                log.exception("E6 cannot read a package file")
                return wire.download_error(DownloadError.READ_FAILED)
        else:
            # Large ranges go out with sendfile; the HTTP layer sends byte 4 instead if the
            # file cannot be read before the headers leave.
            body = FileSegment(path, start, length, fallback=_READ_FAILED)
        response = wire.download(
            file_name=grant.file_name,
            length=size,
            start=start,
            end=end,
            partial=spec is not None,
            body=body,
        )
        if isinstance(body, bytes):
            self._caches.keep_chunk(chunk_key(grant, range_value, _CLASSIC), response)
        self._served.add(grant.device_task_id, length)  # in memory; flushed in batches
        return response

    def _cached_download(self, request: Request, token: str) -> Response | None:
        """E6 from the caches alone, or None to let :meth:`_download` decide.

        Every device of a task asks for the same chunks of the same file: a small reply is kept
        per (file, range) from the chunk's second read and served again while the token's cached
        grant is usable and the file, still open, has its size (steps 2-4). A small range not
        kept is read here from the open file (one device's own download: every chunk is new).
        Anything else (a query string to validate, an uncached token, a file replaced or
        resized, a large range) goes the full way.
        """
        if request.query_string or "/" in token:  # E5's ".../check" is no E6
            return None
        grant = self._grants.get(token)  # only issued tokens are cached
        if grant is None or not grant.usable(self._clock()):
            return None
        key = chunk_key(grant, range_header(request.headers), _CLASSIC)
        return self._caches.serve_chunk(key, self._served, grant.device_task_id, self._small_range)

    def _small_range(self, fd: int, key: ChunkKey) -> Response | None:
        """Steps 5-6 for the range of ``key`` if it is at most :data:`SMALL_SEGMENT` bytes, read
        from the open file ``fd`` (of the key's size) and offered to the chunk cache
        (:meth:`.DeviceCaches.keep_chunk`); None for a larger range."""
        _, size, file_name, range_value, _ = key
        spec = None if range_value is None else parse_range(range_value)
        start, end = spec.clamp(size) if spec is not None else (0, size - 1)
        length = end - start + 1
        if length > SMALL_SEGMENT:
            return None
        response = wire.download(
            file_name=file_name,
            length=size,
            start=start,
            end=end,
            partial=spec is not None,
            body=pread_all(fd, length, start),
        )
        self._caches.keep_chunk(key, response)
        return response


# What cached values hold beyond their strings, for the caches' byte accounting (CPython 3.11):
# a Basis with the objects it alone holds about 300 (and see device_caches).
_BASIS_BYTES: Final = 300


# -- parameter decoding (pure) -------------------------------------------------------------------


def _cdn(value: str | None) -> bool:
    cdn = values.parse_cdn(value)
    if cdn is None:
        raise Rejected(Errno.INVALID_PARAMETER)
    return cdn


def _is_unicode(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form: no lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

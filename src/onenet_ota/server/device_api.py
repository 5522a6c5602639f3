"""The classic device API, E1-E9 (spec §4-§6), as a handler for :mod:`onenet_ota.server.http`.

``DeviceApi(engine, blobs).handle`` answers every ``/ota`` path: routing (404, 405 with ``Allow``,
HEAD -> 405, D20), the body limit (413 past 4096 bytes, §4.3), the common pre-checks P1-P3 (§4.2),
each endpoint's parameter checks in the spec's order, and E6's byte-exact download (§6.6, D6-D8).
The rules over the database live in :mod:`onenet_ota.server.device_service`; the response bytes in
:mod:`onenet_ota.server.wire`.

Business outcomes are HTTP 200 with an errno (D1). Anything unexpected becomes errno 7 on a JSON
endpoint and byte 4 on a download; a traceback is logged (without credentials), never sent.

Database calls are synchronous. ``db_threads=0`` runs them inline on the event loop, which is the
faster choice for SQLite: its statements take microseconds and the engine serialises writers with
BEGIN IMMEDIATE anyway, so threads only add lock waits. For PostgreSQL every statement is a network
round trip, and a small thread pool lets them overlap. The default picks by dialect (see
:func:`default_db_threads`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Final, TypeVar

from sqlalchemy import Engine

from onenet_ota.protocol import values
from onenet_ota.protocol.download import DownloadError
from onenet_ota.protocol.endpoints import Endpoint, match_path
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.messages import MAX_JSON_REQUEST_BODY, TaskInfo
from onenet_ota.protocol.ranges import parse_range
from onenet_ota.protocol.status import TaskType, classify_result, classify_step
from onenet_ota.server import wire
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_service import Clock, DeviceService, Principal, Report
from onenet_ota.server.http import BodyTooLarge, FileSegment, Request, RequestAborted, Response

__all__ = ["DeviceApi", "default_db_threads"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_S_ID_RE: Final = re.compile(r"[0-9]{1,19}")  # §6.6: an NB base-station id, validated, ignored


def default_db_threads(engine: Engine) -> int:
    """Worker threads for database calls: 0 (inline) for SQLite, 4 for PostgreSQL."""
    return 0 if engine.dialect.name == "sqlite" else 4


class _Rejected(Exception):
    """A request answered early with a fixed errno."""

    def __init__(self, errno: Errno) -> None:
        super().__init__(errno.text)
        self.errno = errno


class DeviceApi:
    """OneNET's classic device API over ``engine`` and the package files in ``blobs``.

    ``public_address`` is D10's download address (``host`` or ``host:port``, at most 31
    characters), returned as ``ipPort`` to devices that ask with ``cdn=true``. ``clock`` returns
    Unix seconds (token lifetimes, ``et``, deadlines, start times). ``cache_ttl`` bounds how stale
    the in-process caches may be towards other processes (see :mod:`.device_service`); 0 disables
    them. ``db_threads`` overrides :func:`default_db_threads`.
    """

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        public_address: str | None = None,
        clock: Clock = time.time,
        cache_ttl: float = 1.0,
        db_threads: int | None = None,
    ) -> None:
        if public_address is not None and not values.is_ip_port(public_address):
            raise ValueError(
                f"public_address {public_address!r} is not host or host:port of at most "
                f"{values.IP_PORT_MAX_LEN} characters (D10)"
            )
        self.service = DeviceService(engine, clock=clock, cache_ttl=cache_ttl)
        self._blobs = blobs
        self._public_address = public_address
        self._clock = clock
        threads = default_db_threads(engine) if db_threads is None else db_threads
        self._executor = (
            ThreadPoolExecutor(threads, thread_name_prefix="onenet-ota-db") if threads else None
        )

    def close(self) -> None:
        """Stop the database worker threads, if any."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- entry point ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request. Never raises for a client's input (only :class:`RequestAborted`,
        which the HTTP layer turns into a 400 or a dropped connection)."""
        route = match_path(request.path)
        if route is None:
            return wire.empty(404)
        endpoint = route.by_method.get(request.method)
        if endpoint is None:  # D20: HEAD and every other method -> 405
            return wire.empty(405, allow=route.allow)
        if endpoint is Endpoint.DOWNLOAD:
            assert route.token is not None
            try:
                return await self._download(request, route.token)
            except Exception:
                log.exception("E6 download failed")
                return wire.download_error(DownloadError.READ_FAILED)  # D6 step 6
        # §4.3: a JSON endpoint's body is at most 4096 bytes; the declared length is checked
        # before anything is read.
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
        principal = await self._principal(request.header("Authorization"))
        if principal is None:
            return wire.envelope(Errno.AUTH_FAILED)  # P1
        if endpoint is Endpoint.DEV_INFO:
            return await self._dev_info(principal, body)
        query = request.query
        dev_id = values.parse_dev_id(query.get("dev_id"))
        if dev_id is None:
            return wire.envelope(Errno.INVALID_PARAMETER)  # P2
        device = self.service.device_cached(dev_id) or await self._db(self.service.device, dev_id)
        if not self.service.binds(principal, device):
            return wire.envelope(Errno.AUTH_FAILED)  # P3
        try:
            if endpoint is Endpoint.POST_VERSION:
                return await self._post_version(dev_id, body)
            if endpoint is Endpoint.QUERY_VERSION:
                data = await self._db(self.service.query_version, dev_id)
                if data is None:
                    return wire.envelope(Errno.AUTH_FAILED)
                return wire.envelope(Errno.SUCC, data)
            if endpoint is Endpoint.CHECK_TASK:
                return await self._check_task(dev_id, query)
            if endpoint is Endpoint.TASKING:
                return await self._tasking(dev_id, query)
            if endpoint is Endpoint.CHECK_TOKEN:
                assert token is not None
                return wire.envelope(await self._db(self.service.check_token, dev_id, token))
            if endpoint is Endpoint.REPORT_PROGRESS:
                report = _decode_report(body, "step", classify_step, Errno.INVALID_PARAMETER)
                return wire.envelope(await self._db(self.service.report, dev_id, token, report))
            if endpoint is Endpoint.REPORT_RESULT:
                report = _decode_report(body, "result", classify_result, Errno.INVALID_RESULT)
                errno = await self._db(self.service.report, dev_id, query.get("token"), report)
                return wire.envelope(errno)
        except _Rejected as rejected:
            return wire.envelope(rejected.errno)
        raise AssertionError(f"unrouted endpoint {endpoint}")  # pragma: no cover

    async def _principal(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        principal = self.service.authenticate_cached(authorization)
        if principal is None:
            principal = await self._db(self.service.authenticate, authorization)
        return principal

    async def _post_version(self, dev_id: int, body: bytes) -> Response:
        # D16: a JSON object with at least one of the keys, each a version string.
        obj = _json_object(body)
        if obj is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        versions: dict[str, str | None] = {"f_version": None, "s_version": None}
        for key in versions:
            if key in obj:
                if not values.is_version(obj[key]):
                    return wire.envelope(Errno.INVALID_PARAMETER)
                versions[key] = obj[key]
        if versions["f_version"] is None and versions["s_version"] is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        errno = await self._db(
            self.service.report_version, dev_id, versions["f_version"], versions["s_version"]
        )
        return wire.envelope(errno)

    async def _check_task(self, dev_id: int, query: dict[str, str]) -> Response:
        # §6.3 / D17, steps 2-4, in this order.
        task_type = _task_type(query.get("type"))
        version = query.get("version")
        if version is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        if not values.is_version(version):
            return wire.envelope(Errno.INVALID_VERSION_FORMAT)
        cdn = _cdn(query.get("cdn"))
        errno, info = await self._db(
            functools.partial(
                self.service.check_task,
                dev_id,
                task_type,
                version,
                manuf=query.get("manuf") or None,
                model=query.get("model") or None,
            )
        )
        return self._task_reply(errno, info, cdn)

    async def _tasking(self, dev_id: int, query: dict[str, str]) -> Response:
        task_type = _task_type(query.get("type"))  # §6.4 / D18
        cdn = _cdn(query.get("cdn"))
        errno, info = await self._db(self.service.tasking, dev_id, task_type)
        return self._task_reply(errno, info, cdn)

    def _task_reply(self, errno: Errno, info: TaskInfo | None, cdn: bool) -> Response:
        if info is None:
            return wire.envelope(errno)
        if cdn and self._public_address is not None:  # D10
            info = replace(info, ip_port=self._public_address)
        return wire.envelope(errno, info.to_data())

    async def _dev_info(self, principal: Principal, body: bytes) -> Response:
        # §6.9: P1 done; then the body (2), the pid (1), the lookup (1).
        obj = _json_object(body)
        if obj is None:
            return wire.envelope(Errno.INVALID_PARAMETER)
        pid, auth_info = obj.get("pid"), obj.get("authInfo")
        if values.is_json_int(pid) and isinstance(pid, int) and pid >= 0:
            pid_text = str(pid)
        elif isinstance(pid, str) and pid.isascii() and pid.isdigit():
            pid_text = pid
        else:
            return wire.envelope(Errno.INVALID_PARAMETER)
        if not isinstance(auth_info, str):
            return wire.envelope(Errno.INVALID_PARAMETER)
        if pid_text != principal.pid:
            return wire.envelope(Errno.AUTH_FAILED)
        dev_id = await self._db(self.service.dev_info, principal, auth_info)
        if dev_id is None:
            return wire.envelope(Errno.AUTH_FAILED)
        return wire.envelope(Errno.SUCC, {"dev_id": str(dev_id)})  # a string (§6.9)

    # -- E6 ------------------------------------------------------------------------------------

    async def _download(self, request: Request, token: str) -> Response:
        """E6 (§6.6, D5-D8): no Authorization; the path token is the credential."""
        s_id = request.query.get("s_id")
        if s_id is not None and _S_ID_RE.fullmatch(s_id) is None:
            return wire.download_error(DownloadError.BAD_PARAMETER)  # step 1
        if values.TOKEN_RE.fullmatch(token) is None:
            return wire.download_error(DownloadError.INVALID_TOKEN)
        grant = self.service.download_grant_cached(token)
        if grant is None:
            grant = await self._db(self.service.download_grant, token)
        if grant is None or not grant.usable(self._clock()):
            return wire.download_error(DownloadError.INVALID_TOKEN)  # step 2
        path = str(self._blobs.path(grant.sha256))
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return wire.download_error(DownloadError.NOT_FOUND)  # step 3
        except OSError:
            log.exception("E6 cannot stat a package file")
            return wire.download_error(DownloadError.READ_FAILED)
        if size != grant.size:
            return wire.download_error(DownloadError.SIZE_MISMATCH)  # step 4
        # Step 5. More than one Range header is malformed: served as if none was sent (§6.6.1).
        spec = None
        if request.header_count("Range") == 1:
            value = request.header("Range")
            spec = parse_range(value) if value is not None else None
        start, end = spec.clamp(size) if spec is not None else (0, size - 1)
        # Steps 6-7: the HTTP layer reads the segment before writing anything and sends byte 4
        # instead if the read fails.
        segment = FileSegment(
            path,
            start,
            end - start + 1,
            fallback=wire.download_error(DownloadError.READ_FAILED),
        )
        return wire.download(
            file_name=grant.file_name,
            length=size,
            start=start,
            end=end,
            partial=spec is not None,
            body=segment,
        )


# -- parameter decoding (pure) -------------------------------------------------------------------


def _task_type(value: str | None) -> TaskType:
    if value == "1":
        return TaskType.FOTA
    if value == "2":
        return TaskType.SOTA
    raise _Rejected(Errno.INVALID_PARAMETER)  # "exactly 1 or 2" (§4.5)


def _cdn(value: str | None) -> bool:
    cdn = values.parse_cdn(value)
    if cdn is None:
        raise _Rejected(Errno.INVALID_PARAMETER)
    return cdn


def _json_object(body: bytes) -> dict[str, Any] | None:
    """A UTF-8 JSON object (§2.4), or None."""
    if not body:
        return None
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _decode_report(
    body: bytes,
    key: str,
    classify: Callable[[int], Any],
    body_errno: Errno,
) -> Report | Errno:
    """E7's ``step`` / E8's ``result``: a JSON integer (never a bool, §2.4) of a valid kind."""
    obj = _json_object(body)
    if obj is None:
        return body_errno
    value = obj.get(key)
    if not values.is_json_int(value):
        return body_errno
    assert isinstance(value, int)
    kind = classify(value)
    if kind is None:
        return Errno.INVALID_PARAMETER  # E7 step 4, E8 step 4
    return Report(kind, value)

"""Composition of the platform: one handler for both APIs, and the process model that runs it.

``create_app(settings)`` builds the parts over one database and one data directory and returns
``(handler, resources)``: ``/api/v1`` goes to the management API (:class:`AdminApi`),
``/healthz``, ``/readyz`` and ``/metrics`` to the operations endpoints (:class:`OpsApi`), every
other path to OneNET's device APIs (:class:`DeviceApi`). Every request is counted for the metrics
(:mod:`.metrics`) and, when asked, written to the access log (:mod:`.logs`). No globals:
everything hangs off the returned :class:`AppResources`.

``run(settings)`` is ``onenet-ota serve``:

1. the database is migrated (safe when several servers start at once, see ``db.migrate``), and
   what a crash left in the package store is removed (``AdminService.sweep_storage``);
2. on the first start (an empty token table) the management API's admin token is created, with
   the configured secret or a generated one that is printed once (``api_tokens.py``);
3. the listening socket is bound once, in this process;
4. ``workers=1`` serves in this process; ``workers=N`` starts N worker processes (spawned, not
   forked) that share the socket, and restarts one that dies; workers stop when the supervisor
   dies, even by SIGKILL, so none is left holding the port;
5. SIGINT/SIGTERM stop accepting, let in-flight requests finish (up to ``GRACE_S``), then exit.

TLS (D25) wraps the listener with :func:`onenet_ota.server.http.make_server_ssl_context` in its
C-SDK-compatible mode: TLS 1.2 with the official SDK's four RSA AES-CBC suites, modern suites
preferred for everyone else.

With several workers, the supervisor makes a private directory where the workers share their
metric counts (:mod:`.metrics`), and removes it when it stops.

One process (the only one, or worker 0) sweeps deadlines every ``sweep_interval`` seconds (T5,
D23) through the device service's own function; devices also see expiry lazily on each request.
Every process runs the campaign evaluator (server/campaigns.py); a lease in the database lets
exactly one of them, on any host, act at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from onenet_ota.server.admin_api import PREFIX, ROUTES, AdminApi
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.api_tokens import TokenStore
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.bounded_cache import BoundedCache
from onenet_ota.server.campaigns import CampaignEvaluator, CampaignService
from onenet_ota.server.config import Settings
from onenet_ota.server.console import PREFIX as CONSOLE_PREFIX
from onenet_ota.server.db import create_engine, migrate
from onenet_ota.server.device_api import DeviceApi
from onenet_ota.server.http import (
    Handler,
    Limits,
    Request,
    RequestAborted,
    Response,
    make_server_ssl_context,
    new_event_loop,
    serve,
)
from onenet_ota.server.logs import AccessLog, configure_logging
from onenet_ota.server.metrics import FLUSH_INTERVAL, Metrics
from onenet_ota.server.ops_api import OPS_PATHS, OpsApi
from onenet_ota.server.push import TaskPusher

__all__ = ["AppResources", "bind_socket", "create_app", "http_limits", "run", "ssl_context"]

log = logging.getLogger(__name__)

GRACE_S: Final = 10.0
_RESTART_DELAY_S: Final = 1.0
_MAX_QUICK_DEATHS: Final = 5  # workers dying this often within a minute means a broken setup
# Age after which a file in the package store's tmp, or a stored file no package refers to, is a
# leftover of a crash. Other workers and hosts may share the store: an upload they are receiving
# is written whenever data arrives and ends after idle_timeout (at most an hour) without any, and
# a file just stored is recorded at once. Two hours leaves room for a slow final fsync.
STALE_FILE_S: Final = 2 * 3600.0
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
_PARENT_POLL_S: Final = 1.0
# How often each worker writes the bytes it served (server/timeline.py): how long a timeline may
# lag behind the downloads.
SERVED_FLUSH_S: Final = 1.0


@dataclass
class AppResources:
    """What :func:`create_app` built; :meth:`aclose` releases it."""

    settings: Settings
    engine: Engine
    blobs: BlobStore
    device_api: DeviceApi
    admin_api: AdminApi
    evaluator: CampaignEvaluator
    metrics: Metrics
    pusher: TaskPusher | None = None
    _closed: bool = field(default=False, repr=False)

    def sweep_deadlines(self) -> int:
        """T5 for every task whose deadline passed; returns how many device tasks failed."""
        return self.device_api.service.expire_deadlines()

    async def sweep_forever(self, interval: float) -> None:
        """Run :meth:`sweep_deadlines` every ``interval`` seconds until cancelled."""
        while True:
            try:
                changed = await asyncio.to_thread(self.sweep_deadlines)
                if changed:
                    log.info("deadline sweep: %d device task(s) failed (T5)", changed)
            except Exception:
                log.exception("deadline sweep failed; retrying at the next interval")
            await asyncio.sleep(interval)

    async def flush_served_forever(self, interval: float) -> None:
        """Write the bytes served (device timelines) every ``interval`` seconds until
        cancelled; one small transaction per interval, none when nothing was served."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.device_api.flush_served()
            except Exception:
                log.warning("cannot write the bytes served; retrying at the next interval")

    async def flush_metrics_forever(self, interval: float = FLUSH_INTERVAL) -> None:
        """Share this worker's metric counts every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.metrics.flush)
            except OSError:
                log.warning("cannot write this worker's metrics; retrying", exc_info=True)

    async def aclose(self) -> None:
        """Stop push deliveries, close database connections and package files."""
        if self._closed:
            return
        self._closed = True
        if self.pusher is not None:
            await self.pusher.aclose()
        with contextlib.suppress(OSError):
            self.metrics.flush()  # this worker's last counts, for the scrapes to come
        self.device_api.close()
        self.engine.dispose()


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    pusher: TaskPusher | None = None,
    metrics_dir: Path | None = None,
) -> tuple[Handler, AppResources]:
    """The combined handler and its resources. The database must already be migrated.

    ``settings.admin_token``, if set, becomes the admin token on an empty token table (the first
    start; see ``api_tokens.py``). ``pusher`` is a verified :class:`TaskPusher`, or None for no
    task push. ``metrics_dir`` is where the worker processes of one server share their metric
    counts (None: this process is the server).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    blobs = BlobStore(settings.packages_dir)
    device_api = DeviceApi(
        engine,
        blobs,
        public_address=settings.public_address,
        clock=clock,
        cache_ttl=settings.cache_ttl,
    )
    service = AdminService(
        engine,
        blobs,
        clock=clock,
        # Management changes drop this process's device-API caches at once; other processes learn
        # of them through the change feed (server/changes.py).
        on_change=device_api.service.invalidate,
    )
    campaigns = CampaignService(engine, clock=clock, on_change=device_api.service.invalidate)
    notify = pusher.notify if pusher is not None else None
    admin_api = AdminApi(
        service,
        admin_token=(
            settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        ),
        max_upload_bytes=settings.max_upload_bytes,
        on_task_created=notify,
        campaigns=campaigns,
    )
    caches = {
        name: cache
        for name, cache in vars(device_api.service.caches).items()
        if isinstance(cache, BoundedCache)
    }
    endpoint_of = device_api.endpoint_of

    def classify(method: str, path: str, answer: int | str) -> tuple[str, str] | None:
        # Labels only ever take the values of the route tables, never a client's path.
        if path == PREFIX or path.startswith(PREFIX + "/"):
            operation = _admin_operation(method, path)
            return None if operation is None else ("admin", operation)
        if path in OPS_PATHS:
            return "ops", path[1:]
        if path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
            return "console", "page"  # one label for every console page: no client values
        if answer == 404:  # the device API's one 404: a path that names no endpoint
            return None
        return endpoint_of(method, path)

    metrics = Metrics(engine, classify=classify, caches=caches, share_dir=metrics_dir)
    event.listen(engine, "handle_error", metrics.on_engine_error)
    device_api.service.on_database_error(metrics.database_error)
    ops_api = OpsApi(
        metrics,
        engine,
        access=settings.metrics,
        token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
    )
    evaluator = CampaignEvaluator(campaigns, on_created=notify)
    resources = AppResources(
        settings, engine, blobs, device_api, admin_api, evaluator, metrics, pusher
    )
    admin_handle = admin_api.handle
    device_handle = device_api.handle
    ops_handle = ops_api.handle
    console_handle = _console(settings, service, admin_api)
    stats = metrics.requests
    count = stats.request
    access_log = AccessLog() if settings.access_log else None
    clock = time.perf_counter

    admin_prefix = PREFIX + "/"

    def done(request: Request, answer: int | str, response: Response | None, start: float) -> None:
        seconds = clock() - start
        count(request.method, request.path, answer, seconds)
        if access_log is not None:
            labels = stats.labels(request.method, request.path, answer)
            access_log.write(request, answer, response, seconds, *labels)

    async def handle(request: Request) -> Response:
        start = clock()
        path = request.path
        try:
            if path == PREFIX or path.startswith(admin_prefix):
                response = await admin_handle(request)
            elif path in OPS_PATHS:
                response = await ops_handle(request)
            elif console_handle is not None and (
                path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
            ):
                response = await console_handle(request)
            else:
                response = await device_handle(request)
        except RequestAborted:
            done(request, "aborted", None, start)
            raise
        except Exception:
            done(request, 500, None, start)  # the HTTP layer answers 500
            raise
        if access_log is None:  # the common case, inline: a function call less per request
            count(request.method, path, response.status, clock() - start)
        else:
            done(request, response.status, response, start)
        return response

    return handle, resources


def _console(settings: Settings, service: AdminService, admin_api: AdminApi) -> Handler | None:
    if not settings.console:
        return None
    # Imported here: Jinja2 and Babel load only when the console is on.
    from onenet_ota.server.console.app import Console
    from onenet_ota.server.console.sessions import SessionCodec, load_or_create_key

    console = Console(
        service,
        admin_api,
        admin_api.tokens,
        SessionCodec(
            load_or_create_key(settings.data_dir),
            lifetime=settings.console_session_hours * 3600,
        ),
        secure=settings.tls_cert is not None,
        max_upload_bytes=settings.max_upload_bytes,
    )
    return console.handle


def _admin_operation(method: str, path: str) -> str | None:
    """The management operation (``list_products``) of ``method`` on ``path``, by the route
    table's templates; None for a path of no route. A method the path does not take is named
    by the path's operations, as ``delete_product|get_product``."""
    segments = path[len(PREFIX) :].strip("/").split("/") if path.strip("/") != PREFIX[1:] else []
    segments = [segment for segment in segments if segment]
    wanted = "GET" if method == "HEAD" else method
    found: list[str] = []
    for route in ROUTES:
        template = route.segments
        if len(template) != len(segments):
            continue
        if all(t.startswith("{") or t == s for t, s in zip(template, segments, strict=True)):
            if route.method == wanted:
                return route.operation
            found.append(route.operation)
    return "|".join(sorted(found)) if found else None


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context (D25), or None for plain HTTP."""
    if settings.tls_cert is None:
        return None
    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            # ssl's own error does not name the file.
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    return make_server_ssl_context(settings.tls_cert, settings.tls_key, c_sdk_compatible=True)


def http_limits(settings: Settings) -> Limits:
    """The HTTP layer's limits from the settings; the rest keep :class:`Limits`'s defaults."""
    limits = Limits(
        idle_timeout=settings.idle_timeout,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        handshake_timeout=settings.handshake_timeout,
    )
    if settings.max_connections is not None:
        limits = dataclasses.replace(limits, max_connections=settings.max_connections)
    return limits


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


# --------------------------------------------------------------------------------------------
# Serving


async def _serve(
    settings: Settings,
    sock: socket.socket,
    *,
    sweeper: bool,
    push_verified: bool,
    stop: asyncio.Event,
    metrics_dir: Path | None = None,
) -> None:
    pusher: TaskPusher | None = None
    if settings.push_url is not None and settings.push_token is not None and push_verified:
        pusher = TaskPusher(
            settings.push_url, settings.push_token.get_secret_value(), settings.push_uid
        )
        pusher.verified = True  # the parent verified the URL once (D24)
    handler, resources = create_app(settings, pusher=pusher, metrics_dir=metrics_dir)
    server = asyncio.create_task(
        serve(handler, sock=sock, ssl=ssl_context(settings), limits=http_limits(settings))
    )
    # Every process runs the campaign evaluator; the lease lets one of them act at a time.
    background: list[asyncio.Task[None]] = [
        asyncio.create_task(resources.flush_served_forever(SERVED_FLUSH_S)),
        asyncio.create_task(resources.evaluator.run_forever()),
    ]
    if sweeper:
        background.append(asyncio.create_task(resources.sweep_forever(settings.sweep_interval)))
    if metrics_dir is not None:
        background.append(asyncio.create_task(resources.flush_metrics_forever()))
    try:
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if server.done():
            server.result()  # a startup failure: raise it
    finally:
        for task in background:
            task.cancel()
        server.cancel()  # serve_forever closes gracefully on cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, GRACE_S + 5)
        await asyncio.gather(*background, return_exceptions=True)
        await resources.aclose()


def _run_loop(
    settings: Settings,
    sock: socket.socket,
    *,
    sweeper: bool,
    push_verified: bool,
    early_stop: threading.Event | None = None,
    metrics_dir: Path | None = None,
) -> None:
    """Serve on ``sock`` in this process until SIGINT or SIGTERM (or at once if ``early_stop``,
    a stop that arrived before the loop's handlers were installed, is set)."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if early_stop is not None and early_stop.is_set():
        stop.set()
    try:
        loop.run_until_complete(
            _serve(
                settings,
                sock,
                sweeper=sweeper,
                push_verified=push_verified,
                stop=stop,
                metrics_dir=metrics_dir,
            )
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _worker(
    settings: Settings,
    sock: socket.socket,
    index: int,
    push_verified: bool,
    log_level: int,
    supervisor: int,
    metrics_dir: Path,
) -> None:
    """A worker process's entry point (spawned: it imports everything afresh)."""
    _stop_with_supervisor(supervisor)
    configure_logging(log_level, settings.log_format, worker=index)
    _run_loop(
        settings, sock, sweeper=index == 0, push_verified=push_verified, metrics_dir=metrics_dir
    )


def _stop_with_supervisor(supervisor: int) -> None:
    """Stop this worker when the supervisor process ``supervisor`` dies, however it dies.

    A supervisor killed by SIGKILL (the OOM killer, ``kill -9``) runs no cleanup, and workers left
    behind would keep serving the shared port: a new ``serve`` then fails with "address in use".
    On Linux the kernel sends the worker SIGTERM when its parent dies (PR_SET_PDEATHSIG). That
    request comes too late if the supervisor died before it was made, and other systems have
    none, so a thread also watches the parent pid: once the worker has another parent, it sends
    SIGTERM itself (a graceful stop, as the supervisor would ask for), and if the worker is still
    there ``GRACE_S`` later, it exits at once, as the supervisor would kill it.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        except (OSError, AttributeError) as exc:
            log.warning("cannot ask to be stopped with the supervisor (%s); polling instead", exc)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(_PARENT_POLL_S)
        log.error("the supervisor (pid %d) is gone; stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S + 5)
        os._exit(1)

    threading.Thread(target=watch, name="onenet-ota-supervisor-watch", daemon=True).start()


def _verify_push(settings: Settings) -> bool:
    if settings.push_url is None or settings.push_token is None:
        return False
    pusher = TaskPusher(
        settings.push_url, settings.push_token.get_secret_value(), settings.push_uid
    )

    async def verify() -> bool:
        try:
            return await pusher.verify()
        finally:
            await pusher.aclose()

    return asyncio.run(verify())


def _sweep_storage(engine: Engine, settings: Settings) -> None:
    """Remove the partial uploads and unreferenced package files that a crash left behind."""
    try:
        partial, orphans = AdminService(engine, BlobStore(settings.packages_dir)).sweep_storage(
            STALE_FILE_S
        )
    except (OSError, SQLAlchemyError):
        # Leftovers only take space; serving matters more. The next start tries again.
        log.warning("cannot sweep the package store; serving anyway", exc_info=True)
        return
    if partial or orphans:
        log.info(
            "removed %d partial upload(s) and %d unreferenced package file(s) left by a crash",
            partial, orphans,
        )  # fmt: skip


def _first_token(engine: Engine, settings: Settings, out: TextIO) -> None:
    """Create the admin token on an empty token table, printing a generated secret once."""
    tokens = TokenStore(engine)
    configured = settings.admin_token.get_secret_value() if settings.admin_token else None
    generated = tokens.bootstrap(configured)
    if generated is not None:
        # To the terminal, never to the log: logs are collected and kept.
        print(
            "Created the management API's admin token 'admin'. It is shown only now and kept"
            " across restarts; store it safely (onenet-ota admin token create makes more):"
            f"\n{generated}",
            file=out,
            flush=True,
        )
    elif configured is not None and tokens.verify(configured, touch=False) is None:
        log.warning(
            "ONENET_OTA_ADMIN_TOKEN is not an active API token: it names the admin token of the"
            " first start only; manage tokens with 'onenet-ota admin token'"
        )


def run(
    settings: Settings,
    *,
    out: TextIO | None = None,
    ready: Callable[[socket.socket], object] | None = None,
) -> None:
    """``onenet-ota serve``: migrate, bind, serve with ``settings.workers`` processes, and return
    after SIGINT/SIGTERM once everything has stopped.

    On the first start, a generated admin token is written to ``out`` (default stdout), once,
    and never to the log. ``ready`` is called with the listening socket before serving starts.
    """
    out = out if out is not None else sys.stdout
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ssl_context(settings)  # fail now, with a clear error, on a bad certificate or key
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        migrate(engine)
        _first_token(engine, settings, out)
        _sweep_storage(engine, settings)
    finally:
        engine.dispose()
    push_verified = _verify_push(settings)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.tls else "http"
    # A stop asked for between the announcement below and the moment the loop or the supervisor
    # installs its own handlers must be a graceful stop, not the default action of SIGTERM (death
    # by signal, with nothing cleaned up): it is recorded here and honoured once they are in place.
    early_stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame: early_stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        log.info("listening on %s://%s:%d with %d worker(s)", scheme, host, port, settings.workers)
        if ready is not None:
            ready(sock)
        if settings.workers == 1:
            _run_loop(
                settings, sock, sweeper=True, push_verified=push_verified, early_stop=early_stop
            )
        else:
            _supervise(settings, sock, push_verified, early_stop)
    finally:
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")


def _supervise(
    settings: Settings, sock: socket.socket, push_verified: bool, early_stop: threading.Event
) -> None:
    """Run ``settings.workers`` worker processes on ``sock`` until SIGINT/SIGTERM (see
    :func:`_run_loop` for ``early_stop``)."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    stopping = early_stop.is_set()
    # Private to this server (mode 0700), so nothing else writes counts into it; new at every
    # start, so no earlier run's counts are added.
    metrics_dir = Path(tempfile.mkdtemp(prefix="onenet-ota-metrics-"))

    def start(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_worker,
            args=(settings, sock, index, push_verified, level, os.getpid(), metrics_dir),
            name=f"onenet-ota-worker-{index}",
            daemon=False,
        )
        process.start()
        return process

    processes = [start(index) for index in range(settings.workers)]
    deaths: list[float] = []
    try:
        while not stopping:
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
            for index, process in enumerate(processes):
                if process.is_alive() or stopping:
                    continue
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < 60] + [now]
                if len(deaths) > _MAX_QUICK_DEATHS:
                    raise RuntimeError("worker processes keep exiting; see the log above")
                log.error("worker %d exited with code %s; restarting it", index, process.exitcode)
                time.sleep(_RESTART_DELAY_S)
                processes[index] = start(index)
    finally:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()  # SIGTERM: the worker shuts down gracefully
        deadline = time.monotonic() + GRACE_S + 5
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.name)
                process.kill()
                process.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""A throwaway platform in its own process: :class:`LocalServer`.

The simulator (and the benchmarks) start one when no server URL is given. It runs
:func:`onenet_ota.server.app.run` (what ``onenet-ota serve`` runs) in a child process
(``python -c`` calling this module's ``_main``), so that the devices never share the server's
interpreter, on 127.0.0.1 and a free port, over a database and data directory of its own:

- the child prints ``ready PORT`` once it listens (``run``'s ``ready`` hook); its stderr, and
  so its log and its workers' logs, goes to ``server.log`` in the data directory, whose tail is
  shown when start-up fails. The log is the platform's own (:mod:`onenet_ota.server.logs`):
  text or JSON as ``ONENET_OTA_LOG_FORMAT`` says, redacted, with the worker on each line;
- it runs in its own process group, so a Ctrl-C at the terminal reaches only the simulator, which
  then stops the server itself, after it has asked it for its final counts;
- on Linux it asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so even a
  simulator killed with SIGKILL leaves no server running;
- :meth:`LocalServer.stop` sends SIGTERM (the server's graceful stop, workers included), waits,
  then kills the whole process group; the temporary directory it made is removed afterwards.

The admin token travels in the child's environment, never on its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = ["LocalServer", "LocalServerError", "die_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
STARTUP_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0
_TOKEN_ENV: Final = "ONENET_OTA_ADMIN_TOKEN"


class LocalServerError(Exception):
    """The local server could not be started; the message says why (with its log's tail)."""


class LocalServer:
    """The platform in a child process on 127.0.0.1; a context manager.

    ``db`` is a database URL (default: a SQLite file in the data directory); ``workers`` the
    server's worker processes; ``data_dir`` a data directory to use instead of a temporary one
    (it is then left in place); ``cache_ttl`` the server's setting of that name. After
    :meth:`start`, :attr:`url` and :attr:`admin_token` reach the server, and :attr:`pid` is the
    server's process (its workers are its children).
    """

    def __init__(
        self,
        *,
        db: str | None = None,
        workers: int = 1,
        data_dir: str | os.PathLike[str] | None = None,
        cache_ttl: float | None = None,
    ) -> None:
        if type(workers) is not int or not 1 <= workers <= 64:
            raise LocalServerError("the server's workers must be an integer from 1 to 64")
        self.db = db
        self.workers = workers
        self.cache_ttl = cache_ttl
        self.admin_token = secrets.token_urlsafe(24)
        self._given_dir = None if data_dir is None else Path(data_dir)
        self._tmp: Path | None = None
        self.data_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id, while it runs."""
        return None if self.process is None else self.process.pid

    @property
    def log_file(self) -> Path | None:
        """Where the server logs."""
        return None if self.data_dir is None else self.data_dir / "server.log"

    def start(self) -> LocalServer:
        """Start the server and wait until it listens; raises :class:`LocalServerError`."""
        if self._given_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="onenet-ota-sim-server-"))
            self.data_dir = self._tmp
        else:
            self.data_dir = self._given_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            # Not "-m onenet_ota.sim.server": the package imports this module first, and runpy
            # then warns on stderr (in every spawned worker too), which is the server's log.
            "-c",
            "import sys; from onenet_ota.sim.server import _main; sys.exit(_main())",
            "--data-dir",
            str(self.data_dir),
            "--workers",
            str(self.workers),
        ]
        env = {**os.environ, _TOKEN_ENV: self.admin_token}
        if self.cache_ttl is not None:
            env["ONENET_OTA_CACHE_TTL"] = str(self.cache_ttl)
        if self.db is not None:
            env["ONENET_OTA_DB"] = self.db  # a URL may carry a password: not on the command line
        else:
            env.pop("ONENET_OTA_DB", None)
        log_file = self.log_file
        assert log_file is not None
        try:
            # The server and its workers log to stderr (the platform's own logging set-up);
            # the child keeps its own descriptor of the file, ours is closed at once.
            with log_file.open("ab") as log_stream:
                # Our own interpreter running our own module; nothing here comes from outside.
                self.process = subprocess.Popen(  # noqa: S603
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log_stream,
                    env=env,
                    process_group=0,  # a terminal's Ctrl-C reaches the simulator, not the server
                )
        except OSError as exc:
            self.stop()
            raise LocalServerError(f"cannot start the server process: {exc}") from None
        try:
            line = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        if not line.startswith("ready "):
            tail = self._log_tail()
            self.stop()
            reason = line.removeprefix("error ").strip() or "the server process exited"
            raise LocalServerError(f"the server failed to start: {reason}{tail}")
        self.port = int(line.split()[1])
        log.info("local server pid %s listening on %s", self.pid, self.url)
        return self

    def _read_ready_line(self) -> str:
        process = self.process
        assert process is not None
        assert process.stdout is not None
        stdout = process.stdout
        result: list[str] = []

        def read() -> None:
            result.append(stdout.readline().decode(errors="replace"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT_S)
        if reader.is_alive():
            raise LocalServerError(f"the server did not start within {STARTUP_TIMEOUT_S:g} s")
        return result[0] if result else ""

    def _log_tail(self) -> str:
        path = self.log_file
        if path is None:
            return ""
        try:
            lines = path.read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(lines)) if lines else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and remove its files."""
        process = self.process
        try:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()  # the server's graceful stop; it stops its workers
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.error("the local server did not stop in time; killing it")
            if process is not None:
                # Whatever is left of its process group (a worker that hung) goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# The child process


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (best effort elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the simulator's throwaway server")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    die_with_parent()
    from pydantic import ValidationError

    # The simulator is an operator tool beside the server, not part of the device SDK that the
    # import ban (TID251) protects.
    from onenet_ota.server.app import run
    from onenet_ota.server.config import Settings
    from onenet_ota.server.logs import configure_logging

    # What `onenet-ota serve` does: text until the settings are read, then their format.
    # stderr is the parent's server.log; the workers inherit it and set up the same way.
    configure_logging(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    def ready(sock: Any) -> None:
        print(f"ready {sock.getsockname()[1]}", flush=True)

    try:
        settings = Settings(data_dir=args.data_dir, host="127.0.0.1", port=0, workers=args.workers)
        configure_logging(logging.INFO, settings.log_format)
        with open(os.devnull, "w") as devnull:
            run(settings, out=devnull, ready=ready)
    except (ValidationError, Exception) as exc:
        logging.getLogger(__name__).exception("the server failed")
        message = " ".join(str(exc).split())[:500]
        print(f"error {type(exc).__name__}: {message}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())

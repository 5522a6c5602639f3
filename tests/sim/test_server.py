"""LocalServer: a real server process that answers, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from onenet_ota.sim.server import LocalServer, LocalServerError
from tests.server.serve_process import children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_serves_then_stops_without_a_trace() -> None:
    server = LocalServer(workers=2)
    with server:
        assert server.pid is not None
        data_dir = server.data_dir
        assert data_dir is not None
        # "ready" means the socket is bound; on a loaded machine the workers may still be starting,
        # and the request waits in the listen backlog until one accepts it.
        reply = httpx2.get(server.url + "/api/v1/health", timeout=60)
        assert reply.status_code == 200
        denied = httpx2.get(server.url + "/api/v1/products")
        assert denied.status_code == 401
        listed = httpx2.get(
            server.url + "/api/v1/products",
            headers={"Authorization": f"Bearer {server.admin_token}"},
        )
        assert listed.status_code == 200
        workers = children(server.pid)
        assert len([pid for pid in workers if alive(pid)]) >= 2
        pid = server.pid
    assert not alive(pid)
    # stop() SIGKILLs what is left of the group (multiprocessing's resource tracker among them)
    # and returns; a killed process may still be running its exit for a moment.
    assert all(wait_gone(worker) for worker in workers)
    assert not data_dir.exists()


def test_a_server_that_cannot_start_says_why_and_leaves_nothing() -> None:
    server = LocalServer(db="postgresql://nobody@127.0.0.1:9/none")
    with pytest.raises(LocalServerError, match=r"the server failed to start: OperationalError"):
        server.start()
    assert server.process is not None
    assert server.process.poll() is not None
    assert server.data_dir is not None
    assert not server.data_dir.exists()
    with pytest.raises(LocalServerError, match="workers must be an integer from 1 to 64"):
        LocalServer(workers=0)


def test_the_server_dies_with_its_parent(tmp_path: Path) -> None:
    """Even a SIGKILLed simulator leaves no server behind (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from onenet_ota.sim.server import LocalServer\n"
        "server = LocalServer(data_dir=sys.argv[1]).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_gone(server_pid), "the server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_the_server_logs_through_the_platforms_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local server and its workers log as ``onenet-ota serve`` does: the configured format
    (JSON here), the worker on each line, and no download token in a request's path."""
    monkeypatch.setenv("ONENET_OTA_LOG_FORMAT", "json")
    monkeypatch.setenv("ONENET_OTA_ACCESS_LOG", "true")
    secret = "Zm9vYmFyc2VjcmV0dG9rZW4"
    with LocalServer(workers=2, data_dir=tmp_path) as server:
        reply = httpx2.get(f"{server.url}/ota/south/download/{secret}/check", timeout=60)
        assert reply.status_code < 500
        log_file = server.log_file
        assert log_file is not None
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    access = [line for line in lines if line.get("logger") == "onenet_ota.access"]
    assert access, text
    assert all("worker" in line for line in access)
    assert secret not in text

"""server/app.py: composition of both APIs, the deadline sweep, and ``run`` as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from onenet_ota import auth
from onenet_ota.server.admin_service import AdminService, PackageCreate, ProductCreate
from onenet_ota.server.app import AppResources, create_app
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.config import Settings
from onenet_ota.server.db import create_engine, migrate
from tests.server.serve_process import ServerProcess, children
from tests.serverthread import ServerThread

TOKEN = "admin-token-for-app-tests-0123"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
NOW = 1_800_000_000


class Clock:
    now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def app(
    engine: Engine, db_url: str, tmp_path: Path
) -> Iterator[tuple[httpx2.Client, AppResources, Clock]]:
    clock = Clock()
    settings = Settings(
        db=db_url, data_dir=tmp_path / "data", admin_token=SecretStr(TOKEN),
        public_address="ota.example.net",
    )  # fmt: skip
    handler, resources = create_app(settings, clock=clock)
    try:
        with (
            ServerThread(handler) as srv,
            httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c,
        ):
            yield c, resources, clock
    finally:
        # The server thread is gone; close what create_app opened.
        import asyncio

        asyncio.run(resources.aclose())


def _setup_device(client: httpx2.Client) -> int:
    assert client.post("/api/v1/products", json={"pid": "123123", "access_key": K1}).is_success
    reply = client.post("/api/v1/devices", json={"pid": "123123", "name": "dev01"})
    assert reply.status_code == 201
    dev_id: int = reply.json()["dev_id"]
    return dev_id


def test_one_port_serves_both_apis(app: tuple[httpx2.Client, AppResources, Clock]) -> None:
    client, _, _ = app
    dev_id = _setup_device(client)
    device_token = auth.build_token("123123", K1)
    reply = client.post(
        "/ota/device/version",
        params={"dev_id": dev_id},
        content=b'{"f_version":"1.0.0","s_version":"1.0.0"}',
        headers={"Authorization": device_token},
    )
    assert reply.content == b'{"errno":0,"error":"succ"}'
    shown = client.get(f"/api/v1/devices/{dev_id}").json()
    assert (shown["f_version"], shown["s_version"]) == ("1.0.0", "1.0.0")
    # Paths outside /api/v1 belong to the device API and its canonical empty 404 (§4.3).
    assert client.get("/api").status_code == 404
    assert client.get("/api").content == b""
    assert client.get("/api/v1x").content == b""


def test_key_rotation_reaches_the_device_api_at_once(
    app: tuple[httpx2.Client, AppResources, Clock],
) -> None:
    client, _, _ = app
    dev_id = _setup_device(client)
    old_token = auth.build_token("123123", K1)

    def query() -> bytes:
        reply = client.get(
            "/ota/device/version", params={"dev_id": dev_id}, headers={"Authorization": old_token}
        )
        return reply.content

    assert query().startswith(b'{"errno":0')  # now cached by the device API
    assert client.post("/api/v1/products/123123/rotate-key").status_code == 200
    assert query() == b'{"errno":1,"error":"auth failed"}'


def test_deadline_sweep(app: tuple[httpx2.Client, AppResources, Clock]) -> None:
    client, resources, clock = app
    dev_id = _setup_device(client)
    upload = client.post(
        "/api/v1/packages",
        params={"pid": "123123", "type": "fota", "target": "2", "file_name": "fw.bin"},
        content=b"firmware",
    )
    body = {"package_id": upload.json()["id"], "dev_ids": [dev_id], "deadline": NOW + 60}
    task = client.post("/api/v1/tasks", json=body).json()
    assert resources.sweep_deadlines() == 0
    clock.now += 61
    assert resources.sweep_deadlines() == 1
    assert client.get(f"/api/v1/tasks/{task['id']}").json()["counts"]["failed"] == 1


def test_cache_ttl_reaches_the_device_api(tmp_path: Path) -> None:
    token = SecretStr("a-long-enough-admin-token")
    for ttl in (0.0, 5.0):
        settings = Settings(data_dir=tmp_path / str(ttl), admin_token=token, cache_ttl=ttl)
        settings.data_dir.mkdir()
        engine = create_engine(settings.database_url)
        migrate(engine)
        engine.dispose()
        _, resources = create_app(settings)
        try:
            assert resources.device_api.service.cache_ttl == ttl
        finally:
            asyncio.run(resources.aclose())


# ------------------------------------------------------------------------------ real processes


@pytest.fixture
def two_workers(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path / "data", "--workers", "2", "--db", db_url, "--admin-token", TOKEN,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.kill()


def test_two_workers_answer_both_apis_and_stop_gracefully(two_workers: ServerProcess) -> None:
    url = two_workers.url()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(3):  # workers start after the socket listens; connections wait in the backlog
        if httpx2.get(url + "/api/v1/health", timeout=30).status_code == 200:
            break
    assert len(children(two_workers.process.pid)) >= 2
    reply = httpx2.post(url + "/api/v1/products", json={"pid": "42", "access_key": K1},
                        headers=headers, timeout=30)  # fmt: skip
    assert reply.status_code == 201
    device = httpx2.post(url + "/api/v1/devices", json={"pid": "42", "name": "d"},
                         headers=headers, timeout=30).json()  # fmt: skip
    token = auth.build_token("42", K1)
    # One connection per request, as the C SDK does (§2.3): both workers take their share.
    for _ in range(12):
        reply = httpx2.get(url + "/ota/device/version", params={"dev_id": device["dev_id"]},
                           headers={"Authorization": token}, timeout=30)  # fmt: skip
        assert reply.content == b'{"errno":0,"error":"succ","data":{}}'

    # An upload in flight when SIGTERM arrives still completes (graceful stop).
    sent_first = threading.Event()
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"a" * 4096
        sent_first.set()
        release.wait(10)
        yield b"b" * 4096

    result: list[httpx2.Response] = []
    uploader = threading.Thread(
        target=lambda: result.append(
            httpx2.post(
                url + "/api/v1/packages",
                params={"pid": "42", "type": "fota", "target": "2", "file_name": "fw.bin"},
                content=body(), headers=headers, timeout=30,
            )
        )
    )  # fmt: skip
    uploader.start()
    assert sent_first.wait(30)
    # The upload is in the server's hands once its temporary file exists.
    tmp = two_workers.data_dir / "packages" / "tmp"
    for _ in range(600):
        if any(tmp.glob("upload-*")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the upload never reached the server")
    two_workers.process.send_signal(signal.SIGTERM)
    release.set()
    uploader.join(30)
    assert [r.status_code for r in result] == [201]
    assert result[0].json()["size"] == 8192
    assert two_workers.stop() == 0
    assert children(two_workers.process.pid) == []
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url + "/api/v1/health", timeout=5)


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing spawn children, not its helpers)."""
    found = []
    for pid in children(supervisor):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the supervisor's own logic
def test_a_worker_that_dies_is_replaced(two_workers: ServerProcess) -> None:
    url = two_workers.url()
    supervisor = two_workers.process.pid
    assert httpx2.get(url + "/api/v1/health", timeout=30).status_code == 200
    for _ in range(600):  # a bound for a hung test, not a timing expectation
        if len(_workers(supervisor)) == 2:
            break
        time.sleep(0.05)
    before = _workers(supervisor)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)  # as the OOM killer would
    two_workers.wait_for(r"worker \d exited with code -9; restarting it")
    for _ in range(600):
        now = _workers(supervisor)
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.05)
    assert before[0] not in now
    assert before[1] in now
    assert len(now) == 2
    # Both workers accept again: every request on a connection of its own is answered.
    for _ in range(10):
        assert httpx2.get(url + "/api/v1/health", timeout=30).status_code == 200
    assert two_workers.stop() == 0


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the supervisor's own logic
def test_workers_exit_when_the_supervisor_is_killed(
    two_workers: ServerProcess, db_url: str, tmp_path: Path
) -> None:
    url = two_workers.url()
    port = url.rsplit(":", 1)[1]
    supervisor = two_workers.process.pid
    assert httpx2.get(url + "/api/v1/health", timeout=30).status_code == 200
    for _ in range(600):  # a bound for a hung test, not a timing expectation
        if len(_workers(supervisor)) == 2:
            break
        time.sleep(0.05)
    workers = _workers(supervisor)
    assert len(workers) == 2
    restarted: ServerProcess | None = None
    try:
        os.kill(supervisor, signal.SIGKILL)  # as the OOM killer or a careless `kill -9` would
        two_workers.process.wait(30)
        for _ in range(600):
            if not any(_running(pid) for pid in workers):
                break
            time.sleep(0.05)
        assert [pid for pid in workers if _running(pid)] == []
        # Nothing holds the port any more: a new server binds it and serves.
        restarted = ServerProcess(
            tmp_path / "data", "--port", port, "--workers", "2", "--db", db_url,
            "--admin-token", TOKEN,
        )  # fmt: skip
        assert restarted.url() == url
        assert httpx2.get(url + "/api/v1/health", timeout=30).status_code == 200
        assert restarted.stop() == 0
    finally:
        for pid in workers:  # orphans left by a failure must not outlive the test
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if restarted is not None:
            restarted.kill()


def test_a_worker_whose_supervisor_is_already_gone_stops(tmp_path: Path) -> None:
    # The supervisor can die between starting a worker and the worker asking to be signalled on
    # its death (Linux), or the platform has no such request: the worker notices all the same.
    # Here the "supervisor" is the worker's own pid, which is never its parent's.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time; from onenet_ota.server.app import _stop_with_supervisor as s; "
         "s(os.getpid()); time.sleep(60)"],
    )  # fmt: skip
    try:
        assert child.wait(30) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the start-up logic
def test_start_sweeps_what_a_crash_left_but_not_live_uploads(db_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    blobs = BlobStore(data / "packages")
    engine = create_engine(db_url)
    try:
        migrate(engine)
        service = AdminService(engine, blobs)
        service.create_product(ProductCreate(pid="42", access_key=K1))
        spec = PackageCreate(pid="42", module_type=1, target="2", file_name="fw.bin")
        kept = service.create_package(spec, blobs.put_bytes(b"recorded")).sha256
    finally:
        engine.dispose()
    orphan = blobs.put_bytes(b"row deleted, then the server died").sha256
    just_written = blobs.put_bytes(b"stored by another worker, about to be recorded").sha256
    partial = blobs.root / "tmp" / "upload-of-a-dead-server"
    live = blobs.root / "tmp" / "upload-in-progress-elsewhere"
    partial.write_bytes(b"half")
    live.write_bytes(b"growing")
    hours_ago = time.time() - 3 * 3600
    for path in (blobs.path(kept), blobs.path(orphan), partial):
        os.utime(path, (hours_ago, hours_ago))

    server = ServerProcess(data, "--db", db_url, "--admin-token", TOKEN)
    try:
        server.url()  # listening: the start-up sweep is done
        assert not partial.exists()
        assert not blobs.exists(orphan)
        # A fresh temporary file may be an upload that another worker or host is receiving, and
        # a fresh stored file one that it is about to record: both stay.
        assert live.exists()
        assert blobs.exists(just_written)
        assert blobs.exists(kept)
        assert server.stop() == 0
    finally:
        server.kill()


# A stop asked for in the moment between "listening" and the installation of the loop's (or the
# supervisor's) signal handlers: the process is told to stop from inside ``ready``, the last
# thing before those handlers go in.
_STOP_WHEN_READY = """
import logging, os, signal, sys
from pathlib import Path
from onenet_ota.server.app import run
from onenet_ota.server.config import Settings
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
settings = Settings(data_dir=Path(sys.argv[1]), port=0, workers=int(sys.argv[2]),
                    admin_token="admin-token-for-app-tests-0123")
run(settings, ready=lambda sock: os.kill(os.getpid(), signal.SIGTERM))
print("returned", flush=True)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_right_after_listening_is_graceful(tmp_path: Path, workers: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STOP_WHEN_READY, str(tmp_path / "data"), str(workers)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    # Before: the default action of SIGTERM killed the process (-15) with nothing cleaned up.
    assert done.returncode == 0, done.stderr
    assert done.stdout == "returned\n"
    assert "stopped" in done.stderr

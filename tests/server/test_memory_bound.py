"""The device API's memory stays bounded whatever a client sends (a real ``onenet-ota serve``).

Every device-API cache is keyed by something a client sends (a Range value, a query string, an
Authorization value). One device with valid credentials, or anyone with one download token, can
send a long stream of requests that each differ only in junk the server ignores: padding inside
the Range value, unknown query parameters, unknown fields in the Authorization value. Each such
request is answered like any other, and each may be cached under its own key. This test sends
that stream to a server in a subprocess (so that the resident memory measured is the server's
alone) and checks that its RSS stays within the caches' byte budgets, plus a fixed slack, above
its warm baseline. The stream is several times larger than that bound, so a cache that grows
with what clients send fails it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest

from onenet_ota import auth
from onenet_ota.server.bounded_cache import BUDGETS
from tests.server.serve_process import ServerProcess

TOKEN = "admin-token-for-memory-tests-01"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
PID = "123123"
MIB = 1024 * 1024
PAD = 14_000  # junk per request: most of the 16 KiB a request head may have
# What the hostile stream below can fill (the other caches are keyed by database rows), and a
# slack for the allocator's fragmentation and the HTTP layer's buffers.
BOUND = BUDGETS.chunks + BUDGETS.replies + BUDGETS.principals + BUDGETS.queries + 24 * MIB
REQUESTS = 2 * BOUND // PAD  # each request carries PAD bytes of junk: twice the bound in all
CLIENTS = 2  # connections sending at once
BATCH = 1  # one request at a time: a pipelined batch waits on delayed ACKs
PER_CONNECTION = 900  # below the server's 1000 requests per connection (D19)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data", "--admin-token", TOKEN)
    try:
        yield process
    finally:
        process.kill()


def rss(pid: int) -> int:
    """The resident set of process ``pid``, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _responses(sock: socket.socket, count: int, buffer: bytearray) -> list[int]:
    """Read ``count`` responses framed by Content-Length; their status codes."""
    statuses: list[int] = []
    while len(statuses) < count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode("latin-1").lower()
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name == "content-length":
                    length = int(value)
            assert "transfer-encoding" not in head, head  # a D7 download error: not expected
            if len(buffer) >= end + 4 + length:
                statuses.append(int(head.split(" ", 2)[1]))
                del buffer[: end + 4 + length]
                continue
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the server closed the connection")
        buffer += data
    return statuses


def send_all(port: int, requests: Iterator[bytes], total: int, check: Callable[[], None]) -> None:
    """Send ``total`` requests, pipelined in batches on keep-alive connections; after each
    batch call ``check()`` (which may fail the test early). Every response must be a success."""
    sent = 0
    while sent < total:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            buffer = bytearray()
            on_this = 0
            while on_this < PER_CONNECTION and sent < total:
                n = min(BATCH, total - sent, PER_CONNECTION - on_this)
                sock.sendall(b"".join(next(requests) for _ in range(n)))
                statuses = _responses(sock, n, buffer)
                assert set(statuses) <= {200, 206}, statuses
                sent += n
                on_this += n
                check()


@pytest.mark.slow  # about 12 000 requests of 14 KiB: 15-35 s on two busy shared cores
def test_hostile_heads_do_not_grow_the_server(server: ServerProcess) -> None:
    url = server.url()
    port = int(url.rsplit(":", 1)[1])
    admin = httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    with admin:
        assert admin.post("/api/v1/products", json={"pid": PID, "access_key": K1}).is_success
        dev_id = admin.post("/api/v1/devices", json={"pid": PID, "name": "dev01"}).json()["dev_id"]
        package = admin.post(
            "/api/v1/packages",
            params={"pid": PID, "type": "fota", "target": "2.0", "file_name": "fw.bin"},
            content=bytes(range(256)) * 256,
        ).json()
        created = admin.post(
            "/api/v1/tasks", json={"package_id": package["id"], "dev_ids": [dev_id]}
        )
        assert created.is_success, created.text
    authorization = auth.build_token(PID, K1)
    check = f"/ota/south/check?dev_id={dev_id}&type=1&version=1.0"
    reply = httpx2.get(url + check, headers={"Authorization": authorization}).json()
    assert reply["errno"] == 0, reply
    download = f"/ota/south/download/{reply['data']['token']}"

    def legit() -> Iterator[bytes]:
        while True:
            yield f"GET {check} HTTP/1.1\r\nAuthorization:{authorization}\r\n\r\n".encode()
            yield f"GET {download} HTTP/1.1\r\nRange:0-4095\r\n\r\n".encode()

    def hostile(first: int) -> Iterator[bytes]:
        for i in range(first, REQUESTS, CLIENTS):
            kind = i % 3
            if kind == 0:  # E6 with its Range padded: the same first byte, a new key each time
                a, c = i % 997, (i // 997) % 997
                spaces = " " * a, " " * (PAD - a - c), " " * c
                value = f"bytes{spaces[0]}={spaces[1]}0{spaces[2]}-0"
                yield f"GET {download} HTTP/1.1\r\nRange:{value}\r\n\r\n".encode()
            elif kind == 1:  # E3 with an unknown query parameter
                junk = f"{i:08d}" + "x" * PAD
                head = f"GET {check}&junk={junk} HTTP/1.1\r\nAuthorization:{authorization}\r\n\r\n"
                yield head.encode()
            else:  # E3 with an unknown field in an Authorization value that verifies
                padded = f"{authorization}&pad={i:08d}{'x' * PAD}"
                yield f"GET {check} HTTP/1.1\r\nAuthorization:{padded}\r\n\r\n".encode()

    pid = server.process.pid
    send_all(port, legit(), 2000, lambda: None)  # warm: code paths, caches of legit requests
    baseline = rss(pid)
    peak = baseline

    def within_bound() -> None:
        nonlocal peak
        peak = max(peak, rss(pid))
        assert peak - baseline <= BOUND, (
            f"the server grew by {(peak - baseline) / MIB:.0f} MiB (bound {BOUND / MIB:.0f} MiB)"
        )

    # Two clients at once keep the server busy while each handles its replies.
    with ThreadPoolExecutor(CLIENTS) as pool:
        streams = [
            pool.submit(
                send_all, port, hostile(first), len(range(first, REQUESTS, CLIENTS)), within_bound
            )
            for first in range(CLIENTS)
        ]
        for stream in streams:
            stream.result()  # re-raises a failed check
    within_bound()
    # Legit requests are still answered after the stream.
    reply = httpx2.get(url + check, headers={"Authorization": authorization}).json()
    assert reply["errno"] == 0, reply

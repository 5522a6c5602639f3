"""/metrics, /healthz and /readyz on the real server: scraped over HTTP and parsed with
prometheus_client's own parser; counts checked against the requests actually sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import Engine, text

from onenet_ota import auth
from onenet_ota.server.app import AppResources, create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.metrics import BUCKETS, Snapshot, database_error_kind
from onenet_ota.server.ops_api import _is_loopback
from tests.server.serve_process import ServerProcess
from tests.serverthread import ServerThread

TOKEN = "admin-token-for-metrics-tests-01"
METRICS_TOKEN = "metrics-token-for-metrics-tests"
PID = "123123"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(exposition: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_of(samples: Samples, **labels: str) -> float:
    """The sum of onenet_ota_requests_total over the series matching ``labels``."""
    total = 0.0
    for (name, found), count in samples.items():
        if name == "onenet_ota_requests_total" and set(labels.items()) <= set(found):
            total += count
    return total


def scrape(client: httpx2.Client, **headers: str) -> Samples:
    reply = client.get("/metrics", headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(reply.text)


@pytest.fixture
def served(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[tuple[httpx2.Client, Any]]:
    settings = Settings(db=db_url, data_dir=tmp_path / "data", admin_token=SecretStr(TOKEN))
    handler, resources = create_app(settings)
    try:
        with (
            ServerThread(handler) as srv,
            httpx2.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c,
        ):
            yield c, resources
    finally:
        asyncio.run(resources.aclose())


def _device(client: httpx2.Client) -> int:
    assert client.post("/api/v1/products", json={"pid": PID, "access_key": K1}).is_success
    reply = client.post("/api/v1/devices", json={"pid": PID, "name": "dev01"})
    assert reply.status_code == 201
    dev_id: int = reply.json()["dev_id"]
    return dev_id


def _task(client: httpx2.Client, dev_id: int) -> None:
    upload = client.post(
        "/api/v1/packages",
        params={"pid": PID, "type": "fota", "target": "2.0", "file_name": "fw.bin"},
        content=b"firmware" * 100,
    )
    assert upload.status_code == 201, upload.text
    body = {"package_id": upload.json()["id"], "dev_ids": [dev_id]}
    assert client.post("/api/v1/tasks", json=body).status_code == 201


def test_counters_move_by_exactly_the_requests_sent(
    served: tuple[httpx2.Client, AppResources],
) -> None:
    client, _ = served
    dev_id = _device(client)
    _task(client, dev_id)
    sdk = {"Authorization": auth.build_token(PID, K1)}
    params = {"dev_id": str(dev_id), "type": "1", "version": "1.0"}
    before = scrape(client)
    for _ in range(7):
        reply = client.get("/ota/south/check", params=params, headers=sdk)
        assert reply.json()["errno"] == 0
    for _ in range(3):
        assert client.post("/ota/south/check", headers=sdk).status_code == 405
    for i in range(5):
        assert client.get(f"/no/such/path/{i}").status_code == 404
    client.get("/api/v1/products")
    after = scrape(client)

    def moved(**labels: str) -> float:
        return requests_of(after, **labels) - requests_of(before, **labels)

    assert moved(dialect="classic", endpoint="E3", answer="200") == 7
    assert moved(dialect="classic", endpoint="E3", answer="405") == 3
    assert moved(dialect="none", endpoint="unmatched", answer="404") == 5
    assert moved(dialect="admin", endpoint="list_products", answer="200") == 1
    # The scrape before is counted too, once it was answered.
    assert moved(dialect="ops", endpoint="metrics", answer="200") == 1
    # The histogram counted the same E3 requests, in cumulative buckets ending at +Inf.
    count = value(
        after, "onenet_ota_request_duration_seconds_count", dialect="classic", endpoint="E3"
    )
    assert (
        count
        - value(
            before, "onenet_ota_request_duration_seconds_count", dialect="classic", endpoint="E3"
        )
        == 10
    )
    inf = value(
        after,
        "onenet_ota_request_duration_seconds_bucket",
        dialect="classic",
        endpoint="E3",
        le="+Inf",
    )
    assert inf == count
    lows = [
        value(
            after,
            "onenet_ota_request_duration_seconds_bucket",
            dialect="classic",
            endpoint="E3",
            le=str(bound),
        )
        for bound in BUCKETS
    ]
    assert lows == sorted(lows)
    assert lows[-1] <= inf
    # Polling E3 is answered from the memoised replies once the first has issued the token and
    # the second has been memoised.
    assert value(after, "onenet_ota_cache_hits_total", cache="replies") >= 5
    assert value(after, "onenet_ota_device_tasks", state="to_be_upgraded") == 1
    assert value(after, "onenet_ota_device_tasks", state="succeeded") == 0
    info = [key for key in after if key[0] == "onenet_ota_build_info"]
    assert len(info) == 1
    assert dict(info[0][1])["database"] in ("sqlite", "postgresql")


def test_junk_paths_and_methods_add_no_series(
    served: tuple[httpx2.Client, AppResources],
) -> None:
    client, _ = served
    junk = [
        "/ota/south/check/x",
        "/ota/south/download/a/b/c",
        "/fuse-ota/!!/x/check",
        "/fuse-ota/123/dev/99999999999/download",
        "/ota/123/dev/0/check",
        "/api/v1/no-such-thing",
        "/api/v1/products/1/2/3/4",
        "/%00%ff",
        "/x" * 200,
    ]
    scrape(client)  # the scrapes' own series exists from here on
    for round_ in range(3):
        for i, path in enumerate(junk):
            client.request("GET", f"{path}{round_}{i}?token=t&sign=s")
            client.request("DELETE", f"{path}{round_}{i}")
    first = scrape(client)
    for round_ in range(3, 9):
        for i, path in enumerate(junk):
            client.request("GET", f"{path}{round_}{i}")
            client.request("PATCH", f"{path}{round_}{i}")
    second = scrape(client)
    series = {key for key in second if key[0] == "onenet_ota_requests_total"}
    assert series == {key for key in first if key[0] == "onenet_ota_requests_total"}
    endpoints = {dict(labels)["endpoint"] for _, labels in series}
    # Only table labels: classic/dialect endpoint names, management operations, ops paths.
    for endpoint in endpoints:
        assert endpoint == "unmatched" or "/" not in endpoint, endpoint
        assert len(endpoint) < 64
    assert requests_of(second, endpoint="unmatched") > requests_of(first, endpoint="unmatched")


def test_database_errors_are_counted(served: tuple[httpx2.Client, AppResources]) -> None:
    client, resources = served
    dev_id = _device(client)
    before = scrape(client)
    with resources.engine.begin() as conn:
        conn.execute(text("ALTER TABLE devices RENAME TO devices_gone"))
    resources.device_api.service.invalidate()
    sdk = {"Authorization": auth.build_token(PID, K1)}
    # A device read (outside SQLAlchemy's execution machinery) and a management one (through
    # it) both fail: errno 7 and 5xx, and both are counted.
    reply = client.get("/ota/device/version", params={"dev_id": dev_id}, headers=sdk)
    assert reply.json()["errno"] == 7
    assert client.get(f"/api/v1/devices/{dev_id}").status_code >= 500
    after = scrape(client)

    def errors(samples: Samples) -> float:
        return sum(v for (n, _), v in samples.items() if n == "onenet_ota_database_errors_total")

    assert errors(after) - errors(before) >= 2
    kinds = {dict(labels)["kind"] for (n, labels) in after if n.startswith("onenet_ota_database")}
    assert kinds <= {"OperationalError", "ProgrammingError"}


def test_healthz_and_readyz(served: tuple[httpx2.Client, AppResources]) -> None:
    client, resources = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.head("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.post("/readyz").status_code == 405
    assert client.get("/api/v1/health").json()["status"] == "ok"  # still there
    with resources.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {"status": "unready", "reason": "the database schema is not migrated"}
    assert client.get("/healthz").status_code == 200  # liveness never asks the database


@pytest.mark.parametrize(
    ("access", "token", "header", "status"),
    [
        ("loopback", None, None, 200),
        ("public", None, None, 200),
        ("off", None, None, 404),
        ("token", METRICS_TOKEN, None, 401),
        ("token", METRICS_TOKEN, f"Bearer {METRICS_TOKEN}x", 401),
        ("token", METRICS_TOKEN, f"Basic {METRICS_TOKEN}", 401),
        ("token", METRICS_TOKEN, f"Bearer {METRICS_TOKEN}", 200),
    ],
)
def test_who_may_read_metrics(
    tmp_path: Path, access: str, token: str | None, header: str | None, status: int
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        admin_token=SecretStr(TOKEN),
        metrics=access,  # type: ignore[arg-type]
        metrics_token=SecretStr(token) if token else None,
    )
    from onenet_ota.server.db import create_engine, migrate

    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    try:
        with ServerThread(handler) as srv:
            headers = {"Authorization": header} if header else {}
            reply = httpx2.get(srv.url + "/metrics", headers=headers)
            assert reply.status_code == status
            if status == 200:
                assert (
                    "onenet_ota_requests_total" in reply.text
                    or "onenet_ota_build_info" in reply.text
                )
    finally:
        asyncio.run(resources.aclose())


def test_loopback_peers() -> None:
    assert _is_loopback("127.0.0.1:5000")
    assert _is_loopback("::1:5000")
    assert _is_loopback("::ffff:127.0.0.1:5000")
    assert not _is_loopback("10.0.0.1:5000")
    assert not _is_loopback("2001:db8::1:5000")
    assert not _is_loopback("")


def test_metrics_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        Settings(data_dir=tmp_path, metrics="token")
    with pytest.raises(ValueError, match="metrics=token"):
        Settings(data_dir=tmp_path, metrics_token=SecretStr(METRICS_TOKEN))
    with pytest.raises(ValueError, match="16"):
        Settings(data_dir=tmp_path, metrics="token", metrics_token=SecretStr("short"))


def test_snapshots_add_up_and_refuse_junk() -> None:
    one = Snapshot({("classic", "E3", 200): [2.0, 0.5] + [0.0] * len(BUCKETS) + [2.0]})
    one.caches["replies"] = [3, 1]
    one.db_errors["OperationalError"] = 1
    total = Snapshot()
    total.add(Snapshot.loads(one.dumps()))
    total.add(Snapshot.loads(one.dumps()))
    assert total.requests[("classic", "E3", 200)][0] == 4
    assert total.caches == {"replies": [6, 2]}
    assert total.db_errors == {"OperationalError": 2}
    for junk in ("{}", '{"requests":[["a"]],"caches":{},"db_errors":{}}', "[1]"):
        with pytest.raises(ValueError, match="snapshot"):
            Snapshot.loads(junk)


def test_database_error_kinds() -> None:
    import sqlite3

    assert database_error_kind(sqlite3.OperationalError("x")) == "OperationalError"
    assert database_error_kind(sqlite3.IntegrityError("x")) == "IntegrityError"
    assert database_error_kind(ValueError("x")) == "other"


# ------------------------------------------------------------------------------ real processes


def test_two_workers_report_the_whole_server(db_url: str, tmp_path: Path) -> None:
    """Requests spread over two worker processes; every scrape, whichever worker answers it,
    counts all of them, exactly, once the workers have shared their counts."""
    server = ServerProcess(
        tmp_path / "data", "--workers", "2", "--db", db_url, "--admin-token", TOKEN,
        "--access-log", "--log-format", "json",
    )  # fmt: skip
    try:
        url = server.url()
        with httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            for _ in range(100):  # workers start after the socket listens
                try:
                    admin.get("/healthz")
                    break
                except httpx2.TransportError:
                    time.sleep(0.1)
            dev_id = _device(admin)
        sdk = {"Authorization": auth.build_token(PID, K1), "Connection": "close"}
        sent = 0
        # A connection each, so both workers take a share (§2.3); the kernel chooses which, so
        # send until the access log shows both served some.
        while sent < 400 and _workers_of(server, "E2") != {0, 1}:
            for _ in range(20):
                reply = httpx2.get(
                    url + "/ota/device/version", params={"dev_id": dev_id}, headers=sdk
                )
                assert reply.json()["errno"] == 0
                sent += 1
            time.sleep(0.2)  # the log lines reach the reader thread
        assert _workers_of(server, "E2") == {0, 1}
        deadline = time.monotonic() + 30
        counted = -1.0
        while time.monotonic() < deadline:
            samples = parse(httpx2.get(url + "/metrics", headers={"Connection": "close"}).text)
            counted = requests_of(samples, dialect="classic", endpoint="E2", answer="200")
            if counted == sent:
                break
            time.sleep(0.2)
        assert counted == sent
        # Whichever worker answers from now on, the count neither falls nor grows; go on until
        # both have answered a scrape.
        before = len([line for line in server.lines if '"endpoint":"metrics"' in line])
        for scrapes in range(200):
            samples = parse(httpx2.get(url + "/metrics", headers={"Connection": "close"}).text)
            assert requests_of(samples, dialect="classic", endpoint="E2", answer="200") == sent
            if scrapes >= 10 and _workers_of(server, "metrics", after=before) == {0, 1}:
                break
        assert _workers_of(server, "metrics", after=before) == {0, 1}
    finally:
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.lines if line.strip()]  # all JSON
    assert len([e for e in entries if e.get("endpoint") == "E2"]) == sent


def _workers_of(server: ServerProcess, endpoint: str, after: int = 0) -> set[int]:
    """The workers whose access log shows requests to ``endpoint`` (after the first ``after``
    such lines)."""
    found = [
        json.loads(line)
        for line in list(server.lines)
        if line.startswith("{") and f'"endpoint":"{endpoint}"' in line
    ]
    return {entry["worker"] for entry in found[after:]}

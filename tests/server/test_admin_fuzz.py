"""The management API fuzzed from its own OpenAPI document (schemathesis), over real HTTP on
loopback, on a real SQLite file and on PostgreSQL.

Every operation of ``/api/v1/openapi.json`` gets a fixed number of generated requests, valid ones
and ones that break the document's rules, against a database seeded with accounts, products,
devices, packages and tasks at the small ids, short pids and small uids the generators try first,
so that requests reach the handlers' real paths and not only "not found". A request fails the
test when the server answers 5xx, or with a status, content type, header or body the document
does not describe. The seed is fixed: the same examples run every time.

Not checked: that every rule-breaking request is refused. Query values are strings on the wire,
so a generated "not a string" value often arrives as a valid one (``q=&``), and unknown query
parameters are ignored by design; such a check fails on requests that are not wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine, insert, update

from onenet_ota.protocol.states import TaskState
from onenet_ota.server.admin_api import AdminApi, openapi_document
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import accounts, products
from tests.server.seed import DB_PARAMS, K1, T0, FakeClock, Seeder, module_database
from tests.serverthread import ServerThread

TOKEN = "admin-token-for-the-fuzz-tests-0123"
MAX_EXAMPLES = 12  # per operation and database: about ten seconds for all of them on SQLite
MAX_UPLOAD = 64 * 1024

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20_261_203,
        # Generation speed depends on the machine's load: no health check may fail a run for it.
        "suppress-health-check": ["all"],
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",  # nothing carried over from earlier runs: the same run each time
            "mode": "all",  # valid requests and requests that break the document's rules
        },
        "phases": {
            "examples": {"enabled": False},  # the document has no examples
            "coverage": {"enabled": False},
            "stateful": {"enabled": False},
        },
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)

CHECKS: Any = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def seed(seeder: Seeder) -> None:
    """Objects at the ids, pids and uids that generated requests address most often."""
    with seeder.engine.begin() as conn:
        for uid in ("1", "2"):
            conn.execute(insert(accounts).values(uid=uid, access_key=K1, created_at=T0))
    for pid in ("0", "1", "A", "a"):
        seeder.product(pid)
    with seeder.engine.begin() as conn:  # account 1 owns a product: its delete is refused
        conn.execute(update(products).where(products.c.pid == "1").values(account_uid="1"))
    for dev_id, pid in [(1, "0"), (2, "0"), (3, "1"), (4, "1"), (5, "A"), (6, "a")]:
        seeder.device(dev_id, pid, f"dev{dev_id}", f_version="1.0", s_version="2.0")
    fota = seeder.package("0")  # id 1
    sota = seeder.package("1", module_type=2)  # id 2
    seeder.package("A", kind=2, from_version="1.0", target="1.1")  # id 3: no task
    seeder.task(fota, (1, 2), pid="0")  # task 1: open device tasks
    seeder.task(sota, (3,), pid="1", state=TaskState.PAUSED)  # task 2
    seeder.task(fota, (5,), pid="0", state=TaskState.SUCCEEDED)  # task 3: finished


@pytest.fixture(scope="module", params=DB_PARAMS)
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A management API on loopback over a freshly seeded database."""
    engine: Engine
    with module_database(request, tmp_path_factory) as engine:
        blobs = BlobStore(Path(tmp_path_factory.mktemp("packages")))
        seed(Seeder(engine, blobs, FakeClock()))
        handler = AdminApi(
            AdminService(engine, blobs), admin_token=TOKEN, max_upload_bytes=MAX_UPLOAD
        )
        with ServerThread(handler.handle) as server:
            yield server.url


@schema.parametrize()
def test_management_api_keeps_to_its_document(case: schemathesis.Case[Any], base_url: str) -> None:
    case.call_and_validate(
        base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS
    )

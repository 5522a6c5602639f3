"""The management models: one definition, shared by the server and its clients."""

from __future__ import annotations

import subprocess
import sys

from pydantic import BaseModel

from onenet_ota.management import models
from onenet_ota.server import admin_api, admin_service, schema
from onenet_ota.server.admin_service import column_max


def test_the_server_answers_with_the_clients_models() -> None:
    # Every model a route reads or answers with is the client's own class, so a field added on
    # one side is on both.
    used: set[type[BaseModel]] = set()
    for route in admin_api.ROUTES:
        used.update(m for m in (route.body, route.response) if m is not None)
    assert used
    for model in used:
        assert model.__module__ == models.__name__, model
    assert admin_service.Product is models.Product


def test_the_id_bounds_are_the_columns() -> None:
    # The models bound ids without importing the server's schema: they must agree with it, or an
    # id the API accepts could overflow its column (a database error instead of a 422).
    assert column_max(schema.devices.c.dev_id) == models.DEV_ID_MAX
    assert column_max(schema.packages.c.id) == models.PACKAGE_ID_MAX
    assert column_max(schema.tasks.c.id) == models.TASK_ID_MAX
    assert column_max(schema.device_tasks.c.task_id) == models.TASK_ID_MAX


def test_the_client_does_not_import_the_server() -> None:
    # A script that manages a platform needs pydantic and httpx2, not SQLAlchemy or the server.
    code = (
        "import sys, onenet_ota.management, onenet_ota.management.client\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('onenet_ota.server', 'sqlalchemy',"
        " 'onenet_ota.cli', 'click')))\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""

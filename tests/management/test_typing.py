"""What a type checker knows about the clients' operations (the project's ``mypy --strict`` covers
this module): each method has its operation's parameters and result, awaitable on the async
client, and each ``iter_*`` helper is an iterator or an async iterator of the items. The same
script also runs against the real server, so the types are checked as what the calls return."""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, assert_type

import pytest

from onenet_ota.management import AsyncManagementClient, ManagementClient, NotFound
from onenet_ota.management.models import (
    ApiTokenPage,
    AuditEntry,
    Campaign,
    Device,
    DeviceLabels,
    HistoryPage,
    Product,
)
from tests.management.conftest import TOKEN, fresh_pid

pytestmark = pytest.mark.anyio


def test_the_sync_client_is_typed(server: str) -> None:
    with ManagementClient(server, TOKEN) as api:
        pid = fresh_pid()
        product = assert_type(api.create_product(pid=pid), Product)
        device = assert_type(api.create_device(product.pid, "a", labels={"k": "v"}), Device)
        assert_type(api.set_device_labels(device.dev_id, {"k": None}), DeviceLabels)
        assert_type(api.get_device_labels(device.dev_id), dict[str, str])
        devices = assert_type(api.iter_devices(pid=pid, labels={"k": "v"}), Iterator[Device])
        assert list(devices) == []
        assert_type(api.list_device_history(device.dev_id), HistoryPage)
        assert_type(api.list_tokens(), ApiTokenPage)
        entries = assert_type(api.iter_audit(target=f"product:{pid}"), Iterator[AuditEntry])
        assert [e.action for e in entries] == ["product.create"]
        with pytest.raises(NotFound):
            assert_type(api.start_campaign(2**31 - 1, if_version=1), Campaign)


async def test_the_async_client_is_typed(server: str) -> None:
    async with AsyncManagementClient(server, TOKEN) as api:
        pid = fresh_pid()
        call = assert_type(api.create_product(pid=pid), Coroutine[Any, Any, Product])
        product = await call
        assert product.pid == pid
        devices = assert_type(api.iter_devices(pid=pid), AsyncIterator[Device])
        assert [d async for d in devices] == []
        with pytest.raises(NotFound):
            await api.get_campaign(2**31 - 1)

"""The typed methods for API tokens, the audit log, device labels and timelines, and staged
campaigns, against the real server over loopback HTTP.

Each test body runs with both clients (``api`` fixture, tests/management/conftest.py) and ends by
checking it called every method of its area; :data:`AREAS` is what test_client.py's
every-method test leaves to this module.
"""

from __future__ import annotations

import time
from typing import Final

import pytest

from onenet_ota.management import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from onenet_ota.management.models import (
    ApiToken,
    ApiTokenCreated,
    AuditEntry,
    Campaign,
    CampaignCreate,
    CampaignDetail,
    CampaignEvent,
    DeviceLabels,
    FailureClass,
    HistoryEvent,
    HistoryPage,
    Preview,
    Selector,
    StageSpec,
)
from tests.management.conftest import Driver, fresh_pid, make_client

pytestmark = pytest.mark.anyio

TOKENS: Final = {"create_token", "list_tokens", "iter_tokens", "revoke_token"}
AUDIT: Final = {"list_audit", "iter_audit"}
LABELS: Final = {"get_device_labels", "set_device_labels"}
HISTORY: Final = {"list_device_history", "iter_device_history"}
CAMPAIGNS: Final = {
    "create_campaign", "preview_campaign_spec", "list_campaigns", "iter_campaigns",
    "get_campaign", "delete_campaign", "preview_campaign", "list_campaign_events",
    "act_on_campaign", "start_campaign", "pause_campaign", "resume_campaign",
    "advance_campaign", "abort_campaign", "retry_failed_campaign", "add_campaign_devices",
}  # fmt: skip
AREAS: Final = TOKENS | AUDIT | LABELS | HISTORY | CAMPAIGNS


async def _fleet(api: Driver, size: int) -> tuple[str, list[int], int]:
    """A new product with ``size`` devices and a FOTA package: (pid, dev_ids, package id)."""
    pid = fresh_pid()
    await api("create_product", pid=pid)
    devices = await api("import_devices", pid, [{"name": f"d{i}"} for i in range(size)])
    package = await api(
        "upload_package", b"fw" + pid.encode(), pid=pid, module_type="fota", target="2.0",
        file_name="fw.bin",
    )  # fmt: skip
    return pid, [d.dev_id for d in devices], package.id


async def test_tokens_are_created_listed_and_revoked(api: Driver, server: str) -> None:
    name = f"ci-{fresh_pid()}-{'a' if api.is_async else 's'}"
    created = await api("create_token", name, role="operator")
    assert isinstance(created, ApiTokenCreated)
    assert (created.name, created.role, created.revoked_at) == (name, "operator", None)

    # The secret works, with the operator's rights and no more.
    operator = make_client("async" if api.is_async else "sync", server, created.secret)
    try:
        assert (await operator("create_product", pid=fresh_pid())).pid
        with pytest.raises(Forbidden):
            await operator("list_tokens")
    finally:
        await operator.close()

    page = await api("list_tokens", limit=1000)
    listed = [t for t in page.items if t.id == created.id]
    assert [type(t) for t in listed] == [ApiToken]
    assert not hasattr(listed[0], "secret")
    every = await api.collect("iter_tokens", page_size=1)
    assert [t.name for t in every].count(name) == 1

    assert await api("revoke_token", created.id) is None
    assert [t.revoked_at for t in await api.collect("iter_tokens") if t.id == created.id] != [None]
    revoked = make_client("async" if api.is_async else "sync", server, created.secret)
    try:
        with pytest.raises(Unauthorized):
            await revoked("list_products")
    finally:
        await revoked.close()
    with pytest.raises(Conflict):
        await api("create_token", name)  # a name is never reused
    assert api.used >= TOKENS


async def test_the_audit_log_is_filtered_and_paged(api: Driver) -> None:
    since = int(time.time()) - 1
    pid = fresh_pid()
    key = (await api("create_product", pid=pid, name="audited")).access_key
    await api("rotate_product_key", pid)
    await api("rotate_product_key", pid)

    page = await api("list_audit", target=f"product:{pid}", since=since, until=2**40)
    rotate = "product.rotate_key"
    assert [e.action for e in page.items] == ["product.create", rotate, rotate]
    assert all(isinstance(e, AuditEntry) for e in page.items)
    assert key not in str(page.items[0].after)  # a key is never logged
    one = await api("list_audit", target=f"product:{pid}", action="product.rotate_key", limit=1)
    assert len(one.items) == 1
    assert one.next is not None
    actor = page.items[0].actor
    every = await api.collect(
        "iter_audit", actor=actor, target=f"product:{pid}", since=since, page_size=1
    )
    assert [e.id for e in every] == [e.id for e in page.items]
    assert (await api("list_audit", target=f"product:{pid}", until=since - 1)).items == []
    with pytest.raises(Invalid):
        await api("list_audit", since=-1)
    assert api.used >= AUDIT


async def test_labels_are_set_read_and_select_devices(api: Driver) -> None:
    pid = fresh_pid()
    await api("create_product", pid=pid)
    eu = await api("create_device", pid, "eu", labels={"region": "eu", "ring": "canary"})
    us = await api("create_device", pid, "us", labels={"region": "us"})
    assert await api("get_device_labels", eu.dev_id) == {"region": "eu", "ring": "canary"}

    selected = await api("list_devices", pid=pid, labels={"region": "eu"})
    assert [d.dev_id for d in selected.items] == [eu.dev_id]
    by_pairs = await api.collect("iter_devices", pid=pid, labels=[("region", "us")])
    assert [d.dev_id for d in by_pairs] == [us.dev_id]
    # Two values for one key: every one must hold, so no device matches.
    both = await api("list_devices", pid=pid, labels=[("region", "eu"), ("region", "us")])
    assert both.items == []

    patched = await api("set_device_labels", us.dev_id, {"ring": "canary", "region": None})
    assert isinstance(patched, DeviceLabels)
    assert patched.labels == {"ring": "canary"}
    replaced = await api("set_device_labels", eu.dev_id, {"site": "b7"}, replace=True)
    assert replaced.labels == {"site": "b7"}
    assert await api("get_device_labels", eu.dev_id) == {"site": "b7"}
    canary = await api.collect("iter_devices", pid=pid, labels={"ring": "canary"})
    assert [d.dev_id for d in canary] == [us.dev_id]

    with pytest.raises(Invalid):
        await api("set_device_labels", eu.dev_id, {"bad key": "v"})
    with pytest.raises(NotFound):
        await api("get_device_labels", 2**53 - 7)
    assert api.used >= LABELS


async def test_a_device_timeline_is_paged_oldest_first(api: Driver) -> None:
    _, (dev_id, other), package_id = await _fleet(api, 2)
    first = await api("create_task", package_id, dev_ids=[dev_id, other])
    await api("pause_device_task", first.id, dev_id)
    await api("resume_device_task", first.id, dev_id)
    await api("cancel_task", first.id)

    page = await api("list_device_history", dev_id)
    assert isinstance(page, HistoryPage)
    changes = [(e.from_state, e.to_state) for e in page.items if e.kind == "state"]
    assert changes == [
        ("to_be_upgraded", "paused"),
        ("paused", "to_be_upgraded"),
        ("to_be_upgraded", "cancelled"),
    ]
    every = await api.collect("iter_device_history", dev_id, page_size=1)
    assert all(isinstance(e, HistoryEvent) for e in every)
    assert [e.id for e in every] == [e.id for e in page.items]

    second = await api("create_task", package_id, dev_ids=[dev_id])
    await api("cancel_task", second.id)
    only = await api.collect("iter_device_history", dev_id, task_id=second.id)
    assert {e.task_id for e in only} == {second.id}
    assert len(only) == 1
    limited = await api("list_device_history", dev_id, limit=2)
    assert len(limited.items) == 2
    rest = await api("list_device_history", dev_id, after=limited.next)
    assert [e.id for e in limited.items + rest.items] == [e.id for e in every + only]
    with pytest.raises(NotFound):
        await api("list_device_history", 2**53 - 7)
    assert api.used >= HISTORY


async def test_a_staged_campaign_from_draft_to_abort(api: Driver) -> None:
    pid, dev_ids, package_id = await _fleet(api, 5)
    spec = CampaignCreate(
        name="typed",
        package_id=package_id,
        selector=Selector(dev_ids=dev_ids[:4]),
        stages=[StageSpec(count=1, max_failed=1), StageSpec(percent=50), StageSpec(rest=True)],
    )
    preview = await api("preview_campaign_spec", spec)
    assert isinstance(preview, Preview)
    assert (preview.population, [s.devices for s in preview.stages]) == (4, [1, 1, 2])
    # The same spec as the API's JSON, the way a script reading a file would give it.
    as_json = {"package_id": package_id, "selector": {"dev_ids": dev_ids[:4]},
               "stages": [{"count": 1}, {"rest": True}]}  # fmt: skip
    assert [s.devices for s in (await api("preview_campaign_spec", as_json)).stages] == [1, 3]

    draft = await api("create_campaign", spec)
    assert isinstance(draft, Campaign)
    assert (draft.name, draft.state, draft.population, draft.pid) == ("typed", "draft", 4, pid)
    assert [s.devices for s in (await api("preview_campaign", draft.id)).stages] == [1, 1, 2]
    listed = await api("list_campaigns", state="draft", limit=1000)
    assert draft.id in [c.id for c in listed.items]
    assert draft.id in [c.id for c in await api.collect("iter_campaigns", page_size=1)]

    with pytest.raises(Conflict, match="changed meanwhile"):
        await api("start_campaign", draft.id, if_version=draft.version + 1)
    running = await api("start_campaign", draft.id, if_version=draft.version)
    assert (running.state, running.stage) == ("running", 0)
    paused = await api("pause_campaign", running.id)
    assert paused.state == "paused"
    assert (await api("resume_campaign", paused.id, if_version=paused.version)).state == "running"
    advanced = await api("advance_campaign", draft.id)
    assert advanced.stage == 1
    grown = await api("add_campaign_devices", draft.id, [dev_ids[4]], if_version=advanced.version)
    assert grown.population == 5
    with pytest.raises(Conflict, match="no failed member"):
        await api("retry_failed_campaign", draft.id, classes=[FailureClass.PACKAGE, "deferral"])
    with pytest.raises(Conflict, match="changed meanwhile"):
        await api("retry_failed_campaign", draft.id, if_version=0)
    again = await api("act_on_campaign", draft.id, "pause", if_version=grown.version)
    assert again.state == "paused"
    with pytest.raises(ValueError, match="action must be one of"):
        await api("act_on_campaign", draft.id, "explode")

    detail = await api("get_campaign", draft.id)
    assert isinstance(detail, CampaignDetail)
    assert [s.index for s in detail.stages] == [0, 1, 2]
    with pytest.raises(Conflict, match="abort it first"):
        await api("delete_campaign", draft.id)
    aborted = await api("abort_campaign", draft.id)
    assert aborted.state == "aborted"
    events = await api("list_campaign_events", draft.id)
    assert all(isinstance(e, CampaignEvent) for e in events)
    assert [e.action for e in events] == [
        "start", "pause", "resume", "advance", "add_devices", "pause", "abort",
    ]  # fmt: skip
    assert await api("delete_campaign", draft.id) is None
    with pytest.raises(NotFound):
        await api("get_campaign", draft.id)
    assert api.used >= CAMPAIGNS

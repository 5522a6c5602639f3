"""The console's products, accounts, audit log and API-token pages, and the device list's
filters, over real HTTP on the platform's own server: roles (refused by the server, not only
hidden), CSRF, the key hidden until an audited reveal, escaping, and clear 4xx for bad filters."""

from __future__ import annotations

import html
import logging
import re
from typing import Any

import httpx2
import pytest

from onenet_ota.device import Credentials, DeviceConfig, OtaClient
from onenet_ota.protocol.status import StatusCode
from onenet_ota.server.console import PREFIX
from onenet_ota.server.console.app import CSP
from tests.server.console.conftest import ADMIN, KEY, Platform, product, task
from tests.server.console.test_app import _Page

UID = "4242"


def _setup(platform: Platform, name: str = "meters") -> str:
    reply = platform.api.post("/accounts", json={"uid": UID, "access_key": KEY, "name": "acme"})
    assert reply.status_code == 201, reply.text
    pid = product(platform.api, name)
    assert platform.api.put(f"/products/{pid}/account", json={"uid": UID}).status_code == 200
    return pid


def _audit(platform: Platform, **params: Any) -> list[dict[str, Any]]:
    reply = platform.api.get("/audit", params=params)
    assert reply.status_code == 200, reply.text
    items: list[dict[str, Any]] = reply.json()["items"]
    return items


def _changes(pid: str) -> list[str]:
    return [
        f"/products/{pid}/reveal-key",
        f"/products/{pid}/rotate-key",
        f"/accounts/{UID}/reveal-key",
        f"/accounts/{UID}/rotate-key",
        "/tokens",
        "/tokens/1/revoke",
    ]


def _revealed(platform: Platform, path: str) -> str:
    """The key of the product or account at ``path``, through the API's audited reveal (after
    the test has checked the audit log: this adds an entry)."""
    reply = platform.api.post(f"{path}/reveal-key")
    assert reply.status_code == 200, reply.text
    key: str = reply.json()["access_key"]
    return key


def test_the_pages_list_and_show_products_and_accounts_without_their_keys(
    platform: Platform,
) -> None:
    pid = _setup(platform)
    for secret in (platform.viewer, platform.operator, ADMIN):
        client, _ = platform.signed_in(secret)
        for path in ("/products", f"/products/{pid}", "/accounts", f"/accounts/{UID}"):
            reply = client.get(PREFIX + path)
            assert reply.status_code == 200, (path, reply.text)
            assert KEY not in reply.text, path
            assert reply.headers["content-security-policy"] == CSP
            parser = _Page()
            parser.feed(reply.text)
            assert (parser.inline_scripts, parser.handlers, parser.styles) == (0, [], 0), path
        page = client.get(f"{PREFIX}/products/{pid}").text
        assert 'id="access-key-hidden"' in page
        assert ('id="reveal-key"' in page) == (secret != platform.viewer)
        listing = client.get(f"{PREFIX}/products").text
        assert f'href="{PREFIX}/products/{pid}"' in listing
        assert f'href="{PREFIX}/accounts/{UID}"' in listing
    assert _audit(platform, action="product.reveal_key") == []  # reading pages reveals nothing


def test_a_reveal_shows_the_key_and_is_audited_under_the_token(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pid = _setup(platform)
    client, csrf = platform.signed_in(platform.operator)
    for kind, name, path in (
        ("product", pid, f"/products/{pid}"),
        ("account", UID, f"/accounts/{UID}"),
    ):
        reply = client.post(f"{PREFIX}{path}/reveal-key", data={"_csrf": csrf})
        assert reply.status_code == 200, reply.text
        assert reply.headers["cache-control"] == "no-store"
        assert re.search(rf'id="access-key"[^>]*>{re.escape(KEY)}<', reply.text)
        assert KEY not in client.get(PREFIX + path).text  # shown once, not remembered
        entries = _audit(platform, action=f"{kind}.reveal_key")
        assert [(e["actor"], e["target"]) for e in entries] == [
            ("operator-token", f"{kind}:{name}")
        ]
    assert KEY not in str(_audit(platform))
    assert KEY not in caplog.text


def test_a_key_rotation_shows_the_new_key_and_the_old_one_is_gone(platform: Platform) -> None:
    pid = _setup(platform)
    client, csrf = platform.signed_in(ADMIN)
    reply = client.post(f"{PREFIX}/products/{pid}/rotate-key", data={"_csrf": csrf})
    assert reply.status_code == 200, reply.text
    shown = re.search(r'id="access-key"[^>]*>([^<]+)<', reply.text)
    assert shown is not None
    new_key = html.unescape(shown.group(1))
    assert new_key != KEY
    assert [e["actor"] for e in _audit(platform, action="product.rotate_key")] == ["admin"]
    assert _revealed(platform, f"/products/{pid}") == new_key


@pytest.mark.parametrize("index", range(6))
def test_a_viewer_is_refused_every_change_by_the_server(platform: Platform, index: int) -> None:
    pid = _setup(platform)
    path = _changes(pid)[index]
    client, csrf = platform.signed_in(platform.viewer)
    reply = client.post(PREFIX + path, data={"_csrf": csrf, "name": "x", "role": "admin"})
    assert reply.status_code == 403, reply.text
    assert KEY not in reply.text
    assert [e["action"] for e in _audit(platform) if "reveal" in e["action"]] == []
    assert _revealed(platform, f"/products/{pid}") == KEY
    assert _revealed(platform, f"/accounts/{UID}") == KEY
    assert len(platform.api.get("/tokens").json()["items"]) == 3


@pytest.mark.parametrize("index", range(6))
def test_every_change_needs_the_csrf_token(platform: Platform, index: int) -> None:
    pid = _setup(platform)
    path = _changes(pid)[index]
    client, _ = platform.signed_in(ADMIN)
    _other, other_csrf = platform.signed_in(ADMIN)
    for data in ({"name": "x"}, {"_csrf": other_csrf, "name": "x"}):
        reply = client.post(PREFIX + path, data=data)
        assert reply.status_code == 403, reply.text
        assert KEY not in reply.text
    assert [e["action"] for e in _audit(platform) if "reveal" in e["action"]] == []
    assert _revealed(platform, f"/products/{pid}") == KEY
    tokens = platform.api.get("/tokens").json()["items"]
    assert len(tokens) == 3
    assert all(t["revoked_at"] is None for t in tokens)


def test_the_token_page_is_for_admins_only(platform: Platform) -> None:
    for secret in (platform.viewer, platform.operator):
        client, csrf = platform.signed_in(secret)
        assert f'href="{PREFIX}/tokens"' not in client.get(f"{PREFIX}/").text
        assert client.get(f"{PREFIX}/tokens").status_code == 403
        refused = client.post(f"{PREFIX}/tokens", data={"_csrf": csrf, "name": "sneaky"})
        assert refused.status_code == 403
    assert "sneaky" not in platform.api.get("/tokens").text


def test_an_admin_creates_a_token_sees_its_secret_once_and_revokes_it(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, csrf = platform.signed_in(ADMIN)
    listing = client.get(f"{PREFIX}/tokens")
    assert listing.status_code == 200
    assert "operator-token" in listing.text
    assert f'href="{PREFIX}/tokens"' in client.get(f"{PREFIX}/").text
    made = client.post(f"{PREFIX}/tokens", data={"_csrf": csrf, "name": "ci", "role": "operator"})
    assert made.status_code == 200, made.text
    found = re.search(r'id="new-secret"[^>]*>([^<]+)<', made.text)
    assert found is not None
    secret = found.group(1)
    assert secret not in client.get(f"{PREFIX}/tokens").text  # this once only
    assert secret not in caplog.text
    ci = next(t for t in platform.api.get("/tokens").json()["items"] if t["name"] == "ci")
    assert ci["role"] == "operator"
    new_client, _ = platform.signed_in(secret)  # the secret works ...
    bad = client.post(f"{PREFIX}/tokens", data={"_csrf": csrf, "name": "ci", "role": "operator"})
    assert bad.status_code == 409  # the API's refusal, in its words
    assert "ci" in html.unescape(bad.text)
    role = client.post(f"{PREFIX}/tokens", data={"_csrf": csrf, "name": "x2", "role": "root"})
    assert role.status_code == 422
    gone = client.post(f"{PREFIX}/tokens/{ci['id']}/revoke", data={"_csrf": csrf})
    assert gone.status_code == 303
    assert new_client.get(f"{PREFIX}/").status_code == 303  # ... until it is revoked
    assert client.post(f"{PREFIX}/tokens/99999/revoke", data={"_csrf": csrf}).status_code == 404


def test_the_audit_page_filters_and_pages(platform: Platform) -> None:
    for n in range(55):
        product(platform.api, f"p{n}")
    client, _ = platform.signed_in(platform.viewer)  # the API lets viewers read the log
    first = client.get(f"{PREFIX}/audit", params={"action": "product.create", "actor": "admin"})
    assert first.status_code == 200, first.text
    assert first.text.count("<td>product.create</td>") == 50
    link = re.search(r'<a href="\?([^"]+)">', first.text)
    assert link is not None
    second = client.get(f"{PREFIX}/audit?{html.unescape(link.group(1))}")
    assert second.text.count("<td>product.create</td>") == 5
    assert '"name": "p54"' in html.unescape(second.text)
    today = client.get(f"{PREFIX}/audit", params={"since": "2000-01-01", "until": "2999-12-31"})
    assert today.text.split('id="audit"', 1)[1].count("<tr><td>") == 50  # a full page
    empty = client.get(f"{PREFIX}/audit", params={"until": "2000-01-01"})
    assert "<td>product.create</td>" not in empty.text


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"since": "yesterday"}, "YYYY-MM-DD: yesterday"),
        ({"until": "2026-13-45"}, "YYYY-MM-DD"),
        ({"actor": "x" * 81}, "actor"),
        ({"after": "-1"}, "after"),
    ],
)
def test_a_bad_audit_filter_gets_a_clear_message(
    platform: Platform, params: dict[str, str], words: str
) -> None:
    client, _ = platform.signed_in(platform.viewer)
    reply = client.get(f"{PREFIX}/audit", params=params)
    assert reply.status_code == 422, reply.text
    assert words in html.unescape(reply.text)


def test_the_device_list_filters_by_state_and_label(platform: Platform) -> None:
    pid = product(platform.api)
    task_id, dev_ids = task(platform.api, pid, devices=3)
    idle = platform.api.post("/devices", json={"pid": pid, "name": "spare"}).json()["dev_id"]
    assert platform.api.post(f"/tasks/{task_id}/devices/{dev_ids[1]}/pause").status_code == 200
    labelled = platform.api.put(f"/devices/{dev_ids[2]}/labels", json={"labels": {"site": "n1"}})
    assert labelled.status_code == 200
    client, _ = platform.signed_in(platform.viewer)

    def shown(**params: str) -> list[int]:
        reply = client.get(f"{PREFIX}/devices", params=params)
        assert reply.status_code == 200, reply.text
        table = reply.text.split('id="devices"', 1)[1]
        return [int(n) for n in re.findall(rf'href="{PREFIX}/devices/(\d+)"', table)]

    assert shown(state="idle") == [idle]
    assert shown(state="paused") == [dev_ids[1]]
    assert shown(state="to_be_upgraded") == sorted([dev_ids[0], dev_ids[2]])  # in dev_id order
    assert shown(label="site=n1") == [dev_ids[2]]
    assert shown(label="site=n1", state="paused") == []
    assert shown(pid=pid, q="spare") == [idle]
    page = client.get(f"{PREFIX}/devices/{dev_ids[2]}").text
    assert "site=n1" in page


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"state": "asleep"}, "state must be one of idle"),
        ({"label": "no-equals"}, "key=value, several separated by commas: no-equals"),
        ({"label": "a=b,=c"}, "=c"),
        ({"after": "x"}, "after"),
    ],
)
def test_a_bad_device_filter_gets_a_clear_message(
    platform: Platform, params: dict[str, str], words: str
) -> None:
    client, _ = platform.signed_in(platform.viewer)
    reply = client.get(f"{PREFIX}/devices", params=params)
    assert reply.status_code == 422, reply.text
    assert words in html.unescape(reply.text)


def test_a_bad_label_filter_is_explained_in_chinese(platform: Platform) -> None:
    client, _ = platform.signed_in(platform.viewer)
    reply = client.get(
        f"{PREFIX}/devices", params={"label": "nope"}, headers={"Accept-Language": "zh-CN"}
    )
    assert reply.status_code == 422
    assert "标签" in reply.text


def test_unknown_objects_and_bad_pages_are_4xx(platform: Platform) -> None:
    client, csrf = platform.signed_in(ADMIN)
    assert client.get(f"{PREFIX}/products/nope").status_code == 404
    assert client.get(f"{PREFIX}/accounts/999").status_code == 404
    assert client.get(f"{PREFIX}/accounts/0999").status_code == 404
    assert (
        client.post(f"{PREFIX}/products/nope/reveal-key", data={"_csrf": csrf}).status_code == 404
    )
    assert client.get(f"{PREFIX}/products", params={"after": "bad pid"}).status_code == 422
    assert client.get(f"{PREFIX}/accounts", params={"after": "x"}).status_code == 422
    assert client.get(f"{PREFIX}/tokens", params={"after": "x"}).status_code == 422
    assert client.get(f"{PREFIX}/products/p1/reveal-key").status_code == 405


def test_names_show_as_text_on_the_new_pages(platform: Platform) -> None:
    # Device names cannot hold '<' (the device name rule); what a page echoes can.
    evil = '<script>alert("x")</script>'
    pid = _setup(platform, name=evil)
    renamed = platform.api.post("/accounts", json={"uid": "77", "name": evil})
    assert renamed.status_code == 201, renamed.text
    client, _ = platform.signed_in(ADMIN)
    pages = [
        ("/products", {}),
        (f"/products/{pid}", {}),
        ("/accounts", {}),
        ("/accounts/77", {}),
        ("/audit", {}),
        ("/audit", {"actor": evil}),
        ("/devices", {"q": evil, "label": "", "version": ""}),
    ]
    for path, params in pages:
        page = client.get(PREFIX + path, params=params)
        assert page.status_code == 200, path
        assert '<script>alert("x")' not in page.text, path
        assert "&lt;script&gt;alert(" in page.text, path
    refused = client.get(f"{PREFIX}/devices", params={"label": evil})
    assert refused.status_code == 422
    assert '<script>alert("x")' not in refused.text


def test_the_nav_links_every_new_page(platform: Platform) -> None:
    client, _ = platform.signed_in(ADMIN)
    page = client.get(f"{PREFIX}/").text
    for path in ("/products", "/accounts", "/audit", "/tokens"):
        assert f'href="{PREFIX}{path}"' in page
    stranger = httpx2.Client(base_url=platform.url)
    platform.clients.append(stranger)
    for path in ("/products", "/accounts/1", "/audit", "/tokens"):
        assert stranger.get(PREFIX + path).status_code == 303


def test_the_overview_counts_failures_by_reason(platform: Platform) -> None:
    pid = product(platform.api)
    _task_id, dev_ids = task(platform.api, pid, devices=3)
    for dev_id in dev_ids[:2]:  # two devices fail their md5 check, as real devices report it
        config = DeviceConfig(
            credentials=Credentials.from_access_key(pid, KEY), dev_id=str(dev_id), version="1.0"
        )
        with OtaClient(config, base_url=platform.url) as device:
            device.post_version()
            offered = device.check_task()
            device.report_status(offered.token, 101)
            device.report_status(offered.token, StatusCode.UPGRADE_MD5_MISMATCH)
    client, _ = platform.signed_in(platform.viewer)
    page = client.get(f"{PREFIX}/").text
    row = re.search(r"<td>205 [^<]*</td><td>(\d+)</td>", page)
    assert row is not None, page
    assert row.group(1) == "2"

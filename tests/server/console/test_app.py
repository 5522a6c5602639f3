"""The console over real HTTP: sessions, CSRF, roles, escaping, CSP, uploads, live counters.

The server is the platform's own (``create_app`` on a SQLite file, served on loopback). Roles
and revocation use a token directory of three tokens, served by the same :class:`Console`.
"""

from __future__ import annotations

import asyncio
import html.parser
import logging
import re
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr

from onenet_ota.server.app import create_app
from onenet_ota.server.config import Settings
from onenet_ota.server.console import PREFIX
from onenet_ota.server.console.app import CSP
from onenet_ota.server.db import create_engine, migrate
from tests.server.console.conftest import ADMIN, Platform, product, task
from tests.serverthread import ServerThread

GET_PAGES = ["/", "/devices", "/packages", "/tasks", "/tasks/1", "/devices/1", "/tasks/1/events"]
CHANGES = ["/packages/upload", "/packages/1/delete", "/tasks/1/pause", "/tasks/1/cancel"]


@pytest.mark.parametrize("path", GET_PAGES)
def test_every_page_sends_a_stranger_to_sign_in(platform: Platform, path: str) -> None:
    reply = platform.browser().get(PREFIX + path)
    assert reply.status_code == 303
    assert reply.headers["location"].startswith(f"{PREFIX}/login?next=")


@pytest.mark.parametrize("path", CHANGES)
def test_every_change_refuses_a_stranger(platform: Platform, path: str) -> None:
    pid = product(platform.api)
    task(platform.api, pid)
    reply = platform.browser().post(PREFIX + path, data={"_csrf": "x"})
    assert reply.status_code == 401
    assert platform.api.get("/tasks/1").json()["status"] == "active"
    assert platform.api.get("/packages/1").status_code == 200


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(
    platform: Platform,
) -> None:
    client = platform.browser()
    reply = client.post(
        f"{PREFIX}/login", data={"token": platform.operator, "next": f"{PREFIX}/tasks"}
    )
    assert reply.status_code == 303
    assert reply.headers["location"] == f"{PREFIX}/tasks"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert f"Path={PREFIX}" in cookie
    assert "Secure" not in cookie  # plain HTTP here; the TLS listener adds it
    assert platform.operator not in cookie  # the session names the token, it never holds it
    page = client.get(f"{PREFIX}/")
    assert "operator-token" in page.text
    csrf = re.search(r'data-csrf="([^"]+)"', page.text)
    assert csrf is not None
    assert client.post(f"{PREFIX}/logout", data={"_csrf": "wrong"}).status_code == 403
    assert client.get(f"{PREFIX}/").status_code == 200
    out = client.post(f"{PREFIX}/logout", data={"_csrf": csrf.group(1)})
    assert out.status_code == 303
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert client.get(f"{PREFIX}/").status_code == 303


def test_a_wrong_token_is_refused_and_no_secret_is_logged(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = platform.browser()
    reply = client.post(f"{PREFIX}/login", data={"token": "not-a-token-0123456789"})
    assert reply.status_code == 401
    assert "set-cookie" not in reply.headers
    client.post(f"{PREFIX}/login", data={"token": platform.viewer})
    text = caplog.text
    for secret in ("not-a-token-0123456789", platform.viewer):
        assert secret not in text


def test_an_open_redirect_after_sign_in_is_refused(platform: Platform) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/api/v1/tokens"):
        reply = platform.browser().post(
            f"{PREFIX}/login", data={"token": platform.viewer, "next": target}
        )
        assert reply.headers["location"] == f"{PREFIX}/"


@pytest.mark.parametrize("path", CHANGES)
def test_every_change_needs_the_sessions_csrf_token(platform: Platform, path: str) -> None:
    pid = product(platform.api)
    task(platform.api, pid)
    client, csrf = platform.signed_in(ADMIN)
    _other, other_csrf = platform.signed_in(ADMIN)
    assert other_csrf != csrf
    refused = [
        client.post(PREFIX + path, data={}),
        client.post(PREFIX + path, data={"_csrf": other_csrf}),
        client.post(PREFIX + path, headers={"X-CSRF-Token": other_csrf}, content=b"x"),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert platform.api.get("/tasks/1").json()["status"] == "active"
    assert platform.api.get("/packages").json()["items"][0]["id"] == 1
    assert len(platform.api.get("/packages").json()["items"]) == 1


def test_a_change_from_another_origin_is_refused(platform: Platform) -> None:
    pid = product(platform.api)
    task(platform.api, pid)
    client, csrf = platform.signed_in(ADMIN)
    reply = client.post(
        f"{PREFIX}/tasks/1/pause", data={"_csrf": csrf}, headers={"Origin": "http://evil.example"}
    )
    assert reply.status_code == 403
    assert platform.api.get("/tasks/1").json()["status"] == "active"


def test_a_viewer_sees_but_cannot_change(platform: Platform) -> None:
    pid = product(platform.api)
    task(platform.api, pid)
    client, csrf = platform.signed_in(platform.viewer)
    page = client.get(f"{PREFIX}/tasks/1")
    assert page.status_code == 200
    assert 'id="task-pause"' not in page.text  # no buttons shown ...
    for path in CHANGES:  # ... and the server refuses all the same
        reply = client.post(PREFIX + path, data={"_csrf": csrf})
        assert reply.status_code == 403, path
    assert platform.api.get("/tasks/1").json()["status"] == "active"
    operator, op_csrf = platform.signed_in(platform.operator)
    assert operator.post(f"{PREFIX}/tasks/1/pause", data={"_csrf": op_csrf}).status_code == 303
    assert platform.api.get("/tasks/1").json()["status"] == "paused"


def test_a_revoked_token_ends_its_sessions_at_once(platform: Platform) -> None:
    client, _ = platform.signed_in(platform.operator)
    assert client.get(f"{PREFIX}/tasks").status_code == 200
    revoked = platform.api.delete(f"/tokens/{platform.token_ids[platform.operator]}")
    assert revoked.status_code == 204, revoked.text
    assert client.get(f"{PREFIX}/tasks").status_code == 303


def test_an_api_refusal_is_shown_with_the_apis_words(platform: Platform) -> None:
    pid = product(platform.api)
    task(platform.api, pid)
    client, csrf = platform.signed_in(ADMIN)
    reply = client.post(f"{PREFIX}/packages/1/delete", data={"_csrf": csrf})
    assert reply.status_code == 409  # the package has a task: the API's rule, not the console's
    api_message = platform.api.delete("/packages/1").json()["error"]["message"]
    assert api_message in html.unescape(reply.text)


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts = 0
        self.handlers: list[str] = []
        self.styles = 0
        self.outside: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.inline_scripts += 1
        if "style" in names:
            self.styles += 1
        self.handlers += [n for n in names if n.startswith("on")]
        for attr in ("src", "href", "action", "sse-connect"):
            value = names.get(attr) or ""
            if "://" in value or value.startswith("//"):
                self.outside.append(value)


def test_pages_allow_no_inline_script_and_no_outside_origin(platform: Platform) -> None:
    pid = product(platform.api)
    task_id, dev_ids = task(platform.api, pid)
    client, _ = platform.signed_in(ADMIN)
    pages = ["/", "/devices", "/packages", "/tasks", f"/tasks/{task_id}", f"/devices/{dev_ids[0]}"]
    for path in [*pages, "/login"]:
        reply = client.get(PREFIX + path)
        assert reply.status_code == 200, path
        assert reply.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["cache-control"] == "no-store"
        parser = _Page()
        parser.feed(reply.text)
        assert parser.inline_scripts == 0, path
        assert parser.handlers == [], path
        assert parser.styles == 0, path
        assert parser.outside == [], path


def test_every_shown_value_is_escaped(platform: Platform) -> None:
    pid = product(platform.api, name='<script>alert("x")</script>')
    task(platform.api, pid)
    client, _ = platform.signed_in(ADMIN)
    page = client.get(f"{PREFIX}/packages")
    assert '<script>alert("x")' not in page.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text


def test_the_upload_goes_through_the_api_and_keeps_its_limit(platform: Platform) -> None:
    pid = product(platform.api)
    client, csrf = platform.signed_in(platform.operator)
    query = {"pid": pid, "type": "1", "target": "3.0", "file_name": "fw.bin"}
    too_big = client.post(
        f"{PREFIX}/packages/upload",
        params=query,
        content=b"x" * 5000,
        headers={"X-CSRF-Token": csrf},
    )
    assert too_big.status_code == 413
    assert "4096" in too_big.json()["error"]["message"]
    bad = client.post(
        f"{PREFIX}/packages/upload",
        params={**query, "target": ""},
        content=b"x",
        headers={"X-CSRF-Token": csrf},
    )
    assert bad.status_code == 422
    ok = client.post(
        f"{PREFIX}/packages/upload",
        params=query,
        content=b"y" * 100,
        headers={"X-CSRF-Token": csrf},
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["size"] == 100
    assert [p["target"] for p in platform.api.get("/packages").json()["items"]] == ["3.0"]
    page = client.get(f"{PREFIX}/packages")
    assert ok.json()["md5"] in page.text
    assert ok.json()["sha256"] in page.text


def test_the_event_stream_sends_counts_as_they_change(platform: Platform) -> None:
    pid = product(platform.api)
    task_id, _ = task(platform.api, pid, devices=4)
    client, _ = platform.signed_in(platform.viewer)
    events: list[str] = []
    devices: list[str] = []
    with client.stream("GET", f"{PREFIX}/tasks/{task_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name, data = "", []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                (events if name == "counts" else devices).append("\n".join(data))
                name, data = "", []
                if len(devices) == 1 and len(events) == 1:
                    assert platform.api.post(f"/tasks/{task_id}/pause").status_code == 200
                elif len(devices) == 2:
                    break
    first, second = events
    assert re.search(r'id="count-to_be_upgraded">4<', first)
    assert re.search(r'id="count-paused">4<', second)
    assert devices[0].count("to be upgraded") == 4
    assert devices[1].count(">paused<") == 4


def test_an_unknown_task_has_no_event_stream(platform: Platform) -> None:
    client, _ = platform.signed_in(platform.viewer)
    assert client.get(f"{PREFIX}/tasks/99/events").status_code == 404
    assert client.get(f"{PREFIX}/devices/99999999999999999999").status_code == 404
    assert client.get(f"{PREFIX}/devices/{2**62}").status_code == 404


def test_the_language_follows_the_browser_and_the_switch(platform: Platform) -> None:
    client, _ = platform.signed_in(platform.viewer)
    assert "概览" in client.get(f"{PREFIX}/", headers={"Accept-Language": "zh-CN"}).text
    assert "Overview" in client.get(f"{PREFIX}/", headers={"Accept-Language": "en"}).text
    switched = client.post(f"{PREFIX}/lang", data={"lang": "zh_Hans", "next": f"{PREFIX}/tasks"})
    assert switched.status_code == 303
    assert switched.headers["location"] == f"{PREFIX}/tasks"
    assert "任务" in client.get(f"{PREFIX}/tasks", headers={"Accept-Language": "en"}).text
    assert client.post(f"{PREFIX}/lang", data={"lang": "xx"}).status_code == 400


def test_static_files_are_served_with_validators_and_nothing_else(platform: Platform) -> None:
    client = platform.browser()
    script = client.get(f"{PREFIX}/static/htmx.min.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    etag = script.headers["etag"]
    assert (
        client.get(f"{PREFIX}/static/htmx.min.js", headers={"If-None-Match": etag}).status_code
        == 304
    )
    for path in ("/static/nope.js", "/static/..%2fapp.py", "/static/../app.py"):
        assert client.get(PREFIX + path).status_code in (303, 404), path


def test_junk_requests_get_4xx_never_5xx(platform: Platform) -> None:
    client, csrf = platform.signed_in(ADMIN)
    assert client.get(f"{PREFIX}/nowhere").status_code == 404
    assert client.put(f"{PREFIX}/tasks").status_code == 405
    assert (
        client.post(
            f"{PREFIX}/tasks/1/pause",
            content=b"\xff\xfe" * 10,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ).status_code
        == 400
    )
    big = client.post(f"{PREFIX}/tasks/1/pause", content=b"a=" + b"b" * 70_000)
    assert big.status_code == 400
    junk_cookie = httpx2.Client(
        base_url=platform.url, headers={"Cookie": "onenet_ota_session=" + "x" * 5000}
    )
    platform.clients.append(junk_cookie)
    assert junk_cookie.get(f"{PREFIX}/").status_code == 303
    assert client.post(f"{PREFIX}/tasks/1/pause", data={"_csrf": csrf}).status_code == 404


def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, admin_token=SecretStr(ADMIN), console=False)
    engine = create_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    handler, resources = create_app(settings)
    try:
        with ServerThread(handler) as srv, httpx2.Client(base_url=srv.url) as client:
            assert client.get(f"{PREFIX}/login").status_code == 404
    finally:
        asyncio.run(resources.aclose())

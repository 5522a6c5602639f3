"""The console's campaign pages and the device timeline over real HTTP: the create form with its
dry run, the operator actions (through the management API, with its roles and its words), the
live stage counters, failures by reason, escaping, and a device's timeline in both languages.

The server is the platform's own (``create_app`` on a SQLite file, served on loopback).
"""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from onenet_ota.device import Credentials, DeviceConfig, OtaClient
from onenet_ota.protocol.status import StatusCode
from onenet_ota.server.console import PREFIX
from onenet_ota.server.console.app import CSP
from tests.server.console.conftest import ADMIN, KEY, Platform, product
from tests.server.console.test_app import _Page

ACTIONS = ["start", "pause", "resume", "advance", "abort", "retry-failed"]
CHANGES = ["/campaigns/preview", "/campaigns/create", "/campaigns/1/devices"] + [
    f"/campaigns/1/{a}" for a in ACTIONS
]


def fleet(
    platform: Platform, devices: int = 10, name: str = "meters"
) -> tuple[str, int, list[int]]:
    """A product with ``devices`` devices and a package: its pid, the package id, the dev_ids."""
    api = platform.api
    pid = product(api, name)
    dev_ids = [
        api.post("/devices", json={"pid": pid, "name": f"{name}-{i:02}"}).json()["dev_id"]
        for i in range(devices)
    ]
    package = api.post(
        "/packages",
        params={"pid": pid, "type": "1", "target": "2.0", "file_name": "fw.bin"},
        content=b"firmware",
    )
    assert package.status_code == 201, package.text
    return pid, int(package.json()["id"]), dev_ids


def form(package_id: int, **fields: str) -> dict[str, str]:
    """The create form as a browser sends it: two stages (3 devices, then the rest)."""
    values = {
        "name": "canary",
        "package_id": str(package_id),
        "selector": "filter",
        "from_versions": "",
        "labels": "",
        "dev_ids": "",
        "s1_share": "3",
        "s1_soak": "3600",
        "s1_min": "0",
        "s1_success": "50",
        "s1_ceiling": "",
        "s1_on_failure": "pause",
        "s2_share": "rest",
        "s2_soak": "0",
        "s2_success": "95",
        "s2_on_failure": "pause",
        "signal": "0",
        "power": "0",
        "retry": "0",
        "interval": "0",
    }
    values.update(fields)
    return values


def campaign(platform: Platform, package_id: int, *, start: bool = True, **spec: Any) -> int:
    body = {
        "name": "canary",
        "package_id": package_id,
        "selector": {},
        "stages": [{"count": 3, "soak_s": 3600, "success_percent": 50}, {"rest": True}],
        **spec,
    }
    made = platform.api.post("/campaigns", json=body)
    assert made.status_code == 201, made.text
    campaign_id = int(made.json()["id"])
    if start:
        assert platform.api.post(f"/campaigns/{campaign_id}/start").status_code == 200
    return campaign_id


def state(platform: Platform, campaign_id: int) -> str:
    return str(platform.api.get(f"/campaigns/{campaign_id}").json()["state"])


def fail_one(platform: Platform, pid: str, dev_id: int, code: int) -> None:
    """The device fetches its task and reports ``code``, as a real device would."""
    config = DeviceConfig(
        credentials=Credentials.from_access_key(pid, KEY), dev_id=str(dev_id), version="1.0"
    )
    with OtaClient(config, base_url=platform.url) as client:
        client.post_version()
        offered = client.check_task()
        client.report_status(offered.token, 101)
        client.report_status(offered.token, code)


def members(platform: Platform, package_id: int) -> list[int]:
    """The devices given a task by the package's tasks (a stage's activation, or an addition,
    creates one)."""
    tasks = platform.api.get("/tasks", params={"package_id": package_id}).json()["items"]
    found: list[int] = []
    for task in tasks:
        items = platform.api.get(f"/tasks/{task['id']}/devices").json()["items"]
        found += [int(i["dev_id"]) for i in items]
    return sorted(found)


@pytest.mark.parametrize(
    "path", ["/campaigns", "/campaigns/new", "/campaigns/1", "/campaigns/1/events"]
)
def test_every_campaign_page_sends_a_stranger_to_sign_in(platform: Platform, path: str) -> None:
    reply = platform.browser().get(PREFIX + path)
    assert reply.status_code == 303
    assert reply.headers["location"].startswith(f"{PREFIX}/login?next=")


@pytest.mark.parametrize("path", CHANGES)
def test_every_campaign_change_refuses_a_stranger(platform: Platform, path: str) -> None:
    _pid, package_id, _ = fleet(platform)
    campaign_id = campaign(platform, package_id)
    reply = platform.browser().post(PREFIX + path, data={"_csrf": "x", **form(package_id)})
    assert reply.status_code == 401
    assert state(platform, campaign_id) == "running"
    assert len(platform.api.get("/campaigns").json()["items"]) == 1


@pytest.mark.parametrize("path", CHANGES)
def test_every_campaign_change_needs_the_sessions_csrf_token(platform: Platform, path: str) -> None:
    _pid, package_id, _ = fleet(platform)
    campaign_id = campaign(platform, package_id)
    client, _csrf = platform.signed_in(ADMIN)
    _other, other_csrf = platform.signed_in(ADMIN)
    refused = [
        client.post(PREFIX + path, data=form(package_id)),
        client.post(PREFIX + path, data={"_csrf": other_csrf, **form(package_id)}),
    ]
    assert [r.status_code for r in refused] == [403, 403]
    assert state(platform, campaign_id) == "running"
    assert len(platform.api.get("/campaigns").json()["items"]) == 1


def test_a_viewer_sees_campaigns_but_no_button_and_every_change_is_refused(
    platform: Platform,
) -> None:
    _pid, package_id, _ = fleet(platform)
    campaign_id = campaign(platform, package_id)
    client, csrf = platform.signed_in(platform.viewer)
    listed = client.get(f"{PREFIX}/campaigns")
    assert listed.status_code == 200
    assert f"{PREFIX}/campaigns/{campaign_id}" in listed.text
    assert 'id="new-campaign"' not in listed.text
    page = client.get(f"{PREFIX}/campaigns/{campaign_id}")
    assert page.status_code == 200
    assert 'id="stage-0-targeted">3<' in page.text
    for action in ACTIONS:
        assert f'id="campaign-{action}"' not in page.text
    assert 'id="campaign-add-devices"' not in page.text
    assert client.get(f"{PREFIX}/campaigns/new").status_code == 403
    for path in CHANGES:
        reply = client.post(PREFIX + path, data={"_csrf": csrf, **form(package_id)})
        assert reply.status_code == 403, path
    assert state(platform, campaign_id) == "running"
    assert len(platform.api.get("/campaigns").json()["items"]) == 1


def test_preview_then_create_then_every_action_goes_through_the_api(platform: Platform) -> None:
    _pid, package_id, dev_ids = fleet(platform, devices=10)
    client, csrf = platform.signed_in(platform.operator)
    assert client.get(f"{PREFIX}/campaigns/new").status_code == 200

    preview = client.post(f"{PREFIX}/campaigns/preview", data={"_csrf": csrf, **form(package_id)})
    assert preview.status_code == 200, preview.text
    assert re.search(r'id="preview-stage-0">.*?class="count">3<', preview.text)
    assert re.search(r'id="preview-stage-1">.*?class="count">7<', preview.text)
    assert platform.api.get("/campaigns").json()["items"] == []  # a dry run creates nothing
    assert 'value="canary"' in preview.text  # the form keeps what was typed

    created = client.post(f"{PREFIX}/campaigns/create", data={"_csrf": csrf, **form(package_id)})
    assert created.status_code == 303, created.text
    (made,) = platform.api.get("/campaigns").json()["items"]
    assert created.headers["location"] == f"{PREFIX}/campaigns/{made['id']}"
    assert made["state"] == "draft"
    assert made["population"] == 10
    detail = platform.api.get(f"/campaigns/{made['id']}").json()
    assert [s["spec"]["count"] for s in detail["stages"][:1]] == [3]
    assert detail["stages"][0]["spec"]["soak_s"] == 3600
    assert detail["stages"][0]["spec"]["success_percent"] == 50
    assert detail["stages"][1]["spec"]["rest"] is True

    page = client.get(f"{PREFIX}/campaigns/{made['id']}")
    assert 'id="preview-stage-0"' in page.text  # a draft shows who each stage takes
    assert 'id="campaign-start"' in page.text
    assert 'id="campaign-pause"' not in page.text  # only what the state allows

    base = f"{PREFIX}/campaigns/{made['id']}"
    steps = [("start", "running"), ("pause", "paused"), ("resume", "running")]
    for action, expected in steps:
        version = platform.api.get(f"/campaigns/{made['id']}").json()["version"]
        reply = client.post(f"{base}/{action}", data={"_csrf": csrf, "version": str(version)})
        assert reply.status_code == 303, reply.text
        assert state(platform, made["id"]) == expected
    assert len(members(platform, package_id)) == 3

    # The API's refusal, in the API's words: nothing failed, so there is nothing to retry.
    refused = client.post(f"{base}/retry-failed", data={"_csrf": csrf})
    assert refused.status_code == 409
    assert "no failed member" in html.unescape(refused.text)

    # A version the campaign has moved past: refused, not applied blind.
    stale = client.post(f"{base}/advance", data={"_csrf": csrf, "version": "1"})
    assert stale.status_code == 409
    assert platform.api.get(f"/campaigns/{made['id']}").json()["stage"] == 0

    assert client.post(f"{base}/advance", data={"_csrf": csrf}).status_code == 303
    detail = platform.api.get(f"/campaigns/{made['id']}").json()
    assert detail["stage"] == 1
    assert [s["counts"]["targeted"] for s in detail["stages"]] == [3, 7]
    assert client.post(f"{base}/abort", data={"_csrf": csrf}).status_code == 303
    assert state(platform, made["id"]) == "aborted"
    page = client.get(base)
    assert 'id="campaign-state">aborted<' in page.text
    assert "aborted by an operator" in page.text  # the decision log
    assert len(dev_ids) == 10


def test_explicit_devices_and_a_filter_reach_the_api(platform: Platform) -> None:
    _pid, package_id, dev_ids = fleet(platform, devices=6)
    platform.api.put(f"/devices/{dev_ids[0]}/labels", json={"labels": {"site": "a"}})
    client, csrf = platform.signed_in(platform.operator)
    listed = form(
        package_id,
        selector="devices",
        dev_ids=f"{dev_ids[1]}, {dev_ids[2]}\n{dev_ids[3]}",
        s1_share="1",
    )
    reply = client.post(f"{PREFIX}/campaigns/preview", data={"_csrf": csrf, **listed})
    assert reply.status_code == 200, reply.text
    assert re.search(r'id="preview-stage-1">.*?class="count">2<', reply.text)
    labelled = form(package_id, labels="site=a", s1_share="100%", s2_share="")
    created = client.post(f"{PREFIX}/campaigns/create", data={"_csrf": csrf, **labelled})
    assert created.status_code == 303, created.text
    (made,) = platform.api.get("/campaigns").json()["items"]
    assert made["selector"]["labels"] == {"site": "a"}
    assert made["population"] == 1


def test_the_schedule_the_rate_and_dynamic_membership_reach_the_api(platform: Platform) -> None:
    _pid, package_id, _ = fleet(platform, devices=4)
    client, csrf = platform.signed_in(platform.operator)
    values = form(
        package_id,
        labels="",
        start_time="2030-01-01T08:00",  # a browser's datetime-local value, read as UTC
        deadline="2030-01-02T08:30",
        per_minute="2.5",
        dynamic="on",
    )
    created = client.post(f"{PREFIX}/campaigns/create", data={"_csrf": csrf, **values})
    assert created.status_code == 303, created.text
    (made,) = platform.api.get("/campaigns").json()["items"]
    assert made["start_time"] == 1893484800  # 2030-01-01 08:00 UTC
    assert made["deadline"] == 1893573000  # 2030-01-02 08:30 UTC
    assert made["rate"]["per_minute"] == 2.5
    assert made["dynamic"] is True
    page = html.unescape(client.get(created.headers["location"]).text)
    schedule = re.search(r'id="campaign-schedule">(.*?)</p>', page, re.S)
    assert schedule is not None
    assert "2030-01-01 08:00" in schedule.group(1)
    assert "2.5 per minute" in schedule.group(1)
    assert "new matching devices join" in schedule.group(1)
    # Left empty, none of them is sent: the campaign starts at once and dispatches all.
    plain = client.post(f"{PREFIX}/campaigns/create", data={"_csrf": csrf, **form(package_id)})
    assert plain.status_code == 303, plain.text
    shown = platform.api.get(plain.headers["location"].replace(PREFIX, "")).json()
    assert (shown["start_time"], shown["deadline"], shown["rate"], shown["dynamic"]) == (
        None,
        None,
        None,
        False,
    )


def test_devices_are_added_to_a_running_campaign_from_its_page(platform: Platform) -> None:
    _pid, package_id, dev_ids = fleet(platform, devices=6)
    listed = {"dev_ids": dev_ids[:3]}
    campaign_id = campaign(platform, package_id, selector=listed, stages=[{"rest": True}])
    client, csrf = platform.signed_in(platform.operator)
    base = f"{PREFIX}/campaigns/{campaign_id}"
    assert 'id="campaign-add-devices"' in client.get(base).text
    version = platform.api.get(f"/campaigns/{campaign_id}").json()["version"]
    added = client.post(
        f"{base}/devices",
        data={"_csrf": csrf, "version": str(version), "dev_ids": f"{dev_ids[3]}, {dev_ids[4]}"},
    )
    assert added.status_code == 303, added.text
    assert members(platform, package_id) == sorted(dev_ids[:5])  # the running stage took them
    # Not IDs: the reader's words, nothing added; a stale version: the API's refusal.
    bad = client.post(f"{base}/devices", data={"_csrf": csrf, "dev_ids": "five"})
    assert bad.status_code == 422
    assert "List the devices by ID" in html.unescape(bad.text)
    stale = client.post(
        f"{base}/devices", data={"_csrf": csrf, "version": str(version), "dev_ids": str(dev_ids[5])}
    )
    assert stale.status_code == 409
    assert members(platform, package_id) == sorted(dev_ids[:5])
    # A finished campaign takes no device: the page offers no form.
    assert platform.api.post(f"/campaigns/{campaign_id}/abort").status_code == 200
    assert 'id="campaign-add-devices"' not in client.get(base).text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"package_id": ""}, "Choose a package."),
        ({"s1_share": "abc"}, "Stage 1: the share is a cumulative percent"),
        ({"s1_share": "nan%"}, "Stage 1: the share is a cumulative percent"),
        ({"s1_soak": "soon"}, "Stage 1: “soon” is not a number."),
        ({"s2_success": "1e999"}, "Stage 2: “1e999” is not a number."),
        ({"s1_ceiling": "lots"}, "Stage 1: the failure ceiling is a percent"),
        ({"labels": "justakey"}, "Labels are key=value pairs"),
        ({"selector": "devices", "dev_ids": "12 abc"}, "List the devices by ID"),
        ({"s1_share": "", "s2_share": ""}, "Give at least one stage."),
        ({"retry": "3.5"}, "“3.5” is not a whole number."),
        # Shape right, meaning wrong: the API's own words.
        ({"s1_share": "50"}, "cannot be satisfied"),
        ({"s1_success": "150"}, "less than or equal to 100"),
        ({"package_id": "999"}, "package 999 does not exist"),
        ({"s2_share": "rest", "s1_share": "rest"}, "rest"),
        ({"name": "x" * 200}, "at most 128 characters"),
        ({"start_time": "tomorrow"}, "“tomorrow” is not a date and time"),
        ({"deadline": "2030-13-01T00:00"}, "is not a date and time"),
        ({"per_minute": "fast"}, "The dispatch rate “fast” is not a number"),
        ({"per_minute": "0"}, "greater than 0"),
        ({"deadline": "2001-01-01T00:00"}, "deadline must be later"),
        ({"dynamic": "on", "selector": "devices", "dev_ids": "1"}, "dynamic mode needs a filter"),
    ],
)
def test_bad_form_input_gets_a_clear_message_and_creates_nothing(
    platform: Platform, fields: dict[str, str], message: str
) -> None:
    _pid, package_id, _ = fleet(platform, devices=10)
    client, csrf = platform.signed_in(platform.operator)
    for action in ("preview", "create"):
        values = {**form(package_id), **fields}
        reply = client.post(f"{PREFIX}/campaigns/{action}", data={"_csrf": csrf, **values})
        assert 400 <= reply.status_code < 500, reply.text
        text = html.unescape(reply.text)
        error = re.search(r'id="error">(.*?)</p>', text, re.S)
        assert error is not None, text[-2000:]
        assert message in error.group(1)
        assert 'id="campaign-form"' in text  # the form is shown again ...
        assert f'value="{values["s1_soak"]}"' in reply.text  # ... with what was typed
    assert platform.api.get("/campaigns").json()["items"] == []


def test_form_errors_are_in_the_readers_language(platform: Platform) -> None:
    _pid, package_id, _ = fleet(platform)
    client, csrf = platform.signed_in(platform.operator)
    reply = client.post(
        f"{PREFIX}/campaigns/preview",
        data={"_csrf": csrf, **form(package_id, s1_soak="soon")},
        headers={"Accept-Language": "zh-CN"},
    )
    assert reply.status_code == 422
    assert "第 1 阶段" in html.unescape(reply.text)


def test_a_script_in_a_campaign_name_shows_as_text(platform: Platform) -> None:
    _pid, package_id, _ = fleet(platform)
    name = '<script>alert("x")</script>'
    campaign_id = campaign(platform, package_id, name=name)
    client, _ = platform.signed_in(platform.viewer)
    for path in ("/", "/campaigns", f"/campaigns/{campaign_id}"):
        page = client.get(PREFIX + path)
        assert page.status_code == 200
        assert '<script>alert("x")' not in page.text, path
        if path != "/":
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text, path


def test_campaign_pages_allow_no_inline_script_and_no_outside_origin(platform: Platform) -> None:
    _pid, package_id, dev_ids = fleet(platform)
    campaign_id = campaign(platform, package_id)
    draft = campaign(platform, package_id, start=False)
    client, _ = platform.signed_in(ADMIN)
    pages = ["/campaigns", "/campaigns/new", f"/campaigns/{campaign_id}", f"/campaigns/{draft}"]
    for path in [*pages, f"/devices/{dev_ids[0]}"]:
        reply = client.get(PREFIX + path)
        assert reply.status_code == 200, path
        assert reply.headers["content-security-policy"] == CSP
        parser = _Page()
        parser.feed(reply.text)
        assert parser.inline_scripts == 0, path
        assert parser.handlers == [], path
        assert parser.styles == 0, path
        assert parser.outside == [], path


def test_the_overview_and_the_list_show_active_campaigns_with_stage_bars(
    platform: Platform,
) -> None:
    _pid, package_id, _ = fleet(platform)
    running = campaign(platform, package_id, name="running-one")
    draft = campaign(platform, package_id, name="draft-one", start=False)
    client, _ = platform.signed_in(platform.viewer)
    overview = client.get(f"{PREFIX}/")
    assert "running-one" in overview.text
    assert "draft-one" not in overview.text
    assert overview.text.count('class="bar small') == 2  # one bar per stage
    listed = client.get(f"{PREFIX}/campaigns", params={"state": "draft"})
    assert "draft-one" in listed.text
    assert "running-one" not in listed.text
    assert client.get(f"{PREFIX}/campaigns", params={"state": "nope"}).status_code == 422
    assert client.get(f"{PREFIX}/campaigns", params={"after": "x"}).status_code == 422
    assert client.get(f"{PREFIX}/campaigns/{draft + 5}").status_code == 404
    assert client.get(f"{PREFIX}/campaigns/{draft + 5}/events").status_code == 404
    assert f"{PREFIX}/campaigns/{running}" in overview.text


def test_failures_are_grouped_by_reason_with_a_link_to_each_device(platform: Platform) -> None:
    pid, package_id, _ = fleet(platform)
    campaign_id = campaign(platform, package_id)
    first, second, third = members(platform, package_id)
    fail_one(platform, pid, first, StatusCode.UPGRADE_MD5_MISMATCH)
    fail_one(platform, pid, second, StatusCode.UPGRADE_MD5_MISMATCH)
    fail_one(platform, pid, third, 203)
    client, _ = platform.signed_in(platform.viewer)
    page = client.get(f"{PREFIX}/campaigns/{campaign_id}")
    table = re.search(r'<table id="campaign-failures">(.*?)</table>', page.text, re.S)
    assert table is not None
    rows = re.findall(r"<tr><td>(\d+) ", table.group(1))
    assert rows == ["205", "203"]  # the most frequent reason first
    assert f'href="{PREFIX}/devices/{first}"' in table.group(1)
    assert f'href="{PREFIX}/devices/{third}"' in table.group(1)
    assert "MD5 check failed" in table.group(1)
    assert 'id="stage-0-failed_package">2<' in page.text
    assert 'id="stage-0-failed_environment">1<' in page.text
    zh = client.get(f"{PREFIX}/campaigns/{campaign_id}", headers={"Accept-Language": "zh"})
    assert "失败（软件包）" in zh.text


def test_the_event_stream_sends_stage_counters_as_they_change(platform: Platform) -> None:
    _pid, package_id, _ = fleet(platform)
    campaign_id = campaign(platform, package_id)
    client, _ = platform.signed_in(platform.operator)
    updates: list[str] = []
    failures: list[str] = []
    with client.stream("GET", f"{PREFIX}/campaigns/{campaign_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name, data = "", []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                (updates if name == "campaign" else failures).append("\n".join(data))
                name, data = "", []
                if len(updates) == 1 and len(failures) == 1:
                    assert platform.api.post(f"/campaigns/{campaign_id}/pause").status_code == 200
                elif len(failures) == 2:
                    break
    first, second = updates
    assert re.search(r'id="stage-0-open">3<', first)
    assert 'id="campaign-state">running<' in first
    assert 'id="campaign-pause"' in first  # an operator's stream carries the buttons
    assert 'id="campaign-state">paused<' in second
    assert 'id="campaign-resume"' in second
    assert "paused by an operator" in failures[1]


def test_the_device_page_shows_its_timeline_in_the_readers_language(platform: Platform) -> None:
    pid, package_id, _ = fleet(platform)
    campaign(platform, package_id)
    dev_id = members(platform, package_id)[0]
    fail_one(platform, pid, dev_id, StatusCode.UPGRADE_MD5_MISMATCH)
    client, _ = platform.signed_in(platform.viewer)
    page = client.get(f"{PREFIX}/devices/{dev_id}")
    table = re.search(r'<table id="timeline">(.*?)</table>', page.text, re.S)
    assert table is not None
    text = html.unescape(table.group(1))
    assert "205 upgrade failed: MD5 check failed" in text
    assert "status reported" in text
    assert "classic" in text  # the dialect the device spoke
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", text)
    zh = client.get(f"{PREFIX}/devices/{dev_id}", headers={"Accept-Language": "zh-CN"})
    zh_table = re.search(r'<table id="timeline">(.*?)</table>', zh.text, re.S)
    assert zh_table is not None
    assert "205 升级失败" in html.unescape(zh_table.group(1))
    assert client.get(f"{PREFIX}/devices/{dev_id}", params={"after": "junk"}).status_code == 422


def test_junk_campaign_requests_get_4xx_never_5xx(platform: Platform) -> None:
    client, csrf = platform.signed_in(ADMIN)
    assert client.post(f"{PREFIX}/campaigns/5/pause", data={"_csrf": csrf}).status_code == 404
    assert client.get(f"{PREFIX}/campaigns/preview").status_code == 405
    assert client.post(f"{PREFIX}/campaigns/1/explode", data={"_csrf": csrf}).status_code == 404
    assert (
        client.post(
            f"{PREFIX}/campaigns/create",
            content=b"\xff\xfe" * 10,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ).status_code
        == 400
    )
    reply = client.post(f"{PREFIX}/campaigns/1/pause", data={"_csrf": csrf, "version": "9" * 40})
    assert reply.status_code == 404


def test_a_long_device_list_fits_the_campaign_form(platform: Platform) -> None:
    # Other forms stop at 16 KiB; a campaign's may list many devices by ID (the API takes up to
    # 100,000), so its limit is larger, and still a limit.
    _pid, package_id, dev_ids = fleet(platform, devices=10)
    client, csrf = platform.signed_in(platform.operator)
    unknown = " ".join(str(10**15 + i) for i in range(5000))  # devices of no product: ignored
    listed = " ".join(map(str, dev_ids)) + " " + unknown
    values = form(package_id, selector="devices", dev_ids=listed)
    reply = client.post(f"{PREFIX}/campaigns/preview", data={"_csrf": csrf, **values})
    assert reply.status_code == 200, reply.text[-2000:]
    assert re.search(r'id="preview-stage-1">.*?class="count">7<', reply.text)
    huge = form(package_id, selector="devices", dev_ids="1 " * 1_100_000)
    too_big = client.post(f"{PREFIX}/campaigns/preview", data={"_csrf": csrf, **huge})
    assert too_big.status_code == 400
    assert "could not be read" in too_big.text

"""``onenet-ota admin campaign ...`` and device labels over the real management API: labels from
the CLI and the CSV import, a campaign previewed, created, started, paused and shown, and the
API's answers to bad input (422/409 with a message, never 5xx)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx2
import pytest
from click.testing import Result

from tests.cli.conftest import TOKEN, Admin


def _json(result: Result) -> Any:
    return json.loads(result.stdout)


def _fleet(admin: Admin, tmp_path: Path) -> tuple[str, int]:
    """A product with 20 devices from a CSV with labels (odd ones region=eu), and a package."""
    pid = _json(admin("product", "create", "--json"))["pid"]
    lines = ["name,labels"] + [
        f"d{i},region={'eu' if i % 2 else 'us'};ring=r{i % 3}" for i in range(20)
    ]
    csv = tmp_path / "devices.csv"
    csv.write_text("\n".join(lines) + "\n")
    admin("device", "import", "--pid", pid, str(csv))
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"firmware" + pid.encode())
    package = _json(
        admin("package", "upload", str(firmware), "--pid", pid, "--type", "fota",
              "--target", "2.0", "--json")
    )  # fmt: skip
    return pid, int(package["id"])


def test_labels_from_csv_and_the_cli_select_devices(admin: Admin, tmp_path: Path) -> None:
    pid, _ = _fleet(admin, tmp_path)
    eu = _json(admin("device", "list", "--pid", pid, "--label", "region=eu", "--json"))
    assert len(eu["items"]) == 10
    dev_id = eu["items"][0]["dev_id"]
    admin("device", "label", str(dev_id), "ring=canary", "--remove", "region")
    shown = _json(admin("device", "show", str(dev_id), "--json"))
    assert shown["labels"] == {"ring": "canary"}
    both = _json(
        admin("device", "list", "--pid", pid, "--label", "region=us", "--label", "ring=r0",
              "--json")
    )  # fmt: skip
    assert {d["name"] for d in both["items"]} == {"d0", "d6", "d12", "d18"}
    bad = admin("device", "label", str(dev_id), "no-equals-sign", ok=False)
    assert bad.exit_code == 1
    assert "is not key=value" in bad.output


def test_campaign_preview_create_start_pause_show(admin: Admin, tmp_path: Path) -> None:
    _, package_id = _fleet(admin, tmp_path)
    spec = ["--package", str(package_id), "--label", "region=eu", "--stage",
            "count=2,max_failed=1", "--stage", "percent=50", "--stage", "rest"]  # fmt: skip
    preview = _json(admin("campaign", "preview", *spec, "--json"))
    assert [s["devices"] for s in preview["stages"]] == [2, 3, 5]
    created = _json(admin("campaign", "create", *spec, "--json"))
    assert created["state"] == "draft"
    campaign_id = str(created["id"])
    started = _json(admin("campaign", "start", campaign_id, "--json"))
    assert started["state"] == "running"
    stale = admin("campaign", "pause", campaign_id, "--if-version", "0", ok=False)
    assert "changed meanwhile" in stale.output
    admin("campaign", "pause", campaign_id, "--if-version", str(started["version"]))
    shown = admin("campaign", "show", campaign_id)
    assert "paused by an operator" in shown.output
    assert "stage 1: planned 2" in shown.output
    events = _json(admin("campaign", "events", campaign_id, "--json"))["items"]
    assert [e["action"] for e in events] == ["start", "pause"]


def test_unsatisfiable_campaign_is_refused_with_the_reasons(admin: Admin, tmp_path: Path) -> None:
    _, package_id = _fleet(admin, tmp_path)
    result = admin(
        "campaign", "create", "--package", str(package_id), "--stage", "percent=60",
        "--stage", "percent=120", ok=False,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "less than or equal to 100" in result.output
    result = admin(
        "campaign", "create", "--package", str(package_id), "--label", "region=mars",
        "--stage", "rest", ok=False,
    )  # fmt: skip
    assert "the selector matches no device" in result.output


def test_campaign_with_a_rate_and_dynamic_mode(admin: Any, tmp_path: Path) -> None:
    _, package_id = _fleet(admin, tmp_path)
    created = _json(
        admin("campaign", "create", "--package", str(package_id), "--label", "region=eu",
              "--rate", "per_minute=6,growth=2,period_s=300,max_per_minute=60", "--dynamic",
              "--stage", "percent=50", "--stage", "rest", "--json")
    )  # fmt: skip
    assert created["rate"] == {
        "per_minute": 6.0, "growth": 2.0, "period_s": 300, "max_per_minute": 60.0
    }  # fmt: skip
    assert created["dynamic"] is True
    plain = _json(
        admin("campaign", "create", "--package", str(package_id), "--rate", "30",
              "--stage", "rest", "--json")
    )  # fmt: skip
    assert plain["rate"]["per_minute"] == 30.0
    assert plain["dynamic"] is False
    bad = admin("campaign", "create", "--package", str(package_id), "--rate", "speed=3",
                "--stage", "rest", ok=False)  # fmt: skip
    assert "is not one of per_minute" in bad.output
    capped = admin(
        "campaign", "create", "--package", str(package_id), "--rate",
        "per_minute=60,growth=2,max_per_minute=10", "--stage", "rest", ok=False,
    )  # fmt: skip
    assert "below the starting rate" in capped.output


_STAGES = [{"rest": True}]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/campaigns", {"package_id": 1}, 422),
        ("POST", "/campaigns", {"package_id": 999999, "selector": {}, "stages": [{"rest": True}]},
         422),
        ("POST", "/campaigns/preview", {"package_id": 1, "selector": {"dev_ids": [1]},
                                        "selector2": 1, "stages": []}, 422),
        ("GET", "/campaigns/999999", None, 404),
        ("POST", "/campaigns/999999/start", None, 404),
        ("GET", "/campaigns/abc", None, 404),
        ("PUT", "/devices/999/labels", {"labels": {"k": "v"}}, 404),
        ("PUT", "/devices/999/labels", {"labels": {"k=": "v"}}, 422),
        ("PATCH", "/devices/999/labels", {"labels": {"k": "a,b"}}, 422),
        ("GET", "/devices?label=novalue", None, 422),
        # nonsense dispatch rates and dynamic mode over an explicit list
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": 0}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": -5}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": "NaN"}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": 10, "growth": 0.5}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": 10, "period_s": 0}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {}, "stages": _STAGES,
                                "rate": {"per_minute": 10, "max_per_minute": 20}}, 422),
        ("POST", "/campaigns", {"package_id": 1, "selector": {"dev_ids": [1]},
                                "stages": _STAGES, "dynamic": True}, 422),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_4xx(
    server: str, method: str, path: str, body: Any, status: int
) -> None:
    reply = httpx2.request(
        method,
        f"{server}/api/v1{path}",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]


def test_campaign_actions_from_list_to_abort(admin: Admin, server: str, tmp_path: Path) -> None:
    pid, package_id = _fleet(admin, tmp_path)
    eu = [d["dev_id"] for d in _json(admin("device", "list", "--pid", pid, "--json"))["items"]]
    spec = tmp_path / "campaign.json"
    spec.write_text(json.dumps({
        "name": "from-file", "package_id": package_id, "selector": {"dev_ids": eu[:4]},
        "stages": [{"count": 1}, {"rest": True}],
    }))  # fmt: skip
    created = _json(admin("campaign", "create", "--file", str(spec), "--json"))
    campaign_id = str(created["id"])
    drafts = _json(admin("campaign", "list", "--state", "draft", "--json"))["items"]
    assert created["id"] in [c["id"] for c in drafts]
    assert "from-file" in admin("campaign", "list").output

    admin("campaign", "start", campaign_id)
    admin("campaign", "pause", campaign_id)
    resumed = _json(admin("campaign", "resume", campaign_id, "--json"))
    assert resumed["state"] == "running"
    advanced = _json(
        admin("campaign", "advance", campaign_id, "--if-version", str(resumed["version"]),
              "--json")
    )  # fmt: skip
    assert advanced["stage"] == 1
    added = _json(admin("campaign", "add-devices", campaign_id, str(eu[4]), str(eu[5]), "--json"))
    assert added["population"] == 6
    none_failed = admin("campaign", "retry-failed", campaign_id, "--class", "package", ok=False)
    assert (
        none_failed.stderr == "error: no failed member of the chosen classes to retry (HTTP 409)\n"
    )
    assert admin("campaign", "retry-failed", campaign_id, ok=False).exit_code == 1
    aborted = admin("campaign", "abort", campaign_id)
    assert re.search(r"^state +aborted$", aborted.output, re.MULTILINE), aborted.output

    # --json prints the API's own JSON for the campaign, its events and a device's labels.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    raw = httpx2.get(f"{server}/api/v1/campaigns/{campaign_id}", headers=headers).json()
    assert _json(admin("campaign", "show", campaign_id, "--json")) == raw
    events = httpx2.get(f"{server}/api/v1/campaigns/{campaign_id}/events", headers=headers)
    assert _json(admin("campaign", "events", campaign_id, "--json")) == events.json()
    actions = [e["action"] for e in events.json()["items"]]
    assert actions == ["start", "pause", "resume", "advance", "add_devices", "abort"]
    replaced = _json(admin("device", "label", str(eu[0]), "site=b7", "--replace", "--json"))
    assert replaced == {"dev_id": eu[0], "labels": {"site": "b7"}}
    conflicting = admin("device", "label", str(eu[0]), "--replace", "--remove", "site", ok=False)
    assert "--remove makes no sense" in conflicting.stderr

"""The README's "Scripting the platform" examples run, as printed, against the real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.management.conftest import TOKEN

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Scripting the platform", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def _run(
    example: str,
    server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> list[str]:
    """The example's printed lines, run in ``tmp_path`` with its firmware files there."""
    monkeypatch.setenv("ONENET_OTA_SERVER", server)
    monkeypatch.setenv("ONENET_OTA_ADMIN_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    for version in ("1.0.1", "1.0.2"):
        (tmp_path / f"fw-{version}.bin").write_bytes(f"firmware {version}".encode())
    exec(compile(example, str(README), "exec"), {"__name__": "readme"})
    lines: list[str] = capsys.readouterr().out.splitlines()
    return lines


def test_the_readme_has_both_examples() -> None:
    assert len(_examples()) == 2


def test_the_readme_example_runs(
    server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _run(_examples()[0], server, tmp_path, monkeypatch, capsys)
    assert re.fullmatch(r"task \d+: 250 devices, 250 waiting", lines[0]), lines
    assert re.fullmatch(r"kept package \d+: .* \(HTTP 409, conflict\)", lines[1]), lines


def test_the_readme_campaign_example_runs(
    server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _run(_examples()[1], server, tmp_path, monkeypatch, capsys)
    assert lines[:3] == ["canary: 10 devices", "half: 90 devices", "all: 100 devices"]
    assert re.fullmatch(r"campaign \d+ running: 10 targeted", lines[3]), lines

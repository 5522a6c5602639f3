"""The README's "Scripting the platform" example runs, as printed, against the real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.management.conftest import TOKEN

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Scripting the platform", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the section has no python example"
    return found.group(1)


def test_the_readme_example_runs(
    server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ONENET_OTA_SERVER", server)
    monkeypatch.setenv("ONENET_OTA_ADMIN_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fw-1.0.1.bin").write_bytes(b"firmware 1.0.1")
    exec(compile(_example(), str(README), "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"task \d+: 250 devices, 250 waiting", lines[0]), lines
    assert re.fullmatch(r"kept package \d+: .* \(HTTP 409, conflict\)", lines[1]), lines

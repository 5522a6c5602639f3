"""The deployment files agree with systemd and with the code: ``deploy/onenet-ota.service``
passes ``systemd-analyze verify`` (where systemd is installed), and every ``ONENET_OTA_*``
variable the unit and the documents set is one the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from onenet_ota.cli.main import cli
from onenet_ota.server.config import Settings
from tests.server.serve_process import ONENET_OTA

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "onenet-ota.service"
EXEC_START = "ExecStart=/opt/onenet-ota/bin/onenet-ota serve\n"
_VARIABLE = re.compile(r"\bONENET_OTA_[A-Z_]*[A-Z]\b")


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(EXEC_START) == 1
    # verify checks that the command exists: point it at this environment's console script.
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(EXEC_START, f"ExecStart={ONENET_OTA} serve\n"), encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on a misspelt key or a bad value and only warns: any output is a finding.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _command_variables(command: click.Command) -> Iterator[str]:
    """The environment variables of ``command``'s options and of its subcommands'."""
    for param in command.params:
        envvar = param.envvar
        yield from [envvar] if isinstance(envvar, str) else envvar or []
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None:
                yield from _command_variables(sub)


def _variables_in_code() -> set[str]:
    found = {"ONENET_OTA_" + name.upper() for name in Settings.model_fields}
    found.update(_command_variables(cli))
    for path in (ROOT / "src").rglob("*.py"):
        found.update(_VARIABLE.findall(path.read_text(encoding="utf-8")))
    return found


def test_the_unit_and_the_documents_name_only_variables_the_code_reads() -> None:
    known = _variables_in_code()
    assert {"ONENET_OTA_HOST", "ONENET_OTA_DATA_DIR", "ONENET_OTA_ADMIN_TOKEN"} <= known
    assert {"ONENET_OTA_MANUF", "ONENET_OTA_SERVER"} <= known  # built by name in cli/device.py
    unknown = []
    for path in [UNIT, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in set(_VARIABLE.findall(path.read_text(encoding="utf-8"))) - known:
            unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert unknown == []

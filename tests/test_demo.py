"""`python -m onenet_ota.demo`: one whole upgrade against a throwaway platform, per dialect."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("dialect", ["classic", "studio", "fuse"])
def test_the_demo_upgrades_a_device_in_each_dialect(dialect: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "onenet_ota.demo", "--dialect", dialect, "--size", "100003"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"the device speaks the {dialect} dialect" in out
    assert "state succeeded, progress 100, result code 201" in out
    assert "installed file identical to the package: yes" in out
    assert "==> demo succeeded" in out
    assert ("--dialect" in out) is (dialect != "classic")

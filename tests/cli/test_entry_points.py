"""How the command line is reached: ``python -m onenet_ota`` and shell completion of the
``onenet-ota`` console script, each in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.server.serve_process import ONENET_OTA

K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="  # Appendix B.1
VECTOR_3 = (  # Appendix B.1 vector 3: the C SDK's own token for K1, sha1, product level
    "version=2018-10-31&res=products%2F123123&et=2524579200&method=sha1"
    "&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"
)


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ONENET_OTA_", "_ONENET"))}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**clean, **env}, check=False
    )


def test_python_dash_m_runs_the_command_line() -> None:
    result = run([sys.executable, "-m", "onenet_ota", "token", "--product-id", "123123"],
                 ONENET_OTA_ACCESS_KEY=K1)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, VECTOR_3 + "\n", "")


def test_python_dash_m_lists_the_commands_and_exits_2_on_a_wrong_one() -> None:
    listed = run([sys.executable, "-m", "onenet_ota", "--help"])
    assert listed.returncode == 0
    for name in ("admin", "device", "serve", "simulate", "token"):
        assert f"  {name}" in listed.stdout
    wrong = run([sys.executable, "-m", "onenet_ota", "no-such-command"])
    assert wrong.returncode == 2
    assert "No such command" in wrong.stderr


def test_bash_completion_script() -> None:
    result = run([str(ONENET_OTA)], _ONENET_OTA_COMPLETE="bash_source")
    assert result.returncode == 0
    assert "complete -o nosort -F _onenet_ota_completion onenet-ota" in result.stdout
    assert "_ONENET_OTA_COMPLETE=bash_complete" in result.stdout


def test_completion_offers_the_lazily_loaded_commands_and_their_options() -> None:
    commands = run([str(ONENET_OTA)], _ONENET_OTA_COMPLETE="bash_complete",
                   COMP_WORDS="onenet-ota s", COMP_CWORD="1")  # fmt: skip
    assert commands.returncode == 0
    assert commands.stdout.split() == ["plain,serve", "plain,simulate"]
    options = run([str(ONENET_OTA)], _ONENET_OTA_COMPLETE="bash_complete",
                  COMP_WORDS="onenet-ota serve --ho", COMP_CWORD="2")  # fmt: skip
    assert options.stdout.split() == ["plain,--host"]


def test_zsh_and_fish_completion_scripts() -> None:
    zsh = run([str(ONENET_OTA)], _ONENET_OTA_COMPLETE="zsh_source")
    assert "#compdef onenet-ota" in zsh.stdout
    fish = run([str(ONENET_OTA)], _ONENET_OTA_COMPLETE="fish_source")
    assert "complete --no-files --command onenet-ota" in fish.stdout

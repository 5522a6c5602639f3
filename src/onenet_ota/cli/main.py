"""The ``onenet-ota`` command group. Subcommands load lazily, so ``onenet-ota token`` on a device
does not import the server.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

try:
    import click
except ImportError:  # pragma: no cover - the CLI extra is not installed
    click = None  # type: ignore[assignment]

# name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "token": "onenet_ota.cli.token:token",
    "device": "onenet_ota.cli.device:device",
    "serve": "onenet_ota.cli.serve:serve",
    "admin": "onenet_ota.cli.admin:admin",
    "simulate": "onenet_ota.cli.simulate:simulate",
}


def _available() -> list[str]:
    names = []
    for name, target in COMMANDS.items():
        module = target.partition(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return sorted(names)


if click is not None:

    class _LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return _available()

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            if cmd_name not in _available():
                return None
            module_name, _, attr = COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command

    @click.group(cls=_LazyGroup)
    @click.version_option(package_name="onenet-ota")
    def cli() -> None:
        """OTA upgrades for OneNET devices: device SDK tools and a self-hosted platform."""


def main() -> None:
    """Console entry point."""
    if click is None:
        sys.exit("onenet-ota: the command line needs the 'cli' extra: pip install onenet-ota[cli]")
    cli()


if __name__ == "__main__":  # python -m onenet_ota.cli.main
    main()

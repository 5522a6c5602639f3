"""Fleet-test fixtures (defined in :mod:`tests.sim.platform`, shared with the CLI tests)."""

from tests.sim.platform import platform, recording_platform, sqlite_platform

__all__ = ["platform", "recording_platform", "sqlite_platform"]

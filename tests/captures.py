"""The official C SDK's request bytes for one full upgrade (spec Appendix C), vendored in
tests/data so the suite needs nothing outside the repository."""

from pathlib import Path

CAPTURES = Path(__file__).resolve().parent / "data" / "c-sdk-captures"
FIRMWARE = CAPTURES / "firmware.bin"

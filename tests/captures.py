"""The official C SDK's request bytes for one full upgrade (spec Appendix C), vendored from
shared/spec/c-sdk-captures so the suite runs from any clone."""

from pathlib import Path

CAPTURES = Path(__file__).resolve().parent / "data" / "c-sdk-captures"
FIRMWARE = CAPTURES / "firmware.bin"

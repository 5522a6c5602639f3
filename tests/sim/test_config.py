"""FleetConfig refuses impossible parameters, naming the flag; the range grammar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.sim import config as config_module
from onenet_ota.sim.config import FleetConfig, SimulationError, ValueRange, parse_range


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"devices": 0}, "--devices must be an integer from 1 to 100000"),
        ({"devices": 100_001}, "--devices must be an integer from 1 to 100000"),
        ({"devices": True}, "--devices"),
        ({"concurrency": 0}, "--concurrency must be an integer from 1"),
        ({"chunk_size": 1}, "--chunk-size must be an integer from 2 to 16777216"),
        ({"chunk_size": 17 * 1024 * 1024}, "--chunk-size"),
        ({"ramp_up": -1}, "--ramp-up must be a number of at least 0"),
        ({"ramp_up": float("nan")}, "--ramp-up"),
        ({"drop_rate": 1.0}, "--drop-rate must be a number of at least 0 and below 1"),
        ({"drop_rate": -0.1}, "--drop-rate"),
        ({"power_cut_rate": 1.5}, "--power-cut-rate must be a number of at least 0 and at most 1"),
        ({"timeout_ms": 0}, "--timeout-ms"),
        ({"version": "1.0 beta"}, "--version must be 1-20 characters"),
        ({"target": "x" * 21}, "--target must be 1-20 characters"),
        ({"target": "1.0.0"}, "--target must differ from --version"),
        ({"package_size": 0}, "--package-size must be an integer from 1"),
        ({"retry_interval": -1}, "--retry-interval"),
        ({"task_signal": 2**31}, "--task-signal"),
        ({"task_id": 0}, "--task must be an integer from 1"),
        ({"progress_step": 100}, "--progress-step"),
    ],
)
def test_impossible_parameters_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SimulationError, match=message.replace("(", r"\(")):
        FleetConfig(**changes)


def test_package_must_be_a_non_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="No such file"):
        FleetConfig(package=tmp_path / "missing.bin")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(SimulationError, match="must be a file of 1 to"):
        FleetConfig(package=empty)
    good = tmp_path / "fw.bin"
    good.write_bytes(b"x")
    with pytest.raises(SimulationError, match="--package and --task exclude each other"):
        FleetConfig(package=good, task_id=3)
    assert FleetConfig(package=good).package == good


def test_concurrency_beyond_the_fleet_is_reduced() -> None:
    assert FleetConfig(devices=10, concurrency=64).concurrency == 10


def test_concurrency_needs_file_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_fd_limit", lambda: 1024)
    with pytest.raises(SimulationError, match=r"ulimit -n\); use --concurrency 240 or less"):
        FleetConfig(devices=10_000, concurrency=1000)
    assert FleetConfig(devices=10_000, concurrency=240).concurrency == 240


def test_state_base_defaults_to_a_writable_directory(tmp_path: Path) -> None:
    assert FleetConfig(state_root=tmp_path).state_base() == tmp_path
    assert FleetConfig().state_base().is_dir()


def test_state_falls_back_to_the_disk_with_a_clear_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "MEMORY_DIR", tmp_path)
    assert FleetConfig().state_base() == tmp_path
    assert FleetConfig().state_note() is None
    missing = tmp_path / "no-shm"
    monkeypatch.setattr(config_module, "MEMORY_DIR", missing)
    base = FleetConfig().state_base()
    assert base != missing
    assert base.is_dir()
    note = FleetConfig().state_note()
    assert note is not None
    assert f"{missing} is missing or not writable" in note
    assert str(base) in note
    assert "--state-dir" in note
    assert FleetConfig(state_root=tmp_path).state_note() is None  # the operator chose


@given(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1))
def test_range_grammar_accepts_ordered_pairs(a: int, b: int) -> None:
    low, high = min(a, b), max(a, b)
    parsed = parse_range(f"{low}:{high}", "--signal", low=-(2**31), high=2**31 - 1)
    assert parsed == ValueRange(low, high)
    assert parse_range(str(parsed), "--signal", low=-(2**31), high=2**31 - 1) == parsed
    assert parse_range(str(a), "--power", low=-(2**31), high=2**31 - 1) == ValueRange(a, a)


@given(st.text(max_size=12))
def test_range_grammar_refuses_anything_else(text: str) -> None:
    first, sep, second = text.partition(":")
    try:
        expected = (int(first), int(second) if sep else int(first))
    except ValueError:
        expected = None
    if expected is None or expected[0] > expected[1] or expected[0] < 0 or expected[1] > 100:
        with pytest.raises(SimulationError, match=r"^--signal: "):
            parse_range(text, "--signal", low=0, high=100)
    else:
        assert parse_range(text, "--signal", low=0, high=100) == ValueRange(*expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [("9:1", "is empty"), ("a:b", "expected N or LOW:HIGH"), ("1:200", "within 0..100")],
)
def test_range_refusals(text: str, message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        parse_range(text, "--signal", low=0, high=100)

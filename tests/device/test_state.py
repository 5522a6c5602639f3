"""The upgrader's durable state: atomic JSON, the partial package, the lock."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onenet_ota.device.state import (
    KEEP_QUARANTINED,
    PartialFile,
    Phase,
    StateError,
    StateLocked,
    StateStore,
    UpgradeState,
    open_for_update,
)
from onenet_ota.protocol.codes import Dialect
from onenet_ota.protocol.messages import TaskInfo
from onenet_ota.protocol.status import TaskType

TASK = TaskInfo(
    target="1.0.1",
    token="ota_3fQ9cZr0LmT7wXa2bN5k",
    size=10_000,
    md5="000e87c6dfb9c77108f320f7c27a64ea",
    signal=10,
    power=20,
    retry=3,
    interval=1,
)


def make_state(**changes: object) -> UpgradeState:
    values: dict[str, object] = {
        "task_type": TaskType.FOTA,
        "from_version": "1.0.0",
        "task": TASK,
        "started_at": 1_700_000_000.5,
    }
    values.update(changes)
    return UpgradeState(**values)  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    state = make_state(
        phase=Phase.VERIFIED, offset=10_000, progress=50, sent=(101,), pending=201, redownloads=1
    )
    store.save(state)
    assert store.load() == state
    assert store.state_path.name == "fota.json"
    assert store.state_path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fota.json"]  # no temporaries left


def test_fota_and_sota_have_separate_states(tmp_path: Path) -> None:
    StateStore(tmp_path, TaskType.FOTA).save(make_state())
    assert StateStore(tmp_path, TaskType.SOTA).load() is None


def test_load_without_state_is_none(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "missing", TaskType.FOTA).load() is None


def test_save_replaces_the_previous_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.SOTA)
    store.save(make_state(task_type=TaskType.SOTA, offset=10))
    store.save(make_state(task_type=TaskType.SOTA, offset=20))
    loaded = store.load()
    assert loaded is not None
    assert loaded.offset == 20


def test_stale_temporaries_of_a_crashed_save_are_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.save(make_state())
    stale = tmp_path / ".tmp-fota.json12345"
    stale.write_bytes(b'{"format": 1, "torn')
    assert store.load() == make_state()
    assert not stale.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"format": 99}',
        b"[]",
        b"\xff\xfe",
        json.dumps({**make_state().to_json(), "offset": 10_001}).encode(),
        json.dumps({**make_state().to_json(), "offset": True}).encode(),
        json.dumps({**make_state().to_json(), "phase": "flying"}).encode(),
        json.dumps({**make_state().to_json(), "task": {"target": 1}}).encode(),
        json.dumps({**make_state().to_json(), "sent": [101, "201"]}).encode(),
        json.dumps({**make_state().to_json(), "from_version": "bad version"}).encode(),
        json.dumps({**make_state().to_json(), "task_type": 2}).encode(),  # SOTA in fota.json
    ],
)
def test_a_bad_state_file_is_set_aside_not_deleted(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.state_path.write_bytes(content)
    store.partial_path.write_bytes(b"partial bytes")
    assert store.load() is None
    assert (tmp_path / "fota.json.1.corrupt").read_bytes() == content
    assert (tmp_path / "fota.part.1.corrupt").read_bytes() == b"partial bytes"
    assert not store.state_path.exists()


def quarantine(store: StateStore, number: int, *, partial: bool = True) -> None:
    """Make ``store`` set aside one unreadable state (and a partial package) marked ``number``."""
    store.state_path.write_bytes(b"bad state %d" % number)
    if partial:
        store.partial_path.write_bytes(b"partial %d" % number)
    assert store.load() is None


def test_only_the_newest_quarantines_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert KEEP_QUARANTINED == 3
    store = StateStore(tmp_path, TaskType.FOTA)
    caplog.set_level(logging.INFO, logger="onenet_ota.device.state")
    for number in range(1, 6):
        quarantine(store, number)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fota.json.3.corrupt",
        "fota.json.4.corrupt",
        "fota.json.5.corrupt",
        "fota.part.3.corrupt",
        "fota.part.4.corrupt",
        "fota.part.5.corrupt",
    ]
    for number in (3, 4, 5):
        assert (tmp_path / f"fota.json.{number}.corrupt").read_bytes() == b"bad state %d" % number
        assert (tmp_path / f"fota.part.{number}.corrupt").read_bytes() == b"partial %d" % number
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert removed == [
        f"removed old quarantined state file {name} from {tmp_path}"
        for name in (
            "fota.json.1.corrupt",
            "fota.part.1.corrupt",
            "fota.json.2.corrupt",
            "fota.part.2.corrupt",
        )
    ]


@settings(max_examples=30, deadline=None)
@given(partials=st.lists(st.booleans(), min_size=1, max_size=8))
def test_quarantines_keep_the_newest_generations_whole(partials: list[bool]) -> None:
    # Some quarantines have no partial package; a generation is kept or removed as a whole.
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(directory, TaskType.FOTA)
        for number, partial in enumerate(partials, start=1):
            quarantine(store, number, partial=partial)
        kept = range(max(1, len(partials) - KEEP_QUARANTINED + 1), len(partials) + 1)
        expected = {f"fota.json.{n}.corrupt" for n in kept}
        expected |= {f"fota.part.{n}.corrupt" for n in kept if partials[n - 1]}
        assert {p.name for p in Path(directory).iterdir()} == expected
        for n in kept:
            assert (Path(directory) / f"fota.json.{n}.corrupt").read_bytes() == b"bad state %d" % n


def test_quarantines_are_ordered_by_number_not_by_mtime(tmp_path: Path) -> None:
    # A device without a real-time clock may write the newest file with the oldest mtime.
    store = StateStore(tmp_path, TaskType.FOTA)
    for number in range(1, 4):
        quarantine(store, number)
    for path in tmp_path.iterdir():
        os.utime(path, (4_000_000_000, 4_000_000_000))
    store.state_path.write_bytes(b"bad state 4")
    os.utime(store.state_path, (1_000, 1_000))
    assert store.load() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fota.json.2.corrupt",
        "fota.json.3.corrupt",
        "fota.json.4.corrupt",
        "fota.part.2.corrupt",
        "fota.part.3.corrupt",
    ]


def test_unnumbered_quarantines_of_earlier_versions_are_the_oldest(tmp_path: Path) -> None:
    (tmp_path / "fota.json.corrupt").write_bytes(b"legacy")
    (tmp_path / "fota.part.corrupt").write_bytes(b"legacy")
    store = StateStore(tmp_path, TaskType.FOTA)
    quarantine(store, 1)
    quarantine(store, 2)
    assert (tmp_path / "fota.json.corrupt").exists()  # three generations: 0, 1, 2
    quarantine(store, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fota.json.1.corrupt",
        "fota.json.2.corrupt",
        "fota.json.3.corrupt",
        "fota.part.1.corrupt",
        "fota.part.2.corrupt",
        "fota.part.3.corrupt",
    ]


def test_pruning_touches_nothing_but_our_quarantine_files(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "fota.json.1.corrupt"  # an old generation's name, outside the directory
    target.write_bytes(b"not ours")
    (state_dir / "fota.json.1.corrupt").symlink_to(target)
    (state_dir / "fota.part.1.corrupt").symlink_to(outside)
    (state_dir / "fota.json.0.corrupt").mkdir()  # a directory named like ours
    (state_dir / "fota.json.0.corrupt" / "inside").write_bytes(b"not ours")
    look_alikes = [
        "fota.json.01.corrupt",
        "fota.json.0.corrupt.bak",
        "fota.json.x.corrupt",
        "fota.json.-1.corrupt",
        "fota.json.1.corrupt~",
        "fota.lock.1.corrupt",
        "fota.json.1.CORRUPT",
        "xfota.json.1.corrupt",
        ".fota.json.1.corrupt",
        "fota.json.1 .corrupt",
        "fota.json.corrupt.1",
        "sota.json.1.corrupt",  # the other task type's quarantine is its own business
        "sota.json.corrupt",
    ]
    for name in look_alikes:
        (state_dir / name).write_bytes(b"not ours")
    sub = state_dir / "sub"
    sub.mkdir()
    (sub / "fota.json.2.corrupt").write_bytes(b"not ours")
    before = sorted(p.name for p in state_dir.iterdir())

    store = StateStore(state_dir, TaskType.FOTA)
    for number in range(2, 2 + KEEP_QUARANTINED + 2):
        quarantine(store, number)

    # Generations 2..6 were made (1 was taken by the symlink); 2 and 3 were removed.
    ours = {f"fota.{kind}.{n}.corrupt" for kind in ("json", "part") for n in (4, 5, 6)}
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([*before, *ours])
    assert (state_dir / "fota.json.1.corrupt").is_symlink()
    assert (state_dir / "fota.part.1.corrupt").is_symlink()
    assert target.read_bytes() == b"not ours"
    assert (state_dir / "fota.json.0.corrupt" / "inside").read_bytes() == b"not ours"
    assert (sub / "fota.json.2.corrupt").read_bytes() == b"not ours"
    for name in look_alikes:
        assert (state_dir / name).read_bytes() == b"not ours"


def test_the_quarantine_log_does_not_quote_the_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "ota_secret but/not a valid token"
    bad = {**make_state().to_json(), "task": {**TASK.to_data(), "token": secret}}
    store = StateStore(tmp_path, TaskType.FOTA)
    store.state_path.write_text(json.dumps(bad))
    with caplog.at_level(logging.DEBUG, logger="onenet_ota.device.state"):
        assert store.load() is None
    assert "moved aside as fota.json.1.corrupt" in caplog.text
    assert secret not in caplog.text


def test_a_state_file_that_cannot_be_moved_aside_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.state_path.write_bytes(b"not json")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateError, match=r"cannot move unreadable .*fota\.json aside"):
        store.load()
    assert store.state_path.read_bytes() == b"not json"  # nothing lost


def test_state_refuses_an_offset_outside_the_package() -> None:
    with pytest.raises(ValueError, match="outside the package"):
        make_state(offset=10_001)


def test_clear_removes_state_and_partial(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.save(make_state())
    store.partial_path.write_bytes(b"x")
    store.clear()
    assert not store.state_path.exists()
    assert not store.partial_path.exists()
    store.clear()  # clearing nothing is fine


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), cut=st.integers(min_value=0, max_value=6000))
def test_open_partial_truncates_to_the_offset_and_recomputes_md5(data: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(directory, TaskType.FOTA)
        store.partial_path.write_bytes(data)
        with store.open_partial(cut) as partial:
            if cut <= len(data):
                assert partial.offset == cut
                assert partial.hexdigest() == hashlib.md5(data[:cut]).hexdigest()
            else:  # shorter than its durable offset: the disk lost data, start over
                assert partial.offset == 0
                assert partial.hexdigest() == hashlib.md5(b"").hexdigest()
            expected = min(cut, len(data)) if cut <= len(data) else 0
            assert store.partial_path.stat().st_size == expected


def test_partial_writes_in_order_and_syncs(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    with store.open_partial(0) as partial:
        partial.write(b"hello ")
        partial.write(memoryview(b"world"))
        assert partial.offset == 11
        assert partial.durable_offset == 0
        assert partial.sync() == 11
        assert partial.hexdigest() == hashlib.md5(b"hello world").hexdigest()
    assert store.partial_path.read_bytes() == b"hello world"
    with store.open_partial(6) as partial:
        partial.write(b"there")
        assert partial.hexdigest() == hashlib.md5(b"hello there").hexdigest()
    assert store.partial_path.read_bytes() == b"hello there"


class _FullDisk:
    """A file that accepts ``room`` bytes, then fails with ENOSPC, like a full filesystem."""

    def __init__(self, file: BinaryIO, room: int) -> None:
        self._file = file
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def test_a_failed_write_leaves_the_offset_and_the_md5_unchanged(tmp_path: Path) -> None:
    def opener(path: Path) -> BinaryIO:
        return _FullDisk(open_for_update(path), room=8)  # type: ignore[return-value]

    store = StateStore(tmp_path, TaskType.FOTA, opener=opener)
    with store.open_partial(0) as partial:
        partial.write(b"12345")
        with pytest.raises(OSError, match="No space left") as info:
            partial.write(b"67890")
        assert info.value.errno == errno.ENOSPC
        assert partial.offset == 5
        assert partial.hexdigest() == hashlib.md5(b"12345").hexdigest()
    assert store.partial_path.read_bytes() == b"12345"


class _Counted:
    """A file that counts its seeks, and fails a write with ENOSPC after ``room`` more bytes
    (writing what fits first, as a filesystem filling up does); ``room`` None: no limit."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.room: int | None = None
        self.seeks = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.seeks += 1
        return self._file.seek(offset, whence)

    def write(self, data: bytes) -> int:
        if self.room is not None:
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = bytes(data[: self.room])
            self.room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def test_writes_in_order_do_not_seek_and_a_failed_one_puts_the_next_at_the_offset(
    tmp_path: Path,
) -> None:
    files: list[_Counted] = []

    def opener(path: Path) -> BinaryIO:
        files.append(_Counted(open_for_update(path)))
        return files[-1]  # type: ignore[return-value]

    store = StateStore(tmp_path, TaskType.FOTA, opener=opener)
    with store.open_partial(0) as partial:
        (file,) = files
        seeks = file.seeks
        for piece in (b"123", b"45", b"678"):
            partial.write(piece)
        assert file.seeks == seeks + 1  # the first write finds its place; the rest follow it
        file.room = 2  # "9a" fits, then the disk is full: the file is cut back to 8 bytes
        with pytest.raises(OSError, match="No space left"):
            partial.write(b"9abc")
        file.room = None
        partial.write(b"xyz")  # where the failed write began, not where it stopped
        assert partial.offset == 11
        assert partial.hexdigest() == hashlib.md5(b"12345678xyz").hexdigest()
    assert store.partial_path.read_bytes() == b"12345678xyz"


def test_a_sync_behind_persists_after_the_fsync_and_counts_only_once_settled(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    seen: list[tuple[bytes, int]] = []
    with store.open_partial(0) as partial:
        partial.write(b"hello ")

        def after() -> None:  # what the flow runs there: persist the offset the fsync covers
            seen.append((store.partial_path.read_bytes(), partial.durable_offset))

        checkpoint = partial.sync_behind(after)
        partial.write(b"world")  # the download goes on while the worker syncs
        assert checkpoint.offset == 6
        partial.settle(checkpoint)
        assert partial.durable_offset == 6  # what was flushed before, not what came after
        assert partial.offset == 11
    # The worker ran after the flush, and before its offset counted as durable.
    assert seen[0][0].startswith(b"hello ")
    assert seen[0][1] == 0


def test_a_failed_sync_behind_raises_on_settling_and_durability_stays(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    with store.open_partial(0) as partial:
        partial.write(b"hello")

        def full_disk() -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        checkpoint = partial.sync_behind(full_disk)
        with pytest.raises(OSError, match="No space left"):
            partial.settle(checkpoint)
        assert partial.durable_offset == 0


def test_partial_file_without_sync_keeps_its_durable_offset(tmp_path: Path) -> None:
    path = tmp_path / "p"
    partial = PartialFile(open_for_update(path), 0, hashlib.md5())
    partial.write(b"abc")
    assert partial.durable_offset == 0
    partial.close()


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    other = StateStore(tmp_path, TaskType.FOTA)
    with store.lock():
        with pytest.raises(StateLocked, match="another upgrader"), other.lock():
            pass
        with StateStore(tmp_path, TaskType.SOTA).lock():  # the other type is independent
            pass
    with other.lock():
        pass


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from onenet_ota.device.state import StateStore\n"
        "from onenet_ota.protocol.status import TaskType\n"
        "with StateStore(sys.argv[1], TaskType.FOTA).lock():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StateLocked), StateStore(tmp_path, TaskType.FOTA).lock():
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    with StateStore(tmp_path, TaskType.FOTA).lock():
        pass


def test_state_directory_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    from onenet_ota.device.state import StateError

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StateError, match="state directory"):
        StateStore(not_a_dir, TaskType.FOTA).save(make_state())


# -- dialects (§13.7) ----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", [Dialect.STUDIO, Dialect.FUSE])
def test_a_tid_state_round_trips_with_its_dialect(tmp_path: Path, dialect: Dialect) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    state = make_state(task=replace(TASK, token="4242"), dialect=dialect, offset=4096)
    store.save(state)
    assert json.loads(store.state_path.read_bytes())["dialect"] == dialect.value
    assert store.load() == state


def test_a_state_written_before_dialects_reads_as_classic(tmp_path: Path) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.save(make_state(offset=100))
    obj = json.loads(store.state_path.read_bytes())
    del obj["dialect"]
    store.state_path.write_text(json.dumps(obj))
    loaded = store.load()
    assert loaded is not None
    assert loaded.dialect is Dialect.CLASSIC
    assert loaded.offset == 100


@pytest.mark.parametrize("token", ["ota_3fQ9cZr0LmT7wXa2bN5k", "0", "042", "2147483648"])
def test_a_tid_state_needs_a_tid(token: str) -> None:
    with pytest.raises(ValueError, match="tid"):
        make_state(task=replace(TASK, token=token), dialect=Dialect.FUSE)


@pytest.mark.parametrize("dialect", ["things", 3, None])
def test_a_state_of_an_unknown_dialect_is_set_aside(tmp_path: Path, dialect: object) -> None:
    store = StateStore(tmp_path, TaskType.FOTA)
    store.save(make_state())
    obj = json.loads(store.state_path.read_bytes())
    obj["dialect"] = dialect
    store.state_path.write_text(json.dumps(obj))
    assert store.load() is None
    assert not store.state_path.exists()

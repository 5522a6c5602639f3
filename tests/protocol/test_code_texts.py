"""The one table of status codes' names and texts (protocol.code_texts) against the enum and
the report table of spec §5.5 / §6.7.1."""

from __future__ import annotations

from onenet_ota.protocol.code_texts import (
    CODE_TEXTS,
    STATE_TEXT_ZH,
    code_label,
    code_name,
    code_text,
)
from onenet_ota.protocol.states import REPORT_TABLE, TaskState
from onenet_ota.protocol.status import ReportKind, StatusCode, classify_step


def test_every_status_code_has_one_entry_with_a_unique_name() -> None:
    assert set(CODE_TEXTS) == {int(code) for code in StatusCode}
    names = [entry.name for entry in CODE_TEXTS.values()]
    assert len(set(names)) == len(names)
    for code, entry in CODE_TEXTS.items():
        assert entry.code == code
        assert entry.text
        assert entry.name
        assert entry.text_zh is None  # the sources give no per-code console wording
        assert entry.source == "spec §6.7.1"


def test_each_codes_class_and_state_match_the_report_table() -> None:
    for code, entry in CODE_TEXTS.items():
        kind = classify_step(code)
        assert kind is not None
        download = kind in (ReportKind.DOWNLOADED, ReportKind.DOWNLOAD_FAILED)
        assert entry.phase == ("download" if download else "upgrade")
        assert (entry.outcome == "success") == (
            kind in (ReportKind.DOWNLOADED, ReportKind.UPGRADED)
        )
        # From downloading, where every status code is accepted (§5.5), the code leads to the
        # state the table names.
        outcome = REPORT_TABLE[TaskState.DOWNLOADING][kind]
        assert outcome.state is not None
        assert entry.state == outcome.state.name.lower()


def test_labels_show_code_and_name_and_leave_other_numbers_bare() -> None:
    assert code_label(205) == "205 md5 mismatch"
    assert code_label(101) == "101 downloaded"
    assert (code_label(50), code_label(209)) == ("50", "209")
    assert code_name(None) is None
    assert code_text(204) == "upgrade failed: package version ≠ task target"
    assert StatusCode.UPGRADE_RETRY_LIMIT.label == "207 retry limit"


def test_every_state_has_its_console_wording() -> None:
    assert set(STATE_TEXT_ZH) == {state.name.lower() for state in TaskState}
    assert STATE_TEXT_ZH["to_be_upgraded"] == "待升级"

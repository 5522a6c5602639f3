"""Reply codes of the three dialects (spec §4.4, §6.1-§6.9, S4-S8, §13.5, F2-F9)."""

from __future__ import annotations

import pytest

from onenet_ota.protocol.codes import (
    DOWNLOAD_CODES,
    REPLY_CODES,
    REPLY_TEXTS,
    Dialect,
    DownloadVerdict,
    FuseCode,
    Operation,
    OtaErrno,
    Verdict,
    download_code,
    reply_code,
    reply_text,
    verdict_of_code,
    verdict_of_errno,
)
from onenet_ota.protocol.dialects import ENDPOINTS
from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import REPORT_TABLE, TOKEN_CHECK_TABLE

C, ST, FU = Dialect.CLASSIC, Dialect.STUDIO, Dialect.FUSE
Op, V, D = Operation, Verdict, DownloadVerdict

# The "errnos:" line at the end of each classic endpoint's section, copied by hand.
CLASSIC_ERRNOS = {
    Op.REPORT_VERSION: {0, 1, 2, 7},  # §6.1
    Op.QUERY_VERSION: {0, 1, 2, 7},  # §6.2
    Op.CHECK_TASK: {0, 1, 2, 7, 8, 9, 11, 27},  # §6.3
    Op.TASKING: {0, 1, 2, 4, 7, 12},  # §6.4
    Op.CHECK_STATE: {0, 1, 2, 4, 7, 12, 17, 20, 22},  # §6.5
    Op.REPORT_STATUS: {0, 1, 2, 7, 17, 20, 21, 22},  # §6.7
    Op.REPORT_RESULT: {0, 1, 2, 7, 20, 21, 22, 24},  # §6.8
    Op.DEV_INFO: {0, 1, 2, 7},  # §6.9
}


@pytest.mark.parametrize("operation", list(CLASSIC_ERRNOS))
def test_classic_codes_are_each_endpoints_errno_list(operation: Operation) -> None:
    assert set(REPLY_CODES[C][operation].values()) == CLASSIC_ERRNOS[operation]


@pytest.mark.parametrize(
    ("dialect", "operation", "verdict", "code"),
    [
        (C, Op.CHECK_TASK, V.NO_TASK, 11),
        (C, Op.CHECK_STATE, V.UNKNOWN_TASK, 4),  # §6.5 step 2
        (C, Op.REPORT_STATUS, V.UNKNOWN_TASK, 1),  # §6.7 step 2
        (C, Op.REPORT_RESULT, V.UNKNOWN_TASK, 1),  # §6.8 step 2
        (C, Op.TASKING, V.NOT_RUNNING, 4),  # D18
        (ST, Op.CHECK_TASK, V.NO_TASK, 10),  # S4
        (ST, Op.CHECK_TASK, V.BAD_VERSION_FORMAT, 27),  # S4
        (ST, Op.CHECK_TASK, V.FROM_VERSION_MISMATCH, 9),  # S4
        (ST, Op.CHECK_STATE, V.UNKNOWN_TASK, 4),  # S6
        (ST, Op.CHECK_STATE, V.TASK_CANCELLED, 22),  # S6 = §5.4
        (ST, Op.REPORT_STATUS, V.UNKNOWN_TASK, 4),  # S8
        (ST, Op.REPORT_VERSION, V.AUTH_FAILED, 1),  # S2, S3
        (FU, Op.CHECK_TASK, V.NO_TASK, 12012),  # F6
        (FU, Op.CHECK_TASK, V.ALREADY_ON_TARGET, 12013),  # F6
        (FU, Op.CHECK_TASK, V.BAD_VERSION_FORMAT, 27),  # F3
        (FU, Op.CHECK_STATE, V.UNKNOWN_TASK, 12012),  # F7
        (FU, Op.REPORT_STATUS, V.UNKNOWN_TASK, 12012),  # F9
        (FU, Op.REPORT_STATUS, V.INVALID_STATE, 17),  # §13.5
        (FU, Op.REPORT_STATUS, V.TASK_FINISHED, 20),  # §13.5
        (FU, Op.REPORT_VERSION, V.AUTH_FAILED, 10403),  # F2, F4
        (FU, Op.REPORT_VERSION, V.INVALID_PARAMETER, 2),  # F5
    ],
)
def test_golden_codes(dialect: Dialect, operation: Operation, verdict: Verdict, code: int) -> None:
    assert reply_code(dialect, operation, verdict) == code


@pytest.mark.parametrize(
    ("dialect", "operation", "verdict"),
    [
        (ST, Op.CHECK_TASK, V.MANUF_MODEL_MISMATCH),  # no manuf/model in Studio (§12.1)
        (FU, Op.CHECK_STATE, V.TOKEN_EXPIRED),  # a tid does not expire
        (ST, Op.CHECK_STATE, V.TOKEN_EXPIRED),
        (C, Op.CHECK_TASK, V.ALREADY_ON_TARGET),  # fuse only (F6)
        (FU, Op.CHECK_STATE, V.INVALID_STATE),  # F7: F-T answers every state
        (C, Op.REPORT_RESULT, V.INVALID_STATE),  # §6.8 lists no 17
    ],
)
def test_verdicts_a_dialect_cannot_reach_have_no_code(
    dialect: Dialect, operation: Operation, verdict: Verdict
) -> None:
    with pytest.raises(KeyError, match="no code"):
        reply_code(dialect, operation, verdict)


def test_operations_without_an_endpoint_have_no_codes() -> None:
    for dialect in Dialect:
        operations = {e.operation for e in ENDPOINTS if e.dialect is dialect}
        assert set(REPLY_CODES[dialect]) == operations
    with pytest.raises(KeyError):
        reply_code(FU, Op.TASKING, V.OK)


def test_every_code_has_a_text_and_fuse_keeps_its_own_wording() -> None:
    for dialect, rows in REPLY_CODES.items():
        for row in rows.values():
            for code in row.values():
                assert reply_text(dialect, code)
    assert reply_text(C, 20) == "task finished"
    assert reply_text(FU, 20) == "task finish"  # §13.5
    assert reply_text(FU, 12012) == "not exist"
    assert reply_text(FU, 12013) == "task succ"
    assert reply_text(FU, 10403) == "auth failed"
    assert reply_text(ST, 10) == "no task"
    assert set(REPLY_TEXTS[FU]) == {int(c) for c in FuseCode}


# Every refusal of the state tables, numbered by each dialect's report and check endpoints, is
# the number the table itself carries: one machine, three wires (S10, F14; F3 keeps classic's).
@pytest.mark.parametrize("dialect", list(Dialect))
def test_state_table_outcomes_keep_their_numbers_in_every_dialect(dialect: Dialect) -> None:
    for row in REPORT_TABLE.values():
        for outcome in row.values():
            verdict = verdict_of_errno(outcome.errno)
            assert reply_code(dialect, Op.REPORT_STATUS, verdict) == int(outcome.errno)
    if dialect is Dialect.FUSE:
        return  # F7: F-T refuses nothing by state
    for (_, expired), outcome in TOKEN_CHECK_TABLE.items():
        if expired and dialect is not Dialect.CLASSIC:
            continue  # tids do not expire
        verdict = verdict_of_errno(outcome.errno)
        assert reply_code(dialect, Op.CHECK_STATE, verdict) == int(outcome.errno)


@pytest.mark.parametrize("errno", [Errno.AUTH_FAILED, Errno.NO_TASK, Errno.INVALID_RESULT])
def test_verdict_of_errno_refuses_errnos_the_state_tables_never_give(errno: Errno) -> None:
    with pytest.raises(ValueError, match="state tables"):
        verdict_of_errno(errno)


def test_codes_read_back_to_a_verdict_with_the_same_code() -> None:
    for dialect, rows in REPLY_CODES.items():
        for operation, row in rows.items():
            for code in row.values():
                verdict = verdict_of_code(dialect, operation, code)
                assert verdict is not None
                assert row[verdict] == code
            assert verdict_of_code(dialect, operation, 99999) is None
    # Shared numbers read as the first verdict: classic E7's 1 is an auth failure to a device.
    assert verdict_of_code(C, Op.REPORT_STATUS, 1) is V.AUTH_FAILED


DOWNLOAD_GOLDEN = {
    # §6.6 processing and D7
    C: {
        D.BAD_PARAMETER: 5,
        D.UNKNOWN_TASK: 3,
        D.NOT_DOWNLOADABLE: 3,
        D.PACKAGE_MISSING: 1,
        D.SIZE_MISMATCH: 2,
        D.READ_FAILED: 4,
    },
    # S7, S2
    ST: {
        D.OK: 0,
        D.AUTH_FAILED: 6,
        D.UNKNOWN_TASK: 5,
        D.NOT_DOWNLOADABLE: 5,
        D.PACKAGE_MISSING: 2,
        D.SIZE_MISMATCH: 4,
        D.READ_FAILED: 3,
    },
    # F8, F2
    FU: {
        D.OK: 0,
        D.AUTH_FAILED: 6,
        D.UNKNOWN_TASK: 1,
        D.NOT_DOWNLOADABLE: 5,
        D.PACKAGE_MISSING: 2,
        D.SIZE_MISMATCH: 4,
        D.READ_FAILED: 3,
    },
}


@pytest.mark.parametrize("dialect", list(Dialect))
def test_download_codes(dialect: Dialect) -> None:
    assert dict(DOWNLOAD_CODES[dialect]) == DOWNLOAD_GOLDEN[dialect]
    for verdict, code in DOWNLOAD_GOLDEN[dialect].items():
        assert download_code(dialect, verdict) == code


def test_download_verdicts_without_a_code() -> None:
    with pytest.raises(KeyError, match="no download code"):
        download_code(C, D.AUTH_FAILED)  # D5: classic downloads carry no credential
    with pytest.raises(KeyError, match="no download code"):
        download_code(FU, D.BAD_PARAMETER)  # fuse has no s_id


def test_ota_errno_texts_are_13_5s() -> None:
    assert [o.text for o in OtaErrno] == [
        "succ",
        "device not found",
        "file not found",
        "storage read failure",
        "size mismatch",
        "task expired or no longer downloadable",
        "authentication failed",
    ]

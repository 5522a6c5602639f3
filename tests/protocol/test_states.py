"""The task state machine tables (spec §5.3-§5.5, D12, D14, D15)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import (
    ACTION_TABLE,
    DOWNLOAD_TABLE,
    REPORT_TABLE,
    TOKEN_CHECK_TABLE,
    Action,
    IllegalTransition,
    Outcome,
    TaskState,
    action_sources,
    action_target,
    on_action,
    on_download,
    on_report,
    on_status_query,
    on_token_check,
    wire_status,
)
from onenet_ota.protocol.status import (
    STATUS_TEXT,
    ReportKind,
    StatusCode,
    classify_result,
    classify_step,
    describe_status,
    status_name,
)

S, R, E = TaskState, ReportKind, Errno

# §5.5 transcribed independently of the module: state -> the row's cells in column order
# 0-99, 100, 101, 102-107, 201, 202-208. A TaskState is a new state; an Errno a refusal.
SPEC_5_5: dict[TaskState, list[TaskState | Errno]] = {
    S.TO_BE_UPGRADED: [E(17), E(17), S.UPGRADING, S.FAILED, E(21), E(21)],
    S.DOWNLOADING: [S.DOWNLOADING, S.UPGRADING, S.UPGRADING, S.FAILED, S.SUCCEEDED, S.FAILED],
    S.UPGRADING: [E(17), E(17), E(21), E(21), S.SUCCEEDED, S.FAILED],
    S.PAUSED: [E(17), E(17), E(21), E(21), E(21), E(21)],
    S.SUCCEEDED: [E(20)] * 6,
    S.FAILED: [E(20)] * 6,
    S.CANCELLED: [E(22)] * 6,
}
COLUMNS = [R.PROGRESS, R.COMPLETE, R.DOWNLOADED, R.DOWNLOAD_FAILED, R.UPGRADED, R.UPGRADE_FAILED]


@pytest.mark.parametrize("state", list(TaskState))
@pytest.mark.parametrize("column", range(6))
def test_report_table_matches_spec_5_5(state: TaskState, column: int) -> None:
    expected = SPEC_5_5[state][column]
    outcome = on_report(state, COLUMNS[column])
    if isinstance(expected, TaskState):
        assert outcome == Outcome(E.SUCC, expected)
        assert outcome.ok
    else:
        assert outcome == Outcome(expected)
        assert not outcome.ok


def test_report_table_is_complete() -> None:
    assert set(REPORT_TABLE) == set(TaskState)
    for row in REPORT_TABLE.values():
        assert set(row) == set(ReportKind)


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (0, R.PROGRESS),
        (99, R.PROGRESS),
        (100, R.COMPLETE),
        (101, R.DOWNLOADED),
        (102, R.DOWNLOAD_FAILED),
        (107, R.DOWNLOAD_FAILED),
        (201, R.UPGRADED),
        (202, R.UPGRADE_FAILED),
        (208, R.UPGRADE_FAILED),
        (-1, None),
        (108, None),
        (200, None),
        (209, None),
        (1000, None),
    ],
)
def test_classify_step(step: int, kind: ReportKind | None) -> None:
    assert classify_step(step) == kind


@given(st.integers(-1000, 1000))
def test_e8_accepts_only_status_codes(result: int) -> None:
    # D15: 0-100 is invalid in E8.
    kind = classify_result(result)
    assert (kind is not None) == (101 <= result <= 107 or 201 <= result <= 208)


# §5.4, with its precedence: cancelled, finished, expired, state.
@pytest.mark.parametrize(
    ("state", "expired", "expected"),
    [
        (S.CANCELLED, True, Outcome(E(22))),
        (S.CANCELLED, False, Outcome(E(22))),
        (S.SUCCEEDED, True, Outcome(E(20))),
        (S.FAILED, False, Outcome(E(20))),
        (S.TO_BE_UPGRADED, True, Outcome(E(12))),
        (S.PAUSED, True, Outcome(E(12))),
        (S.PAUSED, False, Outcome(E(17))),
        (S.UPGRADING, False, Outcome(E(17))),
        (S.TO_BE_UPGRADED, False, Outcome(E.SUCC, S.DOWNLOADING)),
        (S.DOWNLOADING, False, Outcome(E.SUCC, S.DOWNLOADING)),
    ],
)
def test_token_check_table(state: TaskState, expired: bool, expected: Outcome) -> None:
    assert on_token_check(state, token_expired=expired) == expected


@pytest.mark.parametrize(
    ("state", "action", "paused_from", "expected"),
    [
        (S.TO_BE_UPGRADED, Action.PAUSE, None, S.PAUSED),
        (S.DOWNLOADING, Action.PAUSE, None, S.PAUSED),
        (S.PAUSED, Action.RESUME, S.DOWNLOADING, S.DOWNLOADING),
        (S.PAUSED, Action.RESUME, S.TO_BE_UPGRADED, S.TO_BE_UPGRADED),
        (S.UPGRADING, Action.CANCEL, None, S.CANCELLED),
        (S.PAUSED, Action.CANCEL, None, S.CANCELLED),
        (S.DOWNLOADING, Action.DEADLINE, None, S.FAILED),
        (S.PAUSED, Action.VERSION_REACHED, None, S.SUCCEEDED),
    ],
)
def test_allowed_actions(
    state: TaskState, action: Action, paused_from: TaskState | None, expected: TaskState
) -> None:
    assert on_action(state, action, paused_from=paused_from) is expected


@pytest.mark.parametrize(
    ("state", "action", "paused_from"),
    [
        (S.UPGRADING, Action.PAUSE, None),
        (S.PAUSED, Action.PAUSE, None),
        (S.DOWNLOADING, Action.RESUME, None),
        (S.PAUSED, Action.RESUME, None),
        (S.PAUSED, Action.RESUME, S.UPGRADING),
        *[(t, a, None) for t in (S.SUCCEEDED, S.FAILED, S.CANCELLED) for a in Action],
    ],
)
def test_illegal_actions_raise(
    state: TaskState, action: Action, paused_from: TaskState | None
) -> None:
    with pytest.raises(IllegalTransition, match=f"can't {action.name.lower()}"):
        on_action(state, action, paused_from=paused_from)


events = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(list(ReportKind))),
    st.tuples(st.just("check"), st.booleans()),
    st.tuples(st.just("action"), st.sampled_from(list(Action))),
)


@given(st.lists(events, max_size=30))
def test_terminal_states_are_absorbing_and_paused_remembers(
    seq: list[tuple[str, object]],
) -> None:
    state, paused_from = S.TO_BE_UPGRADED, None
    for kind, arg in seq:
        before = state
        if kind == "report":
            assert isinstance(arg, ReportKind)
            outcome = on_report(state, arg)
            state = outcome.state if outcome.ok and outcome.state else state
        elif kind == "check":
            outcome = on_token_check(state, token_expired=bool(arg))
            state = outcome.state if outcome.ok and outcome.state else state
        else:
            assert isinstance(arg, Action)
            try:
                new = on_action(state, arg, paused_from=paused_from)
            except IllegalTransition:
                new = state
            if new is S.PAUSED and state is not S.PAUSED:
                paused_from = state
            state = new
        if before.is_terminal:
            assert state is before
        assert state.is_open != state.is_terminal


def test_every_status_code_has_its_meaning() -> None:
    assert {code: code.text for code in StatusCode} == STATUS_TEXT
    assert StatusCode.UPGRADE_MD5_MISMATCH.text == "upgrade failed: MD5 check failed"
    assert StatusCode.UPGRADE_MD5_MISMATCH.label == "205 md5 mismatch"
    assert describe_status(205) == "205 md5 mismatch (upgrade failed: MD5 check failed)"
    assert describe_status(102) == "102 download no space (download failed: not enough space)"
    assert status_name(101) == "package downloaded"
    # Progress values and unknown numbers are shown bare.
    assert (describe_status(50), describe_status(209), status_name(0)) == ("50", "209", None)


# §5.3 T2-T8 transcribed independently: (action, state, paused_from) -> new state. Everything not
# listed is illegal.
OPEN = [S.TO_BE_UPGRADED, S.DOWNLOADING, S.UPGRADING, S.PAUSED]
SPEC_5_3: dict[tuple[Action, TaskState, TaskState | None], TaskState] = {
    (Action.PAUSE, S.TO_BE_UPGRADED, None): S.PAUSED,  # T2
    (Action.PAUSE, S.DOWNLOADING, None): S.PAUSED,
    (Action.RESUME, S.PAUSED, S.TO_BE_UPGRADED): S.TO_BE_UPGRADED,  # T3
    (Action.RESUME, S.PAUSED, S.DOWNLOADING): S.DOWNLOADING,
    **{(Action.CANCEL, s, None): S.CANCELLED for s in OPEN},  # T4
    **{(Action.DEADLINE, s, None): S.FAILED for s in OPEN},  # T5
    **{(Action.VERSION_REACHED, s, None): S.SUCCEEDED for s in OPEN},  # T6
    (Action.PREFLIGHT_FAILED, S.TO_BE_UPGRADED, None): S.FAILED,  # T7, T8
}
PAUSED_FROM = [None, *TaskState]


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("state", list(TaskState))
@pytest.mark.parametrize("paused_from", PAUSED_FROM)
def test_action_lookup_matches_spec_5_3_and_on_action_wraps_it(
    action: Action, state: TaskState, paused_from: TaskState | None
) -> None:
    key = (action, state, paused_from if action is Action.RESUME else None)
    expected = SPEC_5_3.get(key)
    assert action_target(state, action, paused_from=paused_from) is expected
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"can't {action.name.lower()}"):
            on_action(state, action, paused_from=paused_from)
    else:
        assert on_action(state, action, paused_from=paused_from) is expected


@pytest.mark.parametrize("action", list(Action))
def test_action_sources_are_the_states_the_table_lets_go(action: Action) -> None:
    expected = {state for (a, state, _), _target in SPEC_5_3.items() if a is action}
    assert action_sources(action) == expected
    if action is not Action.RESUME:
        assert set(ACTION_TABLE[action]) == expected


def test_token_check_table_is_complete() -> None:
    assert set(TOKEN_CHECK_TABLE) == {(s, e) for s in TaskState for e in (False, True)}


@pytest.mark.parametrize("state", list(TaskState))
def test_status_query_moves_only_to_be_upgraded(state: TaskState) -> None:
    # F7: always answered, terminal states included; to-be-upgraded -> downloading.
    expected = S.DOWNLOADING if state is S.TO_BE_UPGRADED else state
    assert on_status_query(state) is expected


@pytest.mark.parametrize("state", list(TaskState))
def test_download_table(state: TaskState) -> None:
    # D6: classic serves states 1-3 and changes nothing; S7/F8 move 1 -> 2.
    downloadable = state in (S.TO_BE_UPGRADED, S.DOWNLOADING, S.UPGRADING)
    assert (state in DOWNLOAD_TABLE) is downloadable
    if not downloadable:
        assert on_download(state, moves=True) is None
        assert on_download(state, moves=False) is None
        return
    assert on_download(state, moves=False) is state
    moved = S.DOWNLOADING if state is S.TO_BE_UPGRADED else state
    assert on_download(state, moves=True) is moved


@pytest.mark.parametrize("state", [s for s in TaskState if s is not S.PAUSED])
def test_wire_status_is_the_state_code(state: TaskState) -> None:
    assert wire_status(state) == int(state)
    assert 1 <= wire_status(state) <= 6  # §5.1


@pytest.mark.parametrize("paused_from", [S.TO_BE_UPGRADED, S.DOWNLOADING])
def test_a_paused_task_shows_where_it_was_paused(paused_from: TaskState) -> None:
    assert wire_status(S.PAUSED, paused_from) == int(paused_from)  # F7


@pytest.mark.parametrize("paused_from", [None, S.UPGRADING, S.PAUSED, S.SUCCEEDED])
def test_a_paused_task_without_a_valid_origin_has_no_status(
    paused_from: TaskState | None,
) -> None:
    with pytest.raises(ValueError, match="paused from"):
        wire_status(S.PAUSED, paused_from)

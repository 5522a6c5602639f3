"""The task state machine (spec §5), as data. Client and server both read these tables.

Theory of operation. A task is one device's upgrade to one package. It is created
to-be-upgraded (T1), moves forward on device requests (E5 token checks, E7/E8 reports, E1 version
reports) and on management actions (pause, resume, cancel, deadline), and ends in one of three
terminal states. Every device request that is refused answers an errno and changes nothing.

The tables below are the whole machine; the server applies them inside one transaction per request
and the errno it answers comes from the same table (spec §5.3-§5.5, D12, D14, D15).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.status import ReportKind


class TaskState(IntEnum):
    """Task states. 1-6 are OneNET's codes (§5.1); PAUSED is this project's (D12)."""

    TO_BE_UPGRADED = 1
    DOWNLOADING = 2
    UPGRADING = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6
    PAUSED = 7

    @property
    def is_active(self) -> bool:
        """States 1-3: visible to E3 (§5.1)."""
        return self in ACTIVE_STATES

    @property
    def is_open(self) -> bool:
        """Active or paused (§5.1)."""
        return self in OPEN_STATES

    @property
    def is_terminal(self) -> bool:
        """Succeeded, failed or cancelled."""
        return self in TERMINAL_STATES


S = TaskState
ACTIVE_STATES = frozenset({S.TO_BE_UPGRADED, S.DOWNLOADING, S.UPGRADING})
OPEN_STATES = ACTIVE_STATES | {S.PAUSED}
TERMINAL_STATES = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# E4 reports only tasks that already started downloading (D18).
RUNNING_STATES = frozenset({S.DOWNLOADING, S.UPGRADING})
# E6 serves bytes only for these (D6).
DOWNLOADABLE_STATES = ACTIVE_STATES


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to a device request: errno 0 with a new state, or a refusal errno."""

    errno: Errno
    state: TaskState | None = None

    @property
    def ok(self) -> bool:
        """Whether the request is accepted."""
        return self.errno is Errno.SUCC


def _go(state: TaskState) -> Outcome:
    return Outcome(Errno.SUCC, state)


def _no(errno: Errno) -> Outcome:
    return Outcome(errno)


R = ReportKind
E = Errno
# Spec §5.5: rows are the task state, columns the reported value's kind. The code's validity is
# checked before this table is consulted (invalid code -> errno 2 in every state).
REPORT_TABLE: dict[TaskState, dict[ReportKind, Outcome]] = {
    S.TO_BE_UPGRADED: {
        R.PROGRESS: _no(E.INVALID_STATE),
        R.COMPLETE: _no(E.INVALID_STATE),
        R.DOWNLOADED: _go(S.UPGRADING),  # T13
        R.DOWNLOAD_FAILED: _go(S.FAILED),  # T14
        R.UPGRADED: _no(E.INVALID_OPERATION),
        R.UPGRADE_FAILED: _no(E.INVALID_OPERATION),
    },
    S.DOWNLOADING: {
        R.PROGRESS: _go(S.DOWNLOADING),  # T11
        R.COMPLETE: _go(S.UPGRADING),  # T12
        R.DOWNLOADED: _go(S.UPGRADING),  # T13
        R.DOWNLOAD_FAILED: _go(S.FAILED),  # T14
        R.UPGRADED: _go(S.SUCCEEDED),  # T15: OneNET's progress page allows 201 from downloading
        R.UPGRADE_FAILED: _go(S.FAILED),  # T16
    },
    S.UPGRADING: {
        R.PROGRESS: _no(E.INVALID_STATE),
        R.COMPLETE: _no(E.INVALID_STATE),
        R.DOWNLOADED: _no(E.INVALID_OPERATION),
        R.DOWNLOAD_FAILED: _no(E.INVALID_OPERATION),
        R.UPGRADED: _go(S.SUCCEEDED),  # T15
        R.UPGRADE_FAILED: _go(S.FAILED),  # T16
    },
    S.PAUSED: {  # D12
        R.PROGRESS: _no(E.INVALID_STATE),
        R.COMPLETE: _no(E.INVALID_STATE),
        R.DOWNLOADED: _no(E.INVALID_OPERATION),
        R.DOWNLOAD_FAILED: _no(E.INVALID_OPERATION),
        R.UPGRADED: _no(E.INVALID_OPERATION),
        R.UPGRADE_FAILED: _no(E.INVALID_OPERATION),
    },
    S.SUCCEEDED: dict.fromkeys(ReportKind, _no(E.TASK_FINISHED)),
    S.FAILED: dict.fromkeys(ReportKind, _no(E.TASK_FINISHED)),
    S.CANCELLED: dict.fromkeys(ReportKind, _no(E.TASK_CANCELLED)),
}


def on_report(state: TaskState, kind: ReportKind) -> Outcome:
    """E7/E8: the outcome of a report of ``kind`` on a task in ``state`` (§5.5, D14, D15)."""
    return REPORT_TABLE[state][kind]


def on_token_check(state: TaskState, *, token_expired: bool) -> Outcome:
    """E5 on a resolved token, with §5.4's precedence (cancelled, finished, expired, state)."""
    if state is S.CANCELLED:
        return _no(E.TASK_CANCELLED)
    if state in (S.SUCCEEDED, S.FAILED):
        return _no(E.TASK_FINISHED)
    if token_expired:
        return _no(E.TOKEN_EXPIRED)
    if state in (S.TO_BE_UPGRADED, S.DOWNLOADING):
        return _go(S.DOWNLOADING)  # T9, T10
    return _no(E.INVALID_STATE)  # paused or upgrading


class Action(IntEnum):
    """Management-side triggers (§5.3, marked M), E1's completion (T6) and E3's pre-flight
    failures (T7, T8)."""

    PAUSE = 1
    RESUME = 2
    CANCEL = 3
    DEADLINE = 4
    VERSION_REACHED = 5
    PREFLIGHT_FAILED = 6  # E3 errno 8 (manuf/model) or 9 (from-version), D11


class IllegalTransition(ValueError):
    """An action that the state machine does not allow in the task's state."""

    def __init__(self, action: Action, state: TaskState) -> None:
        super().__init__(f"can't {action.name.lower()} a task in state {state.name.lower()}")
        self.action = action
        self.state = state


def on_action(
    state: TaskState, action: Action, *, paused_from: TaskState | None = None
) -> TaskState:
    """The state after a management action or T6; raises :class:`IllegalTransition`."""
    if action is Action.PAUSE and state in (S.TO_BE_UPGRADED, S.DOWNLOADING):  # T2
        return S.PAUSED
    if action is Action.RESUME and state is S.PAUSED:  # T3
        if paused_from not in (S.TO_BE_UPGRADED, S.DOWNLOADING):
            raise IllegalTransition(action, state)
        return paused_from
    if action is Action.CANCEL and state in OPEN_STATES:  # T4
        return S.CANCELLED
    if action is Action.DEADLINE and state in OPEN_STATES:  # T5
        return S.FAILED
    if action is Action.VERSION_REACHED and state in OPEN_STATES:  # T6, D16
        return S.SUCCEEDED
    if action is Action.PREFLIGHT_FAILED and state is S.TO_BE_UPGRADED:  # T7, T8 (D11)
        return S.FAILED
    raise IllegalTransition(action, state)

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


# Spec §5.4 as a table keyed by (state, token expired), its precedence written out: cancelled
# (22), then finished (20), then expired (12), then the state. Studio's S-T uses the rows with
# ``expired=False`` (S6: a tid does not expire).
TOKEN_CHECK_TABLE: dict[tuple[TaskState, bool], Outcome] = {
    (S.CANCELLED, False): _no(E.TASK_CANCELLED),
    (S.CANCELLED, True): _no(E.TASK_CANCELLED),
    (S.SUCCEEDED, False): _no(E.TASK_FINISHED),
    (S.SUCCEEDED, True): _no(E.TASK_FINISHED),
    (S.FAILED, False): _no(E.TASK_FINISHED),
    (S.FAILED, True): _no(E.TASK_FINISHED),
    (S.TO_BE_UPGRADED, True): _no(E.TOKEN_EXPIRED),
    (S.DOWNLOADING, True): _no(E.TOKEN_EXPIRED),
    (S.UPGRADING, True): _no(E.TOKEN_EXPIRED),
    (S.PAUSED, True): _no(E.TOKEN_EXPIRED),
    (S.TO_BE_UPGRADED, False): _go(S.DOWNLOADING),  # T9
    (S.DOWNLOADING, False): _go(S.DOWNLOADING),  # T10
    (S.UPGRADING, False): _no(E.INVALID_STATE),
    (S.PAUSED, False): _no(E.INVALID_STATE),  # D12
}


def on_token_check(state: TaskState, *, token_expired: bool) -> Outcome:
    """E5 on a resolved token, with §5.4's precedence (cancelled, finished, expired, state)."""
    return TOKEN_CHECK_TABLE[(state, token_expired)]


# F7: fuse's F-T answers every task of the device with its status (terminal ones included) and
# moves a to-be-upgraded task to downloading, like a token check; it refuses nothing by state.
STATUS_QUERY_TABLE: dict[TaskState, TaskState] = {state: state for state in TaskState} | {
    S.TO_BE_UPGRADED: S.DOWNLOADING
}


def on_status_query(state: TaskState) -> TaskState:
    """F-T (F7): the state after a status query; the reply shows it (a paused task shows
    ``paused_from``)."""
    return STATUS_QUERY_TABLE[state]


def wire_status(state: TaskState, paused_from: TaskState | None = None) -> int:
    """The ``status`` code (1-6, §5.1) that Studio and fuse show for a task.

    PAUSED is this project's state (D12) and never reaches the wire: a paused task shows the
    state it was paused from (F7). Raises ``ValueError`` for a paused task without one.
    """
    if state is not S.PAUSED:
        return int(state)
    if paused_from is None or paused_from not in RESUME_TABLE:
        raise ValueError("a paused task shows the state it was paused from, and has none")
    return int(paused_from)


# Downloads: which states serve bytes (D6, S7, F8) and the state after a successful download.
# Classic E6 changes no state (D6); Studio and fuse move to-be-upgraded to downloading (S7, F8)
# so that devices that never check the task still progress.
DOWNLOAD_TABLE: dict[TaskState, TaskState] = {
    S.TO_BE_UPGRADED: S.DOWNLOADING,
    S.DOWNLOADING: S.DOWNLOADING,
    S.UPGRADING: S.UPGRADING,
}


def on_download(state: TaskState, *, moves: bool) -> TaskState | None:
    """The state after a successful download of a task in ``state``, or None when the task is
    not downloadable (classic byte 3, Ota-Errno 5). ``moves`` is False for classic (D6)."""
    if state not in DOWNLOAD_TABLE:
        return None
    return DOWNLOAD_TABLE[state] if moves else state


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


# §5.3's management rows, T6 and T7/T8 as a table: action -> {state it may leave: new state}.
# RESUME is the one action whose target is not fixed: T3 returns to ``paused_from``, so its
# row lives in RESUME_TABLE, keyed by ``paused_from``.
ACTION_TABLE: dict[Action, dict[TaskState, TaskState]] = {
    Action.PAUSE: {S.TO_BE_UPGRADED: S.PAUSED, S.DOWNLOADING: S.PAUSED},  # T2
    Action.RESUME: {},  # T3: see RESUME_TABLE
    Action.CANCEL: dict.fromkeys(OPEN_STATES, S.CANCELLED),  # T4
    Action.DEADLINE: dict.fromkeys(OPEN_STATES, S.FAILED),  # T5
    Action.VERSION_REACHED: dict.fromkeys(OPEN_STATES, S.SUCCEEDED),  # T6, D16
    Action.PREFLIGHT_FAILED: {S.TO_BE_UPGRADED: S.FAILED},  # T7, T8 (D11)
}
# T3: a paused task resumes to the state it was paused from; only T2's sources can be that.
RESUME_TABLE: dict[TaskState, TaskState] = {
    S.TO_BE_UPGRADED: S.TO_BE_UPGRADED,
    S.DOWNLOADING: S.DOWNLOADING,
}


def action_sources(action: Action) -> frozenset[TaskState]:
    """The states a task may be in for ``action`` to apply (RESUME: paused only)."""
    if action is Action.RESUME:
        return frozenset({S.PAUSED})
    return frozenset(ACTION_TABLE[action])


def action_target(
    state: TaskState, action: Action, *, paused_from: TaskState | None = None
) -> TaskState | None:
    """The state after ``action`` on a task in ``state``, or None when the table forbids it.

    RESUME needs ``paused_from`` (T3); a paused task without a valid one cannot resume.
    """
    if action is Action.RESUME:
        if state is not S.PAUSED or paused_from is None:
            return None
        return RESUME_TABLE.get(paused_from)
    return ACTION_TABLE[action].get(state)


def on_action(
    state: TaskState, action: Action, *, paused_from: TaskState | None = None
) -> TaskState:
    """The state after a management action or T6; raises :class:`IllegalTransition`.

    A thin wrapper over :func:`action_target` for callers that want an exception.
    """
    target = action_target(state, action, paused_from=paused_from)
    if target is None:
        raise IllegalTransition(action, state)
    return target

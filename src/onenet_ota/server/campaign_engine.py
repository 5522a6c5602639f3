"""The campaign engine: staged rollouts decided from numbers alone, with no I/O.

A **campaign** rolls one package out in ordered **stages**. This module holds everything about it
that needs no database: the stage specification and its validation, stable membership, the
classification of failure codes, and :func:`decide`, which turns one stage's counts into the
automatic decision (advance, finish, pause, abort or nothing) together with the numbers behind it.
:mod:`onenet_ota.server.campaigns` reads the counts from SQL and applies what this module decides.

Membership. Every device that the selector matches gets a stable position: the SHA-256 of the
campaign's salt and its dev_id (:func:`member_hash`). Devices are taken in that order, so stage
*k* covers the first *C_k* devices, where *C_k* is the stage's **cumulative** share of the
population (:func:`cumulative_targets`): "10 %" means one device in ten has the package once the
stage is active. The order never changes, so raising a share only adds devices.

Counting. A device's outcome is its device task's state and its last status code (§6.7.1).
:func:`classify` puts every failure code into a :class:`FailureClass`:

- ``deferral``: the device could not run it *now* (battery 105/202, signal 106): nothing about the
  package;
- ``environment``: the device's surroundings failed (space 102, memory 103/203, network 104/107,
  expiry 208, a deadline without a code): nothing about the package either;
- ``package``: the package is suspect (204 wrong embedded version, 205 MD5 mismatch after a
  verified download, 206 install failed, 207 the install kept failing until the retry limit).

Only ``package`` failures count toward a stage's failure ceiling, and only succeeded devices and
package failures count as **executed** (the devices that tell something about the package). The
classes are configurable per campaign (``failure_classes``).

Decisions (:func:`decide`), in this order, so that an automatic pause always beats an automatic
advance and a stage never passes with its ceiling breached:

1. **failure ceiling**: ``failed >= max_failed``, or, once ``min_executed`` devices executed,
   ``failed / executed >= max_failed_percent``: pause (or abort, per ``on_failure``);
2. **success gate**: after ``soak_s`` seconds and ``min_executed`` executed devices,
   ``succeeded / targeted >= success_percent``: advance (finish after the last stage), or pause
   for a person when ``on_success`` is ``pause``;
3. **settled**: every device of the stage has finished and the gate is not met (nor can it be):
   pause for a person;
4. otherwise nothing.

Dispatch rate. A campaign may give a :class:`DispatchRate`: a stage's members are then chosen
at its activation as above (membership does not depend on the rate) but get their device tasks
in batches, no faster than the rate allows (:func:`dispatch_quota`; the model is in
:class:`DispatchRate`'s doc). Members waiting for the rate are **pending**: they count toward
nothing, the success gate and the "settled" rule wait until the stage has none, and the ceiling
counts the dispatched devices only, so a bad package still stops the stage early.

Dynamic membership. A dynamic campaign's population is read again while it runs: a device that
comes to match the selector (created, or its version or labels changed) takes its place in the
stable order, and the stages up to the current one are topped up to their cumulative share of
the grown population, lowest positions first, through the rate like any member. A device whose
position falls in a later stage waits for that stage's activation. Activated members never
leave, so the number activated is always the current stage's share of the population.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from onenet_ota.management.models import (
    MAX_STAGES,
    DispatchRate,
    FailureClass,
    StageSpec,
)
from onenet_ota.protocol.states import TaskState

__all__ = [
    "ACTIONS",
    "DEFAULT_FAILURE_CLASSES",
    "TERMINAL_CAMPAIGN_STATES",
    "CampaignState",
    "Decision",
    "DecisionKind",
    "DispatchRate",
    "FailureClass",
    "OperatorAction",
    "StageCounts",
    "StageSpec",
    "action_refusal",
    "ceiling_breach",
    "classify",
    "cumulative_targets",
    "decide",
    "dispatch_integral",
    "dispatch_quota",
    "gate_met",
    "member_hash",
    "next_dispatch_in",
    "order_members",
    "stage_problems",
    "tally",
]


DEFAULT_FAILURE_CLASSES: Final[Mapping[int, FailureClass]] = {
    102: FailureClass.ENVIRONMENT,  # download: not enough space
    103: FailureClass.ENVIRONMENT,  # download: out of memory
    104: FailureClass.ENVIRONMENT,  # download: request timed out (the network)
    105: FailureClass.DEFERRAL,  # download: battery too low
    106: FailureClass.DEFERRAL,  # download: signal too weak
    107: FailureClass.ENVIRONMENT,  # download: other error (the download, not the package)
    202: FailureClass.DEFERRAL,  # upgrade: battery too low
    203: FailureClass.ENVIRONMENT,  # upgrade: out of memory
    204: FailureClass.PACKAGE,  # upgrade: the package's version is not the target
    205: FailureClass.PACKAGE,  # upgrade: MD5 mismatch of a package that was verified
    206: FailureClass.PACKAGE,  # upgrade: other error while installing
    207: FailureClass.PACKAGE,  # upgrade: the install kept failing up to the retry limit
    208: FailureClass.ENVIRONMENT,  # upgrade: expired (time ran out, not the package)
}


def classify(code: int | None, overrides: Mapping[int, FailureClass] | None = None) -> FailureClass:
    """The class of a failed device task's last status ``code`` (None: failed without one)."""
    if overrides is not None and code is not None and code in overrides:
        return overrides[code]
    if code is None:
        return FailureClass.ENVIRONMENT
    return DEFAULT_FAILURE_CLASSES.get(code, FailureClass.PACKAGE)


# --------------------------------------------------------------------------------------------
# Stage specification


def cumulative_targets(stages: Sequence[StageSpec], population: int) -> list[int]:
    """How many devices each stage covers, cumulatively, out of ``population``: a percent rounds
    up (a stage of a non-empty population is never empty), a count is capped at the population,
    ``rest`` is all of it. Non-decreasing by construction."""
    targets: list[int] = []
    for stage in stages:
        if stage.rest:
            wanted = population
        elif stage.count is not None:
            wanted = min(stage.count, population)
        else:
            assert stage.percent is not None
            wanted = min(population, math.ceil(population * stage.percent / 100 - 1e-9))
        targets.append(max(wanted, targets[-1] if targets else 0))
    return targets


def stage_problems(stages: Sequence[StageSpec], population: int) -> list[str]:
    """Why ``stages`` cannot be satisfied over ``population`` matching devices (empty: they can).

    Refused: no stage, too many, ``rest`` before the last stage, shares that do not grow or go
    over 100 %, a stage left empty, a count ceiling larger than its stage (it can never trip), a
    minimum of executed devices larger than its stage (its gate can never pass), and a selector
    that matches nothing.
    """
    problems: list[str] = []
    if not stages:
        return ["a campaign needs at least one stage"]
    if len(stages) > MAX_STAGES:
        return [f"a campaign has at most {MAX_STAGES} stages"]
    if population == 0:
        return ["the selector matches no device"]
    previous_percent = 0.0
    previous_count = 0
    for index, stage in enumerate(stages):
        label = stage.label(index)
        if stage.rest and index != len(stages) - 1:
            problems.append(f"{label}: only the last stage may take the rest")
        if stage.percent is not None:
            if stage.percent <= previous_percent:
                problems.append(
                    f"{label}: {stage.percent:g} % does not grow on the previous stage's "
                    f"{previous_percent:g} % (shares are cumulative)"
                )
            previous_percent = stage.percent
        if stage.count is not None:
            if stage.count <= previous_count:
                problems.append(
                    f"{label}: {stage.count} devices does not grow on the previous stage's "
                    f"{previous_count} (shares are cumulative)"
                )
            previous_count = stage.count
    if problems:
        return problems
    targets = cumulative_targets(stages, population)
    before = 0
    for index, (stage, upto) in enumerate(zip(stages, targets, strict=True)):
        label = stage.label(index)
        size = upto - before
        if size == 0:
            problems.append(
                f"{label}: no device left for it ({upto} of {population} matching devices are "
                "covered by the stages up to it)"
            )
        else:
            if stage.max_failed is not None and stage.max_failed > size:
                problems.append(
                    f"{label}: a ceiling of {stage.max_failed} failures can never trip in a stage "
                    f"of {size} devices"
                )
            if stage.min_executed > size:
                problems.append(
                    f"{label}: min_executed {stage.min_executed} is more than the stage's "
                    f"{size} devices, so its gate can never pass"
                )
        before = upto
    return problems


def member_hash(salt: str, dev_id: int) -> bytes:
    """The device's stable position in the campaign's order (module doc)."""
    return hashlib.sha256(f"{salt}:{dev_id}".encode()).digest()[:16]


def order_members(salt: str, dev_ids: Iterable[int]) -> list[int]:
    """``dev_ids`` in the campaign's stable order."""
    return sorted(dev_ids, key=lambda dev_id: member_hash(salt, dev_id))


# --------------------------------------------------------------------------------------------
# Dispatch rate

RATE_CEILING_PER_MINUTE: Final = 1_000_000.0
"""A growing rate without ``max_per_minute`` stops growing here (the most a rate may be given)."""


def dispatch_integral(rate: DispatchRate, elapsed: float) -> float:
    """``A(t)``: the devices the rate allows over ``elapsed`` seconds after it started, as a
    real number (the integral of a rate that is constant within each period and multiplied by
    ``growth`` at each period's end, up to its cap). Closed form, so any ``elapsed`` costs the
    same."""
    t = max(0.0, elapsed)
    r0 = rate.per_minute / 60
    cap = (rate.max_per_minute or RATE_CEILING_PER_MINUTE) / 60
    g = rate.growth
    if g == 1 or r0 >= cap:  # constant (the validation keeps r0 <= cap)
        return r0 * t
    period = float(rate.period_s)
    # m: the first period whose rate reaches the cap (r0 g^m >= cap); periods before it grow.
    m = max(0, math.ceil(math.log(cap / r0) / math.log(g) - 1e-12))
    n = int(t // period)
    full = min(n, m)
    grown = r0 * period * (g**full - 1) / (g - 1)
    if n < m:
        return grown + r0 * g**n * (t - n * period)
    return grown + cap * (t - m * period)


def dispatch_quota(rate: DispatchRate | None, elapsed: float, dispatched: int) -> int | None:
    """How many more devices may be dispatched now, ``elapsed`` seconds after the rate started,
    ``dispatched`` devices having been dispatched since: ``1 + floor(A(elapsed)) - dispatched``
    (never negative). None: no rate, no limit."""
    if rate is None:
        return None
    allowed = 1 + math.floor(dispatch_integral(rate, elapsed) + 1e-9)
    return max(0, allowed - dispatched)


def next_dispatch_in(rate: DispatchRate, elapsed: float, dispatched: int) -> float:
    """Seconds from ``elapsed`` until the quota allows one more device than ``dispatched``
    (0: it does now): the smallest ``t`` with ``A(t) >= dispatched``, found by bisection (``A``
    grows at least at the starting rate, which bounds the search)."""
    if dispatch_quota(rate, elapsed, dispatched):
        return 0.0
    low, high = max(0.0, elapsed), dispatched / (rate.per_minute / 60) + 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if dispatch_integral(rate, middle) + 1e-9 >= dispatched:
            high = middle
        else:
            low = middle
        if high - low < 1e-4:
            break
    return max(0.0, high - max(0.0, elapsed))


# --------------------------------------------------------------------------------------------
# Counts and decisions


@dataclass(frozen=True, slots=True)
class StageCounts:
    """One stage's devices by outcome. ``targeted``: devices given a device task in it;
    ``pending``: members still waiting for the dispatch rate (not among ``targeted``)."""

    targeted: int = 0
    succeeded: int = 0
    failed_package: int = 0
    failed_environment: int = 0
    deferred: int = 0
    cancelled: int = 0
    open: int = 0
    pending: int = 0

    @property
    def executed(self) -> int:
        """Devices whose outcome says something about the package."""
        return self.succeeded + self.failed_package

    @property
    def settled(self) -> bool:
        """Whether every device of the stage was dispatched and has finished."""
        return self.open == 0 and self.pending == 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name (for events and the API)."""
        return {
            "targeted": self.targeted,
            "succeeded": self.succeeded,
            "failed_package": self.failed_package,
            "failed_environment": self.failed_environment,
            "deferred": self.deferred,
            "cancelled": self.cancelled,
            "open": self.open,
            "pending": self.pending,
            "executed": self.executed,
        }


def tally(
    rows: Iterable[tuple[int, int | None, int]],
    overrides: Mapping[int, FailureClass] | None = None,
) -> StageCounts:
    """Counts from ``(device task state, result code, how many)`` rows."""
    n: dict[str, int] = dict.fromkeys(
        ("succeeded", "failed_package", "failed_environment", "deferred", "cancelled", "open"), 0
    )
    targeted = 0
    for state_code, code, count in rows:
        targeted += count
        state = TaskState(state_code)
        if state is TaskState.SUCCEEDED:
            n["succeeded"] += count
        elif state is TaskState.CANCELLED:
            n["cancelled"] += count
        elif state is TaskState.FAILED:
            kind = classify(code, overrides)
            key = {
                FailureClass.PACKAGE: "failed_package",
                FailureClass.ENVIRONMENT: "failed_environment",
                FailureClass.DEFERRAL: "deferred",
            }[kind]
            n[key] += count
        else:
            n["open"] += count
    return StageCounts(targeted=targeted, **n)


class DecisionKind(StrEnum):
    """What the engine decided for a running campaign's current stage."""

    NONE = "none"
    ADVANCE = "advance"
    FINISH = "finish"
    PAUSE = "pause"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision, the rule that made it (``rule``: ceiling, gate, settled or none), a sentence
    for people and the numbers behind it."""

    kind: DecisionKind
    rule: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


def ceiling_breach(stage: StageSpec, counts: StageCounts) -> str | None:
    """The sentence saying how ``counts`` breach the stage's failure ceiling, or None."""
    failed, executed = counts.failed_package, counts.executed
    if stage.max_failed is not None and failed >= stage.max_failed:
        return f"{failed} package failures >= ceiling {stage.max_failed}"
    limit = stage.max_failed_percent
    enough = executed >= max(stage.min_executed, 1)
    if limit is not None and enough and failed * 100 >= limit * executed:
        share = _pct(failed, executed)
        return f"{failed}/{executed} = {share} >= {limit:g} % after {executed} executed"
    return None


def gate_met(stage: StageSpec, counts: StageCounts, *, soaked: bool) -> bool:
    """Whether the success gate passes: every member dispatched, soaked, enough executed, enough
    succeeded."""
    if not soaked or counts.pending or counts.executed < stage.min_executed:
        return False
    return counts.succeeded * 100 >= stage.success_percent * counts.targeted


def decide(
    stage: StageSpec,
    counts: StageCounts,
    *,
    index: int,
    last: bool,
    soaked: bool,
) -> Decision:
    """The automatic decision for the running stage ``index`` (module doc: ceiling, then gate,
    then settled). ``soaked``: the stage's soak time has passed since it was activated."""
    numbers: dict[str, Any] = {"stage": index, **counts.as_dict()}
    label = stage.label(index)
    breach = ceiling_breach(stage, counts)
    if breach is not None:
        kind = DecisionKind.ABORT if stage.on_failure == "abort" else DecisionKind.PAUSE
        verb = "aborted" if kind is DecisionKind.ABORT else "paused"
        return Decision(kind, "ceiling", f"{verb} in {label}: {breach}", numbers)
    succeeded, targeted = counts.succeeded, counts.targeted
    ratio = f"{succeeded}/{targeted} = {_pct(succeeded, targeted)}"
    if gate_met(stage, counts, soaked=soaked):
        gate = f"{ratio} succeeded >= {stage.success_percent:g} %"
        if stage.on_success == "pause":
            return Decision(
                DecisionKind.PAUSE, "gate", f"paused for review after {label}: {gate}", numbers
            )
        if last:
            return Decision(DecisionKind.FINISH, "gate", f"finished with {label}: {gate}", numbers)
        return Decision(DecisionKind.ADVANCE, "gate", f"advanced past {label}: {gate}", numbers)
    if counts.settled and soaked:
        why = (
            f"{counts.executed} executed < minimum {stage.min_executed}"
            if counts.executed < stage.min_executed
            else f"{ratio} succeeded < {stage.success_percent:g} %"
        )
        return Decision(
            DecisionKind.PAUSE,
            "settled",
            f"paused in {label}: every device finished and the gate is not met ({why})",
            numbers,
        )
    return Decision(DecisionKind.NONE, "none", "", numbers)


# --------------------------------------------------------------------------------------------
# Campaign states and operator actions

CampaignState = Literal["draft", "running", "paused", "finished", "aborted"]
OperatorAction = Literal[
    "start", "pause", "resume", "advance", "abort", "retry_failed", "add_devices"
]

# draft -> running <-> paused -> finished | aborted. Each operator action: the states it may be
# taken from, and the state it leads to (None: it stays; ``advance`` past the last stage leads to
# finished instead).
ACTIONS: Final[Mapping[str, tuple[frozenset[str], str | None]]] = {
    "start": (frozenset({"draft"}), "running"),
    "pause": (frozenset({"running"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "advance": (frozenset({"running", "paused"}), "running"),
    "abort": (frozenset({"draft", "running", "paused"}), "aborted"),
    "retry_failed": (frozenset({"running", "paused"}), None),
    "add_devices": (frozenset({"draft", "running", "paused"}), None),
}
TERMINAL_CAMPAIGN_STATES: Final = frozenset({"finished", "aborted"})


def action_refusal(action: str, state: str) -> str | None:
    """Why ``action`` cannot be taken on a campaign in ``state``, or None when it can."""
    sources, _ = ACTIONS[action]
    if state in sources:
        return None
    allowed = ", ".join(sorted(sources))
    return f"can't {action.replace('_', ' ')} a campaign that is {state} (only when {allowed})"

"""The campaign engine (server/campaign_engine.py): a table of every gate and ceiling, stage
validation, membership, and a property test over random sequences of reports and actions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from onenet_ota.management.models import DispatchRate
from onenet_ota.protocol.states import TaskState
from onenet_ota.server.campaign_engine import (
    ACTIONS,
    DecisionKind,
    FailureClass,
    StageCounts,
    StageSpec,
    action_refusal,
    classify,
    cumulative_targets,
    decide,
    dispatch_integral,
    dispatch_quota,
    next_dispatch_in,
    order_members,
    stage_problems,
    tally,
)

S = StageSpec


def counts(
    targeted: int, succeeded: int = 0, failed: int = 0, env: int = 0, deferred: int = 0
) -> StageCounts:
    done = succeeded + failed + env + deferred
    return StageCounts(
        targeted=targeted,
        succeeded=succeeded,
        failed_package=failed,
        failed_environment=env,
        deferred=deferred,
        open=targeted - done,
    )


# (case, stage, counts, last, soaked, expected decision, expected rule)
TABLE = [
    # ceilings
    ("count ceiling trips", S(count=10, max_failed=3), counts(10, 2, 3), False, True,
     DecisionKind.PAUSE, "ceiling"),
    ("count ceiling one below", S(count=10, max_failed=3, success_percent=50), counts(10, 1, 2),
     False, True, DecisionKind.NONE, "none"),
    ("count ceiling ignores min_executed", S(count=10, max_failed=2, min_executed=9),
     counts(10, 0, 2), False, True, DecisionKind.PAUSE, "ceiling"),
    ("ratio ceiling trips at equality", S(count=40, max_failed_percent=10), counts(40, 18, 2),
     False, True, DecisionKind.PAUSE, "ceiling"),
    ("ratio ceiling below", S(count=40, max_failed_percent=10), counts(40, 19, 2), False, True,
     DecisionKind.NONE, "none"),
    ("ratio waits for min_executed", S(count=40, max_failed_percent=10, min_executed=20),
     counts(40, 5, 5), False, True, DecisionKind.NONE, "none"),
    ("ratio after min_executed", S(count=40, max_failed_percent=10, min_executed=20),
     counts(40, 15, 5), False, True, DecisionKind.PAUSE, "ceiling"),
    ("ratio ignores environment and deferrals", S(count=40, max_failed_percent=10),
     counts(40, 10, 0, env=10, deferred=10), False, True, DecisionKind.NONE, "none"),
    ("ceiling aborts when told", S(count=10, max_failed=1, on_failure="abort"), counts(10, 0, 1),
     False, True, DecisionKind.ABORT, "ceiling"),
    ("ceiling beats the gate", S(count=10, max_failed=1, success_percent=50), counts(10, 9, 1),
     False, True, DecisionKind.PAUSE, "ceiling"),
    ("ceiling beats finishing", S(rest=True, max_failed_percent=5), counts(100, 90, 10), True,
     True, DecisionKind.PAUSE, "ceiling"),
    ("ceiling does not wait for the soak", S(count=10, max_failed=1, soak_s=3600),
     counts(10, 0, 1), False, False, DecisionKind.PAUSE, "ceiling"),
    # gates
    ("gate passes at equality", S(count=10, success_percent=90), counts(10, 9, 0, env=1), False,
     True, DecisionKind.ADVANCE, "gate"),
    ("gate one short", S(count=10, success_percent=90), counts(10, 8), False, True,
     DecisionKind.NONE, "none"),
    ("gate waits for the soak", S(count=10, success_percent=50, soak_s=60), counts(10, 10), False,
     False, DecisionKind.NONE, "none"),
    ("gate waits for min_executed", S(count=10, success_percent=10, min_executed=5),
     counts(10, 4), False, True, DecisionKind.NONE, "none"),
    ("gate on the last stage finishes", S(rest=True, success_percent=80), counts(10, 8), True,
     True, DecisionKind.FINISH, "gate"),
    ("gate pauses for a person", S(count=10, success_percent=80, on_success="pause"),
     counts(10, 9), False, True, DecisionKind.PAUSE, "gate"),
    ("deferrals count against the gate", S(count=10, success_percent=90),
     counts(10, 8, deferred=2), False, True, DecisionKind.PAUSE, "settled"),
    # settled without the gate
    ("settled below the gate pauses", S(count=10, success_percent=95), counts(10, 9, env=1),
     False, True, DecisionKind.PAUSE, "settled"),
    ("settled short of min_executed", S(count=10, success_percent=10, min_executed=8),
     counts(10, 5, env=5), False, True, DecisionKind.PAUSE, "settled"),
    ("settled waits for the soak", S(count=10, success_percent=95, soak_s=60), counts(10, 9, 0, 1),
     False, False, DecisionKind.NONE, "none"),
    ("nothing yet", S(count=10), counts(10), False, True, DecisionKind.NONE, "none"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "given_counts", "last", "soaked", "kind", "rule"),
    [pytest.param(*row[1:], id=row[0]) for row in TABLE],
)
def test_decision_table(
    stage: StageSpec,
    given_counts: StageCounts,
    last: bool,
    soaked: bool,
    kind: DecisionKind,
    rule: str,
) -> None:
    decision = decide(stage, given_counts, index=0, last=last, soaked=soaked)
    assert (decision.kind, decision.rule) == (kind, rule)
    if kind is not DecisionKind.NONE:
        assert decision.reason  # a sentence for people, with the numbers
        assert decision.numbers["executed"] == given_counts.executed


def test_reason_carries_the_numbers() -> None:
    decision = decide(
        S(count=40, max_failed_percent=10, min_executed=20),
        counts(40, 33, 7),
        index=0,
        last=False,
        soaked=True,
    )
    assert decision.reason == "paused in stage 1: 7/40 = 17.5 % >= 10 % after 40 executed"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (102, FailureClass.ENVIRONMENT),
        (103, FailureClass.ENVIRONMENT),
        (105, FailureClass.DEFERRAL),
        (106, FailureClass.DEFERRAL),
        (202, FailureClass.DEFERRAL),
        (205, FailureClass.PACKAGE),
        (206, FailureClass.PACKAGE),
        (None, FailureClass.ENVIRONMENT),
        (299, FailureClass.PACKAGE),
    ],
)
def test_classify(code: int | None, expected: FailureClass) -> None:
    assert classify(code) is expected


def test_classes_are_configurable() -> None:
    assert classify(206, {206: FailureClass.ENVIRONMENT}) is FailureClass.ENVIRONMENT
    assert classify(105, {206: FailureClass.ENVIRONMENT}) is FailureClass.DEFERRAL


def test_tally() -> None:
    rows = [
        (int(TaskState.SUCCEEDED), 201, 5),
        (int(TaskState.FAILED), 205, 2),
        (int(TaskState.FAILED), 105, 1),
        (int(TaskState.FAILED), 102, 1),
        (int(TaskState.DOWNLOADING), None, 3),
        (int(TaskState.PAUSED), None, 1),
        (int(TaskState.CANCELLED), None, 1),
    ]
    assert tally(rows) == StageCounts(
        targeted=14,
        succeeded=5,
        failed_package=2,
        failed_environment=1,
        deferred=1,
        cancelled=1,
        open=4,
    )


@pytest.mark.parametrize(
    ("stages", "population", "problem"),
    [
        ([], 10, "at least one stage"),
        ([S(percent=50), S(percent=40)], 10, "does not grow"),
        ([S(count=5), S(count=5)], 10, "does not grow"),
        ([S(rest=True), S(percent=50)], 10, "only the last stage"),
        ([S(count=5, max_failed=6)], 10, "can never trip"),
        ([S(count=5, min_executed=6)], 10, "gate can never pass"),
        ([S(count=3), S(count=5), S(rest=True)], 4, "no device left"),
        ([S(rest=True)], 0, "matches no device"),
    ],
)
def test_stage_problems(stages: list[StageSpec], population: int, problem: str) -> None:
    found = stage_problems(stages, population)
    assert any(problem in p for p in found), found


def test_shares_over_100_percent_are_refused() -> None:
    with pytest.raises(ValueError, match="less than or equal to 100"):
        S(percent=120)
    with pytest.raises(ValueError, match="exactly one of percent, count and rest"):
        S(percent=10, count=3)


def test_cumulative_targets() -> None:
    stages = [S(percent=1), S(count=50), S(percent=50), S(rest=True)]
    assert cumulative_targets(stages, 1000) == [10, 50, 500, 1000]
    assert cumulative_targets([S(percent=1)], 5) == [1]  # rounds up: never an empty stage


def test_membership_is_stable_and_raising_a_share_only_adds() -> None:
    order = order_members("salt", range(1, 1001))
    assert order == order_members("salt", reversed(range(1, 1001)))
    assert order != order_members("other", range(1, 1001))
    small = set(order[: cumulative_targets([S(percent=10)], 1000)[0]])
    large = set(order[: cumulative_targets([S(percent=20)], 1000)[0]])
    assert small < large


def test_actions() -> None:
    assert action_refusal("start", "draft") is None
    assert action_refusal("resume", "running") is not None
    for action, (sources, _) in ACTIONS.items():
        for state in ("finished", "aborted"):
            assert state not in sources, action


# --------------------------------------------------------------------------------------------
# Dispatch rate

R = DispatchRate

# (case, rate, seconds since the rate started, devices it allows by then: 1 + floor(A(t)))
RATE_TABLE = [
    ("the first device goes at once", R(per_minute=6), 0, 1),
    ("constant: one every 10 s", R(per_minute=6), 9.99, 1),
    ("constant: the slot itself", R(per_minute=6), 10, 2),
    ("constant after a minute", R(per_minute=6), 60, 7),
    ("fractional rate", R(per_minute=0.5), 119, 1),
    ("fractional rate, two minutes", R(per_minute=0.5), 120, 2),
    ("fast rate", R(per_minute=6000), 1.5, 151),
    ("doubling: first period at the start rate", R(per_minute=60, growth=2), 60, 61),
    ("doubling: second period twice as fast", R(per_minute=60, growth=2), 90, 121),
    ("doubling: third period", R(per_minute=60, growth=2), 180, 421),
    ("capped: the cap from the third period on",
     R(per_minute=60, growth=2, max_per_minute=180), 240, 60 + 120 + 180 + 180 + 1),
    ("cap equal to the start rate", R(per_minute=60, growth=3, max_per_minute=60), 120, 121),
    ("longer period", R(per_minute=60, growth=2, period_s=600), 660, 600 + 120 + 1),
    ("an uncapped growth stops at the ceiling", R(per_minute=1000, growth=100, period_s=1),
     10, 1 + int(1000 / 60 + 100_000 / 60 + 8 * 1_000_000 / 60)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rate", "elapsed", "allowed"),
    [pytest.param(*case[1:], id=case[0]) for case in RATE_TABLE],
)
def test_rate_table(rate: DispatchRate, elapsed: float, allowed: int) -> None:
    assert dispatch_quota(rate, elapsed, 0) == allowed
    assert dispatch_quota(rate, elapsed, allowed) == 0
    assert dispatch_quota(rate, elapsed, allowed - 1) == 1


def test_no_rate_no_limit() -> None:
    assert dispatch_quota(None, 0, 10**6) is None


@pytest.mark.parametrize(
    ("rate", "elapsed", "dispatched", "wait"),
    [
        (R(per_minute=6), 0, 1, 10.0),
        (R(per_minute=6), 4, 1, 6.0),
        (R(per_minute=6), 4, 0, 0.0),
        (R(per_minute=60, growth=2), 60, 61, 0.5),
        (R(per_minute=60, growth=2), 59.5, 60, 0.5),
    ],
)
def test_next_slot(rate: DispatchRate, elapsed: float, dispatched: int, wait: float) -> None:
    assert next_dispatch_in(rate, elapsed, dispatched) == pytest.approx(wait, abs=1e-3)
    if wait:  # one more is allowed at the slot, not before it
        assert dispatch_quota(rate, elapsed + wait + 1e-3, dispatched) == 1
        assert dispatch_quota(rate, elapsed + wait - 1e-2, dispatched) == 0


@given(
    per_minute=st.floats(0.01, 10_000),
    growth=st.floats(1, 10),
    period_s=st.integers(1, 600),
    t=st.floats(0, 20_000),
    dt=st.floats(0, 1000),
)
def test_rate_integral_grows_at_least_at_the_start_rate(
    per_minute: float, growth: float, period_s: int, t: float, dt: float
) -> None:
    rate = R(per_minute=per_minute, growth=growth, period_s=period_s)
    before, after = dispatch_integral(rate, t), dispatch_integral(rate, t + dt)
    assert after >= before + per_minute / 60 * dt * (1 - 1e-9) - 1e-6
    assert after <= before + 1_000_000 / 60 * dt * (1 + 1e-9) + 1e-6


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        ({"per_minute": 0}, "greater than 0"),
        ({"per_minute": float("inf")}, "finite number"),
        ({"per_minute": 10, "growth": 0.9}, "greater than or equal to 1"),
        ({"per_minute": 10, "period_s": 0}, "greater than or equal to 1"),
        ({"per_minute": 10, "growth": 2, "max_per_minute": 5}, "below the starting rate"),
        ({"per_minute": 10, "max_per_minute": 50}, "give growth > 1"),
        ({"per_minute": 10, "every": 3}, "Extra inputs"),
    ],
)
def test_nonsense_rates_are_refused(rate: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DispatchRate.model_validate(rate)


def test_the_gate_waits_for_pending_members_but_the_ceiling_does_not() -> None:
    stage = S(count=10, success_percent=50, max_failed=2)
    waiting = StageCounts(targeted=3, succeeded=3, pending=7)
    assert decide(stage, waiting, index=0, last=False, soaked=True).kind is DecisionKind.NONE
    assert not waiting.settled
    failing = StageCounts(targeted=3, succeeded=1, failed_package=2, pending=7)
    assert decide(stage, failing, index=0, last=False, soaked=True).kind is DecisionKind.PAUSE
    done = StageCounts(targeted=10, succeeded=6, open=4)
    assert decide(stage, done, index=0, last=False, soaked=True).kind is DecisionKind.ADVANCE


# --------------------------------------------------------------------------------------------
# Property: a model campaign driven only by the engine, under random reports and actions


@dataclass
class Model:
    """A campaign as :mod:`server.campaigns` runs it, without a database."""

    stages: list[StageSpec]
    population: int
    rate: DispatchRate | None = None
    state: str = "running"
    stage: int = 0
    elapsed: int = 0  # seconds since the stage was activated
    outcomes: dict[int, str] = field(default_factory=dict)  # member -> outcome
    member_stage: dict[int, int] = field(default_factory=dict)
    events: list[tuple[int, str, str, int]] = field(default_factory=list)  # (stage, rule, kind, n)
    version: int = 0
    pending: list[int] = field(default_factory=list)  # members waiting for the rate, in order
    rate_elapsed: float = 0.0  # seconds since the rate (re)started
    dispatched: int = 0  # devices dispatched since then

    def __post_init__(self) -> None:
        self.order = order_members("prop", range(self.population))
        self.targets = cumulative_targets(self.stages, self.population)
        self.activate(0)

    def activate(self, index: int) -> None:
        self.stage = index
        self.elapsed = 0
        self.restart_rate()
        for dev in self.order[len(self.member_stage) : self.targets[index]]:
            self.member_stage[dev] = index
            self.pending.append(dev)
        self.dispatch()

    def restart_rate(self) -> None:
        self.rate_elapsed = 0.0
        self.dispatched = 0

    def dispatch(self) -> None:
        """A batch: as many pending members as the rate allows get their device task."""
        if self.state != "running":
            return
        quota = dispatch_quota(self.rate, self.rate_elapsed, self.dispatched)
        batch = self.pending if quota is None else self.pending[:quota]
        self.pending = self.pending[len(batch) :]
        for dev in batch:
            self.outcomes[dev] = "open"
        self.dispatched += len(batch)

    def counts(self) -> StageCounts:
        mine = [
            self.outcomes[d]
            for d, s in self.member_stage.items()
            if s == self.stage and d in self.outcomes
        ]
        return StageCounts(
            targeted=len(mine),
            succeeded=mine.count("ok"),
            failed_package=mine.count("package"),
            failed_environment=mine.count("environment"),
            deferred=mine.count("deferral"),
            open=mine.count("open"),
            pending=sum(1 for d in self.pending if self.member_stage[d] == self.stage),
        )

    def evaluate(self) -> None:
        """The evaluator: one decision per version, applied with the version compare-and-set."""
        if self.state != "running":
            return
        stage = self.stages[self.stage]
        now = self.counts()
        decision = decide(
            stage,
            now,
            index=self.stage,
            last=self.stage == len(self.stages) - 1,
            soaked=self.elapsed >= stage.soak_s,
        )
        if decision.kind is DecisionKind.NONE:
            return
        # Invariant: a stage never passes with its ceiling breached (oracle written out here).
        if decision.kind in (DecisionKind.ADVANCE, DecisionKind.FINISH):
            breached = (
                stage.max_failed is not None and now.failed_package >= stage.max_failed
            ) or (
                stage.max_failed_percent is not None
                and now.executed >= max(1, stage.min_executed)
                and now.failed_package * 100 >= stage.max_failed_percent * now.executed
            )
            assert not breached
            assert now.pending == 0  # a gate never passes before every member is dispatched
        self.events.append((self.stage, decision.rule, decision.kind.value, self.version))
        self.version += 1
        if decision.kind is DecisionKind.ADVANCE:
            self.activate(self.stage + 1)
        elif decision.kind is DecisionKind.FINISH:
            self.state = "finished"
        elif decision.kind is DecisionKind.PAUSE:
            self.state = "paused"
        else:
            self.state = "aborted"


stage_strategy = st.builds(
    StageSpec,
    count=st.integers(1, 12),
    soak_s=st.sampled_from([0, 0, 10]),
    min_executed=st.integers(0, 3),
    success_percent=st.sampled_from([30.0, 50.0, 80.0, 100.0]),
    on_success=st.sampled_from(["advance", "advance", "pause"]),
    max_failed=st.one_of(st.none(), st.integers(1, 3)),
    max_failed_percent=st.one_of(st.none(), st.sampled_from([10.0, 50.0])),
    on_failure=st.sampled_from(["pause", "abort"]),
)

_OUTCOMES = st.sampled_from(["ok", "ok", "ok", "package", "environment", "deferral"])
# A step: reports from open devices (several may arrive between two looks of the evaluator),
# time passing, the evaluator looking, or an operator action.
step_strategy = st.one_of(
    st.tuples(st.just("report"), st.lists(_OUTCOMES, min_size=1, max_size=8)),
    st.tuples(st.just("time"), st.integers(1, 20)),
    st.tuples(st.just("tick"), st.just(0)),
    st.tuples(st.just("operator"), st.sampled_from(["pause", "resume", "advance"])),
)


rate_strategy = st.one_of(
    st.none(),
    st.builds(
        DispatchRate,
        per_minute=st.sampled_from([6.0, 30.0, 120.0]),
        growth=st.sampled_from([1.0, 2.0]),
        period_s=st.sampled_from([10, 30]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    raw_stages=st.lists(stage_strategy, min_size=1, max_size=4),
    population=st.integers(5, 40),
    steps=st.lists(step_strategy, min_size=10, max_size=120),
    rate=rate_strategy,
)
def test_random_reports_and_actions_keep_the_invariants(
    raw_stages: list[StageSpec],
    population: int,
    steps: list[tuple[str, Any]],
    rate: DispatchRate | None,
) -> None:
    # Cumulative counts, and only stages the validation accepts.
    stages: list[StageSpec] = []
    total = 0
    for stage in raw_stages:
        total += stage.count or 0
        stages.append(stage.model_copy(update={"count": total}))
    assume(not stage_problems(stages, population))
    model = Model(stages, population, rate)
    model.evaluate()
    for kind, what in steps:
        if kind == "report":
            open_members = [d for d, o in model.outcomes.items() if o == "open"]
            for dev, outcome in zip(open_members, what, strict=False):
                model.outcomes[dev] = outcome
        elif kind == "time":
            model.elapsed += what
            model.rate_elapsed += what
        elif kind == "tick":
            before = len(model.events)
            model.evaluate()
            model.dispatch()
            model.evaluate()  # a second look at the same numbers decides nothing new
            assert len(model.events) - before <= 1
        elif what == "pause" and action_refusal("pause", model.state) is None:
            model.state = "paused"
        elif what == "resume" and action_refusal("resume", model.state) is None:
            model.state = "running"
            model.restart_rate()
        elif what == "advance" and action_refusal("advance", model.state) is None:
            if model.stage + 1 < len(stages):
                model.activate(model.stage + 1)
                model.state = "running"
            else:
                model.state = "finished"
        # Never more devices activated than the stage allows, nor dispatched than the rate does.
        assert len(model.member_stage) <= model.targets[model.stage]
        if rate is not None:
            assert model.dispatched <= 1 + int(dispatch_integral(rate, model.rate_elapsed) + 1e-9)
        for dev, index in model.member_stage.items():
            assert index <= model.stage
            assert model.order.index(dev) < model.targets[index]
    # Every automatic decision is recorded once: one event per campaign version.
    versions = [event[3] for event in model.events]
    assert versions == sorted(set(versions))

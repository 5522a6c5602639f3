"""Staged campaigns in SQL: creation, dry runs, operator actions, activation and the evaluator.

The decisions themselves are :mod:`onenet_ota.server.campaign_engine`'s; this module reads the
numbers they need and applies them. A campaign maps onto the existing tasks without changing the
device protocol:

- activating a stage creates one operator task with a to-be-upgraded device task per new member
  (T1) and announces it with the task push (§11); a member that already has an open task of the
  type is skipped (D23) and recorded without a task;
- pausing, resuming and aborting a campaign pause, resume and cancel its tasks (T2-T4);
- "retry failed" gives the failed members a new task.

Exactly once. Every change of a campaign, automatic or an operator's, goes through
:func:`record_transition`: a compare-and-set on the campaign's ``version`` and one
``campaign_events`` row carrying the new version (unique per campaign), in the transaction that
makes the change. Two evaluators or two operators acting on the same version cannot both apply:
the second one's UPDATE matches no row and its transaction is rolled back.

One evaluator. Every server process runs :class:`CampaignEvaluator`, but only the holder of the
``campaigns`` lease (a row taken and renewed by compare-and-set with an expiry) evaluates; if it
dies, another takes over once the lease expires. It does not poll the campaigns: it looks at a
campaign when something that can change its gate happens. A device's report lands on whichever
worker or host the device reached, and every such transaction writes a change feed row naming the
device (:mod:`.changes`); the holder reads the feed (one indexed query, every 50 ms) and looks at
the campaigns those devices are members of. An operator action in the holder's own process wakes
it at once, one elsewhere through the feed; a look also says when the campaign is next due
without any change (a soak's end, the rate's next slot, the deadline), and a full sweep every
few seconds covers changes the feed cannot show. A look is a read; only a look that finds
something to apply takes a write transaction (and on SQLite the write lock), so many idle
campaigns hold no writer off.

Dispatch and dynamic membership (:mod:`.campaign_engine`'s doc). A stage's members are chosen when
it is activated and written as **pending** members; :meth:`CampaignService._dispatch` gives them
their device tasks in batches under the rate, each batch one task, each member taken by a
compare-and-set on its pending flag, so that two evaluators never dispatch it twice. The rate's
batches are not campaign events: the stage's activation (or the operator action) is the one
audited decision, and each batch is visible in the members' tasks and the ``dispatched`` count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from pydantic import BaseModel
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from onenet_ota.management.models import (
    MAX_PAGE,
    Campaign,
    CampaignCreate,
    CampaignDetail,
    CampaignEvent,
    DevicesAdd,
    DispatchRate,
    Preview,
    RetryFailed,
    Selector,
    StagePreview,
    StageView,
    StateCounts,
    TaskCreated,
)
from onenet_ota.protocol.states import Action, TaskState
from onenet_ota.protocol.status import TaskType
from onenet_ota.server import audit, changes
from onenet_ota.server.admin_service import (
    Conflict,
    CreatedTask,
    Invalid,
    NotFound,
    Page,
    label_filter,
)
from onenet_ota.server.campaign_engine import (
    TERMINAL_CAMPAIGN_STATES,
    Decision,
    DecisionKind,
    FailureClass,
    StageCounts,
    StageSpec,
    action_refusal,
    classify,
    cumulative_targets,
    decide,
    dispatch_quota,
    member_hash,
    next_dispatch_in,
    order_members,
    stage_problems,
    tally,
)
from onenet_ota.server.db import chunks
from onenet_ota.server.schema import (
    campaign_devices,
    campaign_events,
    campaigns,
    device_tasks,
    devices,
    leases,
    packages,
    tasks,
)
from onenet_ota.server.transitions import (
    apply_bulk,
    create_task,
    expire_deadlines,
    open_task_devices,
)

__all__ = [
    "Campaign",
    "CampaignCreate",
    "CampaignDetail",
    "CampaignEvaluator",
    "CampaignEvent",
    "CampaignService",
    "DevicesAdd",
    "FailedMember",
    "Preview",
    "RetryFailed",
    "Selector",
    "record_transition",
]

log = logging.getLogger(__name__)

_SAMPLE: Final = 20
LEASE_NAME: Final = "campaigns"
EVENTS_SHOWN: Final = 50


class StaleCampaign(Exception):
    """The campaign changed since it was read: the compare-and-set matched nothing."""


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True, slots=True)
class Applied:
    """A change :class:`CampaignService` committed: the new campaign and the tasks it created
    (for the task push)."""

    campaign: Campaign
    created: list[CreatedTask]


@dataclass(frozen=True, slots=True)
class FailedMember:
    """A campaign member whose device task failed, with its code's failure class."""

    dev_id: int
    name: str
    result_code: int | None
    failure_class: FailureClass


# --------------------------------------------------------------------------------------------
# The one place a campaign changes


def record_transition(
    conn: Connection,
    row: Any,
    *,
    actor: str,
    action: str,
    to_state: str,
    detail: str,
    numbers: dict[str, Any],
    now: int,
    stage: int | None = None,
) -> int:
    """Apply one decision or action to the campaign ``row`` (as read in this transaction):
    compare-and-set its ``version``, move it to ``to_state`` (and ``stage``, restarting its
    soak), and record the event with its numbers. Returns the new version; raises
    :class:`StaleCampaign` when the campaign changed since ``row`` was read.

    Every automatic decision and every operator action goes through here, once.
    """
    values: dict[str, Any] = {"state": to_state, "version": row.version + 1, "updated_at": now}
    if stage is not None and stage != row.stage:
        values["stage"] = stage
        values["stage_started_at"] = now
    done = conn.execute(
        update(campaigns)
        .where(campaigns.c.id == row.id, campaigns.c.version == row.version)
        .values(**values)
    )
    if done.rowcount != 1:
        raise StaleCampaign
    # The audit log gets the same decision once, in the same transaction: an automatic one as
    # system:campaigns with its numbers, an operator's under the token that asked; the event
    # names the same "by", so a campaign's history says who acted without the audit log.
    by = "system:campaigns" if actor == "auto" else audit.current_actor()
    conn.execute(
        insert(campaign_events).values(
            campaign_id=row.id,
            version=row.version + 1,
            at=now,
            actor=actor,
            by=by,
            action=action,
            stage=row.stage if stage is None else stage,
            from_state=row.state,
            to_state=to_state,
            detail=detail[:1000],
            numbers=json.dumps(numbers, sort_keys=True),
        )
    )
    stage_after = row.stage if stage is None else stage
    audit.record(
        conn,
        actor=by,
        action=f"campaign.{action}",
        target=f"campaign:{row.id}",
        before={"state": row.state, "stage": row.stage, "version": row.version},
        after={"state": to_state, "stage": stage_after, "version": row.version + 1},
        detail=detail,
        now=now,
    )
    log.info("campaign %d: %s by %s: %s", row.id, action, by, detail)
    return int(row.version + 1)


# --------------------------------------------------------------------------------------------
# The service


def _stages(row: Any) -> list[StageSpec]:
    return [StageSpec.model_validate(s) for s in json.loads(row.stages)]


def _selector(row: Any) -> Selector:
    return Selector.model_validate_json(row.selector)


def _classes(row: Any) -> dict[int, FailureClass]:
    return {int(k): FailureClass(v) for k, v in json.loads(row.failure_classes).items()}


def _rate(row: Any) -> DispatchRate | None:
    return None if row.rate is None else DispatchRate.model_validate_json(row.rate)


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at a running campaign did (``applied``, None: nothing) and when it should
    be looked at again although nothing changed (``due``, Unix seconds: the soak's end, the
    rate's next slot or the deadline; None: only when something changes)."""

    applied: Applied | None
    due: float | None


class CampaignService:
    """Campaigns over ``engine``. ``clock`` returns Unix seconds; ``on_change`` is called after
    every committed change to device tasks (as :class:`.AdminService`'s)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._on_change = on_change
        self._on_action: list[Callable[[int], None]] = []

    @property
    def clock(self) -> Callable[[], float]:
        """The service's clock (Unix seconds)."""
        return self._clock

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def on_action(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(campaign_id)`` after every committed operator action (the evaluator
        of this process looks at the campaign at once instead of at its next timer)."""
        self._on_action.append(callback)

    def _now(self) -> int:
        return int(self._clock())

    # ---------------------------------------------------------------- selection

    @staticmethod
    def _matching(conn: Connection, pid: str, module_type: int, selector: Selector) -> list[int]:
        """Every device the selector matches now (existing devices of the product only)."""
        found: set[int] = set()
        if selector.dev_ids is not None:
            for chunk in chunks(selector.dev_ids):
                found.update(
                    conn.execute(
                        select(devices.c.dev_id).where(
                            devices.c.pid == pid, devices.c.dev_id.in_(chunk)
                        )
                    ).scalars()
                )
        else:
            query = select(devices.c.dev_id).where(devices.c.pid == pid)
            if selector.from_versions is not None:
                column = (
                    devices.c.f_version if module_type == TaskType.FOTA else devices.c.s_version
                )
                query = query.where(column.in_(selector.from_versions))
            if selector.labels:
                query = query.where(label_filter(selector.labels.items()))
            found.update(conn.execute(query).scalars())
        for chunk in chunks(selector.added):
            found.update(
                conn.execute(
                    select(devices.c.dev_id).where(
                        devices.c.pid == pid, devices.c.dev_id.in_(chunk)
                    )
                ).scalars()
            )
        return sorted(found)

    def _package(self, conn: Connection, package_id: int) -> Any:
        package = conn.execute(select(packages).where(packages.c.id == package_id)).first()
        if package is None:
            raise Invalid(f"package {package_id} does not exist")
        return package

    def _check(self, conn: Connection, spec: CampaignCreate) -> tuple[Any, list[int]]:
        """The package and the matching devices, or :class:`Invalid` with every problem."""
        package = self._package(conn, spec.package_id)
        now = self._now()
        if spec.deadline is not None and spec.deadline <= max(spec.start_time or 0, now):
            raise Invalid("deadline must be later than the start time and than now")
        matching = self._matching(conn, package.pid, package.module_type, spec.selector)
        problems = stage_problems(spec.stages, len(matching))
        if problems:
            raise Invalid(
                "the campaign cannot be satisfied: " + "; ".join(problems),
                details=[{"message": p} for p in problems],
            )
        return package, matching

    # ---------------------------------------------------------------- create, preview, read

    def preview(self, spec: CampaignCreate, *, salt: str = "preview") -> Preview:
        """A dry run: each stage's members, computed as activation would, changing nothing."""
        with self.engine.connect() as conn:
            package, matching = self._check(conn, spec)
            busy = open_task_devices(conn, matching, package.module_type)
        return self._preview(spec.stages, matching, salt, len(busy))

    @staticmethod
    def _preview(
        stages: Sequence[StageSpec], matching: Sequence[int], salt: str, busy: int
    ) -> Preview:
        order = order_members(salt, matching)
        targets = cumulative_targets(stages, len(order))
        views = []
        before = 0
        for index, (stage, upto) in enumerate(zip(stages, targets, strict=True)):
            members = order[before:upto]
            views.append(
                StagePreview(
                    index=index,
                    name=stage.label(index),
                    devices=len(members),
                    sample=sorted(members)[:_SAMPLE],
                )
            )
            before = upto
        return Preview(population=len(order), stages=views, busy=busy)

    def preview_campaign(self, campaign_id: int) -> Preview:
        """A dry run of an existing campaign over the devices it matches now."""
        with self.engine.connect() as conn:
            row = self._row(conn, campaign_id)
            matching = self._matching(conn, row.pid, row.module_type, _selector(row))
            busy = open_task_devices(conn, matching, row.module_type)
        return self._preview(_stages(row), matching, row.salt, len(busy))

    def create(self, spec: CampaignCreate) -> Campaign:
        """Create a draft campaign after checking it can be satisfied (422 otherwise)."""
        now = self._now()
        with self.engine.begin() as conn:
            package, matching = self._check(conn, spec)
            campaign_id = conn.execute(
                insert(campaigns)
                .values(
                    name=spec.name,
                    pid=package.pid,
                    package_id=package.id,
                    module_type=package.module_type,
                    selector=spec.selector.model_dump_json(),
                    stages=json.dumps([s.model_dump(mode="json") for s in spec.stages]),
                    failure_classes=json.dumps(
                        {str(k): v.value for k, v in spec.failure_classes.items()}
                    ),
                    signal=spec.signal,
                    power=spec.power,
                    retry=spec.retry,
                    interval=spec.interval,
                    start_time=spec.start_time,
                    deadline=spec.deadline,
                    rate=None if spec.rate is None else spec.rate.model_dump_json(),
                    dynamic=spec.dynamic,
                    salt=secrets.token_hex(8),
                    state="draft",
                    stage=-1,
                    population=len(matching),
                    version=0,
                    created_at=now,
                    updated_at=now,
                )
                .returning(campaigns.c.id)
            ).scalar_one()
            return self._model(self._row(conn, campaign_id))

    @staticmethod
    def _row(conn: Connection, campaign_id: int, *, lock: bool = False) -> Any:
        query = select(campaigns).where(campaigns.c.id == campaign_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"campaign {campaign_id} not found")
        return row

    @staticmethod
    def _model(row: Any) -> Campaign:
        data = dict(row._mapping)
        for name in ("stages", "salt", "dispatch_since_ms"):
            data.pop(name)
        data["selector"] = _selector(row)
        data["failure_classes"] = _classes(row)
        data["rate"] = _rate(row)
        data["dynamic"] = bool(row.dynamic)
        return Campaign(**data)

    @staticmethod
    def _stage_counts(
        conn: Connection, row: Any, only: int | None = None
    ) -> dict[int, StageCounts]:
        """Counts of every activated stage (the members with a task), or of stage ``only``."""
        where = [campaign_devices.c.campaign_id == row.id]
        if (
            only is not None
        ):  # the evaluator's look: one stage's rows, by the (campaign, stage) index
            where.append(campaign_devices.c.stage == only)
        rows = conn.execute(
            select(
                campaign_devices.c.stage,
                device_tasks.c.state,
                device_tasks.c.result_code,
                func.count(),
            )
            .select_from(campaign_devices)
            .join(
                device_tasks,
                and_(
                    device_tasks.c.task_id == campaign_devices.c.task_id,
                    device_tasks.c.dev_id == campaign_devices.c.dev_id,
                ),
            )
            .where(*where)
            .group_by(campaign_devices.c.stage, device_tasks.c.state, device_tasks.c.result_code)
        ).all()
        grouped: dict[int, list[tuple[int, int | None, int]]] = {}
        for stage, state, code, count in rows:
            grouped.setdefault(stage, []).append((state, code, count))
        classes = _classes(row)
        counts = {stage: tally(items, classes) for stage, items in grouped.items()}
        pending = conn.execute(
            select(campaign_devices.c.stage, func.count())
            .where(*where, campaign_devices.c.pending)
            .group_by(campaign_devices.c.stage)
        ).all()
        for stage, count in pending:
            counts[stage] = replace(counts.get(stage, StageCounts()), pending=int(count))
        return counts

    def get(self, campaign_id: int) -> CampaignDetail:
        """A campaign with per-stage counters and its latest events."""
        with self.engine.connect() as conn:
            row = self._row(conn, campaign_id)
            per_stage = self._stage_counts(conn, row)
            skipped: dict[int, int] = {
                int(stage): int(n)
                for stage, n in conn.execute(
                    select(campaign_devices.c.stage, func.count())
                    .where(
                        campaign_devices.c.campaign_id == campaign_id,
                        campaign_devices.c.task_id.is_(None),
                        campaign_devices.c.pending.is_(False),
                    )
                    .group_by(campaign_devices.c.stage)
                ).all()
            }
            events = self._events(conn, campaign_id, EVENTS_SHOWN)
        stages = _stages(row)
        targets = cumulative_targets(stages, row.population)
        views = []
        before = 0
        for index, (stage, upto) in enumerate(zip(stages, targets, strict=True)):
            views.append(
                StageView(
                    index=index,
                    spec=stage,
                    planned=upto - before,
                    skipped=int(skipped.get(index, 0)),
                    counts=per_stage.get(index, StageCounts()).as_dict(),
                )
            )
            before = upto
        return CampaignDetail(**self._model(row).model_dump(), stages=views, events=events)

    @staticmethod
    def _events(conn: Connection, campaign_id: int, limit: int) -> list[CampaignEvent]:
        rows = conn.execute(
            select(campaign_events)
            .where(campaign_events.c.campaign_id == campaign_id)
            .order_by(campaign_events.c.version.desc())
            .limit(limit)
        ).all()
        return [
            CampaignEvent(
                version=r.version,
                at=r.at,
                actor=r.actor,
                by=r.by,
                action=r.action,
                stage=r.stage,
                from_state=r.from_state,
                to_state=r.to_state,
                detail=r.detail,
                numbers=json.loads(r.numbers),
            )
            for r in rows
        ]

    def events(self, campaign_id: int) -> list[CampaignEvent]:
        """Every event of a campaign, oldest first."""
        with self.engine.connect() as conn:
            self._row(conn, campaign_id)
            return list(reversed(self._events(conn, campaign_id, 1_000_000)))

    def failures(self, campaign_id: int, *, limit: int = 500) -> tuple[list[FailedMember], bool]:
        """The campaign's failed members (the first ``limit`` by device id), each with its
        result code and that code's failure class; and whether more were left out."""
        with self.engine.connect() as conn:
            row = self._row(conn, campaign_id)
            rows = conn.execute(
                select(campaign_devices.c.dev_id, devices.c.name, device_tasks.c.result_code)
                .select_from(campaign_devices)
                .join(
                    device_tasks,
                    and_(
                        device_tasks.c.task_id == campaign_devices.c.task_id,
                        device_tasks.c.dev_id == campaign_devices.c.dev_id,
                    ),
                )
                .join(devices, devices.c.dev_id == campaign_devices.c.dev_id)
                .where(
                    campaign_devices.c.campaign_id == campaign_id,
                    device_tasks.c.state == int(TaskState.FAILED),
                )
                .order_by(campaign_devices.c.dev_id)
                .limit(limit + 1)
            ).all()
        classes = _classes(row)
        members = [
            FailedMember(r.dev_id, r.name, r.result_code, classify(r.result_code, classes))
            for r in rows[:limit]
        ]
        return members, len(rows) > limit

    def list_campaigns(
        self, *, state: str | None = None, limit: int | None = None, after: int | None = None
    ) -> Page[Campaign]:
        """Campaigns in id order."""
        size = limit or 100
        if not 1 <= size <= MAX_PAGE:
            raise Invalid(f"limit must be between 1 and {MAX_PAGE}")
        query = select(campaigns)
        if state is not None:
            query = query.where(campaigns.c.state == state)
        if after is not None:
            query = query.where(campaigns.c.id > after)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(campaigns.c.id).limit(size + 1)).all()
        items = [self._model(r) for r in rows[:size]]
        return Page(items, str(items[-1].id) if len(rows) > size else None)

    # ---------------------------------------------------------------- activation and tasks

    @staticmethod
    def _task_ids(conn: Connection, campaign_id: int) -> list[int]:
        return list(
            conn.execute(
                select(campaign_devices.c.task_id)
                .where(
                    campaign_devices.c.campaign_id == campaign_id,
                    campaign_devices.c.task_id.is_not(None),
                )
                .distinct()
            ).scalars()
        )

    def _new_task(
        self, conn: Connection, row: Any, dev_ids: Sequence[int], now: int
    ) -> CreatedTask | None:
        """A task of the campaign's package with a to-be-upgraded device task (T1) per device."""
        if not dev_ids:
            return None
        start_time = row.start_time if row.start_time is not None else now
        task_id = create_task(
            conn,
            pid=row.pid,
            package_id=row.package_id,
            module_type=row.module_type,
            signal=row.signal,
            power=row.power,
            retry=row.retry,
            interval=row.interval,
            start_time=start_time,
            deadline=row.deadline,
            dev_ids=dev_ids,
            now=now,
        )
        target = conn.execute(
            select(packages.c.target).where(packages.c.id == row.package_id)
        ).scalar_one()
        task = TaskCreated(
            id=task_id,
            pid=row.pid,
            package_id=row.package_id,
            module_type=row.module_type,
            target=target,
            signal=row.signal,
            power=row.power,
            retry=row.retry,
            interval=row.interval,
            start_time=start_time,
            deadline=row.deadline,
            status="active",
            created_at=now,
            total=len(dev_ids),
            counts=StateCounts(to_be_upgraded=len(dev_ids)),
            skipped=[],
            cancelled=[],
        )
        return CreatedTask(task=task, dev_ids=list(dev_ids))

    def _choose(self, conn: Connection, row: Any, index: int) -> tuple[list[int], int]:
        """The devices that join stage ``index`` now (its cumulative share of the population
        matching now, lowest positions first, less the members so far) and the population."""
        matching = self._matching(conn, row.pid, row.module_type, _selector(row))
        have = set(
            conn.execute(
                select(campaign_devices.c.dev_id).where(campaign_devices.c.campaign_id == row.id)
            ).scalars()
        )
        population = len(set(matching) | have)
        target = cumulative_targets(_stages(row), population)[index]
        fresh = order_members(row.salt, [d for d in matching if d not in have])
        return fresh[: max(0, target - len(have))], population

    def _activate(
        self, conn: Connection, row: Any, index: int, now: int
    ) -> tuple[CreatedTask | None, dict[str, int]]:
        """Make stage ``index``'s new members (up to its cumulative share) part of the campaign,
        pending, then dispatch as many as the rate allows (:meth:`_dispatch`: all of them without
        a rate). Activating a later stage than before restarts the rate."""
        # Compare-and-set: one activation per stage, however many evaluators get here.
        if index > row.activated_stage:
            marked = conn.execute(
                update(campaigns)
                .where(campaigns.c.id == row.id, campaigns.c.activated_stage < index)
                .values(
                    activated_stage=index,
                    dispatch_since_ms=int(self._clock() * 1000),
                    dispatched=0,
                )
            )
            if marked.rowcount != 1:
                raise StaleCampaign
        chosen, population = self._choose(conn, row, index)
        if population != row.population:
            conn.execute(
                update(campaigns).where(campaigns.c.id == row.id).values(population=population)
            )
        if _rate(row) is None:
            # No rate: every new member gets its task now, written once (a stage of thousands
            # is the one large insert on the way from a gate to the next stage).
            busy = open_task_devices(conn, chosen, row.module_type)
            ready = [d for d in chosen if d not in busy]
            created = self._new_task(conn, row, ready, now)
            task_id = created.task.id if created is not None else None
            self._insert_members(conn, row.id, chosen, index, now, task_id=task_id, busy=busy)
            if ready:
                changes.publish(conn, ready, now)
            numbers = {"activated": len(ready), "skipped_busy": len(busy), "pending": 0}
        else:
            self._insert_members(conn, row.id, chosen, index, now, task_id=None, busy=None)
            created, numbers = self._dispatch(conn, row.id, now)
        return created, {"chosen": len(chosen), **numbers, "population": population}

    @staticmethod
    def _insert_members(
        conn: Connection,
        campaign_id: int,
        dev_ids: Sequence[int],
        stage: int,
        now: int,
        *,
        task_id: int | None,
        busy: set[int] | None,
    ) -> None:
        """Member rows: with their task (``busy`` ones skipped, without), or pending (``busy``
        None: the rate dispatches them)."""
        rows = [
            {
                "campaign_id": campaign_id,
                "dev_id": dev_id,
                "stage": stage,
                "task_id": None if busy is None or dev_id in busy else task_id,
                "activated_at": now,
                "pending": busy is None,
            }
            for dev_id in dev_ids
        ]
        for batch in chunks(rows):
            conn.execute(insert(campaign_devices), list(batch))

    def _dispatch(
        self, conn: Connection, campaign_id: int, now: int
    ) -> tuple[CreatedTask | None, dict[str, int]]:
        """Give pending members their device task, as many as the rate allows now (every one
        without a rate), earlier stages first and in the stable order within a stage: one task
        for those without an open task of the type, skipped (no task) for the others (D23).
        Skipped members count toward the rate too: the rate paces decisions, not tasks."""
        row = self._row(conn, campaign_id)
        pending = conn.execute(
            select(campaign_devices.c.dev_id, campaign_devices.c.stage).where(
                campaign_devices.c.campaign_id == row.id, campaign_devices.c.pending
            )
        ).all()
        since = (row.dispatch_since_ms or 0) / 1000
        quota = dispatch_quota(_rate(row), self._clock() - since, row.dispatched)
        if not pending or quota == 0:
            return None, {"activated": 0, "skipped_busy": 0, "pending": len(pending)}
        ordered = sorted(pending, key=lambda r: (r.stage, member_hash(row.salt, r.dev_id)))
        chosen = [r.dev_id for r in (ordered if quota is None else ordered[:quota])]
        # Compare-and-set per member: a member is dispatched once, whoever else tries.
        taken = 0
        for chunk in chunks(chosen):
            taken += conn.execute(
                update(campaign_devices)
                .where(
                    campaign_devices.c.campaign_id == row.id,
                    campaign_devices.c.dev_id.in_(chunk),
                    campaign_devices.c.pending,
                )
                .values(pending=False, activated_at=now)
            ).rowcount
        if taken != len(chosen):
            raise StaleCampaign
        busy = open_task_devices(conn, chosen, row.module_type)
        ready = [d for d in chosen if d not in busy]
        created = self._new_task(conn, row, ready, now)
        if created is not None:
            for chunk in chunks(ready):
                conn.execute(
                    update(campaign_devices)
                    .where(
                        campaign_devices.c.campaign_id == row.id,
                        campaign_devices.c.dev_id.in_(chunk),
                    )
                    .values(task_id=created.task.id)
                )
            changes.publish(conn, ready, now)
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == row.id)
            .values(dispatched=campaigns.c.dispatched + len(chosen))
        )
        numbers = {
            "activated": len(ready),
            "skipped_busy": len(busy),
            "pending": len(pending) - len(chosen),
        }
        return created, numbers

    def _move_tasks(self, conn: Connection, campaign_id: int, action: Action, now: int) -> int:
        """Pause, resume or cancel every device task of the campaign (T2-T4)."""
        task_ids = self._task_ids(conn, campaign_id)
        if not task_ids:
            return 0
        status = {Action.PAUSE: "paused", Action.RESUME: "active", Action.CANCEL: "cancelled"}
        moved = 0
        for chunk in chunks(task_ids):
            moved += apply_bulk(conn, action, device_tasks.c.task_id.in_(chunk), now)
            still = tasks.c.status != "cancelled"
            conn.execute(
                update(tasks).where(tasks.c.id.in_(chunk), still).values(status=status[action])
            )
        changes.publish(conn, None, now)
        return moved

    # ---------------------------------------------------------------- operator actions

    def act(
        self,
        campaign_id: int,
        action: str,
        body: BaseModel | None = None,
        *,
        if_version: int | None = None,
    ) -> Applied:
        """An operator action (start, pause, resume, advance, abort, retry_failed, add_devices);
        409 when the campaign's state does not allow it or it changed meanwhile.

        ``if_version`` is the campaign version the operator decided on: when the campaign has
        moved on since (another operator's action, an automatic decision), the action is refused
        instead of applied to a campaign the operator has not seen, so two operators pressing
        "advance" on the same stage advance it once."""
        now = self._now()
        try:
            with self.engine.begin() as conn:
                expire_deadlines(conn, now)
                row = self._row(conn, campaign_id, lock=True)
                if if_version is not None and row.version != if_version:
                    raise Conflict(
                        f"campaign {campaign_id} is at version {row.version}, not {if_version}: "
                        f"it changed meanwhile (now {row.state}, stage {row.stage + 1}); read it "
                        "and decide again"
                    )
                refusal = action_refusal(action, row.state)
                if refusal is not None:
                    raise Conflict(refusal)
                created = getattr(self, f"_do_{action}")(conn, row, now, body)
                result = self._model(self._row(conn, campaign_id))
        except StaleCampaign:
            raise Conflict(f"campaign {campaign_id} changed meanwhile; read it and retry") from None
        except IntegrityError:
            raise Conflict(f"campaign {campaign_id} changed meanwhile; read it and retry") from None
        self._changed()
        for callback in self._on_action:
            callback(campaign_id)
        return Applied(result, [c for c in created if c is not None])

    def _op(
        self,
        conn: Connection,
        row: Any,
        now: int,
        action: str,
        to_state: str,
        detail: str,
        numbers: dict[str, Any],
        stage: int | None = None,
    ) -> None:
        record_transition(
            conn,
            row,
            actor="operator",
            action=action,
            to_state=to_state,
            detail=detail,
            numbers=numbers,
            now=now,
            stage=stage,
        )

    def _do_start(self, conn: Connection, row: Any, now: int, _body: Any) -> list[Any]:
        created, numbers = self._activate(conn, row, 0, now)
        self._op(conn, row, now, "start", "running", "started stage 1", numbers, stage=0)
        return [created]

    def _do_pause(self, conn: Connection, row: Any, now: int, _body: Any) -> list[Any]:
        moved = self._move_tasks(conn, row.id, Action.PAUSE, now)
        self._op(conn, row, now, "pause", "paused", "paused by an operator", {"moved": moved})
        return []

    def _do_resume(self, conn: Connection, row: Any, now: int, _body: Any) -> list[Any]:
        decision = self._decision(conn, row, now)
        if decision.kind in (DecisionKind.PAUSE, DecisionKind.ABORT):
            raise Conflict(
                f"resuming would stop again at once ({decision.reason}); advance, retry the "
                "failed devices or abort instead"
            )
        moved = self._move_tasks(conn, row.id, Action.RESUME, now)
        # The rate starts again from its first rate: a pause dispatched nothing, and a resume
        # must not make up for it in one burst.
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == row.id)
            .values(dispatch_since_ms=int(self._clock() * 1000), dispatched=0)
        )
        self._op(conn, row, now, "resume", "running", "resumed by an operator", {"moved": moved})
        return []

    def _do_advance(self, conn: Connection, row: Any, now: int, _body: Any) -> list[Any]:
        if row.state == "paused":
            self._move_tasks(conn, row.id, Action.RESUME, now)
        stages = _stages(row)
        nxt = row.stage + 1
        if nxt >= len(stages):
            self._op(conn, row, now, "advance", "finished", "finished by an operator", {})
            return []
        created, numbers = self._activate(conn, row, nxt, now)
        detail = f"advanced to {stages[nxt].label(nxt)} by an operator"
        self._op(conn, row, now, "advance", "running", detail, numbers, stage=nxt)
        return [created]

    def _do_abort(self, conn: Connection, row: Any, now: int, _body: Any) -> list[Any]:
        moved = self._move_tasks(conn, row.id, Action.CANCEL, now)
        self._op(conn, row, now, "abort", "aborted", "aborted by an operator", {"moved": moved})
        return []

    def _do_retry_failed(self, conn: Connection, row: Any, now: int, body: Any) -> list[Any]:
        wanted = set(body.classes if isinstance(body, RetryFailed) else FailureClass)
        classes = _classes(row)
        failed = conn.execute(
            select(campaign_devices.c.dev_id, device_tasks.c.result_code)
            .join(
                device_tasks,
                and_(
                    device_tasks.c.task_id == campaign_devices.c.task_id,
                    device_tasks.c.dev_id == campaign_devices.c.dev_id,
                ),
            )
            .where(
                campaign_devices.c.campaign_id == row.id,
                device_tasks.c.state == int(TaskState.FAILED),
            )
        ).all()
        dev_ids = sorted(r.dev_id for r in failed if classify(r.result_code, classes) in wanted)
        if not dev_ids:
            raise Conflict("no failed member of the chosen classes to retry")
        busy = open_task_devices(conn, dev_ids, row.module_type)
        ready = [d for d in dev_ids if d not in busy]
        created = self._new_task(conn, row, ready, now)
        if created is not None:
            if row.state == "paused":  # a retry in a paused campaign waits for the resume
                apply_bulk(conn, Action.PAUSE, device_tasks.c.task_id == created.task.id, now)
                conn.execute(
                    update(tasks).where(tasks.c.id == created.task.id).values(status="paused")
                )
            for chunk in chunks(ready):
                conn.execute(
                    update(campaign_devices)
                    .where(
                        campaign_devices.c.campaign_id == row.id,
                        campaign_devices.c.dev_id.in_(chunk),
                    )
                    .values(task_id=created.task.id)
                )
            changes.publish(conn, ready, now)
        numbers = {"retried": len(ready), "skipped_busy": len(busy)}
        detail = f"{len(ready)} failed device(s) retried by an operator"
        self._op(conn, row, now, "retry_failed", row.state, detail, numbers)
        return [created] if row.state == "running" else []

    def _do_add_devices(self, conn: Connection, row: Any, now: int, body: Any) -> list[Any]:
        assert isinstance(body, DevicesAdd)
        wanted = list(dict.fromkeys(body.dev_ids))
        found: set[int] = set()
        for chunk in chunks(wanted):
            found.update(
                conn.execute(
                    select(devices.c.dev_id).where(
                        devices.c.pid == row.pid, devices.c.dev_id.in_(chunk)
                    )
                ).scalars()
            )
        missing = [d for d in wanted if d not in found]
        if missing:
            raise Invalid(f"devices not found in product {row.pid}: {missing[:_SAMPLE]}")
        selector = _selector(row)
        before = self._matching(conn, row.pid, row.module_type, selector)
        selector.added = sorted(set(selector.added) | set(wanted))
        conn.execute(
            update(campaigns)
            .where(campaigns.c.id == row.id)
            .values(selector=selector.model_dump_json())
        )
        row = self._row(conn, row.id)  # the version is unchanged: the CAS below still holds
        after = self._matching(conn, row.pid, row.module_type, selector)
        created: CreatedTask | None = None
        numbers: dict[str, Any] = {"added": len(after) - len(before)}
        if row.state == "running":
            created, activation = self._activate(conn, row, row.stage, now)
            numbers |= activation
        else:
            conn.execute(
                update(campaigns).where(campaigns.c.id == row.id).values(population=len(after))
            )
        detail = f"{numbers['added']} device(s) added by an operator"
        self._op(conn, row, now, "add_devices", row.state, detail, numbers)
        return [created]

    # ---------------------------------------------------------------- automatic decisions

    def _decision(self, conn: Connection, row: Any, now: int) -> Decision:
        stages = _stages(row)
        counts = self._stage_counts(conn, row, row.stage).get(row.stage, StageCounts())
        stage = stages[row.stage]
        started = row.stage_started_at or now
        return decide(
            stage,
            counts,
            index=row.stage,
            last=row.stage == len(stages) - 1,
            soaked=now - started >= stage.soak_s,
        )

    def evaluate(self, campaign_id: int) -> Applied | None:
        """Evaluate one running campaign and apply what is due (:meth:`look`); None when there
        was nothing to do."""
        return self.look(campaign_id).applied

    def look(self, campaign_id: int, *, rejoin: bool = True) -> Look:
        """Look at one running campaign and apply what is due: the engine's decision, the
        activation of a stage an advance moved to, the rate's next batch, and (``rejoin``, for a
        dynamic campaign) the devices that came to match its selector.

        The look itself is a read (on SQLite it takes no write lock, so looking at many
        campaigns holds no writer off); a write transaction follows only when something is due,
        and checks everything again under the campaign's lock.

        An advance is committed on its own, then the new stage is activated in a second
        transaction (at once, or at the next look if that one failed): the decision never
        waits for the insert of a stage's device tasks, and no decision is made on a stage
        before its members are activated."""
        now = self._now()
        with self.engine.connect() as conn:
            row = self._row(conn, campaign_id)
            if row.state != "running":
                return Look(None, None)
            needed, due = self._inspect(conn, row, now, rejoin=rejoin)
        if not needed:
            return Look(None, due)
        applied = self._apply(campaign_id, now, rejoin=rejoin)
        with self.engine.connect() as conn:
            row = self._row(conn, campaign_id)
            if row.state != "running":
                return Look(applied, None)
            _, due = self._inspect(conn, row, self._now(), rejoin=False)
        return Look(applied, due)

    def _inspect(
        self, conn: Connection, row: Any, now: int, *, rejoin: bool
    ) -> tuple[bool, float | None]:
        """Whether a look at the running campaign ``row`` has something to apply, and when it
        will next have (:class:`Look`'s ``due``) if nothing changes meanwhile."""
        dues: list[float] = []
        if row.deadline is not None:
            if now >= row.deadline:
                return True, None
            dues.append(float(row.deadline))
        if row.activated_stage < row.stage:
            return True, None
        stage = _stages(row)[row.stage]
        started = row.stage_started_at or now
        if now - started < stage.soak_s:
            dues.append(float(started + stage.soak_s))
        if self._decision(conn, row, now).kind is not DecisionKind.NONE:
            return True, None
        pending = conn.execute(
            select(func.count()).where(
                campaign_devices.c.campaign_id == row.id, campaign_devices.c.pending
            )
        ).scalar_one()
        if pending:
            rate = _rate(row)
            since = (row.dispatch_since_ms or 0) / 1000
            elapsed = self._clock() - since
            if rate is None or dispatch_quota(rate, elapsed, row.dispatched):
                return True, None
            dues.append(since + elapsed + next_dispatch_in(rate, elapsed, row.dispatched))
        if rejoin and row.dynamic and self._choose(conn, row, row.stage)[0]:
            return True, None
        return False, min(dues) if dues else None

    def _apply(self, campaign_id: int, now: int, *, rejoin: bool) -> Applied | None:
        created: list[Any] = []
        changed = False
        try:
            with self.engine.begin() as conn:
                row = self._row(conn, campaign_id, lock=True)
                if row.state != "running":
                    return None
                if row.activated_stage >= row.stage:
                    made = self._evaluate(conn, row, now)
                    if made is not None:
                        created += made
                        changed = True
                row = self._row(conn, campaign_id)
        except (StaleCampaign, IntegrityError):
            return None
        if row.state == "running":
            try:
                with self.engine.begin() as conn:
                    row = self._row(conn, campaign_id, lock=True)
                    if row.state == "running":
                        new_stage = row.activated_stage < row.stage
                        if new_stage or (rejoin and row.dynamic):
                            # A new stage, or a dynamic campaign's newcomers (a top-up of the
                            # current stage), then the rate's batch.
                            task, numbers = self._activate(conn, row, row.stage, now)
                        else:
                            task, numbers = self._dispatch(conn, row.id, now)
                        created.append(task)
                        changed = (
                            changed
                            or new_stage
                            or any(
                                numbers.get(key, 0)
                                for key in ("chosen", "activated", "skipped_busy")
                            )
                        )
                    row = self._row(conn, campaign_id)
            except (StaleCampaign, IntegrityError):
                pass  # another evaluator did it, or the next look will
        if not changed:
            return None
        self._changed()
        return Applied(self._model(row), [c for c in created if c is not None])

    def _evaluate(self, conn: Connection, row: Any, now: int) -> list[Any] | None:
        if row.deadline is not None and now >= row.deadline:
            expire_deadlines(conn, now)
            record_transition(
                conn,
                row,
                actor="auto",
                action="finish",
                to_state="finished",
                detail="finished: the deadline passed",
                numbers={"deadline": row.deadline},
                now=now,
            )
            return []
        decision = self._decision(conn, row, now)
        if decision.kind is DecisionKind.NONE:
            return None
        created: list[Any] = []
        stage: int | None = None
        to_state = {
            DecisionKind.ADVANCE: "running",
            DecisionKind.FINISH: "finished",
            DecisionKind.PAUSE: "paused",
            DecisionKind.ABORT: "aborted",
        }[decision.kind]
        numbers = dict(decision.numbers)
        if decision.kind is DecisionKind.PAUSE:
            self._move_tasks(conn, row.id, Action.PAUSE, now)
        elif decision.kind is DecisionKind.ABORT:
            self._move_tasks(conn, row.id, Action.CANCEL, now)
        elif decision.kind is DecisionKind.ADVANCE:
            stage = row.stage + 1  # activated in the next transaction (see evaluate)
        record_transition(
            conn,
            row,
            actor="auto",
            action=decision.kind.value,
            to_state=to_state,
            detail=decision.reason,
            numbers=numbers,
            now=now,
            stage=stage,
        )
        return created

    def running(self) -> list[int]:
        """The ids of running campaigns."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(campaigns.c.id)
                    .where(campaigns.c.state == "running")
                    .order_by(campaigns.c.id)
                ).scalars()
            )

    def evaluate_all(self) -> list[Applied]:
        """Evaluate every running campaign once."""
        applied = []
        for campaign_id in self.running():
            result = self.evaluate(campaign_id)
            if result is not None:
                applied.append(result)
        return applied

    def running_dynamic(self) -> list[int]:
        """The ids of running dynamic campaigns."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(campaigns.c.id).where(
                        campaigns.c.state == "running", campaigns.c.dynamic.is_(True)
                    )
                ).scalars()
            )

    def concerned(self, dev_ids: Iterable[int]) -> set[int]:
        """The running campaigns that have one of ``dev_ids`` as a member."""
        found: set[int] = set()
        running = campaigns.c.state == "running"
        with self.engine.connect() as conn:
            for chunk in chunks(sorted(dev_ids)):
                found.update(
                    conn.execute(
                        select(campaign_devices.c.campaign_id)
                        .join(campaigns, campaigns.c.id == campaign_devices.c.campaign_id)
                        .where(campaign_devices.c.dev_id.in_(chunk), running)
                        .distinct()
                    ).scalars()
                )
        return found

    # ---------------------------------------------------------------- the lease

    def hold_lease(self, holder: str, ttl: float) -> bool:
        """Take or renew the evaluator's lease for ``ttl`` seconds; True while ``holder`` has
        it. One compare-and-set: the row changes only when it is free, expired or ours."""
        now_ms = int(self._clock() * 1000)
        with self.engine.begin() as conn:
            done = conn.execute(
                update(leases)
                .where(
                    leases.c.name == LEASE_NAME,
                    (leases.c.holder == holder) | (leases.c.expires_at < now_ms),
                )
                .values(holder=holder, expires_at=now_ms + int(ttl * 1000))
            )
            return done.rowcount == 1

    def release_lease(self, holder: str) -> None:
        """Give the lease up (at shutdown), so another process takes over at once."""
        with self.engine.begin() as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == LEASE_NAME, leases.c.holder == holder)
                .values(expires_at=0)
            )

    def delete_draft(self, campaign_id: int) -> None:
        """Delete a campaign that never started (a draft) or has ended with no open task."""
        with self.engine.begin() as conn:
            row = self._row(conn, campaign_id, lock=True)
            if row.state not in ({"draft"} | TERMINAL_CAMPAIGN_STATES):
                raise Conflict(f"campaign {campaign_id} is {row.state}; abort it first")
            conn.execute(delete(campaign_events).where(campaign_events.c.campaign_id == row.id))
            conn.execute(delete(campaign_devices).where(campaign_devices.c.campaign_id == row.id))
            conn.execute(delete(campaigns).where(campaigns.c.id == row.id))


def _reader(engine: Engine) -> changes.Reader:
    """A :data:`.changes.Reader` over ``engine``'s pool (read transactions: no write lock on
    SQLite, db.py)."""

    def compile_(statement: Any) -> Callable[..., list[Any]]:
        def run(**params: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(statement, params))

        return run

    return compile_


class CampaignEvaluator:
    """Looks at running campaigns when something that can change what they should do happens,
    while this process holds the lease (module doc). ``on_created`` receives every task a stage
    activation or a batch made (the task push); it is called on the event loop.

    What wakes it: an operator action in this process (:meth:`wake`, at once); the change feed
    (:mod:`.changes`, read every ``feed_interval`` seconds by the lease holder only), whose
    devices name the campaigns they are members of, and any device change names every dynamic
    campaign; the time a look said a campaign is next due (a soak's end, the rate's next slot,
    a deadline); and a full sweep every ``sweep_interval`` seconds for what the feed cannot
    show (rows changed by hand in SQL). The lease is renewed every ``lease_ttl / 3`` seconds.
    """

    def __init__(
        self,
        service: CampaignService,
        *,
        lease_ttl: float = 3.0,
        feed_interval: float = 0.05,
        sweep_interval: float = 5.0,
        rejoin_interval: float = 1.0,
        sweep_slice: float = 0.05,
        on_created: Callable[[CreatedTask], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.lease_ttl = lease_ttl
        self.feed_interval = feed_interval
        self.sweep_interval = sweep_interval
        self.rejoin_interval = rejoin_interval
        self.sweep_slice = sweep_slice
        self.holder = secrets.token_hex(8)
        self._on_created = on_created
        self._monotonic = monotonic
        self._feed: changes.ChangeFeed | None = None
        self._holding = False
        self._next_lease = 0.0
        self._next_sweep = 0.0
        self._due: dict[int, float] = {}  # campaign -> Unix seconds it is next due
        self._rejoin_wanted: set[int] = set()  # dynamic campaigns a device change may concern
        self._last_rejoin: dict[int, float] = {}
        self._sweeping: collections.deque[int] = collections.deque()  # the sweep still to do
        self._woken: set[int | None] = set()  # None: every campaign
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        service.on_action(self.wake)

    def wake(self, campaign_id: int | None = None) -> None:
        """Look at ``campaign_id`` (None: every running campaign) as soon as possible; callable
        from any thread."""
        with self._lock:
            self._woken.add(campaign_id)
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)

    def tick(self) -> list[Applied]:
        """One round, blocking (the loop runs it in a thread): renew or take the lease when it is
        time, read the change feed, and look at every campaign something concerns."""
        mono = self._monotonic()
        if mono >= self._next_lease:
            held = self.service.hold_lease(self.holder, self.lease_ttl)
            self._next_lease = mono + self.lease_ttl / 3
            if held and not self._holding:  # taken over: start from what is there now
                self._feed = changes.ChangeFeed(
                    self.service.engine,
                    _reader(self.service.engine),
                    origin=0,  # this process's own reports wake it too
                    interval=self.feed_interval,
                )
                self._feed.start()
                self._next_sweep = mono
            self._holding = held
        with self._lock:
            woken, self._woken = self._woken, set()
        if not self._holding:
            self._due.clear()
            self._sweeping.clear()
            return []
        sweep = mono >= self._next_sweep or None in woken
        ids = {w for w in woken if w is not None}
        feed = self._feed
        if feed is not None and feed.due():
            try:
                found = feed.read()
            except Exception:
                log.warning("cannot read the change feed; looking at every campaign", exc_info=True)
                feed.start()
                found = changes.EVERYTHING
            if found.everything:
                sweep = True
            elif found.dev_ids:
                ids |= self.service.concerned(found.dev_ids)
                dynamic = self.service.running_dynamic()
                self._rejoin_wanted.update(dynamic)
                ids.update(dynamic)
        now = self.service.clock()
        ids.update(c for c, at in self._due.items() if at <= now)
        if sweep:
            running = self.service.running()
            self._due = {c: at for c, at in self._due.items() if c in running}
            self._rejoin_wanted.update(running)
            self._next_sweep = mono + self.sweep_interval
            known = set(self._sweeping)
            self._sweeping.extend(c for c in running if c not in known)
        # What something named first, then the sweep in slices of ``sweep_slice`` seconds: a
        # sweep over many campaigns never holds back a look that a report or a timer asked for.
        order = sorted(ids)
        if self._sweeping:
            self._sweeping = collections.deque(c for c in self._sweeping if c not in ids)
        applied = self._looks(order, mono, now)
        started = self._monotonic()
        while self._sweeping and self._monotonic() - started < self.sweep_slice:
            applied += self._looks([self._sweeping.popleft()], mono, now)
        return applied

    def _looks(self, order: list[int], mono: float, now: float) -> list[Applied]:
        applied = []
        for campaign_id in order:
            rejoin = False
            if campaign_id in self._rejoin_wanted:
                last = self._last_rejoin.get(campaign_id)
                if last is None or mono - last >= self.rejoin_interval:
                    rejoin = True
                    self._rejoin_wanted.discard(campaign_id)
                    self._last_rejoin[campaign_id] = mono
            look = self.service.look(campaign_id, rejoin=rejoin)
            due = look.due
            if campaign_id in self._rejoin_wanted:  # held back: at the end of its interval
                later = now + self.rejoin_interval
                due = later if due is None else min(due, later)
            if due is None:
                self._due.pop(campaign_id, None)
            else:
                self._due[campaign_id] = due
            if look.applied is not None:
                applied.append(look.applied)
        return applied

    def _timeout(self) -> float:
        """Seconds until the next thing the evaluator must do unasked."""
        mono = self._monotonic()
        waits = [self._next_lease - mono]
        if self._holding:
            if self._sweeping:
                return 0.0
            waits.append(self.feed_interval)
            waits.append(self._next_sweep - mono)
            if self._due:
                waits.append(min(self._due.values()) - self.service.clock())
        return max(0.0, min(waits))

    async def run_forever(self) -> None:
        """Look whenever something wakes it (class doc) until cancelled; gives the lease up on
        the way out."""
        self._loop = asyncio.get_running_loop()
        self._event = event = asyncio.Event()
        try:
            while True:
                event.clear()  # before the round: a wake during it starts the next one at once
                try:
                    applied = await asyncio.to_thread(self.tick)
                    for result in applied:
                        for created in result.created:
                            self._notify(created)
                except OperationalError as exc:
                    # The database is busy (a long write elsewhere held SQLite's lock past the
                    # busy timeout) or unreachable: nothing was applied, the next round retries.
                    # The lease counts as lost until renewed, so that a round never acts on a
                    # lease it may no longer hold.
                    self._holding = False
                    self._next_lease = self._monotonic() + 1.0
                    log.warning("campaign evaluation: database busy or unavailable (%s)", exc.orig)
                except Exception:
                    log.exception("campaign evaluation failed; retrying at the next round")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(self._timeout(), 0.001))
        finally:
            self._loop = None
            try:
                await asyncio.to_thread(self.service.release_lease, self.holder)
            except Exception:
                log.warning("could not release the campaign lease", exc_info=True)

    def _notify(self, created: CreatedTask) -> None:
        if self._on_created is None:
            return
        try:
            self._on_created(created)
        except Exception:  # the push is advisory (D24)
            log.exception("task push scheduling failed for task %d", created.task.id)

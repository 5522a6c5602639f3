"""The end of a fleet run: :class:`FleetReport`, and the check that the server agrees.

Agreement. Each device's outcome implies where the server must have its device task:

=================================  =========================================================
device outcome                     server state
=================================  =========================================================
succeeded                          succeeded, with result code 201 if the device's 201 was
                                   acknowledged
finished (errno 20)                succeeded or failed
cancelled (errno 22)               cancelled
failed, code reported              failed, with that result code
failed, nothing reported           (not checked: the report may not have arrived)
deferred                           still open (to-be-upgraded, downloading, upgrading, paused)
no task                            (not checked)
=================================  =========================================================

A status report the server acknowledged but does not show is **lost**; a status code the server
acknowledged twice for one device (errno 0 both times) is **duplicated**. Both must be zero.

The rules are the same in every dialect and for every client profile: one task is shared by all
dialects (S10, F14), and the server keeps one state machine (§5.5). The agreement also counts
the devices that disagree per dialect and per profile, so that a mixed fleet shows where.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from onenet_ota.device.upgrader import Outcome
from onenet_ota.protocol.states import OPEN_STATES, TaskState
from onenet_ota.protocol.status import StatusCode
from onenet_ota.sim.config import FleetConfig
from onenet_ota.sim.fleet import DeviceRecord, FleetState, Phase
from onenet_ota.sim.metrics import FleetMetrics
from onenet_ota.sim.provision import DeviceView, FleetTarget

__all__ = ["Agreement", "FleetReport", "check_agreement", "retry_summary"]

_MAX_LISTED: Final = 10


def _name(state: TaskState) -> str:
    return state.name.lower()


def _expected(record: DeviceRecord) -> frozenset[TaskState] | None:
    """The server states ``record``'s outcome allows, or None when it says nothing."""
    result = record.result
    if result is None:
        return None
    if result.outcome is Outcome.SUCCEEDED:
        return frozenset({TaskState.SUCCEEDED})
    if result.outcome is Outcome.FINISHED:
        return frozenset({TaskState.SUCCEEDED, TaskState.FAILED})
    if result.outcome is Outcome.CANCELLED:
        return frozenset({TaskState.CANCELLED})
    if result.outcome is Outcome.FAILED and result.code is not None:
        return frozenset({TaskState.FAILED})
    if result.outcome is Outcome.DEFERRED:
        return OPEN_STATES
    return None


@dataclass(slots=True)
class Agreement:
    """How the server's view of the simulated devices compares with what they saw."""

    server_counts: dict[str, int]
    device_counts: dict[str, int]
    checked: int = 0
    mismatches: int = 0
    lost_reports: int = 0
    duplicated_reports: int = 0
    missing: int = 0
    examples: list[str] = field(default_factory=list)
    disagreeing: dict[str, Counter[str]] = field(
        default_factory=lambda: {"dialect": Counter(), "profile": Counter()}
    )

    @property
    def problems(self) -> int:
        """Mismatches, lost and duplicated reports, and missing devices, together."""
        return self.mismatches + self.lost_reports + self.duplicated_reports + self.missing

    @property
    def ok(self) -> bool:
        """No mismatch, no lost or duplicated report, no device missing from the task."""
        return not self.problems

    def _note(self, text: str) -> None:
        if len(self.examples) < _MAX_LISTED:
            self.examples.append(text)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "ok": self.ok,
            "server_counts": self.server_counts,
            "device_counts": self.device_counts,
            "checked": self.checked,
            "mismatches": self.mismatches,
            "lost_reports": self.lost_reports,
            "duplicated_reports": self.duplicated_reports,
            "missing": self.missing,
            "examples": self.examples,
            "disagreeing": {k: dict(sorted(v.items())) for k, v in self.disagreeing.items()},
        }


def check_agreement(state: FleetState, views: dict[int, DeviceView]) -> Agreement:
    """Compare every device's outcome and acknowledged reports with the server's ``views``."""
    server_counts = Counter(_name(view.state) for view in views.values())
    device_counts = Counter(record.phase.value for record in state.devices)
    agreement = Agreement(
        {_name(s): server_counts.get(_name(s), 0) for s in TaskState},
        {p.value: device_counts.get(p.value, 0) for p in Phase if p.done},
    )
    for record in state.devices:
        before = agreement.problems
        _check_device(agreement, record, views.get(record.dev_id))
        if agreement.problems > before:
            agreement.disagreeing["dialect"][record.dialect.value] += 1
            agreement.disagreeing["profile"][record.profile] += 1
    return agreement


def _check_device(agreement: Agreement, record: DeviceRecord, view: DeviceView | None) -> None:
    duplicated = sum(n - 1 for n in record.accepted.values() if n > 1)
    if duplicated:
        agreement.duplicated_reports += duplicated
        agreement._note(f"{record.dev_id}: a status report was acknowledged twice")
    if view is None:
        agreement.missing += 1
        agreement._note(f"{record.dev_id}: not in the task on the server")
        return
    allowed = _expected(record)
    if allowed is None:
        return
    agreement.checked += 1
    if view.state not in allowed:
        agreement.mismatches += 1
        agreement._note(
            f"{record.dev_id}: the device ended {record.phase.value}, "
            f"the server says {_name(view.state)}"
        )
    for code, count in record.accepted.items():
        if not count:
            continue
        terminal = code == StatusCode.UPGRADED or 102 <= code <= 107 or 202 <= code <= 208
        if terminal and view.result_code != code:
            agreement.lost_reports += 1
            agreement._note(
                f"{record.dev_id}: the server acknowledged {code}, "
                f"but shows result code {view.result_code}"
            )


@dataclass(slots=True)
class FleetReport:
    """Everything the summary shows, and its JSON form (:meth:`to_dict`)."""

    config: FleetConfig
    target: FleetTarget
    server: str
    server_workers: int | None
    state: FleetState
    agreement: Agreement | None
    task_counts: dict[str, int] | None = None
    note: str = ""

    @property
    def metrics(self) -> FleetMetrics:
        """The HTTP layer's measurements."""
        return self.state.metrics

    @property
    def outcomes(self) -> dict[str, int]:
        """Devices per final phase (only phases that occurred)."""
        counts = Counter(record.phase.value for record in self.state.devices)
        return dict(sorted(counts.items()))

    def outcomes_by(self, key: str) -> dict[str, dict[str, int]]:
        """Devices per final phase for each ``"dialect"`` or ``"profile"`` present."""
        groups: dict[str, Counter[str]] = {}
        for record in self.state.devices:
            group = record.dialect.value if key == "dialect" else record.profile
            groups.setdefault(group, Counter())[record.phase.value] += 1
        return {name: dict(sorted(counts.items())) for name, counts in sorted(groups.items())}

    @property
    def failure_codes(self) -> dict[str, int]:
        """Failed devices by the status code they reported ("none" when none got through)."""
        counts: Counter[str] = Counter()
        for record in self.state.devices:
            if record.phase is Phase.FAILED:
                code = None if record.result is None else record.result.code
                counts["none" if code is None else str(int(code))] += 1
        return dict(sorted(counts.items()))

    @property
    def install_mismatches(self) -> int:
        """Devices whose installed file differs from the package."""
        return sum(1 for record in self.state.devices if record.installed_ok is False)

    @property
    def succeeded(self) -> int:
        """Devices whose upgrade succeeded."""
        return sum(1 for record in self.state.devices if record.phase is Phase.SUCCEEDED)

    @property
    def ok(self) -> bool:
        """Every device succeeded, installed the right bytes, and the server agrees."""
        return (
            not self.state.interrupted
            and self.succeeded == len(self.state.devices)
            and self.install_mismatches == 0
            and self.agreement is not None
            and self.agreement.ok
        )

    def reasons(self, limit: int = 5) -> list[str]:
        """Why some devices did not succeed: their most common reasons, with counts."""
        counts: Counter[str] = Counter()
        for record in self.state.devices:
            if record.phase is Phase.SUCCEEDED:
                continue
            reason = record.error or (record.result.reason if record.result else "") or "-"
            counts[f"{record.phase.value}: {reason}"] += 1
        return [f"{n} x {text}" for text, n in counts.most_common(limit)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form of the whole report (latencies in milliseconds)."""
        state = self.state
        metrics = state.metrics
        elapsed = max(state.elapsed, 1e-9)
        endpoints = {
            (endpoint.label if endpoint is not None else "other"): stats.to_dict()
            for endpoint, stats in sorted(
                metrics.endpoints.items(), key=lambda item: item[0].value if item[0] else "~"
            )
        }
        overall = metrics.overall().summary()
        config = self.config
        return {
            "ok": self.ok,
            "interrupted": state.interrupted,
            "server": self.server,
            "server_workers": self.server_workers,
            "task_id": self.target.task_id,
            "devices": len(state.devices),
            "concurrency": config.concurrency,
            "chunk_size": config.chunk_size,
            "dialect": config.dialect,
            "profile": config.profile,
            "http": config.http,
            "by_dialect": self.outcomes_by("dialect"),
            "by_profile": self.outcomes_by("profile"),
            "package_size": self.target.size,
            "drop_rate": config.drop_rate,
            "power_cut_rate": config.power_cut_rate,
            "elapsed_s": round(state.elapsed, 3),
            "outcomes": self.outcomes,
            "failure_codes": self.failure_codes,
            "reasons": self.reasons(),
            "install_mismatches": self.install_mismatches,
            "requests": metrics.requests,
            "request_failures": metrics.failures,
            "requests_per_s": round(metrics.requests / elapsed, 1),
            "bytes": metrics.bytes,
            "bytes_per_s": round(metrics.bytes / elapsed, 1),
            # Devices that finished: an interrupted run's waiting devices did not.
            "devices_per_s": round(state.done / elapsed, 2),
            "latency_ms": {k: round(v * 1000, 3) for k, v in overall.items()},
            "endpoints": endpoints,
            "faults": dict(metrics.injected),
            "power_cuts": sum(r.power_cuts for r in state.devices),
            "retries": state.retries,
            "retries_by_step": dict(state.retry_steps.most_common()),
            "device_log_records_held": dict(state.device_logs),
            "restarts": state.restarts,
            "waits": state.waits,
            "task_counts": self.task_counts,
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
            "note": self.note,
        }


def retry_summary(data: dict[str, Any]) -> str:
    """The retries by step and the device log records held back, from :meth:`FleetReport.to_dict`,
    as text for a summary line ("" when there were none): what the virtual devices' retry
    warnings would have said, line by line (:class:`~onenet_ota.sim.fleet.DeviceLogPolicy`)."""
    parts = []
    steps = data.get("retries_by_step") or {}
    if steps:
        parts.append("retries by step: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    held = data.get("device_log_records_held") or {}
    if held:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(held.items()))
        parts.append(f"device SDK log records held back: {counts}")
    return "".join(f"\n{part}" for part in parts)

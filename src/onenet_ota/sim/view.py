"""What the operator sees: a live view while the fleet runs, and the summary at the end (rich).

On a terminal, :class:`LiveView` redraws one panel twice a second: devices per phase, a progress
bar, requests/s and bytes/s over the last interval, failed requests, injected faults and the
latest retry reasons. Elsewhere (a log file, CI) it prints one line every few seconds instead.
"""

from __future__ import annotations

import time
from collections import Counter
from types import TracebackType
from typing import Final

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from onenet_ota.protocol.code_texts import code_label
from onenet_ota.sim.fleet import FleetState, Phase
from onenet_ota.sim.report import FleetReport, retry_summary

__all__ = ["LiveView", "print_summary"]

_LINE_EVERY_S: Final = 5.0
_RUNNING: Final = (Phase.WAITING, Phase.CHECKING, Phase.DOWNLOADING, Phase.INSTALLING)
_ENDED: Final = (
    Phase.SUCCEEDED,
    Phase.FAILED,
    Phase.DEFERRED,
    Phase.CANCELLED,
    Phase.FINISHED,
    Phase.NO_TASK,
)
_STYLE: Final = {Phase.SUCCEEDED: "green", Phase.FAILED: "red", Phase.DEFERRED: "yellow"}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class LiveView:
    """The live view of a fleet; pass :meth:`update` as :func:`simulate`'s ``on_tick``."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self._live: Live | None = None
        self._last = (time.monotonic(), 0, 0)
        self._last_line = 0.0

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def update(self, state: FleetState) -> None:
        """Redraw (or, off a terminal, print a line now and then) from ``state``."""
        now = time.monotonic()
        metrics = state.metrics
        requests, received = metrics.requests, metrics.bytes
        then, last_requests, last_bytes = self._last
        interval = max(now - then, 1e-6)
        rate = (requests - last_requests) / interval
        throughput = (received - last_bytes) / interval
        self._last = (now, requests, received)
        if self._live is not None:
            self._live.update(self._panel(state, rate, throughput), refresh=True)
            return
        ended = state.finished_at is not None
        if ended or now - self._last_line >= _LINE_EVERY_S:
            self._last_line = now
            phases = " ".join(
                f"{p.value}={state.phases[p]}" for p in (*_RUNNING, *_ENDED) if state.phases[p]
            )
            self.console.print(
                f"[{state.elapsed:6.1f} s] {state.done}/{self.total} done  {phases}  "
                f"{requests} requests ({rate:.0f}/s)  {_bytes(throughput)}/s  "
                f"{metrics.failures} failed requests",
                highlight=False,
            )

    def _panel(self, state: FleetState, rate: float, throughput: float) -> Panel:
        metrics = state.metrics
        phases = Table.grid(padding=(0, 2))
        for _ in (*_RUNNING, *_ENDED):
            phases.add_column(justify="right")
        phases.add_row(*(Text(p.value, style=_STYLE.get(p, "bold")) for p in (*_RUNNING, *_ENDED)))
        phases.add_row(*(str(state.phases[p]) for p in (*_RUNNING, *_ENDED)))
        numbers = Table.grid(padding=(0, 3))
        numbers.add_row(
            f"requests {metrics.requests} ({rate:.0f}/s)",
            f"download {_bytes(metrics.bytes)} ({_bytes(throughput)}/s)",
            f"failed requests {metrics.failures}",
            f"retries {state.retries}",
        )
        faults = ", ".join(f"{k} {v}" for k, v in sorted(metrics.injected.items())) or "none"
        lines: list[object] = [
            ProgressBar(total=self.total, completed=state.done, width=60),
            Text(f"{state.done}/{self.total} devices done, {state.elapsed:.1f} s"),
            phases,
            numbers,
            Text(f"injected faults: {faults}", style="dim"),
        ]
        lines += [Text(f"  {e}", style="dim", overflow="ellipsis") for e in state.recent_errors]
        return Panel(Group(*lines), title="onenet-ota simulate", border_style="blue")  # type: ignore[arg-type]


def print_summary(report: FleetReport, console: Console) -> None:
    """The end-of-run summary: outcomes, endpoints with latency percentiles, server agreement."""
    data = report.to_dict()
    state = report.state
    elapsed = max(state.elapsed, 1e-9)
    workers = report.server_workers
    console.print(
        f"\n[bold]{data['devices']} devices[/bold], concurrency {data['concurrency']}, "
        f"chunk {_bytes(data['chunk_size'])}, package {_bytes(data['package_size'])}, "
        f"task {data['task_id']} on {data['server']}"
        + (f" ({workers} worker(s))" if workers else "")
        + f": {elapsed:.1f} s, {data['devices_per_s']:.1f} devices/s",
        highlight=False,
    )
    outcomes = Table(title="Devices", title_justify="left")
    outcomes.add_column("outcome")
    outcomes.add_column("devices", justify="right")
    for name, count in data["outcomes"].items():
        outcomes.add_row(Text(name, style=_STYLE.get(Phase(name), "")), str(count))
    for code, count in data["failure_codes"].items():
        # The code and its name ("105 download low battery"); the text would wrap the column.
        shown = code_label(int(code)) if code.isdigit() else code  # "none": none arrived
        outcomes.add_row(f"  failed, reported {shown}", str(count))
    console.print(outcomes)
    _print_groups(report, console)
    endpoints = Table(title="Requests (latency in ms, to the last byte)", title_justify="left")
    for column in ("endpoint", "requests", "failed", "p50", "p95", "p99", "max"):
        endpoints.add_column(column, justify="left" if column == "endpoint" else "right")
    for label, stats in data["endpoints"].items():
        latency = stats["latency_ms"]
        endpoints.add_row(
            label,
            str(stats["requests"]),
            str(stats["failures"]),
            *(f"{latency[k]:.1f}" for k in ("p50", "p95", "p99", "max")),
        )
    overall = data["latency_ms"]
    endpoints.add_row(
        Text("all", style="bold"),
        str(data["requests"]),
        str(data["request_failures"]),
        *(f"{overall[k]:.1f}" for k in ("p50", "p95", "p99", "max")),
    )
    console.print(endpoints)
    faults = ", ".join(f"{k} {v}" for k, v in sorted(data["faults"].items())) or "none"
    console.print(
        f"throughput: {data['requests_per_s']:.0f} requests/s, "
        f"{_bytes(data['bytes_per_s'])}/s downloaded ({_bytes(data['bytes'])} in all)\n"
        f"faults injected: {faults}; upgrader retries {data['retries']}, "
        f"restarts {data['restarts']}, pause waits {data['waits']}"
        f"{retry_summary(data)}",
        highlight=False,
    )
    agreement = report.agreement
    if agreement is not None:
        table = Table(title="Server vs devices", title_justify="left")
        table.add_column("state")
        table.add_column("server (these devices)", justify="right")
        table.add_column("whole task", justify="right")
        table.add_column("devices saw", justify="right")
        device_side = {
            "succeeded": agreement.device_counts.get("succeeded", 0),
            "failed": agreement.device_counts.get("failed", 0),
            "cancelled": agreement.device_counts.get("cancelled", 0),
        }
        for name, count in agreement.server_counts.items():
            whole = "" if report.task_counts is None else str(report.task_counts.get(name, 0))
            table.add_row(name, str(count), whole, str(device_side.get(name, "")))
        console.print(table)
        verdict = "[green]agree[/green]" if agreement.ok else "[red]DISAGREE[/red]"
        console.print(
            f"server and devices {verdict}: {agreement.checked} devices checked, "
            f"{agreement.mismatches} mismatches, {agreement.lost_reports} lost and "
            f"{agreement.duplicated_reports} duplicated reports, {agreement.missing} missing"
        )
        for example in agreement.examples:
            console.print(f"  {example}", highlight=False)
    if report.install_mismatches:
        console.print(
            f"[red]{report.install_mismatches} devices installed bytes that differ from the "
            "package[/red]"
        )
    if report.note:
        console.print(f"[yellow]{report.note}[/yellow]")
    reasons = report.reasons()
    if reasons:
        console.print("not succeeded:")
        for reason in reasons:
            console.print(f"  {reason}", highlight=False)


def _print_groups(report: FleetReport, console: Console) -> None:
    """Outcomes per dialect and per client profile, with the devices the server disagrees on."""
    disagreeing: dict[str, Counter[str]] = (
        report.agreement.disagreeing if report.agreement is not None else {}
    )
    table = Table(title="By dialect and client profile", title_justify="left")
    for column in ("dialect / profile", "devices", "succeeded", "other outcomes", "disagree"):
        table.add_column(column, justify="left" if column == "dialect / profile" else "right")
    for key in ("dialect", "profile"):
        for name, outcomes in report.outcomes_by(key).items():
            others = ", ".join(f"{k} {v}" for k, v in outcomes.items() if k != "succeeded")
            table.add_row(
                f"{key} {name}",
                str(sum(outcomes.values())),
                str(outcomes.get("succeeded", 0)),
                others or "-",
                str(disagreeing.get(key, Counter())[name]),
            )
    console.print(table)

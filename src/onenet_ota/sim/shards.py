"""A fleet shared out to several client processes (``FleetConfig.processes``).

One Python process drives a few hundred requests per second through the real client stack
(httpx2, the upgrader, the state files); a server on a bigger machine can take more. With
``processes`` above 1, :func:`run_sharded` starts that many processes (multiprocessing, spawn: a
script that calls :func:`~onenet_ota.sim.simulate` with ``processes > 1`` needs the usual
``if __name__ == "__main__":`` guard). Each runs a :class:`~onenet_ota.sim.fleet.Fleet` over
every *n*-th device with its share of the concurrency, on the same start time, so ramp-up and
per-device seeds are the same as in one process. Twice a second each sends a snapshot (phase
counts, metrics) through a pipe, and at the end its device records; the parent merges them into
one :class:`~onenet_ota.sim.fleet.FleetState` for the live view and the report.

Interrupts: cancelling the parent sends SIGTERM to every child, which cancels its devices and
still sends what it had; children also die with the parent (``PR_SET_PDEATHSIG``). The state
directories live in one directory the parent makes and removes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.to_thread

from onenet_ota.sim.config import FleetConfig, SimulationError
from onenet_ota.sim.fleet import Fleet, FleetState, Phase, Shard, make_state_root
from onenet_ota.sim.metrics import FleetMetrics
from onenet_ota.sim.provision import FleetTarget
from onenet_ota.sim.server import die_with_parent

__all__ = ["Snapshot", "run_sharded"]

_STOP_WAIT_S: Final = 30.0


@dataclass(slots=True)
class Snapshot:
    """What a shard reports while it runs (everything but the device records)."""

    phases: Counter[Phase]
    metrics: FleetMetrics
    retries: int = 0
    waits: int = 0
    restarts: int = 0
    recent_errors: list[str] = field(default_factory=list)
    retry_steps: Counter[str] = field(default_factory=Counter)
    device_logs: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, state: FleetState) -> Snapshot:
        """The snapshot of ``state``."""
        return cls(
            Counter(state.phases),
            state.metrics,
            state.retries,
            state.waits,
            state.restarts,
            list(state.recent_errors),
            Counter(state.retry_steps),
            Counter(state.device_logs),
        )


def _shard_main(
    conn: multiprocessing.connection.Connection,
    config: FleetConfig,
    target: FleetTarget,
    base_url: str,
    shard: Shard,
) -> None:
    """A child process: run the shard, report snapshots, then the final state."""
    die_with_parent()
    fleet = Fleet(config, target, base_url, shard=shard)
    try:
        fleet.run_until_stopped(lambda state: conn.send(("tick", Snapshot.of(state))))
        conn.send(("done", fleet.state))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _plan(fleet: Fleet, processes: int, started_at: float, root: Any) -> list[Shard]:
    count = len(fleet.target.dev_ids)
    concurrency = fleet.config.concurrency
    shards = []
    for number in range(processes):
        share = concurrency // processes + (1 if number < concurrency % processes else 0)
        indices = tuple(range(number, count, processes))
        shards.append(Shard(number, indices, max(1, share), started_at, root))
    return shards


def _merge(fleet: Fleet, shards: list[Shard], snapshots: dict[int, Snapshot]) -> None:
    state = fleet.state
    metrics = FleetMetrics()
    # A process that has not reported yet has all its devices still waiting.
    phases: Counter[Phase] = Counter(
        {Phase.WAITING: sum(len(s.indices) for s in shards if s.number not in snapshots)}
    )
    retries = waits = restarts = 0
    retry_steps: Counter[str] = Counter()
    device_logs: Counter[str] = Counter()
    errors: list[str] = []
    for snapshot in snapshots.values():
        metrics.merge(snapshot.metrics)
        phases.update(snapshot.phases)
        retries += snapshot.retries
        retry_steps.update(snapshot.retry_steps)
        device_logs.update(snapshot.device_logs)
        waits += snapshot.waits
        restarts += snapshot.restarts
        errors += snapshot.recent_errors
    state.metrics = metrics
    state.phases = phases
    state.retries, state.waits, state.restarts = retries, waits, restarts
    state.retry_steps, state.device_logs = retry_steps, device_logs
    state.recent_errors.clear()
    state.recent_errors.extend(errors[-(state.recent_errors.maxlen or 5) :])


async def run_sharded(
    fleet: Fleet, on_tick: Callable[[FleetState], None] | None, tick: float
) -> FleetState:
    """Run ``fleet`` in ``fleet.config.processes`` processes; see the module documentation."""
    state = fleet.state
    processes = min(fleet.config.processes, len(state.devices))
    root = make_state_root(fleet.config)
    state.started_at = time.monotonic()
    shards = _plan(fleet, processes, state.started_at, root)
    context = multiprocessing.get_context("spawn")
    children: list[multiprocessing.process.BaseProcess] = []
    pending: dict[Any, Shard] = {}
    snapshots: dict[int, Snapshot] = {}
    failure = ""

    def receive(conn: multiprocessing.connection.Connection) -> None:
        nonlocal failure
        shard = pending[conn]
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            kind, payload = "error", "the process ended without a result"
        if kind == "tick":
            snapshots[shard.number] = payload
            return
        del pending[conn]
        if kind == "done":
            final: FleetState = payload
            for index, record in zip(shard.indices, final.devices, strict=True):
                state.devices[index] = record
            snapshots[shard.number] = Snapshot.of(final)
            state.interrupted = state.interrupted or final.interrupted
        else:
            failure = failure or f"fleet process {shard.number} failed: {payload}"

    try:
        for shard in shards:
            ours, theirs = context.Pipe(duplex=False)
            child = context.Process(
                target=_shard_main,
                args=(theirs, fleet.config, fleet.target, fleet.base_url, shard),
                name=f"onenet-ota-sim-{shard.number}",
                daemon=True,
            )
            child.start()
            theirs.close()
            children.append(child)
            pending[ours] = shard
        try:
            while pending and not failure:
                ready = await anyio.to_thread.run_sync(
                    multiprocessing.connection.wait, list(pending), tick
                )
                for conn in ready:
                    receive(conn)  # type: ignore[arg-type]
                _merge(fleet, shards, snapshots)
                if on_tick is not None:
                    on_tick(state)
        except BaseException:
            state.interrupted = True
            for running in children:
                if running.is_alive():
                    running.terminate()  # the child cancels its devices and reports
            deadline = time.monotonic() + _STOP_WAIT_S
            while pending and time.monotonic() < deadline:
                for conn in multiprocessing.connection.wait(list(pending), 1.0):
                    receive(conn)  # type: ignore[arg-type]
            raise
        if failure:
            raise SimulationError(failure)
    finally:
        for conn in list(pending):
            conn.close()
        for ended in children:
            ended.join(10)
            if ended.is_alive():
                ended.kill()
                ended.join(5)
        shutil.rmtree(root, ignore_errors=True)
        _merge(fleet, shards, snapshots)
        state.phases = Counter(record.phase for record in state.devices)
        state.finished_at = time.monotonic()
        if on_tick is not None:
            on_tick(state)
    return state

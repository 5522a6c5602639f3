"""One complete rehearsal: :func:`simulate`.

1. Server: the one at ``server`` (with its admin token), or a throwaway :class:`LocalServer`
   started for this run (SQLite in a temporary directory, or ``db``).
2. Setup through ``/api/v1``: :func:`~onenet_ota.sim.provision.provision` (product, devices,
   package, task) or :func:`~onenet_ota.sim.provision.adopt` (``config.task_id``).
3. The fleet (:class:`~onenet_ota.sim.fleet.Fleet`) in an event loop of its own. SIGINT and SIGTERM
   stop it: the devices are cancelled, and the run ends as *interrupted*.
4. The server's view of every simulated device, checked against what the devices saw
   (:func:`~onenet_ota.sim.report.check_agreement`).

Whatever happens, including an interrupt, the local server is stopped and every temporary
directory removed before :func:`simulate` returns or raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from onenet_ota.management import ManagementClient, ManagementError
from onenet_ota.sim.config import FleetConfig, SimulationError
from onenet_ota.sim.fleet import Fleet, FleetState
from onenet_ota.sim.provision import adopt, provision, server_states, task_counts
from onenet_ota.sim.report import FleetReport, check_agreement
from onenet_ota.sim.server import LocalServer, LocalServerError

__all__ = ["simulate"]

log = logging.getLogger(__name__)

Tick = Callable[[FleetState], None]
Notice = Callable[[str], None]


def simulate(
    config: FleetConfig,
    *,
    server: str | None = None,
    admin_token: str | None = None,
    db: str | None = None,
    server_workers: int = 1,
    on_tick: Tick | None = None,
    notice: Notice | None = None,
) -> FleetReport:
    """Run a fleet rehearsal; see the module documentation. Raises :class:`SimulationError`.

    ``server`` is the platform's base URL (``http://host:port``), with ``admin_token`` for its
    management API; None starts a local server (``db``, ``server_workers``). ``on_tick`` receives
    the live :class:`FleetState` twice a second; ``notice`` receives progress lines of the setup.
    """
    say = notice or (lambda _text: None)
    local: LocalServer | None = None
    admin: ManagementClient | None = None
    try:
        if server is None:
            say(f"starting a local server ({db or 'SQLite'}, {server_workers} worker(s)) ...")
            try:
                local = LocalServer(db=db, workers=server_workers).start()
            except LocalServerError as exc:
                raise SimulationError(str(exc)) from None
            base_url, token = local.url, local.admin_token
        else:
            if not server.startswith(("http://", "https://")):
                raise SimulationError(
                    f"--server must be an http:// or https:// URL, not {server!r}"
                )
            if not admin_token:
                raise SimulationError(
                    "--admin-token (or ONENET_OTA_ADMIN_TOKEN) is needed to set up the fleet"
                )
            base_url, token = server.rstrip("/"), admin_token
        admin = ManagementClient(base_url, token)
        try:
            admin.health()
        except ManagementError as exc:
            raise SimulationError(f"the server at {base_url} does not answer: {exc}") from None
        if config.task_id is None:
            say(f"creating a product, {config.devices} devices, a package and a task ...")
            target = provision(admin, config)
        else:
            say(f"using task {config.task_id} ...")
            target = adopt(admin, config)
        say(f"task {target.task_id}: {len(target.dev_ids)} devices upgrade to {target.target}")
        note = config.state_note()
        if note is not None:
            log.warning("%s", note)
            say(note)
        fleet = Fleet(config, target, base_url)
        state = fleet.run_until_stopped(on_tick)
        agreement = counts = None
        note = ""
        if not state.interrupted:
            say("reading the server's view of the devices ...")
            views = server_states(admin, target.task_id, set(target.dev_ids))
            agreement = check_agreement(state, views)
            counts = task_counts(admin, target.task_id)
        else:
            note = "interrupted: the server's view was not checked"
        workers = local.workers if local is not None else None
        return FleetReport(
            config, target, base_url, workers, state, agreement, task_counts=counts, note=note
        )
    finally:
        if admin is not None:
            admin.close()
        if local is not None:
            say("stopping the local server ...")
            local.stop()

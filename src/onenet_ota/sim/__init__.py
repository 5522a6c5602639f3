"""Fleet rehearsals: many virtual devices upgrading at once against one server.

::

    from onenet_ota.sim import FleetConfig, simulate

    report = simulate(FleetConfig(devices=1000, concurrency=64, drop_rate=0.05,
                                  power_cut_rate=0.02))
    assert report.ok, report.reasons()

Each virtual device runs the real :class:`~onenet_ota.device.upgrader.AsyncUpgrader` over HTTP
(:mod:`onenet_ota.sim.fleet`), through a shared, metered, fault-injecting connection pool
(:mod:`onenet_ota.sim.transport`). :func:`simulate` sets the fleet up through the management API
(:mod:`onenet_ota.sim.provision`), optionally on a throwaway server of its own
(:mod:`onenet_ota.sim.server`), and ends with a :class:`FleetReport` whose agreement check
compares every device's outcome with the server's records (:mod:`onenet_ota.sim.report`).
``onenet-ota simulate`` is the command line over it, with a live view (:mod:`onenet_ota.sim.view`).
"""

from onenet_ota.sim.config import FleetConfig, SimulationError, ValueRange, parse_range
from onenet_ota.sim.fleet import DeviceRecord, Fleet, FleetState, Phase
from onenet_ota.sim.metrics import EndpointStats, FleetMetrics, Histogram
from onenet_ota.sim.provision import FleetTarget
from onenet_ota.sim.report import Agreement, FleetReport, check_agreement
from onenet_ota.sim.runner import simulate
from onenet_ota.sim.server import LocalServer, LocalServerError
from onenet_ota.sim.transport import FleetTransport, PowerCut

__all__ = [
    "Agreement",
    "DeviceRecord",
    "EndpointStats",
    "Fleet",
    "FleetConfig",
    "FleetMetrics",
    "FleetReport",
    "FleetState",
    "FleetTarget",
    "FleetTransport",
    "Histogram",
    "LocalServer",
    "LocalServerError",
    "Phase",
    "PowerCut",
    "SimulationError",
    "ValueRange",
    "check_agreement",
    "parse_range",
    "simulate",
]

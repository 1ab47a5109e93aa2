"""The serving simulator: replicas under a cluster driver, routers, latency models, catalogs.

``simulate(trace, SimulationConfig(...)) -> SimulationResult`` (tables, summary, configuration)
runs one replica; ``simulate_cluster(trace, ClusterConfig(...))`` runs many behind a router;
``SimulationResult.write(directory)``.
"""

from econoserve.sim.catalog import (
    GPUS,
    MODELS,
    Deployment,
    GPUSpec,
    ModelSpec,
    get_gpu,
    get_model,
)
from econoserve.sim.cluster import ClusterConfig, simulate, simulate_cluster
from econoserve.sim.engine import (
    WALL_CLOCK_COLUMNS,
    WALL_CLOCK_SUMMARY_KEYS,
    SimulationConfig,
    SimulationError,
    SimulationResult,
    build_setup,
)
from econoserve.sim.routers import ROUTERS, Router, make_router, register_router, router_names
from econoserve.sim.latency import (
    FittedLatencyModel,
    RooflineLatencyModel,
    RooflineParams,
)

__all__ = [
    "ClusterConfig",
    "ROUTERS",
    "Router",
    "make_router",
    "register_router",
    "router_names",
    "simulate_cluster",
    "Deployment",
    "FittedLatencyModel",
    "GPUS",
    "GPUSpec",
    "MODELS",
    "ModelSpec",
    "RooflineLatencyModel",
    "RooflineParams",
    "SimulationConfig",
    "SimulationError",
    "SimulationResult",
    "WALL_CLOCK_COLUMNS",
    "WALL_CLOCK_SUMMARY_KEYS",
    "build_setup",
    "get_gpu",
    "get_model",
    "simulate",
]

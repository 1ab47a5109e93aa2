"""The serving simulator: event loop, latency models, hardware/model catalogs.

``simulate(trace, SimulationConfig(...)) -> SimulationResult`` (tables, summary, configuration);
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
from econoserve.sim.engine import (
    WALL_CLOCK_COLUMNS,
    WALL_CLOCK_SUMMARY_KEYS,
    SimulationConfig,
    SimulationError,
    SimulationResult,
    build_setup,
    simulate,
)
from econoserve.sim.latency import (
    FittedLatencyModel,
    RooflineLatencyModel,
    RooflineParams,
)

__all__ = [
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

"""A simulated engine's configuration and set-up, and a run's result.

:class:`SimulationConfig` describes one replica (policy, deployment, latency model, knobs);
:func:`build_setup` turns it into a deployment, a latency model and the engine limits;
:class:`SimulationResult` holds a run's tables, summary and configuration. The step loop lives in
:mod:`econoserve.sim.replica`, the event loop over replicas in :mod:`econoserve.sim.cluster`
(``simulate`` of one replica is the one-replica cluster).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.results import read_iterations, read_requests, write_run
from econoserve.policy import DEFAULT_SLO_SCALE, EngineLimits, make_config
from econoserve.sim.catalog import GIB, Deployment, get_gpu, get_model
from econoserve.sim.latency import (
    LatencyModel,
    make_latency_model,
    policy_time_estimates,
    saturating_token_budget,
)

PREDICTION_SOURCES: tuple[str, ...] = ("trace", "oracle", "none")
#: Replica roles: an ordinary engine, or one side of prefill/decode disaggregation.
ROLES: tuple[str, ...] = ("colocated", "prefill", "decode")


class SimulationError(RuntimeError):
    """The simulation cannot proceed (a policy bug: no progress is possible)."""


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulation besides the trace. Units in brackets.

    scheduler:
        Policy name (``vllm``, ``vllm-chunked``, ``orca``, ``sarathi``, ``fastgen``).
    policy_config:
        Overrides of the policy's configuration fields (see each policy's config class).
    model, gpu, tensor_parallel:
        Catalog names and the tensor-parallel degree [GPUs].
    gpu_memory_utilization:
        Fraction of GPU memory the engine uses (vLLM's default 0.9).
    activation_reserve_gib_per_gpu:
        Memory held back for activations per GPU [GiB].
    block_size:
        Tokens per KV block [tokens].
    num_kv_blocks:
        Override of the KV capacity [blocks]; ``None`` = computed from the deployment.
    max_model_len:
        Override of the context length [tokens]; ``None`` = the model's.
    latency_model:
        A name (``roofline``, ``calibrated``, ``distserve``, ``distserve-vllm``, ``vidur``: see
        :func:`~econoserve.sim.latency.make_latency_model`) or a path to a fitted model (JSON) or
        a measured step table (CSV/parquet/JSON-lines) to fit.
    roofline:
        Overrides of :class:`~econoserve.sim.latency.RooflineParams` fields (``roofline`` and
        ``calibrated`` only).
    slo_scale:
        A request's SLO: JCT <= ``slo_scale`` x its isolated execution time.
    seed:
        Recorded for provenance; the simulator itself draws no random numbers.
    predictions:
        What policies see as predicted length: ``trace`` (the trace's
        ``predicted_output_tokens`` column if present, else none), ``oracle`` (the true
        length), ``none``.
    reference_token_budget:
        Tokens per step that count as a fully used GPU, for GPU token utilization [tokens];
        ``None`` = the latency model's saturating token budget.
    saturation_fraction:
        The saturating token budget is the smallest step size [tokens] whose prompt throughput
        reaches this fraction of the latency model's peak, i.e. past which throughput rises by
        less than ``1 - saturation_fraction`` (default 5 %). Policies with a derived token
        budget (EconoServe) use it; so does GPU token utilization.
    skip_ahead:
        Advance steady decode-only stretches in bulk (see the module docstring).
    max_skip_steps:
        Most steps advanced in one bulk move [steps].
    check_invariants:
        After every step, check the KV accounting and the clock (slow; for tests and debugging).
    max_tokens_per_step, max_seqs_per_step:
        The executor's hard caps [tokens, sequences] per step (a simulated copy of a real
        engine's ``max_num_batched_tokens`` / ``max_num_seqs``); every policy takes the smaller of
        its own knob and the cap. ``None`` = no cap.
    saturating_token_budget:
        Override of the saturating token budget [tokens] the engine limits report (policies with a
        derived budget use it, as inside vLLM, where it is the engine's step budget); ``None`` = from
        the latency model. The reference budget for GPU token utilization stays that of the
        latency model.
    prefill_time_per_token_s, decode_time_per_step_s, decode_time_per_context_token_s:
        Overrides of the time estimates the engine limits give policies [s/token, s/step, s/token]
        (:class:`~econoserve.policy.base.EngineLimits`; EconoServe's Ordering keys and SLO slack
        read them); ``None`` = from the latency model. A simulated copy of a policy served
        inside vLLM uses the estimates the drop-in had (:func:`econoserve.serving.fidelity.simulation_config`),
        which has no latency model.
    role:
        ``colocated`` (an ordinary engine: prompts and decoding), or, for prefill/decode
        disaggregation (:mod:`econoserve.sim.disaggregation`), ``prefill`` (prompts only; a
        request leaves after its first token and its KV is handed to a decode replica) or
        ``decode`` (receives requests whose KV was transferred, and decodes them).
    node:
        The node the replica's GPUs sit on; a KV transfer within a node goes over NVLink, between
        nodes over the cluster's network (:class:`~econoserve.sim.cluster.ClusterConfig`).
    """

    scheduler: str = "vllm"
    policy_config: Mapping[str, object] = field(default_factory=dict)
    model: str = "opt-13b"
    gpu: str = "a100-80gb"
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    activation_reserve_gib_per_gpu: float = 2.0
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    latency_model: str = "roofline"
    roofline: Mapping[str, float] = field(default_factory=dict)
    slo_scale: float = DEFAULT_SLO_SCALE
    seed: int = 0
    predictions: str = "trace"
    reference_token_budget: int | None = None
    saturation_fraction: float = 0.95
    skip_ahead: bool = True
    max_skip_steps: int = 4096
    check_invariants: bool = False
    max_tokens_per_step: int | None = None
    max_seqs_per_step: int | None = None
    saturating_token_budget: int | None = None
    prefill_time_per_token_s: float | None = None
    decode_time_per_step_s: float | None = None
    decode_time_per_context_token_s: float | None = None
    role: str = "colocated"
    node: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"unknown replica role {self.role!r}; choose one of {', '.join(ROLES)}")
        if self.node < 0:
            raise UserError(f"node must be >= 0, got {self.node}")
        if self.slo_scale <= 0:
            raise UserError(f"--slo-scale must be > 0, got {self.slo_scale}")
        if self.predictions not in PREDICTION_SOURCES:
            raise UserError(f"unknown predictions source {self.predictions!r}; choose one of {', '.join(PREDICTION_SOURCES)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise UserError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise UserError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.reference_token_budget is not None and self.reference_token_budget <= 0:
            raise UserError(f"reference_token_budget must be > 0, got {self.reference_token_budget}")
        if not 0 < self.saturation_fraction <= 1:
            raise UserError(f"saturation_fraction must be in (0, 1], got {self.saturation_fraction}")
        if self.max_skip_steps < 1:
            raise UserError(f"max_skip_steps must be >= 1, got {self.max_skip_steps}")
        if self.activation_reserve_gib_per_gpu < 0:
            raise UserError("activation reserve must be >= 0")
        for name in ("max_tokens_per_step", "max_seqs_per_step", "saturating_token_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be > 0, got {value}")
        for name in ("prefill_time_per_token_s", "decode_time_per_step_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name} must be > 0, got {value}")
        if self.decode_time_per_context_token_s is not None and self.decode_time_per_context_token_s < 0:
            raise UserError(f"decode_time_per_context_token_s must be >= 0, got {self.decode_time_per_context_token_s}")

    def deployment(self) -> Deployment:
        return Deployment(
            get_model(self.model),
            get_gpu(self.gpu),
            tensor_parallel=self.tensor_parallel,
            gpu_memory_utilization=self.gpu_memory_utilization,
            activation_reserve_bytes_per_gpu=int(self.activation_reserve_gib_per_gpu * GIB),
            block_size=self.block_size,
        )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["policy_config"] = dict(self.policy_config)
        data["roofline"] = dict(self.roofline)
        return data


@dataclass
class SimulationResult:
    """A run's tables, summary and full configuration."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict[str, object]
    config: dict[str, object]

    def write(self, directory: str | Path) -> Path:
        """Write ``requests.parquet``, ``iterations.parquet``, ``summary.json``, ``config.json``
        (the format of :mod:`econoserve.results`)."""
        return write_run(directory, self.requests, self.iterations, self.summary, self.config)

    @classmethod
    def read(cls, directory: str | Path) -> "SimulationResult":
        directory = Path(directory)
        return cls(read_requests(directory), read_iterations(directory),
                   json.loads((directory / "summary.json").read_text()),
                   json.loads((directory / "config.json").read_text()))


# --------------------------------------------------------------------- set-up
def build_setup(config: SimulationConfig) -> tuple[Deployment, LatencyModel, EngineLimits]:
    """The deployment, latency model and engine limits a configuration describes."""
    deployment = config.deployment()
    latency: LatencyModel = make_latency_model(config.latency_model, deployment, config.roofline)
    num_blocks = config.num_kv_blocks if config.num_kv_blocks is not None else deployment.num_kv_blocks
    max_model_len = config.max_model_len or deployment.model.max_context_tokens
    budget = saturating_token_budget(latency, fraction=config.saturation_fraction)
    estimates = policy_time_estimates(latency, budget)
    limits = EngineLimits(
        num_kv_blocks=num_blocks,
        block_size=config.block_size,
        max_model_len=max_model_len,
        saturating_token_budget=config.saturating_token_budget or budget,
        prefill_time_per_token_s=config.prefill_time_per_token_s or estimates["prefill_time_per_token_s"],
        decode_time_per_step_s=config.decode_time_per_step_s or estimates["decode_time_per_step_s"],
        decode_time_per_context_token_s=(estimates["decode_time_per_context_token_s"]
                                         if config.decode_time_per_context_token_s is None
                                         else config.decode_time_per_context_token_s),
        max_tokens_per_step=config.max_tokens_per_step,
        max_seqs_per_step=config.max_seqs_per_step,
    )
    return deployment, latency, limits


def reference_token_budget(config: SimulationConfig, latency: LatencyModel, limits: EngineLimits) -> int:
    """Tokens per step that count as a fully used GPU [tokens] (GPU token utilization): the
    configured one, else the latency model's saturating budget."""
    if config.reference_token_budget is not None:
        return config.reference_token_budget
    if config.saturating_token_budget is not None:
        return saturating_token_budget(latency, fraction=config.saturation_fraction)
    return limits.saturating_token_budget


def policy_overrides(config: SimulationConfig) -> dict[str, object]:
    """The policy's configuration overrides; a policy that orders by SLO (it has a ``slo_scale``
    field) gets the simulation's ``slo_scale`` unless it is overridden explicitly."""
    overrides = dict(config.policy_config)
    defaults = make_config(config.scheduler)
    if dataclasses.is_dataclass(defaults) and any(f.name == "slo_scale" for f in dataclasses.fields(defaults)):
        overrides.setdefault("slo_scale", config.slo_scale)
    return overrides


#: Columns that hold wall-clock measurements (excluded from determinism comparisons).
WALL_CLOCK_COLUMNS: tuple[str, ...] = ("scheduler_wall_time_s",)
WALL_CLOCK_SUMMARY_KEYS: tuple[str, ...] = (
    "scheduler_time_s",
    "scheduler_time_per_iteration_s",
    "scheduler_time_per_request_s",
    "scheduler_share_of_iteration_time",
)

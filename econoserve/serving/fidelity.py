"""Is the simulator faithful to the real engine? Simulate a served trace and compare per request.

The real side is a run directory written by ``econoserve serve`` (vLLM on this machine); the
simulated side replays the same trace through the same policy with:

* the engine's limits: KV capacity ``kv_cache_tokens // block_size - 1`` blocks (vLLM keeps one
  null block), its block size, ``max_model_len``, and ``max_num_batched_tokens`` /
  ``max_num_seqs`` as the hard caps of every policy (and the saturating budget, as the vLLM
  adapter sets it);
* the policy's time estimates and saturating budget as the vLLM drop-in has them
  (:func:`drop_in_estimates`): ``EngineLimits``' defaults unless the run gave the drop-in a
  latency model of the engine (``econoserve.latency_model``) or ``econoserve.limits``; without
  them the simulated policy must not get the simulation's latency model's estimates either (they
  feed EconoServe's Ordering keys and caps);
* a latency model fitted to step times measured on that engine
  (``econoserve profile-engine``; :class:`~econoserve.sim.latency.FittedLatencyModel`).

vLLM's own v1 scheduler is simulated by ``vllm-chunked`` (chunked prefill under the same token
budget), ``econoserve`` by the same policy class the vLLM adapter runs. Errors are per request,
relative to the real value: ``|simulated - real| / real`` for JCT and TTFT, summarised by their
median and 90th percentile.

A run whose drop-in refined predictions (``refined_predictor``) is simulated on
:func:`trace_with_served_refinements`: the trace with the refined values the engine computed
(from its decision log), so the simulated policy gets the same refinements at the same ``k``.

No vLLM import here: the comparison reads run directories, so it runs in the main environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.policy import EngineLimits, with_engine_max_num_seqs
from econoserve.results import FINISHED, finished, slo_columns
from econoserve.serving.decisions import ArrivalRecord, DecisionRecord, LogHeader, RefineRecord
from econoserve.serving.replay import trace_request_id
from econoserve.sim.engine import SimulationConfig
from econoserve.sim.latency import FittedLatencyModel, LatencyModel, isolated_execution_times_s, policy_time_estimates
from econoserve.workload.trace import Trace

#: Real scheduler name (``econoserve serve --scheduler``) -> simulated policy.
SIMULATED_POLICY: dict[str, str] = {"vllm": "vllm-chunked", "econoserve": "econoserve"}


@dataclass(frozen=True)
class EngineShape:
    """The parts of an engine's configuration that the simulator must copy (tokens, requests)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    kv_cache_tokens: int

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "EngineShape":
        """From a served run's ``config.json`` (its ``engine`` section)."""
        engine = config.get("engine", config)
        try:
            return cls(
                max_num_seqs=int(engine["max_num_seqs"]),
                max_num_batched_tokens=int(engine["max_num_batched_tokens"]),
                max_model_len=int(engine["max_model_len"]),
                block_size=int(engine["block_size"]),
                kv_cache_tokens=int(engine["kv_cache_tokens"]),
            )
        except (KeyError, TypeError) as error:
            raise UserError(f"run configuration lacks the engine field {error}; was it written by econoserve serve?") from None

    @property
    def num_kv_blocks(self) -> int:
        """Blocks a request can use: vLLM reserves one null block [blocks]."""
        return self.kv_cache_tokens // self.block_size - 1


#: EngineLimits fields the drop-in takes from its ``econoserve.latency_model`` and ``econoserve.limits``
#: sections (the rest come from the engine); the simulation copies them.
DROP_IN_ESTIMATES: tuple[str, ...] = ("saturating_token_budget", "prefill_time_per_token_s", "decode_time_per_step_s",
                                      "decode_time_per_context_token_s")


def served_limits(config: Mapping[str, Any]) -> dict[str, Any]:
    """The estimates a served run gave the drop-in beyond ``EngineLimits``' defaults (from its
    ``config.json``): those its ``econoserve.latency_model`` implies, each overridden by its
    ``econoserve.limits``; empty when it gave neither."""
    engine = config.get("engine", config)
    options = engine.get("extra_options") or {}
    limits = dict(options.get("limits") or {})
    if options.get("latency_model") is None:
        return limits
    return drop_in_estimates(int(engine["max_num_batched_tokens"]), limits, options["latency_model"])


def drop_in_estimates(token_budget: int, limits: Mapping[str, Any] | None = None,
                      latency_model: str | None = None) -> dict[str, Any]:
    """The saturating token budget [tokens] and time estimates [s/token, s/step, s/token] the vLLM drop-in
    (:meth:`econoserve.serving.scheduler.PolicySchedulerCore.engine_limits`) gives its policy on an
    engine whose step budget is ``token_budget`` (``max_num_batched_tokens``): ``EngineLimits``'
    default estimates or, given the engine's ``latency_model`` (a fitted model's ``.json`` or a
    measured step table, ``econoserve.latency_model``), the simulator's estimates from it
    (:func:`~econoserve.sim.latency.policy_time_estimates`) at the budget; each overridden by
    ``limits`` (``econoserve.limits``)."""
    overrides = dict(limits or {})
    for name in overrides:
        if name not in DROP_IN_ESTIMATES:
            raise UserError(f"econoserve.limits.{name}: the simulation copies only {', '.join(DROP_IN_ESTIMATES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(EngineLimits)}
    values = {name: defaults[name] for name in DROP_IN_ESTIMATES}
    values["saturating_token_budget"] = token_budget
    if latency_model is not None:
        budget = int(overrides.get("saturating_token_budget", token_budget))
        values.update(policy_time_estimates(FittedLatencyModel.load(latency_model), budget))
    return {**values, **overrides}


def simulation_config(shape: EngineShape, scheduler: str, latency_model: str,
                      limits: Mapping[str, Any] | None = None, **overrides: Any) -> SimulationConfig:
    """The simulation of ``scheduler`` (a real scheduler name or a policy name) on that engine,
    its policy given the drop-in's estimates (:func:`drop_in_estimates`; ``limits`` = the served
    run's ``econoserve.limits``, :func:`served_limits`) and, as in the drop-in, the engine's
    ``max_num_seqs`` unless ``overrides``' ``policy_config`` sets one
    (:func:`~econoserve.policy.with_engine_max_num_seqs`)."""
    name = SIMULATED_POLICY.get(scheduler, scheduler)
    overrides["policy_config"] = with_engine_max_num_seqs(name, overrides.get("policy_config"), shape.max_num_seqs)
    values = dict(
        scheduler=name,
        max_tokens_per_step=shape.max_num_batched_tokens,
        max_seqs_per_step=shape.max_num_seqs,
        block_size=shape.block_size,
        num_kv_blocks=shape.num_kv_blocks,
        max_model_len=shape.max_model_len,
        latency_model=latency_model,
        **drop_in_estimates(shape.max_num_batched_tokens, limits),
    )
    return SimulationConfig(**{**values, **overrides})


def trace_with_served_refinements(trace: Trace, records: Iterable[DecisionRecord]) -> Trace:
    """``trace`` with the refinement columns the drop-in's decision log implies (``records`` of a
    served run of ``trace``): ``refine_after_tokens`` = the engine's ``k`` and
    ``refined_output_tokens`` = the value the engine refined each request to (``k + 1`` for the
    requests it did not refine, which the simulator never refines either: they end within ``k``
    tokens). Unchanged when the run did not refine."""
    records = list(records)
    header = records[0] if records else None
    if not isinstance(header, LogHeader) or header.refine_after_tokens is None:
        return trace
    k = header.refine_after_tokens
    rows = {r.policy_request_id: trace_request_id(r.engine_request_id) for r in records if isinstance(r, ArrivalRecord)}
    refined = {rows[r.policy_request_id]: r.predicted_output_tokens for r in records if isinstance(r, RefineRecord)}
    values = [refined.get(int(request_id), k + 1) for request_id in trace.requests["request_id"]]
    return trace.with_refinements(np.array(values, dtype=np.int64), k)


#: Gaps between real steps [s] above this are idle time (waiting for an arrival), not a step's cost.
MAX_STEP_GAP_S = 0.005


def wall_step_table(iterations: pd.DataFrame) -> pd.DataFrame:
    """A real run's step log with ``duration_s`` extended by the gap to the next step's start
    (engine work outside ``schedule()``..``update_from_output()``: input preparation, output
    processing), gaps over :data:`MAX_STEP_GAP_S` left out: the step time a simulation of that
    run should charge."""
    start = iterations["start_time_s"].to_numpy(float)
    duration = iterations["duration_s"].to_numpy(float)
    gap = np.append(start[1:] - (start[:-1] + duration[:-1]), 0.0)
    return iterations.assign(duration_s=duration + np.where((gap > 0) & (gap < MAX_STEP_GAP_S), gap, 0.0))


def with_slo(requests: pd.DataFrame, latency: LatencyModel, slo_scale: float) -> pd.DataFrame:
    """A real run's requests table with the SLO columns a simulation fills (NaN / False in a
    served run, :mod:`econoserve.serving.results`), by the simulator's definition: the isolated
    time by ``latency`` (the engine's profile, fitted) for the request's prompt and true output
    length [s], the deadline ``arrival + slo_scale`` x it [s], met when the request finished by
    then. The same function of the same columns as a simulated run's, so real and simulated
    attainment compare like for like."""
    if not slo_scale > 0:
        raise UserError(f"slo_scale must be > 0, got {slo_scale}")
    isolated = isolated_execution_times_s(latency, requests["prompt_tokens"].to_numpy(np.int64),
                                          requests["output_tokens"].to_numpy(np.int64))
    return requests.assign(**slo_columns(requests["arrival_time_s"].to_numpy(float),
                                         requests["finish_time_s"].to_numpy(float),
                                         (requests["status"] == FINISHED).to_numpy(), isolated, slo_scale))


def request_errors(real: pd.DataFrame, simulated: pd.DataFrame) -> pd.DataFrame:
    """Per request: real and simulated JCT and TTFT [s] and their relative errors, from two
    requests tables in the one results format (:mod:`econoserve.results`).

    Only requests that completed in both runs are compared; the others are counted by
    :func:`error_summary` through ``compared``.
    """
    merged = finished(real)[["request_id", "jct_s", "ttft_s"]].merge(
        finished(simulated)[["request_id", "jct_s", "ttft_s"]], on="request_id", suffixes=("_real", "_sim"))
    for metric in ("jct", "ttft"):
        real_values = merged[f"{metric}_s_real"].to_numpy(float)
        merged[f"{metric}_error"] = np.abs(merged[f"{metric}_s_sim"].to_numpy(float) - real_values) / np.maximum(real_values, 1e-9)
    return merged


def error_summary(errors: pd.DataFrame, num_requests: int | None = None) -> dict[str, float]:
    """Median and p90 relative JCT and TTFT error, and how many requests were compared."""
    summary: dict[str, float] = {"compared": float(len(errors))}
    if num_requests is not None:
        summary["num_requests"] = float(num_requests)
    for metric in ("jct", "ttft"):
        values = errors[f"{metric}_error"].to_numpy(float)
        summary[f"median_{metric}_error"] = float(np.median(values)) if values.size else float("nan")
        summary[f"p90_{metric}_error"] = float(np.percentile(values, 90)) if values.size else float("nan")
        summary[f"mean_{metric}_real_s"] = float(errors[f"{metric}_s_real"].mean()) if values.size else float("nan")
        summary[f"mean_{metric}_sim_s"] = float(errors[f"{metric}_s_sim"].mean()) if values.size else float("nan")
    return summary

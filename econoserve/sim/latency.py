"""Iteration (step) time of a batch, from a roofline or from a fit to measured steps.

A batch is described by four numbers, as :class:`~econoserve.policy.SchedulerDecision` has them:

``prefill_tokens``   prompt (or recomputed) tokens computed [tokens]
``decode_tokens``    decode tokens computed, one per decoding request [tokens]
``context_tokens``   KV tokens attention reads, per request cached + new, summed [tokens]
``attention_pairs``  causal query-key pairs, per request ``new x (cached + (new + 1) / 2)``

Both models take scalars (the simulator's per-step call) or numpy arrays (vectorised: isolated
execution times, skipped steps) and give the same value either way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.results import STEP_FEATURE_COLUMNS
from econoserve.sim.catalog import Deployment

FEATURES: tuple[str, ...] = ("prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs")


class LatencyModel(Protocol):
    """Anything that maps a batch to its step time [s]."""

    def iteration_time_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        """Step time [s]; arguments are scalars or equal-length numpy arrays."""

    def describe(self) -> dict[str, object]:
        """Name and parameters, for the run's configuration file."""


@dataclass(frozen=True)
class RooflineParams:
    """Efficiency factors of the roofline [fractions of peak] and fixed costs [s].

    compute_efficiency:
        Achieved fraction of peak FLOP/s in the dense (linear-layer) GEMMs; 0.6-0.7 is what
        large-GEMM MFU reaches on A100/H100 in vLLM-class engines.
    attention_compute_efficiency:
        Achieved fraction of peak FLOP/s in prefill attention (FlashAttention reaches ~50%).
    memory_efficiency:
        Achieved fraction of HBM bandwidth when streaming weights and KV (~80%).
    interconnect_efficiency:
        Achieved fraction of NVLink bandwidth in tensor-parallel all-reduces.
    allreduce_latency_s:
        Fixed cost of one all-reduce [s].
    step_overhead_s:
        Fixed cost of a step outside the kernels: scheduling, input preparation, sampling,
        kernel launches [s].
    overlap_exponent:
        How the compute time ``c`` and memory time ``m`` of the linear layers (and of attention)
        combine: ``(c**k + m**k) ** (1 / k)``. ``inf`` (default) is the classic roofline,
        ``max(c, m)`` (perfect overlap); ``1`` is no overlap, ``c + m``. Measured A100 steps lie
        in between (k of 1.2-1.7, see :mod:`econoserve.sim.calibration`): a small prefill
        already costs more than the weight read alone.
    """

    compute_efficiency: float = 0.65
    attention_compute_efficiency: float = 0.5
    memory_efficiency: float = 0.8
    interconnect_efficiency: float = 0.7
    allreduce_latency_s: float = 10e-6
    step_overhead_s: float = 3e-3
    overlap_exponent: float = math.inf

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "attention_compute_efficiency", "memory_efficiency", "interconnect_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise UserError(f"roofline {name} must be in (0, 1], got {value}")
        if self.allreduce_latency_s < 0 or self.step_overhead_s < 0:
            raise UserError("roofline fixed costs must be >= 0")
        if not self.overlap_exponent >= 1:
            raise UserError(f"roofline overlap_exponent must be >= 1 (inf = max), got {self.overlap_exponent}")


class RooflineLatencyModel:
    """Step time = overhead + linear layers + attention + tensor-parallel all-reduces.

    * linear layers: ``max(2 x layer parameters x tokens / compute, weight bytes / bandwidth)``,
      per GPU (parameters and weights split over the TP group);
    * attention: ``max(4 x layers x hidden x pairs / attention compute, KV bytes read / bandwidth)``;
    * all-reduce: 2 per layer of ``tokens x hidden x 2`` bytes, ring algorithm over NVLink.

    The ``max`` of compute and memory time is the overlap combination of
    :attr:`RooflineParams.overlap_exponent` (``max`` itself by default). ``provenance`` says
    where the parameters come from (recorded by :meth:`describe`).
    """

    def __init__(self, deployment: Deployment, params: RooflineParams | None = None, provenance: str = "defaults") -> None:
        self.deployment = deployment
        self.params = params or RooflineParams()
        self.provenance = provenance
        model, gpu, tp, p = deployment.model, deployment.gpu, deployment.tensor_parallel, self.params
        compute = gpu.peak_bf16_flops * tp
        bandwidth = gpu.hbm_bandwidth_bytes_per_s * tp * p.memory_efficiency
        self._linear_s_per_token = 2.0 * model.num_layer_parameters / (compute * p.compute_efficiency)
        self._weights_s = model.weight_bytes / bandwidth
        self._attention_s_per_pair = (
            4.0 * model.num_layers * model.num_heads * model.head_dim / (compute * p.attention_compute_efficiency)
        )
        self._kv_s_per_token = model.kv_bytes_per_token / bandwidth
        if tp > 1:
            link = gpu.interconnect_bandwidth_bytes_per_s * p.interconnect_efficiency
            per_token = 2.0 * (tp - 1) / tp * model.hidden_size * model.bytes_per_element / link
            self._allreduce_s_per_token = 2 * model.num_layers * per_token
            self._allreduce_fixed_s = 2 * model.num_layers * p.allreduce_latency_s
        else:
            self._allreduce_s_per_token = 0.0
            self._allreduce_fixed_s = 0.0
        self._overhead_s = p.step_overhead_s + self._allreduce_fixed_s
        self._k = p.overlap_exponent
        self._k_is_max = math.isinf(self._k)

    def _combine(self, compute_s, memory_s):
        """``max`` (k = inf) or the k-norm of the two times."""
        if isinstance(compute_s, np.ndarray) or isinstance(memory_s, np.ndarray):
            if self._k_is_max:
                return np.maximum(compute_s, memory_s)
            return (np.asarray(compute_s) ** self._k + np.asarray(memory_s) ** self._k) ** (1.0 / self._k)
        if self._k_is_max:
            return max(compute_s, memory_s)
        return (compute_s**self._k + memory_s**self._k) ** (1.0 / self._k)

    def iteration_time_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        tokens = prefill_tokens + decode_tokens
        linear = self._combine(tokens * self._linear_s_per_token, self._weights_s)
        attention = self._combine(attention_pairs * self._attention_s_per_pair, context_tokens * self._kv_s_per_token)
        return self._overhead_s + linear + attention + tokens * self._allreduce_s_per_token

    def describe(self) -> dict[str, object]:
        params = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self.params).items()}
        return {"kind": "roofline", "params": params, "provenance": self.provenance}


@dataclass
class FittedLatencyModel:
    """Step time = ``intercept_s + sum(coefficient x feature)``, non-negative coefficients fitted
    by least squares to measured steps (a real engine's iteration log, or a profile).

    ``coefficients`` maps each name in :data:`FEATURES` to seconds per unit; a feature absent
    from the measurements gets 0.
    """

    intercept_s: float
    coefficients: dict[str, float]
    fit_stats: dict[str, float] = field(default_factory=dict)
    source: str = ""

    def iteration_time_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        c = self.coefficients
        return (
            self.intercept_s
            + prefill_tokens * c.get("prefill_tokens", 0.0)
            + decode_tokens * c.get("decode_tokens", 0.0)
            + context_tokens * c.get("context_tokens", 0.0)
            + attention_pairs * c.get("attention_pairs", 0.0)
        )

    def describe(self) -> dict[str, object]:
        return {"kind": "fitted", **asdict(self)}

    # ------------------------------------------------------------------ fitting and files
    @classmethod
    def fit(cls, steps: pd.DataFrame, source: str = "<table>", outlier_threshold: float = 5.0,
            max_rounds: int = 5) -> "FittedLatencyModel":
        """Fit to a table with a ``duration_s`` (or ``step_time_s``) column and any of
        :data:`FEATURES` (or their columns in a run's ``iterations.parquet``,
        :data:`econoserve.results.STEP_FEATURE_COLUMNS`).

        Least squares on *relative* error (each step weighted by 1 / its duration, so 2 ms and
        50 ms steps count alike), non-negative coefficients. Steps measured on a shared machine
        carry outliers (another process took the cores): after each fit, steps whose relative
        residual exceeds ``outlier_threshold`` x the median absolute relative residual are
        dropped and the model refitted, up to ``max_rounds`` times; how many were dropped is in
        ``fit_stats``.
        """
        from scipy.optimize import nnls

        frame = _normalise_columns(steps)
        if "duration_s" not in frame and "step_time_s" in frame:
            frame = frame.rename(columns={"step_time_s": "duration_s"})
        if "duration_s" not in frame:
            raise UserError(f"{source}: step table needs a duration_s column")
        present = [f for f in FEATURES if f in frame]
        if not present:
            raise UserError(f"{source}: step table has none of the features {', '.join(FEATURES)}")
        frame = frame[present + ["duration_s"]].dropna()
        frame = frame[frame["duration_s"] > 0]
        if len(frame) < len(present) + 1:
            raise UserError(f"{source}: {len(frame)} steps are too few to fit {len(present) + 1} coefficients")
        x = frame[present].to_numpy(dtype=float)
        y = frame["duration_s"].to_numpy(dtype=float)
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)  # condition the problem
        design = np.column_stack([np.ones(len(x)), x / scale])
        keep = np.ones(len(y), dtype=bool)
        for _ in range(max_rounds):
            solution, _ = nnls(design[keep] / y[keep, None], np.ones(int(keep.sum())))
            relative = np.abs(design @ solution - y) / y
            threshold = outlier_threshold * max(float(np.median(relative[keep])), 1e-3)
            new_keep = relative <= threshold
            if new_keep.sum() < len(present) + 1 or np.array_equal(new_keep, keep):
                break
            keep = new_keep
        residual = (y - design @ solution)[keep]
        kept = y[keep]
        stats = {
            "num_steps": float(len(y)),
            "num_outliers_dropped": float(len(y) - keep.sum()),
            "mean_abs_error_s": float(np.mean(np.abs(residual))),
            "mean_abs_pct_error": float(np.mean(np.abs(residual) / kept) * 100),
            "median_abs_pct_error": float(np.median(np.abs(residual) / kept) * 100),
            "r2": float(1 - np.sum(residual**2) / max(np.sum((kept - kept.mean()) ** 2), 1e-30)),
        }
        coefficients = {name: float(solution[i + 1] / scale[i]) for i, name in enumerate(present)}
        return cls(float(solution[0]), coefficients, stats, source)

    @classmethod
    def load(cls, path: str | Path) -> "FittedLatencyModel":
        """A fitted model from a JSON file written by :meth:`save`, or fitted to a CSV/parquet
        step table."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such latency table")
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(path.read_text())
                return cls(float(data["intercept_s"]), {k: float(v) for k, v in data["coefficients"].items()},
                           dict(data.get("fit_stats", {})), str(data.get("source", path)))
            if suffix == ".csv":
                return cls.fit(pd.read_csv(path), source=str(path))
            if suffix in (".parquet", ".pq"):
                return cls.fit(pd.read_parquet(path), source=str(path))
            if suffix in (".jsonl", ".ndjson"):
                frame = pd.read_json(path, lines=True)
                if "kind" in frame:
                    frame = frame[frame["kind"] == "iteration"]
                return cls.fit(frame, source=str(path))
        except (KeyError, ValueError, TypeError, OSError) as error:
            raise UserError(f"{path}: cannot read a latency table ({type(error).__name__}: {error})") from None
        raise UserError(f"{path}: latency table must be .json, .csv, .parquet or .jsonl")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path


def _normalise_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A results ``iterations`` table's feature columns under the feature names."""
    renames = {column: feature for feature, column in STEP_FEATURE_COLUMNS.items() if column in frame and feature not in frame}
    return frame.rename(columns=renames)


def isolated_execution_times_s(
    model: LatencyModel, prompt_tokens: np.ndarray, output_tokens: np.ndarray, chunk_elements: int = 2_000_000
) -> np.ndarray:
    """Each request's time alone on the hardware [s]: its whole prompt in one step, then one
    decode step per further output token (context growing by one each step)."""
    prompt = np.asarray(prompt_tokens, dtype=np.int64)
    output = np.asarray(output_tokens, dtype=np.int64)
    p = prompt.astype(float)
    total = np.asarray(model.iteration_time_s(p, np.zeros_like(p), p, p * (p + 1) * 0.5), dtype=float)
    decode_steps = output - 1
    start = 0
    n = len(prompt)
    while start < n:
        stop = start
        elements = 0
        while stop < n and (elements == 0 or elements + decode_steps[stop] <= chunk_elements):
            elements += decode_steps[stop]
            stop += 1
        steps = decode_steps[start:stop]
        if steps.sum() > 0:
            owner = np.repeat(np.arange(start, stop), steps)
            offsets = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
            context = (prompt[owner] + offsets + 1).astype(float)
            times = model.iteration_time_s(np.zeros_like(context), np.ones_like(context), context, context)
            total[start:stop] += np.bincount(owner - start, weights=times, minlength=stop - start)
        start = stop
    return total


def saturating_token_budget(model: LatencyModel, fraction: float = 0.95, prompt_tokens: int = 512,
                            max_tokens: int = 16384) -> int:
    """Smallest batch token count whose prefill throughput [tokens/s] reaches ``fraction`` of the
    best over batch sizes up to ``max_tokens`` (batches of ``prompt_tokens``-token prompts)."""
    sizes = np.unique(np.linspace(16, max_tokens, 1024).astype(np.int64)).astype(float)
    pairs = sizes * ((prompt_tokens + 1) * 0.5)
    times = model.iteration_time_s(sizes, np.zeros_like(sizes), sizes, pairs)
    throughput = sizes / times
    return int(sizes[np.argmax(throughput >= fraction * throughput.max())])


def typical_step_times_s(model: LatencyModel, token_budget: int, prompt_tokens: int = 512,
                         context_tokens: int = 512) -> tuple[float, float]:
    """Times [s] of a prompt-only step of ``token_budget`` tokens (``prompt_tokens``-token
    prompts) and of a one-request decode step at ``context_tokens`` of context: the estimates
    policies use for remaining time (:class:`~econoserve.policy.base.EngineLimits`)."""
    budget = float(token_budget)
    prefill = model.iteration_time_s(np.array([budget]), np.zeros(1), np.array([budget]),
                                     np.array([budget * (prompt_tokens + 1) * 0.5]))
    context = np.array([float(context_tokens)])
    decode = model.iteration_time_s(np.zeros(1), np.ones(1), context, context)
    return float(np.asarray(prefill)[0]), float(np.asarray(decode)[0])


def context_time_per_token_s(model: LatencyModel, decode_batch: int = 64, context_tokens: int = 512) -> float:
    """What one more cached token of context adds to a decode step [s/token]: the step time of
    ``decode_batch`` requests at twice ``context_tokens`` each, less at ``context_tokens``, over
    the tokens added (reading the KV, in a memory-bound step); the estimate EconoServe's
    ``decode_slowdown_cap`` reads (:class:`~econoserve.policy.base.EngineLimits`)."""
    batch = np.full(2, float(decode_batch))
    context = batch * np.array([context_tokens, 2 * context_tokens], dtype=float)
    times = np.asarray(model.iteration_time_s(np.zeros(2), batch, context, context), dtype=float)
    return max(0.0, float(times[1] - times[0]) / float(decode_batch * context_tokens))


def policy_time_estimates(model: LatencyModel, token_budget: int) -> dict[str, float]:
    """The time estimates a policy gets from ``model`` at a step budget of ``token_budget``
    [tokens] (:class:`~econoserve.policy.base.EngineLimits` fields): one prompt token in a full
    prefill step [s/token], one isolated decode step [s] (:func:`typical_step_times_s`) and what
    one more cached token adds to a decode step [s/token] (:func:`context_time_per_token_s`). The
    simulator and the vLLM drop-in (``econoserve.latency_model``) both derive them here."""
    prefill_step_s, decode_step_s = typical_step_times_s(model, token_budget)
    return {
        "prefill_time_per_token_s": prefill_step_s / token_budget,
        "decode_time_per_step_s": decode_step_s,
        "decode_time_per_context_token_s": context_time_per_token_s(model),
    }


LATENCY_MODEL_NAMES: tuple[str, ...] = ("roofline", "calibrated", "distserve", "distserve-vllm", "vidur")
"""Names :func:`make_latency_model` accepts besides a file path."""


def make_latency_model(spec: str | None, deployment: Deployment,
                       roofline_overrides: Mapping[str, float] | None = None) -> LatencyModel:
    """The latency model ``spec`` names, for ``deployment``:

    * ``roofline`` (default): :class:`RooflineLatencyModel` with the literature's factors;
    * ``calibrated``: the roofline with factors fitted to real GPU measurements for the
      deployment's GPU and TP (:func:`econoserve.sim.calibration.calibrated_params`: measured
      where a profile exists, else an estimate, which the model's ``describe()`` says);
    * ``distserve`` / ``distserve-vllm``: DistServe's A100 step-time fits (its engine's / vLLM's),
      ``vidur``: Vidur's Llama-2-70B A100 operator profiles (:mod:`econoserve.sim.profiles`);
    * a path: a fitted model (``.json``) or a measured step table to fit.

    ``roofline_overrides`` (:class:`RooflineParams` fields) apply on top of ``roofline`` or
    ``calibrated``; with any other model they are an error.
    """
    spec = spec or "roofline"
    overrides = dict(roofline_overrides or {})
    if spec in ("roofline", "calibrated"):
        if spec == "roofline":
            params, provenance = RooflineParams(), "defaults"
        else:
            from econoserve.sim.calibration import calibrated_params

            params, provenance = calibrated_params(deployment.gpu.name, deployment.tensor_parallel)
        try:
            params = replace(params, **overrides)
        except TypeError as error:
            raise UserError(f"roofline: {error}") from None
        return RooflineLatencyModel(deployment, params, provenance + (" + overrides" if overrides else ""))
    if overrides:
        raise UserError(f"roofline overrides ({', '.join(overrides)}) apply to the roofline or calibrated "
                        f"latency model, not {spec!r}")
    if spec in LATENCY_MODEL_NAMES:
        from econoserve.sim.profiles import profile_latency_model

        return profile_latency_model(spec, deployment)
    return FittedLatencyModel.load(spec)


__all__ = [
    "FEATURES",
    "FittedLatencyModel",
    "LATENCY_MODEL_NAMES",
    "LatencyModel",
    "RooflineLatencyModel",
    "RooflineParams",
    "isolated_execution_times_s",
    "make_latency_model",
    "policy_time_estimates",
    "saturating_token_budget",
]


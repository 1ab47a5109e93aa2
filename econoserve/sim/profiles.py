"""Latency models read from other projects' real GPU measurements (registered ``profile`` files).

Two sources, both measured on A100-80GB SXM and registered in ``data/registry.toml`` (read from
the peers mirror, see :mod:`econoserve.workload.registry`):

**DistServe** (``distserve``: its own engine; ``distserve-vllm``: vLLM's engine, measured the
same way). Least-squares fits of step time per model and tensor-parallel degree (OPT-13B TP 1,
2, 4; OPT-66B TP 2, 3, 4, 8), in milliseconds, as DistServe's simulator evaluates them
(``simdistserve/estimators/time_estimator.py``)::

    prefill step  = a + b * sum(p) + c * sum(p ** 2)        over the batch's prompts p
    decode step   = a + b * sum(k) + c * batch               k = tokens already in each KV cache
                    [a, b, c] = decoding_smallbs if batch < threshold else decoding_largebs

**Vidur** (``vidur``): operator profiles of Llama-2-70B on A100 (kineto kernel times, in ms).
A step is Vidur's sum per layer (its ``ExecutionTime``): the linear-layer operators at the step's
token count (``mlp.csv``: TP 1, 2, 4, 8), attention (``attention.csv``: decode by batch size
and mean KV length; prefill by the root of the sum of squared prompt lengths, as Vidur
aggregates a batch of prompts; TP 2 only), and two all-reduces of ``tokens x hidden x 2`` bytes
(``all_reduce.csv``: 2 and 4 GPUs). Layers x that, plus ``step_overhead_s``. Times between
profiled points are interpolated linearly; beyond the largest profiled token count the linear
operators scale in proportion. Vidur's CPU overheads (scheduling, sampling, input preparation)
are not in these files, so the step is GPU time only unless ``step_overhead_s`` adds them.
Attention at a TP other than 2 is the TP-2 time scaled by ``2 / TP`` (the KV heads per GPU):
an estimate, recorded in :meth:`VidurLatencyModel.describe`.

**The batch from four numbers.** The simulator describes a step by prefill, decode, context and
attention-pair totals (see :mod:`econoserve.sim.latency`). Both models split them the same way
(:func:`split_batch`), assuming the step's prompts start from an empty KV cache (true for
every step without chunked prefill): their context is their own tokens, the rest of the context
belongs to the decoding requests, and ``sum(p ** 2) = 2 x prompt pairs - prompt tokens``. A
chunk of a partly computed prompt is then counted as decoding context (its cached part).

**Mixed steps.** DistServe never measured a step that both prefills and decodes; such a step
costs both variable parts and the larger of the two fixed costs (one step, one fixed cost).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.sim.catalog import Deployment
from econoserve.workload import registry

DISTSERVE_FILES: dict[str, str] = {"distserve": "distserve-a100-fits", "distserve-vllm": "distserve-vllm-a100-fits"}
"""Latency-model name -> registered DistServe fit file (its engine's, vLLM's)."""
DISTSERVE_GPU = "a100-80gb"
DISTSERVE_MODELS: dict[str, str] = {"facebook/opt-13b": "opt-13b", "facebook/opt-66b": "opt-66b",
                                    "facebook/opt-175b": "opt-175b"}
"""DistServe's Hugging Face model names -> catalog names."""

VIDUR_GPU = "a100-80gb"
VIDUR_MODEL = "llama-2-70b"
VIDUR_ATTENTION_TP = 2
"""The only tensor-parallel degree in Vidur's attention profile."""
VIDUR_LINEAR_OPERATORS: tuple[str, ...] = (
    "attn_pre_proj", "attn_post_proj", "attn_rope", "mlp_up_proj", "mlp_down_proj", "mlp_act",
    "input_layernorm", "post_attention_layernorm", "add",
)
"""Per-layer operators of ``mlp.csv`` that Vidur adds into a layer's time (by token count)."""
_MS = 1e-3


# --------------------------------------------------------------------- the batch split
def split_batch(prefill_tokens, decode_tokens, context_tokens, attention_pairs):
    """``(decode_kv_tokens, prompt_square_sum)``: tokens already in the decoding requests' KV
    caches [tokens] and ``sum(p ** 2)`` over the step's prompts [tokens^2], assuming the prompts
    start from an empty cache (see the module docstring). Scalars or arrays."""
    decode_context = np.maximum(np.asarray(context_tokens, dtype=float) - prefill_tokens, 0.0)
    prompt_pairs = np.maximum(np.asarray(attention_pairs, dtype=float) - decode_context, 0.0)
    square_sum = np.maximum(2.0 * prompt_pairs - prefill_tokens, 0.0)
    return np.maximum(decode_context - decode_tokens, 0.0), square_sum


def _scalar_or_array(value, like):
    return value if isinstance(like, np.ndarray) else float(value)


# --------------------------------------------------------------------- DistServe
@dataclass(frozen=True)
class DistServeFit:
    """One (engine, model, TP) entry of DistServe's fit file; coefficients [ms, ms/token, ...]."""

    prefill_ms: tuple[float, float, float]
    """``a, b, c`` of ``a + b * sum(p) + c * sum(p ** 2)``."""
    decode_small_batch_ms: tuple[float, float, float]
    """``a, b, c`` of ``a + b * sum(k) + c * batch`` for batches below the threshold."""
    decode_large_batch_ms: tuple[float, float, float]
    large_batch_threshold: int
    """Smallest decode batch [requests] that uses the large-batch fit."""


@lru_cache(maxsize=None)
def load_distserve_fits(name: str = "distserve") -> dict[tuple[str, int], DistServeFit]:
    """``(catalog model, TP) -> fit`` from the registered file of ``name`` (``distserve`` or
    ``distserve-vllm``)."""
    if name not in DISTSERVE_FILES:
        raise UserError(f"unknown DistServe fit {name!r}; choose one of {', '.join(DISTSERVE_FILES)}")
    path = registry.verify(DISTSERVE_FILES[name])
    try:
        raw = json.loads(Path(path).read_text())
        fits = {}
        for model, by_tp in raw.items():
            for tp, fit in by_tp.items():
                fits[(DISTSERVE_MODELS.get(model, model), int(tp))] = DistServeFit(
                    tuple(map(float, fit["prefill"])),
                    tuple(map(float, fit["decoding_smallbs"])),
                    tuple(map(float, fit["decoding_largebs"])),
                    int(fit["decoding_large_small_bs_threshold"]),
                )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a DistServe fit file ({type(error).__name__}: {error})") from None
    return fits


@lru_cache(maxsize=None)
def distserve_kv_capacity_tokens() -> dict[tuple[str, int, int], int]:
    """DistServe's KV capacity estimate on A100-80GB [tokens] by ``(catalog model, TP, PP)``."""
    path = registry.verify("distserve-max-tokens")
    table = pd.read_csv(path)
    return {
        (DISTSERVE_MODELS.get(row.model, row.model), int(row.tp), int(row.pp)): int(row.max_num_tokens)
        for row in table.itertuples()
    }


class DistServeLatencyModel:
    """Step time from DistServe's fits (see the module docstring) [s]."""

    def __init__(self, fit: DistServeFit, name: str = "distserve", model: str = "", tensor_parallel: int = 0) -> None:
        self.fit = fit
        self.name = name
        self.model = model
        self.tensor_parallel = tensor_parallel
        self._prefill = np.array(fit.prefill_ms) * _MS
        self._small = np.array(fit.decode_small_batch_ms) * _MS
        self._large = np.array(fit.decode_large_batch_ms) * _MS

    @classmethod
    def for_deployment(cls, name: str, deployment: Deployment) -> "DistServeLatencyModel":
        """The fit of ``name`` for the deployment's model and TP on A100-80GB."""
        if deployment.gpu.name != DISTSERVE_GPU:
            raise UserError(f"--latency-model {name}: DistServe's fits are measured on {DISTSERVE_GPU}, "
                            f"not {deployment.gpu.name}")
        fits = load_distserve_fits(name)
        key = (deployment.model.name, deployment.tensor_parallel)
        if key not in fits:
            have = ", ".join(f"{m} TP {tp}" for m, tp in sorted(fits))
            raise UserError(f"--latency-model {name}: no fit for {key[0]} at TP {key[1]}; profiled: {have}")
        return cls(fits[key], name, *key)

    def phase_times_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        """``(prefill_s, decode_s)``: each phase's fitted time including its fixed cost, 0 where
        the step has no such tokens."""
        decode_kv, square_sum = split_batch(prefill_tokens, decode_tokens, context_tokens, attention_pairs)
        a, b, c = self._prefill
        prefill = np.where(np.asarray(prefill_tokens) > 0, a + b * prefill_tokens + c * square_sum, 0.0)
        batch = np.asarray(decode_tokens, dtype=float)
        coefficients = np.where((batch < self.fit.large_batch_threshold)[..., None], self._small, self._large)
        decode = coefficients[..., 0] + coefficients[..., 1] * decode_kv + coefficients[..., 2] * batch
        decode = np.where(batch > 0, decode, 0.0)
        return prefill, decode

    def iteration_time_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        prefill, decode = self.phase_times_s(prefill_tokens, decode_tokens, context_tokens, attention_pairs)
        both = (np.asarray(prefill_tokens) > 0) & (np.asarray(decode_tokens) > 0)
        shared = np.where(both, np.minimum(self._prefill[0], np.where(
            np.asarray(decode_tokens) < self.fit.large_batch_threshold, self._small[0], self._large[0])), 0.0)
        return _scalar_or_array(prefill + decode - shared, prefill_tokens + decode_tokens)

    def describe(self) -> dict[str, object]:
        return {"kind": self.name, "source": DISTSERVE_FILES[self.name], "model": self.model,
                "tensor_parallel": self.tensor_parallel, "fit_ms": self.fit.__dict__}


# --------------------------------------------------------------------- Vidur
def _median(frame: pd.DataFrame, key: str, operator: str) -> pd.Series:
    return frame.groupby(key)[f"time_stats.{operator}.median"].mean()


@dataclass(frozen=True)
class VidurProfile:
    """Vidur's Llama-2-70B A100 profiles, reduced to what a step needs; times [ms]."""

    linear_tokens: np.ndarray
    """Token counts profiled for the linear operators [tokens]."""
    linear_ms: dict[int, np.ndarray]
    """TP -> per-layer time of :data:`VIDUR_LINEAR_OPERATORS` at ``linear_tokens`` [ms]."""
    decode_batch: np.ndarray
    decode_kv: np.ndarray
    decode_ms: np.ndarray
    """Decode attention per layer [ms], ``decode_batch`` x ``decode_kv`` (mean KV length)."""
    prefill_chunk: np.ndarray
    prefill_ms: np.ndarray
    """Prefill attention per layer [ms] of one prompt of ``prefill_chunk`` tokens, empty cache."""
    all_reduce_bytes: dict[int, np.ndarray]
    all_reduce_ms: dict[int, np.ndarray]
    """GPUs -> all-reduce time [ms] by message size [bytes]."""


@lru_cache(maxsize=None)
def load_vidur_profile() -> VidurProfile:
    """Read the four registered Vidur files (checked against their sha256)."""
    mlp = pd.read_csv(registry.verify("vidur-llama2-70b-a100-mlp"))
    attention = pd.read_csv(registry.verify("vidur-llama2-70b-a100-attention"))
    all_reduce = pd.read_csv(registry.verify("vidur-a100-all-reduce"))
    tokens = np.sort(mlp["num_tokens"].unique())
    linear = {}
    for tp, rows in mlp.groupby("num_tensor_parallel_workers"):
        total = sum(_median(rows, "num_tokens", op) for op in VIDUR_LINEAR_OPERATORS)
        linear[int(tp)] = total.reindex(tokens).to_numpy(dtype=float)
    decode = attention[~attention["is_prefill"]].pivot_table(
        index="batch_size", columns="kv_cache_size", values="time_stats.attn_decode.median", aggfunc="mean")
    prefill = attention[attention["is_prefill"] & (attention["kv_cache_size"] == 0)]
    prefill = _median(prefill, "prefill_chunk_size", "attn_prefill")
    reduce_bytes, reduce_ms = {}, {}
    for workers, rows in all_reduce.groupby("num_workers"):
        series = _median(rows, "size", "all_reduce")
        reduce_bytes[int(workers)] = series.index.to_numpy(dtype=float)
        reduce_ms[int(workers)] = series.to_numpy(dtype=float)
    if decode.isna().any().any():
        raise UserError("vidur attention profile: the decode grid (batch x KV length) has holes")
    return VidurProfile(
        tokens.astype(float), linear,
        decode.index.to_numpy(dtype=float), decode.columns.to_numpy(dtype=float), decode.to_numpy(dtype=float),
        prefill.index.to_numpy(dtype=float), prefill.to_numpy(dtype=float),
        reduce_bytes, reduce_ms,
    )


def _interp_scaled(x, grid, values, power: float = 1.0):
    """Linear interpolation; below the grid the first value, above it the last value scaled by
    ``(x / last) ** power``."""
    x = np.asarray(x, dtype=float)
    inside = np.interp(x, grid, values)
    above = values[-1] * (np.maximum(x, grid[-1]) / grid[-1]) ** power
    return np.where(x > grid[-1], above, inside)


def _bilinear(x, y, x_grid, y_grid, table):
    """Bilinear interpolation in ``table[x, y]``, each coordinate clipped to its grid."""
    x = np.clip(np.asarray(x, dtype=float), x_grid[0], x_grid[-1])
    y = np.clip(np.asarray(y, dtype=float), y_grid[0], y_grid[-1])
    i = np.clip(np.searchsorted(x_grid, x, side="right") - 1, 0, len(x_grid) - 2)
    j = np.clip(np.searchsorted(y_grid, y, side="right") - 1, 0, len(y_grid) - 2)
    wx = (x - x_grid[i]) / (x_grid[i + 1] - x_grid[i])
    wy = (y - y_grid[j]) / (y_grid[j + 1] - y_grid[j])
    low = table[i, j] * (1 - wy) + table[i, j + 1] * wy
    high = table[i + 1, j] * (1 - wy) + table[i + 1, j + 1] * wy
    return low * (1 - wx) + high * wx


class VidurLatencyModel:
    """Step time composed from Vidur's operator profiles (see the module docstring) [s].

    step_overhead_s:
        Added to every step [s]: CPU work outside the kernels, absent from Vidur's files.
    allreduce_launch_s:
        Added to every all-reduce [s] (Vidur's ``nccl_cpu_launch_overhead_ms``, 0.02 ms).
    """

    def __init__(self, deployment: Deployment, profile: VidurProfile | None = None,
                 step_overhead_s: float = 0.0, allreduce_launch_s: float = 20e-6) -> None:
        model, tp = deployment.model, deployment.tensor_parallel
        if deployment.gpu.name != VIDUR_GPU or model.name != VIDUR_MODEL:
            raise UserError(f"--latency-model vidur: Vidur's profiles are {VIDUR_MODEL} on {VIDUR_GPU}, "
                            f"not {model.name} on {deployment.gpu.name}")
        self.profile = profile or load_vidur_profile()
        if tp not in self.profile.linear_ms:
            raise UserError(f"--latency-model vidur: no linear-layer profile at TP {tp}; "
                            f"profiled: {sorted(self.profile.linear_ms)}")
        if tp > 1 and tp not in self.profile.all_reduce_ms:
            raise UserError(f"--latency-model vidur: no all-reduce profile over {tp} GPUs; "
                            f"profiled: {sorted(self.profile.all_reduce_ms)}")
        self.deployment = deployment
        self.step_overhead_s = step_overhead_s
        self.allreduce_launch_s = allreduce_launch_s
        self.attention_scale = VIDUR_ATTENTION_TP / tp
        self._layers = model.num_layers
        self._message_bytes_per_token = model.hidden_size * model.bytes_per_element

    def component_times_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs) -> dict[str, np.ndarray]:
        """Per-step times [s] of ``linear``, ``decode_attention``, ``prefill_attention`` and
        ``all_reduce`` over all layers (arrays)."""
        p, tp = self.profile, self.deployment.tensor_parallel
        tokens = np.asarray(prefill_tokens + decode_tokens, dtype=float)
        decode = np.asarray(decode_tokens, dtype=float)
        decode_kv, square_sum = split_batch(prefill_tokens, decode_tokens, context_tokens, attention_pairs)
        mean_kv = decode_kv / np.maximum(decode, 1.0)
        batch_scale = np.maximum(decode, p.decode_batch[-1]) / p.decode_batch[-1]
        decode_ms = np.where(decode > 0, _bilinear(decode, mean_kv, p.decode_batch, p.decode_kv, p.decode_ms) * batch_scale, 0.0)
        chunk = np.sqrt(square_sum)
        prefill_ms = np.where(np.asarray(prefill_tokens) > 0, _interp_scaled(chunk, p.prefill_chunk, p.prefill_ms, 2.0), 0.0)
        linear_ms = _interp_scaled(tokens, p.linear_tokens, p.linear_ms[tp])
        if tp > 1:
            size = tokens * self._message_bytes_per_token
            reduce_ms = 2 * (_interp_scaled(size, p.all_reduce_bytes[tp], p.all_reduce_ms[tp]) + self.allreduce_launch_s / _MS)
        else:
            reduce_ms = np.zeros_like(tokens)
        scale = self._layers * _MS
        return {
            "linear": linear_ms * scale,
            "decode_attention": decode_ms * self.attention_scale * scale,
            "prefill_attention": prefill_ms * self.attention_scale * scale,
            "all_reduce": reduce_ms * scale,
        }

    def iteration_time_s(self, prefill_tokens, decode_tokens, context_tokens, attention_pairs):
        parts = self.component_times_s(prefill_tokens, decode_tokens, context_tokens, attention_pairs)
        total = self.step_overhead_s + sum(parts.values())
        return _scalar_or_array(total, prefill_tokens + decode_tokens)

    def describe(self) -> dict[str, object]:
        tp = self.deployment.tensor_parallel
        return {
            "kind": "vidur",
            "sources": ["vidur-llama2-70b-a100-mlp", "vidur-llama2-70b-a100-attention", "vidur-a100-all-reduce"],
            "tensor_parallel": tp,
            "attention": "measured" if tp == VIDUR_ATTENTION_TP else f"estimate: TP {VIDUR_ATTENTION_TP} x {self.attention_scale:g}",
            "step_overhead_s": self.step_overhead_s,
            "allreduce_launch_s": self.allreduce_launch_s,
        }


PROFILE_LATENCY_MODELS: tuple[str, ...] = (*DISTSERVE_FILES, "vidur")
"""Latency-model names backed by measured profiles."""


def profile_latency_model(name: str, deployment: Deployment):
    """The profile-based latency model ``name`` (one of :data:`PROFILE_LATENCY_MODELS`)."""
    if name in DISTSERVE_FILES:
        return DistServeLatencyModel.for_deployment(name, deployment)
    if name == "vidur":
        return VidurLatencyModel(deployment)
    raise UserError(f"unknown profile latency model {name!r}; choose one of {', '.join(PROFILE_LATENCY_MODELS)}")


__all__ = [
    "DISTSERVE_FILES",
    "DistServeFit",
    "DistServeLatencyModel",
    "PROFILE_LATENCY_MODELS",
    "VidurLatencyModel",
    "VidurProfile",
    "distserve_kv_capacity_tokens",
    "load_distserve_fits",
    "load_vidur_profile",
    "profile_latency_model",
    "split_batch",
]

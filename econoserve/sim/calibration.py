"""The roofline's factors fitted to real GPU measurements, per GPU and tensor-parallel degree.

A *profile* is a set of measured step times over a grid of batch compositions (prefill lengths,
decode batch sizes and context lengths, TP degrees): DistServe's A100 fits (evaluated on the
grid below, inside each deployment's KV capacity) and Vidur's Llama-2-70B operator profiles
(composed into steps, see :mod:`econoserve.sim.profiles`). :func:`profile_points` turns one
into a table; :func:`fit_roofline` fits the :class:`~econoserve.sim.latency.RooflineParams`
factors in :data:`CALIBRATED_FIELDS` to it by least squares on relative error
(``predicted / measured - 1``), with bounds (:data:`FIT_BOUNDS`); at TP 1 the all-reduce
factors have nothing to fit and keep their starting values.

:func:`calibrated_params` gives the factors the ``calibrated`` latency model uses: those in
:data:`econoserve.sim.catalog.ROOFLINE_CALIBRATIONS` (fitted by
``benchmarks/bench_latency_calibration.py``, which also writes the error table) for a measured
GPU and TP; otherwise the nearest measured TP of the same GPU (nearest in ``log2(TP)``, ties to
the lower TP), and for a GPU without measurements the A100-80GB's; the provenance string says
which, and says ``estimate`` when it is one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.sim.catalog import ROOFLINE_CALIBRATIONS, Deployment, get_gpu, get_model
from econoserve.sim.latency import RooflineLatencyModel, RooflineParams
from econoserve.sim.profiles import (
    DISTSERVE_FILES,
    DISTSERVE_GPU,
    VIDUR_ATTENTION_TP,
    VIDUR_GPU,
    VIDUR_MODEL,
    DistServeLatencyModel,
    VidurLatencyModel,
    distserve_kv_capacity_tokens,
    load_distserve_fits,
    load_vidur_profile,
)

CALIBRATED_FIELDS: tuple[str, ...] = (
    "compute_efficiency", "attention_compute_efficiency", "memory_efficiency", "interconnect_efficiency",
    "allreduce_latency_s", "step_overhead_s", "overlap_exponent",
)
"""The roofline factors a calibration fits."""
FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.02, 1.0),
    "attention_compute_efficiency": (0.02, 1.0),
    "memory_efficiency": (0.02, 1.0),
    "interconnect_efficiency": (0.01, 1.0),
    "allreduce_latency_s": (0.0, 1e-3),
    "step_overhead_s": (0.0, 0.1),
    "overlap_exponent": (1.0, 64.0),
}
"""Bounds of each fitted factor [its unit]."""
_FIT_SCALE = {"allreduce_latency_s": 1e-5, "step_overhead_s": 1e-3, "overlap_exponent": 1.0}
_ALLREDUCE_FIELDS = ("interconnect_efficiency", "allreduce_latency_s")
REFERENCE_GPU = "a100-80gb"
"""The GPU whose calibration stands in (as an estimate) for GPUs without measurements."""
PROFILE_SOURCES: tuple[str, ...] = (*DISTSERVE_FILES, "vidur")
POINT_COLUMNS: tuple[str, ...] = (
    "source", "model", "gpu", "tensor_parallel", "phase", "prefill_tokens", "decode_tokens", "context_tokens",
    "attention_pairs", "measured_s", "measured_kind",
)


@dataclass(frozen=True)
class CalibrationGrid:
    """Batch compositions at which a profile is evaluated (each step: one prompt, or a batch of
    decoding requests with equal contexts). Decode cells beyond the deployment's KV capacity
    (DistServe's estimate) or the profile's range are left out."""

    prefill_lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    """Prompt lengths [tokens] (up to the model's context length)."""
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
    """Decoding requests per step."""
    context_lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4000)
    """KV tokens of each decoding request [tokens] (up to the model's context length)."""


def _prefill_row(length: int) -> tuple[float, float, float, float]:
    return float(length), 0.0, float(length), length * (length + 1) / 2.0


def _decode_row(batch: int, context: int) -> tuple[float, float, float, float]:
    tokens = float(batch * (context + 1))  # each request reads its cache and its new token
    return 0.0, float(batch), tokens, tokens


def _grid_rows(grid: CalibrationGrid, max_context: int, kv_capacity: int | None, max_batch: int | None):
    rows = [("prefill", *_prefill_row(n)) for n in grid.prefill_lengths if n <= max_context]
    for batch in grid.decode_batch_sizes:
        if max_batch is not None and batch > max_batch:
            continue
        for context in grid.context_lengths:
            if context < max_context and (kv_capacity is None or batch * (context + 1) <= kv_capacity):
                rows.append(("decode", *_decode_row(batch, context)))
    return rows


def _frame(rows, measured, **columns) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["phase", "prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs"])
    for name, value in columns.items():
        frame[name] = value
    frame["measured_s"] = measured(frame)
    return frame[list(POINT_COLUMNS)]


def _features(frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(frame[c].to_numpy(dtype=float) for c in ("prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs"))


def profile_points(source: str, grid: CalibrationGrid = CalibrationGrid()) -> pd.DataFrame:
    """Measured step times of a profile over ``grid`` (columns :data:`POINT_COLUMNS`).

    ``distserve`` / ``distserve-vllm``: every (model, TP) fit, decode cells within DistServe's
    KV capacity for that model and TP. ``vidur``: Llama-2-70B at TP 1, 2, 4, batches up to the
    largest profiled decode batch; ``measured_kind`` is ``measured`` at TP 2 and
    ``attention estimated`` elsewhere (attention scaled from TP 2).
    """
    frames = []
    if source in DISTSERVE_FILES:
        capacity = distserve_kv_capacity_tokens()
        for (model, tp), fit in sorted(load_distserve_fits(source).items()):
            spec = get_model(model)
            latency = DistServeLatencyModel(fit, source, model, tp)
            rows = _grid_rows(grid, spec.max_context_tokens, capacity.get((model, tp, 1)), None)
            frames.append(_frame(rows, lambda f: latency.iteration_time_s(*_features(f)), source=source, model=model,
                                 gpu=DISTSERVE_GPU, tensor_parallel=tp, measured_kind="measured"))
    elif source == "vidur":
        profile = load_vidur_profile()
        spec = get_model(VIDUR_MODEL)
        for tp in sorted(set(profile.linear_ms) & ({1} | set(profile.all_reduce_ms))):
            latency = VidurLatencyModel(Deployment(spec, get_gpu(VIDUR_GPU), tp), profile)
            rows = _grid_rows(grid, spec.max_context_tokens, None, int(profile.decode_batch[-1]))
            kind = "measured" if tp == VIDUR_ATTENTION_TP else "attention estimated"
            frames.append(_frame(rows, lambda f: latency.iteration_time_s(*_features(f)), source=source,
                                 model=VIDUR_MODEL, gpu=VIDUR_GPU, tensor_parallel=tp, measured_kind=kind))
    else:
        raise UserError(f"unknown profile {source!r}; choose one of {', '.join(PROFILE_SOURCES)}")
    return pd.concat(frames, ignore_index=True)


def step_table_points(path: str | Path, model: str, gpu: str, tensor_parallel: int = 1) -> pd.DataFrame:
    """A measured step table (``econoserve profile-gpu`` or ``profile-engine``: ``step_time_s``
    or ``duration_s`` and the step's token counts) as calibration points of ``model`` on
    ``gpu``. Without an ``attention_pairs`` column, the pairs are those of one fresh prompt of
    ``cell_prefill_tokens`` (or ``prefill_tokens``) tokens plus one per decoding context token."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such step table")
    try:
        table = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except (ValueError, OSError) as error:
        raise UserError(f"{path}: cannot read a step table ({error})") from None
    table = table.rename(columns={"duration_s": "step_time_s", "num_prefill_tokens": "prefill_tokens",
                                  "num_decode_tokens": "decode_tokens", "num_context_tokens": "context_tokens"})
    missing = [c for c in ("step_time_s", "prefill_tokens", "decode_tokens", "context_tokens") if c not in table]
    if missing:
        raise UserError(f"{path}: step table lacks the column(s) {', '.join(missing)}")
    if "attention_pairs" not in table:
        prompt = table.get("cell_prefill_tokens", table["prefill_tokens"]).astype(float)
        table["attention_pairs"] = prompt * (prompt + 1) / 2 + (table["context_tokens"] - table["prefill_tokens"])
    table = table[table["step_time_s"] > 0]
    if table.empty:
        raise UserError(f"{path}: no steps with a positive step_time_s")
    get_model(model), get_gpu(gpu)  # one-line errors for unknown names
    points = pd.DataFrame({
        "source": str(path), "model": model, "gpu": gpu, "tensor_parallel": int(tensor_parallel),
        "phase": np.where(table["prefill_tokens"] > 0, np.where(table["decode_tokens"] > 0, "mixed", "prefill"), "decode"),
        "prefill_tokens": table["prefill_tokens"].astype(float), "decode_tokens": table["decode_tokens"].astype(float),
        "context_tokens": table["context_tokens"].astype(float), "attention_pairs": table["attention_pairs"].astype(float),
        "measured_s": table["step_time_s"].astype(float), "measured_kind": "measured",
    })
    return points[list(POINT_COLUMNS)].reset_index(drop=True)


# --------------------------------------------------------------------- predict and fit
def roofline_predictions_s(points: pd.DataFrame, params: RooflineParams | dict[int, RooflineParams]) -> np.ndarray:
    """The roofline's step time [s] for every point; ``params`` is one set or one per TP."""
    predicted = np.empty(len(points))
    for (model, gpu, tp), group in points.groupby(["model", "gpu", "tensor_parallel"], sort=False):
        chosen = params[int(tp)] if isinstance(params, dict) else params
        latency = RooflineLatencyModel(Deployment(get_model(model), get_gpu(gpu), int(tp)), chosen)
        predicted[points.index.get_indexer(group.index)] = latency.iteration_time_s(*_features(group))
    return predicted


def fit_roofline(points: pd.DataFrame, start: RooflineParams = RooflineParams()) -> RooflineParams:
    """Least-squares fit of :data:`CALIBRATED_FIELDS` to ``points`` (relative error), starting
    from ``start`` (an infinite ``overlap_exponent`` starts at 4). All-reduce factors are held
    at ``start``'s values when every point is at TP 1."""
    from scipy.optimize import least_squares

    points = points.reset_index(drop=True)
    fields = [f for f in CALIBRATED_FIELDS
              if not (f in _ALLREDUCE_FIELDS and (points["tensor_parallel"] == 1).all())]
    initial = {f: getattr(start, f) for f in fields}
    if math.isinf(initial.get("overlap_exponent", 0.0)):
        initial["overlap_exponent"] = 4.0
    low = np.array([FIT_BOUNDS[f][0] for f in fields])
    high = np.array([FIT_BOUNDS[f][1] for f in fields])
    x0 = np.clip(np.array([initial[f] for f in fields]), low, high)
    measured = points["measured_s"].to_numpy(dtype=float)

    def params_of(x: np.ndarray) -> RooflineParams:
        return replace(start, **dict(zip(fields, map(float, x))))

    def residual(x: np.ndarray) -> np.ndarray:
        return roofline_predictions_s(points, params_of(x)) / measured - 1.0

    scale = np.array([_FIT_SCALE.get(f, 0.1) for f in fields])
    solution = least_squares(residual, x0, bounds=(low, high), x_scale=scale)
    return params_of(solution.x)


def calibrate_per_tp(points: pd.DataFrame, start: RooflineParams = RooflineParams()) -> dict[int, RooflineParams]:
    """One fit per TP degree present in ``points`` (all models of that TP pooled)."""
    return {int(tp): fit_roofline(group, start) for tp, group in points.groupby("tensor_parallel")}


def nearest_tp(tp: int, available) -> int:
    """The TP in ``available`` nearest to ``tp`` in ``log2`` (ties: the lower)."""
    options = sorted(int(a) for a in available)
    if not options:
        raise UserError("no calibrated tensor-parallel degrees to choose from")
    return min(options, key=lambda a: (abs(math.log2(a) - math.log2(tp)), a))


def error_stats(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Median and 90th percentile of ``|predicted / measured - 1|`` [fraction], and the median
    ratio (bias)."""
    relative = np.abs(predicted / measured - 1.0)
    return {"median_abs_rel_error": float(np.median(relative)),
            "p90_abs_rel_error": float(np.percentile(relative, 90)),
            "median_ratio": float(np.median(predicted / measured))}


# --------------------------------------------------------------------- the catalog's factors
def calibrated_params(gpu: str, tensor_parallel: int) -> tuple[RooflineParams, str]:
    """The roofline factors for ``gpu`` at ``tensor_parallel`` and where they come from (see
    the module docstring): measured, or an estimate from the nearest measured TP / GPU."""
    gpu = get_gpu(gpu).name
    measured = {tp for (g, tp) in ROOFLINE_CALIBRATIONS if g == gpu}
    source_gpu = gpu if measured else REFERENCE_GPU
    available = measured or {tp for (g, tp) in ROOFLINE_CALIBRATIONS if g == REFERENCE_GPU}
    tp = nearest_tp(tensor_parallel, available)
    entry = ROOFLINE_CALIBRATIONS[(source_gpu, tp)]
    params = RooflineParams(**entry.factors)
    if source_gpu == gpu and tp == tensor_parallel:
        provenance = f"measured: fitted to {entry.source} ({gpu}, TP {tp})"
    elif source_gpu == gpu:
        provenance = f"estimate: {gpu} TP {tp}'s measured factors used at TP {tensor_parallel}"
    else:
        provenance = (f"estimate: {source_gpu} TP {tp}'s measured factors used on {gpu} (no measurement on this "
                      f"GPU; its datasheet peaks scale them)")
    return params, provenance


def params_to_factors(params: RooflineParams) -> dict[str, float]:
    """The calibrated fields of ``params`` as a plain mapping (the catalog's format)."""
    return {f: float(v) for f, v in asdict(params).items() if f in CALIBRATED_FIELDS}


__all__ = [
    "CALIBRATED_FIELDS",
    "CalibrationGrid",
    "FIT_BOUNDS",
    "PROFILE_SOURCES",
    "calibrate_per_tp",
    "calibrated_params",
    "error_stats",
    "fit_roofline",
    "nearest_tp",
    "params_to_factors",
    "profile_points",
    "roofline_predictions_s",
    "step_table_points",
]

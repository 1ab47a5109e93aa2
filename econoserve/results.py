"""The one results format of both executors (the simulator and a real vLLM run).

A run directory holds ``requests.parquet`` (one row per trace request), ``iterations.parquet``
(one row per engine step, every replica's steps, with a ``replica`` column; a real vLLM run is
replica 0), ``summary.json`` (:func:`summarize`) and ``config.json`` (what produced the run).
This module owns their columns, dtypes and units: :data:`REQUEST_SCHEMA` and
:data:`ITERATION_SCHEMA`; both executors build their tables with :func:`conform` and readers
check them with :func:`validate`. Times are on the run's clock [s] (0 = the trace's start).
Columns one executor cannot measure hold a documented filler (NaN, 0, ``False``), never a
second name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from econoserve.errors import UserError


@dataclass(frozen=True)
class Column:
    """One column: its pandas dtype and what it means, with its unit."""

    dtype: str
    meaning: str

    @property
    def pandas_dtype(self):
        """The dtype pandas gives a column cast to :attr:`dtype` (``str`` is ``object`` before pandas 3)."""
        return pd.Series([], dtype=self.dtype).dtype


#: ``status`` values.
FINISHED, REJECTED, FAILED = "finished", "rejected", "failed"

REQUEST_SCHEMA: dict[str, Column] = {
    "request_id": Column("int64", "the trace's request id"),
    "dataset": Column("str", "the trace's dataset name ('' where the trace has none)"),
    "status": Column("str", "'finished'; 'rejected' (the engine could never serve it); 'failed' (a real engine's error)"),
    "rejection_reason": Column("str", "why it did not finish ('' when finished)"),
    "arrival_time_s": Column("float64", "trace arrival time [s]"),
    "submit_time_s": Column("float64", "when the request reached the engine [s] (= arrival in the simulator)"),
    "first_token_time_s": Column("float64", "first output token [s] (NaN if none)"),
    "finish_time_s": Column("float64", "last output token [s] (NaN if not finished; a failure's time on a real engine)"),
    "prompt_tokens": Column("int64", "prompt length [tokens]"),
    "output_tokens": Column("int64", "requested output length = the trace's response length [tokens]"),
    "predicted_output_tokens": Column("Int64", "the length prediction the policy saw at arrival [tokens] (null where none; a refined one is not recorded)"),
    "generated_tokens": Column("int64", "output tokens produced [tokens]"),
    "num_preemptions": Column("int64", "times the request was preempted (KV freed, later recomputed)"),
    "ttft_s": Column("float64", "first token minus arrival [s]"),
    "mean_tbt_s": Column("float64", "mean gap between consecutive output tokens [s]"),
    "p99_tbt_s": Column("float64", "99th percentile of those gaps [s]"),
    "jct_s": Column("float64", "finish minus arrival [s]"),
    "normalized_latency_s": Column("float64", "jct_s / output_tokens [s/token]"),
    "isolated_time_s": Column("float64", "the request alone on the replica, by the latency model [s] (NaN on a real engine)"),
    "slo_deadline_s": Column("float64", "arrival + slo_scale x isolated_time_s [s] (NaN on a real engine)"),
    "slo_met": Column("bool", "finished by slo_deadline_s (False where there is no deadline)"),
    "replica": Column("int64", "the replica that served it (0 on a real engine)"),
}

ITERATION_SCHEMA: dict[str, Column] = {
    "iteration": Column("int64", "step number within its replica"),
    "start_time_s": Column("float64", "step start [s]"),
    "duration_s": Column("float64", "step duration [s] (real engine: schedule() entry to update_from_output() exit)"),
    "num_prefill_tokens": Column("int64", "prompt (or recomputed) tokens computed [tokens]"),
    "num_decode_tokens": Column("int64", "generated tokens computed, one per decoding request [tokens]"),
    "num_context_tokens": Column("int64", "tokens already in KV cache that the step's attention reads [tokens]"),
    "num_prefill_requests": Column("int64", "requests prefilling in the step"),
    "num_decode_requests": Column("int64", "requests decoding in the step"),
    "num_preempted": Column("int64", "requests preempted while scheduling the step"),
    "kv_blocks_used": Column("int64", "KV blocks holding tokens after scheduling [blocks]"),
    "kv_blocks_reserved": Column("int64", "KV blocks set aside for future tokens, holding none yet [blocks]"),
    "kv_blocks_allocated": Column("int64", "kv_blocks_used + kv_blocks_reserved [blocks]"),
    "kv_blocks_capacity": Column("int64", "usable KV blocks (a real vLLM engine: the pool less its null block) [blocks]"),
    "kv_tokens_stored": Column("int64", "tokens whose KV the running requests hold once the step ran [tokens]"),
    "block_size": Column("int64", "tokens per KV block [tokens]"),
    "num_running": Column("int64", "requests running after scheduling"),
    "num_waiting": Column("int64", "requests waiting after scheduling (new and preempted)"),
    "token_budget": Column("int64", "the per-step token budget in force [tokens] (0 = none)"),
    "skipped": Column("bool", "the simulator advanced this step without calling the policy (always False on a real engine)"),
    "scheduler_wall_time_s": Column("float64", "wall time inside the scheduling call [s]"),
    "replica": Column("int64", "the replica that ran the step (0 on a real engine)"),
}


#: Step features of a latency model (:data:`econoserve.sim.latency.FEATURES`, the names of
#: a step-time profile and of vLLM's step records) -> their column in :data:`ITERATION_SCHEMA`.
STEP_FEATURE_COLUMNS: dict[str, str] = {
    "prefill_tokens": "num_prefill_tokens",
    "decode_tokens": "num_decode_tokens",
    "context_tokens": "num_context_tokens",
}


# --------------------------------------------------------------------- tables
def conform(frame: pd.DataFrame, schema: Mapping[str, Column], where: str = "table") -> pd.DataFrame:
    """``frame``'s schema columns, in schema order, cast to the schema's dtypes.

    A missing column is a bug of the executor that built the table: :class:`ValueError`.
    """
    missing = [name for name in schema if name not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    return pd.DataFrame({name: frame[name].astype(column.dtype) for name, column in schema.items()})


def empty_table(schema: Mapping[str, Column]) -> pd.DataFrame:
    """A table with the schema's columns and dtypes and no rows."""
    return conform(pd.DataFrame(columns=list(schema)), schema)


def validate(frame: pd.DataFrame, schema: Mapping[str, Column], where: str = "table") -> pd.DataFrame:
    """``frame`` unchanged if it has exactly the schema's columns with its dtypes, else
    :class:`~econoserve.errors.UserError` naming ``where`` and the first difference."""
    if list(frame.columns) != list(schema):
        extra = sorted(set(frame.columns) - set(schema))
        missing = [name for name in schema if name not in frame.columns]
        raise UserError(f"{where}: not a results table (missing {missing}, unexpected {extra}, or out of order)")
    for name, column in schema.items():
        if frame[name].dtype != column.pandas_dtype:
            raise UserError(f"{where}: column {name} is {frame[name].dtype}, the schema says {column.pandas_dtype}")
    return frame


def read_requests(run_dir: str | Path) -> pd.DataFrame:
    """A run directory's ``requests.parquet``, validated."""
    path = Path(run_dir) / "requests.parquet"
    return validate(_read_parquet(path), REQUEST_SCHEMA, str(path))


def read_iterations(run_dir: str | Path) -> pd.DataFrame:
    """A run directory's ``iterations.parquet``, validated."""
    path = Path(run_dir) / "iterations.parquet"
    return validate(_read_parquet(path), ITERATION_SCHEMA, str(path))


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: no such results table")
    return pd.read_parquet(path)


def slo_columns(arrival_s: np.ndarray, finish_s: np.ndarray, finished_mask: np.ndarray, isolated_s: np.ndarray,
                slo_scale: float | np.ndarray) -> dict[str, np.ndarray]:
    """A requests table's SLO columns, the one definition for simulated and served runs: the
    isolated time [s], the deadline ``arrival + slo_scale x isolated`` [s], and whether the request
    finished by it."""
    deadline = arrival_s + slo_scale * isolated_s
    return {"isolated_time_s": isolated_s, "slo_deadline_s": deadline,
            "slo_met": finished_mask & (finish_s <= deadline)}


def finished(requests: pd.DataFrame) -> pd.DataFrame:
    """The requests that finished."""
    return requests[requests["status"] == FINISHED]


def kv_block_usage(iterations: pd.DataFrame) -> pd.Series:
    """KV blocks holding tokens / usable blocks, per step."""
    return iterations["kv_blocks_used"] / iterations["kv_blocks_capacity"].where(iterations["kv_blocks_capacity"] > 0)


def kv_reserved_fraction(iterations: pd.DataFrame) -> pd.Series:
    """KV blocks reserved for future tokens / usable blocks, per step."""
    return iterations["kv_blocks_reserved"] / iterations["kv_blocks_capacity"].where(iterations["kv_blocks_capacity"] > 0)


# --------------------------------------------------------------------- summary
def summarize(
    requests: pd.DataFrame,
    iterations: pd.DataFrame,
    reference_token_budget: int | np.ndarray,
    scheduler_invocations: int | None = None,
    scheduler_time_s: float | None = None,
) -> dict[str, Any]:
    """A run's ``summary.json``: counts, throughput, latency, SLO, preemption, KV cache use and
    scheduling (conventions in :mod:`econoserve.analysis.metrics`; NaN where undefined).

    ``reference_token_budget`` [tokens] is the saturating batch size GPU token utilization is
    measured against (one per step where replicas differ). ``scheduler_invocations`` and
    ``scheduler_time_s`` default to one call per step and the steps' ``scheduler_wall_time_s``.
    """
    # the metrics read the format this module owns, so they import it, not the reverse
    from econoserve.analysis.metrics import (
        gpu_token_utilization,
        kvc_allocation_efficiency,
        kvc_utilization,
        latency_stats,
        makespan_s,
        preempted_fraction,
        scheduling_stats,
        slo_attainment,
        throughput,
    )

    if scheduler_invocations is None:
        scheduler_invocations = len(iterations)
    if scheduler_time_s is None:
        scheduler_time_s = float(iterations["scheduler_wall_time_s"].sum())
    status = requests["status"]
    summary: dict[str, Any] = {
        "num_requests": int(len(requests)),
        "completed": int((status == FINISHED).sum()),
        "rejected": int((status == REJECTED).sum()),
        "failed": int((status == FAILED).sum()),
        "num_iterations": int(len(iterations)),
        "makespan_s": makespan_s(requests),
    }
    summary.update(throughput(requests))
    summary.update(latency_stats(requests))
    summary["slo_attainment"] = slo_attainment(requests)
    summary["preempted_fraction"] = preempted_fraction(requests)
    summary["num_preemptions"] = int(requests["num_preemptions"].sum())
    summary["mean_kvc_utilization"] = kvc_utilization(iterations)
    summary["kvc_allocation_efficiency"] = kvc_allocation_efficiency(iterations)
    usage = kv_block_usage(iterations).to_numpy(float)
    durations = iterations["duration_s"].to_numpy(float)
    summary["mean_kv_block_usage"] = float(np.average(usage, weights=durations)) if durations.sum() > 0 else float("nan")
    summary["max_kv_block_usage"] = float(np.nanmax(usage)) if len(usage) else float("nan")
    summary["mean_iteration_time_s"] = float(durations.mean()) if len(durations) else float("nan")
    summary["mean_gpu_token_utilization"] = gpu_token_utilization(iterations, reference_token_budget)
    scalar_budget = np.ndim(reference_token_budget) == 0
    summary["reference_token_budget"] = int(reference_token_budget) if scalar_budget else None
    summary.update(scheduling_stats(iterations, requests, scheduler_invocations, scheduler_time_s))
    return summary


# --------------------------------------------------------------------- files
def write_run(run_dir: str | Path, requests: pd.DataFrame, iterations: pd.DataFrame,
              summary: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write the four files of a run into ``run_dir`` (created) and return it; the tables are
    validated first."""
    run_dir = Path(run_dir)
    validate(requests, REQUEST_SCHEMA, "requests")
    validate(iterations, ITERATION_SCHEMA, "iterations")
    run_dir.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(run_dir / "requests.parquet", index=False)
    iterations.to_parquet(run_dir / "iterations.parquet", index=False)
    for name, payload in (("summary.json", summary), ("config.json", config)):
        text = json.dumps(json_safe(payload), indent=2, sort_keys=True, default=str, allow_nan=False)
        (run_dir / name).write_text(text + "\n")
    return run_dir


def write_results(directory: str | Path, tables: Mapping[str, pd.DataFrame], meta_file: str,
                  meta: Mapping[str, Any]) -> Path:
    """Write an experiment's results directory (created) and return it: each table to
    ``directory/<file name>`` (Parquet or CSV by the name's suffix) and ``meta`` plus the
    package version (``econoserve_version``) to ``directory/<meta_file>`` (JSON)."""
    from econoserve import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        writer = table.to_parquet if name.endswith(".parquet") else table.to_csv
        writer(directory / name, index=False)
    payload = {**meta, "econoserve_version": __version__}
    (directory / meta_file).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return directory


def read_results(directory: str | Path, files: Sequence[str], meta_file: str) -> tuple[dict[str, Any],
                                                                                       dict[str, pd.DataFrame]]:
    """The metadata and the tables (keyed by file name without its suffix) of a results
    directory :func:`write_results` wrote; a missing file is a :class:`UserError`."""
    directory = Path(directory)
    meta_path = directory / meta_file
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: no such results metadata (is {directory} a results directory?)")
    tables = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: no such results table")
        tables[path.stem] = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
    return json.loads(meta_path.read_text()), tables


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` (strict JSON), numpy scalars as Python ones and
    mapping keys as strings."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value

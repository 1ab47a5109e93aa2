"""Every serving metric of PAPER.md, as pure functions of a run's tables.

Inputs are a run's ``requests`` and ``iterations`` tables in the one results format of both
executors (:mod:`econoserve.results`, which also holds the run's summary function).

Conventions (documented choices):

* Throughput counts finished requests over the makespan (first arrival to last finish) [s].
* Latency statistics (JCT, TTFT, TBT, normalized latency) are over finished requests.
* SLO attainment is over *all* requests: a rejected request missed its SLO.
* Utilizations are time-weighted by step duration. GPU token utilization of a step is
  ``min(1, tokens / reference budget)``, the reference budget being the hardware's saturating
  batch size (so schedulers are compared on one scale).
* Goodput is the highest request rate [requests/s] at which at least ``target`` (0.9) of
  requests meet their SLO, found by :func:`goodput_search` over rates, or read off a sweep
  table by :func:`goodput_from_table`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from econoserve.results import FINISHED, finished

#: Fraction of requests that must meet their SLO for a rate to count toward goodput.
GOODPUT_TARGET = 0.9


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _nanquantile(values, q: float) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(np.quantile(values, q)) if values.size else float("nan")


def makespan_s(requests: pd.DataFrame) -> float:
    """First arrival to last finish [s] (0 if nothing finished)."""
    done = finished(requests)
    if done.empty:
        return 0.0
    return float(done["finish_time_s"].max() - requests["arrival_time_s"].min())


def throughput(requests: pd.DataFrame) -> dict[str, float]:
    """Finished requests per second and output tokens per second over the makespan."""
    span = makespan_s(requests)
    done = finished(requests)
    if span <= 0:
        return {"throughput_rps": 0.0, "output_tokens_per_s": 0.0}
    return {
        "throughput_rps": len(done) / span,
        "output_tokens_per_s": float(done["output_tokens"].sum()) / span,
    }


def latency_stats(requests: pd.DataFrame) -> dict[str, float]:
    """JCT, TTFT, TBT and normalized latency statistics over finished requests [s]."""
    done = finished(requests)
    jct = done["jct_s"].to_numpy(dtype=float)
    return {
        "mean_jct_s": _nanmean(jct),
        "p50_jct_s": _nanquantile(jct, 0.5),
        "p99_jct_s": _nanquantile(jct, 0.99),
        "mean_ttft_s": _nanmean(done["ttft_s"]),
        "p99_ttft_s": _nanquantile(done["ttft_s"], 0.99),
        "mean_tbt_s": _nanmean(done["mean_tbt_s"]),
        "p99_tbt_s": _nanquantile(done["p99_tbt_s"], 0.99),
        "mean_normalized_latency_s": _nanmean(done["normalized_latency_s"]),
    }


def slo_attainment(requests: pd.DataFrame) -> float:
    """Fraction of all requests (rejected ones included, as misses) that met their SLO."""
    if len(requests) == 0:
        return float("nan")
    return float(requests["slo_met"].astype(bool).sum()) / len(requests)


def ttft_tpot_slo_attainment(requests: pd.DataFrame, ttft_slo_s: float, tpot_slo_s: float) -> float:
    """DistServe-style SLO attainment: the fraction of all requests that finished with TTFT <=
    ``ttft_slo_s`` and mean time per output token (mean TBT) <= ``tpot_slo_s`` [s]. A request
    with a single output token has no TPOT and is judged on TTFT alone."""
    if len(requests) == 0:
        return float("nan")
    is_finished = requests["status"] == FINISHED
    ttft_ok = requests["ttft_s"] <= ttft_slo_s
    tpot = requests["mean_tbt_s"]
    tpot_ok = tpot.isna() | (tpot <= tpot_slo_s)
    return float((is_finished & ttft_ok & tpot_ok).sum()) / len(requests)


def preempted_fraction(requests: pd.DataFrame) -> float:
    """Fraction of requests preempted at least once."""
    if len(requests) == 0:
        return float("nan")
    return float((requests["num_preemptions"] > 0).mean())


def _time_weighted(values: np.ndarray, durations: np.ndarray) -> float:
    total = float(durations.sum())
    return float((values * durations).sum() / total) if total > 0 else float("nan")


def kvc_utilization(iterations: pd.DataFrame) -> float:
    """Time-averaged stored KV tokens / KV capacity in tokens."""
    if iterations.empty:
        return float("nan")
    capacity = iterations["kv_blocks_capacity"].to_numpy(float) * iterations["block_size"].to_numpy(float)
    return _time_weighted(iterations["kv_tokens_stored"].to_numpy(float) / capacity, iterations["duration_s"].to_numpy(float))


def kvc_allocation_efficiency(iterations: pd.DataFrame) -> float:
    """Time-averaged stored KV tokens / tokens of the blocks allocated or reserved to requests."""
    if iterations.empty:
        return float("nan")
    committed = (iterations["kv_blocks_used"] + iterations["kv_blocks_reserved"]).to_numpy(float)
    committed_tokens = committed * iterations["block_size"].to_numpy(float)
    stored = iterations["kv_tokens_stored"].to_numpy(float)
    ratio = np.divide(stored, committed_tokens, out=np.ones_like(stored), where=committed_tokens > 0)
    return _time_weighted(ratio, iterations["duration_s"].to_numpy(float))


def gpu_token_utilization(iterations: pd.DataFrame, reference_token_budget: int) -> float:
    """Time-averaged ``min(1, tokens in the step / reference_token_budget)``."""
    if iterations.empty:
        return float("nan")
    tokens = (iterations["num_prefill_tokens"] + iterations["num_decode_tokens"]).to_numpy(float)
    return _time_weighted(np.minimum(1.0, tokens / reference_token_budget), iterations["duration_s"].to_numpy(float))


def scheduling_stats(iterations: pd.DataFrame, requests: pd.DataFrame, invocations: int, scheduler_time_s: float) -> dict[str, float]:
    """Scheduler invocations and wall time, per iteration and per request [s]."""
    num_iterations = len(iterations)
    return {
        "scheduler_invocations": int(invocations),
        "scheduler_time_s": float(scheduler_time_s),
        "scheduler_time_per_iteration_s": scheduler_time_s / num_iterations if num_iterations else float("nan"),
        "scheduler_time_per_request_s": scheduler_time_s / len(requests) if len(requests) else float("nan"),
        "scheduler_share_of_iteration_time": (
            scheduler_time_s / float(iterations["duration_s"].sum()) if num_iterations else float("nan")
        ),
    }


# --------------------------------------------------------------------- goodput
def goodput_search(
    attainment_at_rate: Callable[[float], float],
    low_rps: float,
    high_rps: float,
    target: float = GOODPUT_TARGET,
    relative_tolerance: float = 0.02,
    max_evaluations: int | None = 20,
    growth: float = 2.0,
    geometric: bool = False,
    min_rps: float | None = None,
) -> dict[str, object]:
    """Highest rate [requests/s] whose SLO attainment is >= ``target``, by bisection.

    ``attainment_at_rate(rate)`` runs the workload at ``rate`` and returns its SLO attainment.
    Attainment is assumed to fall with rate. ``high_rps`` is multiplied by ``growth`` until it
    misses the target; if ``low_rps`` misses, it is divided by ``growth`` until a rate meets the
    target, down to ``min_rps`` (None: no search below ``low_rps``). The bracket is then halved
    (at its arithmetic mean, or its geometric mean if ``geometric``) until its width is at most
    ``relative_tolerance`` x its lower end, all within ``max_evaluations`` runs (None: no
    limit). Returns ``goodput_rps`` (0.0 if no rate tried meets the target), every
    ``evaluations`` pair, and ``unbounded`` True where the budget ran out while ``high_rps``
    still met the target.
    """
    if not 0 < low_rps < high_rps:
        raise ValueError(f"need 0 < low_rps < high_rps, got {low_rps}, {high_rps}")
    if not growth > 1:
        raise ValueError(f"need growth > 1, got {growth}")
    evaluations: list[tuple[float, float]] = []
    budget = math.inf if max_evaluations is None else max_evaluations

    def meets(rate: float) -> bool:
        value = float(attainment_at_rate(rate))
        evaluations.append((rate, value))
        return value >= target

    lo, hi = low_rps, high_rps
    if not meets(lo):
        while True:
            lo, hi = lo / growth, lo
            if min_rps is None or lo < min_rps or len(evaluations) >= budget:
                return {"goodput_rps": 0.0, "evaluations": evaluations}
            if meets(lo):
                break
    else:
        while meets(hi):
            lo, hi = hi, hi * growth
            if len(evaluations) >= budget:
                return {"goodput_rps": lo, "evaluations": evaluations, "unbounded": True}
    while (hi - lo) > relative_tolerance * lo and len(evaluations) < budget:
        mid = math.sqrt(lo * hi) if geometric else 0.5 * (lo + hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return {"goodput_rps": lo, "evaluations": evaluations}


def goodput_from_table(
    table: pd.DataFrame,
    rate_column: str = "rate_rps",
    attainment_column: str = "slo_attainment",
    by: tuple[str, ...] | list[str] = (),
    target: float = GOODPUT_TARGET,
    interpolate: bool = False,
) -> pd.DataFrame | float:
    """Highest swept rate with attainment >= ``target`` and every lower swept rate also meeting
    it (NaN if none). With ``interpolate``, the rate where attainment falls to ``target``,
    linearly between that rate and the next swept one (the highest swept rate where every one
    meets it): a finer estimate on a coarse sweep. With ``by`` columns, one row per group."""

    def highest(group: pd.DataFrame) -> float:
        group = group.sort_values(rate_column)
        rates = group[rate_column].to_numpy(float)
        attainment = group[attainment_column].to_numpy(float)
        ok = attainment >= target
        if not ok.size or not ok[0]:
            return math.nan
        if ok.all():
            return float(rates[-1])
        last = int(np.argmin(ok)) - 1
        if not interpolate:
            return float(rates[last])
        share = (attainment[last] - target) / (attainment[last] - attainment[last + 1])
        return float(rates[last] + share * (rates[last + 1] - rates[last]))

    if not by:
        return highest(table)
    rows = [
        {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "goodput_rps": highest(group)}
        for key, group in table.groupby(list(by), sort=True)
    ]
    return pd.DataFrame(rows)


def summary_table(summaries: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Several runs' summaries side by side (one row per run name)."""
    return pd.DataFrame([{"run": name, **dict(s)} for name, s in summaries.items()])

"""The paper's headline claims (PAPER.md, "What the paper says"), measured on a sweep table.

:func:`headline_claims` compares a system (EconoServe) with baselines on the tidy sweep table of
:mod:`econoserve.experiments` (mean over seeds first) and returns one row per claim and
deployment x dataset, plus an ``all`` row per claim and baseline: the best case for the "up to"
claims, the worst case for ``sustained_rate*`` (a claim about every workload):

``throughput_at_same_latency``  paper: up to 4x vs vLLM. For each latency budget ``L`` equal to
    one of the baseline's measured mean normalized latencies [s/token] (all but at its lowest
    swept rate: below that the baseline's throughput is the grid's floor, not its limit, and a
    flat low-load curve would turn a tiny latency gap into any ratio), each scheduler's
    throughput at ``L`` is the highest throughput [req/s] among its runs with normalized latency
    <= ``L``; the measured value is the largest ratio system / baseline over those budgets.
``jct_reduction``  paper: up to 91% vs vLLM. ``1 - JCT_system / JCT_baseline`` (mean JCT) at
    each swept rate; the largest over rates.
``slo_gain``  paper: up to 91% vs vLLM. Read as percentage points of SLO attainment
    (``attainment_system - attainment_baseline``, in %) at each rate; the largest over rates.
    ``slo_gain_relative`` gives the relative reading (``attainment_system / attainment_baseline
    - 1``, in %; rates where the baseline's attainment is below ``MIN_RELATIVE_BASE`` (10%) are
    skipped, since the ratio is unbounded there).
``sustained_rate``  paper: higher than vLLM, Orca and FastGen. Goodput (highest swept rate with
    >= 90% SLO attainment) ratio system / baseline, one claim row per baseline. On a finite trace
    an overload only builds a finite backlog, so goodput can sit at the top of the grid for
    several schedulers (then the ratio is 1 and says only "both sustain the whole grid").
``sustained_rate_burst``  the same claim read off the saturation table (when given): ratio of
    the throughputs [req/s] of a burst (every request at once), the most a scheduler sustains.

Columns: ``claim``, ``baseline``, ``deployment``, ``dataset``, ``paper`` (the paper's number, in
the unit of ``measured``), ``measured``, ``unit``, ``at_rate_rps`` (where the best case is; the
latency budget for the throughput claim is in ``detail``), ``detail``, ``met`` (measured >=
paper; for "higher" claims measured > 1).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from econoserve.analysis.metrics import goodput_from_table

PAPER_CLAIMS: dict[str, tuple[float, str, str]] = {
    "throughput_at_same_latency": (4.0, "x", "up to 4x throughput at the same latency vs vLLM"),
    "jct_reduction": (91.0, "%", "up to 91% lower JCT vs vLLM"),
    "slo_gain": (91.0, "percentage points", "up to 91% higher SLO satisfaction vs vLLM"),
    "slo_gain_relative": (91.0, "%", "up to 91% higher SLO satisfaction vs vLLM (relative reading)"),
    "sustained_rate": (1.0, "x", "sustains higher request rates than vLLM, Orca and FastGen (ratio > 1)"),
    "sustained_rate_burst": (1.0, "x", "sustains higher request rates than vLLM, Orca and FastGen (burst throughput ratio > 1)"),
}
KEYS = ["deployment", "dataset"]
#: Smallest baseline SLO attainment at which the relative SLO gain is computed.
MIN_RELATIVE_BASE = 0.1


def _mean(sweep: pd.DataFrame) -> pd.DataFrame:
    columns = ["throughput_rps", "mean_normalized_latency_s", "mean_jct_s", "slo_attainment"]
    return sweep.groupby([*KEYS, "scheduler", "rate_rps"], as_index=False, sort=False)[columns].mean()


def throughput_at_latency(curve: pd.DataFrame, budget_s: float) -> float:
    """Highest throughput [req/s] among runs with mean normalized latency <= ``budget_s`` (NaN if none)."""
    ok = curve[curve["mean_normalized_latency_s"] <= budget_s]
    return float(ok["throughput_rps"].max()) if not ok.empty else math.nan


def _throughput_claim(system: pd.DataFrame, base: pd.DataFrame) -> tuple[float, float, str]:
    best, at, detail = math.nan, math.nan, ""
    budgets = base.sort_values("rate_rps")["mean_normalized_latency_s"].iloc[1:].dropna().unique()
    for budget in sorted(budgets):
        ours, theirs = throughput_at_latency(system, budget), throughput_at_latency(base, budget)
        if not (theirs > 0) or math.isnan(ours):
            continue
        ratio = ours / theirs
        if math.isnan(best) or ratio > best:
            best = ratio
            at = float(base.loc[base["mean_normalized_latency_s"] == budget, "rate_rps"].iloc[0])
            detail = f"latency budget {budget:.4g} s/token: {ours:.3g} vs {theirs:.3g} req/s"
    return best, at, detail


def _paired(system: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    return system.merge(base, on="rate_rps", suffixes=("_sys", "_base"))


def _best(values: pd.Series, rates: pd.Series) -> tuple[float, float]:
    values = values.replace([np.inf, -np.inf], np.nan)
    if values.dropna().empty:
        return math.nan, math.nan
    index = values.idxmax()
    return float(values.loc[index]), float(rates.loc[index])


def headline_claims(sweep: pd.DataFrame, system: str = "econoserve", baseline: str = "vllm",
                    sustained_baselines: tuple[str, ...] = ("vllm", "orca", "fastgen"),
                    saturation: pd.DataFrame | None = None) -> pd.DataFrame:
    """The headline claims measured on ``sweep`` (and ``saturation``, if given; see the module
    docstring)."""
    schedulers = set(sweep["scheduler"])
    if system not in schedulers:
        raise ValueError(f"the sweep has no {system!r} runs (schedulers: {', '.join(sorted(schedulers))})")
    mean = _mean(sweep)
    goodput = goodput_from_table(mean, by=[*KEYS, "scheduler"])
    rows = []

    def add(claim, other, deployment, dataset, measured, at, detail):
        paper, unit, _ = PAPER_CLAIMS[claim]
        met = (measured > paper) if claim.startswith("sustained_rate") else (measured >= paper)
        rows.append({"claim": claim, "baseline": other, "deployment": deployment, "dataset": dataset, "paper": paper,
                     "measured": measured, "unit": unit, "at_rate_rps": at, "detail": detail,
                     "met": bool(met) if not math.isnan(measured) else False})

    for (deployment, dataset), group in mean.groupby(KEYS, sort=False):
        ours = group[group["scheduler"] == system]
        base = group[group["scheduler"] == baseline]
        if not base.empty and not ours.empty:
            value, at, detail = _throughput_claim(ours, base)
            add("throughput_at_same_latency", baseline, deployment, dataset, value, at, detail)
            paired = _paired(ours, base)
            value, at = _best(100 * (1 - paired["mean_jct_s_sys"] / paired["mean_jct_s_base"]), paired["rate_rps"])
            add("jct_reduction", baseline, deployment, dataset, value, at, "max over swept rates of 1 - JCT ratio")
            value, at = _best(100 * (paired["slo_attainment_sys"] - paired["slo_attainment_base"]), paired["rate_rps"])
            add("slo_gain", baseline, deployment, dataset, value, at, "max over swept rates of the attainment difference")
            has = paired["slo_attainment_base"] >= MIN_RELATIVE_BASE
            value, at = _best(100 * (paired.loc[has, "slo_attainment_sys"] / paired.loc[has, "slo_attainment_base"] - 1),
                              paired.loc[has, "rate_rps"])
            add("slo_gain_relative", baseline, deployment, dataset, value, at, "max over swept rates of the attainment ratio - 1")
        g = goodput[(goodput["deployment"] == deployment) & (goodput["dataset"] == dataset)].set_index("scheduler")["goodput_rps"]
        for other in sustained_baselines:
            if other not in g.index or system not in g.index:
                continue
            ours_rate, their_rate = g[system], g[other]
            if math.isnan(ours_rate):
                value = math.nan
            elif math.isnan(their_rate) or their_rate == 0:
                value = math.inf
            else:
                value = ours_rate / their_rate
            add("sustained_rate", other, deployment, dataset, value, ours_rate,
                f"goodput {ours_rate:.3g} vs {their_rate:.3g} req/s (SLO attainment >= 90%)")
        if saturation is None:
            continue
        burst = saturation[(saturation["deployment"] == deployment) & (saturation["dataset"] == dataset)]
        burst = burst.groupby("scheduler")["burst_throughput_rps"].mean()
        for other in sustained_baselines:
            if other in burst.index and system in burst.index and burst[other] > 0:
                add("sustained_rate_burst", other, deployment, dataset, burst[system] / burst[other], math.nan,
                    f"burst throughput {burst[system]:.3g} vs {burst[other]:.3g} req/s")
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    best_rows = []
    for (claim, other), group in table.groupby(["claim", "baseline"], sort=False):
        worst = claim.startswith("sustained_rate")  # "sustains higher rates": on every dataset, so the worst case
        # worst case: a NaN (the system meets the SLO at no swept rate) is the worst of all
        values = group["measured"].fillna(-np.inf) if worst else group["measured"].replace([np.inf], np.nan)
        if values.dropna().empty:
            best = group.iloc[0].copy()
            best["measured"] = math.nan
            best["met"] = False
        else:
            best = group.loc[values.idxmin() if worst else values.idxmax()].copy()
        case = "worst" if worst else "best"
        best["detail"] = f"{case} case: {best['deployment']} {best['dataset']}; {best['detail']}"
        best["deployment"], best["dataset"] = "all", "all"
        best_rows.append(best)
    return pd.concat([table, pd.DataFrame(best_rows)], ignore_index=True)


__all__ = ["PAPER_CLAIMS", "headline_claims", "throughput_at_latency"]

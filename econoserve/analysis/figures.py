"""Figures 2-5, 7-11, 13 and 14 of PAPER.md, as pure functions of the tidy tables of
:mod:`econoserve.experiments`.

For each figure ``N`` there is ``tableN(...) -> DataFrame`` (the numbers drawn, written as the
figure's CSV) and ``figureN(...) -> Figure`` (which draws ``tableN``). Inputs:

``sweep``        one row per run (``deployment``, ``dataset``, ``scheduler``, ``seed``, ``rate_rps``,
                 ``reference`` and the simulator's summary keys);
``iterations``   the per-step tables of the reference runs (with the same keys, skip-ahead off);
``sensitivity``  one row per sensitivity run (``knob``, ``value`` and the summary keys).

Statistics over seeds are means. Figures 2, 4 and 5 draw one deployment (``deployment``, default
the first); their tables hold every deployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from econoserve.experiments import (
    ABLATIONS,
    ECONOSERVE,
    MAIN_SCHEDULERS,
    REQUEST_FAMILIES,
)
from econoserve.analysis.metrics import GOODPUT_TARGET, goodput_from_table

#: Display order of every scheduler (and a fixed colour each).
SCHEDULER_ORDER: tuple[str, ...] = (*MAIN_SCHEDULERS, *[a for a in ABLATIONS if a != ECONOSERVE])
PALETTE: dict[str, tuple] = dict(zip(SCHEDULER_ORDER, sns.color_palette("tab10", len(SCHEDULER_ORDER))))
#: Schedulers of the observation figures (2-4): the existing systems of the trace analysis.
OBSERVED: tuple[str, ...] = ("vllm", "orca", "sarathi", "fastgen")
#: Figure 5: maximum allocation (Orca), exact allocation, exact allocation + KVCPipe, on demand.
ALLOCATION_SCHEDULERS: tuple[str, ...] = ("orca", "econoserve-no-kvcpipe", ECONOSERVE, "vllm")
KEYS: tuple[str, ...] = ("deployment", "dataset", "scheduler")
TIME_BINS = 60


# --------------------------------------------------------------------- helpers
def _order(present: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    present = list(dict.fromkeys(present))
    if wanted is not None:
        present = [s for s in wanted if s in present]
    known = [s for s in SCHEDULER_ORDER if s in present]
    return known + [s for s in present if s not in known]


def _datasets(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["dataset"]))


def _select(table: pd.DataFrame, schedulers: Sequence[str] | None) -> pd.DataFrame:
    if schedulers is None:
        return table
    return table[table["scheduler"].isin(schedulers)]


def _deployment(table: pd.DataFrame, deployment: str | None) -> str:
    if table.empty:
        raise ValueError("empty table: nothing to draw")
    return deployment if deployment is not None else str(table["deployment"].iloc[0])


def _seed_mean(table: pd.DataFrame, by: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    by = list(by)
    return table.groupby(by, as_index=False, sort=False)[list(columns)].mean()


def _reference_rows(sweep: pd.DataFrame) -> pd.DataFrame:
    rows = sweep[sweep["reference"].astype(bool)]
    if rows.empty:
        raise ValueError("the sweep has no reference-rate rows")
    return rows


def _sort(table: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(SCHEDULER_ORDER)}
    table = table.assign(_order=table["scheduler"].map(order).fillna(len(order)))
    keys = [k for k in ("deployment", "dataset") if k in table.columns]
    dataset_order = {}
    if "dataset" in table:
        present = list(dict.fromkeys(table["dataset"]))
        ordered = [d for d in REQUEST_FAMILIES if d in present] + [d for d in present if d not in REQUEST_FAMILIES]
        dataset_order = {d: i for i, d in enumerate(ordered)}
    if dataset_order:
        table = table.assign(_dataset=table["dataset"].map(dataset_order))
        keys = [("_dataset" if k == "dataset" else k) for k in keys]
    table = table.sort_values([*keys, "_order", *extra], kind="stable")
    return table.drop(columns=[c for c in ("_order", "_dataset") if c in table.columns]).reset_index(drop=True)


def _grid(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2, **kwargs):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)
    return fig, axes


def _legend(fig: Figure, axes) -> None:
    handles, labels = [], []
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(handles, labels, loc="outside right center", frameon=False)


def _bars(ax, table: pd.DataFrame, value: str, schedulers: list[str], ylabel: str, scale: float = 1.0) -> None:
    data = table.assign(**{value: table[value] * scale})
    sns.barplot(data=data, x="dataset", y=value, hue="scheduler", hue_order=schedulers, palette=PALETTE,
                ax=ax, errorbar=None)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel)


def save_figure(fig: Figure, table: pd.DataFrame, directory: str | Path, stem: str, dpi: int = 110) -> tuple[Path, Path]:
    """Write ``stem.png`` and ``stem.csv`` (the figure's table) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, csv = directory / f"{stem}.png", directory / f"{stem}.csv"
    fig.savefig(png, dpi=dpi, bbox_inches="tight")
    table.to_csv(csv, index=False)
    return png, csv


# --------------------------------------------------------------------- Figure 2
def _step_frame(iterations: pd.DataFrame) -> pd.DataFrame:
    capacity = iterations["kv_blocks_capacity"] * iterations["block_size"]
    tokens = iterations["num_prefill_tokens"] + iterations["num_decode_tokens"]
    committed = (iterations["kv_blocks_used"] + iterations["kv_blocks_reserved"]) * iterations["block_size"]
    return iterations.assign(
        gpu_utilization=np.minimum(1.0, tokens / iterations["reference_token_budget"]),
        kvc_utilization=iterations["kv_tokens_stored"] / capacity,
        kvc_allocated=committed / capacity,
        kvc_allocated_unused=(committed - iterations["kv_tokens_stored"]) / capacity,
        kvc_reserved_unused=iterations["kv_blocks_reserved"] * iterations["block_size"] / capacity,
    )


def _time_binned(steps: pd.DataFrame, columns: Sequence[str], bins: int) -> pd.DataFrame:
    """Duration-weighted means of ``columns`` in ``bins`` equal time bins per run."""
    rows = []
    for key, run in steps.groupby([*KEYS, "seed"], sort=False):
        start = run["start_time_s"].to_numpy(float)
        duration = run["duration_s"].to_numpy(float)
        span = float(start[-1] + duration[-1] - start[0]) if len(run) else 0.0
        if span <= 0:
            continue
        width = span / bins
        index = np.minimum(((start - start[0]) / width).astype(int), bins - 1)
        weight = np.bincount(index, weights=duration, minlength=bins)
        keep = weight > 0
        row = {"time_s": (np.arange(bins)[keep] + 0.5) * width}
        for column in columns:
            total = np.bincount(index, weights=run[column].to_numpy(float) * duration, minlength=bins)
            row[column] = total[keep] / weight[keep]
        frame = pd.DataFrame(row)
        for name, value in zip([*KEYS, "seed"], key):
            frame[name] = value
        rows.append(frame)
    table = pd.concat(rows, ignore_index=True)
    mean = table.groupby([*KEYS, "time_s"], as_index=False, sort=False)[list(columns)].mean()
    return _sort(mean[[*KEYS, "time_s", *columns]], ["time_s"])


def table2(iterations: pd.DataFrame, schedulers: Sequence[str] | None = OBSERVED, bins: int = TIME_BINS) -> pd.DataFrame:
    """GPU token utilization and KVC utilization (stored, allocated) over time, per run, in
    ``bins`` time bins (duration-weighted means of the steps in a bin)."""
    steps = _step_frame(_select(iterations, schedulers))
    return _time_binned(steps, ["gpu_utilization", "kvc_utilization", "kvc_allocated"], bins)


def figure2(iterations: pd.DataFrame, schedulers: Sequence[str] | None = OBSERVED, deployment: str | None = None) -> Figure:
    """Observation: GPU compute and KVC utilization over time (reference rate), one row per dataset."""
    table = table2(iterations, schedulers)
    table = table[table["deployment"] == _deployment(table, deployment)]
    datasets, order = _datasets(table), _order(table["scheduler"], schedulers)
    fig, axes = _grid(len(datasets), 2, layout="constrained")
    for row, dataset in enumerate(datasets):
        part = table[table["dataset"] == dataset]
        for col, (column, label) in enumerate([("gpu_utilization", "GPU token utilization [%]"),
                                               ("kvc_utilization", "KVC utilization [%]")]):
            ax = axes[row, col]
            sns.lineplot(data=part.assign(v=100 * part[column]), x="time_s", y="v", hue="scheduler", hue_order=order,
                         palette=PALETTE, ax=ax)
            ax.set(title=f"{dataset}", xlabel="time [s]", ylabel=label, ylim=(0, 105))
    _legend(fig, axes)
    fig.suptitle(f"Figure 2: GPU and KVC utilization over time ({table['deployment'].iloc[0]}, reference rate)")
    return fig


# --------------------------------------------------------------------- Figure 3
def table3(sweep: pd.DataFrame, schedulers: Sequence[str] | None = OBSERVED) -> pd.DataFrame:
    """Preemption percentage and allocation failures (preemptions) per 100 requests, per
    deployment, dataset, scheduler and rate (``reference`` marks the reference rate)."""
    table = _select(sweep, schedulers).assign(
        preempted_percent=lambda t: 100 * t["preempted_fraction"],
        allocation_failures_per_100_requests=lambda t: 100 * t["num_preemptions"] / t["num_requests"],
    )
    mean = _seed_mean(table, [*KEYS, "rate_rps", "reference"],
                      ["preempted_percent", "allocation_failures_per_100_requests"])
    return _sort(mean, ["rate_rps"])


def figure3(sweep: pd.DataFrame, schedulers: Sequence[str] | None = OBSERVED) -> Figure:
    """Observation: preemption percentage vs rate (per dataset) and allocation failures at the
    reference rate."""
    table = table3(sweep, schedulers)
    datasets, order = _datasets(table), _order(table["scheduler"], schedulers)
    deployments = list(dict.fromkeys(table["deployment"]))
    fig, axes = _grid(len(deployments), len(datasets) + 1, layout="constrained")
    for row, deployment in enumerate(deployments):
        part = table[table["deployment"] == deployment]
        for col, dataset in enumerate(datasets):
            ax = axes[row, col]
            sns.lineplot(data=part[part["dataset"] == dataset], x="rate_rps", y="preempted_percent", hue="scheduler",
                         hue_order=order, palette=PALETTE, marker="o", ax=ax)
            ax.set(title=f"{dataset} ({deployment})", xlabel="request rate [req/s]", ylabel="requests preempted [%]")
        _bars(axes[row, -1], part[part["reference"].astype(bool)], "allocation_failures_per_100_requests", order,
              "allocation failures / 100 requests")
        axes[row, -1].set_title("at the reference rate")
    _legend(fig, axes)
    fig.suptitle("Figure 3: preemptions and KVC allocation failures")
    return fig


# --------------------------------------------------------------------- Figure 4
def table4(iterations: pd.DataFrame, schedulers: Sequence[str] | None = None) -> pd.DataFrame:
    """Scheduler wall time per step [ms] (mean, p50, p99), its share of the (simulated)
    iteration time [%], and steps per run, at the reference rate (step by step)."""
    rows = []
    for key, run in _select(iterations, schedulers).groupby([*KEYS, "seed"], sort=False):
        wall = run["scheduler_wall_time_s"].to_numpy(float) * 1e3
        rows.append({
            **dict(zip([*KEYS, "seed"], key)),
            "steps": len(run),
            "skipped_steps": int(run["skipped"].sum()),
            "mean_scheduler_ms_per_step": float(wall.mean()),
            "p50_scheduler_ms_per_step": float(np.quantile(wall, 0.5)),
            "p99_scheduler_ms_per_step": float(np.quantile(wall, 0.99)),
            "mean_iteration_ms": float(run["duration_s"].mean() * 1e3),
            "scheduler_share_percent": float(100 * wall.sum() / 1e3 / run["duration_s"].sum()),
        })
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c not in (*KEYS, "seed")]
    return _sort(_seed_mean(table, KEYS, columns))


def figure4(iterations: pd.DataFrame, schedulers: Sequence[str] | None = None, deployment: str | None = None) -> Figure:
    """Observation: scheduler time per iteration and its share of iteration time."""
    table = table4(iterations, schedulers)
    table = table[table["deployment"] == _deployment(table, deployment)]
    order = _order(table["scheduler"], schedulers)
    fig, axes = _grid(1, 2, width=5.5, layout="constrained")
    _bars(axes[0, 0], table, "mean_scheduler_ms_per_step", order, "scheduler time per step [ms]")
    axes[0, 0].set_yscale("log")
    _bars(axes[0, 1], table, "scheduler_share_percent", order, "share of iteration time [%]")
    _legend(fig, axes)
    fig.suptitle(f"Figure 4: scheduling time per iteration ({table['deployment'].iloc[0]}, reference rate; "
                 "wall time of the Python policy vs simulated step time)")
    return fig


# --------------------------------------------------------------------- Figure 5
def table5(iterations: pd.DataFrame, schedulers: Sequence[str] | None = ALLOCATION_SCHEDULERS) -> pd.DataFrame:
    """Allocated-but-unused KV, time-averaged over the reference run: blocks reserved and not
    yet written, and all committed-but-unused token slots (reserved + the unwritten tail of
    used blocks), as % of KV capacity and as % of what is committed."""
    steps = _step_frame(_select(iterations, schedulers))
    weight = steps["duration_s"]
    rows = []
    for key, run in steps.groupby([*KEYS, "seed"], sort=False):
        w = run["duration_s"].to_numpy(float)
        committed = run["kvc_allocated"].to_numpy(float)
        unused = run["kvc_allocated_unused"].to_numpy(float)
        share = np.divide(unused, committed, out=np.zeros_like(unused), where=committed > 0)
        rows.append({
            **dict(zip([*KEYS, "seed"], key)),
            "reserved_unused_percent_of_capacity": float(100 * np.average(run["kvc_reserved_unused"], weights=w)),
            "allocated_unused_percent_of_capacity": float(100 * np.average(unused, weights=w)),
            "allocated_unused_percent_of_allocated": float(100 * np.average(share, weights=w)),
            "kvc_allocated_percent": float(100 * np.average(committed, weights=w)),
            "kvc_used_percent": float(100 * np.average(run["kvc_utilization"], weights=w)),
        })
    del weight
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c not in (*KEYS, "seed")]
    return _sort(_seed_mean(table, KEYS, columns))


def figure5(iterations: pd.DataFrame, schedulers: Sequence[str] | None = ALLOCATION_SCHEDULERS,
            deployment: str | None = None, dataset: str | None = None) -> Figure:
    """Observation: allocated-but-unused KV under maximum (Orca), exact (EconoServe without
    KVCPipe), exact + KVCPipe, and on-demand (vLLM) allocation."""
    table = table5(iterations, schedulers)
    deployment = _deployment(table, deployment)
    table = table[table["deployment"] == deployment]
    order = _order(table["scheduler"], schedulers)
    steps = _step_frame(_select(iterations, schedulers))
    steps = steps[steps["deployment"] == deployment]
    dataset = dataset or ("sharegpt" if "sharegpt" in set(steps["dataset"]) else _datasets(steps)[0])
    series = _time_binned(steps[steps["dataset"] == dataset], ["kvc_allocated_unused", "kvc_utilization"], TIME_BINS)
    fig, axes = _grid(1, 3, layout="constrained")
    ax = axes[0, 0]
    sns.lineplot(data=series.assign(v=100 * series["kvc_allocated_unused"]), x="time_s", y="v", hue="scheduler",
                 hue_order=order, palette=PALETTE, ax=ax)
    ax.set(title=f"{dataset}: allocated but unused", xlabel="time [s]", ylabel="% of KV capacity")
    _bars(axes[0, 1], table, "allocated_unused_percent_of_capacity", order, "allocated unused [% of capacity]")
    _bars(axes[0, 2], table, "allocated_unused_percent_of_allocated", order, "allocated unused [% of allocated]")
    _legend(fig, axes)
    fig.suptitle(f"Figure 5: KV allocated but not (yet) used ({deployment}, reference rate)")
    return fig


# --------------------------------------------------------------------- Figures 7-9
_RATE_METRICS = ("throughput_rps", "output_tokens_per_s", "mean_normalized_latency_s", "mean_jct_s", "p99_jct_s",
                 "slo_attainment", "mean_ttft_s", "mean_tbt_s")


def rate_table(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS,
               columns: Sequence[str] = _RATE_METRICS) -> pd.DataFrame:
    """Mean over seeds of ``columns`` per deployment, dataset, scheduler and rate."""
    mean = _seed_mean(_select(sweep, schedulers), [*KEYS, "rate_rps"], columns)
    return _sort(mean, ["rate_rps"])


def _rate_figure(table: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str,
                 schedulers: Sequence[str] | None, logy: bool = False, hline: float | None = None) -> Figure:
    datasets, order = _datasets(table), _order(table["scheduler"], schedulers)
    deployments = list(dict.fromkeys(table["deployment"]))
    fig, axes = _grid(len(deployments), len(datasets), layout="constrained")
    for row, deployment in enumerate(deployments):
        for col, dataset in enumerate(datasets):
            ax = axes[row, col]
            part = table[(table["deployment"] == deployment) & (table["dataset"] == dataset)]
            sns.lineplot(data=part, x=x, y=y, hue="scheduler", hue_order=order, palette=PALETTE, marker="o",
                         sort=False, estimator=None, ax=ax)
            if hline is not None:
                ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
            if logy:
                ax.set_yscale("log")
            ax.set(title=f"{dataset} ({deployment})", xlabel=xlabel, ylabel=ylabel)
    _legend(fig, axes)
    fig.suptitle(title)
    return fig


def table7(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> pd.DataFrame:
    """Throughput [req/s, output tokens/s] and mean normalized latency [s/token] per rate."""
    return rate_table(sweep, schedulers, ("throughput_rps", "output_tokens_per_s", "mean_normalized_latency_s"))


def figure7(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> Figure:
    """Throughput vs normalized latency, per dataset (columns) and model (rows)."""
    return _rate_figure(table7(sweep, schedulers), "throughput_rps", "mean_normalized_latency_s",
                        "throughput [req/s]", "normalized latency [s/token]",
                        "Figure 7: throughput vs normalized latency", schedulers, logy=True)


def table8(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> pd.DataFrame:
    """Mean and p99 JCT [s] per rate."""
    return rate_table(sweep, schedulers, ("mean_jct_s", "p99_jct_s"))


def figure8(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> Figure:
    """Mean JCT vs request rate."""
    return _rate_figure(table8(sweep, schedulers), "rate_rps", "mean_jct_s", "request rate [req/s]",
                        "mean JCT [s]", "Figure 8: JCT vs request rate", schedulers, logy=True)


def table9(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> pd.DataFrame:
    """SLO attainment per rate, and each scheduler's goodput (highest rate with attainment >=
    0.9 and every lower swept rate too) repeated on its rows."""
    table = rate_table(sweep, schedulers, ("slo_attainment",))
    goodput = goodput_from_table(table, by=list(KEYS))
    return _sort(table.merge(goodput, on=list(KEYS), how="left"), ["rate_rps"])


def figure9(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> Figure:
    """SLO satisfaction ratio vs request rate (dashed: the goodput target)."""
    table = table9(sweep, schedulers).assign(slo_percent=lambda t: 100 * t["slo_attainment"])
    return _rate_figure(table, "rate_rps", "slo_percent", "request rate [req/s]", "requests meeting SLO [%]",
                        "Figure 9: SLO satisfaction vs request rate", schedulers, hline=100 * GOODPUT_TARGET)


# --------------------------------------------------------------------- Figures 10, 11
def table10(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> pd.DataFrame:
    """KVC utilization, KVC allocation efficiency and GPU token utilization [%] at the reference rate."""
    table = _reference_rows(_select(sweep, schedulers))
    mean = _seed_mean(table, [*KEYS, "rate_rps"],
                      ["mean_kvc_utilization", "kvc_allocation_efficiency", "mean_gpu_token_utilization"])
    for column in ("mean_kvc_utilization", "kvc_allocation_efficiency", "mean_gpu_token_utilization"):
        mean[column] = 100 * mean[column]
    return _sort(mean.rename(columns={"mean_kvc_utilization": "kvc_utilization_percent",
                                      "kvc_allocation_efficiency": "kvc_allocation_efficiency_percent",
                                      "mean_gpu_token_utilization": "gpu_utilization_percent"}))


def _reference_bars(table: pd.DataFrame, panels: Sequence[tuple[str, str]], schedulers, title: str,
                    logy: Sequence[str] = ()) -> Figure:
    order = _order(table["scheduler"], schedulers)
    deployments = list(dict.fromkeys(table["deployment"]))
    fig, axes = _grid(len(deployments), len(panels), width=4.8, layout="constrained")
    for row, deployment in enumerate(deployments):
        part = table[table["deployment"] == deployment]
        for col, (column, label) in enumerate(panels):
            _bars(axes[row, col], part, column, order, label)
            axes[row, col].set_title(deployment)
            if column in logy:
                axes[row, col].set_yscale("log")
    _legend(fig, axes)
    fig.suptitle(title)
    return fig


def figure10(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> Figure:
    """KVC utilization, KVC allocation efficiency and GPU utilization per scheduler (reference rate)."""
    return _reference_bars(table10(sweep, schedulers),
                           [("kvc_utilization_percent", "KVC utilization [%]"),
                            ("kvc_allocation_efficiency_percent", "KVC allocation efficiency [%]"),
                            ("gpu_utilization_percent", "GPU token utilization [%]")],
                           schedulers, "Figure 10: KVC and GPU utilization (reference rate)")


def table11(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> pd.DataFrame:
    """Preempted requests [%], scheduler time per request [ms] and scheduler invocations per
    request at the reference rate (step-by-step runs, so the times are per real step)."""
    table = _reference_rows(_select(sweep, schedulers)).assign(
        preempted_percent=lambda t: 100 * t["preempted_fraction"],
        scheduler_ms_per_request=lambda t: 1e3 * t["scheduler_time_per_request_s"],
        invocations_per_request=lambda t: t["scheduler_invocations"] / t["num_requests"],
        invocations_per_iteration=lambda t: t["scheduler_invocations"] / t["num_iterations"],
    )
    return _sort(_seed_mean(table, [*KEYS, "rate_rps"], ["preempted_percent", "scheduler_ms_per_request",
                                                         "invocations_per_request", "invocations_per_iteration"]))


def figure11(sweep: pd.DataFrame, schedulers: Sequence[str] | None = MAIN_SCHEDULERS) -> Figure:
    """Preemption percentage, scheduling time and scheduler invocations per request (reference rate)."""
    return _reference_bars(table11(sweep, schedulers),
                           [("preempted_percent", "requests preempted [%]"),
                            ("scheduler_ms_per_request", "scheduler time per request [ms]"),
                            ("invocations_per_request", "scheduler invocations per request")],
                           schedulers, "Figure 11: preemptions and scheduling cost (reference rate)")


# --------------------------------------------------------------------- Figure 13
def table13(sweep: pd.DataFrame, variants: Sequence[str] | None = ABLATIONS) -> pd.DataFrame:
    """Ablation: per variant, goodput [req/s] over the sweep (also as % of EconoServe's), and mean
    JCT [s], SLO attainment and throughput [req/s] at the reference rate."""
    table = _select(sweep, variants)
    mean = rate_table(table, variants, ("slo_attainment", "mean_jct_s", "throughput_rps"))
    goodput = goodput_from_table(mean, by=list(KEYS))
    reference = _seed_mean(_reference_rows(table), [*KEYS, "rate_rps"], ["mean_jct_s", "slo_attainment", "throughput_rps"])
    reference = reference.rename(columns={"rate_rps": "reference_rate_rps", "mean_jct_s": "reference_mean_jct_s",
                                          "slo_attainment": "reference_slo_attainment",
                                          "throughput_rps": "reference_throughput_rps"})
    table = goodput.merge(reference, on=list(KEYS), how="outer")
    full = table[table["scheduler"] == ECONOSERVE].set_index(["deployment", "dataset"])["goodput_rps"]
    anchor = [full.get((d, s), np.nan) for d, s in zip(table["deployment"], table["dataset"])]
    table["goodput_vs_econoserve_percent"] = 100 * table["goodput_rps"] / np.asarray(anchor, dtype=float)
    return _sort(table)


def figure13(sweep: pd.DataFrame, variants: Sequence[str] | None = ABLATIONS) -> Figure:
    """Ablation of EconoServe's components: goodput, JCT and SLO attainment at the reference rate."""
    table = table13(sweep, variants).assign(reference_slo_percent=lambda t: 100 * t["reference_slo_attainment"])
    goodput = ("goodput_vs_econoserve_percent", "goodput [% of EconoServe's]") if ECONOSERVE in set(table["scheduler"]) \
        else ("goodput_rps", "goodput [req/s]")
    return _reference_bars(table, [goodput, ("reference_mean_jct_s", "mean JCT [s]"),
                                   ("reference_slo_percent", "requests meeting SLO [%]")],
                           variants, "Figure 13: ablation (JCT and SLO at the reference rate)")


# --------------------------------------------------------------------- Figure 14
SENSITIVITY_LABELS = {
    "rl_error": "RL prediction error [relative]",
    "rl_padding": "RL padding [ratio]",
    "rl_bucket": "RL bucket width [tokens]",
    "reserve_ratio": "reserve ratio [fraction of KV]",
}


def table14(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """Sensitivity: mean JCT [s], SLO attainment, throughput [req/s] and preempted fraction per
    knob value (mean over seeds)."""
    if sensitivity.empty:
        raise ValueError("no sensitivity runs")
    mean = _seed_mean(sensitivity, [*KEYS, "rate_rps", "knob", "value"],
                      ["mean_jct_s", "slo_attainment", "throughput_rps", "preempted_fraction",
                       "mean_kvc_utilization"])
    knob_order = {k: i for i, k in enumerate(SENSITIVITY_LABELS)}
    mean = mean.assign(_k=mean["knob"].map(knob_order)).sort_values(["deployment", "dataset", "_k", "value"], kind="stable")
    return mean.drop(columns="_k").reset_index(drop=True)


def figure14(sensitivity: pd.DataFrame, deployment: str | None = None) -> Figure:
    """Sensitivity of EconoServe to RL error, padding, bucket width and reserve ratio: mean JCT
    (top) and SLO attainment (bottom), one line per dataset."""
    table = table14(sensitivity)
    table = table[table["deployment"] == _deployment(table, deployment)]
    knobs = [k for k in SENSITIVITY_LABELS if k in set(table["knob"])]
    fig, axes = _grid(2, len(knobs), width=3.8, layout="constrained")
    for col, knob in enumerate(knobs):
        part = table[table["knob"] == knob].assign(slo_percent=lambda t: 100 * t["slo_attainment"])
        for row, (column, label) in enumerate([("mean_jct_s", "mean JCT [s]"), ("slo_percent", "requests meeting SLO [%]")]):
            ax = axes[row, col]
            sns.lineplot(data=part, x="value", y=column, hue="dataset", marker="o", ax=ax)
            ax.set(xlabel=SENSITIVITY_LABELS[knob], ylabel=label)
    _legend(fig, axes)
    fig.suptitle(f"Figure 14: sensitivity ({table['scheduler'].iloc[0]}, {table['deployment'].iloc[0]})")
    return fig


#: Figure number -> (file stem, table function, figure function, input table name).
FIGURES: dict[int, tuple[str, object, object, str]] = {
    2: ("fig02_utilization_over_time", table2, figure2, "iterations"),
    3: ("fig03_preemptions", table3, figure3, "sweep"),
    4: ("fig04_scheduling_time", table4, figure4, "iterations"),
    5: ("fig05_allocated_unused_kv", table5, figure5, "iterations"),
    7: ("fig07_throughput_vs_latency", table7, figure7, "sweep"),
    8: ("fig08_jct_vs_rate", table8, figure8, "sweep"),
    9: ("fig09_slo_vs_rate", table9, figure9, "sweep"),
    10: ("fig10_utilization", table10, figure10, "sweep"),
    11: ("fig11_preemption_scheduling", table11, figure11, "sweep"),
    13: ("fig13_ablation", table13, figure13, "sweep"),
    14: ("fig14_sensitivity", table14, figure14, "sensitivity"),
}


def plan_selection(plan: dict, number: int) -> dict[str, list[str]]:
    """Which schedulers figure ``number`` draws for an experiment plan (its ``to_dict()``), as
    keyword arguments of the figure's functions: the plan's main schedulers (Figures 7-11), its
    ablation variants (13), its main schedulers that are not variants (the observation Figures 2
    and 3); the other figures draw what their tables hold (4) or a fixed comparison (5, 14)."""
    main, variants = list(plan["schedulers"]), list(plan["ablations"])
    if number in (7, 8, 9, 10, 11):
        return {"schedulers": main}
    if number == 13:
        return {"variants": variants}
    if number in (2, 3):
        return {"schedulers": [s for s in main if s not in variants]}
    return {}


def render(number: int, results, directory: str | Path) -> Figure:
    """Draw figure ``number`` from an :class:`~econoserve.experiments.ExperimentResults` (the
    schedulers its plan names, :func:`plan_selection`), write ``figNN_*.png`` and ``.csv`` into
    ``directory``, and return the figure."""
    stem, table_function, figure_function, source = FIGURES[number]
    data = getattr(results, source)
    selection = plan_selection(results.plan, number)
    fig = figure_function(data, **selection)
    save_figure(fig, table_function(data, **selection), directory, stem)
    return fig


__all__ = [
    "ALLOCATION_SCHEDULERS", "FIGURES", "OBSERVED", "PALETTE", "SCHEDULER_ORDER", "figure2", "figure3", "figure4",
    "figure5", "figure7", "figure8", "figure9", "figure10", "figure11", "figure13", "figure14", "plan_selection",
    "rate_table", "render",
    "save_figure", "table2", "table3", "table4", "table5", "table7", "table8", "table9", "table10", "table11",
    "table13", "table14",
]

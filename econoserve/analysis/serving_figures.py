"""Figure 15 of PAPER.md: real vLLM serving, EconoServe's scheduler beside vLLM's own on one trace,
and the simulator's fidelity on the same runs. Pure functions of a
:class:`~econoserve.serving.study.StudyResult`'s tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from econoserve.results import finished, kv_block_usage, kv_reserved_fraction


def table15(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per scheduler: the real run's metrics (its median round), the medians (and ranges)
    over rounds of its ratios to the first scheduler in the same round, and the simulator's
    per-request errors and preemptions: with the profile's latency model, and refitted to the
    other schedulers' runs (``crossfit_``) and to the run's own steps (``selffit_``)."""
    ratios = [c for c in summary.columns if c.endswith("_ratio") and c.split("_", 1)[0] in ("median", "min", "max")]
    columns = ["scheduler", *[c for c in summary.columns if c.startswith("real_")], "rounds", *ratios,
               *[c for c in summary.columns if c.startswith("sim_")], "median_jct_error", "p90_jct_error", "median_ttft_error", "p90_ttft_error",
               "mean_jct_sim_s", "mean_ttft_sim_s", "compared",
               *[f"{fit}_{column}" for fit in ("crossfit", "selffit") for column in
                 ("median_jct_error", "p90_jct_error", "median_ttft_error", "num_preemptions")]]
    return summary[[c for c in columns if c in summary.columns]].reset_index(drop=True)


def figure15(real_requests: Mapping[str, pd.DataFrame], real_iterations: Mapping[str, pd.DataFrame],
             errors: pd.DataFrame, summary: pd.DataFrame | None = None) -> Figure:
    """(a) JCT and (b) TTFT distributions of the real runs, (c) KV cache used and reserved over
    time in the real engine, (d) preemptions per scheduler (real, and simulated where ``summary``
    has ``sim_num_preemptions``), (e) preemptions over time, (f) simulated vs real JCT per request."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    (jct_ax, ttft_ax, kv_ax), (preempt_ax, preempt_time_ax, scatter_ax) = axes
    colours = dict(zip(real_requests, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for scheduler, requests in real_requests.items():
        colour = colours[scheduler]
        done = finished(requests)
        for ax, column in ((jct_ax, "jct_s"), (ttft_ax, "ttft_s")):
            values = np.sort(done[column].to_numpy(float))
            ax.plot(values, np.arange(1, len(values) + 1) / max(len(values), 1), label=scheduler, color=colour)
        steps = real_iterations[scheduler]
        usage = kv_block_usage(steps)
        kv_ax.plot(steps["start_time_s"], usage, label=f"{scheduler}: used", color=colour, lw=0.8)
        reserved = kv_reserved_fraction(steps)
        if (reserved > 0).any():
            kv_ax.plot(steps["start_time_s"], usage + reserved, label=f"{scheduler}: used + reserved",
                       color=colour, lw=0.8, ls="--")
        preempt_time_ax.step(steps["start_time_s"], steps["num_preempted"].cumsum(), where="post", label=scheduler,
                             color=colour)
        mine = errors[errors["scheduler"] == scheduler]
        scatter_ax.scatter(mine["jct_s_real"], mine["jct_s_sim"], s=8, alpha=0.6, label=scheduler, color=colour)
    _preemption_bars(preempt_ax, real_requests, summary, colours)
    jct_ax.set(xlabel="JCT [s]", ylabel="fraction of requests", title="(a) JCT, real engine")
    ttft_ax.set(xlabel="TTFT [s]", ylabel="fraction of requests", title="(b) TTFT, real engine")
    kv_ax.set(xlabel="time [s]", ylabel="KV blocks / total", title="(c) KV cache used and reserved, real engine")
    preempt_time_ax.set(xlabel="time [s]", ylabel="preemptions so far", title="(e) preemptions over time, real engine")
    top = float(np.nanmax(errors[["jct_s_real", "jct_s_sim"]].to_numpy())) if len(errors) else 1.0
    scatter_ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    scatter_ax.set(xlabel="real JCT [s]", ylabel="simulated JCT [s]", title="(f) simulator vs real engine")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.suptitle("Figure 15: real vLLM serving — EconoServe's scheduler beside vLLM's default")
    return fig


def _preemption_bars(ax, real_requests: Mapping[str, pd.DataFrame], summary: pd.DataFrame | None,
                     colours: Mapping[str, str]) -> None:
    """Preemptions per scheduler: real (solid) and, where known, simulated (hatched)."""
    names = list(real_requests)
    positions = np.arange(len(names))
    real = [int(real_requests[n]["num_preemptions"].sum()) for n in names]
    simulated = None
    if summary is not None and "sim_num_preemptions" in summary:
        by_name = summary.set_index("scheduler")["sim_num_preemptions"]
        simulated = [float(by_name.get(n, np.nan)) for n in names]
    width = 0.4 if simulated is not None else 0.6
    ax.bar(positions - (width / 2 if simulated is not None else 0), real, width, label="real engine",
           color=[colours[n] for n in names])
    if simulated is not None:
        ax.bar(positions + width / 2, simulated, width, label="simulator", color=[colours[n] for n in names],
               alpha=0.45, hatch="//")
    ax.set_xticks(positions, names)
    ax.set(ylabel="preemptions", title="(d) preemptions per scheduler")

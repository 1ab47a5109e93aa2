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


def table15(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per scheduler: the real run's metrics and the simulator's per-request errors."""
    columns = ["scheduler", *[c for c in summary.columns if c.startswith("real_")],
               "median_jct_error", "p90_jct_error", "median_ttft_error", "p90_ttft_error",
               "mean_jct_sim_s", "mean_ttft_sim_s", "compared",
               "crossfit_median_jct_error", "crossfit_p90_jct_error", "crossfit_median_ttft_error"]
    return summary[[c for c in columns if c in summary.columns]].reset_index(drop=True)


def figure15(real_requests: Mapping[str, pd.DataFrame], real_iterations: Mapping[str, pd.DataFrame],
             errors: pd.DataFrame) -> Figure:
    """(a) JCT and (b) TTFT distributions of the real runs, (c) KV cache use over time in the real
    engine, (d) simulated vs real JCT per request."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), constrained_layout=True)
    colours = dict(zip(real_requests, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for scheduler, requests in real_requests.items():
        done = requests[requests["completed"]]
        for ax, column in ((axes[0], "jct_s"), (axes[1], "ttft_s")):
            values = np.sort(done[column].to_numpy(float))
            ax.plot(values, np.arange(1, len(values) + 1) / max(len(values), 1), label=scheduler,
                    color=colours[scheduler])
        steps = real_iterations[scheduler]
        axes[2].plot(steps["start_time_s"], steps["kv_usage"], label=scheduler, color=colours[scheduler], lw=0.8)
        mine = errors[errors["scheduler"] == scheduler]
        axes[3].scatter(mine["jct_s_real"], mine["jct_s_sim"], s=8, alpha=0.6, label=scheduler,
                        color=colours[scheduler])
    axes[0].set(xlabel="JCT [s]", ylabel="fraction of requests", title="(a) JCT, real engine")
    axes[1].set(xlabel="TTFT [s]", ylabel="fraction of requests", title="(b) TTFT, real engine")
    axes[2].set(xlabel="time [s]", ylabel="KV blocks used / total", title="(c) KV cache use, real engine")
    top = float(np.nanmax(errors[["jct_s_real", "jct_s_sim"]].to_numpy())) if len(errors) else 1.0
    axes[3].plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    axes[3].set(xlabel="real JCT [s]", ylabel="simulated JCT [s]", title="(d) simulator vs real engine")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Figure 15: real vLLM serving — EconoServe's scheduler beside vLLM's default")
    return fig

"""Trace characteristics (Figure 1): length distributions per dataset and arrival burstiness.

The functions take request tables as :func:`econoserve.workload.datasets.load_requests` returns
them (columns ``dataset``, ``prompt_tokens``, ``output_tokens``, optional ``timestamp_s``), so a
figure is a pure function of data and can be redrawn without reloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from econoserve.workload.arrivals import interarrival_cv
from econoserve.workload.datasets import LoadOptions, load_requests

LENGTH_COLUMNS = {"prompt_tokens": "prompt length [tokens]", "output_tokens": "response length [tokens]"}
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


@dataclass(frozen=True)
class TraceSample:
    """Requests of several datasets, sampled to at most ``sample_size`` per dataset."""

    requests: pd.DataFrame
    sample_size: int
    seed: int


def sample_requests(
    datasets: Sequence[str],
    tokenizer: str,
    sample_size: int,
    seed: int,
    options: LoadOptions = LoadOptions(),
) -> TraceSample:
    """Load each dataset and keep a seeded sample of at most ``sample_size`` requests of each."""
    frames = []
    for index, dataset in enumerate(datasets):
        requests = load_requests(dataset, tokenizer, options)
        if len(requests) > sample_size:
            requests = requests.sample(n=sample_size, random_state=seed + index).sort_index()
        frames.append(requests[["dataset", "prompt_tokens", "output_tokens"]])
    return TraceSample(pd.concat(frames, ignore_index=True), sample_size, seed)


def length_summary(requests: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: request count and mean / p50 / p90 / p99 of prompt and response tokens."""
    rows = []
    for dataset, group in requests.groupby("dataset", sort=False):
        row: dict[str, object] = {"dataset": dataset, "num_requests": len(group)}
        for column in LENGTH_COLUMNS:
            values = group[column]
            row[f"{column}_mean"] = round(float(values.mean()), 1)
            for name, q in QUANTILES.items():
                row[f"{column}_{name}"] = round(float(values.quantile(q)), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def arrival_burstiness(timestamps_s: np.ndarray, bin_s: float = 60.0) -> dict[str, float]:
    """Inter-arrival CV (1 for Poisson, > 1 bursty) and requests per second per ``bin_s`` window."""
    timestamps_s = np.sort(np.asarray(timestamps_s, dtype=float))
    rates = requests_per_second(timestamps_s, bin_s)
    return {
        "num_requests": int(timestamps_s.size),
        "duration_s": float(timestamps_s[-1] - timestamps_s[0]),
        "mean_rate_rps": float(timestamps_s.size / max(timestamps_s[-1] - timestamps_s[0], 1e-9)),
        "interarrival_cv": interarrival_cv(timestamps_s),
        f"peak_rate_rps_{int(bin_s)}s": float(rates.max()),
        f"peak_to_mean_{int(bin_s)}s": float(rates.max() / rates.mean()),
    }


def requests_per_second(timestamps_s: np.ndarray, bin_s: float) -> np.ndarray:
    """Arrival rate [requests/s] in consecutive windows of ``bin_s`` seconds."""
    timestamps_s = np.asarray(timestamps_s, dtype=float)
    edges = np.arange(timestamps_s.min(), timestamps_s.max() + bin_s, bin_s)
    counts, _ = np.histogram(timestamps_s, bins=edges)
    return counts / bin_s


# --------------------------------------------------------------------- plots
def plot_length_cdf(requests: pd.DataFrame, column: str, ax: plt.Axes) -> None:
    """Empirical CDF of ``column`` per dataset, log-scaled tokens on x."""
    sns.ecdfplot(data=requests, x=column, hue="dataset", log_scale=True, ax=ax)
    ax.set_xlabel(LENGTH_COLUMNS[column])
    ax.set_ylabel("fraction of requests")


def plot_joint_density(requests: pd.DataFrame, axes: Sequence[plt.Axes]) -> None:
    """Prompt vs response length, one 2-D log-log histogram per dataset."""
    for ax, (dataset, group) in zip(axes, requests.groupby("dataset", sort=False)):
        sns.histplot(
            data=group, x="prompt_tokens", y="output_tokens", log_scale=(True, True),
            bins=30, cmap="mako_r", cbar=False, ax=ax,
        )
        ax.set_title(dataset)
        ax.set_xlabel(LENGTH_COLUMNS["prompt_tokens"])
        ax.set_ylabel(LENGTH_COLUMNS["output_tokens"])


def real_arrivals(datasets: Sequence[str]) -> dict[str, np.ndarray]:
    """Every arrival timestamp [s] of each timestamped dataset among ``datasets`` (not sampled)."""
    arrivals = {}
    for dataset in datasets:
        requests = load_requests(dataset)
        if "timestamp_s" in requests:
            arrivals[dataset] = np.sort(requests["timestamp_s"].to_numpy())
    return arrivals


def plot_arrival_rate(arrivals: dict[str, np.ndarray], ax: plt.Axes, bin_s: float = 60.0) -> None:
    """Requests per second over time for each trace, the inter-arrival CV in the legend."""
    for dataset, stamps in arrivals.items():
        rates = requests_per_second(stamps, bin_s)
        minutes = (np.arange(rates.size) * bin_s + stamps[0]) / 60.0
        ax.step(minutes, rates, where="post", label=f"{dataset} (gap CV {interarrival_cv(stamps):.2f})")
    ax.set_xlabel("time since trace start [min]")
    ax.set_ylabel(f"arrival rate [requests/s, {int(bin_s)} s bins]")
    if arrivals:
        ax.legend(fontsize="small")


def figure_trace_characteristics(
    sample: TraceSample, arrivals: dict[str, np.ndarray], bin_s: float = 60.0
) -> plt.Figure:
    """Figure 1: length CDFs and joint densities of the sampled requests, and the arrival rate
    over time of the real traces (``arrivals``: all timestamps [s] per trace, see :func:`real_arrivals`)."""
    datasets = list(dict.fromkeys(sample.requests["dataset"]))
    num_joint = len(datasets)
    fig = plt.figure(figsize=(4.2 * max(3, num_joint), 8.4), layout="constrained")
    grid = fig.add_gridspec(2, max(3, num_joint))
    plot_length_cdf(sample.requests, "prompt_tokens", fig.add_subplot(grid[0, 0]))
    plot_length_cdf(sample.requests, "output_tokens", fig.add_subplot(grid[0, 1]))
    plot_arrival_rate(arrivals, fig.add_subplot(grid[0, 2:]), bin_s)
    plot_joint_density(sample.requests, [fig.add_subplot(grid[1, i]) for i in range(num_joint)])
    fig.suptitle(f"Trace characteristics (up to {sample.sample_size} requests per dataset, seed {sample.seed})")
    return fig

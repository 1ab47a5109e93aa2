"""Figure 12 (GPUs needed vs target rate, against DistServe) and its headline claim, as pure
functions of the ``gpus`` table of :mod:`econoserve.experiments.gpus_needed`.

``table12(gpus)``     the numbers drawn (one row per model, dataset, SLO, system and target rate:
                      ``num_gpus``, NaN where no cluster within the cap reaches the rate);
``figure12(gpus)``    one panel per model x dataset (columns) and SLO definition (rows): GPUs
                      needed [GPUs] vs target rate [requests/s], one line per system; a rate a
                      system cannot reach within the cap is an ``x`` at the cap;
``gpu_claim(gpus)``   the claim "up to 78% fewer GPUs than DistServe at the same goodput": per
                      panel, the largest saving ``1 - GPUs_EconoServe / GPUs_DistServe`` over the
                      target rates both reach with a *steady* run (the requests simulated span
                      the plan's minimum duration; rates where the trace ran out are a short
                      burst and are left out, unless ``steady_only=False``), plus an ``all`` row
                      (the largest over panels), in the columns of
                      :func:`econoserve.analysis.claims.headline_claims` (and ``slo``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from econoserve.analysis.figures import _grid, _legend
from econoserve.experiments.gpus_needed import gpu_savings

#: Systems of Figure 12, in display order, with fixed colours.
SYSTEMS: tuple[str, ...] = ("econoserve", "vllm", "sarathi", "distserve")
PALETTE: dict[str, tuple] = dict(zip(SYSTEMS, sns.color_palette("tab10", len(SYSTEMS))))
PANEL_KEYS: tuple[str, ...] = ("model", "dataset", "slo")
CLAIM = "gpu_reduction_vs_distserve"
PAPER_GPU_REDUCTION = 78.0


def table12(gpus: pd.DataFrame) -> pd.DataFrame:
    columns = [*PANEL_KEYS, "slo_label", "system", "target_rate_rps", "num_gpus", "unit", "copies", "reachable", "reason"]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    table = gpus[[c for c in columns if c in gpus.columns]].copy()
    table["_order"] = table["system"].map(order).fillna(len(order))
    table = table.sort_values([*PANEL_KEYS, "_order", "target_rate_rps"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def figure12(gpus: pd.DataFrame, systems: Sequence[str] | None = None, max_gpus: float | None = None) -> Figure:
    table = table12(gpus)
    if systems is not None:
        table = table[table["system"].isin(systems)]
    panels = list(dict.fromkeys(zip(table["model"], table["dataset"])))
    slos = list(dict.fromkeys(table["slo"]))
    fig, axes = _grid(len(slos), len(panels), width=3.6, height=3.0, layout="constrained")
    cap = max_gpus if max_gpus is not None else np.nanmax(table["num_gpus"].to_numpy(float), initial=1.0)
    for i, slo in enumerate(slos):
        for j, (model, dataset) in enumerate(panels):
            ax = axes[i][j]
            data = table[(table["slo"] == slo) & (table["model"] == model) & (table["dataset"] == dataset)]
            for system, rows in data.groupby("system", sort=False):
                reached = rows[rows["reachable"].astype(bool)]
                ax.plot(reached["target_rate_rps"], reached["num_gpus"], marker="o", label=system,
                        color=PALETTE.get(system))
                missed = rows[~rows["reachable"].astype(bool)]
                ax.scatter(missed["target_rate_rps"], [cap] * len(missed), marker="x", color=PALETTE.get(system))
            label = data["slo_label"].iloc[0] if len(data) else slo
            ax.set_title(f"{model} / {dataset}\n{label}", fontsize=9)
            ax.set_xlabel("target rate [req/s]")
            ax.set_ylabel("GPUs needed")
            ax.set_ylim(bottom=0)
    _legend(fig, axes)
    fig.suptitle("Figure 12: GPUs needed to reach a target rate (x: not reachable within the cap)")
    return fig


def gpu_claim(gpus: pd.DataFrame, system: str = "econoserve", baseline: str = "distserve",
              steady_only: bool = True) -> pd.DataFrame:
    """Claim rows (see the module docstring); empty panels (no rate both reach) are left out."""
    savings = gpu_savings(gpus, system, baseline)
    if steady_only:
        savings = savings[savings["steady"]]
    rows = []
    for (model, dataset, slo), group in savings.groupby(list(PANEL_KEYS), sort=False):
        rows.append(_claim_row(group, baseline, model, dataset, slo))
    if len(savings):
        rows.append(_claim_row(savings, baseline, "all", "all", "all"))
    else:
        rows.append({"claim": CLAIM, "baseline": baseline, "deployment": "all", "dataset": "all", "slo": "all",
                     "paper": PAPER_GPU_REDUCTION, "measured": np.nan, "unit": "%", "at_rate_rps": np.nan,
                     "detail": "no target rate that both reach" + (" in a steady run" if steady_only else ""),
                     "met": False})
    return pd.DataFrame(rows)


def _claim_row(group: pd.DataFrame, baseline: str, model: str, dataset: str, slo: str) -> dict[str, object]:
    best = group.loc[group["saving"].idxmax()]
    measured = 100.0 * float(best["saving"])
    detail = (f"{best['gpus']:g} vs {best['baseline_gpus']:g} GPUs at {best['target_rate_rps']:g} req/s "
              f"({best['model']}, {best['dataset']}, SLO {best['slo']}); {len(group)} rate(s) both reach")
    return {"claim": CLAIM, "baseline": baseline, "deployment": model, "dataset": dataset, "slo": slo,
            "paper": PAPER_GPU_REDUCTION, "measured": measured, "unit": "%",
            "at_rate_rps": float(best["target_rate_rps"]), "detail": detail,
            "met": bool(measured >= PAPER_GPU_REDUCTION)}


def merge_claims(path, rows: pd.DataFrame) -> pd.DataFrame:
    """``headline_claims.csv`` at ``path`` (notebook 03 writes it) with this claim's rows replaced
    by ``rows``; written back and returned. A missing file starts empty."""
    from pathlib import Path

    path = Path(path)
    existing = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if "claim" in existing.columns:
        existing = existing[existing["claim"] != CLAIM]
    merged = pd.concat([existing, rows], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(path, index=False)
    return merged

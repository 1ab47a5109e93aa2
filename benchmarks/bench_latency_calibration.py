"""The roofline latency model against real GPU measurements, before and after calibration.

For every registered profile (DistServe's A100-80GB fits of its own engine and of vLLM's engine;
Vidur's Llama-2-70B A100 operator profiles), evaluated over its grid
(:class:`econoserve.sim.calibration.CalibrationGrid`: prompt lengths, decode batch sizes x
context lengths, every profiled TP), the absolute relative step-time error
``|predicted / measured - 1|`` (median and p90) of

* ``before``: the roofline with the literature's factors (:class:`RooflineParams` defaults);
* ``after``: the roofline with factors fitted per TP to that profile (all its models pooled);
* ``leave-one-TP-out``: fitted without TP 4, and TP 4 predicted with the nearest remaining
  TP's factors (the rule the ``calibrated`` latency model follows for an unmeasured TP);
* ``catalog``: the ``calibrated`` latency model as shipped (the catalog's A100-80GB factors,
  fitted to DistServe's own engine), on every profile: on Vidur's Llama-2-70B it is a transfer
  to a model and engine it was not fitted to.

Writes ``benchmarks/results/latency_calibration.md`` (the table), ``latency_calibration.csv``
(one row per profile, model, TP and variant), ``latency_calibration_points.csv`` (every grid
point with each prediction), ``latency_calibration.json`` (the fitted factors, the source of
the catalog's ``ROOFLINE_CALIBRATIONS``) and ``latency_calibration.png`` (predicted vs
measured step time).

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_latency_calibration.py [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.sim.calibration import (
    PROFILE_SOURCES,
    CalibrationGrid,
    calibrate_per_tp,
    calibrated_params,
    error_stats,
    nearest_tp,
    params_to_factors,
    profile_points,
    roofline_predictions_s,
)
from econoserve.sim.latency import RooflineParams

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_TP = 4
TARGET_MEDIAN, TARGET_P90 = 0.05, 0.10
QUICK_GRID = CalibrationGrid(prefill_lengths=(32, 128, 512, 2048), decode_batch_sizes=(1, 8, 32, 128),
                             context_lengths=(256, 1024))


def catalog_params(points: pd.DataFrame) -> dict[int, RooflineParams]:
    return {int(tp): calibrated_params(gpu, int(tp))[0] for (gpu, tp) in
            points[["gpu", "tensor_parallel"]].drop_duplicates().itertuples(index=False)}


def leave_one_tp_out(points: pd.DataFrame, fits: dict[int, RooflineParams]) -> tuple[np.ndarray, dict[int, RooflineParams]]:
    """Predictions at :data:`HELD_OUT_TP` from a calibration without it (NaN elsewhere)."""
    predicted = np.full(len(points), np.nan)
    held = points["tensor_parallel"] == HELD_OUT_TP
    if not held.any():
        return predicted, {}
    rest = calibrate_per_tp(points[~held]) if (~held).any() else {}
    if not rest:
        return predicted, {}
    chosen = {HELD_OUT_TP: rest[nearest_tp(HELD_OUT_TP, rest)]}
    predicted[held.to_numpy()] = roofline_predictions_s(points[held], chosen)
    return predicted, rest


def evaluate(source: str, grid: CalibrationGrid) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    points = profile_points(source, grid)
    fits = calibrate_per_tp(points)
    points["before_s"] = roofline_predictions_s(points, RooflineParams())
    points["after_s"] = roofline_predictions_s(points, fits)
    points["leave_one_tp_out_s"], _ = leave_one_tp_out(points, fits)
    points["catalog_s"] = roofline_predictions_s(points, catalog_params(points))
    rows = []
    for (model, tp), group in points.groupby(["model", "tensor_parallel"]):
        measured = group["measured_s"].to_numpy()
        for variant in ("before", "after", "leave_one_tp_out", "catalog"):
            predicted = group[f"{variant}_s"].to_numpy()
            if np.isnan(predicted).all():
                continue
            rows.append({"source": source, "model": model, "tensor_parallel": int(tp), "variant": variant,
                         "num_points": len(group), "measured_kind": group["measured_kind"].iloc[0],
                         **error_stats(predicted, measured)})
    factors = {str(tp): params_to_factors(p) for tp, p in fits.items()}
    return points, pd.DataFrame(rows), factors


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown(table: pd.DataFrame, points: pd.DataFrame, factors: dict, quick: bool) -> str:
    lines = [
        "# Roofline latency model vs real GPU step times" + (" (--quick grid)" if quick else ""),
        "",
        "Written by `benchmarks/bench_latency_calibration.py`. Absolute relative step-time error",
        "`|predicted / measured - 1|`, median / p90 over each profile's grid (prompt lengths, decode batch",
        "sizes x context lengths within the KV capacity). `before`: literature factors (RooflineParams",
        "defaults); `after`: factors fitted per TP to that profile (its models pooled); `LOTO`: TP 4",
        "predicted by a calibration without TP 4 (nearest remaining TP's factors); `catalog`: the shipped",
        "`--latency-model calibrated` (A100-80GB factors fitted to DistServe's own engine).",
        f"Target after calibration: median <= {_pct(TARGET_MEDIAN)}, p90 <= {_pct(TARGET_P90)}.",
        "",
        "| profile | model | TP | points | kind | before | after | LOTO (TP 4) | catalog | target met (after) |",
        "|---|---|---:|---:|---|---|---|---|---|---|",
    ]
    for (source, model, tp), group in table.groupby(["source", "model", "tensor_parallel"], sort=False):
        by_variant = group.set_index("variant")

        def cell(variant: str) -> str:
            if variant not in by_variant.index:
                return "-"
            row = by_variant.loc[variant]
            return f"{_pct(row['median_abs_rel_error'])} / {_pct(row['p90_abs_rel_error'])}"

        after = by_variant.loc["after"]
        met = after["median_abs_rel_error"] <= TARGET_MEDIAN and after["p90_abs_rel_error"] <= TARGET_P90
        lines.append(
            f"| {source} | {model} | {tp} | {after['num_points']} | {after['measured_kind']} | {cell('before')} | "
            f"{cell('after')} | {cell('leave_one_tp_out')} | {cell('catalog')} | {'yes' if met else '**no**'} |"
        )
    lines += ["", "## Where the calibrated roofline is off by more than the p90 target", "",
              "Grid points with `|after / measured - 1| > 10%`, per profile, model and TP:", ""]
    for (source, model, tp), group in points.groupby(["source", "model", "tensor_parallel"], sort=False):
        error = group["after_s"] / group["measured_s"] - 1
        bad = group[error.abs() > TARGET_P90]
        if bad.empty:
            continue
        parts = []
        for phase, rows in bad.groupby("phase"):
            signed = error[rows.index]
            if phase == "prefill":
                what = ", ".join(f"{int(n)}" for n in rows["prefill_tokens"])
                parts.append(f"{len(rows)} prefill (prompt tokens {what}; error {_pct(signed.min())} to {_pct(signed.max())})")
            else:
                what = ", ".join(sorted({f"{int(b)}" for b in rows["decode_tokens"]}, key=int))
                parts.append(f"{len(rows)} decode (batch sizes {what}; error {_pct(signed.min())} to {_pct(signed.max())})")
        lines.append(f"- {source} {model} TP {tp}: {len(bad)} of {len(group)} points: " + "; ".join(parts))
    lines += ["", "## Fitted factors per profile and TP", "",
              "| profile | TP | compute eff. | attention eff. | memory eff. | interconnect eff. | all-reduce fixed [us] | step overhead [ms] | overlap k |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for source, by_tp in factors.items():
        for tp, f in sorted(by_tp.items(), key=lambda item: int(item[0])):
            lines.append(
                f"| {source} | {tp} | {f['compute_efficiency']:.3f} | {f['attention_compute_efficiency']:.3f} | "
                f"{f['memory_efficiency']:.3f} | {f['interconnect_efficiency']:.3f} | {f['allreduce_latency_s'] * 1e6:.1f} | "
                f"{f['step_overhead_s'] * 1e3:.2f} | {f['overlap_exponent']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def figure(points: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(points["source"].unique())
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4.6), squeeze=False)
    for ax, source in zip(axes[0], sources):
        group = points[points["source"] == source]
        measured = group["measured_s"] * 1e3
        ax.scatter(measured, group["before_s"] * 1e3, s=8, alpha=0.5, label="roofline (literature factors)")
        ax.scatter(measured, group["after_s"] * 1e3, s=8, alpha=0.6, label="calibrated per TP")
        low, high = measured.min() * 0.8, measured.max() * 1.25
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="measured step time [ms]", ylabel="predicted step time [ms]",
               title=source)
        ax.legend(fontsize=8)
    fig.suptitle("Step time: roofline vs real A100 measurements (DistServe fits, Vidur operator profiles)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a coarse grid (a few seconds)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the tables go (default: benchmarks/results)")
    args = parser.parse_args()
    grid = QUICK_GRID if args.quick else CalibrationGrid()
    all_points, tables, factors = [], [], {}
    for source in PROFILE_SOURCES:
        points, table, fitted = evaluate(source, grid)
        all_points.append(points)
        tables.append(table)
        factors[source] = fitted
    points, table = pd.concat(all_points, ignore_index=True), pd.concat(tables, ignore_index=True)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    table.to_csv(out / f"latency_calibration{suffix}.csv", index=False, float_format="%.5g")
    points.to_csv(out / f"latency_calibration_points{suffix}.csv", index=False, float_format="%.6g")
    (out / f"latency_calibration{suffix}.json").write_text(json.dumps(factors, indent=2, sort_keys=True) + "\n")
    (out / f"latency_calibration{suffix}.md").write_text(markdown(table, points, factors, args.quick))
    figure(points, out / f"latency_calibration{suffix}.png")
    print((out / f"latency_calibration{suffix}.md").read_text())


if __name__ == "__main__":
    main()

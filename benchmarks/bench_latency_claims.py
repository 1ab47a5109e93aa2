"""How notebook 03's headline claims move when the simulator runs on measured A100 step times.

Runs notebook 03's quick profile (OPT-13B on 1 x A100-80GB, Alpaca / ShareGPT / QMSum, every
scheduler and ablation, the automatic rate grid, the per-dataset LightGBM predictor) through the
package API twice: with the roofline's literature factors (``--latency-model roofline``, what the
figures use) and with the roofline calibrated to DistServe's A100 measurements
(``--latency-model calibrated``). The rate grid follows each model's own saturation rates, so
the claims (ratios between schedulers) are compared, not absolute rates. Figure 14's
sensitivity runs are left out (no headline claim rests on them).

Writes ``benchmarks/results/latency_claims.md`` and ``latency_claims.csv`` (every claim: the
measured value under each latency model and the change), and the goodput per scheduler.

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_latency_claims.py [--quick] [--jobs 1]

``--quick``: 600 requests a trace and 6 rates (a few minutes), for checking the script.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from econoserve import experiments
from econoserve.analysis.claims import headline_claims

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY_MODELS = ("roofline", "calibrated")


def run(name: str, args: argparse.Namespace, output_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    overrides = {"num_requests": 600, "rate_grid": experiments.RateGrid(num_rates=6)} if args.quick else {}
    plan = experiments.make_plan("quick", jobs=args.jobs, sensitivity=False, latency_model=name, **overrides)
    started = time.perf_counter()
    results = experiments.run_experiments(plan, output_dir / name, progress=not args.no_progress)
    claims = headline_claims(results.sweep, saturation=results.saturation)
    goodput = results.goodput(plan.schedulers)
    return claims.assign(latency_model=name), goodput.assign(latency_model=name), time.perf_counter() - started


def compare(claims: pd.DataFrame) -> pd.DataFrame:
    keys = ["claim", "baseline", "deployment", "dataset", "unit", "paper"]
    wide = claims.pivot_table(index=keys, columns="latency_model", values="measured", aggfunc="first").reset_index()
    met = claims.pivot_table(index=keys, columns="latency_model", values="met", aggfunc="first").reset_index()
    wide = wide.merge(met, on=keys, suffixes=("", "_met"))
    wide["change"] = wide["calibrated"] - wide["roofline"]
    return wide


def markdown(table: pd.DataFrame, goodput: pd.DataFrame, wall: dict[str, float], quick: bool) -> str:
    lines = [
        "# Notebook 03's headline claims: roofline vs the roofline calibrated to A100 measurements"
        + (" (--quick)" if quick else ""),
        "",
        "Written by `benchmarks/bench_latency_claims.py`: notebook 03's quick profile (OPT-13B, 1 x A100-80GB,",
        "sensitivity runs left out) under `--latency-model roofline` (literature factors, what the figures use)",
        "and `--latency-model calibrated` (factors fitted to DistServe's A100 step times; their error is in",
        "latency_calibration.md). Each run sweeps its own rate grid around its own saturation rates.",
        "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + ".",
        "",
        "| claim | vs | dataset | paper | roofline | calibrated | change | met (roofline -> calibrated) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in table.itertuples(index=False):
        met = f"{'yes' if row.roofline_met else 'no'} -> {'yes' if row.calibrated_met else 'no'}"
        lines.append(f"| {row.claim} | {row.baseline} | {row.dataset} | {row.paper:g} {row.unit} | {row.roofline:.3g} | "
                     f"{row.calibrated:.3g} | {row.change:+.3g} | {met} |")
    wide = goodput.pivot_table(index=["dataset", "scheduler"], columns="latency_model", values="goodput_rps").reset_index()
    lines += ["", "## Goodput [req/s] (SLO attainment >= 90%)", "", "| dataset | scheduler | roofline | calibrated | ratio |",
              "|---|---|---:|---:|---:|"]
    for row in wide.itertuples(index=False):
        ratio = row.calibrated / row.roofline if row.roofline else float("nan")
        lines.append(f"| {row.dataset} | {row.scheduler} | {row.roofline:.3g} | {row.calibrated:.3g} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="600 requests, 6 rates (checks the script)")
    parser.add_argument("--jobs", type=int, default=1, help="simulator processes (default: 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    all_claims, all_goodput, wall = [], [], {}
    with tempfile.TemporaryDirectory(prefix="latency-claims-") as scratch:
        for name in LATENCY_MODELS:
            claims, goodput, wall[name] = run(name, args, Path(scratch))
            all_claims.append(claims)
            all_goodput.append(goodput)
    claims, goodput = pd.concat(all_claims, ignore_index=True), pd.concat(all_goodput, ignore_index=True)
    table = compare(claims)
    suffix = "_quick" if args.quick else ""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    claims.to_csv(args.output_dir / f"latency_claims{suffix}.csv", index=False)
    text = markdown(table, goodput, wall, args.quick)
    (args.output_dir / f"latency_claims{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

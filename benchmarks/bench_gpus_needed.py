"""Figure 12's quick profile as tables (what notebook 05 runs by default), for the report.

Runs :func:`econoserve.experiments.gpus_needed.run_gpus_needed` on the quick plan one model and
dataset at a time (predictors cached under ``results/05_gpus_needed``) and writes
``benchmarks/results/gpus_needed_quick_units.csv`` (every unit searched and its goodput),
``gpus_needed_quick.csv`` (GPUs needed per system and target rate) and
``gpus_needed_quick_claim.csv`` (the claim rows: steady rates only, and with short bursts).

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_gpus_needed.py

About 10 minutes on 2 busy cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from econoserve.analysis.gpus_needed_figures import gpu_claim
from econoserve.experiments.gpus_needed import make_gpus_needed_plan, run_gpus_needed

RESULTS = Path(__file__).resolve().parent / "results"
PANELS = (("opt-13b", "sharegpt"), ("opt-66b", "sharegpt"), ("opt-13b", "qmsum"), ("opt-13b", "alpaca"),
          ("opt-66b", "qmsum"), ("opt-66b", "alpaca"))


def main() -> None:
    units, gpus = [], []
    for model, dataset in PANELS:
        start = time.perf_counter()
        results = run_gpus_needed(make_gpus_needed_plan("quick", models=model, datasets=dataset),
                                  "results/05_gpus_needed", progress=False)
        units.append(results.units)
        gpus.append(results.gpus)
        print(model, dataset, f"{time.perf_counter() - start:.0f} s", flush=True)
    write(pd.concat(units, ignore_index=True), pd.concat(gpus, ignore_index=True))


def write(units: pd.DataFrame, gpus: pd.DataFrame) -> None:
    RESULTS.mkdir(exist_ok=True)
    units.to_csv(RESULTS / "gpus_needed_quick_units.csv", index=False)
    gpus.to_csv(RESULTS / "gpus_needed_quick.csv", index=False)
    claims = pd.concat([gpu_claim(gpus).assign(rates="steady"), gpu_claim(gpus, steady_only=False).assign(rates="all")],
                       ignore_index=True)
    claims.to_csv(RESULTS / "gpus_needed_quick_claim.csv", index=False)


if __name__ == "__main__":
    main()

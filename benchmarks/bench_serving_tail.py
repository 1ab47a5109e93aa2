"""Ordering's mean-vs-tail frontier in notebook 04's KV-bound regime, simulated on its profile.

On the real engine EconoServe cuts vLLM's mean JCT but raises its p99 (Figure 15,
``benchmarks/results/serving_tail_real.md``). This benchmark maps the trade over Ordering's two
knobs, ``ordering_prompt_weight`` ``u`` and the wait bound ``ordering_promotion_wait_s`` ``W``,
on several traces of the regime, simulated with the step times notebook 04 profiled (the
simulator reproduces that engine to a median JCT error of 9-11%, ``figures/README.md``):

* for each trace seed, notebook 04's ``kv-bound`` trace (160 held-out ShareGPT requests, the
  dataset's own predictor, lengths scaled to the engine) at ``--load`` x the engine's capacity
  (:func:`econoserve.serving.study.engine_capacity_rps`, on that profile);
* vLLM's scheduler (``vllm-chunked`` in the simulator) and EconoServe at every ``u`` x ``W``;
* per configuration, the median over seeds of its mean and p99 JCT over vLLM's on the same trace,
  and the p99 over all seeds' requests pooled (p99 of 160 requests is the second-worst one).

Writes ``benchmarks/results/serving_tail_frontier.csv`` and ``.md``. Needs notebook 04's output
(``--results``, default ``results/04_vllm_serving``: ``latency_model.json`` and the cached
predictor)::

    .venv/bin/python benchmarks/bench_serving_tail.py [--seeds 0 1 2 3 4] [--load 0.9]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from econoserve.errors import UserError
from econoserve.serving.fidelity import simulation_config
from econoserve.serving.study import (REGIMES, ServingStudy, engine_capacity_rps, rescaled_to_rate,
                                      study_trace)
from econoserve.sim import simulate

RESULTS = Path(__file__).resolve().parent / "results"
#: Notebook 04's engine for the kv-bound regime (the notebook's batch defaults are EngineOptions').
ENGINE = REGIMES["kv-bound"].engine()


def configurations(weights: list[float], waits: list[float | None]) -> list[tuple[str, dict]]:
    """vLLM's scheduler, then EconoServe at every ``u`` x ``W`` (``None`` = no wait bound)."""
    grid = [("vllm", {})]
    for u in weights:
        for wait in waits:
            config = {"ordering_prompt_weight": u, **({} if wait is None else {"ordering_promotion_wait_s": wait})}
            grid.append(("econoserve", config))
    return grid


def simulate_seed(seed: int, args: argparse.Namespace, grid: list[tuple[str, dict]]) -> pd.DataFrame:
    """Every configuration on one trace seed: its requests' JCTs, with the trace's rate."""
    setting = replace(REGIMES["kv-bound"], load=args.load)
    trace = study_trace(setting, seed=seed, cache_dir=args.results)  # at 1 req/s: the load sets the rate
    latency = args.results / "latency_model.json"
    study = ServingStudy(trace_path=args.results / "trace.parquet", output_dir=args.results, engine=ENGINE)
    rate_rps = args.load * engine_capacity_rps(trace, study, latency)
    trace = rescaled_to_rate(trace, rate_rps, f"{setting.dataset} trace, seed {seed}")
    frames = []
    for scheduler, config in grid:
        result = simulate(trace, simulation_config(ENGINE.shape(), scheduler, str(latency), policy_config=config))
        frames.append(pd.DataFrame({"seed": seed, "rate_rps": rate_rps, "label": _label(scheduler, config),
                                    "jct_s": result.requests["jct_s"].to_numpy(float)}))
    return pd.concat(frames, ignore_index=True)


def summarise(requests: pd.DataFrame, grid: list[tuple[str, dict]]) -> pd.DataFrame:
    """Per configuration: medians over seeds of mean / p99 JCT over vLLM's, and pooled p99 ratio."""
    per_seed = requests.groupby(["label", "seed"])["jct_s"].agg(mean="mean", p99=lambda j: np.percentile(j, 99))
    vllm = per_seed.loc["vllm"]
    rows = []
    for scheduler, config in grid:
        label = _label(scheduler, config)
        mine = per_seed.loc[label]
        pooled = np.percentile(requests.loc[requests["label"] == label, "jct_s"], 99)
        rows.append({"scheduler": label, "u": config.get("ordering_prompt_weight"),
                     "wait_s": config.get("ordering_promotion_wait_s"),
                     "median_mean_jct_ratio": float((mine["mean"] / vllm["mean"]).median()),
                     "median_p99_jct_ratio": float((mine["p99"] / vllm["p99"]).median()),
                     "pooled_p99_jct_ratio": float(pooled / np.percentile(requests.loc[requests["label"] == "vllm",
                                                                                        "jct_s"], 99)),
                     "mean_jct_s": float(mine["mean"].mean()), "seeds": len(mine)})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, requests: pd.DataFrame, args: argparse.Namespace, elapsed_s: float) -> str:
    rates = requests.groupby("seed")["rate_rps"].first()
    lines = [
        "# Ordering's mean-vs-tail frontier in notebook 04's KV-bound regime (simulated)", "",
        f"Written by `benchmarks/bench_serving_tail.py` ({elapsed_s:.0f} s): notebook 04's `kv-bound` trace, seeds "
        f"{' '.join(map(str, args.seeds))}, at {args.load} x the engine's capacity ({rates.min():.2f}-{rates.max():.2f} "
        f"req/s), simulated on `{args.results}/latency_model.json` (the profile of Figure 15's run). Ratios are over "
        "vLLM's scheduler on the same trace: medians over seeds of the mean and p99 JCT ratios, and the ratio of the "
        "p99 over all seeds' requests pooled. `u` = `ordering_prompt_weight`, `W` = `ordering_promotion_wait_s` "
        "(- = off); the default is u = 64, W off.", "",
        "| u | W [s] | mean JCT / vLLM's | p99 JCT / vLLM's (median of seeds) | p99 JCT / vLLM's (pooled) |",
        "|---|---|---|---|---|",
    ]
    for row in table[table["scheduler"] != "vllm"].itertuples():
        wait = "-" if pd.isna(row.wait_s) else f"{row.wait_s:g}"
        lines.append(f"| {row.u:g} | {wait} | {row.median_mean_jct_ratio:.2f} | {row.median_p99_jct_ratio:.2f} | "
                     f"{row.pooled_p99_jct_ratio:.2f} |")
    return "\n".join(lines) + "\n"


def _label(scheduler: str, config: dict) -> str:
    return scheduler if not config else f"{scheduler}[{','.join(f'{k}={v}' for k, v in config.items())}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results/04_vllm_serving"),
                        help="notebook 04's output directory (default: results/04_vllm_serving)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="trace seeds (default 0-4)")
    parser.add_argument("--load", type=float, default=REGIMES["kv-bound"].load,
                        help="arrival rate as a share of the engine's capacity (default: the regime's, %(default)s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 1, 4, 64], metavar="U",
                        help="ordering_prompt_weight values (default 0 1 4 64)")
    parser.add_argument("--waits", nargs="+", default=["off", "2", "5", "10"], metavar="W",
                        help="ordering_promotion_wait_s values [s], 'off' for none (default off 2 5 10)")
    parser.add_argument("--output", type=Path, default=RESULTS / "serving_tail_frontier",
                        help="output stem (.csv and .md are written)")
    args = parser.parse_args(argv)
    try:
        waits = [None if w == "off" else float(w) for w in args.waits]
    except ValueError:
        parser.error(f"--waits: numbers of seconds or 'off', got {' '.join(args.waits)}")
    if not args.load > 0:
        parser.error(f"--load must be > 0, got {args.load}")
    started = time.perf_counter()
    grid = configurations(args.weights, waits)
    try:
        if not (args.results / "latency_model.json").exists():
            raise UserError(f"{args.results}: no latency_model.json; run notebook 04 first")
        requests = pd.concat([simulate_seed(seed, args, grid) for seed in tqdm(args.seeds, desc="trace seeds")],
                             ignore_index=True)
    except UserError as error:
        print(f"bench_serving_tail: {error}", file=sys.stderr)
        return 2
    table = summarise(requests, grid)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output.with_suffix(".csv"), index=False)
    text = markdown(table, requests, args, time.perf_counter() - started)
    args.output.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

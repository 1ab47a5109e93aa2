"""Experiment backends: notebook 03's plan on the process pool and on Ray, side by side.

For each backend (``pool``, ``ray``) and worker count (``--workers``, default 1 and 2), in a fresh
child process each, interleaved over ``--repeats``: the wall time to make the backend (Ray: start
a local instance on loopback), to run the whole plan (traces, saturation bursts, sweep,
sensitivity) into an empty results directory, and to run it again on that directory (every run
loaded from the stored results: the cost of resumption), then to close the backend. Ray's
overhead is its column minus the pool's at the same worker count; scaling is 1 worker vs 2.

Plans: the quick profile (``make_plan("quick")``, default), or with ``--quick`` a smaller one (the
quick profile on Alpaca and ShareGPT, 400 requests per trace, oracle predictions: the same task
structure with shorter runs, minutes on a shared 2-core machine), or ``--profile full`` (paper
scale; hours here). Predictor training happens in the driver and is the same on both backends;
the quick plan trains (and caches) it before the timed runs.

Results: ``benchmarks/results/backends.md`` and ``backends.json`` (with the load average, since
this machine is shared). Run with ``nice``:

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_backends.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _plan(profile: str, quick: bool):
    from econoserve.experiments import make_plan

    if quick:
        return make_plan("quick", datasets=["alpaca", "sharegpt"], num_requests=400, predictor="oracle")
    return make_plan(profile)


# --------------------------------------------------------------------- one measurement (child)
def _measure(backend_name: str, workers: int, profile: str, quick: bool, predictors: str) -> dict:
    from dataclasses import replace

    from econoserve.experiments import TaskStore, make_backend, run_experiments

    plan = replace(_plan(profile, quick), jobs=workers)
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as out:
        if predictors and Path(predictors).is_dir():  # trained once before the timed runs; not what is measured
            os.symlink(predictors, Path(out) / "predictors")
        clock = time.perf_counter()
        backend = make_backend(backend_name, workers)
        startup_s = time.perf_counter() - clock
        try:
            clock = time.perf_counter()
            results = run_experiments(plan, out, progress=False, backend=backend)
            run_s = time.perf_counter() - clock
            clock = time.perf_counter()
            run_experiments(plan, out, progress=False, backend=backend)
            resume_s = time.perf_counter() - clock
            tasks = len(TaskStore(Path(out) / "tasks").keys())
        finally:
            clock = time.perf_counter()
            backend.close()
            close_s = time.perf_counter() - clock
    return {"backend": backend_name, "workers": workers, "startup_s": startup_s, "run_s": run_s,
            "resume_s": resume_s, "close_s": close_s, "tasks": tasks,
            "stages_s": results.timings_s, "runs": len(results.sweep) + len(results.sensitivity)}


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(_measure(args.child_backend, args.child_workers, args.profile, args.quick, args.predictors)))


# --------------------------------------------------------------------- driver
def _run_child(backend: str, workers: int, args: argparse.Namespace, predictors: Path) -> dict:
    command = [sys.executable, __file__, "--child-backend", backend, "--child-workers", str(workers),
               "--profile", args.profile, "--predictors", str(predictors), *(["--quick"] if args.quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{backend} x{workers} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_predictors(args: argparse.Namespace, directory: Path) -> Path:
    """Run the plan's traces once (predictors trained and cached) so the timed runs reuse them."""
    from dataclasses import replace

    from econoserve.experiments import run_experiments

    plan = _plan(args.profile, args.quick)
    if plan.predictor != "train":
        return directory / "predictors"
    tiny = replace(plan, schedulers=("vllm",), ablations=(), sensitivity=None, jobs=1,
                   rates={d: (1.0,) for d in plan.datasets})
    run_experiments(tiny, directory, progress=True)
    return directory / "predictors"


def _table(rows: list[dict]) -> list[dict]:
    summary = []
    for backend in ("pool", "ray"):
        for workers in sorted({r["workers"] for r in rows}):
            picked = [r for r in rows if r["backend"] == backend and r["workers"] == workers]
            if not picked:
                continue
            median = {k: statistics.median(r[k] for r in picked) for k in ("startup_s", "run_s", "resume_s", "close_s")}
            summary.append({"backend": backend, "workers": workers, "repeats": len(picked),
                            "tasks": picked[0]["tasks"], **median,
                            "total_s": median["startup_s"] + median["run_s"] + median["close_s"]})
    return summary


def _markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        "# Experiment backends: process pool vs Ray",
        "",
        f"Plan: {meta['plan']}. Machine: {meta['machine']}, {meta['cpus']} CPUs, shared with other work "
        f"(load average {meta['load_before']} before, {meta['load_after']} after). Median of {meta['repeats']} "
        "interleaved repeat(s), each a fresh process. Produced by `benchmarks/bench_backends.py"
        f"{' --quick' if meta['quick'] else ''}`.",
        "",
        "start: making the backend (Ray: a local instance; the pool starts its processes inside run); run: "
        "the whole plan into an empty results directory (the pool with 1 worker runs in the calling "
        "process); rerun: the same plan on the same directory, every task loaded from the store.",
        "",
        "| backend | workers | tasks | start [s] | run [s] | rerun, all stored [s] | close [s] | start+run+close [s] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(f"| {row['backend']} | {row['workers']} | {row['tasks']} | {row['startup_s']:.1f} | "
                     f"{row['run_s']:.1f} | {row['resume_s']:.1f} | {row['close_s']:.1f} | {row['total_s']:.1f} |")
    by = {(r["backend"], r["workers"]): r for r in summary}
    lines.append("")
    for workers in sorted({r["workers"] for r in summary}):
        if ("pool", workers) in by and ("ray", workers) in by:
            pool, ray = by["pool", workers], by["ray", workers]
            lines.append(f"* {workers} worker(s): Ray's overhead {ray['total_s'] - pool['total_s']:+.1f} s "
                         f"({ray['total_s'] / pool['total_s']:.2f}x the pool's wall time), of which starting "
                         f"and stopping Ray {ray['startup_s'] + ray['close_s']:.1f} s.")
    for backend in ("pool", "ray"):
        if (backend, 1) in by and (backend, 2) in by:
            lines.append(f"* {backend}: 2 workers run the plan {by[backend, 1]['run_s'] / by[backend, 2]['run_s']:.2f}x "
                         "as fast as 1.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller plan (a few minutes)")
    parser.add_argument("--profile", default="quick", choices=("quick", "full"), help="plan profile (default: quick)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], metavar="N")
    parser.add_argument("--backends", nargs="+", default=["pool", "ray"], choices=("pool", "ray"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child-backend", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--predictors", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_backend:
        return _child(args)
    sys.path.insert(0, str(ROOT))
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-backends-predictors-") as scratch:
        predictors = _train_predictors(args, Path(scratch))
        for repeat in range(args.repeats):
            for workers in args.workers:
                for backend in args.backends:
                    row = _run_child(backend, workers, args, predictors)
                    print(f"{backend} x{workers}: start {row['startup_s']:.1f} s, run {row['run_s']:.1f} s, "
                          f"rerun {row['resume_s']:.1f} s ({row['tasks']} tasks)", flush=True)
                    rows.append({**row, "repeat": repeat})
    plan = _plan(args.profile, args.quick)
    meta = {"plan": (f"{plan.profile} profile, datasets {', '.join(plan.datasets)}, {plan.num_requests} requests, "
                     f"seeds {list(plan.seeds)}, predictor {plan.predictor}"),
            "quick": args.quick, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_before": [round(x, 1) for x in load_before],
            "load_after": [round(x, 1) for x in os.getloadavg()]}
    summary = _table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backends.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n")
    (RESULTS / "backends.md").write_text(_markdown(summary, meta))
    print(_markdown(summary, meta))


if __name__ == "__main__":
    main()

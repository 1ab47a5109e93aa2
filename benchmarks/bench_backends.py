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

``--full-slice`` (issue 15's scaling at paper scale without running the whole full profile twice):
a fixed, named slice of the *full* profile's plan (:data:`FULL_SLICE`: one deployment, one dataset,
one seed, with the full profile's 5000-request traces, 16-rate grid, ablations and sensitivity
runs; oracle predictions, so no training) on 1 and 2 workers of the pool and of Ray, each into a
fresh results directory, with wall and CPU times (this process and every process under it, Ray's
included) and the 2-vs-1 speedup. About 200 tasks per backend and worker count: roughly two hours
here at a load of 6-10 (estimated from the quick check). ``--full-slice --quick`` runs the same
slice on 2 grid rates without the sensitivity runs (36 tasks), a check that the mode works: 18
minutes at that load.

Results: ``benchmarks/results/backends.md`` and ``backends.json`` (with the load average, since
this machine is shared); ``--full-slice``: ``backends_full_slice.md`` / ``.json``
(``backends_full_slice_quick.*`` with ``--quick``). Run with ``nice``:

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_backends.py [--quick]
    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_backends.py --full-slice
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: ``--full-slice``: the slice of ``make_plan("full")`` that is timed, as ``make_plan`` arguments.
FULL_SLICE: dict[str, object] = {"datasets": ["sharegpt"], "model": "opt-13b", "seed": 0, "predictor": "oracle"}
#: ``--full-slice --quick``: rates of the automatic grid (the full profile's: 16) and no sensitivity runs.
FULL_SLICE_QUICK_RATES = 2


def _plan(profile: str, quick: bool, full_slice: bool = False):
    from dataclasses import replace

    from econoserve.experiments import make_plan

    if full_slice:
        plan = make_plan("full", **FULL_SLICE)
        if quick:
            plan = replace(plan, rate_grid=replace(plan.rate_grid, num_rates=FULL_SLICE_QUICK_RATES), sensitivity=None)
        return plan
    if quick:
        return make_plan("quick", datasets=["alpaca", "sharegpt"], num_requests=400, predictor="oracle")
    return make_plan(profile)


class _TreeCPU:
    """CPU time [s] (user + system) of this process and every process under it (pool workers;
    a local Ray instance's head and workers) between :meth:`start` and :meth:`stop`, sampled every
    ``interval_s`` (a process that ends between two samples loses at most its last interval)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.baseline: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[tuple[int, float], float]:
        import psutil

        me = psutil.Process()
        seen = {}
        for process in (me, *me.children(recursive=True)):
            try:
                times = process.cpu_times()
                seen[(process.pid, process.create_time())] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return seen

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.last.update(self._sample())

    def start(self) -> None:
        self.baseline = self._sample()
        self.last = dict(self.baseline)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())
        return sum(cpu - self.baseline.get(key, 0.0) for key, cpu in self.last.items())


# --------------------------------------------------------------------- one measurement (child)
def _measure(backend_name: str, workers: int, profile: str, quick: bool, predictors: str,
             full_slice: bool = False) -> dict:
    from dataclasses import replace

    from econoserve.experiments import TaskStore, make_backend, run_experiments

    plan = replace(_plan(profile, quick, full_slice), jobs=workers)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as out:
        if predictors and Path(predictors).is_dir():  # trained once before the timed runs; not what is measured
            os.symlink(predictors, Path(out) / "predictors")
        clock = time.perf_counter()
        backend = make_backend(backend_name, workers)
        startup_s = time.perf_counter() - clock
        try:
            clock, cpu = time.perf_counter(), _TreeCPU()
            cpu.start()
            results = run_experiments(plan, out, progress=full_slice, backend=backend)  # bars on the long slice
            run_s, run_cpu_s = time.perf_counter() - clock, cpu.stop()
            clock = time.perf_counter()
            run_experiments(plan, out, progress=False, backend=backend)
            resume_s = time.perf_counter() - clock
            tasks = len(TaskStore(Path(out) / "tasks").keys())
        finally:
            clock = time.perf_counter()
            backend.close()
            close_s = time.perf_counter() - clock
    return {"backend": backend_name, "workers": workers, "startup_s": startup_s, "run_s": run_s,
            "run_cpu_s": run_cpu_s, "resume_s": resume_s, "close_s": close_s, "tasks": tasks,
            "stages_s": results.timings_s, "runs": len(results.sweep) + len(results.sensitivity),
            "sweep_runs": len(results.sweep), "sensitivity_runs": len(results.sensitivity),
            "rates": int(results.sweep["rate_rps"].nunique()), "load_1min": [load_before, os.getloadavg()[0]]}


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(_measure(args.child_backend, args.child_workers, args.profile, args.quick, args.predictors,
                              args.full_slice)))


# --------------------------------------------------------------------- driver
def _run_child(backend: str, workers: int, args: argparse.Namespace, predictors: Path) -> dict:
    command = [sys.executable, __file__, "--child-backend", backend, "--child-workers", str(workers),
               "--profile", args.profile, "--predictors", str(predictors), *(["--quick"] if args.quick else []),
               *(["--full-slice"] if args.full_slice else [])]
    stderr = None if args.full_slice else subprocess.PIPE  # the slice's progress bars reach the terminal
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{backend} x{workers} failed:\n{(done.stderr or '(its output is above)')[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_predictors(args: argparse.Namespace, directory: Path) -> Path:
    """Run the plan's traces once (predictors trained and cached) so the timed runs reuse them."""
    from dataclasses import replace

    from econoserve.experiments import run_experiments

    plan = _plan(args.profile, args.quick, args.full_slice)
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
            median = {k: statistics.median(r[k] for r in picked)
                      for k in ("startup_s", "run_s", "run_cpu_s", "resume_s", "close_s")}
            summary.append({"backend": backend, "workers": workers, "repeats": len(picked),
                            **{k: picked[0][k] for k in ("tasks", "sweep_runs", "sensitivity_runs", "rates")},
                            "load_1min": [x for r in picked for x in r["load_1min"]], **median,
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


def _slice_markdown(summary: list[dict], meta: dict) -> str:
    arguments = ", ".join(f"{k}={json.dumps(v)}" for k, v in FULL_SLICE.items())
    first = summary[0]
    lines = [
        "# Experiment backends at paper scale: a slice of the full profile on 1 and 2 workers",
        "",
        f"Slice: `make_plan(\"full\", {arguments})`"
        + (f" with {FULL_SLICE_QUICK_RATES} grid rates and no sensitivity runs (`--quick`: a check, not the "
           "measurement)" if meta["quick"] else "")
        + f": {meta['deployment']}, {meta['num_requests']}-request traces, {first['rates']} rates (grid + reference), "
        f"{meta['schedulers']} schedulers and ablations: {first['sweep_runs']} sweep runs and "
        f"{first['sensitivity_runs']} sensitivity runs, {first['tasks']} tasks with the saturation bursts. "
        f"The whole full profile is {meta['slices_in_full']} such slices "
        "(deployments x datasets x seeds; Llama-2-70B's on 4 GPUs cost more) plus predictor training.",
        "",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, shared with other work: load average "
        f"{meta['load_before']} before, {meta['load_after']} after; the 1-minute load at the start and end of "
        f"each run is in its row. Median of {meta['repeats']} repeat(s), each a fresh process and a fresh "
        "results directory. Produced by `benchmarks/bench_backends.py --full-slice"
        f"{' --quick' if meta['quick'] else ''}`.",
        "",
        "run: the whole slice into an empty results directory (the pool with 1 worker runs in the calling "
        "process); CPU: user + system time of the run in the driver and every process under it (pool workers, "
        "Ray's head and workers), sampled every 0.5 s; CPU / wall below the worker count is time the "
        "processes waited for a CPU on this shared machine; start/close: making and closing the backend (Ray: a "
        "local instance).",
        "",
        "| backend | workers | tasks | start [s] | run, wall [s] | run, CPU [s] | CPU / wall | close [s] | "
        "start+run+close [s] | 1-min load (start, end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        load = ", ".join(f"{x:.1f}" for x in row["load_1min"])
        lines.append(f"| {row['backend']} | {row['workers']} | {row['tasks']} | {row['startup_s']:.1f} | "
                     f"{row['run_s']:.1f} | {row['run_cpu_s']:.1f} | {row['run_cpu_s'] / row['run_s']:.2f} | "
                     f"{row['close_s']:.1f} | {row['total_s']:.1f} | {load} |")
    by = {(r["backend"], r["workers"]): r for r in summary}
    lines.append("")
    for backend in ("pool", "ray"):
        if (backend, 1) in by and (backend, 2) in by:
            one, two = by[backend, 1], by[backend, 2]
            lines.append(f"* {backend}: 2 workers vs 1: run {one['run_s'] / two['run_s']:.2f}x as fast "
                         f"(start+run+close {one['total_s'] / two['total_s']:.2f}x), CPU "
                         f"{two['run_cpu_s'] / one['run_cpu_s']:.2f}x that of 1 worker.")
    for workers in sorted({r["workers"] for r in summary}):
        if ("pool", workers) in by and ("ray", workers) in by:
            pool, ray = by["pool", workers], by["ray", workers]
            lines.append(f"* {workers} worker(s): Ray's start+run+close {ray['total_s'] / pool['total_s']:.2f}x the "
                         f"pool's ({ray['total_s'] - pool['total_s']:+.1f} s).")
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict:
    from econoserve.experiments import make_plan

    plan = _plan(args.profile, args.quick, args.full_slice)
    full = make_plan("full", predictor="oracle")
    return {"plan": (f"{plan.profile} profile, datasets {', '.join(plan.datasets)}, {plan.num_requests} requests, "
                     f"seeds {list(plan.seeds)}, predictor {plan.predictor}"),
            "full_slice": FULL_SLICE if args.full_slice else None, "num_requests": plan.num_requests,
            "deployment": ", ".join(d.name for d in plan.deployments), "schedulers": len(plan.all_schedulers()),
            "slices_in_full": len(full.deployments) * len(full.datasets) * len(full.seeds),
            "quick": args.quick, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_before": [round(x, 1) for x in load_before],
            "load_after": [round(x, 1) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the smaller plan (a few minutes); with --full-slice: the slice on fewer rates")
    parser.add_argument("--full-slice", action="store_true",
                        help="time a fixed slice of the full profile (FULL_SLICE) instead: scaling at paper scale")
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
    meta = _meta(args, load_before)
    summary = _table(rows)
    stem = ("backends_full_slice" + ("_quick" if args.quick else "")) if args.full_slice else "backends"
    text = _slice_markdown(summary, meta) if args.full_slice else _markdown(summary, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)

if __name__ == "__main__":
    main()

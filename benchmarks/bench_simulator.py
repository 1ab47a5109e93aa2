"""Simulator speed: simulated requests per wall-second and peak memory, per policy.

Two workloads:

* **Vidur-comparable**: Llama-2-70B on 4 x A100-80GB (TP4; this simulator has no pipeline
  parallelism), 10,000 requests with Azure LLM inference 2023 *conversation* lengths
  (ContextTokens / GeneratedTokens), Poisson arrivals at 2 requests/s; every baseline, with
  skip-ahead (the default) and without. Medians over ``--repeats`` runs.
* **ShareGPT-like scaling**: OPT-13B on 1 x A100-80GB, ShareGPT prompt/response lengths (vLLM's
  filter, Llama-2 tokenizer) resampled with replacement, Poisson 2 requests/s, 10,000 and
  100,000 requests; the ratio of wall time per request at 100k and 10k shows whether cost grows
  linearly.

``--policy-speed BEFORE_REV`` instead compares this checkout's simulator with the one at git revision
``BEFORE_REV`` (extracted with ``git archive`` to a temporary directory) on the runs that dominate
notebook 03's sweep (issue 15): ShareGPT requests with the trained predictor's lengths (notebook
03's cached model, trained if missing), OPT-13B on 1 x A100-80GB, at a low, the reference (1.25x
vLLM's burst throughput, as the plan's rate grid sets it) and a high rate, for EconoServe, two of its
variants and vLLM. Each run is a fresh process with ``PYTHONPATH`` at one tree, before and after
alternating (so load drift hits both alike); medians of the CPU time of ``simulate()``; every run's
requests, iterations and summary tables (wall-clock columns dropped) are hashed and must be equal
before and after. Writes ``benchmarks/results/policy_speed.md`` / ``.csv`` (``--quick``: 2,000
requests, one repeat, ``policy_speed_quick.*``).

Each measurement runs in a fresh process (peak RSS is that process's ``ru_maxrss``; the baseline
RSS before the simulation is reported beside it). The wall time is that of ``simulate()`` alone:
trace building and Python start-up are excluded. Results go to
``benchmarks/results/simulator.md`` and ``simulator.json``.

    ECONOSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/bench_simulator.py [--repeats 3] [--quick]
    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_simulator.py \
        --policy-speed BEFORE_REV [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("vllm", "vllm-chunked", "orca", "sarathi", "fastgen", "econoserve-oracle")

#: Vidur (microsoft/vidur), measured from its source with its real A100 profiles on this machine
#: class: Llama-2-70B, TP2-PP2, 10k Azure-conversation-length requests, Poisson 2/s.
VIDUR_REQUESTS_PER_S = {"vllm": 394.0, "sarathi": 307.0}


# --------------------------------------------------------------------- workloads
def _mirror() -> Path:
    return Path(os.environ.get("ECONOSERVE_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def azure_conv_trace(num_requests: int, rate_rps: float, seed: int):
    """Azure conversation lengths with Poisson arrivals, via the workload builder if present,
    else straight from the CSV in the mirror."""
    try:
        from econoserve.workload.datasets import TraceSpec, build_trace

        return build_trace(TraceSpec(dataset="azure-conv", num_requests=num_requests, arrival="poisson",
                                     rate_rps=rate_rps, seed=seed, include_text=False))
    except ImportError:  # pragma: no cover - builder not installed
        frame = pd.read_csv(_mirror() / "AzureLLMInferenceTrace_conv.csv", usecols=["ContextTokens", "GeneratedTokens"])
        frame = frame[(frame.ContextTokens > 0) & (frame.GeneratedTokens > 0)].iloc[:num_requests]
        return _poisson_trace(frame.ContextTokens.to_numpy(), frame.GeneratedTokens.to_numpy(), rate_rps, seed, "azure-conv")


def sharegpt_like_trace(num_requests: int, rate_rps: float, seed: int):
    """ShareGPT lengths (vLLM's filter, Llama-2 tokenizer) resampled with replacement."""
    from econoserve.workload.datasets import load_requests

    lengths = load_requests("sharegpt", "llama2")[["prompt_tokens", "output_tokens"]]
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(lengths), num_requests)
    return _poisson_trace(lengths.prompt_tokens.to_numpy()[rows], lengths.output_tokens.to_numpy()[rows],
                          rate_rps, seed, "sharegpt-like")


def _poisson_trace(prompts, outputs, rate_rps, seed, dataset):
    from econoserve.sim.synthetic import trace_from_lists

    rng = np.random.default_rng(seed + 1)
    gaps = rng.exponential(1.0 / rate_rps, len(prompts))
    return trace_from_lists(np.cumsum(gaps) - gaps[0], prompts, outputs, dataset=dataset)


WORKLOADS = {
    "azure-conv": (azure_conv_trace, dict(model="llama-2-70b", gpu="a100-80gb", tensor_parallel=4)),
    "sharegpt-like": (sharegpt_like_trace, dict(model="opt-13b", gpu="a100-80gb", tensor_parallel=1)),
}


# --------------------------------------------------------------------- one measurement
def _measure(job: dict) -> dict:
    """Runs in a fresh process: build the trace, then time ``simulate()``."""
    from econoserve.sim import SimulationConfig, simulate

    make_trace, deployment = WORKLOADS[job["workload"]]
    trace = make_trace(job["num_requests"], job["rate_rps"], 0)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = SimulationConfig(scheduler=job["policy"], skip_ahead=job["skip_ahead"], **deployment)
    start = time.perf_counter()
    result = simulate(trace, config)
    wall = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = result.summary
    return {
        **job,
        "wall_s": wall,
        "requests_per_wall_s": job["num_requests"] / wall,
        "iterations": s["num_iterations"],
        "skipped_iterations": s["skipped_iterations"],
        "iterations_per_wall_s": s["num_iterations"] / wall,
        "completed": s["completed"],
        "rejected": s["rejected"],
        "simulated_s": s["makespan_s"],
        "mean_jct_s": s["mean_jct_s"],
        "peak_rss_mib": peak_rss,
        "baseline_rss_mib": baseline_rss,
    }


def run(jobs: list[dict], repeats: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    rows = []
    for job in jobs:
        samples = []
        for _ in range(repeats if job["num_requests"] <= 20_000 else 1):
            with context.Pool(1) as pool:
                samples.append(pool.apply(_measure, (job,)))
        row = dict(samples[0])
        for key in ("wall_s", "requests_per_wall_s", "iterations_per_wall_s", "peak_rss_mib", "baseline_rss_mib"):
            row[key] = statistics.median(s[key] for s in samples)
        row["repeats"] = len(samples)
        rows.append(row)
        print(f"{job['workload']:>13} {job['num_requests']:>7} {job['policy']:>12} skip={job['skip_ahead']!s:5} "
              f"{row['wall_s']:7.2f} s  {row['requests_per_wall_s']:8.0f} req/s  peak {row['peak_rss_mib']:.0f} MiB",
              flush=True)
    return rows


# --------------------------------------------------------------------- report
def write_report(rows: list[dict], args) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulator.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = pd.DataFrame(rows)
    lines = [
        "# Simulator speed",
        "",
        f"`benchmarks/bench_simulator.py` on {platform.machine()} / {os.cpu_count()} CPUs / Python "
        f"{platform.python_version()}, median of {args.repeats} runs (100k-request runs: 1 run), each in a fresh "
        "process; wall time of `simulate()` only (trace building excluded). Not a test: wall-clock numbers vary with "
        "machine load.",
        "",
        "## Vidur-comparable workload",
        "",
        "Llama-2-70B on 4 x A100-80GB (TP4), 10,000 requests with Azure LLM inference 2023 conversation lengths, "
        "Poisson 2 requests/s, roofline latency model. Requests whose prompt + output exceed Llama-2's 4,096-token "
        "context are rejected at arrival and recorded (they count in requests/s, as they do in the trace).",
        "",
        "| policy | skip-ahead | wall [s] | simulated requests / wall-s | finished requests / wall-s | "
        "iterations / wall-s | peak RSS [MiB] | Vidur requests / wall-s* | speed-up vs Vidur (finished) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    azure = table[table.workload == "azure-conv"]
    for _, r in azure.iterrows():
        vidur = VIDUR_REQUESTS_PER_S.get(r.policy)
        vidur_text = f"{vidur:.0f}" if vidur else "-"
        finished_rate = r.completed / r.wall_s
        speedup = f"{finished_rate / vidur:.1f}x" if vidur else "-"
        lines.append(
            f"| {r.policy} | {'on' if r.skip_ahead else 'off'} | {r.wall_s:.2f} | {r.requests_per_wall_s:.0f} | "
            f"{finished_rate:.0f} | {r.iterations_per_wall_s:.0f} | {r.peak_rss_mib:.0f} | {vidur_text} | {speedup} |"
        )
    if not azure.empty:
        lines += ["", "Simulated per run (identical with and without skip-ahead):", ""]
        for _, r in azure[azure.skip_ahead].iterrows():
            lines.append(
                f"* {r.policy}: {int(r.iterations):,} iterations ({int(r.skipped_iterations):,} advanced in bulk), "
                f"{r.simulated_s:,.0f} simulated seconds, {int(r.completed):,} finished, {int(r.rejected):,} rejected "
                f"(prompt + output beyond the 4,096-token context), mean JCT {r.mean_jct_s:.2f} s."
            )
        lines += [
            "",
            "Rejected requests cost almost nothing to simulate, so the speed-up is computed on finished requests "
            "per wall-second.",
        ]
        econoserve = azure[azure.policy == "econoserve-oracle"]
        if not econoserve.empty:
            baselines = azure[~azure.policy.str.startswith("econoserve")]
            ratios = [
                row.wall_s / baselines[baselines.skip_ahead == row.skip_ahead].wall_s.to_numpy()
                for _, row in econoserve.iterrows()
            ]
            low, high = min(float(r.min()) for r in ratios), max(float(r.max()) for r in ratios)
            lines += [
                "",
                "EconoServe runs as `econoserve-oracle` (the Azure trace has no prompt text to predict from, so the "
                "true length is its prediction); its event-driven admission, exact allocations and occupancy-curve "
                f"checks cost {low:.1f}-{high:.1f}x the baselines' wall time in this run (same skip-ahead setting).",
            ]
    lines += [
        "",
        "\\* Vidur (microsoft/vidur) figures were measured from Vidur's source on this machine class, not by us in "
        "this run: Llama-2-70B, TP2-PP2, real A100 profiles, the same 10k Azure-conversation workload at Poisson 2/s; "
        "394 simulated requests per wall-second with its vLLM scheduler and 307 with Sarathi. Vidur was not installed "
        "or run here (it is not a dependency of this package), so the comparison is across runs, not side by side.",
        "",
        "## ShareGPT-like scaling",
        "",
        "OPT-13B on 1 x A100-80GB, ShareGPT lengths resampled with replacement, Poisson 2 requests/s, skip-ahead on.",
        "",
        "| policy | requests | wall [s] | simulated requests / wall-s | peak RSS [MiB] | baseline RSS [MiB] | "
        "wall per request, 100k / 10k |",
        "|---|---|---|---|---|---|---|",
    ]
    share = table[table.workload == "sharegpt-like"]
    for policy in share.policy.unique():
        rows_p = share[share.policy == policy].sort_values("num_requests")
        per_request = dict(zip(rows_p.num_requests, rows_p.wall_s / rows_p.num_requests))
        ratio = per_request.get(100_000, np.nan) / per_request.get(10_000, np.nan)
        for _, r in rows_p.iterrows():
            ratio_text = f"{ratio:.2f}" if r.num_requests == rows_p.num_requests.max() and np.isfinite(ratio) else ""
            lines.append(
                f"| {policy} | {r.num_requests:,} | {r.wall_s:.2f} | {r.requests_per_wall_s:.0f} | "
                f"{r.peak_rss_mib:.0f} | {r.baseline_rss_mib:.0f} | {ratio_text} |"
            )
    lines += [
        "",
        "A ratio near 1 means cost grows linearly with the number of requests. Peak RSS is the whole process "
        "(Python, numpy, pandas, the trace and the result tables); baseline RSS is the same process just before "
        "`simulate()`.",
        "",
    ]
    path = RESULTS / "simulator.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------- policy speed (issue 15)
SPEED_POLICIES = ("econoserve", "econoserve-no-ordering", "econoserve-oracle", "vllm")
SPEED_DEPLOYMENT = dict(model="opt-13b", gpu="a100-80gb", tensor_parallel=1)
REPO = Path(__file__).resolve().parents[1]


def speed_trace(num_requests: int, predictor_cache: Path):
    """ShareGPT requests of notebook 03's sweep (held-out part, fitting the context, seed 0) at
    rate 1 with the trained predictor's lengths, without text."""
    import econoserve.experiments as ex
    from econoserve.experiments.plan import make_plan

    plan = make_plan(profile="quick", datasets="sharegpt", num_requests=num_requests, sensitivity=False, jobs=1)
    pool = ex.request_pool("sharegpt", plan, plan.deployments[0], with_text=True)
    trace = ex.unit_rate_trace(pool, "sharegpt", num_requests, 0)
    return ex.without_text(ex.predict_lengths(plan, "sharegpt", trace, predictor_cache))


def speed_rates(trace) -> dict[str, float]:
    """Low, reference and high rate [requests/s]: 0.2x, 1.25x and 3x vLLM's burst throughput
    (the full profile's grid ends and the plan's reference rate)."""
    from econoserve.experiments.plan import RateGrid, rate_grid
    from econoserve.experiments.workloads import at_rate
    from econoserve.sim import SimulationConfig, simulate

    burst = simulate(at_rate(trace, 1e6), SimulationConfig(scheduler="vllm", **SPEED_DEPLOYMENT)).summary
    rates, reference = rate_grid({"vllm": burst["throughput_rps"]}, RateGrid(num_rates=2, low_fraction=0.2, high_fraction=3.0))
    return {"low": min(rates), "reference": reference, "high": max(rates)}


def _speed_child(trace_path: str, scheduler: str, rate_rps: float) -> None:
    """In a fresh process, with whichever simulator ``PYTHONPATH`` names: one run, printed as
    JSON (CPU and wall time of ``simulate()``, the tables' hash)."""
    import hashlib

    import econoserve
    from econoserve.experiments.workloads import at_rate
    from econoserve.sim import SimulationConfig, simulate
    from econoserve.sim.engine import WALL_CLOCK_COLUMNS, WALL_CLOCK_SUMMARY_KEYS
    from econoserve.workload.trace import Trace

    trace = at_rate(Trace.read(trace_path), rate_rps)
    config = SimulationConfig(scheduler=scheduler, **SPEED_DEPLOYMENT)
    cpu, wall = time.process_time(), time.perf_counter()
    result = simulate(trace, config)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    digest = hashlib.sha256()
    for table in (result.requests, result.iterations.drop(columns=list(WALL_CLOCK_COLUMNS))):
        digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    summary = {k: v for k, v in result.summary.items() if k not in WALL_CLOCK_SUMMARY_KEYS}
    digest.update(json.dumps(summary, sort_keys=True, default=str).encode())
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "tables_sha256": digest.hexdigest(),
                      "iterations": int(result.summary["num_iterations"]),
                      "skipped_iterations": int(result.summary["skipped_iterations"]),
                      "package": str(Path(econoserve.__file__).resolve().parents[1])}))


def _speed_run(tree: Path, trace_path: Path, scheduler: str, rate_rps: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--speed-child", str(trace_path), scheduler, repr(rate_rps)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    if Path(row["package"]) != tree.resolve():
        raise RuntimeError(f"the run imported econoserve from {row['package']}, not {tree}")
    return row


def policy_speed(before_rev: str, num_requests: int, repeats: int, predictor_cache: Path) -> list[dict]:
    """Before/after CPU time of the speed runs (see the module docstring), one row per run."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="econoserve-before-") as tmp:
        before = Path(tmp) / "tree"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", before_rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        trace = speed_trace(num_requests, predictor_cache)
        trace_path = trace.write(Path(tmp) / "trace.parquet")
        rates = speed_rates(trace)
        runs = [(p, name, rate) for p in SPEED_POLICIES for name, rate in rates.items()]
        rows = []
        for scheduler, rate_name, rate in tqdm(runs, desc="policy speed"):
            samples: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(repeats):
                for label, tree in (("before", before), ("after", REPO)):
                    samples[label].append(_speed_run(tree, trace_path, scheduler, rate))
            hashes = {s["tables_sha256"] for group in samples.values() for s in group}
            cpu = {label: statistics.median(s["cpu_s"] for s in group) for label, group in samples.items()}
            rows.append({
                "scheduler": scheduler, "rate": rate_name, "rate_rps": rate, "num_requests": num_requests,
                "repeats": repeats, "before_rev": before_rev,
                "cpu_before_s": cpu["before"], "cpu_after_s": cpu["after"], "speedup": cpu["before"] / cpu["after"],
                "wall_before_s": statistics.median(s["wall_s"] for s in samples["before"]),
                "wall_after_s": statistics.median(s["wall_s"] for s in samples["after"]),
                "iterations": samples["after"][0]["iterations"],
                "skipped_iterations": samples["after"][0]["skipped_iterations"],
                "identical_tables": len(hashes) == 1,
            })
    return rows


def write_speed_report(rows: list[dict], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "policy_speed_quick" if quick else "policy_speed"
    table = pd.DataFrame(rows)
    table.to_csv(RESULTS / f"{stem}.csv", index=False)
    first = rows[0]
    lines = [
        "# EconoServe's simulation cost, before and after (issue 15)",
        "",
        f"`benchmarks/bench_simulator.py --policy-speed {first['before_rev']}{' --quick' if quick else ''}` on "
        f"{platform.machine()} / {os.cpu_count()} CPUs / Python {platform.python_version()}: ShareGPT, "
        f"{first['num_requests']:,} requests with the trained predictor's lengths, OPT-13B on 1 x A100-80GB; CPU time "
        f"of `simulate()`, median of {first['repeats']} run(s) each, every run a fresh process, before (git revision "
        f"`{first['before_rev']}`) and after alternating. Not a test: the machine is shared, so single numbers move; "
        "the before/after ratio of interleaved runs is the measurement.",
        "",
        "| scheduler | rate | rate [req/s] | iterations (skipped) | CPU before [s] | CPU after [s] | speed-up | "
        "tables identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['rate']} | {r['rate_rps']:g} | {r['iterations']:,} ({r['skipped_iterations']:,}) | "
            f"{r['cpu_before_s']:.2f} | {r['cpu_after_s']:.2f} | {r['speedup']:.2f}x | "
            f"{'yes' if r['identical_tables'] else '**NO**'} |"
        )
    econo = table[table.scheduler != "vllm"]
    vllm = table[table.scheduler == "vllm"].set_index("rate")
    ratio_before = econo.cpu_before_s / econo.rate.map(vllm.cpu_before_s)
    ratio_after = econo.cpu_after_s / econo.rate.map(vllm.cpu_after_s)
    lines += [
        "",
        f"EconoServe variants: {econo.speedup.min():.2f}-{econo.speedup.max():.2f}x faster; their cost relative to "
        f"vLLM's run at the same rate {ratio_before.min():.1f}-{ratio_before.max():.1f}x before, "
        f"{ratio_after.min():.1f}-{ratio_after.max():.1f}x after. Identical tables: the requests, iterations and "
        "summary of every run (wall-clock columns dropped) hash the same before and after.",
        "",
    ]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    if sys.argv[1:2] == ["--speed-child"]:
        _speed_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy-speed", metavar="BEFORE_REV",
                        help="compare EconoServe's simulation cost with git revision BEFORE_REV (see above)")
    parser.add_argument("--predictor-cache", type=Path, default=REPO / "results" / "03_simulated_serving",
                        help="where notebook 03 caches its trained predictors (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 and 5,000 requests instead of 10k/100k (--policy-speed: 2,000 requests, one repeat)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the Vidur-comparable workload")
    parser.add_argument("--report-only", action="store_true", help="rewrite simulator.md from simulator.json")
    args = parser.parse_args()
    if args.policy_speed:
        repeats = 1 if args.quick else args.repeats
        rows = policy_speed(args.policy_speed, 2000 if args.quick else 5000, repeats, args.predictor_cache)
        print(f"wrote {write_speed_report(rows, args.quick)}")
        return
    if args.report_only:
        rows = json.loads((RESULTS / "simulator.json").read_text())
        print(f"wrote {write_report(rows, args)}")
        return
    small, large = (1_000, 5_000) if args.quick else (10_000, 100_000)
    jobs = [
        {"workload": "azure-conv", "num_requests": small, "rate_rps": 2.0, "policy": p, "skip_ahead": skip}
        for p in POLICIES
        for skip in (True, False)
    ]
    if not args.skip_scaling:
        jobs += [
            {"workload": "sharegpt-like", "num_requests": n, "rate_rps": 2.0, "policy": p, "skip_ahead": True}
            for p in POLICIES
            for n in (small, large)
        ]
    rows = run(jobs, args.repeats)
    print(f"wrote {write_report(rows, args)}")


if __name__ == "__main__":
    main()

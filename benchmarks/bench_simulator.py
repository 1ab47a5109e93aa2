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

Each measurement runs in a fresh process (peak RSS is that process's ``ru_maxrss``; the baseline
RSS before the simulation is reported beside it). The wall time is that of ``simulate()`` alone:
trace building and Python start-up are excluded. Results go to
``benchmarks/results/simulator.md`` and ``simulator.json``.

    ECONOSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/bench_simulator.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1,000 and 5,000 requests instead of 10k/100k")
    parser.add_argument("--skip-scaling", action="store_true", help="only the Vidur-comparable workload")
    parser.add_argument("--report-only", action="store_true", help="rewrite simulator.md from simulator.json")
    args = parser.parse_args()
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

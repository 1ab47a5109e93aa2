"""Cluster scale: 1,000,000 requests over 64 replicas, and one replica's speed before and after.

* **Scale**: Llama-2-13B on 1 x A100-80GB per replica, 64 replicas behind the least-loaded
  router (``least-outstanding-tokens``), vLLM's policy, ShareGPT prompt/response lengths (vLLM's
  filter, Llama-2 tokenizer) resampled with replacement, Poisson arrivals at ``--rate-per-replica``
  x 64 requests/s (default 7/s a replica, about 90 % of one replica's saturated throughput on
  these lengths). Predicted lengths = true lengths x a log-normal error (sigma 0.5), so the
  router works from estimates. Sizes 100,000 and 1,000,000 requests: simulated requests per
  wall-second, peak memory, and wall time per request at both sizes (equal = cost linear in
  requests). Every invariant is checked on the tables afterwards: each request finished or was
  rejected exactly once on one replica, with exactly its tokens; KV never over the capacity on
  any replica's step; every replica's clock monotone.
* **One replica, before and after**: the same lengths at 6 requests/s on one replica, 10,000
  requests, per policy, simulated by this tree and by the commit before the cluster refactor
  (``--baseline``, extracted with ``git archive``), interleaved in one run (each run a fresh
  process; median of ``--repeats``).

Results: ``benchmarks/results/cluster.md`` and ``cluster.json``. Long: run it with ``nice``;
``--quick`` (10,000 and 50,000 requests over 64 replicas; 3,000 on one replica) takes a few
minutes.

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_cluster.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The last commit before the simulator became replicas under a cluster driver (issue 11).
BASELINE_COMMIT = "6e2e0dd"
SINGLE_POLICIES = ("vllm", "sarathi", "econoserve")


# --------------------------------------------------------------------- one measurement (child)
def _trace(num_requests: int, rate_rps: float, seed: int):
    import numpy as np

    from econoserve.sim.synthetic import trace_from_lists
    from econoserve.workload.datasets import load_requests

    lengths = load_requests("sharegpt", "llama2")[["prompt_tokens", "output_tokens"]]
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(lengths), num_requests)
    prompts = lengths.prompt_tokens.to_numpy()[rows]
    outputs = lengths.output_tokens.to_numpy()[rows]
    gaps = rng.exponential(1.0 / rate_rps, num_requests)
    predicted = np.maximum(1, np.round(outputs * np.exp(rng.normal(0.0, 0.5, num_requests)))).astype(np.int64)
    return trace_from_lists(np.cumsum(gaps) - gaps[0], prompts, outputs, predicted, dataset="sharegpt-like")


def _check_invariants(result, num_replicas: int, capacity: int) -> list[str]:
    """Invariant violations found in a run's tables (empty when all hold)."""
    import numpy as np

    requests, steps = result.requests, result.iterations
    problems = []
    finished = requests["status"] == "finished"
    if not (finished ^ (requests["status"] == "rejected")).all():
        problems.append("a request neither finished nor rejected")
    if requests["request_id"].duplicated().any():
        problems.append("a request appears twice")
    if not requests["replica"].between(0, num_replicas - 1).all():
        problems.append("a request not on a replica")
    if not (requests.loc[finished, "generated_tokens"] == requests.loc[finished, "output_tokens"]).all():
        problems.append("a finished request with the wrong number of tokens")
    if (steps["kv_blocks_allocated"] > capacity).any():
        problems.append("KV over-committed")
    ends = (steps["start_time_s"] + steps["duration_s"]).to_numpy()
    same = steps["replica"].to_numpy()[1:] == steps["replica"].to_numpy()[:-1]
    if (steps["start_time_s"].to_numpy()[1:][same] < ends[:-1][same]).any():
        problems.append("a replica's clock went backwards")
    if not np.isin(requests.loc[finished, "replica"], steps["replica"].unique()).all():
        problems.append("a request finished on a replica without steps")
    return problems


def _child(job: dict) -> dict:
    """Runs in a fresh process: build the trace, then time the simulation alone."""
    import resource
    import time

    trace = _trace(job["num_requests"], job["rate_rps"], job["seed"])
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from econoserve.sim import SimulationConfig, simulate

    config = SimulationConfig(scheduler=job["policy"], model="llama-2-13b", gpu="a100-80gb")
    cpu_start = time.process_time()
    start = time.perf_counter()
    if job["replicas"] == 1:
        result = simulate(trace, config)
    else:
        from econoserve.sim import ClusterConfig, simulate_cluster

        result = simulate_cluster(trace, ClusterConfig.uniform(config, job["replicas"], job["router"]),
                                  progress=job.get("progress", False))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = result.summary
    row = {
        **job,
        "wall_s": wall,
        "requests_per_wall_s": job["num_requests"] / wall,
        "wall_us_per_request": 1e6 * wall / job["num_requests"],
        "cpu_s": cpu,
        "requests_per_cpu_s": job["num_requests"] / cpu,
        "iterations": s["num_iterations"],
        "iterations_per_wall_s": s["num_iterations"] / wall,
        "completed": s["completed"],
        "rejected": s["rejected"],
        "simulated_s": s["makespan_s"],
        "throughput_rps": s["throughput_rps"],
        "mean_jct_s": s["mean_jct_s"],
        "p99_jct_s": s["p99_jct_s"],
        "slo_attainment": s["slo_attainment"],
        "preempted_fraction": s["preempted_fraction"],
        "peak_rss_mib": peak_rss,
        "baseline_rss_mib": baseline_rss,
    }
    if job["replicas"] > 1:
        capacity = int(result.iterations["kv_blocks_capacity"].iloc[0])
        row["invariant_violations"] = _check_invariants(result, job["replicas"], capacity)
        per_replica = result.requests.groupby("replica").size()
        row["requests_per_replica_min"] = int(per_replica.min())
        row["requests_per_replica_max"] = int(per_replica.max())
    return row


def _run(job: dict, source: Path) -> dict:
    """``job`` in a fresh interpreter whose ``econoserve`` is the one under ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source), "ECONOSERVE_REGISTRY": str(ROOT / "data" / "registry.toml")}
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[2]); from bench_cluster import _child; "
        "import econoserve; assert econoserve.__file__.startswith(sys.argv[3]), econoserve.__file__; "
        "print(json.dumps(_child(json.loads(sys.argv[1]))))"
    )
    output = subprocess.run([sys.executable, "-c", code, json.dumps(job), str(Path(__file__).parent), str(source)],
                            env=env, cwd=source.parent, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _baseline_tree(commit: str, directory: Path) -> Path:
    """The ``econoserve`` package of ``commit``, extracted under ``directory``."""
    archive = directory / "baseline.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit, "econoserve"], check=True, stdout=handle)
    with tarfile.open(archive) as tar:
        tar.extractall(directory / "tree", filter="data")
    return directory / "tree"


# --------------------------------------------------------------------- report
def write_report(scale: list[dict], single: list[dict], args) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps({"scale": scale, "single_replica": single}, indent=2) + "\n")
    lines = [
        "# Cluster scale",
        "",
        f"`benchmarks/bench_cluster.py{' --quick' if args.quick else ''}` on {platform.machine()} / "
        f"{os.cpu_count()} CPUs (shared) / Python {platform.python_version()}; each run in a fresh process, wall "
        "time of the simulation alone (trace building excluded), peak RSS of that process. Not a test: wall-clock "
        "numbers vary with machine load.",
        "",
        f"## {args.replicas} replicas of Llama-2-13B on A100-80GB, least-loaded router",
        "",
        f"vLLM policy on every replica, router `{args.router}`, ShareGPT-like lengths, Poisson "
        f"{args.rate_per_replica * args.replicas:g} requests/s ({args.rate_per_replica:g} a replica), predicted "
        "lengths with a log-normal error (sigma 0.5).",
        "",
        "| requests | wall [s] | simulated requests / wall-s | wall per request [us] | steps | steps / wall-s | "
        "peak RSS [MiB] | simulated [s] | throughput [req/s] | mean JCT [s] | p99 JCT [s] | preempted | "
        "requests per replica (min-max) | invariants |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in scale:
        invariants = "hold" if not r["invariant_violations"] else "; ".join(r["invariant_violations"])
        lines.append(
            f"| {r['num_requests']:,} | {r['wall_s']:.1f} | {r['requests_per_wall_s']:,.0f} | "
            f"{r['wall_us_per_request']:.0f} | {r['iterations']:,} | {r['iterations_per_wall_s']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['simulated_s']:,.0f} | {r['throughput_rps']:.1f} | "
            f"{r['mean_jct_s']:.2f} | {r['p99_jct_s']:.2f} | {r['preempted_fraction']:.3f} | "
            f"{r['requests_per_replica_min']:,}-{r['requests_per_replica_max']:,} | {invariants} |"
        )
    if len(scale) >= 2:
        small, large = scale[0], scale[-1]
        ratio = large["wall_us_per_request"] / small["wall_us_per_request"]
        lines += ["", f"Wall time per request at {large['num_requests']:,} / at {small['num_requests']:,} requests: "
                      f"{ratio:.2f} (1.0 = cost linear in requests)."]
    lines += [
        "",
        f"## One replica: this tree vs {BASELINE_COMMIT} (before the cluster refactor)",
        "",
        f"Llama-2-13B on A100-80GB, {single[0]['num_requests']:,} ShareGPT-like requests, Poisson "
        f"{single[0]['rate_rps']:g} requests/s, skip-ahead on; median of {args.repeats} runs each, old and new "
        "interleaved. CPU seconds (the process's own) are less disturbed by other load than wall seconds.",
        "",
        "| policy | before: requests / wall-s | after: requests / wall-s | after / before (wall) | "
        "before: requests / CPU-s | after: requests / CPU-s | after / before (CPU) | before: peak RSS [MiB] | "
        "after: peak RSS [MiB] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in dict.fromkeys(r["policy"] for r in single):
        old = [r for r in single if r["policy"] == policy and r["tree"] == "before"]
        new = [r for r in single if r["policy"] == policy and r["tree"] == "after"]
        old_rate = statistics.median(r["requests_per_wall_s"] for r in old)
        new_rate = statistics.median(r["requests_per_wall_s"] for r in new)
        old_cpu = statistics.median(r["requests_per_cpu_s"] for r in old)
        new_cpu = statistics.median(r["requests_per_cpu_s"] for r in new)
        lines.append(
            f"| {policy} | {old_rate:,.0f} | {new_rate:,.0f} | {new_rate / old_rate:.2f} | "
            f"{old_cpu:,.0f} | {new_cpu:,.0f} | {new_cpu / old_cpu:.2f} | "
            f"{statistics.median(r['peak_rss_mib'] for r in old):.0f} | "
            f"{statistics.median(r['peak_rss_mib'] for r in new):.0f} |"
        )
    path = RESULTS / "cluster.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, metavar="N",
                        help="cluster trace sizes [requests] (default: 100000 1000000; quick: 10000 50000)")
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--router", default="least-outstanding-tokens")
    parser.add_argument("--rate-per-replica", type=float, default=7.0, metavar="RPS")
    parser.add_argument("--single-requests", type=int, default=None, metavar="N",
                        help="one-replica trace size (default: 10000; quick: 3000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="commit to compare one replica against")
    parser.add_argument("--skip-scale", action="store_true",
                        help="only the one-replica comparison (the cluster rows are kept from results/cluster.json)")
    parser.add_argument("--source", type=Path, default=ROOT, metavar="DIR",
                        help="the tree to measure (default: this one; a snapshot lets you edit meanwhile)")
    args = parser.parse_args()
    sizes = args.sizes or ([10_000, 50_000] if args.quick else [100_000, 1_000_000])
    single_requests = args.single_requests or (3_000 if args.quick else 10_000)

    single = []
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"before": _baseline_tree(args.baseline, Path(scratch)), "after": args.source.resolve()}
        for policy in SINGLE_POLICIES:
            for repeat in range(args.repeats):
                for tree, source in trees.items():
                    job = {"policy": policy, "replicas": 1, "num_requests": single_requests, "rate_rps": 6.0,
                           "seed": 0, "tree": tree, "repeat": repeat}
                    row = _run(job, source)
                    single.append(row)
                    print(f"one replica {policy:>11} {tree:>6}: {row['requests_per_wall_s']:8,.0f} req/s  "
                          f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    scale = []
    if args.skip_scale and (RESULTS / "cluster.json").is_file():
        scale = json.loads((RESULTS / "cluster.json").read_text())["scale"]
    if not args.skip_scale:
        for size in sizes:
            job = {"policy": "vllm", "replicas": args.replicas, "router": args.router, "num_requests": size,
                   "rate_rps": args.rate_per_replica * args.replicas, "seed": 0, "progress": True}
            row = _run(job, args.source.resolve())
            scale.append(row)
            print(f"{args.replicas} replicas, {size:,} requests: {row['wall_s']:.1f} s, "
                  f"{row['requests_per_wall_s']:,.0f} req/s, peak {row['peak_rss_mib']:,.0f} MiB, "
                  f"invariants {'hold' if not row['invariant_violations'] else row['invariant_violations']}",
                  flush=True)
    print(f"-> {write_report(scale, single, args)}")


if __name__ == "__main__":
    main()

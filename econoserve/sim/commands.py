"""``econoserve simulate`` (one run) and ``econoserve sweep`` (schedulers x rates x datasets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from econoserve.errors import UserError
from econoserve.experiments.backends import BACKENDS
from econoserve.policy import DEFAULT_SLO_SCALE, policy_names
from econoserve.sim.catalog import GPUS, MODELS
from econoserve.sim.cluster import DEFAULT_ROUTER, ClusterConfig, simulate_cluster
from econoserve.sim.engine import PREDICTION_SOURCES, SimulationConfig
from econoserve.sim.routers import router_names
from econoserve.validation import output_dir, positive_float, positive_int, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_simulate(subparsers)
    _register_sweep(subparsers)


# --------------------------------------------------------------------- shared flags
def _add_deployment_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deployment and policy")
    group.add_argument("--model", default="opt-13b", metavar="NAME",
                       help=f"model from the catalog: {', '.join(MODELS)} (default: opt-13b)")
    group.add_argument("--gpu", default="a100-80gb", metavar="NAME",
                       help=f"GPU from the catalog: {', '.join(GPUS)} (default: a100-80gb)")
    group.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor-parallel degree [GPUs] (default: 1)")
    group.add_argument("--gpu-memory-utilization", type=positive_float, default=0.9, metavar="F",
                       help="fraction of each GPU's memory the engine uses (default: 0.9)")
    group.add_argument("--block-size", type=positive_int, default=16, metavar="TOKENS", help="tokens per KV block (default: 16)")
    group.add_argument("--num-kv-blocks", type=positive_int, default=None, metavar="N",
                       help="override the KV capacity [blocks] (default: from memory, weights and activations)")
    group.add_argument("--max-model-len", type=positive_int, default=None, metavar="TOKENS",
                       help="override the model's context length [tokens]")
    group.add_argument("--latency-model", default="roofline", metavar="NAME|PATH",
                       help="step-time model: 'roofline' (default: literature efficiency factors), 'calibrated' (roofline "
                            "factors fitted to real A100 measurements; other GPUs/TPs get an estimate), 'distserve' / "
                            "'distserve-vllm' (DistServe's measured A100 fits: OPT-13B TP 1,2,4, OPT-66B TP 2,3,4,8), "
                            "'vidur' (Vidur's Llama-2-70B A100 operator profiles, TP 1,2,4), or a fitted model (.json) "
                            "or measured steps (.csv/.parquet/.jsonl) to fit")
    group.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                       help="override a policy configuration field, e.g. token_budget=1024 (repeatable)")
    group.add_argument("--predictions", default="trace", choices=PREDICTION_SOURCES,
                       help="predicted lengths the policy sees: the trace's column, the true lengths, or none (default: trace)")
    group.add_argument("--slo-scale", type=positive_float, default=DEFAULT_SLO_SCALE, metavar="X",
                       help=f"SLO: JCT <= X times the request's isolated execution time (default: {DEFAULT_SLO_SCALE:g})")
    group.add_argument("--seed", type=seed, default=0, help="seed (recorded; the sweep's traces use it) (default: 0)")
    group.add_argument("--no-skip-ahead", action="store_true",
                       help="simulate every step one by one (same results, slower; per-step scheduler times are then real)")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _policy_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--policy-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return options


def _config(args: argparse.Namespace, scheduler: str) -> SimulationConfig:
    if scheduler not in policy_names():
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(policy_names())}")
    return SimulationConfig(
        scheduler=scheduler,
        policy_config=_policy_options(args.policy_option),
        model=args.model,
        gpu=args.gpu,
        tensor_parallel=args.tp,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        latency_model=args.latency_model,
        slo_scale=args.slo_scale,
        seed=args.seed,
        predictions=args.predictions,
        skip_ahead=not args.no_skip_ahead,
    )


# --------------------------------------------------------------------- simulate
def _register_simulate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run one trace through a scheduler (or a cluster of replicas behind a router) in the simulator",
        description=(
            "Replay a trace against a scheduling policy on a simulated deployment: one replica, "
            "--replicas N identical replicas behind --router, or the replicas of a --cluster "
            "description file. Writes requests.parquet, iterations.parquet (a 'replica' column "
            "says which replica served or stepped), summary.json and config.json to the output "
            "directory, in the results format a real vLLM run also writes (README). Requests that can never fit are rejected and recorded with a reason."
        ),
    )
    parser.add_argument("--trace", required=True, metavar="PATH", help="trace parquet file ('econoserve trace build')")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help=f"scheduling policy: {' | '.join(policy_names())} (required unless --cluster names "
                             "every replica's)")
    parser.add_argument("--num-requests", type=positive_int, default=None, metavar="N",
                        help="use only the first N requests of the trace")
    group = parser.add_argument_group("cluster")
    group.add_argument("--replicas", type=int, default=1, metavar="N",
                       help="identical replicas of the deployment below (default: 1)")
    group.add_argument("--router", default=None, metavar="NAME",
                       help=f"which replica serves each arriving request: {' | '.join(router_names())} "
                            f"(default: {DEFAULT_ROUTER}, or the --cluster file's)")
    group.add_argument("--cluster", default=None, metavar="PATH",
                       help="cluster description (JSON): {\"router\": NAME, \"defaults\": {FIELD: VALUE}, "
                            "\"replicas\": [{\"count\": N, \"scheduler\": NAME, FIELD: VALUE}, ...]}, fields as "
                            "in SimulationConfig (model, gpu, tensor_parallel, policy_config, ...); the flags "
                            "below are the defaults")
    parser.add_argument("-o", "--output", required=True, type=output_dir, metavar="DIR", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_deployment_flags(parser)
    parser.set_defaults(handler=_simulate)


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    """The cluster the flags describe (one replica by default)."""
    if args.cluster is not None:
        if args.replicas != 1:
            raise UserError("--replicas and --cluster are exclusive (the file lists the replicas)")
        base = _config(args, args.scheduler) if args.scheduler is not None else None
        cluster = ClusterConfig.from_file(args.cluster, base)
        return ClusterConfig(cluster.replicas, args.router or cluster.router)
    if args.scheduler is None:
        raise UserError("--scheduler is required (or a --cluster file that names every replica's)")
    return ClusterConfig.uniform(_config(args, args.scheduler), args.replicas, args.router or DEFAULT_ROUTER)


def _simulate(args: argparse.Namespace) -> int:
    from econoserve.workload.trace import Trace

    cluster = _cluster(args)
    trace = Trace.read(args.trace)
    if args.num_requests is not None:
        if args.num_requests <= 0:
            raise UserError(f"--num-requests must be > 0, got {args.num_requests}")
        trace = trace.head(args.num_requests)
    result = simulate_cluster(trace, cluster, progress=not args.no_progress)
    result.config["trace"]["path"] = str(args.trace)
    directory = result.write(args.output)
    s = result.summary
    where = f" on {s['num_replicas']} replicas ({s['router']})" if s["num_replicas"] > 1 else ""
    print(
        f"{s['scheduler']}{where}: {s['completed']}/{s['num_requests']} finished, {s['rejected']} rejected; "
        f"{s['throughput_rps']:.3f} req/s, mean JCT {s['mean_jct_s']:.3f} s, "
        f"SLO attainment {s['slo_attainment']:.3f}, preempted {s['preempted_fraction']:.3f} -> {directory}"
    )
    return 0


# --------------------------------------------------------------------- sweep
def _register_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="simulate schedulers x request rates x datasets in parallel; one tidy table",
        description=(
            "For every dataset and rate, build a trace ('econoserve trace build' semantics), run it "
            "through every scheduler, and write one row per run (the run's summary plus dataset, "
            "rate and scheduler) to DIR/sweep.parquet and DIR/sweep.csv, with each scheduler's "
            "goodput (highest swept rate with SLO attainment >= 0.9) in DIR/goodput.csv. Every finished "
            "run is kept in DIR/tasks/, so rerunning the same command on DIR computes only the missing runs."
        ),
    )
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME",
                        help="datasets (alpaca, sharegpt, qmsum, azure-conv, azure-code, mooncake)")
    parser.add_argument("--rates", nargs="+", type=positive_float, required=True, metavar="RPS",
                        help="mean request rates [requests/s]")
    parser.add_argument("--schedulers", nargs="+", default=list(policy_names()), metavar="NAME",
                        help=f"schedulers (default: all: {' '.join(policy_names())})")
    parser.add_argument("--num-requests", type=positive_int, default=1000, metavar="N", help="requests per trace (default: 1000)")
    parser.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"), help="arrival process (default: poisson)")
    parser.add_argument("--cv", type=positive_float, default=None, help="coefficient of variation of gaps (gamma only)")
    parser.add_argument("--tokenizer", default="llama2", metavar="NAME", help="tokenizer for text datasets (default: llama2)")
    parser.add_argument("--jobs", type=positive_int, default=2, metavar="N",
                        help="parallel workers on this machine (default: 2; ray: CPUs of the Ray instance it starts)")
    parser.add_argument("--backend", default="pool", choices=BACKENDS,
                        help="where runs execute: a local process pool (default) or Ray (pip install 'econoserve[ray]')")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="Ray cluster to run on ('auto': the one this machine belongs to); default: start a "
                             "local Ray instance (ray backend only)")
    parser.add_argument("--save-runs", action="store_true", help="also write each run's directory under DIR/runs/")
    parser.add_argument("-o", "--output", required=True, type=output_dir, metavar="DIR", help="output directory")
    _add_deployment_flags(parser)
    parser.set_defaults(handler=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from econoserve.analysis.metrics import goodput_from_table
    from econoserve.experiments import TASKS_DIRECTORY, Job, TaskStore, make_backend, run_jobs
    from econoserve.workload.datasets import TraceSpec, build_trace

    if any(rate <= 0 for rate in args.rates):
        raise UserError("--rates must all be > 0")
    if args.num_requests <= 0:
        raise UserError(f"--num-requests must be > 0, got {args.num_requests}")
    configs = {name: _config(args, name) for name in args.schedulers}  # validates names and flags up front
    for config in configs.values():
        config.deployment().num_kv_blocks  # noqa: B018 - raises UserError if the model does not fit
    output = Path(args.output)
    with make_backend(args.backend, args.jobs, args.address) as backend:  # a bad choice fails before any work
        # One trace per dataset at rate 1, rescaled to each rate (the same requests at every rate);
        # building it here surfaces unknown names or missing data as one-line errors.
        traces = {
            dataset: build_trace(TraceSpec(dataset=dataset, tokenizer=args.tokenizer, num_requests=args.num_requests,
                                           arrival=args.arrival, rate_rps=1.0, cv=args.cv, seed=args.seed,
                                           include_text=False))
            for dataset in args.datasets
        }
        jobs = [
            Job({"dataset": dataset, "scheduler": name}, traces[dataset], rate, config,
                run_dir=str(output / "runs" / f"{dataset}_{rate:g}rps_{name}") if args.save_runs else None)
            for dataset in args.datasets
            for rate in args.rates
            for name, config in configs.items()
        ]
        rows, _, _ = run_jobs(jobs, backend, desc="sweep", store=TaskStore(output / TASKS_DIRECTORY))
    table = pd.DataFrame(rows).sort_values(["dataset", "scheduler", "rate_rps"], kind="stable").reset_index(drop=True)
    output.mkdir(parents=True, exist_ok=True)
    table.to_parquet(output / "sweep.parquet", index=False)
    table.to_csv(output / "sweep.csv", index=False)
    goodput = goodput_from_table(table, by=["dataset", "scheduler"])
    goodput.to_csv(output / "goodput.csv", index=False)
    sweep_config = {
        "datasets": args.datasets, "rates": args.rates, "schedulers": args.schedulers,
        "num_requests": args.num_requests, "arrival": args.arrival, "cv": args.cv, "tokenizer": args.tokenizer,
        "simulation": {name: c.to_dict() for name, c in configs.items()},
    }
    (output / "config.json").write_text(json.dumps(sweep_config, indent=2, sort_keys=True) + "\n")
    print(goodput.to_string(index=False))
    print(f"{len(table)} runs -> {output / 'sweep.parquet'}")
    return 0


__all__ = ["register"]

"""``econoserve placement`` (DistServe's placement search) and ``econoserve gpus-needed`` (the
fewest GPUs reaching target rates, per system; Figure 12's table for one model and dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.analysis.metrics import GOODPUT_TARGET
from econoserve.errors import UserError
from econoserve.experiments.placement import (
    AFFINITIES,
    ATTAINMENT_RULES,
    DISTSERVE,
    SLO_KINDS,
    Hardware,
    SearchSettings,
    ServiceObjective,
    colocated_search,
    gpus_needed,
    placement_search,
)
from econoserve.policy import DEFAULT_SLO_SCALE
from econoserve.sim.catalog import DEFAULT_NETWORK, GPUS, MODELS, NETWORK_LINKS
from econoserve.sim.routers import router_names
from econoserve.workload.trace import Trace

#: ``--dataset`` also takes this: ShareGPT as DistServe prepares it (for comparing with DistServe).
DISTSERVE_SHAREGPT = "sharegpt-distserve"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_placement(subparsers)
    _register_gpus_needed(subparsers)


# --------------------------------------------------------------------- shared flags
def _add_subcommand(subparsers, name: str, handler, help: str, description: str) -> argparse.ArgumentParser:
    """The subcommand ``name`` with the flags both subcommands share, run by ``handler``."""
    parser = subparsers.add_parser(name, help=help, description=description)
    _add_common(parser)
    parser.set_defaults(handler=handler)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    work = parser.add_argument_group("workload")
    source = work.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="NAME",
                        help=f"alpaca, sharegpt, qmsum, or {DISTSERVE_SHAREGPT} (ShareGPT as DistServe prepares it)")
    source.add_argument("--trace", metavar="PATH",
                        help="a trace file ('econoserve trace build'); its arrivals are rescaled to a mean rate of 1/s")
    work.add_argument("--num-requests", type=int, default=300, metavar="N",
                      help="requests sampled from --dataset (default: 300, as DistServe's simulator)")
    work.add_argument("--predictor", default="none", choices=("train", "oracle", "none"),
                      help="predicted lengths for EconoServe with --dataset (default: none; train = notebook 03's "
                           "per-dataset LightGBM model, cached under --cache-dir)")
    work.add_argument("--seed", type=int, default=0, help="sampling and arrival seed (default: 0)")
    work.add_argument("--cache-dir", default="results/gpus_needed", metavar="DIR",
                      help="where trained predictors are cached (default: results/gpus_needed)")
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--model", default="opt-13b", help=f"catalog model: {', '.join(MODELS)} (default: opt-13b)")
    hw.add_argument("--gpu", default="a100-80gb", help=f"catalog GPU: {', '.join(GPUS)} (default: a100-80gb)")
    hw.add_argument("--gpus-per-node", type=int, default=4, metavar="N", help="GPUs per node (default: 4)")
    hw.add_argument("--max-gpus", type=int, default=64, metavar="N", help="the most GPUs a cluster may use (default: 64)")
    hw.add_argument("--max-tp", type=int, default=None, metavar="N", help="largest tensor-parallel degree searched")
    hw.add_argument("--latency-model", default="roofline", metavar="NAME",
                    help="roofline (default), calibrated, distserve, distserve-vllm, ... (see 'econoserve simulate --help')")
    hw.add_argument("--network", default=DEFAULT_NETWORK, choices=tuple(NETWORK_LINKS),
                    help=f"link between nodes for KV transfers (default: {DEFAULT_NETWORK})")
    slo = parser.add_argument_group("service objective")
    slo.add_argument("--slo", default="ttft-tpot", choices=SLO_KINDS,
                     help="ttft-tpot (DistServe's) or jct (JCT <= --slo-scale x isolated time) (default: ttft-tpot)")
    slo.add_argument("--ttft-ms", type=float, default=200.0, help="TTFT target [ms] (default: 200)")
    slo.add_argument("--tpot-ms", type=float, default=100.0, help="TPOT target [ms] (default: 100)")
    slo.add_argument("--slo-scale", type=float, default=DEFAULT_SLO_SCALE,
                     help=f"JCT SLO scale (default: {DEFAULT_SLO_SCALE:g})")
    slo.add_argument("--attainment", type=float, default=GOODPUT_TARGET,
                     help=f"share of requests that must meet it (default: {GOODPUT_TARGET:g})")
    slo.add_argument("--rule", default="joint", choices=ATTAINMENT_RULES,
                     help="joint: a request meets TTFT and TPOT; per-metric: DistServe's test, each share >= target "
                          "(default: joint)")
    search = parser.add_argument_group("search")
    search.add_argument("--max-instances", type=int, default=1, metavar="N",
                        help="most instances of one phase in a DistServe placement (default: 1, a pair)")
    search.add_argument("--affinity", action="append", choices=AFFINITIES, default=None,
                        help="DistServe's low (one node, NVLink) and/or high (separate nodes) node-affinity "
                             "placements (repeatable; default: low)")
    search.add_argument("--tolerance", type=float, default=0.05, help="bisection tolerance [fraction] (default: 0.05)")
    search.add_argument("--max-evaluations", type=int, default=12, help="simulations per goodput (default: 12)")
    search.add_argument("--router", default="least-outstanding-tokens", choices=router_names(),
                        help="router of every cluster (default: least-outstanding-tokens)")
    parser.add_argument("--output", metavar="CSV", default=None, help="also write the table here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _objective(args) -> ServiceObjective:
    return ServiceObjective(args.slo, ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3,
                            slo_scale=args.slo_scale, target=args.attainment, rule=args.rule)


def _hardware(args) -> Hardware:
    hardware = Hardware(args.model, args.gpu, args.gpus_per_node, args.max_gpus, args.latency_model, args.network)
    hardware.parallel_degrees(args.max_tp)  # a model that fits nowhere: one clear error before the trace is built
    return hardware


def _settings(args) -> SearchSettings:
    if not 0 < args.tolerance < 1:
        raise UserError(f"--tolerance must be in (0, 1), got {args.tolerance}")
    return SearchSettings(relative_tolerance=args.tolerance, max_evaluations=args.max_evaluations,
                          max_instances=args.max_instances, router=args.router, max_tp=args.max_tp)


def _trace(args) -> Trace:
    if args.num_requests < 2:
        raise UserError(f"--num-requests must be >= 2, got {args.num_requests}")
    if args.trace:
        trace = Trace.read(args.trace)
        frame = trace.requests.copy()
        span = float(frame["arrival_time_s"].max() - frame["arrival_time_s"].min())
        if len(frame) < 2 or span <= 0:
            raise UserError(f"{args.trace}: needs at least two requests at different times to rescale its arrivals")
        frame["arrival_time_s"] = (frame["arrival_time_s"] - frame["arrival_time_s"].min()) * (len(frame) - 1) / span
        return Trace(frame, dict(trace.metadata))
    from econoserve.experiments import REQUEST_FAMILIES, unit_rate_trace
    from econoserve.experiments.gpus_needed import make_gpus_needed_plan, workload_trace

    if args.dataset == DISTSERVE_SHAREGPT:
        from econoserve.workload.datasets import load_distserve_sharegpt

        trace = unit_rate_trace(load_distserve_sharegpt(), "sharegpt", args.num_requests, args.seed)
        if args.predictor == "oracle":
            trace = trace.with_predictions(trace.requests["output_tokens"].to_numpy(np.int64))
        elif args.predictor == "train":
            raise UserError(f"--predictor train is not available for {DISTSERVE_SHAREGPT}; use oracle or none")
        return trace
    if args.dataset not in REQUEST_FAMILIES:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(REQUEST_FAMILIES)}, "
                        f"{DISTSERVE_SHAREGPT}")
    plan = make_gpus_needed_plan("quick", num_requests=args.num_requests, seed=args.seed, predictor=args.predictor)
    return workload_trace(plan, args.model, args.dataset, Path(args.cache_dir))


def _emit(table: pd.DataFrame, args) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.output, index=False)


# --------------------------------------------------------------------- placement
def _register_placement(subparsers) -> None:
    _add_subcommand(
        subparsers, "placement", _run_placement,
        help="DistServe's placement search: the prefill/decode parallelism and instance counts with the best goodput per GPU",
        description=(
            "Search DistServe's placements (prefill and decode instances, each at its tensor-parallel degree) by "
            "simulating each and finding its goodput (the highest Poisson rate at which the --attainment share of "
            "requests meet the objective) by bisection. Prints every placement, best goodput per GPU first. "
            "Example (DistServe's published case): econoserve placement --dataset sharegpt-distserve "
            "--latency-model distserve --rule per-metric"
        ),
    )


def _run_placement(args) -> int:
    objective, hardware, settings = _objective(args), _hardware(args), _settings(args)
    table = placement_search(_trace(args), hardware, objective, settings, affinities=args.affinity or ("low",),
                             progress=not args.no_progress)
    columns = ["unit", "num_gpus_per_unit", "goodput_rps", "goodput_per_gpu_rps", "evaluations"]
    _emit(table[columns], args)
    return 0


# --------------------------------------------------------------------- gpus-needed
def _register_gpus_needed(subparsers) -> None:
    parser = _add_subcommand(
        subparsers, "gpus-needed", _run_gpus_needed,
        help="the fewest GPUs whose cluster meets the objective at each target rate, per system (Figure 12)",
        description=(
            "For each system (colocated schedulers: N replicas behind the router, each replica's TP searched; "
            "DistServe: its best placement, copied), find the fewest GPUs whose simulated cluster meets the objective "
            "at each --target-rate. A rate no cluster within --max-gpus reaches is a row with reachable=False and the "
            "reason."
        ),
    )
    parser.add_argument("--systems", default="econoserve,vllm,sarathi,distserve", metavar="LIST",
                        help="comma-separated systems (schedulers and 'distserve') (default: econoserve,vllm,sarathi,distserve)")
    parser.add_argument("--target-rate", type=float, action="append", required=True, metavar="RPS",
                        help="target request rate [requests/s] (repeatable)")


def _run_gpus_needed(args) -> int:
    from econoserve.policy import policy_names

    objective, hardware, settings = _objective(args), _hardware(args), _settings(args)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s != DISTSERVE and s not in policy_names()]
    if not systems or unknown:
        raise UserError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join((*policy_names(), DISTSERVE))}")
    trace = _trace(args)
    progress = not args.no_progress
    tables = []
    if DISTSERVE in systems:
        tables.append(placement_search(trace, hardware, objective, settings, args.affinity or ("low",), progress))
    tables += [colocated_search(trace, s, hardware, objective, settings, progress) for s in systems if s != DISTSERVE]
    table = gpus_needed(pd.concat(tables, ignore_index=True), args.target_rate, trace, hardware, objective, settings,
                        progress)
    _emit(table[["system", "target_rate_rps", "num_gpus", "unit", "copies", "reachable", "reason"]], args)
    return 0

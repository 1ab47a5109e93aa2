"""``econoserve data ...`` and ``econoserve trace ...``."""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm

from econoserve.errors import DataError, UserError
from econoserve.validation import non_negative_int, output_file, positive_float, seed
from econoserve.workload import registry
from econoserve.workload.arrivals import ARRIVAL_PROCESSES, interarrival_cv
from econoserve.workload.datasets import (
    DATASETS,
    LoadOptions,
    TraceSpec,
    build_trace,
)
from econoserve.workload.tokenizer import TOKENIZER_NAMES
from econoserve.workload.trace import Trace


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_data(subparsers)
    _register_trace(subparsers)


# --------------------------------------------------------------------- data
def _register_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="list, fetch and verify the registered datasets and tokenizer files",
        description=(
            "The dataset registry (data/registry.toml) names every data and tokenizer file with its "
            "public source URL, sha256 and licence. Files are read from data/cache/ or from the "
            "mirror directory in ECONOSERVE_DATA_MIRROR; 'fetch' copies from the mirror or downloads "
            "from the source, and checks the sha256."
        ),
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="each registered file, where it is locally, its size")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_data_list)

    fetch = actions.add_parser(
        "fetch",
        help="copy from the mirror or download into data/cache/, verifying the sha256",
        description="Fetch registered files into data/cache/ (or ECONOSERVE_DATA_CACHE).",
    )
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registered names (default: all)")
    fetch.set_defaults(handler=_data_fetch)

    verify = actions.add_parser("verify", help="check local files against their registered sha256")
    verify.add_argument("names", nargs="*", metavar="NAME", help="registered names (default: all)")
    verify.set_defaults(handler=_data_verify)


def _data_list(args: argparse.Namespace) -> int:
    rows = []
    for entry in registry.load_registry().values():
        status = registry.local_status(entry)
        size = status.path.stat().st_size if status.path else None
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "location": status.location,
                "size_bytes": size,
                "records": entry.records,
                "license": entry.license,
                "path": str(status.path) if status.path else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':24} {'kind':10} {'local':8} {'size':>10} {'records':>8}  license")
    for row in rows:
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row["size_bytes"] is not None else "-"
        print(
            f"{row['name']:24} {row['kind']:10} {row['location']:8} {size:>10} {row['records']:>8}  {row['license']}"
        )
    return 0


def _names(args: argparse.Namespace) -> list[str]:
    known = registry.load_registry()
    for name in args.names:
        registry.get_entry(name)  # one-line error for an unknown name
    return list(args.names) or list(known)


def _data_fetch(args: argparse.Namespace) -> int:
    failures = []
    for name in tqdm(_names(args), desc="fetch", unit="file", disable=len(args.names) == 1):
        try:
            print(f"{name}: {registry.fetch(name)}")
        except DataError as error:
            failures.append(str(error))
    return _report_failures(failures)


def _data_verify(args: argparse.Namespace) -> int:
    failures = []
    for name in _names(args):
        try:
            print(f"{name}: ok ({registry.verify(name)})")
        except DataError as error:
            failures.append(str(error))
    return _report_failures(failures)


def _report_failures(failures: list[str]) -> int:
    if len(failures) == 1:
        raise DataError(failures[0])
    if failures:
        raise DataError(f"{len(failures)} files failed: " + " | ".join(failures))
    return 0


# --------------------------------------------------------------------- trace
def _register_trace(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser(
        "trace",
        help="build, inspect and validate request traces",
        description="A trace is a parquet table of requests: arrival time, prompt and output tokens.",
    )
    actions = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build",
        help="build a trace from a real dataset and an arrival process",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Sample requests from a registered dataset, count tokens with an offline tokenizer, and "
            "give them arrival times. The same arguments and seed give a byte-identical file. "
            "Examples: --dataset alpaca --arrival poisson --rate 4; --dataset sharegpt --arrival "
            "gamma --rate 2 --cv 3; --dataset azure-conv --arrival replay; --dataset alpaca "
            "--arrival replay --replay-source azure-conv."
        ),
    )
    build.add_argument("--dataset", required=True, metavar="NAME",
                       help=f"one of: {', '.join(DATASETS)}")
    build.add_argument("--tokenizer", default="llama2", metavar="NAME",
                       help=f"one of: {', '.join(TOKENIZER_NAMES)} (ignored for datasets without text)")
    build.add_argument("--num-requests", type=non_negative_int, default=1000,
                       help="requests in the trace (0 = every usable request)")
    build.add_argument("--arrival", default="poisson", choices=ARRIVAL_PROCESSES,
                       help="arrival process")
    build.add_argument("--rate", type=positive_float, default=None,
                       help="mean arrival rate [requests/s]; needed for poisson/gamma, optional "
                            "rescaling for replay")
    build.add_argument("--cv", type=positive_float, default=None,
                       help="gamma only: coefficient of variation of inter-arrival gaps (1 = Poisson)")
    build.add_argument("--replay-source", default=None, metavar="NAME",
                       help="replay only: borrow this trace's timestamps for a text dataset")
    build.add_argument("--qmsum-context", default="span", choices=("span", "full"),
                       help="qmsum only: relevant transcript span, or the whole meeting")
    build.add_argument("--no-text", action="store_true", help="leave out the prompt_text column")
    build.add_argument("--seed", type=seed, default=0, help="seed for sampling and arrivals")
    build.add_argument("-o", "--output", required=True, type=output_file, help="output parquet path")
    build.set_defaults(handler=_trace_build)

    info = actions.add_parser("info", help="summary statistics of a trace")
    info.add_argument("trace", help="trace parquet file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_trace_info)

    validate = actions.add_parser("validate", help="check a trace file against the schema")
    validate.add_argument("trace", help="trace parquet file")
    validate.set_defaults(handler=_trace_validate)


def _trace_build(args: argparse.Namespace) -> int:
    if args.num_requests < 0:
        raise UserError(f"--num-requests must be >= 0, got {args.num_requests}")
    spec = TraceSpec(
        dataset=args.dataset,
        tokenizer=args.tokenizer,
        num_requests=args.num_requests or None,
        arrival=args.arrival,
        rate_rps=args.rate,
        cv=args.cv,
        seed=args.seed,
        replay_source=args.replay_source,
        include_text=not args.no_text,
        options=LoadOptions(qmsum_context=args.qmsum_context),
    )
    trace = build_trace(spec)
    path = trace.write(args.output)
    print(f"{path}: {len(trace)} requests over {trace.duration_s:.1f} s")
    return 0


def trace_summary(trace: Trace) -> dict[str, float | int | str]:
    """Headline statistics of a trace (lengths in tokens, times in seconds)."""
    requests = trace.requests
    return {
        "num_requests": len(trace),
        "datasets": ",".join(sorted(requests["dataset"].unique())),
        "duration_s": trace.duration_s,
        "mean_rate_rps": (len(trace) - 1) / trace.duration_s if trace.duration_s > 0 else float("nan"),
        "interarrival_cv": interarrival_cv(requests["arrival_time_s"].to_numpy()),
        "prompt_tokens_mean": float(requests["prompt_tokens"].mean()),
        "prompt_tokens_p50": float(requests["prompt_tokens"].median()),
        "prompt_tokens_p99": float(requests["prompt_tokens"].quantile(0.99)),
        "output_tokens_mean": float(requests["output_tokens"].mean()),
        "output_tokens_p50": float(requests["output_tokens"].median()),
        "output_tokens_p99": float(requests["output_tokens"].quantile(0.99)),
        "has_text": trace.has_text,
        "has_predictions": trace.has_predictions,
    }


def _trace_info(args: argparse.Namespace) -> int:
    summary = trace_summary(Trace.read(args.trace))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:22} {value:.3f}" if isinstance(value, float) else f"{key:22} {value}")
    return 0


def _trace_validate(args: argparse.Namespace) -> int:
    trace = Trace.read(args.trace)
    print(f"{args.trace}: valid trace of {len(trace)} requests")
    return 0

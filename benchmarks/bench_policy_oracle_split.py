"""Where EconoServe's oracle gain comes from: Ordering's lengths or the allocation's (issue 10).

EconoServe uses a request's predicted length twice: Ordering ranks the PT queue by it (the key is
the latest start that meets the estimated deadline), and allocation sizes the request's term in
the occupancy curve from it. This benchmark gives the two uses different lengths, on the
scoreboard's traces (:mod:`bench_policy_regimes`), and measures goodput / Sarathi's:

* ``trained``: the trained prediction for both (EconoServe as deployed);
* ``true ordering``: the true length for Ordering, the trained prediction for allocation;
* ``true allocation``: the trained prediction for Ordering, the true length for allocation;
* ``true``: the true length for both (``econoserve-oracle``).

The split needs no special policy code: the length Ordering uses comes from the trace's
``predicted_output_quantiles`` (``ordering_length="quantile"``; every quantile set to one length,
a point mass) and the allocation's from ``predicted_output_tokens``. All four variants therefore
order by the length itself, not by the padded, bucketed allocation the default Ordering uses, so
``trained`` may differ from the scoreboard's ``econoserve`` by a few percent.

Output: ``benchmarks/results/policy_oracle_split.md`` / ``.csv`` (``--quick``:
``policy_oracle_split_quick``).

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_policy_oracle_split.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_policy_regimes as board  # noqa: E402  (the scoreboard's regimes, traces and goodput search)

QUANTILE_POINTS = 16
#: variant -> (length for Ordering, length for allocation): "trained" or "true".
VARIANTS: dict[str, tuple[str, str]] = {
    "trained": ("trained", "trained"),
    "true ordering": ("true", "trained"),
    "true allocation": ("trained", "true"),
    "true": ("true", "true"),
}


def split_trace(trace, ordering: str, allocation: str):
    """``trace`` whose allocation length (``predicted_output_tokens``) and Ordering length (a
    point mass in ``predicted_output_quantiles``) are each the trained prediction or the truth."""
    lengths = {"trained": trace.requests["predicted_output_tokens"].to_numpy(np.int64),
               "true": trace.requests["output_tokens"].to_numpy(np.int64)}
    point_mass = np.repeat(lengths[ordering][:, None], QUANTILE_POINTS, axis=1)
    return trace.with_predictions(lengths[allocation], point_mass)


def measure(regime: board.Regime, num_requests: int, seeds: tuple[int, ...]) -> list[dict]:
    rows = []
    for seed, trace in board.unit_rate_traces(regime, num_requests, seeds).items():
        sarathi, _ = board.goodput(trace, regime, "sarathi", seed, 1.0)
        for variant, (ordering, allocation) in VARIANTS.items():
            rate, runs = board.goodput(split_trace(trace, ordering, allocation), regime,
                                       "econoserve[ordering_length=quantile]", seed, sarathi)
            rows.append({"regime": regime.name, "seed": seed, "variant": variant, "ordering_length": ordering,
                         "allocation_length": allocation, "goodput_rps": rate, "sarathi_goodput_rps": sarathi,
                         "goodput_vs_sarathi": rate / sarathi})
            print(f"{regime.name} seed {seed} {variant}: {rate:.3g} req/s = {rate / sarathi:.3f}x Sarathi "
                  f"({runs} runs)", file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1000 requests, seed 0 (default 2000 requests, seeds 0 1)")
    parser.add_argument("--regimes", nargs="+", choices=[r.name for r in board.REGIMES if r.predictions == "trained"],
                        default=list(board.QUICK_REGIMES), help="scoreboard regimes with trained predictions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    num_requests, seeds = (1000, (0,)) if args.quick else (2000, (0, 1))
    started = time.perf_counter()
    regimes = {r.name: r for r in board.REGIMES}
    rows = [row for name in args.regimes for row in measure(regimes[name], num_requests, seeds)]
    table = pd.DataFrame(rows)
    name = "policy_oracle_split" + ("_quick" if args.quick else "")
    board.RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(board.RESULTS / f"{name}.csv", index=False)
    means = table.groupby(["regime", "variant"], sort=False)["goodput_vs_sarathi"].mean().unstack("variant")
    means = means[list(VARIANTS)].round(3).reset_index()
    (board.RESULTS / f"{name}.md").write_text(
        "# Where EconoServe's oracle gain comes from: Ordering's lengths or the allocation's\n\n"
        f"Written by `benchmarks/bench_policy_oracle_split.py{' --quick' if args.quick else ''}` "
        f"({num_requests} requests, seeds {list(seeds)}; {(time.perf_counter() - started) / 60:.1f} min). "
        "Goodput / Sarathi's (means over seeds) of EconoServe with the trained prediction or the true length "
        "for Ordering and for allocation (see the script's docstring).\n\n" + board.markdown(means) + "\n")
    print(board.markdown(means))
    return 0


if __name__ == "__main__":
    sys.exit(main())

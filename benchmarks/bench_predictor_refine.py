"""The refined response-length predictor against the prompt-only one, on held-out responses.

For each dataset with response text and each ``k`` [tokens]: the prompt-only model of the policy
scoreboard (``benchmarks/bench_policy_regimes.py``: the dataset's LightGBM model trained on 4000
requests of the training part, cached under ``results/policy_regimes/predictors/``) and the
refined model (:mod:`econoserve.predictor.refine`: the prompt and the response's first ``k``
tokens, trained on the same training part, cached beside it) predict every held-out request
longer than ``k``; the table gives Spearman's rank correlation, MAE [tokens] and the median
relative error of both. ``--quick``: ShareGPT only (plus the refined model trained on the
prompt-only model's 4000 requests at the largest ``k``, to separate the prefix from the data).

Output: ``benchmarks/results/predictor_refine[_quick].md`` and ``.csv``.

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_predictor_refine.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "results" / "policy_regimes"
DATASETS: tuple[str, ...] = ("sharegpt", "alpaca", "qmsum")


def _plan(dataset: str):
    from econoserve.experiments import DeploymentSpec, ExperimentPlan

    return ExperimentPlan(datasets=(dataset,), deployments=(DeploymentSpec("opt-13b", "a100-80gb"),),
                          num_requests=1000, seeds=(0,), predictor="train", sensitivity=None, jobs=1)


def _parts(plan, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and held-out requests of ``dataset`` (the predictor's split)."""
    from econoserve.predictor import SplitSpec
    from econoserve.predictor.data import _split_rows
    from econoserve.workload.datasets import load_requests

    training = plan.predictor_training
    split = SplitSpec(test_fraction=training.test_fraction, seed=training.split_seed)
    requests = load_requests(dataset, plan.tokenizer)
    index = requests["source_index"].to_numpy()
    return requests.iloc[_split_rows(index, "train", split)], requests.iloc[_split_rows(index, "test", split)]


def measure(dataset: str, k: int, max_train: int | None = None) -> dict:
    """One row: prompt-only vs refined on the held-out requests of ``dataset`` longer than ``k``
    (``max_train``: train a refined model on that many training requests instead of the cached
    default, which uses all of them)."""
    import econoserve.experiments as ex
    from econoserve.predictor.data import sample_rows
    from econoserve.predictor.refine import RefinedConfig, refinement_metrics, train_refined_predictor

    plan = _plan(dataset)
    base = ex.ensure_predictor(plan, dataset, CACHE)
    start = time.perf_counter()
    if max_train is None:
        model = ex.ensure_refined_predictor(plan, dataset, CACHE, k)
    else:
        train, _ = _parts(plan, dataset)
        train = train.iloc[sample_rows(len(train), max_train, plan.predictor_training.split_seed)]
        model = train_refined_predictor(base, train["prompt_text"].tolist(), train["response_text"].tolist(),
                                        train["output_tokens"].to_numpy(np.int64), RefinedConfig(k, max_train_requests=max_train))
    train_s = time.perf_counter() - start
    _, test = _parts(plan, dataset)
    test = test[test["output_tokens"] > k]
    prompts, responses = test["prompt_text"].tolist(), test["response_text"].tolist()
    metrics = refinement_metrics(test["output_tokens"].to_numpy(), base.predict(prompts),
                                 model.predict(prompts, responses), k)
    return {"dataset": dataset, "k_tokens": k,
            "refined_train_requests": model.training_data["num_requests"],
            "held_out_longer_than_k": int(metrics["num_longer"]),
            **{name: metrics[name] for name in ("prompt_only_spearman", "refined_spearman", "prompt_only_mae_tokens",
                                                "refined_mae_tokens", "prompt_only_median_relative_error",
                                                "refined_median_relative_error")},
            "refined_config": asdict(model.config), "train_or_load_s": train_s}


def write(rows: list[dict], args, elapsed_s: float) -> Path:
    from bench_policy_regimes import markdown

    frame = pd.DataFrame(rows).drop(columns=["refined_config"])
    stem = "predictor_refine_quick" if args.quick else "predictor_refine"
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / f"{stem}.csv", index=False, float_format="%.4g")
    lines = [
        "# Refined response-length predictor: prompt + the response's first k tokens",
        "",
        f"Written by `benchmarks/bench_predictor_refine.py` ({'quick' if args.quick else 'full'} mode; "
        f"{elapsed_s / 60:.1f} min). Held-out part of each dataset (the predictor's split), requests longer "
        "than k only. Prompt-only = the scoreboard's model (4000 training requests, 100 rounds); refined = "
        "the same LightGBM settings on the prompt features + the prefix (n-grams, response cues), trained "
        "on `refined_train_requests` requests of the same training part (those longer than k). "
        "`train_or_load_s` includes loading a cached model.",
        "",
        markdown(frame.drop(columns=["train_or_load_s"])),
        "",
    ]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ShareGPT only (a few minutes)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32], help="prefix lengths [tokens] (default 16 32)")
    args = parser.parse_args(argv)
    if min(args.k) < 1:
        parser.error("--k values must be >= 1")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from econoserve.errors import UserError

    jobs = [(d, k, None) for d in (("sharegpt",) if args.quick else DATASETS) for k in args.k]
    if args.quick:
        jobs.append(("sharegpt", max(args.k), 4000))
    start = time.perf_counter()
    rows = []
    try:
        for dataset, k, max_train in tqdm(jobs, desc="refined predictors", unit="model"):
            rows.append(measure(dataset, k, max_train))
    except UserError as exc:
        print(f"bench_predictor_refine: {exc}", file=sys.stderr)
        return 2
    print(write(rows, args, time.perf_counter() - start).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

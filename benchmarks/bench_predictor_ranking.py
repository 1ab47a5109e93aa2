"""How well prompt-only length predictors *rank* ShareGPT's (or Alpaca's) held-out requests.

EconoServe's Ordering admits requests by their predicted length before any token is generated,
so what matters there is the ranking, not the length: with the true lengths used only for the
ordering the scoreboard's ShareGPT 80 GB goodput ratio goes from 1.04 to 1.15 (quick trace). This
script trains prompt-only variants of the scoreboard's predictor (``benchmarks/bench_policy_regimes.py``:
LightGBM on prompt features + n-grams, :class:`~econoserve.experiments.plan.PredictorTraining`'s
4000 training prompts and 100 boosting rounds, L1 regression on ``log1p(length)``) on the same
training part, and scores each on the whole held-out part (the split the scoreboard's traces
are drawn from): Spearman's and Kendall's rank correlation (and Spearman among the answers of
at most 256 tokens), MAE [tokens], the median prediction of the short (<= 32 tokens) and long
(> 256 tokens) answers, and the share of short answers predicted longer than 100 tokens (the
requests EconoServe's admission holds back wrongly).

Variants: the number of training prompts (4000 or all), boosting rounds, n-gram vocabulary,
the loss (L1 = conditional median, L2 = conditional mean of the log length) and the ``rank``
objective (LightGBM lambdarank over random groups of training prompts, scores mapped to
lengths through the training lengths' quantiles), and the neighbour-length block
(:mod:`econoserve.predictor.neighbours`: statistics of the lengths of the 16 or 64 most similar
training prompts, leave-one-out or out-of-fold over 5 folds on the training rows), and prompt
decoupling (:mod:`econoserve.predictor.decoupling`: the log prediction rescaled by one
prompt-length factor fitted on out-of-fold training predictions). ``spearman_vs_prompt``: the
predictions' Spearman with the prompt length (the truths': in the header). Held-out
prompts whose exact text is also a training prompt (ShareGPT holds duplicate records) are scored
apart as well (``spearman_duplicates`` / ``spearman_others``). Every model is single-threaded and
seeded. ``--quick`` trains only the default and its all-prompts counterpart.

Output: ``benchmarks/results/predictor_ranking[_<dataset>][_quick].md`` and ``.csv`` (``--output``
another stem).

    ECONOSERVE_DATA_MIRROR=../shared/data nice -n 10 .venv/bin/python benchmarks/bench_predictor_ranking.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER = "llama2"
SHORT_TOKENS = 32
LONG_TOKENS = 256
SHORT_PREDICTED_LONG_TOKENS = 100
DATASETS: tuple[str, ...] = ("sharegpt", "alpaca")
DATASET_TITLES: dict[str, str] = {"sharegpt": "ShareGPT", "alpaca": "Alpaca"}


@dataclass(frozen=True)
class Variant:
    """One prompt-only model: training prompts (None = all) and :class:`PredictorConfig` fields
    that differ from the scoreboard's (``num_boost_round`` 100, seed 0, one thread)."""

    name: str
    max_train: int | None = 4000
    config: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("default (4000 prompts, 100 rounds, L1)"),
    Variant("all prompts", None),
    Variant("all prompts, 300 rounds", None, {"num_boost_round": 300}),
    Variant("all prompts, 300 rounds, 20k n-grams", None, {"num_boost_round": 300},
            {"ngram_vocabulary_size": 20000}),
    Variant("all prompts, L2 on log length", None, {"regression_loss": "l2"}),
    Variant("4000 prompts, rank objective", 4000, {"objective": "rank"}),
    Variant("all prompts, rank objective", None, {"objective": "rank"}),
    Variant("all prompts, rank objective, 300 rounds", None, {"objective": "rank", "num_boost_round": 300}),
    Variant("4000 prompts, neighbours 16", 4000, {}, {"neighbour_count": 16}),
    Variant("4000 prompts, neighbours 16, 5 folds", 4000, {}, {"neighbour_count": 16, "neighbour_folds": 5}),
    Variant("4000 prompts, neighbours 64, 5 folds", 4000, {}, {"neighbour_count": 64, "neighbour_folds": 5}),
    Variant("all prompts, neighbours 16", None, {}, {"neighbour_count": 16}),
    Variant("all prompts, neighbours 16, 5 folds", None, {}, {"neighbour_count": 16, "neighbour_folds": 5}),
    Variant("all prompts, neighbours 64", None, {}, {"neighbour_count": 64}),
    Variant("all prompts, neighbours 64, 5 folds", None, {}, {"neighbour_count": 64, "neighbour_folds": 5}),
    Variant("all prompts, 300 rounds, neighbours 64, 5 folds", None, {"num_boost_round": 300},
            {"neighbour_count": 64, "neighbour_folds": 5}),
    Variant("all prompts, rank objective, 300 rounds, neighbours 64, 5 folds", None,
            {"objective": "rank", "num_boost_round": 300}, {"neighbour_count": 64, "neighbour_folds": 5}),
    Variant("4000 prompts, prompt decoupling, 5 folds", 4000, {"prompt_decoupling_folds": 5}),
    Variant("all prompts, prompt decoupling, 5 folds", None, {"prompt_decoupling_folds": 5}),
)
QUICK_VARIANTS: tuple[str, ...] = (VARIANTS[0].name, VARIANTS[1].name)


def measure(variant: Variant, train, test) -> dict:
    """Train ``variant`` on ``train`` and score it on ``test`` (both :class:`LabeledPrompts`)."""
    from econoserve.predictor import PredictorConfig, train_predictor

    base = PredictorConfig(num_boost_round=100, seed=0, num_threads=1)
    config = replace(base, **variant.config, features=replace(base.features, **variant.features))
    data = train.sample(variant.max_train, seed=0)
    start = time.perf_counter()
    model = train_predictor(data, config)
    train_s = time.perf_counter() - start
    predicted = model.predict(test.prompts).astype(np.float64)
    actual = test.labels("reference").astype(np.float64)
    short, long = actual <= SHORT_TOKENS, actual > LONG_TOKENS
    duplicate = np.isin(np.asarray(test.prompts, dtype=object), np.asarray(train.prompts, dtype=object))
    return {
        "variant": variant.name, "train_prompts": len(data), "boost_rounds": config.boost_rounds,
        "objective": config.objective + ("" if config.objective != "regression" else f" {config.regression_loss}"),
        "ngram_vocabulary": config.features.ngram_vocabulary_size,
        "neighbours": config.features.neighbour_count, "neighbour_folds": config.features.neighbour_folds,
        "test_prompts": len(actual),
        "spearman": float(spearmanr(actual, predicted).statistic),
        "spearman_vs_prompt": float(spearmanr(test.prompt_tokens, predicted).statistic),
        "kendall_tau": float(kendalltau(actual, predicted).statistic),
        "mae_tokens": float(np.mean(np.abs(predicted - actual))),
        "spearman_up_to_long": float(spearmanr(actual[~long], predicted[~long]).statistic),
        "spearman_duplicates": _spearman(actual[duplicate], predicted[duplicate]),
        "spearman_others": _spearman(actual[~duplicate], predicted[~duplicate]),
        "median_pred_short_tokens": float(np.median(predicted[short])),
        "short_predicted_over_100": float(np.mean(predicted[short] > SHORT_PREDICTED_LONG_TOKENS)),
        "median_pred_long_tokens": float(np.median(predicted[long])),
        "train_s": train_s,
    }


def _spearman(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Spearman's rank correlation; NaN for fewer than 3 requests (Alpaca has no duplicates)."""
    return float(spearmanr(actual, predicted).statistic) if len(actual) >= 3 else float("nan")


def markdown(frame: pd.DataFrame) -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from econoserve.errors import UserError
    from econoserve.predictor import SplitSpec, load_labeled_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_VARIANTS)}")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], metavar="NAME",
                        help="variants to train (default: all; see VARIANTS)")
    parser.add_argument("--dataset", choices=DATASETS, default=DATASETS[0],
                        help="dataset (default sharegpt; another one writes predictor_ranking_<dataset>*)")
    parser.add_argument("--output", metavar="STEM",
                        help="file stem under benchmarks/results/ (default predictor_ranking[_<dataset>][_quick])")
    args = parser.parse_args(argv)
    names = args.variants or (QUICK_VARIANTS if args.quick else [v.name for v in VARIANTS])
    try:
        split = SplitSpec(test_fraction=0.2, seed=0)  # PredictorTraining's split: the scoreboard's
        train = load_labeled_prompts(args.dataset, "train", TOKENIZER, split)
        test = load_labeled_prompts(args.dataset, "test", TOKENIZER, split)
    except UserError as exc:
        print(f"bench_predictor_ranking: {exc}", file=sys.stderr)
        return 2
    rows = [measure(v, train, test) for v in tqdm([v for v in VARIANTS if v.name in names], desc="variants")]
    frame = pd.DataFrame(rows)
    stem = args.output or ("predictor_ranking" + ("" if args.dataset == DATASETS[0] else f"_{args.dataset}")
                           + ("_quick" if args.quick else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / f"{stem}.csv", index=False, float_format="%.4g")
    text = "\n".join([
        f"# Prompt-only length predictors: how well they rank {DATASET_TITLES[args.dataset]}'s held-out requests",
        "",
        f"Written by `benchmarks/bench_predictor_ranking.py`{' --quick' if args.quick else ''}. "
        f"{args.dataset} ({TOKENIZER} tokens), the scoreboard's split (20 % of source records held out, seed 0); "
        f"trained on the training part, scored on all {len(test)} held-out requests. `spearman_up_to_long`: "
        f"among answers <= {LONG_TOKENS} tokens. `median_pred_short` / `_long`: median prediction of answers "
        f"<= {SHORT_TOKENS} / > {LONG_TOKENS} tokens; `short_predicted_over_100`: share of answers <= "
        f"{SHORT_TOKENS} tokens predicted > {SHORT_PREDICTED_LONG_TOKENS}. `spearman_vs_prompt`: the "
        "predictions' Spearman with the prompt length (the true lengths': "
        f"{spearmanr(test.prompt_tokens, test.labels('reference')).statistic:.3f}). `spearman_duplicates` / `_others`: "
        f"among the {int(np.isin(np.asarray(test.prompts, dtype=object), np.asarray(train.prompts, dtype=object)).sum())} "
        "held-out prompts whose exact text is also a training prompt / among the rest. "
        "`train_s`: one thread, on a shared machine.",
        "",
        markdown(frame),
        "",
    ])
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

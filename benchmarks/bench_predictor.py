"""Response-length predictor: accuracy against the issue's targets, latency and training time.

Trains each model on the full train part of its dataset, evaluates on the held-out part (every
metric beside the constant-median baseline), measures prediction latency (batch size 1, features
and tokenization included; and per batch of 1000) and the training time on 50k Alpaca prompts,
and writes ``benchmarks/results/predictor.md`` (plus the raw metrics JSON beside it).

    ECONOSERVE_DATA_MIRROR=../shared/data .venv/bin/python benchmarks/bench_predictor.py [--skip-sharegpt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from econoserve import __version__
from econoserve.predictor.data import LabeledPrompts, load_labeled_prompts
from econoserve.predictor.evaluation import evaluate
from econoserve.predictor.model import PredictorConfig, train_predictor

RESULTS = Path(__file__).resolve().parent / "results"

#: (name, dataset, label or None, config)
RUNS = [
    ("vicuna-regression", "alpaca-vicuna", "max", PredictorConfig()),
    ("vicuna-regression-temperatures", "alpaca-vicuna", "temperatures", PredictorConfig()),
    ("vicuna-quantile-0.9", "alpaca-vicuna", "max", PredictorConfig(objective="quantile")),
    ("vicuna-classification-50", "alpaca-vicuna", "max", PredictorConfig(objective="classification")),
    ("alpaca-regression", "alpaca", None, PredictorConfig()),
    ("alpaca-quantile-0.9", "alpaca", None, PredictorConfig(objective="quantile")),
    ("qmsum-regression", "qmsum", None, PredictorConfig()),
    ("qmsum-quantile-0.9", "qmsum", None, PredictorConfig(objective="quantile")),
    ("sharegpt-regression", "sharegpt", None, PredictorConfig()),
    ("sharegpt-regression-l2", "sharegpt", None, PredictorConfig(regression_loss="l2")),
    ("sharegpt-quantile-0.9", "sharegpt", None, PredictorConfig(objective="quantile")),
]


def run_one(name: str, dataset: str, label: str | None, config: PredictorConfig) -> dict:
    train = load_labeled_prompts(dataset, "train", split=_split())
    start = time.perf_counter()
    model = train_predictor(train, config, label=label, split={"test_fraction": 0.2, "seed": 0})
    train_s = time.perf_counter() - start
    result = evaluate(model, dataset, train_data=train, latency_samples=300)
    document = result.to_json_dict()
    document["train_seconds"] = train_s
    document["num_train_prompts"] = len(train)
    (RESULTS / "predictor").mkdir(parents=True, exist_ok=True)
    (RESULTS / "predictor" / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"{name}: {json.dumps(result.summary())} train {train_s:.1f}s", flush=True)
    return document


def _split():
    from econoserve.predictor.data import SplitSpec

    return SplitSpec(test_fraction=0.2, seed=0)


def training_time_50k(config: PredictorConfig) -> tuple[int, float]:
    """Seconds to train on every Alpaca prompt (~52k), features included."""
    train = load_labeled_prompts("alpaca", "train", split=_split())
    test = load_labeled_prompts("alpaca", "test", split=_split())
    everything = LabeledPrompts(
        dataset="alpaca", part="all", tokenizer=train.tokenizer, prompts=train.prompts + test.prompts,
        prompt_tokens=np.concatenate([train.prompt_tokens, test.prompt_tokens]),
        source_index=np.concatenate([train.source_index, test.source_index]),
        targets={"reference": np.concatenate([train.labels("reference"), test.labels("reference")])},
    )
    start = time.perf_counter()
    train_predictor(everything, config)
    return len(everything), time.perf_counter() - start


def _row(name: str, doc: dict) -> str:
    label = doc["primary_label"]
    model, base = doc["labels"][label]["model"], doc["labels"][label]["baseline"]
    tau1 = doc["summary"].get("kendall_tau_b_single_temperature_mean")
    lat = doc["latency"] or {}
    return (
        f"| {name} | {doc['num_train_prompts']}/{doc['num_requests']} | {label} | {model['mae_tokens']:.1f} ({base['mae_tokens']:.1f}) "
        f"| {model['acc_50']:.3f} ({base['acc_50']:.3f}) | {model['acc_100']:.3f} ({base['acc_100']:.3f}) "
        f"| {model['r2']:.3f} ({base['r2']:.3f}) | {model['kendall_tau_b']:.3f} | {'' if tau1 is None else f'{tau1:.3f}'} "
        f"| {model['bucket_exact_50']:.3f} ({base['bucket_exact_50']:.3f}) "
        f"| {model['under_prediction_rate']:.3f} | {model['over_reservation_ratio']:.2f} "
        f"| {lat.get('single_p50_ms', float('nan')):.2f} / {lat.get('single_p99_ms', float('nan')):.2f} "
        f"| {lat.get('batch_throughput_rps', float('nan')):.0f} | {doc['train_seconds']:.1f} |"
    )


def targets_section(docs: dict, seconds_50k: float, num_prompts: int) -> list[str]:
    """The issue's targets, each with the measured value and hit / miss."""
    def get(name, path):
        doc = docs.get(name)
        if doc is None:
            return None
        value = doc
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    rows = [
        ("Vicuna: MAE vs max over temperatures <= 60 tokens", "vicuna-regression",
         ("labels", "max", "model", "mae_tokens"), lambda v: v <= 60),
        ("Vicuna: Acc-100 vs max over temperatures >= 0.80", "vicuna-regression",
         ("labels", "max", "model", "acc_100"), lambda v: v >= 0.80),
        ("Vicuna: Kendall tau vs single-temperature labels >= 0.55 (default max-label model)", "vicuna-regression",
         ("summary", "kendall_tau_b_single_temperature_mean"), lambda v: v >= 0.55),
        ("Vicuna: Kendall tau vs single-temperature labels >= 0.55 (model trained on stacked temperatures)",
         "vicuna-regression-temperatures", ("summary", "kendall_tau_b_single_temperature_mean"), lambda v: v >= 0.55),
        ("ShareGPT: Kendall tau >= 0.50 (L1 default)", "sharegpt-regression",
         ("labels", "reference", "model", "kendall_tau_b"), lambda v: v >= 0.50),
        ("ShareGPT: Kendall tau >= 0.50 (L2 loss)", "sharegpt-regression-l2",
         ("labels", "reference", "model", "kendall_tau_b"), lambda v: v >= 0.50),
    ]
    for prefix in ("vicuna", "alpaca", "qmsum", "sharegpt"):
        name = f"{prefix}-quantile-0.9"
        label = "max" if prefix == "vicuna" else "reference"
        rows.append((f"{prefix} q=0.9: under-prediction <= 0.10", name,
                     ("labels", label, "model", "under_prediction_rate"), lambda v: v <= 0.10))
        rows.append((f"{prefix} q=0.9: mean over-reservation <= 1x mean length", name,
                     ("labels", label, "model", "over_reservation_ratio"), lambda v: v <= 1.0))
    for name in docs:
        rows.append((f"{name}: latency p99 <= 2 ms (batch 1, features + tokenization)", name,
                     ("latency", "single_p99_ms"), lambda v: v <= 2.0))
    lines = ["## Targets of the issue", "", "| target | measured | result |", "|---|---|---|"]
    for text, name, path, ok in rows:
        value = get(name, path)
        if value is None:
            continue
        lines.append(f"| {text} | {value:.3f} | {'hit' if ok(value) else '**miss**'} |")
    lines.append(f"| training on {num_prompts} prompts < 60 s | {seconds_50k:.1f} s | {'hit' if seconds_50k < 60 else '**miss**'} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sharegpt", action="store_true", help="skip the ShareGPT runs (slow to tokenize)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these names")
    parser.add_argument("--report-only", action="store_true", help="rewrite predictor.md from the saved JSON")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "predictor"
    docs = {}
    for name, dataset, label, config in RUNS:
        if args.skip_sharegpt and dataset == "sharegpt":
            continue
        if args.only and name not in args.only:
            continue
        if args.report_only:
            if (raw / f"{name}.json").is_file():
                docs[name] = json.loads((raw / f"{name}.json").read_text())
            continue
        docs[name] = run_one(name, dataset, label, config)
    if args.report_only:
        timing = json.loads((raw / "training_50k.json").read_text())
        num_prompts, seconds_50k = timing["num_prompts"], timing["seconds"]
    else:
        num_prompts, seconds_50k = training_time_50k(PredictorConfig())
        (raw / "training_50k.json").write_text(json.dumps({"num_prompts": num_prompts, "seconds": seconds_50k}) + "\n")
    print(f"training on {num_prompts} prompts: {seconds_50k:.1f}s", flush=True)

    lines = [
        "# Response-length predictor: measured",
        "",
        f"econoserve {__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(shared with other jobs while measured), LightGBM num_threads=2 for training, 1 for prediction.",
        "Written by `benchmarks/bench_predictor.py`; raw metrics JSON per run in `results/predictor/`.",
        "",
        "Each cell: model (constant-median baseline). Train = train part, test = held-out part "
        "(alpaca-vicuna: Zheng et al.'s train / val files). tau = Kendall tau-b against the primary label; "
        "tau single = mean tau-b against each single-temperature Vicuna label. Latency: one request at a time, "
        "features and tokenization included [ms, p50 / p99]; batch: requests/s in one batch of 1000.",
        "",
        "| run | train/test | label | MAE [tok] | Acc-50 | Acc-100 | R^2 | tau | tau single | bucket-50 exact "
        "| under-pred | over-res / mean | latency p50/p99 [ms] | batch [req/s] | train [s] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, doc) for name, doc in docs.items()]
    lines += ["", f"Training time on {num_prompts} Alpaca prompts (regression, defaults, features included): "
              f"**{seconds_50k:.1f} s**.", ""]
    lines += targets_section(docs, seconds_50k, num_prompts)
    (RESULTS / "predictor.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "predictor.md").read_text())


if __name__ == "__main__":
    main()

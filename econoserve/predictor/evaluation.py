"""Evaluating a response-length model on held-out prompts, against a constant-median baseline.

:func:`evaluate` predicts the ``test`` part of a dataset and scores the predictions against every
label the dataset has (for ``alpaca-vicuna``: the max over temperatures, each temperature and the
reference answer). Beside each score is the score of the **constant-median baseline**: predict, for
every request, the median length of that label over the dataset's ``train`` part. Latency is
measured per request at batch size 1 (features, tokenization included) and per batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.predictor.data import (
    VICUNA_DATASET,
    VICUNA_SINGLE_TEMPERATURE,
    LabeledPrompts,
    SplitSpec,
    default_label,
    load_labeled_prompts,
)
from econoserve.predictor.metrics import PredictorMetrics, compute_metrics
from econoserve.predictor.model import LengthPredictor

#: Datasets whose prompts come from the same source file (a model trained on one may have seen
#: the other's test prompts).
_SOURCE_FAMILY = {VICUNA_DATASET: "alpaca", "alpaca": "alpaca"}


@dataclass(frozen=True)
class LatencyStats:
    """Prediction latency on this machine [milliseconds], features and tokenization included."""

    num_single_requests: int
    single_p50_ms: float
    single_p99_ms: float
    single_mean_ms: float
    batch_size: int
    batch_ms: float
    batch_throughput_rps: float
    num_threads: int


@dataclass(frozen=True)
class Evaluation:
    """Predictions of one model on one dataset's test part, with every metric and the baseline's.

    ``predictions``: one row per request with ``source_index``, ``prompt_tokens``,
    ``predicted_output_tokens``, ``actual_output_tokens`` (the primary label) and
    ``actual_output_tokens_<label>`` for every label. ``metrics[label]`` holds ``"model"`` and
    ``"baseline"`` :class:`PredictorMetrics`; ``baseline_tokens[label]`` the baseline's constant.
    """

    dataset: str
    primary_label: str
    model_label: str
    model_objective: str
    predictions: pd.DataFrame
    baseline_tokens: dict[str, float]
    metrics: dict[str, dict[str, PredictorMetrics]]
    latency: LatencyStats | None = None
    warnings: list[str] = field(default_factory=list)
    model_info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        """Headline numbers: the issue's targets, on this evaluation."""
        primary = self.metrics[self.primary_label]["model"]
        result: dict[str, float | None] = {
            "mae_tokens": primary.mae_tokens,
            "acc_100": primary.acc_100,
            "kendall_tau_b": _none_if_nan(primary.kendall_tau_b),
            "under_prediction_rate": primary.under_prediction_rate,
            "over_reservation_ratio": primary.over_reservation_ratio,
        }
        singles = [self.metrics[t]["model"].kendall_tau_b for t in VICUNA_SINGLE_TEMPERATURE if t in self.metrics]
        if singles:
            result["kendall_tau_b_single_temperature_mean"] = float(np.mean(singles))
        if self.latency is not None:
            result["single_p99_ms"] = self.latency.single_p99_ms
        return result

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "econoserve_version": __version__,
            "dataset": self.dataset,
            "part": "test",
            "num_requests": int(len(self.predictions)),
            "model": self.model_info,
            "primary_label": self.primary_label,
            "baseline": "constant median of the label over the dataset's train part",
            "summary": self.summary(),
            "labels": {
                label: {
                    "baseline_constant_tokens": self.baseline_tokens[label],
                    "model": scores["model"].as_flat_dict(),
                    "baseline": scores["baseline"].as_flat_dict(),
                }
                for label, scores in self.metrics.items()
            },
            "latency": None if self.latency is None else asdict(self.latency),
            "warnings": list(self.warnings),
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json_dict(), indent=2, allow_nan=False) + "\n")
        return path


def _none_if_nan(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate(
    predictor: LengthPredictor,
    dataset: str,
    sample_size: int | None = None,
    latency_samples: int = 200,
    latency_batch_size: int = 1000,
    test_data: LabeledPrompts | None = None,
    train_data: LabeledPrompts | None = None,
) -> Evaluation:
    """Score ``predictor`` on the test part of ``dataset`` (seeded ``sample_size`` rows if given).

    The split (seed, test fraction) is the one recorded in the model, so a model evaluated on its
    own dataset sees only prompts it was not trained on. ``test_data`` / ``train_data`` skip the
    loading (tests pass subsets). ``latency_samples=0`` skips the latency measurement.
    """
    split = SplitSpec(**predictor.training_data.get("split", {})) if predictor.training_data.get("split") else SplitSpec()
    tokenizer = predictor.tokenizer_name if predictor.needs_text else "llama2"
    if test_data is None:
        test_data = load_labeled_prompts(dataset, "test", tokenizer=tokenizer, split=split)
        test_data = test_data.sample(sample_size, seed=split.seed)
    if train_data is None:
        train_data = load_labeled_prompts(dataset, "train", tokenizer=tokenizer, split=split)
    predicted = predictor.predict(test_data.prompts, test_data.prompt_tokens)
    primary = predictor.label if predictor.label in test_data.targets else default_label(dataset)

    frame = pd.DataFrame(
        {
            "source_index": test_data.source_index,
            "prompt_tokens": test_data.prompt_tokens,
            "predicted_output_tokens": predicted,
            "actual_output_tokens": test_data.labels(primary),
        }
    )
    baseline_tokens: dict[str, float] = {}
    metrics: dict[str, dict[str, PredictorMetrics]] = {}
    for label, actual in test_data.targets.items():
        frame[f"actual_output_tokens_{label}"] = actual
        baseline = float(np.median(train_data.labels(label)))
        baseline_tokens[label] = baseline
        metrics[label] = {
            "model": compute_metrics(actual, predicted),
            "baseline": compute_metrics(actual, np.full(len(actual), baseline)),
        }
    latency = None
    if latency_samples > 0 and (test_data.prompts is not None or not predictor.needs_text):
        latency = measure_latency(predictor, test_data, latency_samples, latency_batch_size)
    return Evaluation(
        dataset=dataset,
        primary_label=primary,
        model_label=predictor.label,
        model_objective=predictor.config.objective,
        predictions=frame,
        baseline_tokens=baseline_tokens,
        metrics=metrics,
        latency=latency,
        warnings=_leakage_warnings(predictor, dataset),
        model_info={
            "objective": predictor.config.objective,
            "label": predictor.label,
            "quantile": predictor.config.quantile if predictor.config.objective == "quantile" else None,
            "bucket_width": predictor.config.bucket_width if predictor.config.objective == "classification" else None,
            "training_dataset": predictor.training_data.get("dataset"),
            "training_table_sha256": predictor.training_data.get("table_sha256"),
            "seed": predictor.config.seed,
        },
    )


def _leakage_warnings(predictor: LengthPredictor, dataset: str) -> list[str]:
    trained_on = predictor.training_data.get("dataset")
    if trained_on == dataset or trained_on is None:
        return []
    if _SOURCE_FAMILY.get(trained_on) and _SOURCE_FAMILY.get(trained_on) == _SOURCE_FAMILY.get(dataset):
        return [
            f"the model was trained on {trained_on} and evaluated on {dataset}: both draw prompts from "
            f"Alpaca, and the two splits differ, so some test prompts may have been training prompts"
        ]
    return []


def measure_latency(
    predictor: LengthPredictor, data: LabeledPrompts, num_samples: int = 200, batch_size: int = 1000
) -> LatencyStats:
    """Wall-clock prediction latency: ``num_samples`` single requests, then one batch (1 thread)."""
    sample = data.sample(num_samples, seed=0)
    prompts: Sequence[str] | None = sample.prompts
    # Warm up (tokenizer loading, LightGBM's first call) so the numbers are steady-state.
    predictor.predict(None if prompts is None else prompts[:1], sample.prompt_tokens[:1])
    timings = np.empty(len(sample))
    for i in range(len(sample)):
        one_prompt = None if prompts is None else [prompts[i]]
        start = time.perf_counter()
        predictor.predict(one_prompt, sample.prompt_tokens[i : i + 1])
        timings[i] = time.perf_counter() - start
    batch = data.sample(batch_size, seed=1)
    start = time.perf_counter()
    predictor.predict(batch.prompts, batch.prompt_tokens)
    batch_seconds = time.perf_counter() - start
    return LatencyStats(
        num_single_requests=len(sample),
        single_p50_ms=float(np.percentile(timings, 50) * 1e3),
        single_p99_ms=float(np.percentile(timings, 99) * 1e3),
        single_mean_ms=float(timings.mean() * 1e3),
        batch_size=len(batch),
        batch_ms=batch_seconds * 1e3,
        batch_throughput_rps=len(batch) / batch_seconds,
        num_threads=1,
    )

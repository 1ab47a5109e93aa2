"""Figure 6 of PAPER.md (the RL predictor) as pure functions of result tables.

Each panel function draws on a given matplotlib ``Axes`` from a table, so a figure can be redrawn
from saved results without retraining:

* ``predictions``: the per-request table of :class:`~econoserve.predictor.evaluation.Evaluation`
  (``Evaluation.predictions``, or the parquet ``econoserve predictor eval --predictions`` writes),
  with ``actual_output_tokens`` and ``predicted_output_tokens`` [tokens];
* ``importance``: :meth:`~econoserve.predictor.model.LengthPredictor.feature_importance`;
* ``metrics``: an :class:`Evaluation` or the dict of its metrics JSON (for :func:`metrics_table`).
"""

from __future__ import annotations

from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from econoserve.predictor.metrics import bucket_of

ACTUAL = "actual_output_tokens"
PREDICTED = "predicted_output_tokens"


def _columns(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in (ACTUAL, PREDICTED) if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks column(s) {', '.join(missing)}")
    return predictions[ACTUAL].to_numpy(dtype=float), predictions[PREDICTED].to_numpy(dtype=float)


def plot_predicted_vs_actual(predictions: pd.DataFrame, ax: Axes, gridsize: int = 40) -> Axes:
    """Panel (a): predicted vs actual response length [tokens], a log-density hexbin + y = x."""
    actual, predicted = _columns(predictions)
    upper = float(np.percentile(np.concatenate([actual, predicted]), 99.5))
    image = ax.hexbin(actual, predicted, gridsize=gridsize, bins="log", cmap="viridis",
                      extent=(0, upper, 0, upper), mincnt=1)
    ax.plot([0, upper], [0, upper], color="black", linewidth=1, linestyle="--", label="y = x")
    ax.set_xlim(0, upper)
    ax.set_ylim(0, upper)
    ax.set_xlabel("actual response length [tokens]")
    ax.set_ylabel("predicted response length [tokens]")
    ax.set_title("Predicted vs actual")
    ax.figure.colorbar(image, ax=ax, label="requests (log)")
    ax.legend(loc="upper left")
    return ax


def plot_error_cdf(
    predictions: pd.DataFrame, ax: Axes, baseline_tokens: float | None = None, signed: bool = False
) -> Axes:
    """Panel (b): CDF of the prediction error [tokens], model and (optionally) constant baseline.

    ``signed=False`` plots |predicted - actual| with Acc-50 / Acc-100 marked; ``signed=True`` plots
    predicted - actual, whose mass left of 0 is the under-prediction rate.
    """
    actual, predicted = _columns(predictions)
    series = {"model": predicted - actual}
    if baseline_tokens is not None:
        series[f"constant median ({baseline_tokens:.0f})"] = baseline_tokens - actual
    for name, error in series.items():
        values = np.sort(error if signed else np.abs(error))
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
    if signed:
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_xlabel("predicted - actual [tokens]")
    else:
        for tolerance in (50, 100):
            ax.axvline(tolerance, color="grey", linewidth=1, linestyle=":")
        ax.set_xlim(0, float(np.percentile(np.abs(series["model"]), 99)))
        ax.set_xlabel("|predicted - actual| [tokens]")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1)
    ax.set_title("Error CDF")
    ax.legend(loc="lower right")
    return ax


def bucket_confusion(predictions: pd.DataFrame, bucket_width: int = 50, max_buckets: int = 10) -> pd.DataFrame:
    """Row-normalised confusion matrix of length buckets (rows actual, columns predicted).

    Buckets past ``max_buckets - 1`` are merged into the last one (labelled ``>lo``).
    """
    actual, predicted = _columns(predictions)
    rows = np.minimum(bucket_of(actual, bucket_width), max_buckets - 1)
    cols = np.minimum(bucket_of(predicted, bucket_width), max_buckets - 1)
    counts = np.zeros((max_buckets, max_buckets))
    np.add.at(counts, (rows, cols), 1)
    labels = [f"{b * bucket_width + 1}-{(b + 1) * bucket_width}" for b in range(max_buckets - 1)]
    labels.append(f">{(max_buckets - 1) * bucket_width}")
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return pd.DataFrame(fractions, index=pd.Index(labels, name="actual bucket"),
                        columns=pd.Index(labels, name="predicted bucket"))


def plot_bucket_confusion(predictions: pd.DataFrame, ax: Axes, bucket_width: int = 50, max_buckets: int = 10) -> Axes:
    """Panel (c): bucket confusion matrix (fraction of each actual bucket per predicted bucket)."""
    import seaborn as sns

    matrix = bucket_confusion(predictions, bucket_width, max_buckets)
    sns.heatmap(matrix, ax=ax, cmap="Blues", vmin=0, vmax=1, annot=max_buckets <= 10, fmt=".2f",
                cbar_kws={"label": "fraction of actual bucket"})
    ax.set_title(f"Bucket confusion (width {bucket_width} tokens)")
    return ax


def plot_feature_importance(importance: pd.DataFrame, ax: Axes, top: int = 20) -> Axes:
    """Panel (d): the ``top`` features by total gain (share of the model's total gain)."""
    if not {"feature", "importance"} <= set(importance.columns):
        raise ValueError("importance table needs columns feature and importance")
    total = float(importance["importance"].sum()) or 1.0
    shown = importance.nlargest(top, "importance").iloc[::-1]
    ax.barh(shown["feature"], shown["importance"] / total)
    ax.set_xlabel("share of total gain")
    ax.set_title(f"Feature importance (top {len(shown)})")
    ax.tick_params(axis="y", labelsize=8)
    return ax


def figure6(
    predictions: pd.DataFrame, importance: pd.DataFrame, baseline_tokens: float | None = None,
    bucket_width: int = 50,
) -> Figure:
    """All four panels of Figure 6 in one 2x2 figure."""
    figure, axes = plt.subplots(2, 2, figsize=(13, 10), constrained_layout=True)
    plot_predicted_vs_actual(predictions, axes[0, 0])
    plot_error_cdf(predictions, axes[0, 1], baseline_tokens=baseline_tokens)
    plot_bucket_confusion(predictions, axes[1, 0], bucket_width=bucket_width)
    plot_feature_importance(importance, axes[1, 1])
    return figure


def metrics_table(metrics: Any) -> pd.DataFrame:
    """Every metric for every label, model beside baseline: columns ``label``, ``metric``,
    ``model``, ``baseline``, ``better`` (whether the model beats the baseline; None if undefined).

    ``metrics`` is an :class:`~econoserve.predictor.evaluation.Evaluation` or its JSON dict.
    """
    document: Mapping[str, Any] = metrics.to_json_dict() if hasattr(metrics, "to_json_dict") else metrics
    rows = []
    for label, scores in document["labels"].items():
        for name, model_value in scores["model"].items():
            baseline_value = scores["baseline"].get(name)
            rows.append({"label": label, "metric": name, "model": model_value, "baseline": baseline_value,
                         "better": _better(name, model_value, baseline_value)})
    latency = document.get("latency") or {}
    for name, value in latency.items():
        rows.append({"label": "latency", "metric": name, "model": value, "baseline": None, "better": None})
    return pd.DataFrame(rows, columns=["label", "metric", "model", "baseline", "better"])


_LOWER_IS_BETTER = {"mae_tokens", "rmse_tokens", "relative_mae"}
#: Descriptive numbers, and the reservation trade-off (fewer under-predictions cost over-reservation).
_NOT_SCORES = {"num_requests", "mean_actual_tokens", "mean_predicted_tokens", "under_prediction_rate",
               "mean_over_reservation_tokens", "over_reservation_ratio", "mean_shortfall_tokens"}


def _better(name: str, model_value, baseline_value) -> bool | None:
    if name in _NOT_SCORES or model_value is None or baseline_value is None:
        return None
    if name in _LOWER_IS_BETTER:
        return bool(model_value < baseline_value)
    return bool(model_value > baseline_value)

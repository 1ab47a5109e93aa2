"""Accuracy metrics of response-length predictions (all lengths in tokens).

Buckets: a length ``L >= 1`` falls in bucket ``(L - 1) // width``, so bucket ``b`` holds lengths
``b * width + 1 .. (b + 1) * width`` and a KV reservation of ``(b + 1) * width`` tokens covers it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import kendalltau

ACCURACY_TOLERANCES: tuple[int, ...] = (50, 100)
BUCKET_WIDTHS: tuple[int, ...] = (50, 100, 200)


def _arrays(actual, predicted) -> tuple[np.ndarray, np.ndarray]:
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if actual.shape != predicted.shape or actual.ndim != 1:
        raise ValueError(f"actual and predicted must be 1-D and equally long, got {actual.shape} and {predicted.shape}")
    if actual.size == 0:
        raise ValueError("no predictions to score")
    return actual, predicted


def mean_absolute_error(actual, predicted) -> float:
    """Mean |predicted - actual| [tokens]."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(np.abs(predicted - actual)))


def root_mean_squared_error(actual, predicted) -> float:
    """sqrt(mean (predicted - actual)^2) [tokens]."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.sqrt(np.mean((predicted - actual) ** 2)))


def r_squared(actual, predicted) -> float:
    """1 - SS_residual / SS_total; NaN when every actual length is the same."""
    actual, predicted = _arrays(actual, predicted)
    total = float(np.sum((actual - actual.mean()) ** 2))
    return float(1.0 - np.sum((actual - predicted) ** 2) / total) if total > 0 else math.nan


def accuracy_within(actual, predicted, tolerance_tokens: float) -> float:
    """Fraction of requests with |predicted - actual| <= ``tolerance_tokens`` (Acc-50, Acc-100)."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(np.abs(predicted - actual) <= tolerance_tokens))


def bucket_of(lengths, width: int) -> np.ndarray:
    """Bucket index of each length [tokens] (see the module docstring); lengths < 1 count as 1."""
    if width < 1:
        raise ValueError(f"bucket width must be >= 1, got {width}")
    lengths = np.maximum(np.ceil(np.asarray(lengths, dtype=np.float64)), 1.0)
    return ((lengths - 1) // width).astype(np.int64)


def bucket_accuracy(actual, predicted, width: int, within: int = 0) -> float:
    """Fraction of requests whose predicted bucket is within ``within`` buckets of the true one."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(np.abs(bucket_of(actual, width) - bucket_of(predicted, width)) <= within))


def kendall_tau_b(actual, predicted) -> float:
    """Kendall's tau-b rank correlation (scipy); NaN when either side is constant."""
    actual, predicted = _arrays(actual, predicted)
    if np.all(actual == actual[0]) or np.all(predicted == predicted[0]):
        return math.nan
    return float(kendalltau(actual, predicted, variant="b").statistic)


def under_prediction_rate(actual, predicted) -> float:
    """P(actual > predicted): how often a reservation of ``predicted`` tokens is too small."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(actual > predicted))


def mean_over_reservation(actual, predicted) -> float:
    """Mean max(predicted - actual, 0) [tokens]: KV reserved but never used, per request."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(np.maximum(predicted - actual, 0.0)))


def mean_shortfall(actual, predicted) -> float:
    """Mean max(actual - predicted, 0) [tokens]: tokens beyond the reservation, per request."""
    actual, predicted = _arrays(actual, predicted)
    return float(np.mean(np.maximum(actual - predicted, 0.0)))


@dataclass(frozen=True)
class PredictorMetrics:
    """Every accuracy metric of one set of predictions against one set of true lengths [tokens]."""

    num_requests: int
    mean_actual_tokens: float
    mean_predicted_tokens: float
    mae_tokens: float
    rmse_tokens: float
    r2: float
    relative_mae: float  # MAE / mean actual length
    acc_50: float
    acc_100: float
    kendall_tau_b: float
    under_prediction_rate: float
    mean_over_reservation_tokens: float
    over_reservation_ratio: float  # mean over-reservation / mean actual length
    mean_shortfall_tokens: float
    bucket_exact: dict[int, float] = field(default_factory=dict)  # width -> accuracy
    bucket_within_one: dict[int, float] = field(default_factory=dict)

    def as_flat_dict(self) -> dict[str, float | int | None]:
        """One level of ``name: value`` (NaN as None), buckets as ``bucket_exact_50`` etc."""
        flat: dict[str, float | int | None] = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                prefix = name
                for width, accuracy in value.items():
                    flat[f"{prefix}_{width}"] = _clean(accuracy)
            else:
                flat[name] = _clean(value)
        return flat


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def compute_metrics(actual, predicted, bucket_widths: tuple[int, ...] = BUCKET_WIDTHS) -> PredictorMetrics:
    """All metrics of ``predicted`` against ``actual`` (lengths in tokens)."""
    actual, predicted = _arrays(actual, predicted)
    mean_actual = float(actual.mean())
    mae = mean_absolute_error(actual, predicted)
    over = mean_over_reservation(actual, predicted)
    return PredictorMetrics(
        num_requests=int(actual.size),
        mean_actual_tokens=mean_actual,
        mean_predicted_tokens=float(predicted.mean()),
        mae_tokens=mae,
        rmse_tokens=root_mean_squared_error(actual, predicted),
        r2=r_squared(actual, predicted),
        relative_mae=mae / mean_actual if mean_actual > 0 else math.nan,
        acc_50=accuracy_within(actual, predicted, 50),
        acc_100=accuracy_within(actual, predicted, 100),
        kendall_tau_b=kendall_tau_b(actual, predicted),
        under_prediction_rate=under_prediction_rate(actual, predicted),
        mean_over_reservation_tokens=over,
        over_reservation_ratio=over / mean_actual if mean_actual > 0 else math.nan,
        mean_shortfall_tokens=mean_shortfall(actual, predicted),
        bucket_exact={w: bucket_accuracy(actual, predicted, w, 0) for w in bucket_widths},
        bucket_within_one={w: bucket_accuracy(actual, predicted, w, 1) for w in bucket_widths},
    )

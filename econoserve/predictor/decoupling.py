"""Prompt decoupling: one prompt-length factor that stops a predictor leaning on the prompt length
harder than the truth does.

A trained ShareGPT predictor ranks its predictions against the prompt length far more than the
true lengths are ranked against it (Spearman -0.71 vs -0.38, benchmarks/results/
policy_predictor_quality_notes.md), so a scheduler that orders by the prediction serves long
prompts first. Prompt decoupling rescales the prediction by a power of the prompt length:

    adjusted log-score = log-score + slope * (log(prompt_tokens) - centre)

where the log-score is the model's ``log1p(length)`` score, ``centre`` is the mean of
``log(prompt_tokens)`` [log tokens] over the training prompts, and ``slope`` [log-length per
log-token] is the value on :data:`SLOPE_GRID` whose adjusted *out-of-fold* training scores have the
same Spearman correlation with the prompt length as the training truths:

    slope = argmin_b | rho(prompt, s_oof + b * c) - rho(prompt, y) |     (ties: the smallest |b|)

with ``s_oof`` the log-scores each training prompt gets from a model trained without its source
record (``folds`` folds, whole records per fold, :func:`~econoserve.predictor.data.record_folds`),
``c`` the centred log prompt length and ``y`` the training lengths. Everything comes from the
training prompts: no held-out or evaluation data is used. ``centre`` only shifts every log-score by
the same amount at the training prompts' typical length, so the median prediction stays where it
was. Ranks among prompts of equal length are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from econoserve.errors import PredictorError

#: Slopes tried [log-length per log-prompt-token]: -3 .. 3 in steps of 0.01.
SLOPE_GRID: np.ndarray = np.round(np.arange(-300, 301) / 100, 2)


@dataclass(frozen=True)
class PromptDecoupling:
    """The fitted factor (``slope``, ``centre_log_prompt``) and what it was fitted to, all on the
    training prompts: the Spearman correlation with the prompt length of the truths
    (``target_spearman``), of the out-of-fold scores before and after the adjustment, and the
    out-of-fold scores' Spearman with the truths before and after."""

    slope: float
    centre_log_prompt: float
    folds: int
    target_spearman: float
    oof_spearman_before: float
    oof_spearman_after: float
    oof_truth_spearman_before: float
    oof_truth_spearman_after: float

    def adjust(self, scores: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
        """Log-scores ``scores`` adjusted for prompts of ``prompt_tokens`` [tokens] (see the module
        docstring)."""
        return np.asarray(scores, dtype=np.float64) + self.slope * (log_prompt(prompt_tokens) - self.centre_log_prompt)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, where: str) -> "PromptDecoupling":
        """The saved factor; a :class:`PredictorError` naming ``where`` when it is malformed."""
        names = [f.name for f in fields(cls)]
        if not isinstance(values, dict) or sorted(values) != sorted(names) or not all(
                isinstance(values[n], (int, float)) and not isinstance(values[n], bool) and np.isfinite(values[n])
                for n in names):
            raise PredictorError(f"{where}: metadata prompt_decoupling must hold the numbers {', '.join(names)} "
                                 "(corrupt model?)")
        return cls(**{n: (int(values[n]) if n == "folds" else float(values[n])) for n in names})


def log_prompt(prompt_tokens: np.ndarray) -> np.ndarray:
    """``log(max(prompt_tokens, 1))`` [log tokens]."""
    return np.log(np.maximum(np.asarray(prompt_tokens, dtype=np.float64), 1.0))


def fit_prompt_decoupling(oof_scores: np.ndarray, prompt_tokens: np.ndarray, lengths: np.ndarray,
                          folds: int) -> PromptDecoupling:
    """The factor of the module docstring from the training prompts' out-of-fold log-scores
    ``oof_scores``, their lengths ``prompt_tokens`` [tokens] and their true ``lengths`` [tokens]."""
    logs = log_prompt(prompt_tokens)
    centre = float(logs.mean())
    centred = logs - centre
    target = _spearman(prompt_tokens, lengths)
    gaps = np.array([abs(_spearman(prompt_tokens, oof_scores + b * centred) - target) for b in SLOPE_GRID])
    best = np.flatnonzero(gaps <= gaps.min() + 1e-12)
    slope = float(SLOPE_GRID[best[np.argmin(np.abs(SLOPE_GRID[best]))]])
    adjusted = oof_scores + slope * centred
    return PromptDecoupling(
        slope=slope, centre_log_prompt=centre, folds=folds, target_spearman=target,
        oof_spearman_before=_spearman(prompt_tokens, oof_scores), oof_spearman_after=_spearman(prompt_tokens, adjusted),
        oof_truth_spearman_before=_spearman(lengths, oof_scores), oof_truth_spearman_after=_spearman(lengths, adjusted))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    value = spearmanr(a, b).statistic
    return 0.0 if not np.isfinite(value) else float(value)

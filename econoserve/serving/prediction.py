"""Response-length prediction inside the engine, for requests whose client sends none.

An unmodified client (``vllm bench serve``, the ``openai`` client) sends no
``predicted_output_tokens``; the policy scheduler then asks an :class:`EnginePredictor`, which
holds the trained LightGBM model (:class:`~econoserve.predictor.model.LengthPredictor`, a
directory written by ``econoserve predictor train``) and predicts from what the engine has: the
prompt's token ids. A length-only model uses their count; a text model decodes them with its own
tokenizer (``gpt2``/``opt`` for OPT-family engines, ``llama2`` for Llama-2 ones: the model's
tokenizer must be the engine's) and computes its features from the text.

Each prediction is timed (:class:`PredictionCost`: requests, total and longest time [s]), so the
predictor's cost per request inside the engine is measured where it is paid: in the engine's
``add_request``, on the engine-core thread that also schedules.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from econoserve.predictor.model import LengthPredictor
from econoserve.workload.tokenizer import Tokenizer


@dataclass
class PredictionCost:
    """Running totals of the time spent predicting (one prediction per request)."""

    num_requests: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.num_requests += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    @property
    def mean_s(self) -> float:
        """Mean time per predicted request [s] (0 before the first)."""
        return self.total_s / self.num_requests if self.num_requests else 0.0


@dataclass
class EnginePredictor:
    """A saved length model applied to prompt token ids; see the module docstring."""

    model: LengthPredictor
    tokenizer: Tokenizer | None = None
    """Decodes token ids for text models (``None`` for length-only models)."""
    cost: PredictionCost = field(default_factory=PredictionCost)

    @classmethod
    def load(cls, directory: str | Path) -> "EnginePredictor":
        """Load a model directory (a :class:`~econoserve.errors.PredictorError` names what is wrong)."""
        model = LengthPredictor.load(directory)
        return cls(model, model.featurizer.tokenizer if model.needs_text else None)

    def predict(self, prompt_token_ids: Sequence[int]) -> int:
        """Predicted response length [tokens, >= 1] of a prompt given as token ids; timed."""
        start = time.perf_counter()
        prompts = [self.tokenizer.decode(prompt_token_ids)] if self.tokenizer is not None else None
        (value,) = self.model.predict(prompts, np.array([len(prompt_token_ids)], dtype=np.int64))
        self.cost.add(time.perf_counter() - start)
        return int(value)

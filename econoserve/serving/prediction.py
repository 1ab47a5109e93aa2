"""Response-length prediction inside the engine: at arrival, for requests whose client sends
none, and, optionally, refined once a request has generated ``k`` tokens.

An unmodified client (``vllm bench serve``, the ``openai`` client) sends no
``predicted_output_tokens``; the policy scheduler then asks an :class:`EnginePredictor`, which
holds the trained LightGBM model (:class:`~econoserve.predictor.model.LengthPredictor`, a
directory written by ``econoserve predictor train``) and predicts from what the engine has: the
prompt's token ids. A length-only model uses their count; a text model decodes them with its own
tokenizer (``gpt2``/``opt`` for OPT-family engines, ``llama2`` for Llama-2 ones: the model's
tokenizer must be the engine's) and computes its features from the text.

**Predicted distributions**: a classification model (``econoserve predictor train --objective
classification``) given as the scheduler's ``distribution_predictor`` gives each request its
``predicted_output_quantiles`` (:data:`NUM_QUANTILE_POINTS` equally likely lengths, the simulator's
trace column; :meth:`EnginePredictor.predict_quantiles`), read by EconoServe's distribution knobs
(``ordering_length``, ``allocation_length``, ``reserve_rule``); the point prediction still comes
from the request or ``predictor``, as the simulator's traces pair a regression point with the
classifier's quantiles.

**Refinement** (:class:`EngineRefiner`): a refined model (:mod:`econoserve.predictor.refine`, a
directory with the prompt-only model in ``base/``) predicts the length from the prompt *and* the
response's first ``k`` tokens (``k`` = the model's ``prefix_tokens``, recorded in the model).
When a request has generated ``k`` tokens and is not finished, the policy scheduler decodes its
prompt ids and those ``k`` output ids with the model's tokenizer and hands the policy the refined
length (:meth:`~econoserve.policy.Policy.refine_prediction`), as the simulator does with a
trace's ``refine_after_tokens`` / ``refined_output_tokens`` columns. Only the engine can do
this: a client does not see the tokens before they are streamed back.

Each prediction and each refinement is timed (:class:`PredictionCost`: requests, total and
longest time [s]), so the cost per request inside the engine is measured where it is paid: in the
engine's ``add_request`` (at arrival) or ``update_from_output`` (refinement), on the engine-core
thread that also schedules.

A text model must use the engine's tokenizer (its token ids are decoded, not re-tokenized);
:func:`check_tokenizer_fits` refuses a model whose tokenizer's vocabulary does not match the
engine model's ``vocab_size`` (equal, or at most :data:`VOCAB_PADDING_IDS` ids of embedding
padding above it: OPT's 50,272 rows for GPT-2's 50,257 ids). It compares sizes only, so two
different tokenizers of one size (e.g. Llama-2's and Mistral's, both 32,000) pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from econoserve.errors import PredictorError
from econoserve.predictor.model import NUM_QUANTILE_POINTS, LengthPredictor
from econoserve.predictor.refine import BASE_DIRECTORY, RefinedLengthPredictor
from econoserve.workload.tokenizer import Tokenizer

#: Rows an engine model's embedding may have beyond its tokenizer's ids (padding to a multiple).
VOCAB_PADDING_IDS = 128


def check_tokenizer_fits(tokenizer: Tokenizer, engine_vocab_size: int, model_directory: str | Path) -> None:
    """Raise :class:`~econoserve.errors.PredictorError` (one line) when ``tokenizer`` cannot be the
    tokenizer of an engine model with ``engine_vocab_size`` token ids (see the module docstring)."""
    size = tokenizer.vocab_size
    if not size <= engine_vocab_size <= size + VOCAB_PADDING_IDS:
        raise PredictorError(
            f"{model_directory}: the model reads {tokenizer.name!r} tokens ({size} ids) but the engine's model has "
            f"{engine_vocab_size} token ids: its prompt ids would decode to other text (train the model with the "
            "engine's tokenizer)"
        )


@dataclass
class PredictionCost:
    """Running totals of the time spent predicting: requests, calls (one request per call at
    arrival; every request one step refines in one call), total time [s] and the longest call [s]
    (at arrival the longest request; for refinement the longest a step waited)."""

    num_requests: int = 0
    num_calls: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float, num_requests: int = 1) -> None:
        """One call that predicted ``num_requests`` requests in ``seconds`` [s]."""
        self.num_requests += num_requests
        self.num_calls += 1
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

    def predict_quantiles(self, prompt_token_ids: Sequence[int]) -> tuple[int, ...]:
        """Predicted length distribution [tokens, :data:`NUM_QUANTILE_POINTS` sorted equally likely
        lengths] of a prompt given as token ids (classification models only); timed."""
        start = time.perf_counter()
        prompts = [self.tokenizer.decode(prompt_token_ids)] if self.tokenizer is not None else None
        prompt_tokens = np.array([len(prompt_token_ids)], dtype=np.int64)
        (points,) = self.model.predict_quantiles(prompts, prompt_tokens, NUM_QUANTILE_POINTS)
        self.cost.add(time.perf_counter() - start)
        return tuple(int(v) for v in points)

    def check_engine(self, engine_vocab_size: int, directory: str | Path) -> None:
        """A text model's tokenizer must fit the engine's model (:func:`check_tokenizer_fits`)."""
        if self.tokenizer is not None:
            check_tokenizer_fits(self.tokenizer, engine_vocab_size, directory)

    def predict(self, prompt_token_ids: Sequence[int]) -> int:
        """Predicted response length [tokens, >= 1] of a prompt given as token ids; timed."""
        start = time.perf_counter()
        prompts = [self.tokenizer.decode(prompt_token_ids)] if self.tokenizer is not None else None
        (value,) = self.model.predict(prompts, np.array([len(prompt_token_ids)], dtype=np.int64))
        self.cost.add(time.perf_counter() - start)
        return int(value)


@dataclass
class EngineRefiner:
    """A saved refined model applied to a request's prompt ids and first ``k`` output ids; see
    the module docstring."""

    model: RefinedLengthPredictor
    cost: PredictionCost = field(default_factory=PredictionCost)

    @classmethod
    def load(cls, directory: str | Path) -> "EngineRefiner":
        """Load a refined model directory (a :class:`~econoserve.errors.PredictorError` names what is wrong)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PredictorError(f"{directory}: no such refined-model directory")
        if not (directory / BASE_DIRECTORY).is_dir():
            raise PredictorError(
                f"{directory}: not a refined model (no {BASE_DIRECTORY}/ prompt-only model inside; "
                "a prompt-only model goes to the 'predictor' option)"
            )
        return cls(RefinedLengthPredictor.load(directory))

    @property
    def prefix_tokens(self) -> int:
        """``k``: the generated tokens a request must have, unfinished, to be refined [tokens]."""
        return self.model.prefix_tokens

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.base.featurizer.tokenizer

    def check_engine(self, engine_vocab_size: int, directory: str | Path) -> None:
        """The model's tokenizer must fit the engine's model (:func:`check_tokenizer_fits`)."""
        check_tokenizer_fits(self.tokenizer, engine_vocab_size, directory)

    def refine(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[int]:
        """Refined response lengths [tokens, > ``prefix_tokens``], one per ``(prompt ids, output
        ids)`` pair (at least ``prefix_tokens`` output ids; the first ``prefix_tokens`` are read),
        predicted in one call (the rows are independent: a batch gives each request what it would
        get alone, at about half the time per request); timed as one call."""
        k = self.prefix_tokens
        short = [len(output) for _, output in requests if len(output) < k]
        if short:
            raise ValueError(f"refinement needs {k} generated tokens, got {short[0]}")
        start = time.perf_counter()
        tokenizer = self.tokenizer
        values = self.model.predict([tokenizer.decode(prompt) for prompt, _ in requests],
                                    [tokenizer.decode(list(output)[:k]) for _, output in requests])
        self.cost.add(time.perf_counter() - start, len(requests))
        return [int(v) for v in values]


@dataclass(frozen=True)
class EngineModels:
    """A policy scheduler's length models (``None`` for each not configured)."""

    predictor: EnginePredictor | None = None
    """Point predictions at arrival, for requests that carry none."""
    distribution: EnginePredictor | None = None
    """Predicted distributions at arrival (a classification model)."""
    refiner: EngineRefiner | None = None
    """Refined predictions at ``k`` generated tokens."""


def load_engine_models(predictor: str | Path | None = None, distribution_predictor: str | Path | None = None,
                       refined_predictor: str | Path | None = None,
                       engine_vocab_size: int | None = None) -> EngineModels:
    """Load a policy scheduler's length models from their directories (``None``: not used), each
    checked against the engine model's ``engine_vocab_size`` [token ids] (:func:`check_tokenizer_fits`;
    ``None``: not checked); a :class:`~econoserve.errors.PredictorError` names the problem."""
    models = EngineModels(
        EnginePredictor.load(predictor) if predictor is not None else None,
        EnginePredictor.load(distribution_predictor) if distribution_predictor is not None else None,
        EngineRefiner.load(refined_predictor) if refined_predictor is not None else None,
    )
    if models.distribution is not None and models.distribution.model.config.objective != "classification":
        raise PredictorError(
            f"{distribution_predictor}: a {models.distribution.model.config.objective} model; a predicted distribution "
            "comes from a classification model (econoserve predictor train --objective classification)"
        )
    if engine_vocab_size is not None:
        for model, directory in ((models.predictor, predictor), (models.distribution, distribution_predictor),
                                 (models.refiner, refined_predictor)):
            if model is not None:
                model.check_engine(engine_vocab_size, directory)
    return models

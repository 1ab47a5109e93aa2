"""The refined response-length predictor: the length given the prompt *and* the response's first
``k`` tokens.

A serving engine knows more than the prompt once a request has generated a few tokens: the tokens
themselves ("Yes." against "Sure! Here is a detailed plan:\\n\\n1."). The refined model predicts,
for a request whose response is longer than ``k = prefix_tokens`` [tokens], its whole length from
the prompt and that prefix (cf. TRAIL, "Don't Stop Me Now", arXiv 2410.01035, which refines the
prediction with the model's embeddings as generation proceeds; here only the text is used).

Features (one row per request, in this order):

1. the prompt-only model's prompt features (its fitted :class:`PromptFeaturizer`, unchanged);
2. the prefix, decoded from the first ``k`` tokens of the response in the model's tokenizer,
   through a second :class:`PromptFeaturizer` (length features and word n-grams, no prompt cues;
   ``prefix_vocabulary_size`` n-grams fitted on the training prefixes);
3. response cues (:data:`RESPONSE_CUE_PATTERNS`, counted in the prefix): an opening "Sure" /
   "Yes" / "No", a refusal, "here is", list markers, numbered items, code fences, headings, a line
   ending in a colon, "step N", letter / title openings, code characters, questions, blank lines.

The target is the *remaining* length ``log1p(length - k)`` of the training requests longer than
``k``, with the prompt-only model's LightGBM settings (by default the L1 loss: the conditional
median); the prediction is ``k + max(1, round(expm1(score)))`` [tokens], so always above ``k``.

A saved refined model is a directory: the prompt-only model in ``base/`` (its own format), and
``model.txt``, the prefix featurizer's files and ``metadata.json`` (configuration, feature names,
training data, sha256 of every file), checked on load like :class:`LengthPredictor`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import lightgbm as lgb
import numpy as np
import scipy.sparse as sp

from econoserve import __version__
from econoserve.errors import PredictorError
from econoserve.predictor.features import FeatureConfig, PromptFeaturizer
from econoserve.predictor.model import METADATA_FILE, MODEL_FILE, LengthPredictor, write_model_directory
from econoserve.workload.registry import file_sha256

FORMAT_VERSION = 1
BASE_DIRECTORY = "base"

#: Cues read in the response prefix: name -> case-insensitive, multi-line regular expression
#: (counted occurrences).
RESPONSE_CUE_PATTERNS: dict[str, str] = {
    "opens_sure": r"\A\s*(sure|certainly|of course|absolutely|great|okay|ok|yes,? here)\b",
    "opens_yes_no": r"\A\s*(yes|no)\b",
    "refusal": r"\b(i'?m sorry|i apologi[sz]e|as an ai|i cannot|i can'?t|i am not able|i'm not able|unable to)\b",
    "here_is": r"\bhere (is|are|'s)\b|\bhere you go\b",
    "list_marker": r"^\s*[-*\u2022]\s",
    "numbered_item": r"^\s*\d+[.)]\s",
    "code_fence": r"```",
    "heading": r"^\s*#{1,6}\s|^\s*\*\*[^*\n]+\*\*:?\s*$",
    "colon_line_end": r":\s*$",
    "step": r"\bstep\s*\d",
    "letter_or_title": r"^\s*(title|subject|dear|verse|chapter|introduction|abstract)\b",
    "code_chars": r"[{};=<>\[\]]",
    "question": r"\?",
    "blank_line": r"\n[ \t]*\n",
}


@dataclass(frozen=True)
class RefinedConfig:
    """What determines a refined model besides the prompt-only model it extends.

    prefix_tokens:
        ``k``: how many of the response's tokens the model reads [tokens]; it predicts only for
        responses longer than ``k``.
    prefix_vocabulary_size:
        Word n-grams of the prefix featurizer (1- and 2-grams in at least 3 training prefixes).
    max_train_requests:
        Cap on the training requests (a seeded sample of the training part) [requests]; ``None``
        = all of it. Measured on ShareGPT (k = 32, held-out Spearman): 0.56 with 4000 requests
        (the prompt-only model's cap), 0.62 with all 12,222; without the prefix n-grams 0.59.
    """

    prefix_tokens: int = 32
    prefix_vocabulary_size: int = 2000
    max_train_requests: int | None = None

    def __post_init__(self) -> None:
        if self.prefix_tokens < 1:
            raise PredictorError(f"prefix_tokens must be >= 1, got {self.prefix_tokens}")
        if self.prefix_vocabulary_size < 0:
            raise PredictorError(f"prefix_vocabulary_size must be >= 0, got {self.prefix_vocabulary_size}")

    def prefix_features(self, tokenizer: str) -> FeatureConfig:
        return FeatureConfig(tokenizer=tokenizer, use_text=True, lexical_cues=False,
                             ngram_vocabulary_size=self.prefix_vocabulary_size)


class RefinedLengthPredictor:
    """A trained refined model: the prompt-only model, a prefix featurizer and a booster."""

    def __init__(self, config: RefinedConfig, base: LengthPredictor, prefix_featurizer: PromptFeaturizer,
                 booster: lgb.Booster, training_data: dict[str, Any]) -> None:
        self.config = config
        self.base = base
        self.prefix_featurizer = prefix_featurizer
        self.booster = booster
        self.training_data = training_data
        self._cues = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in RESPONSE_CUE_PATTERNS.values()]

    @property
    def prefix_tokens(self) -> int:
        return self.config.prefix_tokens

    def prefixes(self, responses: Sequence[str]) -> list[str]:
        """The first ``prefix_tokens`` tokens of each response, decoded (the model's tokenizer)."""
        tokenizer = self.base.featurizer.tokenizer
        k = self.prefix_tokens
        return [tokenizer.decode(ids[:k]) for ids in tokenizer.encode(list(responses))]

    def feature_names(self) -> list[str]:
        return (self.base.featurizer.feature_names() + [f"prefix_{n}" for n in self.prefix_featurizer.feature_names()]
                + [f"response_cue_{n}" for n in RESPONSE_CUE_PATTERNS])

    def features(self, prompts: Sequence[str], prefixes: Sequence[str]) -> sp.csr_matrix:
        """The feature matrix (rows = requests; columns = :meth:`feature_names`)."""
        prompt_block = self.base.featurizer.transform(list(prompts))
        prefix_block = self.prefix_featurizer.transform(list(prefixes), np.full(len(prefixes), self.prefix_tokens))
        cues = np.array([[len(p.findall(text)) for p in self._cues] for text in prefixes], dtype=np.float64)
        cues = cues.reshape(len(prefixes), len(self._cues))
        return sp.hstack([sp.csr_matrix(prompt_block), sp.csr_matrix(prefix_block), sp.csr_matrix(cues)],
                         format="csr", dtype=np.float64)

    def predict(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Refined response lengths [tokens, int64, > ``prefix_tokens``], one per request, from
        the prompt and the response's first ``prefix_tokens`` tokens. (For a response of at most
        ``prefix_tokens`` tokens the prefix is the whole response; a server never asks then: the
        request has finished.)"""
        if self.base.needs_text is False:
            raise PredictorError("the refined predictor needs a prompt-text model as its base")
        matrix = self.features(prompts, self.prefixes(responses))
        return remaining_to_length(self.booster.predict(matrix, num_threads=1), self.prefix_tokens)

    # ----------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "lightgbm_version": lgb.__version__,
            "config": asdict(self.config),
            "feature_names": self.feature_names(),
            "num_features": len(self.feature_names()),
            "training_data": self.training_data,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the model directory (see the module docstring); returns its path."""
        self.base.save(Path(directory) / BASE_DIRECTORY)
        return write_model_directory(directory, self.booster, self.prefix_featurizer, self.metadata())

    @classmethod
    def load(cls, directory: str | Path) -> "RefinedLengthPredictor":
        """Load and check a saved refined model (:class:`PredictorError` names the problem)."""
        directory = Path(directory)
        try:
            metadata = json.loads((directory / METADATA_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise PredictorError(f"{directory}: cannot read {METADATA_FILE} ({type(exc).__name__})") from None
        if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
            raise PredictorError(f"{directory}: not a refined model of format version {FORMAT_VERSION}")
        for name, expected in dict(metadata.get("files", {})).items():
            if not (directory / name).is_file() or file_sha256(directory / name) != expected:
                raise PredictorError(f"{directory}: {name} is missing or does not match its sha256")
        base = LengthPredictor.load(directory / BASE_DIRECTORY)
        try:
            config = RefinedConfig(**metadata["config"])
        except (TypeError, KeyError) as exc:
            raise PredictorError(f"{directory}: unusable config ({exc})") from None
        prefix = PromptFeaturizer.load(directory, config.prefix_features(base.tokenizer_name), base.featurizer.tokenizer)
        booster = lgb.Booster(model_file=str(directory / MODEL_FILE))
        model = cls(config, base, prefix, booster, metadata.get("training_data", {}))
        if model.feature_names() != metadata.get("feature_names"):
            raise PredictorError(f"{directory}: saved feature names differ from what this version computes")
        return model


def remaining_to_length(scores: np.ndarray, prefix_tokens: int) -> np.ndarray:
    """Predicted lengths [tokens] from log1p(remaining length) scores: ``k + max(1, round(.))``."""
    remaining = np.maximum(np.rint(np.expm1(np.asarray(scores, dtype=np.float64))), 1)
    return (prefix_tokens + remaining).astype(np.int64)


def train_refined_predictor(base: LengthPredictor, prompts: Sequence[str], responses: Sequence[str],
                            lengths: np.ndarray, config: RefinedConfig = RefinedConfig(),
                            training_data: dict[str, Any] | None = None) -> RefinedLengthPredictor:
    """Fit the refined model on the training requests longer than ``config.prefix_tokens``
    (``lengths`` [tokens]: their true response lengths), with ``base``'s LightGBM settings and
    seed (deterministic for them)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not (len(prompts) == len(responses) == len(lengths)):
        raise PredictorError("prompts, responses and lengths must have one entry per request")
    if not base.needs_text or base.config.objective not in ("regression", "rank"):
        raise PredictorError("the refined predictor extends a prompt-text regression or rank model")
    if base.config.features.neighbour_count:
        raise PredictorError("the refined predictor cannot extend a base with the neighbour-length block "
                             "(its training prompts would see themselves among the neighbours)")
    if base.prompt_decoupling is not None:
        raise PredictorError("the refined predictor cannot extend a prompt-decoupled base (its refined "
                             "predictions would not be decoupled)")
    settings = replace(base.config, objective="regression")  # a rank base's settings, regressing
    k = config.prefix_tokens
    rows = np.flatnonzero(lengths > k)
    if len(rows) < 10:
        raise PredictorError(f"need at least 10 training responses longer than {k} tokens, got {len(rows)}")
    prompts = [prompts[i] for i in rows]
    prefix_featurizer = PromptFeaturizer(config.prefix_features(base.tokenizer_name), base.featurizer.tokenizer)
    model = RefinedLengthPredictor(config, base, prefix_featurizer, booster=None, training_data={})
    prefixes = model.prefixes([responses[i] for i in rows])
    prefix_featurizer.fit(prefixes, seed=base.config.seed)
    matrix = model.features(prompts, prefixes)
    target = np.log1p(lengths[rows] - k).astype(np.float64)
    names = [f"f{i}" for i in range(matrix.shape[1])]
    dataset = lgb.Dataset(matrix, label=target, feature_name=names, free_raw_data=True,
                          params={"max_bin": base.config.max_bin, "verbosity": -1})
    model.booster = lgb.train(settings.lightgbm_params(), dataset, num_boost_round=settings.boost_rounds)
    model.training_data = {**dict(training_data or {}), "num_requests": len(lengths), "num_longer_than_prefix": len(rows),
                           "base_training_data": base.training_data}
    return model


def refinement_metrics(lengths: np.ndarray, prompt_only: np.ndarray, refined: np.ndarray,
                       prefix_tokens: int) -> dict[str, float]:
    """Spearman rank correlation and MAE [tokens] of the prompt-only and the refined prediction
    against the true ``lengths`` [tokens], over the requests longer than ``prefix_tokens``; and
    the same for the remaining length (true and predicted, less ``prefix_tokens``)."""
    from scipy.stats import spearmanr

    lengths = np.asarray(lengths, dtype=np.float64)
    keep = lengths > prefix_tokens
    actual = lengths[keep]
    out: dict[str, float] = {"num_requests": float(len(lengths)), "num_longer": float(keep.sum())}
    for name, predicted in (("prompt_only", prompt_only), ("refined", refined)):
        values = np.asarray(predicted, dtype=np.float64)[keep]
        out[f"{name}_spearman"] = float(spearmanr(actual, values).statistic)
        out[f"{name}_mae_tokens"] = float(np.mean(np.abs(actual - values)))
        out[f"{name}_median_relative_error"] = float(np.median(np.abs(actual - values) / actual))
    return out

"""LightGBM response-length models: training, prediction, saving and loading.

Objectives (:class:`PredictorConfig`):

``regression``      point prediction; LightGBM regression on ``log1p(length)`` with L2 loss
                    (``regression_loss="l2"``, the conditional mean of the log) or L1 loss
                    (``"l1"``, the conditional median, which minimises MAE); predicted length =
                    ``round(expm1(score))``.
``quantile``        the ``quantile``-th conditional quantile of the length (default 0.9, for KV
                    reservation); LightGBM quantile loss on ``log1p(length)`` (quantiles commute with
                    the monotone log). With ``calibrate_quantile`` a seeded ``calibration_fraction``
                    of the training prompts is held out and the log-score is shifted by the
                    split-conformal quantile of its residuals, so the held-out under-prediction
                    rate is at most ``1 - quantile`` in expectation. Predictions are rounded up.
``classification``  multiclass over length buckets of ``bucket_width`` tokens (bucket ``b`` holds
                    ``b*w+1 .. (b+1)*w``; lengths past ``max_buckets`` buckets share the last);
                    the point prediction is the predicted bucket's middle (``bucket_point="mid"``)
                    or its upper edge (``"upper"``, a reservation that covers the bucket). Its
                    class probabilities also give the predicted *distribution* of the length
                    (:meth:`LengthPredictor.predict_quantiles`): ``K`` equally likely lengths, the
                    ``(i + 0.5) / K`` quantiles of the bucket distribution with the probability
                    of a bucket spread uniformly over its tokens (the scheduler's
                    ``predicted_output_quantiles``).
``rank``            a ranker (Fu et al. 2024, "Efficient LLM Scheduling by Learning to Rank"): LightGBM
                    ``lambdarank`` over seeded random groups of ``rank_group_size`` training prompts,
                    relevance = the length's quantile level among the training lengths
                    (``rank_relevance_levels`` equal-count levels, linear gains), so a higher score
                    means a longer answer. A score is not a length: it is mapped to one by
                    quantiles -- the score's quantile level among the training prompts' scores
                    gives the training length at the same level (piecewise linear between the
                    ``RANK_MAP_POINTS`` stored quantiles, rounded, >= 1), so the predicted lengths
                    rank as the scores do and allocation still gets tokens.

**Prompt decoupling** (``prompt_decoupling_folds = K >= 2``, ``regression`` only; 0 = off, the
default): the log-score is rescaled by one prompt-length factor fitted on out-of-fold predictions
over ``K`` folds of the training prompts (``K`` extra models), so that the predictions lean on the
prompt length no harder than the training truths do (Spearman-matched):
``log-score + slope * (log prompt_tokens - centre)``; see :mod:`econoserve.predictor.decoupling`.
The model applies it itself in :meth:`LengthPredictor.predict` (so every caller, the vLLM engine's
included, gets it), and saves it in ``metadata.json`` (``prompt_decoupling``).

A saved model is a directory: ``model.txt`` (LightGBM), ``metadata.json`` (format version,
package and LightGBM versions, configuration, label, feature names, training-data sha256s,
calibration, held-out metrics, sha256 of every file), and the featurizer's ``vocabulary.json`` /
``features.npz`` when n-grams are used (``neighbours.npz`` with the neighbour-length block).
:meth:`LengthPredictor.load` checks all of it and raises :class:`~econoserve.errors.PredictorError`
with one line naming the directory and the problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from econoserve import __version__
from econoserve.errors import PredictorError, UserError
from econoserve.predictor.data import LabeledPrompts, record_folds
from econoserve.predictor.decoupling import PromptDecoupling, fit_prompt_decoupling
from econoserve.predictor.features import FeatureConfig, PromptFeaturizer
from econoserve.validation import check_field_values
from econoserve.workload.registry import file_sha256
from econoserve.workload.tokenizer import Tokenizer
from econoserve.workload.trace import Trace

OBJECTIVES: tuple[str, ...] = ("regression", "quantile", "classification", "rank")
REGRESSION_LOSSES: tuple[str, ...] = ("l2", "l1")
BUCKET_POINTS: tuple[str, ...] = ("mid", "upper")
FORMAT_VERSION = 1
#: Quantiles of the training scores and lengths that map a ``rank`` model's score to a length.
RANK_MAP_POINTS = 201
MODEL_FILE = "model.txt"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class PredictorConfig:
    """Everything that determines a trained model, with its defaults (lengths in tokens)."""

    objective: str = "regression"
    regression_loss: str = "l1"
    quantile: float = 0.9
    calibrate_quantile: bool = True
    calibration_fraction: float = 0.2
    bucket_width: int = 50
    max_buckets: int = 40
    bucket_point: str = "mid"
    rank_group_size: int = 32
    rank_relevance_levels: int = 31
    seed: int = 0
    num_threads: int = 2
    num_boost_round: int | None = None  # None: 500, or 150 for classification (one tree per bucket per round)
    learning_rate: float = 0.05
    num_leaves: int = 63
    min_data_in_leaf: int = 10
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_bin: int = 63
    features: FeatureConfig = field(default_factory=FeatureConfig)
    #: Prompt decoupling (module docstring): folds of its out-of-fold fit, 0 = off.
    prompt_decoupling_folds: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PredictorError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not 0.0 < self.quantile < 1.0:
            raise PredictorError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise PredictorError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        if self.bucket_width < 1 or self.max_buckets < 2:
            raise PredictorError("bucket_width must be >= 1 and max_buckets >= 2")
        if self.bucket_point not in BUCKET_POINTS:
            raise PredictorError(f"bucket_point must be one of {', '.join(BUCKET_POINTS)}")
        if self.rank_group_size < 2 or not 2 <= self.rank_relevance_levels <= 31:
            raise PredictorError("rank_group_size must be >= 2 and rank_relevance_levels in 2 .. 31")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise PredictorError(f"regression_loss must be one of {', '.join(REGRESSION_LOSSES)}")
        if self.num_threads < 1 or (self.num_boost_round is not None and self.num_boost_round < 1):
            raise PredictorError("num_threads and num_boost_round must be >= 1")
        if self.prompt_decoupling_folds and (self.prompt_decoupling_folds < 2 or self.objective != "regression"):
            raise PredictorError("prompt_decoupling_folds must be 0 (off) or >= 2 folds, and only a regression "
                                 f"model can be decoupled (got {self.prompt_decoupling_folds} with {self.objective})")

    @property
    def boost_rounds(self) -> int:
        """Boosting rounds: ``num_boost_round``, or the objective's default when it is None."""
        if self.num_boost_round is not None:
            return self.num_boost_round
        return 150 if self.objective == "classification" else 500

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PredictorConfig":
        """The configuration saved in a model's metadata; a :class:`PredictorError` names a field of
        the wrong type, and TypeError / ValueError an unknown field or a value out of range."""
        if not isinstance(values, dict) or not isinstance(values.get("features", {}), dict):
            raise TypeError("config and config.features must be JSON objects")
        values = dict(values)
        features = check_field_values("features", FeatureConfig, values.pop("features", {}))
        return cls(features=FeatureConfig(**features), **check_field_values("config", cls, values))

    def lightgbm_params(self, num_classes: int = 0) -> dict[str, Any]:
        """LightGBM parameters: deterministic for ``seed`` and ``num_threads``."""
        params: dict[str, Any] = {
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }
        if self.objective == "regression":
            params["objective"] = "regression" if self.regression_loss == "l2" else "regression_l1"
        elif self.objective == "quantile":
            params.update(objective="quantile", alpha=self.quantile)
        elif self.objective == "rank":
            params.update(objective="lambdarank", label_gain=list(range(self.rank_relevance_levels)),
                          lambdarank_truncation_level=self.rank_group_size)
        else:
            params.update(objective="multiclass", num_class=num_classes)
        return params


#: Points of a predicted length distribution (:meth:`LengthPredictor.predict_quantiles`), as the
#: simulator's traces and the vLLM drop-in carry them in ``predicted_output_quantiles``.
NUM_QUANTILE_POINTS = 16


@dataclass
class LengthPredictor:
    """A trained response-length model: featurizer + LightGBM booster + metadata."""

    config: PredictorConfig
    featurizer: PromptFeaturizer
    booster: lgb.Booster
    label: str
    training_data: dict[str, Any]
    quantile_log_offset: float = 0.0
    num_classes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    #: ``rank`` models: quantiles of the training prompts' scores and of their lengths [tokens]
    #: at the same ``RANK_MAP_POINTS`` levels (the score -> length map); None otherwise.
    score_length_map: dict[str, list[float]] | None = None
    #: The fitted prompt decoupling (``config.prompt_decoupling_folds``), None when off.
    prompt_decoupling: PromptDecoupling | None = None

    # ----------------------------------------------------------------- prediction
    @property
    def needs_text(self) -> bool:
        return self.config.features.use_text

    @property
    def tokenizer_name(self) -> str:
        return self.config.features.tokenizer

    def predict(
        self, prompts: Sequence[str] | None, prompt_tokens: np.ndarray | None = None, num_threads: int = 1
    ) -> np.ndarray:
        """Predicted response lengths [tokens, int64, >= 1], one per prompt.

        Text models compute every feature (the token count included) from ``prompts``; length-only
        models need ``prompt_tokens`` [tokens] instead.
        """
        if self.needs_text and prompts is None:
            raise PredictorError("this model uses prompt-text features; the input has no prompt text")
        matrix = self.featurizer.transform(prompts, None if self.needs_text else prompt_tokens)
        return self._lengths_from_scores(self._scores(matrix, num_threads))

    def _scores(self, matrix, num_threads: int = 1) -> np.ndarray:
        """The booster's scores of a feature matrix, prompt-decoupled when the model is."""
        scores = self.booster.predict(matrix, num_threads=num_threads)
        if self.prompt_decoupling is None:
            return scores
        return self.prompt_decoupling.adjust(scores, _prompt_token_column(matrix))

    def predict_class_probabilities(self, prompts: Sequence[str] | None, prompt_tokens=None) -> np.ndarray:
        """Bucket probabilities (rows = prompts), classification models only."""
        if self.config.objective != "classification":
            raise PredictorError("class probabilities exist only for classification models")
        matrix = self.featurizer.transform(prompts, None if self.needs_text else prompt_tokens)
        return self.booster.predict(matrix, num_threads=1)

    def predict_quantiles(self, prompts: Sequence[str] | None, prompt_tokens: np.ndarray | None = None,
                          num_points: int = NUM_QUANTILE_POINTS) -> np.ndarray:
        """The predicted distribution of each response length as ``num_points`` equally likely
        lengths [tokens, int64, sorted, >= 1] (rows = prompts), classification models only: the
        ``(i + 0.5) / num_points`` quantiles of the bucket probabilities, each bucket's
        probability spread uniformly over its ``bucket_width`` tokens (the last bucket, which
        also holds longer lengths, included)."""
        if num_points < 1:
            raise PredictorError(f"num_points must be >= 1, got {num_points}")
        return bucket_quantiles(self.predict_class_probabilities(prompts, prompt_tokens),
                                self.config.bucket_width, num_points)

    def _lengths_from_scores(self, scores: np.ndarray) -> np.ndarray:
        if self.config.objective == "classification":
            buckets = np.asarray(scores).reshape(len(scores), -1).argmax(axis=1)
            width = self.config.bucket_width
            lengths = buckets * width + (width if self.config.bucket_point == "upper" else (width + 1) / 2)
            return np.maximum(np.floor(lengths), 1).astype(np.int64)
        if self.config.objective == "rank":
            if self.score_length_map is None:
                raise PredictorError("this rank model has no score -> length map (corrupt model?)")
            lengths = np.interp(np.asarray(scores, dtype=np.float64), self.score_length_map["scores"],
                                self.score_length_map["lengths"])
            return np.maximum(np.rint(lengths), 1).astype(np.int64)
        lengths = np.expm1(np.asarray(scores, dtype=np.float64) + self.quantile_log_offset)
        rounded = np.ceil(lengths - 1e-9) if self.config.objective == "quantile" else np.rint(lengths)
        return np.maximum(rounded, 1).astype(np.int64)

    def predict_trace(self, trace: Trace, check_tokenizer: bool = True) -> Trace:
        """A copy of ``trace`` with ``predicted_output_tokens`` filled in (and, for a
        classification model, ``predicted_output_quantiles``)."""
        if self.needs_text and not trace.has_text:
            raise PredictorError(
                "the trace has no prompt_text column, and this model needs prompt text "
                "(build the trace from a text dataset, or train a length-only model with --no-text)"
            )
        trace_tokenizer = _trace_tokenizer(trace)
        if check_tokenizer and trace_tokenizer and self.needs_text and trace_tokenizer != self.tokenizer_name:
            raise PredictorError(
                f"the trace counts tokens with {trace_tokenizer!r} but the model predicts "
                f"{self.tokenizer_name!r} tokens (pass --allow-tokenizer-mismatch to predict anyway)"
            )
        requests = trace.requests
        prompts = requests["prompt_text"].tolist() if self.needs_text else None
        prompt_tokens = requests["prompt_tokens"].to_numpy(dtype=np.int64)
        predicted = self.predict(prompts, prompt_tokens)
        quantiles = self.predict_quantiles(prompts, prompt_tokens) if self.config.objective == "classification" else None
        return trace.with_predictions(predicted, quantiles)

    # ----------------------------------------------------------------- inspection
    def feature_importance(self, importance_type: str = "gain") -> pd.DataFrame:
        """Per feature: ``feature``, ``importance`` (total gain, or split count with ``"split"``),
        sorted, most important first."""
        values = self.booster.feature_importance(importance_type=importance_type)
        frame = pd.DataFrame({"feature": self.featurizer.feature_names(), "importance": values.astype(float)})
        return frame.sort_values(["importance", "feature"], ascending=[False, True], ignore_index=True)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package": "econoserve",
            "package_version": __version__,
            "lightgbm_version": lgb.__version__,
            "config": asdict(self.config),
            "label": self.label,
            "tokenizer": self.tokenizer_name,
            "needs_text": self.needs_text,
            "feature_names": self.featurizer.feature_names(),
            "num_features": len(self.featurizer.feature_names()),
            "training_data": self.training_data,
            "quantile_log_offset": self.quantile_log_offset,
            "num_classes": self.num_classes,
            "metrics": self.metrics,
            **({} if self.score_length_map is None else {"score_length_map": self.score_length_map}),
            **({} if self.prompt_decoupling is None else {"prompt_decoupling": self.prompt_decoupling.to_dict()}),
        }

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write the model directory (see the module docstring); returns its path."""
        return write_model_directory(directory, self.booster, self.featurizer, self.metadata())

    @classmethod
    def load(cls, directory: str | Path, tokenizer: Tokenizer | None = None) -> "LengthPredictor":
        """Load and check a saved model directory (``tokenizer``: reuse a loaded one)."""
        directory = Path(directory)
        metadata = read_metadata(directory)
        for name, expected in metadata["files"].items():
            path = directory / name
            if not path.is_file():
                raise PredictorError(f"{directory}: {name} is missing (incomplete model directory)")
            if file_sha256(path) != expected:
                raise PredictorError(f"{directory}: {name} does not match its sha256 in metadata.json (corrupt or edited)")
        try:
            config = PredictorConfig.from_dict(metadata["config"])
        except (TypeError, ValueError, UserError) as exc:
            raise PredictorError(f"{directory}: metadata.json has an unusable config ({exc})") from None
        featurizer = PromptFeaturizer.load(directory, config.features, tokenizer)
        if featurizer.feature_names() != metadata["feature_names"]:
            raise PredictorError(f"{directory}: saved feature names differ from what this version computes")
        try:
            booster = lgb.Booster(model_file=str(directory / MODEL_FILE))
        except lgb.basic.LightGBMError as exc:
            raise PredictorError(f"{directory}: LightGBM cannot read {MODEL_FILE} ({str(exc).splitlines()[0]})") from None
        if booster.num_feature() != metadata["num_features"]:
            raise PredictorError(
                f"{directory}: {MODEL_FILE} has {booster.num_feature()} features, metadata.json {metadata['num_features']}"
            )
        return cls(
            config=config,
            featurizer=featurizer,
            booster=booster,
            label=metadata["label"],
            training_data=metadata["training_data"],
            quantile_log_offset=float(metadata["quantile_log_offset"]),
            num_classes=int(metadata["num_classes"]),
            metrics=metadata.get("metrics", {}),
            score_length_map=_score_length_map(directory, metadata, config),
            prompt_decoupling=(PromptDecoupling.from_dict(metadata.get("prompt_decoupling"), str(directory))
                               if config.prompt_decoupling_folds else None),
        )


def write_model_directory(directory: str | Path, booster: lgb.Booster, featurizer: PromptFeaturizer,
                          metadata: dict[str, Any]) -> Path:
    """Write ``booster`` (``model.txt``), ``featurizer``'s fitted state and ``metadata.json``
    (``metadata`` plus the sha256 of every file written) into ``directory``; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(directory / MODEL_FILE))
    files = [MODEL_FILE, *featurizer.save(directory)]
    metadata = {**metadata, "files": {name: file_sha256(directory / name) for name in files}}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return directory


_REQUIRED_METADATA = (
    "format_version", "config", "label", "feature_names", "num_features", "training_data",
    "quantile_log_offset", "num_classes", "files",
)  # fmt: skip


#: The JSON shape of each metadata entry: accepted types and how to say them.
_METADATA_SHAPES: dict[str, tuple[tuple[type, ...], str]] = {
    "config": ((dict,), "an object"),
    "label": ((str,), "text"),
    "feature_names": ((list,), "a list of feature names"),
    "num_features": ((int,), "an integer"),
    "training_data": ((dict,), "an object"),
    "quantile_log_offset": ((int, float), "a number"),
    "num_classes": ((int,), "an integer"),
    "files": ((dict,), "an object of file name -> sha256"),
}


def read_metadata(directory: Path) -> dict[str, Any]:
    """``metadata.json`` of a model directory, checked for presence, syntax and format version."""
    if not directory.exists():
        raise PredictorError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise PredictorError(f"{directory}: a model is a directory (with {MODEL_FILE} and {METADATA_FILE}), not a file")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise PredictorError(f"{directory}: no {METADATA_FILE}; not a saved econoserve predictor")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictorError(f"{path}: corrupt metadata ({exc})") from None
    if not isinstance(metadata, dict):
        raise PredictorError(f"{path}: corrupt metadata (not a JSON object)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PredictorError(
            f"{path}: model format version {metadata.get('format_version')!r}; this econoserve "
            f"{__version__} reads version {FORMAT_VERSION} (retrain the model)"
        )
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise PredictorError(f"{path}: metadata lacks {', '.join(missing)} (corrupt model?)")
    for key, (kinds, what) in _METADATA_SHAPES.items():
        value = metadata[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise PredictorError(f"{path}: metadata {key} must be {what}, got {value!r:.80} (corrupt model?)")
    if not all(isinstance(name, str) for name in metadata["feature_names"]) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata["files"].items()
    ):
        raise PredictorError(f"{path}: metadata feature_names / files must hold text (corrupt model?)")
    return metadata


def _score_length_map(directory: Path, metadata: dict[str, Any], config: PredictorConfig) -> dict | None:
    """The saved score -> length map of a ``rank`` model (checked), None for other objectives."""
    if config.objective != "rank":
        return None
    value = metadata.get("score_length_map")
    ok = isinstance(value, dict) and all(
        isinstance(value.get(key), list) and len(value[key]) == RANK_MAP_POINTS
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[key])
        for key in ("scores", "lengths"))
    if not ok or np.any(np.diff(value["scores"]) < 0) or np.any(np.diff(value["lengths"]) < 0):
        raise PredictorError(f"{directory}: metadata score_length_map must hold {RANK_MAP_POINTS} sorted "
                             "scores and lengths (corrupt model?)")
    return {"scores": [float(v) for v in value["scores"]], "lengths": [float(v) for v in value["lengths"]]}


def _prompt_token_column(matrix) -> np.ndarray:
    """The ``prompt_tokens`` feature [tokens] (column 0, :meth:`PromptFeaturizer.feature_names`)."""
    column = matrix[:, 0]
    return np.asarray(column.toarray() if sp.issparse(column) else column, dtype=np.float64).ravel()


def rank_relevance(lengths: np.ndarray, levels: int) -> np.ndarray:
    """Relevance label (0 .. ``levels`` - 1) of each length [tokens] for the ``rank`` objective:
    its level among ``levels`` equal-count quantile levels of ``lengths`` (longer = higher)."""
    edges = np.quantile(lengths, np.arange(1, levels) / levels)
    return np.searchsorted(edges, lengths, side="right").astype(np.int64)


def rank_groups(size: int, group_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of ``size`` rows and the sizes of the consecutive query groups it is
    cut into (``group_size`` rows each, the last one the remainder)."""
    order = np.random.default_rng(seed).permutation(size)
    sizes = np.full(size // group_size, group_size, dtype=np.int64)
    return order, (np.append(sizes, size % group_size) if size % group_size else sizes)


def score_length_map(scores: np.ndarray, lengths: np.ndarray) -> dict[str, list[float]]:
    """Quantiles of the training ``scores`` and ``lengths`` [tokens] at ``RANK_MAP_POINTS``
    equally spaced levels: a score maps to the length at its quantile level."""
    levels = np.linspace(0.0, 1.0, RANK_MAP_POINTS)
    return {"scores": np.quantile(scores, levels).tolist(), "lengths": np.quantile(lengths, levels).tolist()}


def bucket_quantiles(probabilities: np.ndarray, bucket_width: int, num_points: int) -> np.ndarray:
    """The ``(i + 0.5) / num_points`` quantiles [tokens, int64, >= 1] of length distributions
    given as bucket probabilities (rows; bucket ``b`` = lengths ``b*w+1 .. (b+1)*w``, uniform
    within a bucket), rounded up to whole tokens."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probabilities, axis=1)
    levels = (np.arange(num_points) + 0.5) / num_points
    rows = np.arange(len(cdf))[:, None]
    bucket = np.minimum((cdf[:, :, None] < levels[None, None, :]).sum(axis=1), cdf.shape[1] - 1)
    below = np.where(bucket > 0, cdf[rows, np.maximum(bucket - 1, 0)], 0.0)
    mass = np.maximum(probabilities[rows, bucket], 1e-12)
    within = np.clip((levels[None, :] - below) / mass, 0.0, 1.0)
    return np.maximum(np.ceil((bucket + within) * bucket_width - 1e-9), 1).astype(np.int64)


def _trace_tokenizer(trace: Trace) -> str | None:
    spec = trace.metadata.get("spec") if isinstance(trace.metadata, dict) else None
    tokenizer = spec.get("tokenizer") if isinstance(spec, dict) else None
    if not isinstance(tokenizer, str) or tokenizer.startswith("none"):
        return None
    return "gpt2" if tokenizer == "opt" else tokenizer


# --------------------------------------------------------------------- training
def train_predictor(
    data: LabeledPrompts, config: PredictorConfig = PredictorConfig(), label: str | None = None,
    split: dict[str, Any] | None = None, progress: bool = False, tokenizer: Tokenizer | None = None,
) -> LengthPredictor:
    """Fit a model on ``data`` (the training part) for ``label`` [tokens].

    ``split`` records how ``data`` was split from its dataset (kept in the metadata so evaluation
    can reproduce the held-out part); ``progress`` shows a tqdm bar over boosting rounds. Deterministic for ``config.seed`` and ``config.num_threads``.
    """
    from econoserve.predictor.data import STACKED_LABELS, default_label

    label = label or default_label(data.dataset)
    if label in STACKED_LABELS and label not in data.targets:
        data = data.stacked(label)
    lengths = data.labels(label).astype(np.float64)
    if len(data) < 10:
        raise PredictorError(f"need at least 10 training prompts, got {len(data)}")
    if np.any(lengths < 1):
        raise PredictorError("training labels must be >= 1 token")
    config = _fit_tokenizer_to_data(config, data)
    if config.features.use_text and not data.has_text:
        raise PredictorError(f"{data.dataset} has no prompt text; train a length-only model (--no-text)")

    fit_rows, calibration_rows = _calibration_split(len(data), config)
    fit_data = data.subset(fit_rows)
    featurizer = PromptFeaturizer(config.features, tokenizer).fit(fit_data.prompts, seed=config.seed,
                                                                   lengths=lengths[fit_rows])
    matrix = featurizer.training_matrix(fit_data.prompts, fit_data.prompt_tokens)
    num_classes, groups, order = 0, None, None
    if config.objective == "classification":
        num_classes = _num_buckets(lengths, config)
        target = np.minimum((lengths[fit_rows] - 1) // config.bucket_width, num_classes - 1)
    elif config.objective == "rank":
        target = rank_relevance(lengths[fit_rows], config.rank_relevance_levels)
        order, groups = rank_groups(len(fit_rows), config.rank_group_size, config.seed)
    else:
        target = np.log1p(lengths[fit_rows])
    names = [f"f{i}" for i in range(matrix.shape[1])]  # LightGBM rejects JSON characters in names
    if groups is not None:  # a ranker's rows come group by group
        matrix, target = matrix[order], target[order]
    dataset = lgb.Dataset(matrix, label=target, group=groups, feature_name=names,
                          free_raw_data=True, params={"max_bin": config.max_bin, "verbosity": -1})
    with tqdm(total=config.boost_rounds, desc="boosting", unit="round", disable=not progress) as bar:
        booster = lgb.train(
            config.lightgbm_params(num_classes), dataset, num_boost_round=config.boost_rounds,
            callbacks=[lambda env: bar.update(1)],
        )

    predictor = LengthPredictor(
        config=config, featurizer=featurizer, booster=booster, label=label, training_data={},
        num_classes=num_classes,
    )
    if config.objective == "rank":
        predictor.score_length_map = score_length_map(booster.predict(matrix), lengths[fit_rows])  # (quantiles: order-free)
    if calibration_rows is not None:
        predictor.quantile_log_offset = _conformal_offset(predictor, data.subset(calibration_rows), label)
    if config.prompt_decoupling_folds:
        predictor.prompt_decoupling = _fit_prompt_decoupling(data, config, label, tokenizer)
    predictor.training_data = {
        "dataset": data.dataset,
        "part": data.part,
        "tokenizer": data.tokenizer,
        "label": label,
        "num_prompts": len(data),
        "num_fit_prompts": len(fit_rows),
        "num_calibration_prompts": 0 if calibration_rows is None else len(calibration_rows),
        "table_sha256": data.table_sha256(label),
        "source_sha256": dict(data.source_sha256),
        "split": dict(split or {}),
        "label_median_tokens": float(np.median(lengths)),
        "label_mean_tokens": float(np.mean(lengths)),
    }
    return predictor


def _fit_tokenizer_to_data(config: PredictorConfig, data: LabeledPrompts) -> PredictorConfig:
    """Text models count prompt tokens in the data's tokenizer, so labels and feature agree."""
    if data.has_text and config.features.tokenizer != data.tokenizer:
        return replace(config, features=replace(config.features, tokenizer=data.tokenizer))
    return config


def _calibration_split(size: int, config: PredictorConfig) -> tuple[np.ndarray, np.ndarray | None]:
    if config.objective != "quantile" or not config.calibrate_quantile:
        return np.arange(size), None
    num_calibration = int(round(config.calibration_fraction * size))
    if num_calibration < 10 or size - num_calibration < 10:
        raise PredictorError(f"too few prompts ({size}) to hold out a calibration set")
    order = np.random.default_rng(config.seed + 1).permutation(size)
    return np.sort(order[num_calibration:]), np.sort(order[:num_calibration])


def _conformal_offset(predictor: LengthPredictor, calibration: LabeledPrompts, label: str) -> float:
    """Split-conformal shift of the log-score so that P(actual > predicted) <= 1 - quantile."""
    matrix = predictor.featurizer.transform(calibration.prompts, calibration.prompt_tokens)
    residuals = np.log1p(calibration.labels(label).astype(np.float64)) - predictor.booster.predict(matrix)
    size = len(residuals)
    rank = min(math.ceil((size + 1) * predictor.config.quantile), size)
    return float(np.sort(residuals)[rank - 1])


def _fit_prompt_decoupling(data: LabeledPrompts, config: PredictorConfig, label: str,
                           tokenizer: Tokenizer | None) -> PromptDecoupling:
    """The prompt decoupling of a model trained on ``data`` (module docstring): fitted on the
    log-scores each training prompt gets from a model of the same configuration (decoupling off)
    trained on the other ``prompt_decoupling_folds`` folds of ``data`` (whole source records per
    fold)."""
    folds = config.prompt_decoupling_folds
    fold = record_folds(data.source_index, folds, config.seed)
    inner = replace(config, prompt_decoupling_folds=0)
    scores = np.zeros(len(data))
    for k in tqdm(range(folds), desc="prompt decoupling folds", unit="fold", disable=None):
        held, rest = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        model = train_predictor(data.subset(rest), inner, label=label, tokenizer=tokenizer)
        part = data.subset(held)
        scores[held] = model._scores(model.featurizer.transform(part.prompts, part.prompt_tokens))
    return fit_prompt_decoupling(scores, data.prompt_tokens, data.labels(label), folds)


def _num_buckets(lengths: np.ndarray, config: PredictorConfig) -> int:
    observed = int((lengths.max() - 1) // config.bucket_width) + 1
    return int(min(max(observed, 2), config.max_buckets))

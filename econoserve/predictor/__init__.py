"""The response-length (RL) predictor: prompt features, LightGBM models, evaluation, figures.

Typical use::

    from econoserve.predictor import PredictorConfig, load_labeled_prompts, train_predictor, evaluate
    train = load_labeled_prompts("alpaca-vicuna", "train")
    model = train_predictor(train, PredictorConfig(objective="quantile", quantile=0.9, seed=0))
    model.save("results/models/alpaca-vicuna-q90")
    evaluation = evaluate(model, "alpaca-vicuna")
    evaluation.write_json("results/models/alpaca-vicuna-q90/eval.json")
"""

from econoserve.predictor.data import (
    PREDICTOR_DATASETS,
    LabeledPrompts,
    SplitSpec,
    default_label,
    load_labeled_prompts,
)
from econoserve.predictor.evaluation import Evaluation, LatencyStats, evaluate, measure_latency
from econoserve.predictor.features import FeatureConfig, PromptFeaturizer
from econoserve.predictor.metrics import PredictorMetrics, compute_metrics
from econoserve.predictor.model import OBJECTIVES, LengthPredictor, PredictorConfig, train_predictor

__all__ = [
    "OBJECTIVES",
    "PREDICTOR_DATASETS",
    "Evaluation",
    "FeatureConfig",
    "LabeledPrompts",
    "LatencyStats",
    "LengthPredictor",
    "PredictorConfig",
    "PredictorMetrics",
    "PromptFeaturizer",
    "SplitSpec",
    "compute_metrics",
    "default_label",
    "evaluate",
    "load_labeled_prompts",
    "measure_latency",
    "train_predictor",
]

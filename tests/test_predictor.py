"""Response-length predictor: metrics, features, training, persistence and errors.

These tests need no dataset mirror: they use synthetic prompts whose response length follows
from what the prompt asks for, and a whitespace tokenizer injected in place of Llama-2's.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from econoserve.errors import PredictorError
from econoserve.predictor import figures
from econoserve.predictor.data import LabeledPrompts
from econoserve.predictor.evaluation import evaluate
from econoserve.predictor.features import FeatureConfig, PromptFeaturizer
from econoserve.predictor.metrics import (
    accuracy_within,
    bucket_accuracy,
    bucket_of,
    compute_metrics,
    kendall_tau_b,
    mean_absolute_error,
    mean_over_reservation,
    mean_shortfall,
    r_squared,
    root_mean_squared_error,
    under_prediction_rate,
)
from econoserve.predictor.model import LengthPredictor, PredictorConfig, bucket_quantiles, train_predictor
from econoserve.workload.tokenizer import Tokenizer
from econoserve.workload.trace import Trace


# --------------------------------------------------------------------- fixtures
class _WhitespaceBackend:
    def encode(self, texts):
        return [[0] * len(text.split()) for text in texts]


def whitespace_tokenizer() -> Tokenizer:
    return Tokenizer("llama2", _WhitespaceBackend())


_TOPICS = ["the ocean", "a robot", "climate change", "coffee", "the moon", "democracy", "a small village",
           "machine learning", "football", "the renaissance", "volcanoes", "friendship"]


def synthetic_prompts(size: int, seed: int) -> LabeledPrompts:
    """Prompts whose true length [tokens] depends on the task they ask for, plus noise."""
    rng = np.random.default_rng(seed)
    prompts, lengths = [], []
    for _ in range(size):
        topic = _TOPICS[rng.integers(len(_TOPICS))]
        kind = rng.integers(5)
        if kind == 0:
            prompts.append(f"Write a story about {topic}.")
            mean = 320
        elif kind == 1:
            prompts.append(f"Give one word that describes {topic}.")
            mean = 4
        elif kind == 2:
            count = int(rng.integers(2, 9))
            prompts.append(f"List {count} facts about {topic}.")
            mean = 18 * count
        elif kind == 3:
            prompts.append(f"Explain {topic} in detail.")
            mean = 200
        else:
            prompts.append(f"Is {topic} interesting? Answer yes or no.")
            mean = 8
        lengths.append(max(1, int(rng.normal(mean, 0.15 * mean + 2))))
    return LabeledPrompts(
        dataset="synthetic",
        part="train",
        tokenizer="llama2",
        prompts=prompts,
        prompt_tokens=np.array([len(p.split()) for p in prompts], dtype=np.int64),
        source_index=np.arange(size, dtype=np.int64),
        targets={"reference": np.array(lengths, dtype=np.int64)},
    )


FAST = PredictorConfig(num_boost_round=60, num_threads=1, features=FeatureConfig(ngram_min_df=2))


@pytest.fixture(scope="module")
def train_data() -> LabeledPrompts:
    return synthetic_prompts(1500, seed=1)


@pytest.fixture(scope="module")
def test_data() -> LabeledPrompts:
    return replace(synthetic_prompts(600, seed=2), part="test")


@pytest.fixture(scope="module")
def regression_model(train_data) -> LengthPredictor:
    return train_predictor(train_data, FAST, tokenizer=whitespace_tokenizer())


# --------------------------------------------------------------------- metrics
ACTUAL = [10, 100, 200]
PREDICTED = [20, 100, 50]


def test_point_metrics_on_a_hand_checked_case():
    assert mean_absolute_error(ACTUAL, PREDICTED) == pytest.approx(160 / 3)
    assert root_mean_squared_error(ACTUAL, PREDICTED) == pytest.approx(math.sqrt(22600 / 3))
    # mean 103.33: SS_tot = 93.33^2 + 3.33^2 + 96.67^2 = 18066.67, SS_res = 22600
    assert r_squared(ACTUAL, PREDICTED) == pytest.approx(1 - 22600 / 18066.666666)
    assert accuracy_within(ACTUAL, PREDICTED, 50) == pytest.approx(2 / 3)
    assert accuracy_within(ACTUAL, PREDICTED, 10) == pytest.approx(2 / 3)
    assert accuracy_within(ACTUAL, PREDICTED, 9) == pytest.approx(1 / 3)
    assert accuracy_within(ACTUAL, PREDICTED, 150) == 1.0


def test_rank_and_reservation_metrics_on_a_hand_checked_case():
    # pairs (10,100) and (10,200) are concordant, (100,200) vs (100,50) discordant: (2 - 1) / 3
    assert kendall_tau_b(ACTUAL, PREDICTED) == pytest.approx(1 / 3)
    assert under_prediction_rate(ACTUAL, PREDICTED) == pytest.approx(1 / 3)
    assert mean_over_reservation(ACTUAL, PREDICTED) == pytest.approx(10 / 3)
    assert mean_shortfall(ACTUAL, PREDICTED) == pytest.approx(50)
    assert math.isnan(kendall_tau_b(ACTUAL, [7, 7, 7]))


def test_buckets_hold_lengths_1_to_width():
    assert bucket_of([1, 50, 51, 100, 101], 50).tolist() == [0, 0, 1, 1, 2]
    # actual buckets 0, 1, 3; predicted 0, 1, 0
    assert bucket_accuracy(ACTUAL, PREDICTED, 50) == pytest.approx(2 / 3)
    assert bucket_accuracy(ACTUAL, PREDICTED, 50, within=1) == pytest.approx(2 / 3)
    assert bucket_accuracy(ACTUAL, PREDICTED, 200) == 1.0
    with pytest.raises(ValueError):
        bucket_of([1], 0)


def test_compute_metrics_collects_everything():
    metrics = compute_metrics(ACTUAL, PREDICTED)
    flat = metrics.as_flat_dict()
    assert flat["mae_tokens"] == pytest.approx(160 / 3)
    assert flat["relative_mae"] == pytest.approx((160 / 3) / (310 / 3))
    assert flat["over_reservation_ratio"] == pytest.approx((10 / 3) / (310 / 3))
    assert {"bucket_exact_50", "bucket_exact_100", "bucket_exact_200", "bucket_within_one_200"} <= set(flat)
    assert compute_metrics(ACTUAL, [50, 50, 50]).as_flat_dict()["kendall_tau_b"] is None
    with pytest.raises(ValueError):
        compute_metrics([1, 2], [1])


# --------------------------------------------------------------------- features
def test_lexical_cues_and_requested_sizes():
    featurizer = PromptFeaturizer(FeatureConfig(ngram_vocabulary_size=0), whitespace_tokenizer())
    names = featurizer.feature_names()
    rows = featurizer.transform(
        ["Write a short story about a cat in 3 sentences.", "Give me five examples of fruit.", "What is 2+2?"]
    )
    table = pd.DataFrame(rows, columns=names)
    assert table.loc[0, "cue_creative_long"] == 1
    assert table.loc[0, "cue_brevity"] == 1
    assert table.loc[0, "requested_sentences"] == 3
    assert table.loc[1, "requested_items"] == 5
    assert table.loc[2, "cue_starts_wh_question"] == 1
    assert table.loc[2, "cue_arithmetic"] >= 1
    assert table.loc[2, "prompt_question_marks"] == 1
    assert table["prompt_tokens"].tolist() == [10, 6, 3]


def test_featurizer_columns_match_names_and_are_deterministic(train_data):
    first = PromptFeaturizer(FAST.features, whitespace_tokenizer()).fit(train_data.prompts)
    second = PromptFeaturizer(FAST.features, whitespace_tokenizer()).fit(train_data.prompts)
    a, b = first.transform(train_data.prompts[:50]), second.transform(train_data.prompts[:50])
    assert a.shape[1] == len(first.feature_names())
    assert (a != b).nnz == 0
    assert any(name.startswith("ngram[") for name in first.feature_names())


def test_svd_features_are_dense_and_sized(train_data):
    config = replace(FAST.features, svd_components=8)
    featurizer = PromptFeaturizer(config, whitespace_tokenizer()).fit(train_data.prompts)
    matrix = featurizer.transform(train_data.prompts[:10])
    assert isinstance(matrix, np.ndarray) and matrix.shape == (10, len(featurizer.feature_names()))
    assert sum(name.startswith("svd_") for name in featurizer.feature_names()) == 8


# --------------------------------------------------------------------- training
def test_training_is_deterministic_for_a_seed(train_data, test_data, regression_model):
    again = train_predictor(train_data, FAST, tokenizer=whitespace_tokenizer())
    assert again.booster.model_to_string() == regression_model.booster.model_to_string()
    assert np.array_equal(again.predict(test_data.prompts), regression_model.predict(test_data.prompts))
    other_seed = train_predictor(train_data, replace(FAST, seed=7), tokenizer=whitespace_tokenizer())
    assert other_seed.booster.model_to_string() != regression_model.booster.model_to_string()


def test_model_beats_the_constant_median_on_held_out_prompts(train_data, test_data, regression_model):
    result = evaluate(regression_model, "synthetic", test_data=test_data, train_data=train_data, latency_samples=20)
    model, baseline = result.metrics["reference"]["model"], result.metrics["reference"]["baseline"]
    assert model.mae_tokens < 0.5 * baseline.mae_tokens
    assert model.kendall_tau_b > 0.7
    assert result.latency is not None and result.latency.single_p99_ms > 0
    document = json.loads(json.dumps(result.to_json_dict()))
    assert document["labels"]["reference"]["baseline_constant_tokens"] == float(np.median(train_data.labels("reference")))
    assert set(document["labels"]["reference"]["model"]) == set(document["labels"]["reference"]["baseline"])


def test_predictions_are_positive_integers(regression_model, test_data):
    predicted = regression_model.predict(test_data.prompts)
    assert predicted.dtype == np.int64 and predicted.min() >= 1 and len(predicted) == len(test_data)


def test_quantile_model_is_calibrated(train_data, test_data):
    config = replace(FAST, objective="quantile", quantile=0.9)
    model = train_predictor(train_data, config, tokenizer=whitespace_tokenizer())
    predicted = model.predict(test_data.prompts)
    actual = test_data.labels("reference")
    assert under_prediction_rate(actual, predicted) <= 0.15
    assert model.training_data["num_calibration_prompts"] == 300
    point = train_predictor(train_data, FAST, tokenizer=whitespace_tokenizer()).predict(test_data.prompts)
    assert predicted.mean() > point.mean()


def test_classification_predicts_bucket_points(train_data, test_data):
    config = replace(FAST, objective="classification", bucket_width=50, num_boost_round=20)
    model = train_predictor(train_data, config, tokenizer=whitespace_tokenizer())
    predicted = model.predict(test_data.prompts)
    assert set(np.unique(predicted)) <= {25 + 50 * b for b in range(model.num_classes)}
    probabilities = model.predict_class_probabilities(test_data.prompts[:5])
    assert probabilities.shape == (5, model.num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert bucket_accuracy(test_data.labels("reference"), predicted, 50, within=1) > 0.8
    quantiles = model.predict_quantiles(test_data.prompts, num_points=8)
    assert quantiles.shape == (len(test_data), 8) and (np.diff(quantiles, axis=1) >= 0).all() and quantiles.min() >= 1
    np.testing.assert_array_equal(quantiles, bucket_quantiles(model.predict_class_probabilities(test_data.prompts), 50, 8))
    annotated = model.predict_trace(_trace(test_data, with_text=True))
    assert annotated.has_prediction_quantiles


def test_rank_model_ranks_and_maps_scores_to_lengths_monotonically(tmp_path, train_data, test_data):
    config = replace(FAST, objective="rank", rank_group_size=16)
    model = train_predictor(train_data, config, tokenizer=whitespace_tokenizer())
    again = train_predictor(train_data, config, tokenizer=whitespace_tokenizer())
    assert again.booster.model_to_string() == model.booster.model_to_string()
    predicted = model.predict(test_data.prompts)
    assert predicted.dtype == np.int64 and predicted.min() >= 1
    assert kendall_tau_b(test_data.labels("reference"), predicted) > 0.7
    # the map is monotone: a higher score never gives a shorter length, and it spans the
    # training lengths (from the shortest to the longest)
    matrix = model.featurizer.transform(test_data.prompts, None)
    scores = model.booster.predict(matrix)
    order = np.argsort(scores, kind="stable")
    assert (np.diff(predicted[order]) >= 0).all()
    lengths = train_data.labels("reference")
    assert model.score_length_map["lengths"][0] == lengths.min() and model.score_length_map["lengths"][-1] == lengths.max()
    loaded = LengthPredictor.load(model.save(tmp_path / "rank"), tokenizer=whitespace_tokenizer())
    assert np.array_equal(loaded.predict(test_data.prompts), predicted)


def test_rank_relevance_and_groups():
    from econoserve.predictor.model import rank_groups, rank_relevance

    relevance = rank_relevance(np.array([1, 2, 3, 4, 5, 6, 7, 8]), levels=4)
    np.testing.assert_array_equal(relevance, [0, 0, 1, 1, 2, 2, 3, 3])
    order, sizes = rank_groups(10, 4, seed=0)
    assert sorted(order.tolist()) == list(range(10)) and sizes.tolist() == [4, 4, 2]


def test_bucket_quantiles_spread_each_bucket_uniformly_over_its_tokens():
    # half the mass in 1..10, half in 11..20: the 1/8, 3/8, 5/8, 7/8 quantiles are 2.5, 7.5, 12.5,
    # 17.5, rounded up; a point mass in bucket 1 (51..100) gives 62.5 and 87.5
    np.testing.assert_array_equal(bucket_quantiles(np.array([[0.5, 0.5]]), 10, 4), [[3, 8, 13, 18]])
    np.testing.assert_array_equal(bucket_quantiles(np.array([[0.0, 1.0, 0.0]]), 50, 2), [[63, 88]])


def test_length_only_model_predicts_a_trace_without_text(train_data):
    config = replace(FAST, features=FeatureConfig(use_text=False))
    model = train_predictor(replace(train_data, prompts=None), config)
    trace = _trace(train_data, with_text=False)
    annotated = model.predict_trace(trace)
    assert annotated.has_predictions and annotated.requests["predicted_output_tokens"].min() >= 1


def test_training_rejects_bad_input(train_data):
    with pytest.raises(PredictorError, match="no prompt text"):
        train_predictor(replace(train_data, prompts=None), FAST)
    with pytest.raises(PredictorError, match="no label"):
        train_predictor(train_data, FAST, label="max")
    with pytest.raises(PredictorError, match="objective"):
        PredictorConfig(objective="ranking")
    with pytest.raises(PredictorError, match="quantile"):
        PredictorConfig(quantile=1.5)


# --------------------------------------------------------------------- persistence
def test_save_load_round_trip_gives_identical_predictions(tmp_path, regression_model, test_data):
    directory = regression_model.save(tmp_path / "model")
    loaded = LengthPredictor.load(directory, tokenizer=whitespace_tokenizer())
    assert np.array_equal(loaded.predict(test_data.prompts), regression_model.predict(test_data.prompts))
    assert loaded.config == regression_model.config
    pd.testing.assert_frame_equal(loaded.feature_importance(), regression_model.feature_importance())
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["tokenizer"] == "llama2"
    assert metadata["training_data"]["table_sha256"] == synthetic_prompts(1500, seed=1).table_sha256("reference")
    assert set(metadata["files"]) == {"model.txt", "vocabulary.json", "features.npz"}
    assert {"package_version", "lightgbm_version", "config", "feature_names", "metrics"} <= set(metadata)


@pytest.fixture
def saved_model(tmp_path, regression_model):
    return regression_model.save(tmp_path / "model")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(PredictorError, match="no such model directory"):
        LengthPredictor.load(tmp_path / "nowhere")


def test_directory_without_metadata_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictorError, match="no metadata.json"):
        LengthPredictor.load(tmp_path / "empty")


def test_corrupt_metadata_is_a_clear_error(saved_model):
    (saved_model / "metadata.json").write_text("{ not json")
    with pytest.raises(PredictorError, match="corrupt metadata"):
        LengthPredictor.load(saved_model)


def test_corrupt_model_file_fails_its_checksum(saved_model):
    model_file = saved_model / "model.txt"
    model_file.write_text(model_file.read_text().replace("tree", "TREE", 1))
    with pytest.raises(PredictorError, match="model.txt does not match its sha256"):
        LengthPredictor.load(saved_model)


def test_missing_model_file_is_a_clear_error(saved_model):
    (saved_model / "vocabulary.json").unlink()
    with pytest.raises(PredictorError, match="vocabulary.json is missing"):
        LengthPredictor.load(saved_model)


def test_incompatible_format_version_is_a_clear_error(saved_model):
    metadata = json.loads((saved_model / "metadata.json").read_text())
    metadata["format_version"] = 99
    (saved_model / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(PredictorError, match="format version 99"):
        LengthPredictor.load(saved_model)


def test_unreadable_lightgbm_file_is_a_clear_error(saved_model):
    (saved_model / "model.txt").write_text("garbage")
    metadata = json.loads((saved_model / "metadata.json").read_text())
    from econoserve.workload.registry import file_sha256

    metadata["files"]["model.txt"] = file_sha256(saved_model / "model.txt")
    (saved_model / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(PredictorError, match="LightGBM cannot read"):
        LengthPredictor.load(saved_model)


def test_trace_without_text_is_refused_by_a_text_model(regression_model, train_data):
    with pytest.raises(PredictorError, match="no prompt_text column"):
        regression_model.predict_trace(_trace(train_data, with_text=False))


def test_trace_with_another_tokenizer_is_refused_unless_allowed(regression_model, train_data):
    trace = _trace(train_data, with_text=True)
    gpt2_trace = replace(trace, metadata={"spec": {"tokenizer": "gpt2"}})
    with pytest.raises(PredictorError, match="tokenizer-mismatch"):
        regression_model.predict_trace(gpt2_trace)
    annotated = regression_model.predict_trace(gpt2_trace, check_tokenizer=False)
    assert np.array_equal(
        annotated.requests["predicted_output_tokens"].to_numpy(),
        regression_model.predict(trace.requests["prompt_text"].tolist()),
    )


def _trace(data: LabeledPrompts, with_text: bool, size: int = 40) -> Trace:
    frame = pd.DataFrame(
        {
            "request_id": np.arange(size),
            "arrival_time_s": np.arange(size, dtype=float),
            "prompt_tokens": data.prompt_tokens[:size],
            "output_tokens": data.labels("reference")[:size],
            "dataset": "synthetic",
        }
    )
    if with_text:
        frame["prompt_text"] = data.prompts[:size]
    return Trace.from_frame(frame)


# --------------------------------------------------------------------- figures
def test_figure6_panels_and_metrics_table(regression_model, train_data, test_data):
    result = evaluate(regression_model, "synthetic", test_data=test_data, train_data=train_data, latency_samples=0)
    figure = figures.figure6(result.predictions, regression_model.feature_importance(),
                             baseline_tokens=result.baseline_tokens["reference"])
    assert len(figure.axes) >= 4
    plt.close(figure)
    _, ax = plt.subplots()
    figures.plot_error_cdf(result.predictions, ax, signed=True)
    plt.close("all")
    confusion = figures.bucket_confusion(result.predictions, bucket_width=50, max_buckets=8)
    assert confusion.shape == (8, 8)
    np.testing.assert_allclose(confusion.sum(axis=1)[confusion.sum(axis=1) > 0], 1.0)
    table = figures.metrics_table(result)
    row = table[(table["label"] == "reference") & (table["metric"] == "mae_tokens")].iloc[0]
    assert row["model"] == pytest.approx(result.metrics["reference"]["model"].mae_tokens)
    assert row["better"] is True or row["better"] == True  # noqa: E712 (numpy bool)
    assert figures.metrics_table(result.to_json_dict()).equals(table)

"""The refined response-length predictor (prompt + the response's first k tokens) on a small
real-data sample: deterministic training, predictions above k, a checked save / load round trip,
and a better ranking than the prompt-only model on held-out responses longer than k. The measured
numbers on the whole held-out part are in ``benchmarks/results/predictor_refine.md``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from econoserve.errors import PredictorError
from econoserve.predictor.data import LabeledPrompts, SplitSpec, _split_rows, sample_rows
from econoserve.predictor.model import PredictorConfig, train_predictor
from econoserve.predictor.refine import RefinedConfig, RefinedLengthPredictor, refinement_metrics, train_refined_predictor
from econoserve.workload.datasets import load_requests
from econoserve.workload.registry import get_entry

pytestmark = pytest.mark.realdata

K = 16


@pytest.fixture(scope="module")
def parts():
    requests = load_requests("sharegpt", "llama2")
    rows = _split_rows(requests["source_index"].to_numpy(), "train", SplitSpec())
    train = requests.iloc[rows].iloc[sample_rows(len(rows), 1500, 0)]
    test_rows = _split_rows(requests["source_index"].to_numpy(), "test", SplitSpec())
    test = requests.iloc[test_rows].iloc[sample_rows(len(test_rows), 600, 1)]
    return train, test


def _base_data(train) -> LabeledPrompts:
    return LabeledPrompts(dataset="sharegpt", part="train", tokenizer="llama2", prompts=train["prompt_text"].tolist(),
                          prompt_tokens=train["prompt_tokens"].to_numpy(np.int64),
                          source_index=train["source_index"].to_numpy(np.int64),
                          targets={"reference": train["output_tokens"].to_numpy(np.int64)},
                          source_sha256={"sharegpt": get_entry("sharegpt").sha256})


@pytest.fixture(scope="module")
def base(parts):
    train, _ = parts
    return train_predictor(_base_data(train), PredictorConfig(num_boost_round=60, num_threads=1))


def _train(base, train):
    return train_refined_predictor(base, train["prompt_text"].tolist(), train["response_text"].tolist(),
                                   train["output_tokens"].to_numpy(np.int64), RefinedConfig(K, 500))


def test_refined_predictor_is_deterministic_above_k_and_ranks_better(parts, base, tmp_path):
    train, test = parts
    model = _train(base, train)
    prompts, responses = test["prompt_text"].tolist(), test["response_text"].tolist()
    predicted = model.predict(prompts, responses)
    assert np.array_equal(predicted, _train(base, train).predict(prompts, responses))
    assert predicted.dtype == np.int64 and (predicted > K).all()
    assert model.training_data["num_longer_than_prefix"] == int((train["output_tokens"] > K).sum())

    loaded = RefinedLengthPredictor.load(model.save(tmp_path / "refined"))
    assert np.array_equal(loaded.predict(prompts, responses), predicted)

    metrics = refinement_metrics(test["output_tokens"].to_numpy(), base.predict(prompts), predicted, K)
    assert metrics["num_longer"] == (test["output_tokens"] > K).sum()
    assert metrics["refined_spearman"] > metrics["prompt_only_spearman"] + 0.05
    assert metrics["refined_mae_tokens"] < metrics["prompt_only_mae_tokens"]


def test_the_prefix_is_the_first_k_tokens_and_an_edited_model_is_refused(parts, base, tmp_path):
    train, _ = parts
    model = _train(base, train.iloc[:200])
    tokenizer = base.featurizer.tokenizer
    text = "Sure! Here is a detailed plan:\n\n1. Wake up early.\n2. " + "Keep going. " * 20
    (prefix,) = model.prefixes([text])
    assert prefix == tokenizer.decode(tokenizer.encode([text])[0][:K]) and text.startswith(prefix.strip()[:10])
    directory = model.save(tmp_path / "refined")
    metadata = json.loads((directory / "metadata.json").read_text())
    (directory / "model.txt").write_text((directory / "model.txt").read_text() + "\n")
    with pytest.raises(PredictorError, match="model.txt"):
        RefinedLengthPredictor.load(directory)
    assert metadata["config"]["prefix_tokens"] == K


def test_refined_predictor_extends_a_rank_model(parts):
    from dataclasses import replace

    train, test = parts
    ranker = train_predictor(_base_data(train), PredictorConfig(objective="rank", num_boost_round=30, num_threads=1))
    model = train_refined_predictor(ranker, train["prompt_text"].tolist(), train["response_text"].tolist(),
                                    train["output_tokens"].to_numpy(np.int64), RefinedConfig(K, 500))
    assert model.booster.params["objective"] in ("regression_l1", "l1")
    predicted = model.predict(test["prompt_text"].tolist(), test["response_text"].tolist())
    assert predicted.min() > K
    with pytest.raises(PredictorError, match="regression or rank"):
        train_refined_predictor(replace(ranker, config=replace(ranker.config, objective="quantile")),
                                train["prompt_text"].tolist(), train["response_text"].tolist(),
                                train["output_tokens"].to_numpy(np.int64), RefinedConfig(K, 500))

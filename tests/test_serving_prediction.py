"""Predictions inside the scheduler for clients that send none (econoserve.serving.prediction).

The policy scheduler, given a trained length model (``predictor`` option), predicts a response
length from the prompt token ids of every request that carries no ``predicted_output_tokens``;
a request-supplied prediction wins; each prediction's cost is measured inside the engine.
"""

from __future__ import annotations


import numpy as np
import pytest

from econoserve.predictor.data import LabeledPrompts
from econoserve.predictor.features import FeatureConfig
from econoserve.predictor.model import LengthPredictor, PredictorConfig, train_predictor
from test_serving_scheduler import _engine_request, _fake_step, _stepped_scheduler

pytestmark = [pytest.mark.serving]


def _predicted(scheduler, request_id: str) -> int | None:
    return scheduler._mirrors[request_id].policy.predicted_output_tokens


def test_requests_without_a_prediction_get_the_models_and_supplied_ones_win(model_dir, length_model):
    scheduler = _stepped_scheduler(model_dir, "econoserve", options={"predictor": str(length_model)})
    model = LengthPredictor.load(length_model)
    scheduler.add_request(_engine_request("short", 20, 8))
    scheduler.add_request(_engine_request("long", 300, 8))
    scheduler.add_request(_engine_request("supplied", 300, 8, predicted=5))
    expected = model.predict(None, np.array([20, 300]))
    assert _predicted(scheduler, "short") == expected[0] and _predicted(scheduler, "long") == expected[1]
    assert expected[1] > 2 * expected[0]  # the model reads the prompt, it is not a constant
    assert _predicted(scheduler, "supplied") == 5
    cost = scheduler.length_predictor.cost
    assert cost.num_requests == 2 and 0 < cost.max_s <= cost.total_s
    while scheduler.has_requests():
        _fake_step(scheduler)


def test_without_a_predictor_or_with_predictions_off_nothing_is_predicted(model_dir, length_model):
    plain = _stepped_scheduler(model_dir, "econoserve")
    plain.add_request(_engine_request("a", 20, 8))
    assert _predicted(plain, "a") is None and plain.length_predictor is None
    off = _stepped_scheduler(model_dir, "econoserve", options={"predictor": str(length_model), "predictions": "none"})
    off.add_request(_engine_request("a", 20, 8, predicted=7))
    assert _predicted(off, "a") is None and off.length_predictor.cost.num_requests == 0


@pytest.mark.realdata
def test_a_text_model_predicts_from_decoded_prompt_ids(model_dir, tmp_path):
    """A gpt2-tokenized text model sees the prompt text again: ids decode to the words it was trained on."""
    from econoserve.workload.tokenizer import load_tokenizer

    rng = np.random.default_rng(1)
    prompts = [("Write a long story about " if rng.random() < 0.5 else "Say one word about ") + topic
               for topic in rng.choice(["the sea", "a cat", "the moon", "coffee"], size=300)]
    lengths = np.array([400 if p.startswith("Write") else 3 for p in prompts])
    tokenizer = load_tokenizer("gpt2")
    data = LabeledPrompts(dataset="synthetic", part="train", tokenizer="gpt2", prompts=prompts,
                          prompt_tokens=tokenizer.count(prompts), source_index=np.arange(300),
                          targets={"reference": lengths})
    config = PredictorConfig(num_boost_round=30, num_threads=1,
                             features=FeatureConfig(tokenizer="gpt2", ngram_vocabulary_size=50, ngram_min_df=2))
    directory = train_predictor(data, config).save(tmp_path / "text-model")
    scheduler = _stepped_scheduler(model_dir, "econoserve", options={"predictor": str(directory)})
    from vllm import SamplingParams
    from vllm.v1.request import Request

    for name, text in (("story", "Write a long story about the sea"), ("word", "Say one word about the sea")):
        ids = tokenizer.encode([text])[0]  # what a client's prompt arrives as
        scheduler.add_request(Request(name, ids, SamplingParams(max_tokens=8, min_tokens=8, ignore_eos=True), None))
    assert _predicted(scheduler, "story") > 10 * _predicted(scheduler, "word")

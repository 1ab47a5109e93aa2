"""Predictions inside the scheduler for clients that send none (econoserve.serving.prediction).

The policy scheduler, given a trained length model (``predictor`` option), predicts a response
length from the prompt token ids of every request that carries no ``predicted_output_tokens``;
a request-supplied prediction wins; each prediction's cost is measured inside the engine. Given a
refined model (``refined_predictor``), each request that has generated the model's ``k`` tokens
unfinished is refined once, from its prompt and those tokens, and the decision log replays it.
"""

from __future__ import annotations


import numpy as np
import pytest

from econoserve.predictor.data import LabeledPrompts
from econoserve.predictor.features import FeatureConfig
from econoserve.predictor.model import LengthPredictor, PredictorConfig, train_predictor
from econoserve.predictor.refine import RefinedLengthPredictor
from econoserve.serving.decisions import (
    ArrivalRecord, DecisionLog, RefineRecord, UpdateRecord, read_decision_log, replay_decision_log,
)
from econoserve.serving.replay import trace_request_id
from test_serving_scheduler import _engine_request, _fake_step, _serve, _stepped_scheduler, _synthetic_trace

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


# --------------------------------------------------------------------- distributions
@pytest.fixture(scope="module")
def distribution_model(tmp_path_factory) -> str:
    """A length-only classification model (50-token buckets) on label = prompt tokens / 2 + 1."""
    tokens = np.random.default_rng(0).integers(4, 400, size=400)
    data = LabeledPrompts(dataset="synthetic", part="train", tokenizer="opt", prompts=None, prompt_tokens=tokens,
                          source_index=np.arange(400), targets={"reference": tokens // 2 + 1})
    config = PredictorConfig(objective="classification", bucket_width=50, num_boost_round=20, num_threads=1,
                             features=FeatureConfig(tokenizer="opt", use_text=False))
    return str(train_predictor(data, config).save(tmp_path_factory.mktemp("distribution-model") / "model"))


def test_a_distribution_model_gives_each_request_its_quantiles_and_the_log_replays(model_dir, tmp_path, length_model,
                                                                                   distribution_model):
    """The classifier's 16 equally likely lengths reach the policy (the point prediction still
    comes from ``predictor``), EconoServe's Gittins ordering reads them, and the replay, fed the
    logged quantiles, asks for exactly the batches executed."""
    options = {"predictor": str(length_model), "distribution_predictor": distribution_model,
               "policy_config": {"ordering_length": "gittins"}}
    scheduler = _stepped_scheduler(model_dir, "econoserve", options=options)
    classifier, point = LengthPredictor.load(distribution_model), LengthPredictor.load(length_model)
    prompts = {"short": 20, "long": 300, "middle": 150}
    for name, prompt_tokens in prompts.items():
        scheduler.add_request(_engine_request(name, prompt_tokens, 8))
    for name, prompt_tokens in prompts.items():
        request = scheduler._mirrors[name].policy
        (expected,) = classifier.predict_quantiles(None, np.array([prompt_tokens]), 16)
        assert request.predicted_output_quantiles == tuple(expected) and len(expected) == 16
        assert request.predicted_output_tokens == point.predict(None, np.array([prompt_tokens]))[0]
    quantiles = {name: scheduler._mirrors[name].policy.predicted_output_quantiles for name in prompts}
    assert np.median(quantiles["long"]) > 2 * np.median(quantiles["short"])
    assert scheduler.distribution_predictor.cost.num_requests == 3
    while scheduler.has_requests():
        _fake_step(scheduler)
    records = scheduler.decision_log.records
    assert [r.predicted_output_quantiles for r in records if isinstance(r, ArrivalRecord)] == list(quantiles.values())
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    log = DecisionLog(tmp_path / "decisions.jsonl")  # the JSON-lines round trip keeps them
    for record in records:
        log.add(record)
    log.close()
    assert read_decision_log(tmp_path / "decisions.jsonl") == records


def test_a_distribution_must_come_from_a_classification_model(model_dir, length_model):
    from econoserve.errors import PredictorError

    with pytest.raises(PredictorError, match="a regression model; a predicted distribution comes from a classification"):
        _stepped_scheduler(model_dir, "econoserve", options={"distribution_predictor": str(length_model)})


# --------------------------------------------------------------------- refinement
@pytest.mark.realdata
def test_requests_past_k_tokens_are_refined_once_and_the_policy_gets_the_value(model_dir, refined_model):
    """Stepped scheduler (every generated token is id 11): requests longer than ``k`` are refined
    exactly once, at ``k`` tokens, with the model's prediction from the decoded prompt and those
    ``k`` ids; requests of at most ``k`` tokens never; the log replays with the refinements."""
    scheduler = _stepped_scheduler(model_dir, "econoserve", options={"refined_predictor": str(refined_model)})
    k = scheduler.refiner.prefix_tokens
    lengths = {"short": k - 3, "at-k": k, "long": 3 * k, "longer": 5 * k}
    for name, length in lengths.items():
        scheduler.add_request(_engine_request(name, 20, length, predicted=10))
    policy_requests = {name: scheduler._mirrors[name].policy for name in lengths}
    while scheduler.has_requests():
        _fake_step(scheduler)

    model = RefinedLengthPredictor.load(refined_model)
    tokenizer = model.base.featurizer.tokenizer
    (expected,) = model.predict([tokenizer.decode(range(4, 24))], [tokenizer.decode([11] * k)])
    records = scheduler.decision_log.records
    refines = [r for r in records if isinstance(r, RefineRecord)]
    refined_ids = {policy_requests[name].request_id for name in ("long", "longer")}
    assert sorted(r.policy_request_id for r in refines) == sorted(refined_ids)
    assert all(r.num_output_tokens == k and r.predicted_output_tokens == expected for r in refines)
    for name, request in policy_requests.items():
        refined = request.request_id in refined_ids
        assert request.refined_after_tokens == (k if refined else None)
        assert request.predicted_output_tokens == (expected if refined else 10)
    for index, record in enumerate(records):  # right after the update of the step that produced the k-th token
        if isinstance(record, RefineRecord):
            before = records[index - 1]
            assert isinstance(before, (UpdateRecord, RefineRecord)) and before.step == record.step
    cost = scheduler.refiner.cost  # one call per step that refines
    assert cost.num_requests == 2 and cost.num_calls == len({r.step for r in refines}) and 0 < cost.max_s <= cost.total_s
    assert records[0].refine_after_tokens == k

    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    assert report.num_refined == 2 and report.num_finished == 4
    first = records.index(refines[0])  # tampered: refined after the next step, or twice
    after = next(i for i in range(first + 1, len(records)) if isinstance(records[i], UpdateRecord)) + 1
    late = records[:first] + records[first + 1:after] + [refines[0]] + records[after:]
    assert "has " + str(k + 1) in replay_decision_log(late).mismatch
    twice = records[:first + 1] + [refines[0]] + records[first + 1:]
    assert "refined already" in replay_decision_log(twice).mismatch


@pytest.mark.realdata
def test_refinement_needs_predictions_to_refine(model_dir, refined_model):
    from econoserve.serving.scheduler import UnsupportedConfigError

    for policy, options in (("econoserve-oracle", {}), ("econoserve", {"predictions": "none"})):
        with pytest.raises(UnsupportedConfigError, match="refined_predictor needs predictions 'request'"):
            _stepped_scheduler(model_dir, policy, options={"refined_predictor": str(refined_model), **options})


@pytest.mark.realdata
@pytest.mark.parametrize("probes", [False, True], ids=["plain", "probes-at-k"])
def test_refinement_runs_in_the_real_engine_and_replays(model_dir, tmp_path, refined_model, probes, monkeypatch):
    """The real CPU engine (random weights: the generated text, and so the refined values, mean
    nothing) with every request arriving at once (``time_scale=0``, a timing-independent
    schedule), without probes or with probes at the same ``k`` (the default's rule, in a
    wider lane): exact lengths, each request longer than ``k`` refined once at ``k`` tokens, none
    of the others; the pure-Python replay, fed the logged refinements, asks for exactly the
    batches vLLM ran, and the simulator, on the trace with the engine's refined values
    (``trace_with_served_refinements``), refines the same requests at ``k`` to the same values."""
    trace = _synthetic_trace(24, seed=9, max_prompt=160, max_output=40, prediction_error=0.5)
    k = RefinedLengthPredictor.load(refined_model).prefix_tokens
    outputs = dict(zip(trace.requests["request_id"], trace.requests["output_tokens"]))
    assert 0 < sum(n > k for n in outputs.values()) < len(outputs)
    policy_config = {"probe_output_tokens": k, "probe_share": 0.25} if probes else {"probe_output_tokens": None}
    result, records = _serve(model_dir, tmp_path, trace, "econoserve", kv_cache_tokens=1024, max_model_len=448,
                             time_scale=0.0, options={"refined_predictor": str(refined_model)},
                             policy_config=policy_config)
    requests = result.requests
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    rows = {r.policy_request_id: trace_request_id(r.engine_request_id) for r in records if isinstance(r, ArrivalRecord)}
    refines = [r for r in records if isinstance(r, RefineRecord)]
    assert sorted(rows[r.policy_request_id] for r in refines) == sorted(i for i, n in outputs.items() if n > k)
    assert all(r.num_output_tokens == k and r.predicted_output_tokens > k for r in refines)
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    assert report.num_refined == len(refines) and report.num_finished == len(outputs)
    assert (report.policy.stats.extra.get("probes", 0) > 0) == probes

    # the simulator, on the trace with the engine's refined values, refines the same requests alike
    from econoserve.policy.base import Policy
    from econoserve.serving.fidelity import EngineShape, simulation_config, trace_with_served_refinements
    from econoserve.sim import simulate

    simulated_refines = []
    original = Policy.refine_prediction

    def recording(policy, request, predicted_output_tokens):
        simulated_refines.append((int(trace.requests["request_id"].iloc[request.index]), request.num_output_tokens,
                                  predicted_output_tokens))
        original(policy, request, predicted_output_tokens)

    monkeypatch.setattr(Policy, "refine_prediction", recording)
    shape = EngineShape.from_run_config(result.config)
    config = simulation_config(shape, "econoserve", "roofline", model="opt-13b",
                               policy_config=policy_config)
    simulate(trace_with_served_refinements(trace, records), config)
    served = sorted((rows[r.policy_request_id], r.num_output_tokens, r.predicted_output_tokens) for r in refines)
    assert sorted(simulated_refines) == served

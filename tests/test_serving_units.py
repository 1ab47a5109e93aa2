"""Serving harness pieces that need no vLLM: prompts, request ids, tables, CLI, config, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from econoserve.cli import main
from econoserve.errors import UserError
from econoserve.serving.engine import EngineConfig, kv_bytes_per_token
from econoserve.serving.replay import ReplayRequest, RequestTimer, make_replay_requests, trace_request_id
from econoserve.results import ITERATION_SCHEMA, REQUEST_SCHEMA, empty_table, summarize, validate
from econoserve.serving.results import requests_table
from econoserve.serving.run import ServeSpec, scheduler_class, scheduler_options
from econoserve.serving.server import live_group_members
from econoserve.workload.trace import Trace


def _trace(num_requests: int = 6) -> Trace:
    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests) + 10,
            "arrival_time_s": np.arange(num_requests) * 0.5,
            "prompt_tokens": np.arange(num_requests) + 3,
            "output_tokens": np.arange(num_requests) + 1,
            "dataset": "synthetic",
        }
    )
    return Trace.from_frame(frame)


def _model_dir(tmp_path, **config):
    base = {"num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 256, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    return tmp_path


# --------------------------------------------------------------------- replay requests
def test_prompts_have_trace_lengths_and_are_seeded():
    trace = _trace()
    first = make_replay_requests(trace, vocab_size=50272, seed=3)
    again = make_replay_requests(trace, vocab_size=50272, seed=3)
    other = make_replay_requests(trace, vocab_size=50272, seed=4)
    assert [r.prompt_tokens for r in first] == trace.requests["prompt_tokens"].tolist()
    assert [r.max_tokens for r in first] == trace.requests["output_tokens"].tolist()
    assert first == again
    assert first[0].prompt_token_ids != other[0].prompt_token_ids
    assert all(4 <= t < 50272 for r in first for t in r.prompt_token_ids)


def test_time_scale_multiplies_arrivals():
    requests = make_replay_requests(_trace(), vocab_size=1000, time_scale=0.5)
    assert [r.arrival_time_s for r in requests] == pytest.approx(list(np.arange(6) * 0.25))
    assert all(r.arrival_time_s == 0 for r in make_replay_requests(_trace(), vocab_size=1000, time_scale=0))
    with pytest.raises(UserError, match="time scale"):
        make_replay_requests(_trace(), vocab_size=1000, time_scale=-1)


def test_request_longer_than_the_model_is_refused_by_id():
    with pytest.raises(UserError, match=r"trace request 14: prompt 7 \+ output 5 tokens exceed max_model_len 10 \(2 such"):
        make_replay_requests(_trace(), vocab_size=1000, max_model_len=10)


@pytest.mark.parametrize(
    "engine_id, expected",
    [
        ("trace-req-42-1a2b3c4d", 42),  # in-process engine: external id + vLLM's suffix
        ("cmpl-trace-req-42-0-1a2b3c4d", 42),  # OpenAI server: cmpl- prefix and choice index
        ("trace-req-7", 7),
        ("cmpl-0a1b-0-ffffffff", None),
    ],
)
def test_trace_request_id_from_engine_ids(engine_id, expected):
    assert trace_request_id(engine_id) == expected


# --------------------------------------------------------------------- tables
def test_request_table_latencies():
    request = ReplayRequest(request_id=1, arrival_time_s=1.0, prompt_token_ids=(5, 6, 7), max_tokens=3)
    timer = RequestTimer(request)
    timer.submitted(1.01)
    timer.tokens(1, 1.5)
    timer.tokens(1, 1.6)
    timer.tokens(1, 1.9)
    timer.finished(1.9)
    failed = RequestTimer(ReplayRequest(2, 1.2, (5,), 4))
    failed.submitted(1.2)
    failed.tokens(1, 1.4)
    failed.failed("HTTP 500: boom", 1.5)

    table = requests_table([timer, failed], {1: 2})
    validate(table, REQUEST_SCHEMA)
    ok = table.iloc[0]
    assert ok.ttft_s == pytest.approx(0.5)
    assert ok.jct_s == pytest.approx(0.9)
    assert ok.mean_tbt_s == pytest.approx(0.2)
    assert ok.normalized_latency_s == pytest.approx(0.3)
    assert ok.num_preemptions == 2 and ok.status == "finished" and ok.rejection_reason == ""
    assert ok.replica == 0 and ok.submit_time_s == pytest.approx(1.01)
    bad = table.iloc[1]
    assert bad.status == "failed" and bad.rejection_reason == "HTTP 500: boom" and bad.generated_tokens == 1

    summary = summarize(table, empty_table(ITERATION_SCHEMA), 64)
    assert summary["num_requests"] == 2 and summary["completed"] == 1 and summary["failed"] == 1
    assert summary["rejected"] == 0
    assert summary["mean_jct_s"] == pytest.approx(0.9)
    assert summary["preempted_fraction"] == pytest.approx(0.5)


# --------------------------------------------------------------------- engine configuration
def test_kv_bytes_per_token_counts_keys_values_layers_and_kv_heads(tmp_path):
    assert kv_bytes_per_token(_model_dir(tmp_path), "float32") == 2 * 4 * 256 * 4
    assert kv_bytes_per_token(_model_dir(tmp_path, num_key_value_heads=1), "bfloat16") == 2 * 4 * 64 * 2


def test_engine_config_passes_scheduler_budgets_and_kv_size(tmp_path):
    config = EngineConfig(model=str(_model_dir(tmp_path)), kv_cache_tokens=1024, max_model_len=512, iteration_log="/x/steps.jsonl")
    kwargs = config.llm_kwargs()
    assert kwargs["scheduler_cls"] == "econoserve.serving.recording.RecordingScheduler"
    assert kwargs["async_scheduling"] is False
    assert kwargs["kv_cache_memory_bytes"] == 1024 * 2 * 4 * 256 * 4
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["additional_config"] == {"econoserve": {"iteration_log": "/x/steps.jsonl"}}
    args = config.server_args()
    assert args[args.index("--scheduler-cls") + 1] == kwargs["scheduler_cls"]
    assert json.loads(args[args.index("--additional-config") + 1]) == kwargs["additional_config"]
    default = EngineConfig(model=str(tmp_path), scheduler_cls=None, kv_cache_tokens=None).llm_kwargs()
    assert "scheduler_cls" not in default and "kv_cache_memory_bytes" not in default


@pytest.mark.parametrize(
    "field, value, message",
    [("backend", "tpu", "backend 'tpu'"), ("max_num_seqs", 0, "max_num_seqs is 0"), ("kv_cache_tokens", 2048, "leaves 2016 usable tokens")],
)
def test_engine_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        EngineConfig(model=str(tmp_path), **{field: value})


def test_scheduler_names():
    assert scheduler_class("vllm").endswith("RecordingScheduler")
    assert scheduler_class("econoserve") == "econoserve.serving.scheduler.EconoServeScheduler"
    assert scheduler_class("policy:sarathi") == "econoserve.serving.scheduler.PolicyScheduler"
    assert scheduler_options("policy:sarathi", {"token_budget": 256}) == {"policy": "sarathi", "policy_config": {"token_budget": 256}}
    assert scheduler_options("econoserve") == {"policy": "econoserve"} and scheduler_options("vllm") == {}
    with pytest.raises(UserError, match="takes no policy configuration"):
        scheduler_options("vllm", {"token_budget": 256})


def test_scheduler_options_check_the_latency_model_before_vllm_starts(tmp_path, capsys):
    from econoserve.sim.latency import FittedLatencyModel

    path = FittedLatencyModel(0.003, {"decode_tokens": 2e-4}, {}, "test").save(tmp_path / "fit.json")
    assert scheduler_options("econoserve", latency_model=path) == {"policy": "econoserve", "latency_model": str(path.resolve())}
    with pytest.raises(UserError, match="takes no latency_model"):
        scheduler_options("vllm", latency_model=path)
    trace = _trace()
    trace.write(tmp_path / "trace.parquet")
    status = main(["serve", "--trace", str(tmp_path / "trace.parquet"), "-o", str(tmp_path / "run"), "--model", "m",
                   "--scheduler", "econoserve", "--latency-model", str(tmp_path / "fit.csv")])
    assert status == 2 and capsys.readouterr().err.strip().endswith("fit.csv: no such latency table")
    with pytest.raises(UserError, match="unknown policy 'fifo' in 'policy:fifo'"):
        scheduler_class("policy:fifo")
    with pytest.raises(UserError, match="unknown scheduler 'fifo'"):
        scheduler_class("fifo")
    with pytest.raises(UserError, match="mode 'batch'"):
        ServeSpec(engine=EngineConfig(model="m"), mode="batch")


def test_http_body_asks_for_exact_lengths_and_carries_the_prediction():
    from econoserve.serving.client import ClientOptions, check_loopback, completion_body

    request = ReplayRequest(request_id=5, arrival_time_s=0.0, prompt_token_ids=(9, 8), max_tokens=4, predicted_output_tokens=6)
    body = completion_body(request, ClientOptions())
    assert body["prompt"] == [9, 8] and body["max_tokens"] == body["min_tokens"] == 4
    assert body["ignore_eos"] and body["stream"] and body["return_token_ids"]
    assert body["request_id"] == "trace-req-5" and body["vllm_xargs"] == {"predicted_output_tokens": 6}
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(UserError, match="only talks to loopback"):
        check_loopback("http://10.0.0.1:8000")


# --------------------------------------------------------------------- CLI
def test_cli_help_lists_serving_commands_without_vllm(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "profile-engine" in out


def test_cli_refuses_unknown_policy_and_bad_policy_config_on_one_line(tmp_path, capsys):
    base = ["serve", "--trace", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "run")]
    status = main([*base, "--scheduler", "policy:fifo"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "unknown policy 'fifo'" in err
    status = main([*base, "--scheduler", "econoserve", "--policy-config", "[1]"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "expected a JSON object" in err


# --------------------------------------------------------------------- process groups
def test_live_group_members_sees_a_process_group_until_it_is_killed():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert child.pid in live_group_members(child.pid)
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    deadline = time.monotonic() + 5
    while live_group_members(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group_members(child.pid) == []


def test_summary_json_is_strict_json_even_with_nothing_completed(tmp_path):
    from econoserve.serving.results import ReplayResult

    timer = RequestTimer(ReplayRequest(0, 0.0, (5,), 2))
    timer.failed("HTTP 500: boom", 0.0)
    table = requests_table([timer], {})
    empty = empty_table(ITERATION_SCHEMA)
    ReplayResult(table, empty, summarize(table, empty, 64), {"x": float("nan")}).write(tmp_path)
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON {c}")}
    summary = json.loads((tmp_path / "summary.json").read_text(), **strict)
    config = json.loads((tmp_path / "config.json").read_text(), **strict)
    assert summary["completed"] == 0 and summary["mean_jct_s"] is None and config["x"] is None


# --------------------------------------------------------------------- notebook 04's regimes and Figure 15
def test_scaled_lengths_fit_the_context_and_keep_their_order():
    from econoserve.serving.study import REGIMES, scale_lengths

    frame = pd.DataFrame({"request_id": range(4), "arrival_time_s": [0.0, 0.1, 0.2, 0.3],
                          "prompt_tokens": [10, 400, 3000, 1], "output_tokens": [20, 900, 50, 1], "dataset": "x",
                          "predicted_output_tokens": [25, 800, 4000, 1]})
    scaled = scale_lengths(Trace.from_frame(frame), 0.5, max_model_len=1024).requests
    assert scaled["prompt_tokens"].tolist() == [5, 200, 512, 1]  # rounded up, >= 1, at most half the context
    assert scaled["output_tokens"].tolist() == [10, 450, 25, 1]
    assert scaled["predicted_output_tokens"].tolist() == [13, 400, 512, 1]  # clipped to what the prompt leaves
    assert (scaled["prompt_tokens"] + scaled["output_tokens"] <= 1024).all()
    refined = Trace.from_frame(frame).with_refinements([30, 700, 4000, 2], refine_after_tokens=16)
    scaled = scale_lengths(refined, 0.5, max_model_len=1024).requests
    assert scaled["refine_after_tokens"].tolist() == [8] * 4
    assert scaled["refined_output_tokens"].tolist() == [15, 350, 512, 1]
    assert REGIMES["kv-bound"].kv_cache_tokens < REGIMES["light-load"].kv_cache_tokens
    with pytest.raises(UserError, match="length scale"):
        scale_lengths(Trace.from_frame(frame), 0, max_model_len=1024)


def test_a_regime_has_a_rate_or_a_load_and_an_override_replaces_the_other():
    from econoserve.serving.study import REGIMES, StudyRegime, study_setting

    assert REGIMES["kv-bound"].load is not None and REGIMES["light-load"].rate_rps is not None
    fixed = study_setting("kv-bound", rate_rps=2.0, num_requests=None)
    assert (fixed.rate_rps, fixed.load, fixed.num_requests) == (2.0, None, REGIMES["kv-bound"].num_requests)
    relative = study_setting("light-load", load=0.5)
    assert (relative.rate_rps, relative.load) == (None, 0.5)
    for bad in ({"rate_rps": 2.0, "load": 0.5}, {"load": -1.0}, {"rate_rps": float("inf")}):
        with pytest.raises(UserError, match="rate|load"):
            study_setting("kv-bound", **bad)
    with pytest.raises(UserError, match="either a rate or a load"):
        StudyRegime("alpaca", num_requests=8, kv_cache_tokens=8192, max_model_len=2048)
    with pytest.raises(UserError, match="regime 'nope'"):
        study_setting("nope")
    engine = REGIMES["kv-bound"].engine(max_num_seqs=8)  # the regime's cache and context, the other options given
    assert (engine.kv_cache_tokens, engine.max_model_len, engine.max_num_seqs) == (2048, 1024, 8)


def test_a_load_sets_the_rate_from_the_engines_measured_capacity(tmp_path, monkeypatch):
    """The capacity is measured by serving every request of the trace at once under the study's
    first scheduler (once per inputs; its throughput is the capacity). ``at_load`` rescales the
    arrivals to ``load`` x capacity, keeping the requests, their order and their spacing, and
    records the rate in the trace's spec. The simulated capacity (a burst on a latency model)
    scales with the step times: steps twice as slow halve it exactly."""
    from dataclasses import replace

    from econoserve.serving import study as study_module
    from econoserve.serving.study import EngineOptions, ServingStudy, at_load, engine_capacity_rps
    from econoserve.sim.latency import FittedLatencyModel

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"request_id": range(40), "arrival_time_s": np.cumsum(rng.exponential(0.5, 40)),
                          "prompt_tokens": rng.integers(16, 400, 40), "output_tokens": rng.integers(1, 200, 40),
                          "dataset": "x"})
    frame["predicted_output_tokens"] = frame["output_tokens"]
    path = Trace.from_frame(frame, {"spec": {"rate_rps": 2.0}}).write(tmp_path / "trace.parquet")
    served = []

    def fake_serve(study, arguments):  # the engine: records what it serves, reports 3.5 req/s
        served.append((arguments[arguments.index("--scheduler") + 1],
                       Trace.read(arguments[arguments.index("--trace") + 1]).requests))
        out = Path(arguments[arguments.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"throughput_rps": 3.5}))

    monkeypatch.setattr(study_module, "run_econoserve", fake_serve)
    study = ServingStudy(trace_path=path, output_dir=tmp_path / "out", load=0.8, schedulers=("vllm", "econoserve"),
                         engine=EngineOptions(kv_cache_tokens=2048, max_model_len=1024))
    capacity = study_module.measured_capacity_rps(study, log=lambda _: None)
    assert capacity == 3.5 and study_module.measured_capacity_rps(study, log=lambda _: None) == 3.5
    assert len(served) == 1 and served[0][0] == "vllm"  # served once, under the first scheduler
    burst = served[0][1]
    assert (burst["arrival_time_s"] == 0).all()
    pd.testing.assert_frame_equal(burst.drop(columns="arrival_time_s"), Trace.read(path).requests.drop(columns="arrival_time_s"))

    trace = Trace.read(path)
    rescaled_study = at_load(study, capacity, log=lambda _: None)
    assert rescaled_study.load is None and rescaled_study.trace_path != path
    rescaled = Trace.read(rescaled_study.trace_path)
    np.testing.assert_allclose(rescaled.requests["arrival_time_s"], trace.requests["arrival_time_s"] * 2.0 / (0.8 * 3.5))
    pd.testing.assert_frame_equal(rescaled.requests.drop(columns="arrival_time_s"),
                                  trace.requests.drop(columns="arrival_time_s"))
    assert rescaled.metadata["spec"]["rate_rps"] == pytest.approx(0.8 * 3.5)
    with pytest.raises(UserError, match="no load"):  # a study without a load serves its trace as it is
        at_load(replace(study, load=None), capacity)
    with pytest.raises(UserError, match="needs the engine's capacity"):
        at_load(study, 0.0)
    with pytest.raises(UserError, match="load"):
        replace(study, load=0.0)
    bare = Trace.from_frame(frame).write(tmp_path / "bare.parquet")  # no spec: no rate to rescale from
    with pytest.raises(UserError, match="bare.parquet: the trace records no arrival rate"):
        at_load(replace(study, trace_path=bare), capacity)

    coefficients = {"prefill_tokens": 1e-4, "decode_tokens": 2e-4, "context_tokens": 1e-6}
    fast = FittedLatencyModel(0.005, coefficients).save(tmp_path / "fast.json")
    slow = FittedLatencyModel(0.010, {k: 2 * v for k, v in coefficients.items()}).save(tmp_path / "slow.json")
    assert engine_capacity_rps(trace, study, fast) == pytest.approx(2 * engine_capacity_rps(trace, study, slow), rel=1e-9)


def test_a_study_serves_and_simulates_a_configured_policy_by_its_spec(tmp_path):
    """``econoserve[knob=value]`` in a study: served with ``--policy-config`` and simulated with the
    same overrides, in a directory of its own; vLLM's own scheduler takes none."""
    from econoserve.serving.study import ServingStudy, _safe, _simulation, serve_arguments

    spec = "econoserve[ordering_promotion_wait_s=5,ordering_prompt_weight=0]"
    study = ServingStudy(trace_path=tmp_path / "trace.parquet", output_dir=tmp_path, schedulers=("vllm", spec))
    arguments = serve_arguments(study, spec, tmp_path / "run")
    flag = arguments.index("--policy-config")
    assert arguments[arguments.index("--scheduler") + 1] == "econoserve"
    assert json.loads(arguments[flag + 1]) == {"ordering_promotion_wait_s": 5, "ordering_prompt_weight": 0}
    assert "--policy-config" not in serve_arguments(study, "vllm", tmp_path / "run")
    config = _simulation(study, spec, tmp_path / "model.json")
    assert config.scheduler == "econoserve" and config.policy_config["ordering_promotion_wait_s"] == 5
    assert _simulation(study, "vllm", tmp_path / "model.json").scheduler == "vllm-chunked"
    assert _safe(spec) == "econoserve-ordering_promotion_wait_s-5-ordering_prompt_weight-0" != _safe("econoserve")
    with pytest.raises(UserError, match="takes no policy configuration"):
        ServingStudy(trace_path=tmp_path / "trace.parquet", output_dir=tmp_path, schedulers=("vllm[x=1]",))


def test_a_study_with_profile_estimates_gives_the_drop_in_its_fitted_model(tmp_path):
    """``profile_estimates``: every policy run is served with ``--latency-model`` = the study's
    fitted profile; vLLM's own scheduler, and a study without it, get none."""
    from dataclasses import replace

    from econoserve.serving.study import LATENCY_MODEL_FILE, ServingStudy, serve_arguments

    study = ServingStudy(trace_path=tmp_path / "trace.parquet", output_dir=tmp_path, profile_estimates=True)
    with pytest.raises(UserError, match="no fitted profile for the drop-in"):
        serve_arguments(study, "econoserve", tmp_path / "run")
    (tmp_path / LATENCY_MODEL_FILE).write_text("{}")
    for spec in ("econoserve", "econoserve[ordering_prompt_weight=0]", "policy:sarathi"):
        arguments = serve_arguments(study, spec, tmp_path / "run")
        assert arguments[arguments.index("--latency-model") + 1] == str(tmp_path / LATENCY_MODEL_FILE)
    assert "--latency-model" not in serve_arguments(study, "vllm", tmp_path / "run")
    assert "--latency-model" not in serve_arguments(replace(study, profile_estimates=False), "econoserve", tmp_path / "run")


@pytest.mark.realdata
@pytest.mark.slow
def test_study_trace_with_a_trained_predictor_draws_only_held_out_requests(tmp_path):
    """Notebook 04's default trace: the dataset's own predictor, trained on the training part,
    and requests only from the held-out part, each predicted by that model, scaled to the
    engine; built twice, it is the same trace (the second time from the cached model)."""
    from econoserve.experiments import PredictorTraining, ensure_predictor, make_plan, request_pool
    from econoserve.serving.study import StudyRegime, study_trace
    from econoserve.workload.datasets import load_requests

    training = PredictorTraining(max_train=200, num_boost_round=5)
    setting = StudyRegime("alpaca", num_requests=60, rate_rps=2.0, kv_cache_tokens=8192, max_model_len=2048)
    trace = study_trace(setting, predictor="train", tokenizer="gpt2", cache_dir=tmp_path, training=training)
    requests = trace.requests
    plan = make_plan("quick", datasets=["alpaca"], predictor="train", num_requests=60, sensitivity=False,
                     tokenizer="gpt2", predictor_training=training)
    held_out = set(request_pool("alpaca", plan, plan.deployments[0], with_text=True)["prompt_text"])
    everything = set(load_requests("alpaca", "gpt2")["prompt_text"])
    assert len(requests) == 60 and set(requests["prompt_text"]) <= held_out < everything
    model = ensure_predictor(plan, "alpaca", tmp_path)
    room = 2048 - requests["prompt_tokens"].to_numpy()
    expected = np.minimum(model.predict(requests["prompt_text"].tolist()), room)
    assert np.array_equal(requests["predicted_output_tokens"].to_numpy(), expected)
    assert (requests["prompt_tokens"] + requests["output_tokens"] <= 2048).all()
    again = study_trace(setting, predictor="train", tokenizer="gpt2", cache_dir=tmp_path, training=training)
    pd.testing.assert_frame_equal(again.requests, requests)


def test_rounds_are_compared_side_by_side_and_the_median_round_is_kept(tmp_path):
    """Each round's ratio is taken against the first scheduler of the *same* round, so a round
    that ran slow for everyone does not move the ratios; the kept round is the median one."""
    from econoserve.serving.study import ServingStudy, median_round, rounds_table

    jct = {"vllm": [2.0, 6.0, 3.0], "econoserve": [1.8, 5.4, 3.3]}  # round 1 ran 3x slower for both
    run_dirs = {}
    for scheduler, values in jct.items():
        run_dirs[scheduler] = []
        for round_index, mean_jct in enumerate(values):
            run_dir = tmp_path / scheduler / f"round-{round_index}"
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps(
                {"completed": 10, "mean_jct_s": mean_jct, "p99_jct_s": 2 * mean_jct, "throughput_rps": 1.0}))
            run_dirs[scheduler].append(run_dir)
    rounds = rounds_table(run_dirs)
    assert len(rounds) == 6 and set(rounds["round"]) == {0, 1, 2}
    mine = rounds[rounds["scheduler"] == "econoserve"].sort_values("round")
    assert np.allclose(mine["mean_jct_ratio"], [0.9, 0.9, 1.1]) and np.allclose(mine["throughput_ratio"], 1.0)
    assert (rounds.loc[rounds["scheduler"] == "vllm", "mean_jct_ratio"] == 1.0).all()
    assert median_round(rounds, "vllm") == 2 and median_round(rounds, "econoserve") == 2  # JCTs 3.0 / 3.3
    with pytest.raises(UserError, match="repeats"):
        ServingStudy(trace_path=tmp_path / "t.parquet", output_dir=tmp_path, repeats=0)


def test_a_served_run_is_reused_only_for_the_same_code(tmp_path, monkeypatch):
    """A real run is served once per inputs; the package's source is one of them, so a change of
    the policy's code or defaults serves the trace again instead of reusing the old run."""
    from econoserve.serving import study as study_module

    served = []

    def fake_serve(study, arguments):
        served.append(arguments)
        out = arguments[arguments.index("-o") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(study_module, "run_econoserve", fake_serve)
    trace_path = _trace().write(tmp_path / "trace.parquet")
    study = study_module.ServingStudy(trace_path=trace_path, output_dir=tmp_path / "out")
    first = study_module.serve(study, "econoserve", log=lambda _: None)
    assert study_module.serve(study, "econoserve", log=lambda _: None) == first and len(served) == 1
    monkeypatch.setattr(study_module, "code_digest", lambda: "other code")
    study_module.serve(study, "econoserve", log=lambda _: None)
    assert len(served) == 2


def test_figure15_shows_kv_reservations_and_preemptions():
    import matplotlib

    matplotlib.use("Agg")
    from econoserve.analysis.serving_figures import figure15
    from econoserve.results import kv_reserved_fraction

    requests = pd.DataFrame({"request_id": [0, 1], "status": "finished", "jct_s": [1.0, 2.0], "ttft_s": [0.1, 0.3],
                             "num_preemptions": [2, 0]})
    steps = pd.DataFrame({"start_time_s": [0.0, 0.5, 1.0], "kv_blocks_used": [20, 50, 40], "num_preempted": [0, 1, 1],
                          "kv_blocks_reserved": [10, 20, 0], "kv_blocks_capacity": [100, 100, 100]})
    errors = pd.DataFrame({"scheduler": "econoserve", "request_id": [0, 1], "jct_s_real": [1.0, 2.0],
                           "jct_s_sim": [1.1, 1.8]})
    summary = pd.DataFrame({"scheduler": ["econoserve"], "sim_num_preemptions": [1]})
    assert kv_reserved_fraction(steps).tolist() == [0.1, 0.2, 0.0]
    figure = figure15({"econoserve": requests}, {"econoserve": steps}, errors, summary)
    kv_axis, preemption_axis = figure.axes[2], figure.axes[3]
    assert [line.get_label() for line in kv_axis.get_lines()] == ["econoserve: used", "econoserve: used + reserved"]
    assert [bar.get_height() for bar in preemption_axis.patches] == [2, 1]  # real, simulated


def test_linear_step_model_recovers_the_coefficients_of_a_linear_table():
    """The fit is checked on a table built from known coefficients, not on measured times."""
    from econoserve.serving.profiler import fit_linear_step_model

    rng = np.random.default_rng(0)
    prefill, decode, context = rng.integers(0, 512, 40), rng.integers(0, 64, 40), rng.integers(0, 8192, 40)
    table = pd.DataFrame({"prefill_tokens": prefill, "decode_tokens": decode, "context_tokens": context,
                          "step_time_s": 0.004 + 2e-5 * prefill + 1e-4 * decode + 3e-7 * context})
    model = fit_linear_step_model(table)
    assert np.allclose([model.intercept_s, model.per_prefill_token_s, model.per_decode_token_s, model.per_context_token_s],
                       [0.004, 2e-5, 1e-4, 3e-7], rtol=1e-6)
    assert model.r2 == pytest.approx(1.0) and model.median_relative_error < 1e-9
    with pytest.raises(UserError, match="at least 4"):
        fit_linear_step_model(table.head(3))


@pytest.mark.realdata
def test_a_length_models_tokenizer_must_fit_the_engine_models_vocabulary():
    """Equal sizes or a padded embedding (OPT's 50,272 rows for GPT-2's 50,257 ids) fit; another
    family's vocabulary does not (its prompt ids would decode to other text)."""
    from econoserve.errors import PredictorError
    from econoserve.serving.prediction import VOCAB_PADDING_IDS, check_tokenizer_fits
    from econoserve.workload.tokenizer import load_tokenizer

    gpt2, llama2 = load_tokenizer("gpt2"), load_tokenizer("llama2")
    for tokenizer, engine_vocab_size in ((gpt2, 50257), (gpt2, 50272), (gpt2, 50257 + VOCAB_PADDING_IDS), (llama2, 32000)):
        check_tokenizer_fits(tokenizer, engine_vocab_size, "model")
    for tokenizer, engine_vocab_size in ((gpt2, 32000), (gpt2, 50258 + VOCAB_PADDING_IDS), (llama2, 50272), (llama2, 128256)):
        with pytest.raises(PredictorError, match=f"model: the model reads '{tokenizer.name}' tokens"):
            check_tokenizer_fits(tokenizer, engine_vocab_size, "model")

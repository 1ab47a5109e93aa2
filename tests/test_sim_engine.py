"""The simulator's clock, outputs, rejections, latency models and catalogs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from econoserve.errors import UserError
from econoserve.results import ITERATION_SCHEMA, REQUEST_SCHEMA, validate
from econoserve.sim import (
    Deployment,
    FittedLatencyModel,
    RooflineLatencyModel,
    SimulationConfig,
    SimulationResult,
    get_gpu,
    get_model,
    simulate,
)
from econoserve.sim.latency import isolated_execution_times_s, saturating_token_budget
from econoserve.sim.synthetic import synthetic_trace, trace_from_lists

SUMMARY_KEYS = {
    "num_requests", "completed", "rejected", "throughput_rps", "output_tokens_per_s", "mean_jct_s", "p50_jct_s",
    "p99_jct_s", "mean_ttft_s", "mean_normalized_latency_s", "slo_attainment", "preempted_fraction",
    "mean_kvc_utilization", "mean_gpu_token_utilization", "scheduler_invocations", "scheduler_time_s",
}


def test_a_lone_request_takes_exactly_its_isolated_time():
    trace = trace_from_lists([2.0], [300], [50])
    result = simulate(trace, SimulationConfig(scheduler="vllm"))
    row = result.requests.iloc[0]
    latency = RooflineLatencyModel(SimulationConfig().deployment())
    prefill = latency.iteration_time_s(300, 0, 300, 300 * 301 / 2)
    assert row.ttft_s == pytest.approx(prefill, rel=1e-12)
    assert row.jct_s == pytest.approx(row.isolated_time_s, rel=1e-9)
    assert row.generated_tokens == 50 and row.slo_met
    assert len(result.iterations) == 50  # one prefill step, 49 decode steps
    assert result.iterations.start_time_s.iloc[0] == 2.0  # the clock jumped to the arrival
    steps = result.iterations.duration_s.to_numpy()
    assert row.mean_tbt_s == pytest.approx(steps[1:].mean())


def test_tbt_statistics_follow_token_times():
    trace = trace_from_lists([0.0, 0.0], [20, 20], [1, 6])
    result = simulate(trace, SimulationConfig(scheduler="vllm-chunked"))
    first, second = result.requests.iloc[0], result.requests.iloc[1]
    assert np.isnan(first.mean_tbt_s) and np.isnan(first.p99_tbt_s)
    ends = (result.iterations.start_time_s + result.iterations.duration_s).to_numpy()
    gaps = np.diff(ends[:6])
    assert second.mean_tbt_s == pytest.approx(gaps.mean())
    assert second.p99_tbt_s == pytest.approx(np.percentile(gaps, 99))


def test_rejections_are_recorded_with_reasons_never_dropped():
    trace = trace_from_lists([0.0, 0.1, 0.2, 0.3], [3000, 1500, 100, 100], [10, 1000, 10, 10])
    result = simulate(trace, SimulationConfig(scheduler="vllm", model="opt-13b"))  # context 2048
    requests = result.requests.set_index("request_id")
    assert requests.loc[0, "status"] == "rejected" and "exceeds the model's context" in requests.loc[0, "rejection_reason"]
    assert requests.loc[1, "status"] == "rejected" and "prompt + output" in requests.loc[1, "rejection_reason"]
    assert (requests.loc[[2, 3], "status"] == "finished").all()
    assert not requests.loc[[0, 1], "slo_met"].any()
    assert result.summary["rejected"] == 2 and result.summary["completed"] == 2

    tiny = simulate(trace_from_lists([0.0], [100], [200]), SimulationConfig(scheduler="sarathi", num_kv_blocks=10))
    assert tiny.requests.status.iloc[0] == "rejected"
    assert "KV blocks at full length" in tiny.requests.rejection_reason.iloc[0]


def test_outputs_round_trip_with_the_issue_columns(tmp_path):
    trace = synthetic_trace(40, rate_rps=4, seed=0)
    result = simulate(trace, SimulationConfig(scheduler="sarathi", seed=7))
    directory = result.write(tmp_path / "run")
    for name in ("requests.parquet", "iterations.parquet", "summary.json", "config.json"):
        assert (directory / name).is_file()
    validate(result.requests, REQUEST_SCHEMA)
    validate(result.iterations, ITERATION_SCHEMA)
    assert SUMMARY_KEYS <= set(result.summary)
    back = SimulationResult.read(directory)
    pd.testing.assert_frame_equal(back.requests, result.requests)
    pd.testing.assert_frame_equal(back.iterations, result.iterations)
    config = json.loads((directory / "config.json").read_text())
    assert config["simulation"]["scheduler"] == "sarathi" and config["simulation"]["seed"] == 7
    assert config["policy"]["config"]["token_budget"] == 512
    assert config["deployment"]["num_kv_blocks"] > 0 and config["latency_model"]["kind"] == "roofline"


def test_bad_configuration_is_a_user_error():
    trace = synthetic_trace(3)
    with pytest.raises(UserError, match="unknown GPU"):
        simulate(trace, SimulationConfig(gpu="v100"))
    with pytest.raises(UserError, match="unknown model"):
        simulate(trace, SimulationConfig(model="gpt-5"))
    with pytest.raises(UserError, match="slo-scale"):
        SimulationConfig(slo_scale=0)
    with pytest.raises(UserError, match="leaves no KV cache"):
        simulate(trace, SimulationConfig(model="llama-2-70b", gpu="a100-80gb", tensor_parallel=1))
    with pytest.raises(UserError, match="roofline"):
        simulate(trace, SimulationConfig(roofline={"compute_efficiency": 2.0}))


# --------------------------------------------------------------------- catalogs
def test_catalog_shapes_and_kv_capacity():
    llama70 = get_model("llama-2-70b")
    assert llama70.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert 68e9 < llama70.num_parameters < 70e9
    opt13 = get_model("OPT-13B")
    assert opt13.kv_bytes_per_token == 2 * 40 * 40 * 128 * 2
    assert 12.5e9 < opt13.num_parameters < 13.2e9
    a100 = get_gpu("a100-80gb")
    deployment = Deployment(opt13, a100)
    expected = (int(a100.memory_bytes * 0.9) - opt13.weight_bytes - 2 * 1024**3) // (opt13.kv_bytes_per_token * 16)
    assert deployment.num_kv_blocks == expected
    # more GPUs, more KV; TP must divide the KV heads
    assert Deployment(llama70, a100, tensor_parallel=8).num_kv_blocks > Deployment(llama70, a100, tensor_parallel=4).num_kv_blocks
    with pytest.raises(UserError, match="does not divide"):
        Deployment(llama70, a100, tensor_parallel=3)


# --------------------------------------------------------------------- latency models
def test_roofline_grows_with_every_feature_and_vectorises_exactly():
    latency = RooflineLatencyModel(Deployment(get_model("llama-2-13b"), get_gpu("h100-80gb"), tensor_parallel=2))
    base = latency.iteration_time_s(512, 16, 4000, 100000.0)
    assert latency.iteration_time_s(4096, 16, 4000, 100000.0) > base
    assert latency.iteration_time_s(512, 16, 400000, 100000.0) > base
    assert latency.iteration_time_s(512, 16, 4000, 1e9) > base
    scalars = [latency.iteration_time_s(p, d, c, a) for p, d, c, a in [(0, 1, 100, 100.0), (2048, 0, 2048, 2048 * 1024.5)]]
    vector = latency.iteration_time_s(np.array([0.0, 2048.0]), np.array([1.0, 0.0]), np.array([100.0, 2048.0]),
                                      np.array([100.0, 2048 * 1024.5]))
    assert vector.tolist() == scalars
    # H100 is faster than A100 for the same deployment
    a100 = RooflineLatencyModel(Deployment(get_model("llama-2-13b"), get_gpu("a100-80gb"), tensor_parallel=2))
    assert a100.iteration_time_s(512, 16, 4000, 100000.0) > base
    budget = saturating_token_budget(latency)
    assert 16 <= budget <= 16384


def test_fitted_model_recovers_a_linear_step_time(tmp_path):
    rng = np.random.default_rng(0)
    steps = pd.DataFrame({
        "num_prefill_tokens": rng.integers(0, 4000, 400),
        "num_decode_tokens": rng.integers(0, 200, 400),
        "num_context_tokens": rng.integers(0, 100000, 400),
    })
    steps["duration_s"] = 0.004 + 2e-5 * steps.num_prefill_tokens + 1e-4 * steps.num_decode_tokens + 3e-7 * steps.num_context_tokens
    path = tmp_path / "steps.csv"
    steps.to_csv(path, index=False)
    model = FittedLatencyModel.load(path)
    assert model.intercept_s == pytest.approx(0.004, rel=1e-6)
    assert model.coefficients["prefill_tokens"] == pytest.approx(2e-5, rel=1e-6)
    assert model.coefficients["context_tokens"] == pytest.approx(3e-7, rel=1e-6)
    assert model.fit_stats["r2"] > 0.999999
    saved = model.save(tmp_path / "fit.json")
    again = FittedLatencyModel.load(saved)
    assert again.iteration_time_s(100, 2, 300, 0.0) == pytest.approx(model.iteration_time_s(100, 2, 300, 0.0))
    # a simulation runs on the fitted model
    result = simulate(synthetic_trace(20, rate_rps=5), SimulationConfig(scheduler="vllm-chunked", latency_model=str(saved)))
    assert result.summary["completed"] == 20 and result.config["latency_model"]["kind"] == "fitted"


def test_fitted_model_approximates_the_roofline_on_simulated_steps():
    run = simulate(synthetic_trace(300, rate_rps=6, seed=4), SimulationConfig(scheduler="sarathi"))
    model = FittedLatencyModel.fit(run.iterations)
    assert model.fit_stats["mean_abs_pct_error"] < 15


def test_bad_latency_tables_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such latency table"):
        FittedLatencyModel.load(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="duration_s"):
        FittedLatencyModel.load(bad)


def test_isolated_times_are_prefill_plus_decodes():
    latency = RooflineLatencyModel(Deployment(get_model("opt-13b"), get_gpu("a100-40gb")))
    got = isolated_execution_times_s(latency, np.array([10, 200]), np.array([1, 4]), chunk_elements=2)
    expected_second = latency.iteration_time_s(200, 0, 200, 200 * 201 / 2) + sum(
        latency.iteration_time_s(0, 1, 200 + k, 200 + k) for k in range(1, 4)
    )
    assert got[0] == pytest.approx(latency.iteration_time_s(10, 0, 10, 55.0))
    assert got[1] == pytest.approx(expected_second)


def test_a_policy_that_never_schedules_is_an_error_not_a_hang():
    from econoserve.policy import POLICIES, Policy, SchedulerDecision
    from econoserve.sim import SimulationError

    class Idle(Policy):
        name = "idle-test"

        def _schedule(self, now_s):
            return SchedulerDecision()

    POLICIES[Idle.name] = Idle
    try:
        with pytest.raises(SimulationError, match="no step is possible"):
            simulate(trace_from_lists([0.0, 1.0], [10, 10], [3, 3]), SimulationConfig(scheduler="idle-test"))
    finally:
        del POLICIES[Idle.name]


def test_fitted_model_reads_a_serving_iteration_log(tmp_path):
    """The vLLM recording scheduler's JSON-lines log (kind=iteration records) calibrates the model."""
    lines = []
    for i in range(50):
        prefill, decode, context = (i * 37) % 900, i % 17, (i * 311) % 20000
        duration = 0.002 + 1e-5 * prefill + 2e-4 * decode + 1e-7 * context
        lines.append(json.dumps({"kind": "iteration", "iteration": i, "prefill_tokens": prefill,
                                 "decode_tokens": decode, "context_tokens": context, "duration_s": duration}))
        lines.append(json.dumps({"kind": "preemption", "request_id": "x", "iteration": i, "monotonic_s": 0.0}))
    path = tmp_path / "iterations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    model = FittedLatencyModel.load(path)
    assert model.fit_stats["num_steps"] == 50
    assert model.coefficients["decode_tokens"] == pytest.approx(2e-4, rel=1e-6)


def test_latency_fit_is_relative_and_drops_steps_disturbed_by_other_processes():
    """Steps measured on a shared machine: a third of them slowed 50x by another process."""
    from econoserve.sim.latency import FittedLatencyModel

    rng = np.random.default_rng(0)
    n = 300
    prefill = rng.integers(0, 1024, n).astype(float)
    decode = rng.integers(0, 48, n).astype(float)
    context = decode * rng.integers(32, 1024, n)
    true = 0.002 + 2e-5 * prefill + 1e-4 * decode + 2.5e-7 * context
    measured = true * rng.normal(1.0, 0.02, n)
    disturbed = rng.random(n) < 0.3
    measured[disturbed] = 0.25 * rng.uniform(0.8, 1.2, disturbed.sum())
    table = pd.DataFrame({"prefill_tokens": prefill, "decode_tokens": decode, "context_tokens": context,
                          "step_time_s": measured})
    model = FittedLatencyModel.fit(table)
    assert model.fit_stats["num_outliers_dropped"] >= disturbed.sum()
    assert model.intercept_s == pytest.approx(0.002, rel=0.1)
    assert model.coefficients["prefill_tokens"] == pytest.approx(2e-5, rel=0.1)
    assert model.coefficients["decode_tokens"] == pytest.approx(1e-4, rel=0.2)
    predicted = model.iteration_time_s(prefill, decode, context, 0.0)
    assert np.median(np.abs(predicted - true) / true) < 0.05

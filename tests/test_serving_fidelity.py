"""The simulator-vs-real comparison (no vLLM needed: it reads run tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from econoserve.errors import UserError
from econoserve.serving.fidelity import (EngineShape, error_summary, request_errors, served_limits, simulation_config,
                                         with_slo)
from econoserve.policy import EngineLimits, make_policy
from econoserve.sim import build_setup, simulate
from econoserve.sim.synthetic import synthetic_trace


def test_engine_shape_keeps_vllms_null_block_and_budgets():
    shape = EngineShape.from_run_config({"engine": {"max_num_seqs": 64, "max_num_batched_tokens": 2048,
                                                     "max_model_len": 2048, "block_size": 32,
                                                     "kv_cache_tokens": 8192}})
    assert shape.num_kv_blocks == 8192 // 32 - 1
    vllm = simulation_config(shape, "vllm", "roofline")
    assert vllm.scheduler == "vllm-chunked" and vllm.num_kv_blocks == 255 and vllm.block_size == 32
    assert (vllm.max_tokens_per_step, vllm.max_seqs_per_step) == (2048, 64)
    econoserve = simulation_config(shape, "econoserve", "roofline", predictions="oracle")
    assert econoserve.predictions == "oracle"
    # every policy runs under the engine's caps, as inside vLLM
    for config in (vllm, econoserve, simulation_config(shape, "sarathi", "roofline")):
        _, _, limits = build_setup(config)
        policy = make_policy(config.scheduler, limits)
        assert policy.max_num_seqs == 64
        assert policy.token_budget == (512 if config.scheduler == "sarathi" else 2048)
    with pytest.raises(UserError, match="engine field"):
        EngineShape.from_run_config({"engine": {"max_num_seqs": 64}})


def test_errors_are_relative_per_request_and_only_over_requests_done_in_both():
    real = pd.DataFrame({"request_id": [0, 1, 2, 3], "jct_s": [1.0, 2.0, 4.0, 9.0], "ttft_s": [0.1, 0.2, 0.4, 0.9],
                         "status": ["finished", "finished", "finished", "failed"]})
    simulated = pd.DataFrame({"request_id": [0, 1, 2, 3], "jct_s": [1.1, 1.0, 4.0, 9.0], "ttft_s": [0.1, 0.3, 0.2, 0.9],
                              "status": ["finished"] * 4})
    errors = request_errors(real, simulated)
    assert errors.request_id.tolist() == [0, 1, 2]
    np.testing.assert_allclose(errors.jct_error, [0.1, 0.5, 0.0])
    np.testing.assert_allclose(errors.ttft_error, [0.0, 0.5, 0.5])
    summary = error_summary(errors, num_requests=4)
    assert summary["compared"] == 3 and summary["num_requests"] == 4
    assert summary["median_jct_error"] == pytest.approx(0.1)
    assert summary["p90_jct_error"] == pytest.approx(np.percentile([0.1, 0.5, 0.0], 90))


def test_a_simulation_compared_with_itself_has_no_error():
    shape = EngineShape(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024, block_size=32, kv_cache_tokens=8192)
    trace = synthetic_trace(40, rate_rps=10, prompt_tokens=(8, 200), output_tokens=(1, 100), seed=2)
    result = simulate(trace, simulation_config(shape, "vllm", "roofline", model="opt-13b"))
    errors = request_errors(result.requests, result.requests)
    assert len(errors) == 40 and errors.jct_error.max() == 0.0


def test_real_runs_are_scored_against_the_simulators_slo():
    """with_slo fills a served run's SLO columns by the simulator's own definition: scoring a
    simulated run's requests again reproduces its isolated times, deadlines and SLO verdicts, under
    KV pressure (some requests miss) and at another SLO scale; unfinished requests never meet it."""
    shape = EngineShape(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024, block_size=32, kv_cache_tokens=2048)
    trace = synthetic_trace(60, rate_rps=40, prompt_tokens=(8, 300), output_tokens=(1, 200), seed=4)
    for slo_scale in (5.0, 2.0):
        config = simulation_config(shape, "vllm", "roofline", model="opt-13b", slo_scale=slo_scale)
        _, latency, _ = build_setup(config)
        simulated = simulate(trace, config).requests
        assert 0 < simulated.slo_met.mean() < 1  # the check sees both verdicts
        scored = with_slo(simulated.assign(isolated_time_s=np.nan, slo_deadline_s=np.nan, slo_met=False),
                          latency, slo_scale)
        np.testing.assert_allclose(scored.isolated_time_s, simulated.isolated_time_s, rtol=1e-12)
        np.testing.assert_allclose(scored.slo_deadline_s, simulated.slo_deadline_s, rtol=1e-12)
        assert (scored.slo_met == simulated.slo_met).all()
    failed = with_slo(simulated.assign(status="failed"), latency, 5.0)
    assert not failed.slo_met.any()
    with pytest.raises(UserError, match="slo_scale"):
        with_slo(simulated, latency, 0.0)


def test_a_drop_in_given_the_engines_latency_model_is_simulated_with_its_estimates(tmp_path):
    """A served run whose drop-in had ``econoserve.latency_model`` is simulated with that model's
    estimates at the engine's step budget, and its ``limits`` still win; a bad option is one line."""
    from econoserve.sim.latency import FittedLatencyModel, policy_time_estimates

    shape = EngineShape(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=1024, block_size=32,
                        kv_cache_tokens=2048)
    fitted = FittedLatencyModel(0.003, {"prefill_tokens": 4e-5, "decode_tokens": 2e-4, "context_tokens": 4e-7}, {}, "test")
    path = str(fitted.save(tmp_path / "fit.json"))
    options = {"policy": "econoserve", "latency_model": path, "limits": {"prefill_time_per_token_s": 5e-5}}
    given = served_limits({"engine": {"max_num_batched_tokens": 2048, "extra_options": options}})
    _, _, limits = build_setup(simulation_config(shape, "econoserve", "roofline", given, model="opt-13b"))
    expected = policy_time_estimates(fitted, 2048)
    assert limits.decode_time_per_step_s == expected["decode_time_per_step_s"] == pytest.approx(0.003 + 2e-4 + 512 * 4e-7)
    assert limits.decode_time_per_context_token_s == expected["decode_time_per_context_token_s"] == pytest.approx(4e-7)
    assert limits.prefill_time_per_token_s == 5e-5 and limits.saturating_token_budget == 2048
    with pytest.raises(UserError, match="econoserve.limits.max_seqs: the simulation copies only"):
        simulation_config(shape, "econoserve", "roofline", {"max_seqs": 3})
    with pytest.raises(UserError, match="gone.json: no such latency table"):
        served_limits({"engine": {"max_num_batched_tokens": 2048,
                                  "extra_options": {"latency_model": str(tmp_path / "gone.json")}}})


def test_a_served_policy_is_simulated_with_the_drop_ins_time_estimates_not_the_latency_models():
    """Without ``econoserve.latency_model`` or ``econoserve.limits``, the vLLM drop-in's
    policy estimates time with EngineLimits' defaults, and so must the simulated copy (the
    estimates set EconoServe's Ordering keys; a mismatch changes which request runs first)."""
    shape = EngineShape(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=1024, block_size=32,
                        kv_cache_tokens=2048)
    defaults = EngineLimits(num_kv_blocks=1)
    _, _, limits = build_setup(simulation_config(shape, "econoserve", "roofline", model="opt-13b"))
    assert (limits.prefill_time_per_token_s, limits.decode_time_per_step_s, limits.decode_time_per_context_token_s) == (
        defaults.prefill_time_per_token_s, defaults.decode_time_per_step_s, defaults.decode_time_per_context_token_s)
    assert limits.saturating_token_budget == 2048
    # the roofline's own estimates differ, so the test can fail
    _, _, own = build_setup(simulation_config(shape, "econoserve", "roofline", model="opt-13b",
                                              decode_time_per_step_s=None, prefill_time_per_token_s=None,
                                              decode_time_per_context_token_s=None))
    assert own.decode_time_per_step_s != defaults.decode_time_per_step_s
    assert own.decode_time_per_context_token_s != defaults.decode_time_per_context_token_s
    run_config = {"engine": {"extra_options": {"policy": "econoserve",
                                               "limits": {"decode_time_per_step_s": 0.01, "saturating_token_budget": 512}}}}
    given = served_limits(run_config)
    _, _, limits = build_setup(simulation_config(shape, "econoserve", "roofline", given, model="opt-13b"))
    assert (limits.decode_time_per_step_s, limits.saturating_token_budget) == (0.01, 512)
    assert limits.prefill_time_per_token_s == defaults.prefill_time_per_token_s
    assert served_limits({"engine": {"extra_options": {"policy": "econoserve"}}}) == {}
    with pytest.raises(UserError, match="num_kv_blocks"):
        simulation_config(shape, "econoserve", "roofline", {"num_kv_blocks": 3})

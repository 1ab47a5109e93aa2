"""Behaviour of each baseline policy, driven directly and through the simulator."""

from __future__ import annotations

import pytest
from policy_steps import step as _step

from econoserve.errors import UserError
from econoserve.policy import (
    EngineLimits,
    Request,
    RequestStatus,
    make_config,
    make_policy,
    parse_policy_spec,
    policy_names,
    with_engine_max_num_seqs,
)
from econoserve.sim import SimulationConfig, simulate
from econoserve.sim.synthetic import synthetic_trace, trace_from_lists


def _run(name, trace, **kwargs):
    return simulate(trace, SimulationConfig(scheduler=name, check_invariants=True, **kwargs))


# --------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    assert set(policy_names()) >= {"vllm", "vllm-chunked", "orca", "sarathi", "fastgen"}
    limits = EngineLimits(num_kv_blocks=100)
    with pytest.raises(UserError, match="unknown scheduler 'nope'"):
        make_policy("nope", limits)
    with pytest.raises(UserError, match="unknown option"):
        make_policy("sarathi", limits, {"chunk": 3})
    with pytest.raises(UserError, match="token_budget must be > 0"):
        make_policy("fastgen", limits, {"token_budget": 0})
    assert make_policy("sarathi", limits, {"token_budget": 256}).token_budget == 256


def test_a_policy_spec_is_a_name_and_overrides_that_configure_it():
    assert parse_policy_spec("sarathi") == ("sarathi", {})
    name, overrides = parse_policy_spec("econoserve[ordering_prompt_weight=0,kvcpipe=curve,ordering_promotion_wait_s=2.5]")
    assert (name, overrides) == ("econoserve", {"ordering_prompt_weight": 0, "kvcpipe": "curve",
                                                "ordering_promotion_wait_s": 2.5})
    config = make_config(name, overrides)
    assert (config.ordering_prompt_weight, config.kvcpipe, config.ordering_promotion_wait_s) == (0, "curve", 2.5)
    assert parse_policy_spec("econoserve[]") == ("econoserve", {})
    for bad in ("econoserve[kvcpipe=curve", "econoserve[kvcpipe]", "econoserve[=3]"):
        with pytest.raises(UserError, match="scheduler 'econoserve"):
            parse_policy_spec(bad)


def test_inside_an_engine_a_policy_batches_what_the_engine_allows_unless_configured():
    for name in ("econoserve", "sarathi", "vllm-chunked"):
        assert with_engine_max_num_seqs(name, None, 512) == {"max_num_seqs": 512}
        assert with_engine_max_num_seqs(name, {"max_num_seqs": 8, "token_budget": 64}, 512) == {
            "max_num_seqs": 8, "token_budget": 64}
        assert make_policy(name, EngineLimits(num_kv_blocks=100, max_seqs_per_step=512),
                           with_engine_max_num_seqs(name, None, 512)).max_num_seqs == 512
    assert make_policy("sarathi", EngineLimits(num_kv_blocks=100, max_seqs_per_step=512)).max_num_seqs == 256
    with pytest.raises(UserError, match="unknown scheduler 'nope'"):
        with_engine_max_num_seqs("nope", None, 8)


def test_policies_never_see_the_true_length():
    request = Request(1, 0.0, 10, predicted_output_tokens=7)
    assert not hasattr(request, "output_tokens")
    # baselines ignore predictions: oracle and no predictions give identical runs
    trace = synthetic_trace(60, rate_rps=8, seed=3)
    for name in (n for n in policy_names() if not n.startswith("econoserve")):
        a = _run(name, trace, predictions="oracle", num_kv_blocks=300)
        b = _run(name, trace, predictions="none", num_kv_blocks=300)
        assert a.requests.drop(columns="predicted_output_tokens").equals(b.requests.drop(columns="predicted_output_tokens"))


# --------------------------------------------------------------------- vLLM
def test_vllm_prefill_first_never_mixes_and_chunked_does():
    trace = synthetic_trace(80, rate_rps=20, seed=1)
    prefill_first = _run("vllm", trace).iterations
    assert ((prefill_first.num_prefill_tokens == 0) | (prefill_first.num_decode_tokens == 0)).all()
    chunked = _run("vllm-chunked", trace).iterations
    assert ((chunked.num_prefill_tokens > 0) & (chunked.num_decode_tokens > 0)).any()


def test_vllm_preempts_most_recently_admitted_when_blocks_run_out():
    for name in ("vllm", "vllm-chunked"):
        policy = make_policy(name, EngineLimits(num_kv_blocks=6, block_size=4, max_model_len=64))
        true_output = {}
        for rid in range(3):
            policy.add_request(Request(rid, 0.0, 7))
            true_output[rid] = 30
        preempted = []
        for _ in range(20):
            decision = _step(policy, true_output)
            preempted.extend(decision.preempted)
            if preempted:
                break
        assert preempted, name
        victim = preempted[0]
        assert victim.request_id == 2  # admitted last
        assert victim.status == RequestStatus.WAITING and policy.waiting[0] is victim
        assert victim.num_computed_tokens == 0 and victim.num_preemptions == 1
        assert not policy.kv_cache.holds(victim.request_id)


def test_vllm_chunked_respects_its_token_budget_and_chunks_long_prompts():
    trace = trace_from_lists([0.0, 0.0], [1000, 300], [5, 5])
    iterations = _run("vllm-chunked", trace, policy_config={"token_budget": 256}).iterations
    tokens = iterations.num_prefill_tokens + iterations.num_decode_tokens
    assert tokens.max() <= 256
    assert iterations.num_prefill_tokens.iloc[0] == 256  # the long prompt is chunked


# --------------------------------------------------------------------- Orca
def test_orca_admits_fewer_concurrent_requests_than_vllm_under_the_same_kv():
    trace = trace_from_lists([0.0] * 40, [100] * 40, [100] * 40)
    kw = dict(num_kv_blocks=400, max_model_len=2048)
    orca = _run("orca", trace, **kw)
    vllm = _run("vllm", trace, **kw)
    assert orca.iterations.num_running.max() == 400 // (2048 // 16)  # 3 maximum-length reservations
    assert vllm.iterations.num_running.max() > 3 * orca.iterations.num_running.max()


def test_vllm_preempts_when_blocks_run_out_and_orca_never_does():
    trace = trace_from_lists([0.0] * 20, [50] * 20, [400] * 20)
    kw = dict(num_kv_blocks=100, max_model_len=1024)
    vllm = _run("vllm", trace, **kw)
    orca = _run("orca", trace, **kw)
    assert vllm.summary["num_preemptions"] > 0 and vllm.summary["completed"] == 20
    assert orca.summary["num_preemptions"] == 0 and orca.summary["completed"] == 20
    # Orca's reservations show up as reserved-but-unused KV
    assert orca.iterations.kv_blocks_reserved.max() > 0
    assert vllm.iterations.kv_blocks_reserved.max() == 0


def test_orca_rejects_when_one_reservation_exceeds_the_cache():
    trace = trace_from_lists([0.0, 1.0], [10, 10], [5, 5])
    result = _run("orca", trace, num_kv_blocks=50, max_model_len=2048)
    assert (result.requests.status == "rejected").all()
    assert result.requests.rejection_reason.str.contains("reserves 2048 tokens").all()


# --------------------------------------------------------------------- Sarathi-Serve
def test_sarathi_never_exceeds_budget_and_never_stalls_decodes():
    trace = trace_from_lists([0.0, 0.0, 0.05, 0.05], [100, 100, 1900, 1500], [300, 300, 20, 20])
    result = _run("sarathi", trace, policy_config={"token_budget": 128})
    iterations = result.iterations
    tokens = iterations.num_prefill_tokens + iterations.num_decode_tokens
    assert tokens.max() <= 128
    # while the long prompts are chunked in, the two early requests keep decoding every step
    mixed = iterations[(iterations.num_prefill_tokens > 0) & (iterations.start_time_s > 0.05)]
    assert len(mixed) >= (1900 + 1500) // 128
    assert (mixed.num_decode_tokens >= 2).all()


def test_sarathi_reserves_the_whole_prompt_at_admission():
    policy = make_policy("sarathi", EngineLimits(num_kv_blocks=100, block_size=16, max_model_len=4096),
                         {"token_budget": 64, "watermark_ratio": 0.0})
    policy.add_request(Request(0, 0.0, 1000))
    decision = _step(policy, {0: 5})
    assert decision.num_prefill_tokens == 64
    kv = policy.kv_cache
    assert kv.allocated_blocks(0) == 4 and kv.reserved_blocks(0) == 63 - 4


# --------------------------------------------------------------------- FastGen
def test_fastgen_fills_the_fixed_forward_size_by_splitting_and_fusing():
    trace = trace_from_lists([0.0] * 6, [1000, 300, 200, 100, 700, 900], [3] * 6)
    iterations = _run("fastgen", trace, policy_config={"token_budget": 512}).iterations
    tokens = (iterations.num_prefill_tokens + iterations.num_decode_tokens).to_numpy()
    total_prompt = 1000 + 300 + 200 + 100 + 700 + 900
    full = total_prompt // 512
    assert (tokens[:full] == 512).all()  # every forward pass is exactly the target size
    assert tokens.max() <= 512


# --------------------------------------------------------------------- invocation counting
def test_every_step_policies_count_every_iteration():
    trace = synthetic_trace(50, rate_rps=5, seed=2)
    for name in policy_names():
        if not make_policy(name, EngineLimits(num_kv_blocks=100)).decides_every_step:
            continue  # event-driven (EconoServe): see test_policy_econoserve.py
        result = _run(name, trace)
        assert result.summary["scheduler_invocations"] == result.summary["num_iterations"]
        assert result.summary["scheduler_time_s"] > 0

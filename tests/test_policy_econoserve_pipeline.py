"""EconoServe's KVCPipe for every request (``kvcpipe="all"``), its occupancy curve, overbooking
and Ordering's aging, on hand-built scenarios with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from policy_steps import step

from econoserve.policy import EngineLimits, Request, make_policy
from econoserve.policy.econoserve import (PRUNE_SLACK_ENTRIES, SLOWDOWN_CAP_MIN_REQUESTS, EconoServeConfig,
                                         expected_overrun_tokens, gittins_rank_tokens, released_kv_blocks,
                                         used_kv_blocks)
from econoserve.policy.kv_cache import KVCache
from econoserve.sim import SimulationConfig, simulate
from econoserve.sim.synthetic import trace_from_lists


def _policy(num_kv_blocks: int, budget: int = 4096, context_s: float = 0.0, max_model_len: int = 2048, **config):
    """EconoServe on a small cache, exact allocations; Ordering's keys are SLO slack alone
    (``ordering_prompt_weight`` 0), so the scenarios' keys can be worked by hand, and a step's
    prompt tokens are bounded by the token budget ``budget`` alone (no prefill cap)."""
    config = {"reserve_ratio": 0.0, "rl_padding": 0.0, "rl_bucket": 16, "kvcpipe": "all",
              "ordering_prompt_weight": 0.0, "prefill_decode_steps": None, **config}
    limits = EngineLimits(num_kv_blocks=num_kv_blocks, block_size=16, max_model_len=max_model_len,
                          saturating_token_budget=budget, prefill_time_per_token_s=1e-3, decode_time_per_step_s=0.05,
                          decode_time_per_context_token_s=context_s)
    return make_policy("econoserve", limits, config)


def _add(policy, request_id, prompt, predicted, arrival=0.0, refine_after_tokens=None) -> Request:
    request = Request(request_id, arrival, prompt, predicted_output_tokens=predicted,
                      refine_after_tokens=refine_after_tokens)
    assert policy.add_request(request) is None
    return request


def _run(policy, true_output, now: float = 0.0) -> list[int]:
    """Step until done; returns the preempted request ids."""
    preempted = []
    while policy.has_unfinished_requests():
        preempted += [r.request_id for r in step(policy, true_output, now, check_invariants=True).preempted]
    return preempted


# --------------------------------------------------------------------- the curve
def test_occupancy_peak_is_the_largest_sum_of_live_terms():
    kv = KVCache(100, block_size=4)
    # A: holds 2 blocks, 5 tokens cached, grows from now for 6 steps (5..10 tokens -> 2..3 blocks).
    # B: starts growing in 3 steps from 8 tokens for 4 steps (8..11 tokens -> 2..3 blocks), holds 2.
    peak = kv.occupancy_peak_blocks(np.array([0, 3]), np.array([5, 8]), np.array([6, 4]), np.array([2, 2]))
    by_step = [(-(-(5 + t) // 4) if t < 6 else 0) + (max(2, -(-(8 + max(0, t - 3)) // 4)) if t < 7 else 0)
               for t in range(10)]
    assert peak == max(by_step) == 6
    # within a horizon of 2 steps only t = 0, 1 count
    assert kv.occupancy_peak_blocks(np.array([0, 3]), np.array([5, 8]), np.array([6, 4]), np.array([2, 2]), 2) == 4
    assert kv.occupancy_peak_blocks(np.array([]), np.array([]), np.array([]), np.array([])) == 0


def test_a_prompt_is_admitted_by_the_curve_not_by_exact_allocations():
    # 10 blocks. Request 0: prompt 16, predicted 96 -> peaks at 16 + 95 = 111 tokens = 7 blocks.
    # Request 1: prompt 16, predicted 32 -> 47 tokens = 3 blocks. Exact allocations (7 + 3) fit;
    # request 2 (same as 1) does not fit them (13 > 10), but by the curve request 1 and 2 finish
    # long before request 0 grows: 2 + 3 + 3 <= 10 until they end.
    policy = _policy(10)
    for rid, predicted in ((0, 96), (1, 32), (2, 32)):
        _add(policy, rid, 16, predicted)
    true_output = {0: 96, 1: 32, 2: 32}
    first = step(policy, true_output, check_invariants=True)
    assert first.num_prefill_requests == 3  # every prompt admitted at once
    step(policy, true_output, check_invariants=True)
    kv = policy.kv_cache
    for request in policy.running:  # generating, KV allocated as used: no reservation
        assert kv.reserved_blocks(request.request_id) == 0
        assert kv.allocated_blocks(request.request_id) == kv.blocks_for(request.num_computed_tokens + 1)
    assert _run(policy, true_output) == []


def test_a_prompt_whose_curve_would_overflow_waits():
    # 9 blocks. Request 0 as above (7 blocks at its peak, from step ~80 on). Request 1: prompt 16,
    # predicted 96 too: both would hold 7 blocks near the end, 14 > 9: request 1 waits for 0.
    policy = _policy(9)
    _add(policy, 0, 16, 96)
    _add(policy, 1, 16, 96)
    true_output = {0: 96, 1: 96}
    assert step(policy, true_output).num_prefill_requests == 1
    assert [r.request_id for r in policy.pt_queue()] == [1]
    while policy.kv_cache.holds(0):
        assert not any(r.request_id == 1 for r in step(policy, true_output, check_invariants=True).scheduled)
    assert _run(policy, true_output) == []


def test_the_prefill_delay_lets_a_long_prompt_in_while_a_gt_still_grows():
    # 104 blocks, token budget 101. GT A (prompt 16, predicted 32) has 31 steps left and ends at
    # 46 tokens = 3 blocks. PT B (prompt 1600 = 100 blocks, predicted 64) needs 16 steps of
    # prefill (1600 / (101 - 1 decode)): with the delay it holds 1614 tokens = 101 blocks when A
    # peaks (3 + 101 = 104 fits) and 104 blocks after A is gone; taken to grow at once, it would
    # hold 1630 tokens = 102 blocks then (105 > 104): it waits.
    admitted = {}
    for delay in (True, False):
        policy = _policy(104, budget=101, prefill_delay=delay)
        _add(policy, 0, 16, 32)
        true_output = {0: 32, 1: 64}
        step(policy, true_output, check_invariants=True)  # A's prompt
        _add(policy, 1, 1600, 64, arrival=0.1)
        step(policy, true_output, check_invariants=True)  # A generates; B by the curve or not
        admitted[delay] = policy.kv_cache.holds(1)
        assert _run(policy, true_output) == []
    assert admitted == {True: True, False: False}


def test_overbooking_admits_past_the_cache_and_preemption_is_the_backstop():
    # Every prediction is 8 tokens; the truth is 200. The curve admits by the predictions, so the
    # requests outgrow the cache: preemption (by recompute) is the backstop, and still every
    # request finishes exactly once with its tokens, KV never over-committed.
    n = 12
    trace = trace_from_lists([0.0] * n, [40] * n, [200] * n, [8] * n)
    config = SimulationConfig(scheduler="econoserve", num_kv_blocks=60, max_model_len=512, check_invariants=True,
                              policy_config={"kvcpipe": "all", "overbooking": 0.5, "token_budget": 256})
    result = simulate(trace, config)
    assert (result.requests.status == "finished").all()
    assert (result.requests.generated_tokens == 200).all()
    assert result.requests.num_preemptions.sum() > 0
    assert (result.iterations.kv_blocks_allocated <= 60).all()


@pytest.mark.parametrize(("cap", "context_s", "admitted"), [(None, 0.05 / 160, 6), (3.0, 0.0, 6), (3.0, 0.05 / 160, 4),
                                                           (2.0, 0.05 / 160, 2)])
def test_the_slowdown_cap_uses_the_kv_whose_read_adds_s_minus_one_decode_steps(cap, context_s, admitted):
    # 100 blocks; 160 cached tokens add one isolated decode step (0.05 s). s = 3: 2 x 160 = 320
    # tokens = 20 blocks, four requests of 5 blocks at their peak (prompt 16, predicted 64 -> 79
    # tokens); s = 2: 10 blocks, two (the floor, two 80-token contexts, is 10 blocks too). No cap,
    # or context that costs nothing: all six.
    policy = _policy(100, context_s=context_s, max_model_len=80, decode_slowdown_cap=cap)
    assert policy.kv_cache.num_blocks == {6: 100, 4: 20, 2: 10}[admitted]
    for rid in range(6):
        _add(policy, rid, 16, 64)
    true_output = {rid: 64 for rid in range(6)}
    assert step(policy, true_output, check_invariants=True).num_prefill_requests == admitted
    assert _run(policy, true_output) == []


def test_the_slowdown_cap_never_leaves_less_than_two_full_context_requests():
    limits = EngineLimits(num_kv_blocks=1000, block_size=16, max_model_len=512, decode_time_per_step_s=0.05,
                          decode_time_per_context_token_s=0.05 / 16)
    assert used_kv_blocks(None, limits) == 1000
    assert used_kv_blocks(1.5, limits) == SLOWDOWN_CAP_MIN_REQUESTS * 512 // 16  # 8 tokens: the floor
    assert used_kv_blocks(101.0, limits) == 100  # 1600 tokens
    assert used_kv_blocks(1e6, limits) == 1000  # never more than the cache
    with pytest.raises(ValueError, match="decode_slowdown_cap"):
        EconoServeConfig(decode_slowdown_cap=1.0)
    with pytest.raises(ValueError, match="decode_time_per_context_token_s"):
        EngineLimits(num_kv_blocks=1, decode_time_per_context_token_s=-1e-9)


def test_under_the_slowdown_cap_preemption_is_the_backstop_and_the_cap_is_never_exceeded():
    # Every prediction is 8 tokens; the truth is 200. 560 cached tokens add one isolated decode
    # step: s = 2 leaves 35 of the 60 blocks (two 240-token contexts need 30). The requests
    # outgrow the 35 blocks and are preempted, each finishing once with its tokens, and the
    # policy never holds more than its 35 blocks.
    n = 12
    trace = trace_from_lists([0.0] * n, [40] * n, [200] * n, [8] * n)
    config = SimulationConfig(scheduler="econoserve", num_kv_blocks=60, max_model_len=240, check_invariants=True,
                              decode_time_per_step_s=0.02, decode_time_per_context_token_s=0.02 / 560,
                              policy_config={"decode_slowdown_cap": 2.0, "token_budget": 256})
    result = simulate(trace, config)
    assert (result.requests.status == "finished").all()
    assert (result.requests.generated_tokens == 200).all()
    assert result.requests.num_preemptions.sum() > 0
    assert result.iterations.kv_blocks_allocated.max() == 35
    assert result.config["policy"]["used_kv_blocks"] == 35


def test_a_prompt_waiting_w_releases_the_slowdown_cap_which_returns_once_the_kv_held_fits():
    # 100 blocks; 160 cached tokens add one isolated decode step, so s = 3 leaves 20 blocks: four
    # requests of 5 blocks at their peak (prompt 16, predicted 64 -> 79 tokens). Released
    # (r = 2, after W = 1 s without a first token) the policy uses 40.
    policy = _policy(100, context_s=0.05 / 160, max_model_len=80, decode_slowdown_cap=3.0,
                     slowdown_cap_release_wait_s=1.0, slowdown_cap_release=2.0)
    kv = policy.kv_cache
    assert kv.num_blocks == 20 and policy.describe()["released_kv_blocks"] == 40
    true_output = {rid: 64 for rid in range(7)}
    for rid in range(5):
        _add(policy, rid, 16, 64)
    assert step(policy, true_output, 0.0).num_prefill_requests == 4
    for _ in range(60):  # request 4 waits 0.9 s: the cap holds
        assert 4 not in {r.request_id for r in step(policy, true_output, 0.9, check_invariants=True).scheduled}
    assert kv.num_blocks == 20 and kv.num_committed_blocks == 4 * 5  # 16 + 60 tokens each
    # 1 s without a first token: released; not an event, so request 4 starts in the larger cache
    # at the next one, request 5's arrival
    assert 4 not in {r.request_id for r in step(policy, true_output, 1.0, check_invariants=True).scheduled}
    assert kv.num_blocks == 40 and policy.stats.extra["cap_releases"] == 1
    _add(policy, 5, 16, 64, arrival=1.0)
    assert {4, 5} <= {r.request_id for r in step(policy, true_output, 1.0, check_invariants=True).scheduled}
    # request 6 arrives; none has waited 1 s, but the KV held (> 20 blocks) does not fit the
    # capped cache: admissions wait while it drains, though the released cache has room
    _add(policy, 6, 16, 64, arrival=1.0)
    drained, draining_steps = False, 0
    while not drained:
        held = kv.num_committed_blocks + kv.num_global_reserve_free
        decision = step(policy, true_output, 1.1, check_invariants=True)
        started = 6 in {r.request_id for r in decision.scheduled}
        drained = kv.num_blocks == 20
        assert started == drained and drained == (held <= 20)
        assert drained or kv.num_blocks == 40
        draining_steps += not drained
    assert draining_steps >= 1  # requests 0-3 (5 blocks each) and 4-5 held 22 blocks at first
    assert _run(policy, true_output, 1.1) == []
    assert policy.stats.extra["cap_releases"] == 1


def test_the_released_cache_is_r_times_the_capped_one_at_most_the_whole_cache():
    limits = EngineLimits(num_kv_blocks=100, block_size=16, max_model_len=80, decode_time_per_step_s=0.05,
                          decode_time_per_context_token_s=0.05 / 160)

    def released(**config) -> int:
        return released_kv_blocks(EconoServeConfig(slowdown_cap_release_wait_s=5.0, **config), limits, 20)

    assert released() == 26  # r = 1.3
    assert released(slowdown_cap_release=1.01) == 21  # rounded up
    assert released(slowdown_cap_release=9.0) == 100
    assert released(slowdown_cap_release=None) == 100
    assert released_kv_blocks(EconoServeConfig(), limits, 20) == 20  # never released (the default)
    assert released_kv_blocks(EconoServeConfig(slowdown_cap_release_wait_s=5.0), limits, 100) == 100  # no cap binds
    for config in ({"decode_slowdown_cap": None, "slowdown_cap_release_wait_s": 5.0}, {}):  # nothing to release
        policy = _policy(100, context_s=0.05 / 160, **config)
        assert "released_kv_blocks" not in policy.describe() and "cap_releases" not in policy.stats.extra
    with pytest.raises(ValueError, match="slowdown_cap_release"):
        EconoServeConfig(slowdown_cap_release=1.0)
    with pytest.raises(ValueError, match="slowdown_cap_release_wait_s"):
        EconoServeConfig(slowdown_cap_release_wait_s=0.0)


@pytest.mark.parametrize("overbooking", [0.0, 0.5])
def test_more_overbooking_never_admits_fewer_prompts(overbooking):
    # 20 blocks, four requests (prompt 16, predicted 64 -> 79 tokens = 5 blocks each): the curve
    # admits all four at 0 % (4 x 5 = 20), one more at 50 % (up to 30 blocks).
    policy = _policy(20, overbooking=overbooking)
    for rid in range(6):
        _add(policy, rid, 16, 64)
    admitted = step(policy, {rid: 64 for rid in range(6)}, check_invariants=True).num_prefill_requests
    assert admitted == (4 if overbooking == 0.0 else 6)


def test_a_step_carries_at_most_the_prompt_tokens_of_k_decode_steps():
    # T_d / T_p = 0.05 s / 1 ms = 50 prompt tokens per isolated decode step. With k = 1.5 a step
    # carries at most 75 prompt tokens beside its decodes: a 400-token prompt goes in chunks of 75;
    # a token budget of 60 bounds the step below that (prompt tokens + decodes <= 60); with k unset
    # the token budget alone bounds the step.
    for k, saturating, prompt_cap in ((1.5, 4096, 75), (1.5, 60, 75), (None, 4096, 4096)):
        policy = _policy(1000, budget=saturating, prefill_decode_steps=k)
        assert policy.token_budget == saturating
        assert policy.prefill_cap_tokens == prompt_cap
        _add(policy, 0, 400, 8)
        _add(policy, 1, 16, 8, arrival=0.01)
        true_output = {0: 8, 1: 8}
        chunks = []
        while policy.has_unfinished_requests():
            decision = step(policy, true_output, check_invariants=True)
            assert decision.num_prefill_tokens <= min(prompt_cap, saturating)
            assert decision.num_prefill_tokens + decision.num_decode_tokens <= saturating
            chunks.append(decision.num_prefill_tokens)
        assert sum(chunks) == 416  # every prompt token once
        assert max(chunks) == min(prompt_cap, saturating, 416)
    with pytest.raises(ValueError, match="prefill_decode_steps"):
        EconoServeConfig(prefill_decode_steps=0.0)


# --------------------------------------------------------------------- ordering
def test_ordering_horizon_bounds_how_far_a_request_can_be_passed():
    # A long request (predicted 2000 tokens: a key far in the future) arrives at 0; short ones
    # (predicted 4: keys = arrival + 3.26 s) arrive later. Without a horizon every short one
    # passes it; with a horizon of 5 s its key is 5 s: the one that arrived 2 s later (key 5.26 s)
    # no longer passes it.
    for horizon, passed_by in ((None, [1, 2]), (5.0, [1])):
        policy = _policy(1000, ordering_horizon_s=horizon)
        _add(policy, 0, 16, 2000, arrival=0.0)
        _add(policy, 1, 16, 4, arrival=0.5)
        _add(policy, 2, 16, 4, arrival=2.0)
        order = [r.request_id for r in policy.pt_queue()]
        assert order[: order.index(0)] == passed_by


@pytest.mark.parametrize("prompt_weight", [0.0, 64.0])
def test_late_demotion_lets_requests_that_can_still_make_their_deadline_go_first(prompt_weight):
    # Request 0's latest start meeting its deadline, 5 * (0.016 + 0.2) - 0.216 = 0.864 s, is
    # already past at t = 10 s; request 1's (10.764 s) is not: with late_demotion_s = 0 request 1
    # is started first; the cache has room for one prompt only. With the KV cost (u = 64) the keys
    # lie 18.2 s after each arrival, so request 0's key is not past; lateness is still judged by
    # the slack alone.
    for late, first in ((None, 0), (0.0, 1)):
        policy = _policy(3, late_demotion_s=late, max_num_seqs=1, ordering_prompt_weight=prompt_weight)
        _add(policy, 0, 16, 4, arrival=0.0)
        _add(policy, 1, 16, 4, arrival=9.9)
        decision = step(policy, {0: 4, 1: 4}, now=10.0, check_invariants=True)
        assert [r.request_id for r in decision.scheduled] == [first]


def test_ordering_length_weight_shrinks_how_far_a_short_prediction_passes_earlier_arrivals():
    # Keys = arrival + (slo_scale - 1) * (prompt * T_p + w * A * T_d). Request 0 (arrival 0,
    # predicted 96) vs request 1 (arrival 10 s, predicted 16): with w = 1 request 1's key is
    # 10 + 4 * (0.016 + 0.8) = 13.26 s < 4 * (0.016 + 4.8) = 19.26 s, so it goes first; with
    # w = 0.25 the keys are 4 * (0.016 + 1.2) = 4.86 s and 10 + 4 * (0.016 + 0.2) = 10.86 s.
    for weight, order in ((1.0, [1, 0]), (0.25, [0, 1])):
        policy = _policy(1000, ordering_length_weight=weight)
        _add(policy, 0, 16, 96, arrival=0.0)
        _add(policy, 1, 16, 16, arrival=10.0)
        assert [r.request_id for r in policy.pt_queue()] == order
        assert policy.allocated_output_tokens(policy.pt_queue()[order.index(0)]) == 96  # allocation unchanged


def test_ordering_prompt_weight_puts_the_longer_prompt_of_two_equal_predictions_later():
    # Both predicted 32 tokens. Request 0 (prompt 512) arrived 2 s before request 1 (prompt 16).
    # By SLO slack (u = 0) the keys are 4 * (0.512 + 32 * 0.05) = 8.448 s and
    # 2 + 4 * (0.016 + 1.6) = 8.464 s: request 0 first. With u = 1 the keys use the KV-time
    # equivalent sqrt(32**2 + 2 * prompt * 32): 183.8 tokens for request 0 (key 38.8 s) against
    # 45.3 for request 1 (key 11.1 s): the long prompt goes later; allocations stay 32.
    for weight, order in ((0.0, [0, 1]), (1.0, [1, 0])):
        policy = _policy(1000, ordering_prompt_weight=weight)
        long_prompt = _add(policy, 0, 512, 32, arrival=0.0)
        _add(policy, 1, 16, 32, arrival=2.0)
        assert [r.request_id for r in policy.pt_queue()] == order
        assert [policy.allocated_output_tokens(r) for r in policy.pt_queue()] == [32, 32]
        equivalent = 32.0 if weight == 0 else (32**2 + 2 * 512 * 32) ** 0.5
        assert policy.pt_key(long_prompt) == pytest.approx(4 * (0.512 + equivalent * 0.05))
        assert not _run(policy, {0: 32, 1: 32})


def test_ordering_promotion_stops_later_arrivals_passing_a_request_that_waited_its_bound():
    # KV-cost ordering (u = 1): request 0 (prompt 512, predicted 32, arrival 0) has key 38.8 s
    # (see the test above); requests 1 and 2 (prompt 16, predicted 32) arrive at 2 s and 4 s with
    # keys 11.1 s and 13.1 s, so both pass it. With ordering_promotion_wait_s = 5 it is promoted
    # at 5 s: its key becomes 5 s, below theirs, and it starts first (one sequence at a time);
    # at 4.9 s it is not promoted yet.
    for wait, now, first in ((None, 5.1, 1), (5.0, 4.9, 1), (5.0, 5.1, 0)):
        policy = _policy(1000, ordering_prompt_weight=1.0, ordering_promotion_wait_s=wait, max_num_seqs=1)
        waiting = _add(policy, 0, 512, 32, arrival=0.0)
        _add(policy, 1, 16, 32, arrival=2.0)
        _add(policy, 2, 16, 32, arrival=4.0)
        decision = step(policy, {0: 32, 1: 32, 2: 32}, now=now, check_invariants=True)
        assert [r.request_id for r in decision.scheduled] == [first]
        promoted = wait is not None and now >= wait
        kv_time_key = 4 * (0.512 + (32**2 + 2 * 512 * 32) ** 0.5 * 0.05)
        assert policy.pt_key(waiting) == pytest.approx(5.0 if promoted else kv_time_key)
        assert [r.request_id for r in policy.pt_queue()] == [i for i in ([0, 1, 2] if promoted else [1, 2, 0]) if i != first]
        assert not _run(policy, {0: 32, 1: 32, 2: 32}, now=now)
    with pytest.raises(ValueError, match="ordering_promotion_wait_s"):
        EconoServeConfig(ordering_promotion_wait_s=0.0)


def _assert_promoted_at_5_1_s(policy, promoted: bool) -> None:
    """The promotion scenario above (u = 1, W = 5 s, one sequence at a time) at 5.1 s: request 0
    starts first, with key 5 s, if and only if it is ``promoted``."""
    waiting = _add(policy, 0, 512, 32, arrival=0.0)
    _add(policy, 1, 16, 32, arrival=2.0)
    _add(policy, 2, 16, 32, arrival=4.0)
    decision = step(policy, {0: 32, 1: 32, 2: 32}, now=5.1, check_invariants=True)
    assert [r.request_id for r in decision.scheduled] == [0 if promoted else 1]
    kv_time_key = 4 * (0.512 + (32**2 + 2 * 512 * 32) ** 0.5 * 0.05)
    assert policy.pt_key(waiting) == pytest.approx(5.0 if promoted else kv_time_key)


def test_promotion_gate_promotes_only_while_the_measured_slo_attainment_holds():
    # The scenario above at 5.1 s (request 0 waited past W = 5 s), after earlier requests finished
    # at 5.1 s (prompt 16, 4 output tokens: isolated estimate 0.016 + 4 * 0.05 = 0.216 s, SLO
    # 5 x that = 1.08 s): arrived at 5.0 s they met it (JCT 0.1 s), at 0.0 s they missed it (5.1 s).
    # They run in batches, one after another. The gate (promotion_attainment a over the last
    # promotion_window N finished) lets request 0 be promoted and go first only with N finished
    # and at least a * N of them met.
    cases = (  # (a, N, batches of arrivals of the finished requests, request 0 promoted)
        (1.0, 2, ((5.0, 5.0),), True),
        (1.0, 2, ((5.0, 0.0),), False),  # attainment 1/2 < 1
        (0.5, 2, ((5.0, 0.0),), True),
        (0.5, 3, ((5.0, 5.0),), False),  # the window is not full yet
        (0.5, 2, ((0.0, 0.0), (5.0, 5.0)), True),  # only the last N count
        (0.5, 2, ((5.0, 5.0), (0.0, 0.0)), False),
    )
    for attainment, window, batches, promoted in cases:
        policy = _policy(1000, ordering_prompt_weight=1.0, ordering_promotion_wait_s=5.0, max_num_seqs=1,
                         promotion_attainment=attainment, promotion_window=window)
        rid = 10
        for arrivals in batches:
            batch = {}
            for arrival in arrivals:
                _add(policy, rid, 16, 4, arrival=arrival)
                batch[rid] = 4
                rid += 1
            assert not _run(policy, batch, now=5.1)
        _assert_promoted_at_5_1_s(policy, promoted)


def test_idle_gate_promotes_only_while_the_engine_stood_idle_for_its_share_of_the_window():
    # The promotion scenario above at 5.1 s, after earlier requests ran alone, one step at each
    # of the given times (prompt 16, one output token a step; the last step finishes them and
    # the engine stands idle from its start to the next call). Window 10 s: [-4.9, 5.1].
    cases = (  # (promotion_idle_share x, step times of each earlier request, request 0 promoted)
        (0.1, (), False),  # never idle
        (0.5, ((-1.0,),), True),  # idle [-1, 5.1]: 6.1 s
        (0.5, ((1.0,),), False),  # idle [1, 5.1]: 4.1 s
        (0.55, ((-8.0,), (-2.0, 3.0)), False),  # idle [-4.9, -2] and [3, 5.1]: 5.0 s, busy between
        (0.45, ((-8.0,), (-2.0, 3.0)), True),
        (0.5, ((-12.0,), (-6.0, 3.0)), False),  # idle [-12, -6] lies before the window: 2.1 s
    )
    for share, runs, promoted in cases:
        policy = _policy(1000, ordering_prompt_weight=1.0, ordering_promotion_wait_s=5.0, max_num_seqs=1,
                         promotion_idle_share=share, promotion_idle_window_s=10.0)
        for rid, times in enumerate(runs, start=10):
            _add(policy, rid, 16, len(times), arrival=times[0])
            for now in times:
                assert policy.has_unfinished_requests()
                step(policy, {rid: len(times)}, now=now, check_invariants=True)
            assert not policy.has_unfinished_requests()
        _assert_promoted_at_5_1_s(policy, promoted)


@pytest.mark.parametrize("bad, match", [
    ({"promotion_attainment": 0.9}, "set ordering_promotion_wait_s"),
    ({"promotion_attainment": 0.0, "ordering_promotion_wait_s": 5.0}, r"\(0, 1\]"),
    ({"promotion_window": 0}, "promotion_window"),
    ({"promotion_idle_share": 0.5}, "set ordering_promotion_wait_s"),
    ({"promotion_idle_share": 1.5, "ordering_promotion_wait_s": 5.0}, r"\(0, 1\]"),
    ({"promotion_idle_window_s": 0.0}, "promotion_idle_window_s"),
])
def test_promotion_gates_reject_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        EconoServeConfig(**bad)


def test_a_shut_promotion_gate_keeps_the_promotion_heap_bounded_by_the_queue():
    # The gate never opens (a window of 10**6 finished requests): every PT becomes due 0.01 s
    # after its arrival and stays unpromoted. 400 requests arrive and finish one by one; the
    # heap of due promotions holds those of PTs still queued and at most 2 x the queue (2 PTs)
    # + PRUNE_SLACK_ENTRIES, and one more pushed before the next step prunes.
    policy = _policy(1000, ordering_promotion_wait_s=0.01, promotion_attainment=0.5, promotion_window=10**6)
    largest = 0
    for rid in range(400):
        now = rid * 1.0
        _add(policy, rid, 16, 4, arrival=now)
        _add(policy, 1000 + rid, 16, 4, arrival=now)  # a second one that waits behind it
        while policy.has_unfinished_requests():
            step(policy, {rid: 4, 1000 + rid: 4}, now=now + 0.5, check_invariants=True)
            largest = max(largest, len(policy._promotions))
    assert policy.stats.extra["promotions"] == 0
    assert largest <= 2 * 2 + PRUNE_SLACK_ENTRIES + 1


def test_backfill_lets_a_short_request_pass_a_prompt_the_curve_refused():
    # 10 blocks of 16 tokens. Request 0 (prompt 16, predicted 96) peaks at 111 tokens = 7 blocks;
    # request 1 (same, next in order) would make the peak 14 > 10 and is refused; request 2
    # (arrived later, predicted 16: 31 tokens = 2 blocks) fits beside request 0. Without backfill
    # it waits behind request 1; with backfill_output_tokens = 16 it starts in the same step.
    for backfill, started in ((None, [0]), (16, [0, 2])):
        policy = _policy(10, backfill_output_tokens=backfill, probe_output_tokens=None)
        _add(policy, 0, 16, 96, arrival=0.0)
        _add(policy, 1, 16, 96, arrival=0.0)
        _add(policy, 2, 16, 16, arrival=20.0)
        decision = step(policy, {0: 96, 1: 96, 2: 16}, now=20.0, check_invariants=True)
        assert [r.request_id for r in decision.scheduled] == started
        assert [r.request_id for r in policy.pt_queue()][0] == 1  # the refused PT keeps its place
        assert not _run(policy, {0: 96, 1: 96, 2: 16}, now=20.0)


# --------------------------------------------------------------------- the predicted distribution
def _add_distribution(policy, request_id, prompt, predicted, points, arrival=0.0) -> Request:
    request = Request(request_id, arrival, prompt, predicted_output_tokens=predicted,
                      predicted_output_quantiles=points)
    assert policy.add_request(request) is None
    return request


def test_gittins_rank_is_the_length_of_a_point_mass_and_favours_a_chance_of_ending_early():
    assert gittins_rank_tokens((100,)) == gittins_rank_tokens((100, 100, 100)) == 100.0
    # D = 10: E[min(S, 10)] = 10, P(S <= 10) = 0.5 -> 20; D = 500: 255 / 1 -> 255
    assert gittins_rank_tokens((10, 10, 500, 500)) == 20.0
    assert gittins_rank_tokens((10, 100, 200, 300)) == 40.0  # 10 / 0.25, below 61.75 and 120


def test_expected_overrun_counts_only_lengths_still_possible():
    points = (10, 100, 200, 300)
    assert expected_overrun_tokens(points, 128, 0) == (72 + 172) / 4
    assert expected_overrun_tokens(points, 128, 150) == (72 + 172) / 2  # it outlived 10 and 100
    assert expected_overrun_tokens(points, 128, 300) == 0.0
    assert expected_overrun_tokens(None, 128, 0) == 0.0


@pytest.mark.parametrize("ordering_length, order", [("point", [0, 1]), ("gittins", [1, 0]), ("quantile", [1, 0])])
def test_ordering_by_the_distribution_puts_a_likely_short_request_first(ordering_length, order):
    # Request 0: predicted 64, surely 64. Request 1: predicted 96 (its allocation is larger), but
    # half its mass is at 8 tokens: Gittins rank 16 (8 / 0.5), 25 % quantile 8 -> it goes first.
    policy = _policy(1000, ordering_length=ordering_length)
    _add_distribution(policy, 0, 16, 64, (64, 64, 64, 64))
    _add_distribution(policy, 1, 16, 96, (8, 8, 400, 400))
    assert [r.request_id for r in policy.pt_queue()] == order
    assert [policy.allocated_output_tokens(r) for r in policy.pt_queue()] == [[64, 96], [96, 64]][order[0]]


def test_overrun_reserve_keeps_the_expected_overrun_of_the_flight_free():
    # 9 blocks of 16 tokens; both requests: prompt 16, predicted 32 -> 47 tokens = 3 blocks at the
    # peak. Request 0 may run to 160 tokens (half its mass): expected overrun (128 + 128) / 4 = 64
    # tokens = 4 blocks. A fixed reserve of 0 admits both (6 <= 9); the overrun reserve keeps 4
    # blocks free, so request 1 waits (3 + 3 > 9 - 4) while request 0 (3 <= 9 - 4) starts.
    true_output = {0: 100, 1: 32}
    for rule, started in (("fixed", [0, 1]), ("overrun", [0])):
        policy = _policy(9, reserve_rule=rule, reserve_ratio=0.02 if rule == "overrun" else 0.0)
        assert policy.kv_cache.global_reserve_blocks == 0
        _add_distribution(policy, 0, 16, 32, (32, 32, 160, 160))
        _add_distribution(policy, 1, 16, 32, (32, 32, 32, 32))
        assert [r.request_id for r in step(policy, true_output, check_invariants=True).scheduled] == started
        _run(policy, true_output)
        assert not policy.has_unfinished_requests()


@pytest.mark.parametrize("allocation_length, first, outgrown", [("point", 32, 70 + 16), ("mean", 64, 96)])
def test_allocation_from_the_mean_of_the_lengths_a_request_can_still_have(allocation_length, first, outgrown):
    # Predicted 32, distribution (16, 48, 80, 112): mean 64. Past 70 tokens only 80 and 112 are
    # left (mean 96); the point rule gives one more bucket (16) beyond what was generated.
    policy = _policy(1000, allocation_length=allocation_length)
    request = _add_distribution(policy, 0, 16, 32, (16, 48, 80, 112))
    assert policy.allocated_output_tokens(request) == first
    request.num_output_tokens = 70
    assert policy.allocated_output_tokens(request) == outgrown
    request.num_output_tokens = 120  # outlived every point: one more bucket either way
    assert policy.allocated_output_tokens(request) == 120 + 16


# --------------------------------------------------------------------- refined predictions
def test_a_refined_prediction_resizes_the_allocation_and_frees_room_in_the_curve():
    # 10 blocks of 16. Request 0: prompt 16, predicted 96 -> its term peaks at 111 tokens = 7
    # blocks; request 1 (the same) would take the peak to 14 > 10 blocks: refused. Refined to 8
    # after 5 tokens, request 0's allocation is one bucket (16 tokens; peak 31 tokens = 2 blocks),
    # and request 1 starts at the next step.
    policy = _policy(10)
    first = _add(policy, 0, 16, 96)
    true_output = {0: 20, 1: 30}
    while first.num_output_tokens < 4:
        step(policy, true_output, check_invariants=True)
    assert policy.allocated_output_tokens(first) == 96
    second = _add(policy, 1, 16, 96)
    step(policy, true_output, check_invariants=True)
    assert policy.pt_queue() == [second]
    policy.refine_prediction(first, 8)
    assert (first.predicted_output_tokens, first.refined_after_tokens) == (8, 5)
    assert policy.allocated_output_tokens(first) == 16
    step(policy, true_output, check_invariants=True)
    assert policy.pt_queue() == [] and second.num_output_tokens == 1  # its prompt ran in this step
    assert _run(policy, true_output) == []


# --------------------------------------------------------------------- probes
def _until(policy, true_output, done) -> list:
    """Step until ``done()``; returns the decisions."""
    decisions = []
    while not done():
        assert policy.has_unfinished_requests()
        decisions.append(step(policy, true_output, check_invariants=True))
    return decisions


def test_a_short_answer_predicted_long_starts_at_once_as_a_probe_and_finishes_beside_the_long_one():
    # 10 blocks of 16 tokens, a probe lane of floor(0.3 x 10) = 3 blocks. Request 0 (prompt 16,
    # predicted 96) peaks at 111 tokens = 7 blocks <= 10 - 3. Request 1 is predicted 96 too
    # (7 + 7 > 7: the curve refuses it) but answers in 4 tokens. Without probes it waits for
    # request 0 to end; as a probe (16 + 16 - 1 tokens = 2 blocks <= 3) it starts in the first
    # step and finishes while request 0 still runs. Only a request the executor will refine by k
    # may probe: unrefined (or refined only after k) it waits as without probes.
    true_output = {0: 96, 1: 4}
    for probe, refine, started in ((None, 16, [0]), (16, None, [0]), (16, 32, [0]), (16, 16, [0, 1]), (32, 16, [0, 1])):
        policy = _policy(10, probe_output_tokens=probe, probe_share=0.3)
        _add(policy, 0, 16, 96, refine_after_tokens=refine)
        _add(policy, 1, 16, 96, refine_after_tokens=refine)
        assert [r.request_id for r in step(policy, true_output, check_invariants=True).scheduled] == started
        _until(policy, true_output, lambda: not policy.kv_cache.holds(1) and not policy.pt_queue())
        assert policy.kv_cache.holds(0) == (len(started) == 2)  # request 0 still runs
        assert not _run(policy, true_output)
    assert policy.stats.extra["probes"] == 1 and policy.stats.extra["probes_past_k"] == 0


def _probe_at_k(num_kv_blocks: int, **config):
    """Request 0 (prompt 16, predicted 96: 7 blocks at its peak) runs; request 1 (the same
    prediction, true 40 tokens) is refused by the curve, starts as a probe (k = 16, lane
    ``floor(0.3 x num_kv_blocks)``) and is stepped until it has generated its 16 tokens."""
    policy = _policy(num_kv_blocks, probe_output_tokens=16, probe_share=0.3, **config)
    _add(policy, 0, 16, 96, refine_after_tokens=16)
    request = _add(policy, 1, 16, 96, refine_after_tokens=16)
    true_output = {0: 96, 1: 40}
    _until(policy, true_output, lambda: request.num_output_tokens == 16)
    assert policy.stats.extra["probes"] == 1
    return policy, request, true_output


def test_a_probe_that_reaches_k_goes_on_as_a_plain_request_by_default():
    # At 16 tokens request 1 leaves the lane and keeps decoding (its full term is now in the
    # curve); KV is never over-committed, nobody is preempted.
    policy, request, true_output = _probe_at_k(10)
    step(policy, true_output, check_invariants=True)
    assert request in policy.running and policy.stats.extra["probes_past_k"] == 1
    assert policy.stats.extra["probe_pauses"] == 0
    assert not _run(policy, true_output)


def test_a_paused_probe_holds_its_kv_without_decoding_and_resumes_when_the_curve_admits_it():
    # probe_exit="pause": request 1 pauses at k = 16 holding 31 tokens = 2 blocks; its remaining
    # term (to 111 tokens = 7 blocks) does not fit beside request 0's (7 + 7 > 10), so it waits,
    # not decoding, until request 0 ends; then it finishes, nobody preempted.
    policy, request, true_output = _probe_at_k(10, probe_exit="pause")
    while policy.kv_cache.holds(0):
        assert request not in policy.running and request in policy.gt_queue()
        assert request.num_output_tokens == 16 and policy.kv_cache.allocated_blocks(1) == 2
        step(policy, true_output, check_invariants=True)
    assert not _run(policy, true_output)
    assert request.num_output_tokens == 40 and request.num_preemptions == 0
    assert policy.stats.extra["probe_pauses"] == policy.stats.extra["probe_resumes"] == 1


@pytest.mark.parametrize("num_kv_blocks", [10, 12])
def test_an_evicted_probe_frees_its_kv_at_k_and_finishes_once_with_every_token(num_kv_blocks):
    # probe_exit="evict": request 1 reaches k = 16 holding 31 tokens = 2 blocks; its remaining
    # term (to 111 tokens = 7 blocks) beside request 0's 7 exceeds the cache (10 or 12 blocks; the
    # lane counts, the probe is in it), so it is preempted by recompute: it holds nothing, keeps
    # its 16 tokens, and waits as a PT (no probe again) until request 0 ends; then it re-prefills
    # prompt + 16 tokens and generates the other 24, nobody else preempted.
    policy, request, true_output = _probe_at_k(num_kv_blocks, probe_exit="evict")
    evicted = step(policy, true_output, check_invariants=True)
    assert evicted.preempted == [request] and request not in evicted.scheduled
    assert not policy.kv_cache.holds(1) and policy.pt_queue() == [request]
    assert (request.num_output_tokens, request.num_computed_tokens, request.num_preemptions) == (16, 0, 1)
    decisions = _until(policy, true_output, lambda: not policy.pt_queue())
    assert not policy.kv_cache.holds(0)  # re-admitted only once request 0 ended
    assert decisions[-1].scheduled == [request] and decisions[-1].num_scheduled_tokens == [32]
    assert not _run(policy, true_output)
    assert request.num_output_tokens == 40 and request.num_preemptions == 1
    extra = policy.stats.extra
    assert (extra["probes"], extra["probes_past_k"], extra["probe_evictions"], policy.stats.preemptions) == (1, 1, 1, 1)


def test_an_evicting_probe_goes_on_when_the_curve_admits_its_refined_remaining_term():
    # 12 blocks, lane floor(0.3 x 12) = 3: request 1 was refused (7 + 7 > 12 - 3) and probes, and
    # unrefined it would be evicted at k (above). Refined to 16 at k, its remaining term (one more
    # token, 2 blocks) fits beside request 0's 7 blocks, so it goes on at once; it then outgrows
    # the refined prediction from the free pool.
    policy, request, true_output = _probe_at_k(12, probe_exit="evict")
    policy.refine_prediction(request, 16)
    decision = step(policy, true_output, check_invariants=True)
    assert request in decision.scheduled and not decision.preempted
    assert not _run(policy, true_output)
    assert request.num_output_tokens == 40 and request.num_preemptions == 0
    assert policy.stats.extra["probe_evictions"] == 0 and policy.stats.extra["probes_past_k"] == 1


@pytest.mark.parametrize("arrival, passes", [(0.0, True), (20.0, False)])
def test_a_paused_probe_is_passed_only_by_a_smaller_key(arrival, passes):
    # 12 blocks, lane floor(0.25 x 12) = 3. Request 1 pauses at k = 16 (key 0 + 4 x (0.016 +
    # 4.8) - 0.1 x 31 x 0.05 = 19.11 s); its remaining term does not fit beside request 0
    # (7 + 7 > 12). Request 2 (prompt 16, predicted 16: 31 tokens = 2 blocks) fits the curve
    # (7 + 2 + 2 <= 12 - 1) and the lane has no room for its probe (2 > 3 - 2). Arrived at 0 s
    # (key 3.26 s) it starts at once; at 20 s (key 23.26 s) it waits until request 1 resumes.
    policy = _policy(12, probe_output_tokens=16, probe_share=0.25, probe_exit="pause")
    _add(policy, 0, 16, 96, refine_after_tokens=16)
    paused = _add(policy, 1, 16, 96, refine_after_tokens=16)
    true_output = {0: 96, 1: 40, 2: 16}
    _until(policy, true_output, lambda: paused.num_output_tokens == 16)
    late = _add(policy, 2, 16, 16, arrival=arrival, refine_after_tokens=16)
    _until(policy, true_output, lambda: late in policy.running or paused in policy.running)
    assert (late in policy.running) == passes
    assert (paused in policy.gt_queue()) == passes
    assert not _run(policy, true_output)


def test_probe_knobs_are_checked():
    with pytest.raises(ValueError, match="probe_share"):
        EconoServeConfig(probe_output_tokens=16, probe_share=0.0)
    with pytest.raises(ValueError, match="backfill_output_tokens"):
        EconoServeConfig(probe_output_tokens=16, backfill_output_tokens=16)
    with pytest.raises(ValueError, match="probe_output_tokens"):
        EconoServeConfig(probe_output_tokens=0)
    with pytest.raises(ValueError, match="ordering_prompt_weight"):
        EconoServeConfig(ordering_prompt_weight=-0.5)
    with pytest.raises(ValueError, match="probe_exit"):
        EconoServeConfig(probe_output_tokens=16, probe_exit="stop")

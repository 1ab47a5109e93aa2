"""EconoServe's mechanisms on hand-built scenarios with known answers, and the simulator's
invariants under every ablation with predictions perturbed by up to +-100 %."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_steps import step

from econoserve.policy import EngineLimits, Request, RequestStatus, make_policy
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.econoserve import ECONOSERVE_POLICIES, EconoServeConfig
from econoserve.sim import WALL_CLOCK_COLUMNS, SimulationConfig, simulate
from econoserve.sim.engine import build_setup
from econoserve.sim.latency import saturating_token_budget
from econoserve.sim.synthetic import synthetic_trace, trace_from_lists

ECONOSERVE_NAMES = tuple(cls.name for cls in ECONOSERVE_POLICIES)


def _limits(num_kv_blocks: int, **kwargs) -> EngineLimits:
    kwargs.setdefault("saturating_token_budget", 4096)
    return EngineLimits(num_kv_blocks=num_kv_blocks, block_size=16, max_model_len=2048, **kwargs)


def _policy(num_kv_blocks: int, name: str = "econoserve", limits: dict | None = None, **config):
    # exact allocation, tail lending and the GT-only curve (kvcpipe="all", the default, is
    # covered by test_policy_econoserve_pipeline.py)
    config.setdefault("kvcpipe", "curve")
    config.setdefault("reserve_ratio", 0.0)
    config.setdefault("rl_padding", 0.0)
    config.setdefault("prefill_decode_steps", None)  # no prefill cap: the token budget bounds a step
    return make_policy(name, _limits(num_kv_blocks, **(limits or {})), config)


def _step(policy, true_output: dict[int, int], now: float = 0.0):
    return step(policy, true_output, now, check_invariants=True)


def _add(policy, request_id, prompt, predicted, arrival=0.0) -> Request:
    request = Request(request_id, arrival, prompt, predicted_output_tokens=predicted)
    assert policy.add_request(request) is None
    return request


# --------------------------------------------------------------------- SyncDecoupled
def test_gts_are_grouped_by_predicted_rl_bucket_with_exact_allocations():
    policy = _policy(1000, rl_bucket=32)
    predicted = [10, 20, 40, 50, 100, 30]  # buckets of 32 tokens: 1, 1, 2, 2, 4, 1
    requests = [_add(policy, i, 20, p) for i, p in enumerate(predicted)]
    true_output = {i: 1000 for i in range(len(predicted))}
    first = _step(policy, true_output)
    assert first.num_prefill_tokens == 120 and first.num_decode_tokens == 0  # PTs only
    assert len(policy.gt_queue()) == 6 and not policy.running  # prompts done: all wait as GTs
    _step(policy, true_output)
    groups = [policy.group_of(i) for i in range(6)]
    assert groups[0] == groups[1] == groups[5]
    assert groups[2] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
    kv = policy.kv_cache
    for request, p in zip(requests, predicted):
        allocation = 32 * -(-p // 32)
        held = kv.allocated_blocks(request.request_id) + kv.reserved_blocks(request.request_id)
        assert held == kv.blocks_for(20 + allocation - 1)  # prompt + padded RL, the last token uncached
    assert policy.stats.extra["groups_formed"] == 3


def test_a_gt_starts_only_when_its_exact_allocation_fits():
    # Prompts of 16 tokens (1 block); predicted 64 -> 16 + 63 = 79 tokens = 5 blocks, 4 to grow.
    policy = _policy(8, rl_bucket=16, no_kvcpipe=True)
    _add(policy, 0, 16, 64)
    _add(policy, 1, 16, 64)
    true_output = {0: 64, 1: 64}
    _step(policy, true_output)  # both prompts (2 blocks); 6 free
    _step(policy, true_output)  # GT 0 takes 4 blocks; GT 1 needs 4, only 2 free
    assert [r.request_id for r in policy.running] == [0]
    assert [r.request_id for r in policy.gt_queue()] == [1]
    steps = 0
    while policy.has_unfinished_requests():
        gt0_held = policy.kv_cache.holds(0)
        decision = _step(policy, true_output)
        assert not decision.preempted
        steps += 1
        if any(r.request_id == 1 for r in decision.scheduled):
            assert not gt0_held  # GT 1 generates only once GT 0 has left
    assert steps > 64


# --------------------------------------------------------------------- KVCPipe
def _host_and_guest(host_steps_before_guest: int, guest_predicted: int = 32, **config):
    # Host: prompt 16, predicted 96 -> 111 tokens = 7 blocks. Guest: prompt 16, predicted 32 ->
    # 47 tokens = 3 blocks, 2 to grow. Cache: host 7 + guest prompt 1 + 1 free = 9 blocks.
    policy = _policy(9, rl_bucket=16, **config)
    _add(policy, 0, 16, 96)
    true_output = {0: 96, 1: guest_predicted}
    for _ in range(1 + host_steps_before_guest):
        _step(policy, true_output)
    _add(policy, 1, 16, guest_predicted, arrival=1.0)
    return policy, true_output


def test_kvcpipe_lends_an_idle_tail_to_a_guest_that_finishes_before_the_host_needs_it():
    policy, true_output = _host_and_guest(host_steps_before_guest=2)
    kv = policy.kv_cache
    host_blocks = kv.allocated_blocks(0) + kv.reserved_blocks(0)
    _step(policy, true_output)  # guest's prompt
    _step(policy, true_output)  # guest admitted into the host's tail
    assert kv.lender_of(1) == 0
    assert policy.stats.extra["kvcpipe_loans"] == 1
    guest_done = False
    while policy.has_unfinished_requests():
        decision = _step(policy, true_output)
        assert not decision.preempted
        if not guest_done:
            assert any(r.request_id == 0 for r in decision.scheduled)  # the host never stalls
            guest_done = not kv.holds(1)
            if guest_done:  # the loan came back to the host
                assert kv.allocated_blocks(0) + kv.reserved_blocks(0) == host_blocks
    assert policy.stats.extra["reserve_extension_blocks"] == 0


def test_kvcpipe_refuses_a_guest_that_would_outlive_the_hosts_own_space():
    # After 60 host steps the host has (7 - 2) * 16 - 76 = 4 steps on its own space left: too few
    # for the guest's 31 remaining steps.
    policy, true_output = _host_and_guest(host_steps_before_guest=60)
    _step(policy, true_output)
    _step(policy, true_output)
    assert policy.kv_cache.lender_of(1) is None
    assert [r.request_id for r in policy.gt_queue()] == [1]
    assert policy.stats.extra["kvcpipe_loans"] == 0


@pytest.mark.parametrize("mode", ["curve", "tail"])
def test_curve_admission_uses_space_the_predicted_occupancy_frees_in_time(mode):
    # The host has 14 steps left and holds all its 7 blocks (no idle tail). The guest (predicted
    # 64 -> 79 tokens = 5 blocks) needs 4 more than the 1 free block, but within the host's 14
    # steps it grows to 31 tokens = 2 blocks: 7 + 2 <= 9 at every step, then 5 alone.
    policy, true_output = _host_and_guest(81, guest_predicted=64, kvcpipe=mode)
    assert policy.kv_cache.reserved_blocks(0) == 0
    _step(policy, true_output)  # guest's prompt
    _step(policy, true_output)
    generating = {r.request_id for r in policy.running}
    if mode == "curve":
        assert generating == {0, 1} and policy.stats.extra["curve_admissions"] == 1
    else:
        assert generating == {0} and [r.request_id for r in policy.gt_queue()] == [1]
    while policy.has_unfinished_requests():
        assert not _step(policy, true_output).preempted
    assert policy.stats.extra["reserve_extension_blocks"] == 0


def test_a_guest_that_overruns_its_loan_pays_for_it_not_its_host():
    # The guest is predicted 32 but runs to 200: it extends into the one free block, then finds
    # nothing. It has the higher priority (later arrival, much shorter) yet it, not the host, goes.
    policy, true_output = _host_and_guest(host_steps_before_guest=2, kvcpipe="tail")
    true_output[1] = 200
    _step(policy, true_output)
    _step(policy, true_output)
    assert policy.kv_cache.lender_of(1) == 0
    assert policy._gt_key[1] < policy._gt_key[0]
    preempted = []
    while policy.kv_cache.holds(0):
        decision = _step(policy, true_output)
        assert any(r.request_id == 0 for r in decision.scheduled)  # the host never stalls
        preempted.extend(r.request_id for r in decision.preempted)
    assert preempted == [1]


# --------------------------------------------------------------------- mispredictions
def test_an_under_predicted_gt_extends_from_the_global_reserve_before_free_space():
    policy = _policy(40, rl_bucket=16, reserve_ratio=0.25)  # 10 reserve blocks
    _add(policy, 0, 16, 32)  # allocation 16 + 31 tokens = 3 blocks; true length 100 needs 8
    true_output = {0: 100}
    peak_reserve_used = 0
    while policy.has_unfinished_requests():
        decision = _step(policy, true_output)
        assert not decision.preempted
        peak_reserve_used = max(peak_reserve_used, policy.kv_cache.num_global_reserve_used)
    assert peak_reserve_used == 8 - 3
    assert policy.stats.extra["reserve_extension_blocks"] == 5
    assert policy.stats.extra["free_extension_blocks"] == 0


def test_preemption_is_the_last_resort_and_takes_the_lowest_priority_gt():
    # Two GTs of 3 blocks each fill the cache; one reserve block. Both outgrow their allocations
    # in the same step: GT 0 (earlier deadline) takes the reserve block; then nothing is free and
    # GT 1, the lower priority, is preempted (by itself), not GT 0.
    policy = _policy(1 + 2 * 3, rl_bucket=16, reserve_ratio=1 / 7)
    _add(policy, 0, 16, 32, arrival=0.0)
    _add(policy, 1, 16, 32, arrival=0.5)
    true_output = {0: 80, 1: 60}
    preempted = []
    while policy.has_unfinished_requests():
        free_before = policy.kv_cache.num_free_blocks
        decision = _step(policy, true_output)
        if decision.preempted:
            assert free_before == 0 and policy.stats.extra["reserve_extension_blocks"] == 1
            preempted.extend(r.request_id for r in decision.preempted)
    assert preempted == [1]  # and it was not lost: the loop ended with both finished


@pytest.mark.parametrize("limit", [None, 1, 2])
def test_a_repeat_victim_is_spared_while_another_gt_can_be_preempted(limit):
    # Two generating GTs; GT 1 (later deadline) is the victim by key. Once it has been preempted
    # ``repeat_victim_limit`` times GT 0 is chosen instead, unless GT 0 has been too.
    policy = _policy(1 + 2 * 3, rl_bucket=16, repeat_victim_limit=limit)
    first, second = _add(policy, 0, 16, 32, arrival=0.0), _add(policy, 1, 16, 32, arrival=0.5)
    for _ in range(2):  # the prompts, then the first decode step: both are generating GTs
        _step(policy, {0: 80, 1: 60})
    assert {r.request_id for r in policy.running} == {0, 1} and all(r.is_decoding for r in policy.running)
    assert policy._victim_for(first) is second
    second.num_preemptions = 2
    assert policy._victim_for(first) is (second if limit is None else first)
    first.num_preemptions = 2
    assert policy._victim_for(first) is second  # every candidate is a repeat victim: by key again


# --------------------------------------------------------------------- ordering
@pytest.mark.parametrize("u", [0.0, 64.0])
def test_pt_and_gt_queues_follow_their_formulas(u):
    t_prefill, t_decode, slo, weight = 1e-3, 0.05, 4.0, 0.2
    limits = {"prefill_time_per_token_s": t_prefill, "decode_time_per_step_s": t_decode}
    policy = _policy(1000, rl_bucket=16, slo_scale=slo, gt_occupancy_weight=weight, limits=limits,
                     max_num_seqs=1, ordering_prompt_weight=u)
    specs = [(0.0, 900, 16), (0.1, 16, 400), (0.2, 300, 32), (0.3, 40, 48), (0.4, 600, 200)]
    for i, (arrival, prompt, predicted) in enumerate(specs):
        _add(policy, i, prompt, predicted, arrival=arrival)

    def kv_time_equivalent(prompt, predicted):  # predictions are bucket multiples
        return (predicted**2 + 2 * u * prompt * predicted) ** 0.5

    def pt_key(arrival, prompt, predicted):
        isolated = prompt * t_prefill + kv_time_equivalent(prompt, predicted) * t_decode
        return arrival + slo * isolated - isolated

    expected = sorted(range(5), key=lambda i: pt_key(*specs[i]))
    assert [r.request_id for r in policy.pt_queue()] == expected

    def gt_key(arrival, prompt, predicted):
        isolated = prompt * t_prefill + kv_time_equivalent(prompt, predicted) * t_decode
        remaining = (kv_time_equivalent(prompt, predicted) - 1) * t_decode
        return arrival + slo * isolated - remaining - weight * prompt * t_decode

    gts = [_make_gt(policy, r) for r in policy.pt_queue()]
    for request in gts:
        policy._push_gt(request)
    assert [r.request_id for r in policy.gt_queue()] == sorted(range(5), key=lambda i: gt_key(*specs[i]))

    fcfs = _policy(1000, no_ordering=True)
    for i, (arrival, prompt, predicted) in enumerate(specs[::-1]):
        _add(fcfs, i, prompt, predicted, arrival=arrival)
    assert [r.arrival_time_s for r in fcfs.pt_queue()] == sorted(s[0] for s in specs)


def _make_gt(policy, request: Request) -> Request:
    """The request as it is when its prompt is done (first token sampled, prompt cached)."""
    gt = Request(request.request_id, request.arrival_time_s, request.num_prompt_tokens,
                 request.predicted_output_tokens)
    gt.num_output_tokens = 1
    gt.num_computed_tokens = request.num_prompt_tokens
    gt.status = RequestStatus.RUNNING
    return gt


# --------------------------------------------------------------------- events and budget
def test_the_scheduler_runs_on_events_far_fewer_times_than_there_are_steps():
    trace = synthetic_trace(300, rate_rps=6, seed=4)
    runs = [simulate(trace, SimulationConfig(scheduler="econoserve", predictions="oracle", skip_ahead=skip))
            for skip in (True, False)]
    for result in runs:
        summary = result.summary
        assert 0 < summary["scheduler_invocations"] < 0.5 * summary["num_iterations"]
    # the count is a property of the policy, not of how the simulator advances
    assert runs[0].summary["scheduler_invocations"] == runs[1].summary["scheduler_invocations"]
    assert runs[0].summary["num_iterations"] == runs[1].summary["num_iterations"]


def test_the_token_budget_comes_from_the_latency_model_and_can_be_overridden():
    trace = synthetic_trace(120, rate_rps=40, seed=5)
    config = SimulationConfig(scheduler="econoserve", predictions="oracle", model="llama-2-7b", gpu="h100-80gb")
    _, latency, limits = build_setup(config)
    derived = saturating_token_budget(latency, fraction=config.saturation_fraction)
    assert limits.saturating_token_budget == derived
    result = simulate(trace, config)
    assert result.config["policy"]["token_budget"] == derived
    # by default a step carries at most the prompt tokens of prefill_decode_steps isolated decode steps
    k = EconoServeConfig().prefill_decode_steps
    cap = int(k * limits.decode_time_per_step_s / limits.prefill_time_per_token_s)
    assert 0 < cap < derived
    assert result.iterations.num_prefill_tokens.max() == cap
    uncapped = simulate(trace, replace(config, policy_config={"prefill_decode_steps": None}))
    assert uncapped.iterations.num_prefill_tokens.max() > cap
    overridden = simulate(trace, SimulationConfig(scheduler="econoserve", predictions="oracle",
                                                  policy_config={"token_budget": 300}))
    iterations = overridden.iterations
    assert overridden.config["policy"]["token_budget"] == 300
    with_prompts = iterations[iterations.num_prefill_tokens > 0]
    assert not with_prompts.empty
    assert (with_prompts.num_prefill_tokens + with_prompts.num_decode_tokens <= 300).all()


def test_exact_predictions_under_a_fitting_load_never_preempt_or_extend():
    trace = synthetic_trace(200, rate_rps=4, seed=6)
    result = simulate(trace, SimulationConfig(scheduler="econoserve-oracle", check_invariants=True))
    assert (result.requests.status == "finished").all()
    assert result.summary["num_preemptions"] == 0
    assert result.summary["policy_reserve_extension_blocks"] == 0
    assert result.summary["policy_free_extension_blocks"] == 0


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="rl_bucket"):
        EconoServeConfig(rl_bucket=0)
    with pytest.raises(ValueError, match="reserve_ratio"):
        EconoServeConfig(reserve_ratio=1.0)
    with pytest.raises(ValueError, match="prompt_admission"):
        EconoServeConfig(prompt_admission="eager")
    assert make_policy("econoserve-no-kvcpipe", _limits(10)).config.no_kvcpipe
    assert make_policy("econoserve-oracle", _limits(10)).wants_oracle_predictions


# --------------------------------------------------------------------- invariants under stress
def _perturbed_trace(seed: int):
    rng = np.random.default_rng(seed)
    n = 150
    prompts = rng.integers(8, 400, n)
    outputs = rng.integers(1, 300, n)
    predicted = np.maximum(1, np.rint(outputs * rng.uniform(0.0, 2.0, n))).astype(int)  # +-100 %
    arrivals = np.cumsum(rng.exponential(0.02, n))
    return trace_from_lists(arrivals, prompts, outputs, predicted)


@pytest.mark.parametrize("name", ECONOSERVE_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_invariants_hold_under_every_ablation_with_perturbed_predictions(name, seed):
    trace = _perturbed_trace(seed)
    config = SimulationConfig(scheduler=name, num_kv_blocks=120, max_model_len=1024, check_invariants=True,
                              policy_config={"reserve_ratio": 0.05, "max_num_seqs": 32})
    result = simulate(trace, config)
    requests = result.requests
    finished = requests.status == "finished"
    assert (finished | (requests.rejection_reason.str.len() > 0)).all()
    assert (requests.loc[finished, "generated_tokens"] == requests.loc[finished, "output_tokens"]).all()
    assert finished.sum() >= 0.9 * len(requests)
    iterations = result.iterations
    assert (iterations.kv_blocks_used + iterations.kv_blocks_reserved <= iterations.kv_blocks_capacity).all()
    if name != "econoserve-oracle" and name != "econoserve-no-syncdecoupled":
        # the perturbation really bites: GTs outgrow their allocations
        assert result.summary["policy_reserve_extension_blocks"] + result.summary["num_preemptions"] > 0
    again = simulate(trace, config)
    drop = [c for c in WALL_CLOCK_COLUMNS if c in iterations.columns]
    assert requests.equals(again.requests)
    assert iterations.drop(columns=drop).equals(again.iterations.drop(columns=drop))


def test_abort_releases_a_request_in_every_queue_and_returns_a_loan():
    policy, true_output = _host_and_guest(host_steps_before_guest=2, kvcpipe="tail")
    _add(policy, 2, 64, 32, arrival=2.0)  # stays in the PT queue: no room for its 4-block prompt
    _step(policy, true_output | {2: 32})
    _step(policy, true_output | {2: 32})
    kv = policy.kv_cache
    assert kv.lender_of(1) == 0 and [r.request_id for r in policy.pt_queue()] == [2]
    host_reserved = kv.reserved_blocks(0)
    by_id = {r.request_id: r for r in policy.running + policy.pt_queue()}
    policy.abort_request(by_id[1])  # the guest: its loan goes back to the host
    assert kv.reserved_blocks(0) > host_reserved and not kv.holds(1)
    policy.abort_request(by_id[2])
    policy.abort_request(by_id[0])
    assert not policy.has_unfinished_requests()
    assert kv.num_allocated_blocks == kv.num_reserved_blocks == kv.num_stored_tokens == 0
    kv.check_invariants()


def test_a_preempted_gt_whose_recompute_outgrew_the_usable_cache_resumes_on_the_reserve():
    # 320 one-token blocks, 16 of them the global reserve (found by the property test). Request 15
    # is predicted 1 token, true 157: it outgrows everything and is preempted while request 9
    # (predicted 88) holds its allocation; its recompute (157 + >147 generated tokens) no longer
    # fits the 304 ordinary blocks: it must resume on the reserve, never hang or be lost. The
    # keys are slack alone (ordering_prompt_weight 0), the order the property test found it in.
    prompts, outputs, predicted = [1] * 20, [1] * 20, [1] * 20
    prompts[9], outputs[9], predicted[9] = 8, 2, 88
    prompts[15], outputs[15], predicted[15] = 157, 157, 1
    trace = trace_from_lists([0.0] * 20, prompts, outputs, predicted)
    config = SimulationConfig(scheduler="econoserve-no-kvcpipe", block_size=1, num_kv_blocks=320, max_model_len=512,
                              check_invariants=True, policy_config={"token_budget": 8, "max_num_seqs": 8, "ordering_prompt_weight": 0.0})
    result = simulate(trace, config)
    assert (result.requests.status == "finished").all()
    assert result.requests.generated_tokens.tolist() == outputs
    assert result.requests.num_preemptions[15] >= 1


@settings(max_examples=100, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 500), st.booleans()), max_size=30),
       head=st.integers(0, 5000))
def test_the_bulk_decode_pass_schedules_exactly_as_one_add_per_request(shapes, head):
    """SchedulerDecision.add_decodes (EconoServe's decode pass) = add(request, 1) for each request
    in turn: the same lists and totals, the float attention sum bit for bit (after a prompt chunk
    of ``head`` tokens, so the sum does not start at 0)."""
    requests = []
    for i, (prompt, output, decoding) in enumerate(shapes):
        request = Request(i, 0.0, prompt)
        request.num_output_tokens = output
        request.num_computed_tokens = prompt + output - 1 if decoding and output else min(prompt - 1, i)
        requests.append(request)
    one_by_one, bulk = SchedulerDecision(), SchedulerDecision()
    chunk = Request(-1, 0.0, head + 1)
    for decision in (one_by_one, bulk):
        decision.add(chunk, head)
    for request in requests:
        one_by_one.add(request, 1)
    bulk.add_decodes(iter(requests))
    for name in SchedulerDecision.__slots__:
        assert getattr(bulk, name) == getattr(one_by_one, name), name

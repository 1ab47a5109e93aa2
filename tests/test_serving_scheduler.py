"""The policy scheduler: our policies executing on vLLM's v1 engine (econoserve.serving.scheduler).

Two kinds of tests:

* *engine* tests run the real CPU engine on the tiny model (a trace completes with exact lengths,
  no preemption under exact predictions, aborts free both KV accountings);
* *stepped* tests build the scheduler from a real vLLM configuration but drive ``schedule()`` /
  ``update_from_output()`` with a stand-in model output (one sampled token per finished
  computation), which makes refusals, rejections and mid-step aborts quick to check.

Both record the policy's decisions and replay them in pure Python
(:func:`econoserve.serving.decisions.replay_decision_log`): a fresh policy fed the same arrivals,
times and aborts must ask, step by step, for exactly the batches the engine executed.

Skipped when vLLM is not importable, unless ``ECONOSERVE_REQUIRE_VLLM=1`` (tests/conftest.py).
Run with: ``ECONOSERVE_REQUIRE_VLLM=1 .venv-serving/bin/python -m pytest -m serving tests/test_serving_scheduler.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from econoserve.policy import EngineLimits, policy_names
from econoserve.serving.decisions import (
    ArrivalRecord,
    StepRecord,
    UpdateRecord,
    read_decision_log,
    replay_decision_log,
)

pytestmark = [pytest.mark.serving]

BLOCK_SIZE = 32
VOCAB_SIZE = 50272


def _synthetic_trace(num_requests: int, seed: int, rate_rps: float = 32.0, max_prompt: int = 300,
                     max_output: int = 100, prediction_error: float | None = None):
    from econoserve.workload.trace import Trace

    rng = np.random.default_rng(seed)
    output = rng.integers(1, max_output, num_requests)
    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests),
            "arrival_time_s": np.cumsum(rng.exponential(1 / rate_rps, num_requests)),
            "prompt_tokens": rng.integers(4, max_prompt, num_requests),
            "output_tokens": output,
            "dataset": "synthetic",
        }
    )
    trace = Trace.from_frame(frame)
    if prediction_error is not None:
        noise = rng.uniform(1 - prediction_error, 1 + prediction_error, num_requests)
        trace = trace.with_predictions(np.maximum(1, np.round(output * noise)).astype(int))
    return trace


def _policy_registered(name: str) -> bool:
    from econoserve.policy import policy_names

    return name in policy_names()


def _require_policy(name: str) -> None:
    if not _policy_registered(name):
        pytest.skip(f"policy {name!r} is not registered yet (econoserve/policy/registry.py)")


# --------------------------------------------------------------------- stepped scheduler
def _stepped_scheduler(model_dir, policy: str, num_blocks: int = 17, max_model_len: int = 1024,
                       max_num_batched_tokens: int = 256, max_num_seqs: int = 8, scheduler: str = "PolicyScheduler",
                       options: dict | None = None, mutate=None):
    """A policy scheduler on a real vLLM configuration and a KV cache of ``num_blocks`` blocks
    (one of them vLLM's null block), without a model (econoserve.serving.stepping)."""
    from econoserve.serving.stepping import stepped_scheduler

    return stepped_scheduler(
        model_dir, f"econoserve.serving.scheduler.{scheduler}", num_blocks, block_size=BLOCK_SIZE,
        max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        additional_config={"econoserve": {"policy": policy, "keep_decisions": True, **(options or {})}}, mutate=mutate,
    )


def _engine_request(request_id: str, prompt_tokens: int, max_tokens: int, predicted: int | None = None, **sampling):
    from econoserve.serving.stepping import engine_request

    return engine_request(request_id, prompt_tokens, max_tokens, predicted, **sampling)


def _fake_step(scheduler):
    """Schedule one step and answer it as a model would: one token per request whose scheduled
    tokens reach its end. Returns (SchedulerOutput, {client: EngineCoreOutputs})."""
    output = scheduler.schedule()
    return output, _fake_update(scheduler, output)


def _fake_update(scheduler, output):
    from econoserve.serving.stepping import stand_in_model_output

    return scheduler.update_from_output(output, stand_in_model_output(scheduler, output))


def _outputs_by_request(engine_outputs) -> dict[str, list]:
    found: dict[str, list] = {}
    for outputs in engine_outputs.values():
        for output in outputs.outputs:
            found.setdefault(output.request_id, []).append(output)
    return found


def _assert_both_kv_accountings_empty(scheduler) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # everything but the null block
    kv = scheduler.econoserve_policy.kv_cache
    kv.check_invariants()
    assert kv.num_allocated_blocks == 0 and kv.num_reserved_blocks == 0 and kv.num_global_reserve_used == 0
    assert not scheduler.econoserve_policy.has_unfinished_requests()
    assert not scheduler.running and not scheduler.waiting and not scheduler.requests


# --------------------------------------------------------------------- refusals
def _with(path: str, value):
    def mutate(vllm_config):
        target = vllm_config
        *parents, name = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        object.__setattr__(target, name, value)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_with("cache_config.enable_prefix_caching", True), "prefix caching"),
        (_with("scheduler_config.async_scheduling", True), "async scheduling"),
        (_with("speculative_config", object()), "speculative decoding"),
        (_with("kv_transfer_config", object()), "KV connectors"),
        (_with("parallel_config.pipeline_parallel_size", 2), "pipeline parallelism"),
        (_with("scheduler_config.policy", "priority"), "scheduling policy 'priority'"),
    ],
    ids=["prefix-caching", "async", "spec-decode", "kv-connector", "pipeline-parallel", "priority"],
)
def test_unsupported_engine_features_are_refused_at_construction(model_dir, mutate, message):
    from econoserve.serving.scheduler import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match=message):
        _stepped_scheduler(model_dir, "sarathi", mutate=mutate)


def test_bad_options_and_vllm_releases_are_refused(model_dir, monkeypatch):
    from econoserve.serving.scheduler import UnsupportedConfigError, check_vllm_version

    with pytest.raises(UnsupportedConfigError, match="unknown policy 'fifo'"):
        _stepped_scheduler(model_dir, "fifo")
    with pytest.raises(UnsupportedConfigError, match="unknown option.*polcy"):
        _stepped_scheduler(model_dir, "sarathi", options={"polcy": "x"})
    with pytest.raises(UnsupportedConfigError, match="num_kv_blocks"):
        _stepped_scheduler(model_dir, "sarathi", options={"limits": {"num_kv_blocks": 4}})
    with pytest.raises(UnsupportedConfigError, match="max_tokens_per_step"):
        _stepped_scheduler(model_dir, "sarathi", options={"limits": {"max_tokens_per_step": 4096}})
    with pytest.raises(UnsupportedConfigError, match="runs the econoserve policies, not 'sarathi'"):
        _stepped_scheduler(model_dir, "sarathi", scheduler="EconoServeScheduler")

    monkeypatch.delenv("ECONOSERVE_ALLOW_UNSUPPORTED_VLLM", raising=False)
    assert check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(UnsupportedConfigError, match="supports vLLM 0.32.0, found 0.33.1"):
        check_vllm_version("0.33.1")
    monkeypatch.setenv("ECONOSERVE_ALLOW_UNSUPPORTED_VLLM", "1")
    assert check_vllm_version("0.33.1") == "0.33.1"


def test_engine_limits_and_budgets_come_from_the_engine(model_dir):
    scheduler = _stepped_scheduler(model_dir, "sarathi", num_blocks=17, max_num_batched_tokens=256, max_num_seqs=8)
    policy = scheduler.econoserve_policy
    assert policy.limits.num_kv_blocks == 16  # 17 less vLLM's null block
    assert policy.limits.block_size == BLOCK_SIZE and policy.limits.max_model_len == 1024
    assert policy.limits.saturating_token_budget == 256
    assert (policy.limits.max_tokens_per_step, policy.limits.max_seqs_per_step) == (256, 8)
    # every policy takes the smaller of its own knob and the engine's cap
    assert policy.config.token_budget == 512 and policy.token_budget == 256 and policy.max_num_seqs == 8
    overridden = _stepped_scheduler(model_dir, "sarathi", options={"policy_config": {"token_budget": 64}})
    assert overridden.econoserve_policy.token_budget == 64
    larger = _stepped_scheduler(model_dir, "sarathi", options={"policy_config": {"token_budget": 4096}})
    assert larger.econoserve_policy.token_budget == 256
    # vLLM v0's budget rule, max(max_model_len, 2048), and Orca's missing one are capped alike
    assert _stepped_scheduler(model_dir, "vllm").econoserve_policy.token_budget == 256
    orca = _stepped_scheduler(model_dir, "orca").econoserve_policy
    assert (orca.token_budget, orca.max_num_seqs) == (256, 8)
    # an engine batching more than a policy's own default (256, vLLM's) lends it its max_num_seqs,
    # unless the policy's configuration sets one
    wide = _stepped_scheduler(model_dir, "sarathi", num_blocks=17, max_num_batched_tokens=512, max_num_seqs=300)
    assert wide.econoserve_policy.max_num_seqs == 300
    capped = _stepped_scheduler(model_dir, "sarathi", num_blocks=17, max_num_batched_tokens=512, max_num_seqs=300,
                                options={"policy_config": {"max_num_seqs": 100}})
    assert capped.econoserve_policy.max_num_seqs == 100
    if _policy_registered("econoserve"):  # EconoServe derives its budget from the limits
        econoserve = _stepped_scheduler(model_dir, "econoserve", options={"limits": {"saturating_token_budget": 128}})
        assert econoserve.econoserve_policy.token_budget == 128
        assert econoserve.econoserve_policy.max_num_seqs == 8


def test_the_simulated_policy_gets_the_limits_the_drop_in_built(model_dir):
    """The fidelity check simulates a served policy with exactly the EngineLimits the drop-in gave
    it (time estimates included: they feed EconoServe's Ordering keys), with and without a
    ``limits`` section."""
    from econoserve.serving.fidelity import EngineShape, simulation_config
    from econoserve.sim import build_setup

    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, block_size=BLOCK_SIZE,
                        kv_cache_tokens=17 * BLOCK_SIZE)
    for limits in ({}, {"decode_time_per_step_s": 0.007, "prefill_time_per_token_s": 3e-5}):
        served = _stepped_scheduler(model_dir, "sarathi", options={"limits": limits} if limits else None)
        _, _, simulated = build_setup(simulation_config(shape, "sarathi", "roofline", limits))
        assert simulated == served.econoserve_policy.limits


def test_the_drop_in_takes_its_time_estimates_from_the_engines_latency_model(model_dir, tmp_path):
    """Given ``latency_model``, the drop-in's policy gets the simulator's estimates from it at the
    engine's step budget (``limits`` still win), the fidelity copy gets the same, and EconoServe's
    slowdown cap, off without a context cost, sizes the policy's cache from them."""
    from econoserve.serving.fidelity import EngineShape, served_limits, simulation_config
    from econoserve.serving.scheduler import UnsupportedConfigError
    from econoserve.sim import build_setup
    from econoserve.sim.latency import FittedLatencyModel, policy_time_estimates

    # 2 ms a step, 0.1 ms a decoding request, 1 us a token of context: T_d (512 tokens of context) = 2.6 ms
    fitted = FittedLatencyModel(0.002, {"prefill_tokens": 2e-5, "decode_tokens": 1e-4, "context_tokens": 1e-6}, {}, "test")
    path = str(fitted.save(tmp_path / "latency_model.json"))
    expected = policy_time_estimates(fitted, 256)
    served = _stepped_scheduler(model_dir, "sarathi", options={"latency_model": path})
    limits = served.econoserve_policy.limits
    assert {name: getattr(limits, name) for name in expected} == expected
    assert limits.decode_time_per_step_s != EngineLimits(num_kv_blocks=1).decode_time_per_step_s
    overridden = _stepped_scheduler(model_dir, "sarathi", options={"latency_model": path,
                                                                   "limits": {"decode_time_per_step_s": 0.05}})
    assert overridden.econoserve_policy.limits.decode_time_per_step_s == 0.05
    assert overridden.econoserve_policy.limits.prefill_time_per_token_s == expected["prefill_time_per_token_s"]

    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, block_size=BLOCK_SIZE,
                        kv_cache_tokens=17 * BLOCK_SIZE)
    run_config = {"engine": {"max_num_batched_tokens": 256, "extra_options": {"policy": "sarathi", "latency_model": path}}}
    _, _, simulated = build_setup(simulation_config(shape, "sarathi", "roofline", served_limits(run_config)))
    assert simulated == limits

    if _policy_registered("econoserve"):  # s = 3: 2 T_d / T_ctx = 5224 tokens, 163 blocks of 32, above the 64-block floor
        big = _stepped_scheduler(model_dir, "econoserve", num_blocks=257, options={"latency_model": path})
        assert big.econoserve_policy.kv_cache.num_blocks == 163
        assert _stepped_scheduler(model_dir, "econoserve", num_blocks=257).econoserve_policy.kv_cache.num_blocks == 256

    with pytest.raises(UnsupportedConfigError, match="no such latency table"):
        _stepped_scheduler(model_dir, "sarathi", options={"latency_model": str(tmp_path / "missing.json")})


def test_structured_output_and_policy_rejections_finish_with_an_error(model_dir):
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.engine import FinishReason

    scheduler = _stepped_scheduler(model_dir, "sarathi", num_blocks=9)  # 8 usable blocks = 256 tokens
    scheduler.add_request(_engine_request("json", 8, 4, structured_outputs=StructuredOutputsParams(json_object=True)))
    scheduler.add_request(_engine_request("huge", 300, 4))  # a prompt that can never fit in the KV cache
    scheduler.add_request(_engine_request("bad", 8, 2, predicted=-3))  # a malformed prediction
    scheduler.add_request(_engine_request("ok", 8, 2))
    assert set(scheduler.rejections) == {"json", "huge", "bad"}
    assert "must be a non-negative integer, got -3" in scheduler.rejections["bad"]
    assert "structured output" in scheduler.rejections["json"]
    assert scheduler.rejections["huge"].startswith("sarathi: prompt of 300 tokens")
    _, engine_outputs = _fake_step(scheduler)
    outputs = _outputs_by_request(engine_outputs)
    for request_id in ("json", "huge", "bad"):
        (output,) = outputs[request_id]
        assert output.finish_reason == FinishReason.ERROR and output.new_token_ids == []
    while scheduler.has_requests():
        _fake_step(scheduler)
    _assert_both_kv_accountings_empty(scheduler)


def test_aborts_mid_step_free_both_kv_accountings_and_replay(model_dir):
    """Aborts arrive between schedule() and update_from_output() in vLLM's busy loop."""
    scheduler = _stepped_scheduler(model_dir, "sarathi", num_blocks=33)
    for i in range(6):
        scheduler.add_request(_engine_request(f"r{i}", 40 + 30 * i, 50))
    for _ in range(4):
        _fake_step(scheduler)
    assert scheduler.econoserve_policy.kv_cache.num_allocated_blocks > 0
    output = scheduler.schedule()
    in_batch = list(output.num_scheduled_tokens)
    from vllm.v1.request import RequestStatus

    scheduler.finish_requests(in_batch[:2] + ["r5"], RequestStatus.FINISHED_ABORTED)
    _fake_update(scheduler, output)
    scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    _fake_step(scheduler)
    _assert_both_kv_accountings_empty(scheduler)
    report = replay_decision_log(scheduler.decision_log.records)
    assert report.equivalent, report.mismatch


@pytest.mark.parametrize("policy", ["vllm", "vllm-chunked", "orca", "sarathi", "fastgen", "econoserve",
                                    "econoserve-no-syncdecoupled"])
def test_aborts_in_every_request_state_free_both_kv_accountings(model_dir, policy):
    """Under a tight cache, abort one request every few steps (queued, prefilling, waiting for
    its generation allocation, generating, preempted) and let the rest run to the end."""
    _require_policy(policy)
    scheduler = _stepped_scheduler(model_dir, policy, num_blocks=17)
    ids = [f"r{i}" for i in range(10)]
    for i, request_id in enumerate(ids):
        scheduler.add_request(_engine_request(request_id, 40 + 17 * i, 30 + 7 * i, predicted=30 + 7 * i))
    from vllm.v1.request import RequestStatus

    to_abort = ["r9", "r0", "r5", "r2", "r7"]
    step = 0
    while scheduler.has_requests():
        _fake_step(scheduler)
        step += 1
        if step % 3 == 0 and to_abort:
            scheduler.finish_requests(to_abort.pop(0), RequestStatus.FINISHED_ABORTED)
            scheduler.econoserve_policy.kv_cache.check_invariants()
        assert step < 2000, "the run does not finish"
    _assert_both_kv_accountings_empty(scheduler)
    report = replay_decision_log(scheduler.decision_log.records)
    assert report.equivalent, report.mismatch


def test_stepped_preemptions_replay_and_tampering_is_caught(model_dir):
    """Under a tight KV cache Sarathi preempts; the replay agrees, and any edit of the log breaks it."""
    scheduler = _stepped_scheduler(model_dir, "sarathi", num_blocks=9)
    for i in range(6):
        scheduler.add_request(_engine_request(f"r{i}", 30 + 10 * i, 60 + 5 * i))
    produced: dict[str, int] = {}
    while scheduler.has_requests():
        _, engine_outputs = _fake_step(scheduler)
        for request_id, outputs in _outputs_by_request(engine_outputs).items():
            produced[request_id] = produced.get(request_id, 0) + sum(len(o.new_token_ids) for o in outputs)
    assert produced == {f"r{i}": 60 + 5 * i for i in range(6)}
    assert scheduler.econoserve_policy.stats.preemptions > 0
    _assert_both_kv_accountings_empty(scheduler)

    records = scheduler.decision_log.records
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    assert report.num_finished == 6 and report.num_steps == sum(isinstance(r, StepRecord) for r in records)

    def tampered(index: int, record) -> list:
        return records[:index] + [record] + records[index + 1:]

    busy = next(i for i, r in enumerate(records) if isinstance(r, StepRecord) and len(r.scheduled) > 1)
    step = records[busy]
    (first_id, first_tokens), *rest = step.scheduled
    fewer = dataclasses.replace(step, scheduled=((first_id, first_tokens + 1), *rest))
    assert "the engine executed" in replay_decision_log(tampered(busy, fewer)).mismatch
    swapped = dataclasses.replace(step, scheduled=(*rest, (first_id, first_tokens)))
    assert not replay_decision_log(tampered(busy, swapped)).equivalent
    done = next(i for i, r in enumerate(records) if isinstance(r, UpdateRecord) and r.finished)
    assert "finished" in replay_decision_log(tampered(done, dataclasses.replace(records[done], finished=()))).mismatch
    arrival = next(i for i, r in enumerate(records) if isinstance(r, ArrivalRecord))
    later = dataclasses.replace(records[arrival], num_prompt_tokens=records[arrival].num_prompt_tokens + 1)
    assert not replay_decision_log(tampered(arrival, later)).equivalent


# --------------------------------------------------------------------- the real engine
def _serve(model_dir, tmp_path, trace, scheduler: str, kv_cache_tokens: int, max_model_len: int = 512,
           policy_config: dict | None = None, time_scale: float = 0.25, options: dict | None = None):
    from dataclasses import replace

    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.run import ServeSpec, scheduler_class, scheduler_options, serve_trace

    log = tmp_path / "decisions.jsonl"
    options = {**scheduler_options(scheduler, policy_config), **(options or {}), "decision_log": str(log)}
    engine = EngineConfig(model=str(model_dir), scheduler_cls=scheduler_class(scheduler), kv_cache_tokens=kv_cache_tokens,
                          max_model_len=max_model_len, max_num_batched_tokens=512)
    spec = ServeSpec(engine=replace(engine, extra_options=options), scheduler=scheduler, time_scale=time_scale, timeout_s=300)
    result = serve_trace(trace, spec, tmp_path / "run")
    return result, read_decision_log(log)


def test_econoserve_serves_a_trace_with_exact_lengths_and_its_decisions_replay(model_dir, tmp_path):
    """EconoServe with +-50 % predictions, on the real engine: every request gets exactly its
    length, and the pure-Python replay of the policy asks for exactly the batches vLLM ran."""
    _require_policy("econoserve")
    trace = _synthetic_trace(32, seed=5, max_prompt=200, max_output=64, prediction_error=0.5)
    result, records = _serve(model_dir, tmp_path, trace, "econoserve", kv_cache_tokens=2048)

    requests = result.requests
    assert len(requests) == 32 and (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    iterations = result.iterations
    assert len(iterations) > 0 and (iterations["kv_blocks_used"] <= iterations["kv_blocks_capacity"]).all()
    recomputed = iterations["num_prefill_tokens"].sum() - trace.requests["prompt_tokens"].sum()
    assert recomputed >= 0 and (recomputed == 0) == (requests["num_preemptions"].sum() == 0)

    header = records[0]
    assert header.policy == "econoserve" and header.predictions == "request"
    assert header.limits["num_kv_blocks"] == 2048 // BLOCK_SIZE - 1 and header.limits["saturating_token_budget"] == 512
    arrivals = [r for r in records if isinstance(r, ArrivalRecord)]
    assert sorted(r.predicted_output_tokens for r in arrivals) == sorted(trace.requests["predicted_output_tokens"])
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert sum(n for r in steps for _, n in r.scheduled) == iterations["num_prefill_tokens"].sum() + iterations["num_decode_tokens"].sum()
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    assert report.num_steps == len(steps) and report.num_finished == 32


@pytest.mark.realdata
@pytest.mark.parametrize("probe_exit", ["continue", "pause", "evict"])
def test_econoserve_probes_run_in_the_real_engine_and_replay(model_dir, tmp_path, refined_model, probe_exit):
    """EconoServe's probes (a knob of the same policy object) inside vLLM with a refined model at
    ``k = 8`` (without one nothing probes): +-50 % predictions and a cache the load overfills, so
    the curve refuses prompts and probes start (and, by ``probe_exit``, go on, pause or are
    evicted at k tokens); every request gets exactly its length, KV stays within the cache, and
    the pure-Python replay asks for exactly the batches vLLM ran. Every request arrives at once
    (``time_scale=0``), so the schedule, and with it which probes pause or are evicted, does not
    depend on how fast this machine steps."""
    _require_policy("econoserve")
    trace = _synthetic_trace(24, seed=9, max_prompt=160, max_output=64, prediction_error=0.5)
    config = {"probe_output_tokens": 8, "probe_share": 0.25, "probe_exit": probe_exit}
    result, records = _serve(model_dir, tmp_path, trace, "econoserve", kv_cache_tokens=1024, max_model_len=448,
                             policy_config=config, time_scale=0.0, options={"refined_predictor": str(refined_model)})
    requests = result.requests
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    assert (result.iterations["kv_blocks_used"] <= result.iterations["kv_blocks_capacity"]).all()
    assert records[0].policy_config["probe_output_tokens"] == 8
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    stats = report.policy.stats.extra
    assert stats["probes"] > 0 and stats["probes_past_k"] > 0
    assert (stats["probe_pauses"] > 0) == (probe_exit == "pause")
    assert (stats["probe_evictions"] > 0) == (probe_exit == "evict")


@pytest.mark.realdata
def test_alpaca_trace_under_econoserve_has_exact_lengths_and_replays(model_dir, tmp_path):
    """Alpaca prompts and responses (OPT tokenizer), Poisson arrivals, predictions within +-30 %."""
    _require_policy("econoserve")
    from econoserve.workload.datasets import TraceSpec, build_trace

    trace = build_trace(TraceSpec(dataset="alpaca", tokenizer="opt", num_requests=32, arrival="poisson", rate_rps=16, seed=0))
    output = trace.requests["output_tokens"].to_numpy()
    noise = np.random.default_rng(0).uniform(0.7, 1.3, len(output))
    trace = trace.with_predictions(np.maximum(1, np.round(output * noise)).astype(int))
    result, records = _serve(model_dir, tmp_path, trace, "econoserve", kv_cache_tokens=4096, max_model_len=2048)
    requests = result.requests
    assert len(requests) == 32 and (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == output).all()
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch
    assert report.num_finished == 32


def test_econoserve_oracle_never_preempts_when_each_request_fits(model_dir, tmp_path):
    """Exact predictions and a load that needs queueing (its total KV is twice the cache) but where
    every request fits alone: exact allocation means no preemption, in the policy or in vLLM."""
    _require_policy("econoserve-oracle")
    trace = _synthetic_trace(20, seed=6, rate_rps=64, max_prompt=200, max_output=64)
    peak_kv_tokens = (trace.requests["prompt_tokens"] + trace.requests["output_tokens"]).sum()
    kv_cache_tokens = 1024
    assert peak_kv_tokens > 2 * kv_cache_tokens
    result, records = _serve(model_dir, tmp_path, trace, "policy:econoserve-oracle", kv_cache_tokens=kv_cache_tokens)

    requests = result.requests
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    assert requests["num_preemptions"].sum() == 0 and result.iterations["num_preempted"].sum() == 0
    assert result.iterations["num_prefill_tokens"].sum() == trace.requests["prompt_tokens"].sum()  # nothing recomputed
    assert records[0].predictions == "oracle"
    assert all(r.predicted_output_tokens == r.max_tokens for r in records if isinstance(r, ArrivalRecord))
    assert all(not r.preempted for r in records if isinstance(r, StepRecord))
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch


@pytest.mark.parametrize("policy", policy_names())
def test_every_registered_policy_serves_a_trace_that_fills_the_kv_cache(model_dir, tmp_path, policy):
    """Each registered policy inside real vLLM (``policy:NAME``) under the engine's caps (256
    tokens and 4 sequences a step): a trace whose KV at full length is twice the cache completes
    with exact lengths, no step exceeds either cap, and the decisions replay."""
    trace = _synthetic_trace(16, seed=8, rate_rps=64, max_prompt=160, max_output=64, prediction_error=0.3)
    kv_cache_tokens = 768
    assert (trace.requests["prompt_tokens"] + trace.requests["output_tokens"]).sum() > 2 * kv_cache_tokens
    from dataclasses import replace

    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.run import ServeSpec, scheduler_class, scheduler_options, serve_trace

    log = tmp_path / "decisions.jsonl"
    options = {**scheduler_options(f"policy:{policy}"), "decision_log": str(log)}
    engine = EngineConfig(model=str(model_dir), scheduler_cls=scheduler_class(f"policy:{policy}"),
                          kv_cache_tokens=kv_cache_tokens, max_model_len=448, max_num_batched_tokens=256,
                          max_num_seqs=4)
    spec = ServeSpec(engine=replace(engine, extra_options=options), scheduler=f"policy:{policy}", time_scale=0.25,
                     timeout_s=300)
    result = serve_trace(trace, spec, tmp_path / "run")
    records = read_decision_log(log)
    requests = result.requests
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert max(sum(n for _, n in r.scheduled) for r in steps) <= 256
    assert max(len(r.scheduled) for r in steps) <= 4
    assert (result.iterations["kv_blocks_used"] <= result.iterations["kv_blocks_capacity"]).all()
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch


def test_sarathi_preempts_under_a_small_kv_cache_and_replays(model_dir, tmp_path):
    trace = _synthetic_trace(10, seed=7, max_prompt=160, max_output=64)
    result, records = _serve(model_dir, tmp_path, trace, "policy:sarathi", kv_cache_tokens=512, max_model_len=448)
    requests = result.requests
    assert (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    assert requests["num_preemptions"].sum() > 0
    assert result.iterations["num_preempted"].sum() == sum(len(r.preempted) for r in records if isinstance(r, StepRecord))
    report = replay_decision_log(records)
    assert report.equivalent, report.mismatch


@pytest.mark.parametrize("policy", ["sarathi", "econoserve"])
def test_aborting_in_flight_requests_frees_vllm_blocks_and_policy_reservations(model_dir, policy):
    _require_policy(policy)
    from econoserve.serving.engine import EngineConfig, OfflineEngine
    from econoserve.serving.replay import make_replay_requests

    trace = _synthetic_trace(8, seed=8, max_output=400, prediction_error=0.2)
    config = EngineConfig(model=str(model_dir), scheduler_cls="econoserve.serving.scheduler.PolicyScheduler",
                          max_model_len=1024, extra_options={"policy": policy, "keep_decisions": True})
    with OfflineEngine(config) as engine:
        scheduler = engine.scheduler
        kv = scheduler.econoserve_policy.kv_cache
        pool = scheduler.kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        requests = make_replay_requests(trace, vocab_size=VOCAB_SIZE, seed=0)
        for request in requests:
            engine.add(request)
        for _ in range(6):
            engine.engine.step()
        held_by_all = free_at_start - pool.get_num_free_blocks()
        committed_by_all = kv.num_committed_blocks
        assert held_by_all > 0 and committed_by_all >= held_by_all

        engine.engine.abort_request([r.engine_request_id for r in requests[:4]])
        engine.engine.step()
        assert 0 < free_at_start - pool.get_num_free_blocks() < held_by_all
        assert 0 < kv.num_committed_blocks < committed_by_all
        kv.check_invariants()

        engine.engine.abort_request([r.engine_request_id for r in requests[4:]])
        engine.engine.step()
        _assert_both_kv_accountings_empty(scheduler)
        assert not engine.engine.has_unfinished_requests()
        report = replay_decision_log(scheduler.decision_log.records)
        assert report.equivalent, report.mismatch

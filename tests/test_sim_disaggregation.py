"""Prefill/decode disaggregation in the cluster simulator: invariants on random disaggregated
clusters (every request finishes once, KV never over-committed, KV held on both sides while in
flight), transfer timing, configuration errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from econoserve.errors import UserError
from econoserve.sim import ClusterConfig, SimulationConfig, simulate_cluster
from econoserve.sim.catalog import get_model, get_network
from econoserve.sim.synthetic import synthetic_trace, trace_from_lists

MAX_MODEL_LEN = 512
DECODE_POLICY = {"token_budget": 1 << 20}


def prefill(**fields) -> SimulationConfig:
    return SimulationConfig(scheduler="vllm", role="prefill", max_model_len=MAX_MODEL_LEN, **fields)


def decode(**fields) -> SimulationConfig:
    fields.setdefault("policy_config", DECODE_POLICY)
    return SimulationConfig(scheduler="vllm-chunked", role="decode", max_model_len=MAX_MODEL_LEN, **fields)


@st.composite
def disaggregated(draw):
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.floats(0.0, 0.05, allow_nan=False), min_size=n, max_size=n))
    prompts = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(1, 150), min_size=n, max_size=n))
    trace = trace_from_lists(np.cumsum(gaps), prompts, outputs)

    def replica(make):
        return make(num_kv_blocks=draw(st.integers(4, 60)), node=draw(st.integers(0, 1)), check_invariants=True)

    replicas = tuple(replica(prefill) for _ in range(draw(st.integers(1, 2))))
    replicas += tuple(replica(decode) for _ in range(draw(st.integers(1, 3))))
    routers = st.sampled_from(["round-robin", "least-outstanding-tokens", "kv-aware"])
    return trace, ClusterConfig(replicas, draw(routers), draw(routers), "ethernet-25g")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=disaggregated())
def test_every_request_finishes_once_kv_held_on_both_sides_never_overcommitted(case):
    # check_invariants: each replica's KV after every step, and after every event every prompt in
    # hand-over holds its KV on the prefill replica (and, in flight, on the decode replica too)
    trace, cluster = case
    result = simulate_cluster(trace, cluster)
    requests, iterations = result.requests, result.iterations
    roles = np.array([c.role for c in cluster.replicas])

    assert requests["request_id"].tolist() == trace.requests["request_id"].tolist()
    finished = requests["status"] == "finished"
    assert (finished ^ (requests["status"] == "rejected")).all()
    assert (requests.loc[~finished, "rejection_reason"].str.len() > 0).all()
    assert (requests.loc[finished, "generated_tokens"] == requests.loc[finished, "output_tokens"]).all()
    # a request of more than one token finishes on a decode replica, after its first token
    long = finished & (requests["output_tokens"] > 1)
    assert (roles[requests.loc[long, "replica"]] == "decode").all()
    assert (requests.loc[long, "finish_time_s"] > requests.loc[long, "first_token_time_s"]).all()
    assert (requests.loc[finished, "first_token_time_s"] > requests.loc[finished, "arrival_time_s"]).all()
    for replica, steps in iterations.groupby("replica"):
        assert (steps["kv_blocks_allocated"] <= cluster.replicas[replica].num_kv_blocks).all()
        if roles[replica] == "prefill":
            assert (steps["num_decode_tokens"] == 0).all()
    # nothing is held anywhere at the end: all KV came back
    assert iterations.groupby("replica").size().size >= 1


def test_transfer_time_between_nodes_delays_decoding_by_kv_bytes_over_bandwidth():
    prompt, output = 400, 5
    trace = trace_from_lists([0.0], [prompt], [output])
    same = simulate_cluster(trace, ClusterConfig((prefill(), decode())))
    apart = simulate_cluster(trace, ClusterConfig((prefill(), decode(node=1)), network="ethernet-25g"))
    link = get_network("ethernet-25g")
    expected = link.transfer_time_s(prompt * get_model("opt-13b").kv_bytes_per_token)
    assert apart.requests["ttft_s"].iloc[0] == same.requests["ttft_s"].iloc[0]
    delay = apart.requests["jct_s"].iloc[0] - same.requests["jct_s"].iloc[0]
    nvlink_time = same.requests["jct_s"].iloc[0] - same.requests["ttft_s"].iloc[0] \
        - same.iterations.query("replica == 1")["duration_s"].sum()
    assert delay == pytest.approx(expected - nvlink_time, rel=1e-6)
    # the decode replica computed no prompt: one decode token per step, output - 1 steps
    steps = apart.iterations.query("replica == 1")
    assert steps["num_prefill_tokens"].sum() == 0 and len(steps) == output - 1


def test_decode_side_pulls_only_when_the_kv_fits_and_serves_everything():
    # a decode replica with room for about one prompt at a time: transfers queue, none is lost
    trace = trace_from_lists(np.zeros(6), [100] * 6, [40] * 6)
    result = simulate_cluster(trace, ClusterConfig((prefill(check_invariants=True),
                                                    decode(num_kv_blocks=10, check_invariants=True))))
    assert (result.requests["status"] == "finished").all()
    finish = np.sort(result.requests["finish_time_s"].to_numpy())
    assert (np.diff(finish) > 0).all()  # served one after another


def test_a_request_that_never_fits_the_decode_replica_is_rejected_with_a_reason():
    trace = trace_from_lists([0.0, 0.0], [100, 20], [300, 10])
    result = simulate_cluster(trace, ClusterConfig((prefill(), decode(num_kv_blocks=12))))
    status = result.requests.set_index("prompt_tokens")["status"]
    assert status[100] == "rejected" and status[20] == "finished"
    assert "decode replica 1" in result.requests["rejection_reason"].iloc[0]


@pytest.mark.parametrize("replicas, message", [
    ((SimulationConfig(role="prefill"),), "no decode replica"),
    ((SimulationConfig(role="decode"), SimulationConfig()), "no prefill replica"),
])
def test_a_cluster_with_one_side_only_is_a_one_line_error(replicas, message):
    with pytest.raises(UserError, match=message):
        ClusterConfig(replicas)


def test_unknown_network_and_role_are_errors():
    with pytest.raises(UserError, match="unknown network"):
        ClusterConfig((prefill(), decode()), network="carrier-pigeon")
    with pytest.raises(UserError, match="unknown replica role"):
        SimulationConfig(role="both")


def test_disaggregated_runs_are_deterministic():
    trace = synthetic_trace(60, 20.0, seed=3)
    cluster = ClusterConfig((prefill(), prefill(node=1), decode(), decode(node=1)), "least-outstanding-tokens")
    a, b = simulate_cluster(trace, cluster), simulate_cluster(trace, cluster)
    columns = [c for c in a.requests.columns if c != "scheduler_wall_time_s"]
    assert a.requests[columns].equals(b.requests[columns])


def test_kv_held_for_handover_is_not_counted_as_work_done_by_the_load_router():
    # a slow network keeps many prompts' KV held on the prefill side; the least-loaded router must
    # still spread arrivals over both prefill replicas (held KV is no request's remaining work)
    trace = synthetic_trace(80, 40.0, prompt_tokens=(200, 400), output_tokens=(20, 40), seed=5)
    cluster = ClusterConfig((prefill(), prefill(), decode(node=1, num_kv_blocks=80)), "least-outstanding-tokens",
                            network="ethernet-25g")
    steps = simulate_cluster(trace, cluster).iterations
    per_prefill = steps[steps["replica"] < 2].groupby("replica")["num_prefill_requests"].sum()
    assert per_prefill.min() >= 0.25 * per_prefill.sum()

"""Clusters of replicas behind a router: invariants on random clusters, routers, configuration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from econoserve.errors import UserError
from econoserve.policy import policy_names
from econoserve.sim import (
    WALL_CLOCK_COLUMNS,
    ClusterConfig,
    SimulationConfig,
    make_router,
    router_names,
    simulate,
    simulate_cluster,
)
from econoserve.sim.synthetic import synthetic_trace, trace_from_lists
from test_sim_properties import MAX_MODEL_LEN, workloads



@st.composite
def clusters(draw):
    """A random workload (``test_sim_properties.workloads``) over 1-4 replicas of random policies
    and cache sizes, behind a random router."""
    trace, block_size, _, _ = draw(workloads())
    replicas = tuple(
        SimulationConfig(
            scheduler=draw(st.sampled_from(policy_names())),
            block_size=block_size,
            num_kv_blocks=draw(st.integers(4, 60)) * (16 // block_size),
            max_model_len=MAX_MODEL_LEN,
            check_invariants=True,
        )
        for _ in range(draw(st.integers(1, 4)))
    )
    return trace, ClusterConfig(replicas, draw(st.sampled_from(router_names())))


def _deterministic(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in WALL_CLOCK_COLUMNS if c in frame.columns])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=clusters())
def test_no_request_lost_or_served_twice_and_kv_never_overcommitted_on_any_replica(case):
    trace, cluster = case
    result = simulate_cluster(trace, cluster)
    requests, iterations = result.requests, result.iterations

    # every request exactly once, on exactly one replica, with exactly its output tokens
    assert requests["request_id"].tolist() == trace.requests["request_id"].tolist()
    finished = requests["status"] == "finished"
    assert (finished ^ (requests["status"] == "rejected")).all()
    assert requests["replica"].between(0, len(cluster.replicas) - 1).all()
    assert (requests.loc[finished, "generated_tokens"] == requests.loc[finished, "output_tokens"]).all()
    assert (requests.loc[~finished, "rejection_reason"].str.len() > 0).all()

    for replica, steps in iterations.groupby("replica"):
        # KV never over-committed; each replica's clock monotone
        assert (steps["kv_blocks_allocated"] <= cluster.replicas[replica].num_kv_blocks).all()
        assert (steps["kv_tokens_stored"] <= steps["kv_blocks_used"] * steps["block_size"]).all()
        ends = (steps["start_time_s"] + steps["duration_s"]).to_numpy()
        assert (steps["start_time_s"].to_numpy()[1:] >= ends[:-1]).all()
        assert steps["iteration"].tolist() == list(range(len(steps)))
        # a request served here finished at the end of one of this replica's steps
        served = requests[finished & (requests["replica"] == replica)]
        assert served["finish_time_s"].isin(ends).all()
    assert (requests.loc[finished, "first_token_time_s"] >= requests.loc[finished, "arrival_time_s"]).all()

    # deterministic
    again = simulate_cluster(trace, cluster)
    pd.testing.assert_frame_equal(requests, again.requests)
    pd.testing.assert_frame_equal(_deterministic(iterations), _deterministic(again.iterations))


@pytest.mark.parametrize("scheduler", ["vllm", "econoserve", "orca"])
def test_round_robin_replicas_are_independent_single_engines(scheduler):
    """Under round-robin each replica sees every N-th request and nothing else, so its tables
    equal a one-replica run of that sub-trace (skip-ahead horizons differ; results may not)."""
    trace = synthetic_trace(90, rate_rps=12.0, seed=5)
    config = SimulationConfig(scheduler=scheduler, predictions="oracle", num_kv_blocks=300)
    result = simulate_cluster(trace, ClusterConfig.uniform(config, 3, "round-robin"))
    for replica in range(3):
        rows = np.arange(replica, len(trace), 3)
        alone = simulate(trace_from_lists(trace.requests["arrival_time_s"].to_numpy()[rows],
                                          trace.requests["prompt_tokens"].to_numpy()[rows],
                                          trace.requests["output_tokens"].to_numpy()[rows]), config)
        mine = result.requests[result.requests["replica"] == replica].reset_index(drop=True)
        assert mine["request_id"].tolist() == rows.tolist()
        columns = [c for c in alone.requests.columns if c not in ("request_id", "replica")]
        pd.testing.assert_frame_equal(mine[columns], alone.requests[columns])
        steps = result.iterations[result.iterations["replica"] == replica].reset_index(drop=True)
        columns = [c for c in alone.iterations.columns if c not in (*WALL_CLOCK_COLUMNS, "skipped", "replica")]
        pd.testing.assert_frame_equal(steps[columns], alone.iterations[columns])


class _View:
    def __init__(self, outstanding: int, predicted_kv: int, capacity: int) -> None:
        self.outstanding_tokens = outstanding
        self.predicted_kv_tokens = predicted_kv
        self.kv_capacity_tokens = capacity

    def expected_request_tokens(self, row: int) -> int:
        return 100


def test_routers_choose_by_their_rule_and_break_ties_by_index():
    views = [_View(500, 1000, 2000), _View(200, 1900, 8000), _View(200, 100, 400)]
    robin = make_router("round-robin")
    assert [robin.route(row, views) for row in range(5)] == [0, 1, 2, 0, 1]
    assert make_router("least-outstanding-tokens").route(0, views) == 1  # tie 200/200 -> lower index
    # predicted occupancy with the new request: 1100/2000, 2000/8000, 200/400 -> the big replica
    assert make_router("kv-aware").route(0, views) == 1
    with pytest.raises(UserError, match="unknown router 'nearest'"):
        make_router("nearest")


def test_least_loaded_router_spreads_a_burst_and_beats_round_robin_on_skewed_work():
    trace = trace_from_lists([0.0] * 8, [1000, 10, 10, 10, 1000, 10, 10, 10], [400, 4, 4, 4, 400, 4, 4, 4])
    config = SimulationConfig(scheduler="vllm", predictions="oracle")
    least = simulate_cluster(trace, ClusterConfig.uniform(config, 2, "least-outstanding-tokens"))
    # the two long requests go to different replicas
    assert least.requests["replica"].iloc[0] != least.requests["replica"].iloc[4]
    robin = simulate_cluster(trace, ClusterConfig.uniform(config, 2, "round-robin"))
    assert robin.requests["replica"].iloc[0] == robin.requests["replica"].iloc[4]
    assert least.summary["makespan_s"] < robin.summary["makespan_s"]


def test_a_heterogeneous_cluster_from_a_description_file(tmp_path):
    description = {
        "router": "kv-aware",
        "defaults": {"model": "llama-2-13b", "predictions": "oracle"},
        "replicas": [{"count": 2, "scheduler": "econoserve"}, {"scheduler": "vllm", "gpu": "h100-80gb"}],
    }
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(description))
    cluster = ClusterConfig.from_file(path)
    assert [c.scheduler for c in cluster.replicas] == ["econoserve", "econoserve", "vllm"]
    assert cluster.replicas[2].gpu == "h100-80gb" and cluster.replicas[0].model == "llama-2-13b"
    result = simulate_cluster(synthetic_trace(60, rate_rps=20.0, seed=3), cluster)
    assert set(result.requests["replica"]) == {0, 1, 2}
    assert result.summary["num_replicas"] == 3 and result.summary["scheduler"] == "econoserve+vllm"
    assert (result.requests["status"] == "finished").all()
    assert [r["simulation"]["gpu"] for r in result.config["cluster"]["replicas"]] == ["a100-80gb"] * 2 + ["h100-80gb"]


@pytest.mark.parametrize(
    "description, message",
    [
        ({"replicas": []}, "at least one replica, got 0"),
        ({"replicas": [{"count": 0, "scheduler": "vllm"}]}, "at least one replica, got 0"),
        ({"replicas": [{"count": 2}]}, r"replicas\[0\]: no scheduler"),
        ({"router": "nearest", "replicas": [{"scheduler": "vllm"}]}, "unknown router 'nearest'"),
        ({"replicas": [{"colour": "red"}]}, r"replicas\[0\]: unknown field\(s\) colour"),
        ({"replicas": [{"scheduler": "vllm", "slo_scale": -1}]}, r"replicas\[0\]: --slo-scale must be > 0"),
        ({"replicas": {}}, "expected an object with a 'replicas' list"),
        ({"replicas": [{}], "nodes": 3}, "unknown key"),
    ],
)
def test_bad_cluster_descriptions_are_one_line_user_errors(tmp_path, description, message):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(description))
    with pytest.raises(UserError, match=message):
        ClusterConfig.from_file(path)


def test_a_replica_whose_model_does_not_fit_is_named():
    cluster = ClusterConfig((SimulationConfig(), SimulationConfig(model="llama-2-70b", gpu="a100-40gb")))
    with pytest.raises(UserError, match="replica 1: .*"):
        simulate_cluster(trace_from_lists([0.0], [10], [5]), cluster)
    with pytest.raises(UserError, match="--replicas must be >= 1"):
        ClusterConfig.uniform(SimulationConfig(), 0)

"""``econoserve simulate`` and ``econoserve sweep`` end to end, and real-data runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from econoserve.cli import main
from econoserve.policy import policy_names
from econoserve.sim import SimulationConfig, simulate
from econoserve.sim.synthetic import synthetic_trace


@pytest.fixture()
def trace_file(tmp_path):
    path = tmp_path / "trace.parquet"
    synthetic_trace(60, rate_rps=3, seed=5).write(path)
    return path


def test_simulate_writes_a_run_directory(trace_file, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["simulate", "--trace", str(trace_file), "--scheduler", "vllm-chunked", "--model", "llama-2-7b",
                   "--gpu", "h100-80gb", "--slo-scale", "3", "--seed", "4", "--no-progress",
                   "--policy-option", "token_budget=1024", "-o", str(out)])
    assert status == 0
    assert "60/60 finished" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["completed"] == 60
    assert config["simulation"]["slo_scale"] == 3 and config["simulation"]["model"] == "llama-2-7b"
    assert config["policy"]["config"]["token_budget"] == 1024
    assert len(pd.read_parquet(out / "requests.parquet")) == 60


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduler", "fifo"], "unknown scheduler 'fifo'"),
        (["--scheduler", "vllm", "--gpu", "tpu"], "unknown GPU"),
        (["--scheduler", "vllm", "--model", "opt-1b"], "unknown model"),
        (["--scheduler", "vllm", "--tp", "0"], "argument --tp: expected an integer >= 1"),
        (["--scheduler", "sarathi", "--policy-option", "token_budget=-1"], "token_budget must be > 0"),
        (["--scheduler", "sarathi", "--policy-option", "oops"], "expected KEY=VALUE"),
        (["--scheduler", "vllm", "--slo-scale", "-1"], "slo-scale"),
    ],
)
def test_simulate_bad_flags_give_one_line_errors(trace_file, tmp_path, capsys, flags, message):
    status = main(["simulate", "--trace", str(trace_file), "--no-progress", "-o", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_simulate_bad_trace_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    assert main(["simulate", "--trace", str(bad), "--scheduler", "vllm", "-o", str(tmp_path / "x")]) == 2
    assert "not a readable parquet trace" in capsys.readouterr().err


@pytest.mark.realdata
def test_sweep_on_real_data_writes_one_tidy_table(tmp_path):
    out = tmp_path / "sweep"
    status = main(["sweep", "--datasets", "alpaca", "--rates", "2", "8", "--schedulers", "vllm", "orca",
                   "--num-requests", "80", "--jobs", "2", "-o", str(out)])
    assert status == 0
    table = pd.read_parquet(out / "sweep.parquet")
    assert len(table) == 4
    assert set(table.scheduler) == {"vllm", "orca"} and set(table.rate_rps) == {2.0, 8.0}
    goodput = pd.read_csv(out / "goodput.csv")
    assert set(goodput.columns) == {"dataset", "scheduler", "goodput_rps"}


@pytest.mark.realdata
def test_every_policy_serves_real_azure_conversation_lengths():
    from econoserve.workload.datasets import TraceSpec, build_trace

    trace = build_trace(TraceSpec(dataset="azure-conv", num_requests=400, arrival="poisson", rate_rps=3.0, seed=0))
    source = trace.requests
    fits = source.prompt_tokens + source.output_tokens <= 4096
    summaries = {}
    for name in policy_names():
        result = simulate(trace, SimulationConfig(scheduler=name, model="llama-2-13b", gpu="a100-40gb",
                                                  check_invariants=True))
        requests = result.requests
        # exactly the requests beyond the context are rejected; everything else finishes in full
        assert (requests.status == "rejected").tolist() == (~fits).tolist()
        done = requests.status == "finished"
        assert (requests.generated_tokens[done] == requests.output_tokens[done]).all()
        summaries[name] = result.summary
    # on a 40 GB card with Llama-2-13B the KV cache is tight: Orca's maximum-length reservation
    # admits fewer requests at once and queues longer than vLLM's on-demand blocks
    assert summaries["orca"]["mean_ttft_s"] > summaries["vllm"]["mean_ttft_s"]
    assert summaries["orca"]["preempted_fraction"] == 0


def test_simulate_a_cluster_of_replicas_behind_a_router(trace_file, tmp_path, capsys):
    out = tmp_path / "cluster"
    status = main(["simulate", "--trace", str(trace_file), "--scheduler", "econoserve", "--predictions", "oracle",
                   "--replicas", "3", "--router", "least-outstanding-tokens", "--no-progress", "-o", str(out)])
    assert status == 0
    assert "on 3 replicas (least-outstanding-tokens)" in capsys.readouterr().out
    requests = pd.read_parquet(out / "requests.parquet")
    iterations = pd.read_parquet(out / "iterations.parquet")
    assert set(requests["replica"]) == set(iterations["replica"]) == {0, 1, 2}
    config = json.loads((out / "config.json").read_text())
    assert config["cluster"]["router"] == "least-outstanding-tokens" and len(config["cluster"]["replicas"]) == 3


def test_simulate_a_cluster_description_file(trace_file, tmp_path, capsys):
    description = tmp_path / "cluster.json"
    description.write_text(json.dumps({"router": "kv-aware", "replicas": [
        {"scheduler": "sarathi", "policy_config": {"token_budget": 256}}, {"scheduler": "vllm", "count": 2}]}))
    out = tmp_path / "run"
    assert main(["simulate", "--trace", str(trace_file), "--cluster", str(description), "--no-progress",
                 "-o", str(out)]) == 0
    assert "sarathi+vllm on 3 replicas (kv-aware)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert [r["policy"]["name"] for r in config["cluster"]["replicas"]] == ["sarathi", "vllm", "vllm"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduler", "vllm", "--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--scheduler", "vllm", "--replicas", "2", "--router", "nearest"], "unknown router 'nearest'"),
        (["--scheduler", "vllm", "--replicas", "2", "--model", "llama-2-70b", "--gpu", "a100-40gb"],
         "replica 0: llama-2-70b"),
        (["--replicas", "2"], "--scheduler is required"),
        (["--cluster", "missing.json"], "cannot read the cluster description"),
    ],
)
def test_simulate_bad_cluster_flags_give_one_line_errors(trace_file, tmp_path, capsys, flags, message):
    status = main(["simulate", "--trace", str(trace_file), "--no-progress", "-o", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_cluster_file_without_schedulers_needs_the_flag(trace_file, tmp_path, capsys):
    description = tmp_path / "cluster.json"
    description.write_text(json.dumps({"replicas": [{"count": 2}]}))
    args = ["simulate", "--trace", str(trace_file), "--cluster", str(description), "--no-progress",
            "-o", str(tmp_path / "x")]
    assert main(args) == 2
    assert "replicas[0]: no scheduler" in capsys.readouterr().err
    assert main([*args, "--scheduler", "orca"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--address", "auto"], "--address 'auto' is for the ray backend"),
    (["--jobs", "0"], "argument --jobs: expected an integer >= 1"),
])
def test_sweep_bad_backend_flags_give_one_line_errors(tmp_path, capsys, flags, message):
    status = main(["sweep", "--datasets", "alpaca", "--rates", "2", "--schedulers", "vllm", "-o", str(tmp_path / "x"),
                   *flags])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1

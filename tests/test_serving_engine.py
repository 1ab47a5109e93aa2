"""Real vLLM (CPU) in this process: the tiny model, trace replay with vLLM's default policy, aborts.

Skipped when vLLM is not importable, unless ``ECONOSERVE_REQUIRE_VLLM=1`` (then the run fails; tests/conftest.py).
Run with the serving venv: ``.venv-serving/bin/pytest tests/test_serving_*.py``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from econoserve.results import read_iterations, read_requests

pytestmark = [
    pytest.mark.serving,
]


def _synthetic_trace(num_requests: int, seed: int = 0, rate_rps: float = 16.0, max_output: int = 96):
    from econoserve.workload.trace import Trace

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests),
            "arrival_time_s": np.cumsum(rng.exponential(1 / rate_rps, num_requests)),
            "prompt_tokens": rng.integers(4, 300, num_requests),
            "output_tokens": rng.integers(1, max_output, num_requests),
            "dataset": "synthetic",
        }
    )
    return Trace.from_frame(frame)


# --------------------------------------------------------------------- the model
def test_tiny_model_is_deterministic_and_cached(tmp_path):
    from econoserve.serving.models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(num_layers=2, hidden_size=64, num_heads=2, ffn_dim=128, vocab_size=512)
    first = build_tiny_model(spec, tmp_path / "a")
    second = build_tiny_model(spec, tmp_path / "b")
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(first) == digest(second)
    assert build_tiny_model(spec, tmp_path / "a") == first  # reused, not rebuilt
    other = build_tiny_model(TinyModelSpec(num_layers=2, hidden_size=64, num_heads=2, ffn_dim=128, vocab_size=512, seed=1), tmp_path / "a")
    assert digest(other) != digest(first)
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "opt" and config["num_hidden_layers"] == 2 and config["hidden_size"] == 64


# --------------------------------------------------------------------- replay
@pytest.mark.realdata
def test_alpaca_trace_completes_with_exact_lengths_under_vllm_default_scheduler(model_dir, tmp_path):
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.run import ServeSpec, serve_trace
    from econoserve.workload.datasets import TraceSpec, build_trace

    trace = build_trace(TraceSpec(dataset="alpaca", tokenizer="opt", num_requests=32, arrival="poisson", rate_rps=16, seed=0))
    spec = ServeSpec(engine=EngineConfig(model=str(model_dir)), mode="offline", timeout_s=300)
    result = serve_trace(trace, spec, tmp_path / "run")

    requests = result.requests
    assert len(requests) == 32 and (requests["status"] == "finished").all()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    assert (requests["jct_s"] >= requests["ttft_s"]).all() and (requests["ttft_s"] > 0).all()

    iterations = result.iterations
    assert len(iterations) > 0 and (iterations["duration_s"] > 0).all()
    # Every prompt token is prefilled once and every later token decoded once (no preemption here).
    assert requests["num_preemptions"].sum() == 0
    assert iterations["num_prefill_tokens"].sum() == trace.requests["prompt_tokens"].sum()
    assert iterations["num_decode_tokens"].sum() == (trace.requests["output_tokens"] - 1).sum()
    assert (iterations["kv_blocks_used"] <= iterations["kv_blocks_capacity"]).all()

    run = tmp_path / "run"
    assert read_requests(run).equals(requests) and read_iterations(run).equals(iterations)
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["completed"] == 32 and summary["throughput_rps"] > 0
    assert config["engine"]["scheduler_cls"].endswith("RecordingScheduler")
    assert config["trace"]["spec"]["dataset"] == "alpaca"
    assert not (run / "engine_steps.jsonl").exists()


def test_small_kv_cache_preempts_and_still_completes(model_dir, tmp_path):
    """With 4 blocks of KV for 12 concurrent requests vLLM must preempt; nothing is lost. The
    run's tables and the simulator's of the same trace on the same engine shape are one format."""
    from econoserve.results import ITERATION_SCHEMA, REQUEST_SCHEMA
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.fidelity import EngineShape, simulation_config
    from econoserve.serving.run import ServeSpec, serve_trace
    from econoserve.sim import simulate

    trace = _synthetic_trace(12, seed=1, max_output=120)
    engine = EngineConfig(model=str(model_dir), kv_cache_tokens=512, max_model_len=448)
    result = serve_trace(trace, ServeSpec(engine=engine, time_scale=0), tmp_path / "run")
    requests, steps = read_requests(tmp_path / "run"), read_iterations(tmp_path / "run")
    assert (requests["status"] == "finished").all() and (requests["replica"] == 0).all()
    assert (requests["dataset"] == "synthetic").all()
    assert (requests["generated_tokens"] == requests["output_tokens"]).all()
    assert requests["num_preemptions"].sum() > 0
    assert steps["num_preempted"].sum() == requests["num_preemptions"].sum()
    assert (steps["kv_blocks_capacity"] == 512 // 32 - 1).all()  # vLLM keeps one null block
    assert (steps["kv_tokens_stored"] <= steps["kv_blocks_used"] * steps["block_size"]).all()
    assert (steps["kv_tokens_stored"] > (steps["kv_blocks_used"] - steps["num_running"]) * steps["block_size"]).all()
    assert (steps["token_budget"] == engine.max_num_batched_tokens).all() and (steps["replica"] == 0).all()

    shape = EngineShape.from_run_config(result.config)
    simulated = simulate(trace, simulation_config(shape, "vllm", "roofline")).write(tmp_path / "sim")
    for read, schema in ((read_requests, REQUEST_SCHEMA), (read_iterations, ITERATION_SCHEMA)):
        real, sim = read(tmp_path / "run"), read(simulated)  # both validated against the schema
        assert list(real.columns) == list(sim.columns) == list(schema)
        assert real.dtypes.equals(sim.dtypes)
    real_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(real_summary) <= set(json.loads((simulated / "summary.json").read_text()))


def test_aborting_in_flight_requests_frees_their_kv_blocks(model_dir):
    from econoserve.serving.engine import EngineConfig, OfflineEngine
    from econoserve.serving.replay import make_replay_requests

    trace = _synthetic_trace(8, seed=2, max_output=400)
    with OfflineEngine(EngineConfig(model=str(model_dir))) as engine:
        scheduler = engine.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        requests = make_replay_requests(trace, vocab_size=50272, seed=0)
        for request in requests:
            engine.add(request)
        for _ in range(5):
            engine.engine.step()
        assert len(scheduler.running) == 8
        held_by_all = free_at_start - pool.get_num_free_blocks()
        assert held_by_all > 0

        engine.engine.abort_request([r.engine_request_id for r in requests[:4]])
        engine.engine.step()
        held_by_rest = free_at_start - pool.get_num_free_blocks()
        assert 0 < held_by_rest < held_by_all
        assert len(scheduler.running) == 4

        engine.engine.abort_request([r.engine_request_id for r in requests[4:]])
        engine.engine.step()
        assert pool.get_num_free_blocks() == free_at_start
        assert scheduler.kv_cache_manager.usage == 0.0
        assert not scheduler.requests and not engine.engine.has_unfinished_requests()


def test_profiler_measures_the_compositions_it_asks_for(model_dir, tmp_path):
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.profiler import ProfileGrid, profile_step_times

    grid = ProfileGrid(prefill_tokens=(0, 64), decode_batch_sizes=(0, 4), context_lengths=(32, 128), repeats=2)
    profile = profile_step_times(EngineConfig(model=str(model_dir)), grid)
    table = profile.table
    assert profile.dropped_steps == 0
    assert set(zip(table.cell_prefill_tokens, table.cell_decode_batch, table.cell_context_length)) == set(grid.cells())
    assert (table["prefill_tokens"] == table["cell_prefill_tokens"]).all()
    assert (table["decode_tokens"] == table["cell_decode_batch"]).all()
    decoding = table[table.cell_decode_batch > 0]
    assert (decoding["context_tokens"] >= decoding["cell_decode_batch"] * decoding["cell_context_length"]).all()
    assert (table["step_time_s"] > 0).all()  # measured values themselves are not asserted: they depend on load
    written = profile.write(tmp_path / "steps.csv")
    assert list(pd.read_csv(written).columns[:4]) == ["prefill_tokens", "decode_tokens", "context_tokens", "step_time_s"]


def test_predicted_length_reaches_the_scheduler_in_extra_args(model_dir):
    """The EconoServe scheduler reads a request's predicted length from SamplingParams.extra_args."""
    from econoserve.serving.engine import EngineConfig, OfflineEngine
    from econoserve.serving.replay import make_replay_requests

    trace = _synthetic_trace(3, seed=3)
    trace = trace.with_predictions(np.array([7, 8, 9]))
    with OfflineEngine(EngineConfig(model=str(model_dir))) as engine:
        requests = make_replay_requests(trace, vocab_size=50272)
        for request in requests:
            engine.add(request)
        seen = {
            r.request_id.rsplit("-", 1)[0]: r.sampling_params.extra_args["predicted_output_tokens"]
            for r in engine.scheduler.requests.values()
        }
        assert seen == {"trace-req-0": 7, "trace-req-1": 8, "trace-req-2": 9}
        engine.engine.abort_request([r.engine_request_id for r in requests])


def test_cli_serve_and_profile_engine_end_to_end(tmp_path, capsys):
    from econoserve.cli import main
    from econoserve.serving.profiler import fit_linear_step_model, step_model_error

    trace_path = tmp_path / "trace.parquet"
    _synthetic_trace(8, seed=4).write(trace_path)
    run = tmp_path / "run"
    status = main(["serve", "--trace", str(trace_path), "-o", str(run), "--model", "tiny-opt", "--scheduler", "vllm",
                   "--time-scale", "0", "--num-requests", "6", "--tiny-layers", "2"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_requests"] == 6 and summary["completed"] == 6
    assert json.loads((run / "config.json").read_text())["engine"]["model"].endswith(tuple("0123456789abcdef"))  # the built tiny model

    table = tmp_path / "steps.parquet"
    status = main(["profile-engine", "-o", str(table), "--prefill-tokens", "0,32", "--decode-batch-sizes", "0,2",
                   "--context-lengths", "16", "--repeats", "4", "--tiny-layers", "2"])
    assert status == 0, capsys.readouterr().err
    steps = pd.read_parquet(table)
    assert len(steps) == 3 * 4
    error = step_model_error(read_iterations(run), fit_linear_step_model(steps))
    assert error["num_steps"] > 0 and error["median_relative_error"] >= 0

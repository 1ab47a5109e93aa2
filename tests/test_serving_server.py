"""vLLM's OpenAI server on loopback: replay over HTTP, and no process left behind, failures included.

Skipped when vLLM is not importable, unless ``ECONOSERVE_REQUIRE_VLLM=1`` (then the run fails; tests/conftest.py).
Each test starts a server (about 20 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket

import numpy as np
import pandas as pd
import pytest

pytestmark = [
    pytest.mark.serving,
    pytest.mark.slow,
]


def _trace(num_requests: int, seed: int = 0, max_output: int = 64):
    from econoserve.workload.trace import Trace

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests),
            "arrival_time_s": np.cumsum(rng.exponential(1 / 16, num_requests)),
            "prompt_tokens": rng.integers(4, 200, num_requests),
            "output_tokens": rng.integers(1, max_output, num_requests),
            "dataset": "synthetic",
        }
    )
    return Trace.from_frame(frame)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def started_groups(monkeypatch):
    """Process-group ids of every server started during the test."""
    from econoserve.serving.server import VllmServer

    groups: list[int] = []
    original = VllmServer._wait_healthy

    def wait_healthy(self):
        groups.append(self.pgid)
        return original(self)

    monkeypatch.setattr(VllmServer, "_wait_healthy", wait_healthy)
    return groups


def test_server_replay_streams_exact_lengths_and_stops_cleanly(model_dir, tmp_path, started_groups):
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.run import ServeSpec, serve_trace
    from econoserve.serving.server import live_group_members

    trace = _trace(16)
    spec = ServeSpec(engine=EngineConfig(model=str(model_dir)), mode="server")
    result = serve_trace(trace, spec, tmp_path / "run")

    requests = result.requests
    assert (requests["status"] == "finished").all(), requests["rejection_reason"].tolist()
    assert (requests["generated_tokens"] == trace.requests["output_tokens"].to_numpy()).all()
    assert (requests["ttft_s"] > 0).all()
    # Per-step records come back from vLLM's engine-core process.
    assert result.iterations["num_prefill_tokens"].sum() == trace.requests["prompt_tokens"].sum()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mode"] == "server"
    assert (tmp_path / "run" / "server.log").is_file()
    assert len(started_groups) == 1 and live_group_members(started_groups[0]) == []


def test_client_failing_mid_run_leaves_no_process(model_dir, tmp_path):
    from econoserve.serving.client import replay_over_http
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.replay import make_replay_requests
    from econoserve.serving.server import VllmServer, live_group_members

    requests = make_replay_requests(_trace(8, max_output=1500), vocab_size=50272, time_scale=0)
    server = VllmServer(EngineConfig(model=str(model_dir)), tmp_path / "server.log")
    with pytest.raises(asyncio.TimeoutError):
        with server:
            pgid, port = server.pgid, server.port
            assert len(live_group_members(pgid)) >= 2  # API server + engine core
            # The client gives up while every request is still streaming.
            asyncio.run(asyncio.wait_for(replay_over_http(server.base_url, requests), timeout=1.0))
    assert live_group_members(pgid) == []
    assert not _port_open(port)
    assert server.process is None


def test_server_that_cannot_start_reports_its_log_and_leaves_no_process(tmp_path, started_groups):
    from econoserve.serving.engine import EngineConfig, ServingError
    from econoserve.serving.server import ServerOptions, VllmServer, live_group_members

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"model_type": "opt", "num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8, "vocab_size": 16})
    )  # no weights: vLLM fails while loading
    config = EngineConfig(model=str(broken), max_model_len=64, kv_cache_tokens=256)
    server = VllmServer(config, tmp_path / "server.log", ServerOptions(startup_timeout_s=120))
    with pytest.raises(ServingError, match="during start-up|not healthy") as error:
        server.start()
    assert "server.log" in str(error.value)
    assert server.process is None
    assert len(started_groups) == 1 and live_group_members(started_groups[0]) == []


def test_harness_killed_outright_takes_its_server_down(model_dir, tmp_path):
    """SIGKILL gives the harness no chance to clean up; the parent-death signal must."""
    import signal
    import subprocess
    import sys
    import time

    from econoserve.serving.server import live_group_members

    script = (
        "import sys, time\n"
        "from econoserve.serving.engine import EngineConfig\n"
        "from econoserve.serving.server import VllmServer\n"
        f"server = VllmServer(EngineConfig(model={str(model_dir)!r}), {str(tmp_path / 'server.log')!r})\n"
        "server.start()\n"
        "print(server.pgid, flush=True)\n"
        "time.sleep(600)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = harness.stdout.readline()
        assert line.strip().isdigit(), f"harness did not start a server (see {tmp_path / 'server.log'})"
        pgid = int(line)
        assert live_group_members(pgid)
    finally:
        harness.send_signal(signal.SIGKILL)
        harness.wait()
    deadline = time.monotonic() + 60
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = live_group_members(pgid)
    if survivors:  # do not leave them to the next test
        os.killpg(pgid, signal.SIGKILL)
    assert survivors == []

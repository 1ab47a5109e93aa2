"""Real clients against ``vllm serve --scheduler-cls econoserve.serving.scheduler.EconoServeScheduler``.

One server on loopback for the module (the tiny random OPT with the GPT-2 tokenizer and a chat
template, a length model for clients that send no prediction, a decision log), started with
``vllm serve`` as a user types it and always stopped (process group SIGTERM, then SIGKILL):

* vLLM's own benchmark client, ``vllm bench serve``, on its random dataset and on a
  ShareGPT-format file made from a trace, at a request rate with bursty (gamma) arrivals: its
  report must show every request completed, none failed, and exactly the requested output tokens;
* the official ``openai`` client, completions and chat, streaming and not: exact token counts
  (``max_tokens`` with ``ignore_eos``), and the scheduler's own prediction for every request that
  sent none (a supplied one wins).

Bounded: a few dozen requests, each client call under a timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from econoserve.predictor.model import LengthPredictor
from econoserve.workload.trace import Trace

pytestmark = [pytest.mark.serving, pytest.mark.realdata, pytest.mark.slow]

SCHEDULER = "econoserve.serving.scheduler.EconoServeScheduler"
CLIENT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(model_dir, length_model, tmp_path_factory):
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.models import with_gpt2_tokenizer
    from econoserve.serving.server import ServerOptions, VllmServer

    run_dir = tmp_path_factory.mktemp("server")
    config = EngineConfig(
        model=str(with_gpt2_tokenizer(model_dir)), scheduler_cls=SCHEDULER, skip_tokenizer_init=False,
        max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512, kv_cache_tokens=8192,
        extra_options={"policy": "econoserve", "predictor": str(length_model),
                       "decision_log": str(run_dir / "decisions.jsonl")},
    )
    with VllmServer(config, run_dir / "server.log", ServerOptions(launcher="vllm-serve")) as running:
        running.decision_log = run_dir / "decisions.jsonl"
        yield running


def _bench_serve(server, tmp_path: Path, *dataset_args: str) -> dict:
    from econoserve.serving.server import SERVED_MODEL_NAME

    command = [
        sys.executable, "-m", "econoserve.serving.vllm_cli", "bench", "serve",
        "--backend", "vllm", "--base-url", server.base_url, "--model", SERVED_MODEL_NAME,
        "--tokenizer", str(server.config.model), "--request-rate", "6", "--burstiness", "0.5", "--seed", "0",
        "--ignore-eos", "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename",
        "result.json", "--ready-check-timeout-sec", "30", *dataset_args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def test_vllm_bench_serve_random_dataset_completes_every_request(server, tmp_path):
    report = _bench_serve(server, tmp_path, "--dataset-name", "random", "--num-prompts", "16",
                          "--random-input-len", "48", "--random-output-len", "12", "--random-range-ratio", "0.0")
    assert report["completed"] == 16 and report["failed"] == 0, report.get("errors")
    assert report["total_output_tokens"] == 16 * 12 and report["request_rate"] == 6 and report["burstiness"] == 0.5


def test_vllm_bench_serve_sharegpt_file_from_a_trace_gets_the_traces_lengths(server, tmp_path):
    from econoserve.serving.sharegpt import write_sharegpt

    rng = np.random.default_rng(3)
    words = ["explain", "the", "ocean", "robot", "write", "a", "story", "about", "coffee", "moon"]
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(6, 60)))) for _ in range(12)]
    outputs = rng.integers(4, 40, size=12)
    trace = Trace.from_frame(pd.DataFrame({
        "request_id": np.arange(12), "arrival_time_s": np.arange(12) * 0.1, "prompt_tokens": [len(p.split()) for p in prompts],
        "output_tokens": outputs, "dataset": "synthetic", "prompt_text": prompts,
    }))  # fmt: skip
    path = write_sharegpt(trace, tmp_path / "sharegpt.json")
    report = _bench_serve(server, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path),
                          "--num-prompts", "12")
    assert report["completed"] == 12 and report["failed"] == 0, report.get("errors")
    assert report["total_output_tokens"] == int(outputs.sum())
    assert sorted(report["output_lens"]) == sorted(int(n) for n in outputs)


def test_openai_client_gets_exact_token_counts_and_the_schedulers_predictions(server, length_model):
    import openai

    from econoserve.serving.server import SERVED_MODEL_NAME

    before = len(_arrivals(server))
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)
    exact = {"ignore_eos": True}
    completion = client.completions.create(model=SERVED_MODEL_NAME, prompt="Tell me about the sea", max_tokens=7,
                                           extra_body=exact)
    assert completion.usage.completion_tokens == 7 and completion.choices[0].finish_reason == "length"
    stream = client.completions.create(model=SERVED_MODEL_NAME, prompt="Write a poem about coffee", max_tokens=9,
                                       stream=True, stream_options={"include_usage": True}, extra_body=exact)
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    messages = [{"role": "user", "content": "Say something about the moon"}]
    chat = client.chat.completions.create(model=SERVED_MODEL_NAME, messages=messages, max_tokens=11, extra_body=exact)
    assert chat.usage.completion_tokens == 11 and chat.choices[0].finish_reason == "length"
    chat_stream = client.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, max_tokens=13, stream=True, stream_options={"include_usage": True},
        extra_body={**exact, "vllm_xargs": {"predicted_output_tokens": 5}},  # a client that does send a prediction
    )
    chat_chunks = list(chat_stream)
    assert chat_chunks[-1].usage.completion_tokens == 13

    arrivals = _arrivals(server)[before:]
    assert [a.max_tokens for a in arrivals] == [7, 9, 11, 13]
    model = LengthPredictor.load(length_model)
    expected = model.predict(None, np.array([a.num_prompt_tokens for a in arrivals[:3]]))
    assert [a.predicted_output_tokens for a in arrivals] == [*expected.tolist(), 5]
    assert all(a.rejection is None for a in arrivals)


def _arrivals(server) -> list:
    from econoserve.serving.decisions import ArrivalRecord, read_decision_log

    return [r for r in read_decision_log(server.decision_log) if isinstance(r, ArrivalRecord)]

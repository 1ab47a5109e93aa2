"""Every trace builder on the real data: counts, positive lengths, filters, determinism."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from econoserve.cli import main
from econoserve.errors import UserError
from econoserve.workload.datasets import (
    DATASETS,
    LoadOptions,
    ShareGPTFilter,
    TraceSpec,
    alpaca_prompt,
    build_trace,
    load_requests,
    load_vicuna_lengths,
)
from econoserve.workload.tokenizer import load_tokenizer
from econoserve.workload.trace import Trace

pytestmark = pytest.mark.realdata


def mirror_file(name: str) -> Path:
    return Path(os.environ["ECONOSERVE_DATA_MIRROR"]) / name


# Counts recomputed here from the raw files, independently of the loaders.
def raw_alpaca() -> list[dict]:
    return json.load(gzip.open(mirror_file("alpaca_data_52k.json.gz")))


def test_alpaca_requests():
    raw = raw_alpaca()
    requests = load_requests("alpaca", "llama2")
    non_empty = [i for i, r in enumerate(raw) if r["output"].strip()]
    assert requests["source_index"].tolist() == non_empty
    assert len(raw) == 52_002 and len(requests) == len(non_empty) > 51_900
    assert (requests[["prompt_tokens", "output_tokens"]] > 0).all().all()
    with_input = next(i for i, r in enumerate(raw) if r["input"].strip())
    row = requests.set_index("source_index").loc[with_input]
    assert row["prompt_text"] == f"{raw[with_input]['instruction']}\n\n{raw[with_input]['input']}"
    assert alpaca_prompt("Do it.", "  ") == "Do it."


def test_vicuna_labels_line_up_with_alpaca_and_the_llama2_tokenizer():
    """The data README's cross-check: L_gt is the Llama-2 length of the Alpaca output (or +1)."""
    labels = load_vicuna_lengths("val").iloc[:1000]
    raw = raw_alpaca()
    counts = load_tokenizer("llama2").count([raw[i]["output"] for i in labels["source_index"]])
    matches = (labels["L_gt"].to_numpy() - counts)
    assert np.isin(matches, [0, 1]).mean() > 0.99
    assert (labels["L_max"] == labels[["L_t0.0", "L_t0.3", "L_t0.5", "L_t0.7"]].max(axis=1)).all()
    train = load_vicuna_lengths("train")
    assert len(train) == 10_000 and not set(train["source_index"]) & set(load_vicuna_lengths("val")["source_index"])


@pytest.mark.slow
def test_sharegpt_follows_the_vllm_benchmark_filter():
    rule = ShareGPTFilter()
    requests = load_requests("sharegpt", "gpt2")
    raw = json.load(gzip.open(mirror_file("sharegpt_v3_unfiltered_cleaned_split_first17671.json.gz")))
    eligible = sum(len(c["conversations"]) >= 2 for c in raw)
    assert 10_000 < len(requests) < eligible
    assert requests["prompt_tokens"].between(rule.min_prompt_tokens, rule.max_prompt_tokens).all()
    assert (requests["output_tokens"] >= rule.min_output_tokens).all()
    assert (requests["prompt_tokens"] + requests["output_tokens"] <= rule.max_total_tokens).all()
    first = requests.iloc[0]
    assert first["prompt_text"] == raw[first["source_index"]]["conversations"][0]["value"]
    assert first["response_text"] == raw[first["source_index"]]["conversations"][1]["value"]
    looser = load_requests("sharegpt", "gpt2", LoadOptions(sharegpt_filter=ShareGPTFilter(max_prompt_tokens=4096, max_total_tokens=8192)))
    assert len(looser) > len(requests)


@pytest.mark.slow
def test_qmsum_span_and_full_contexts():
    meetings = [json.loads(line) for line in gzip.open(mirror_file("qmsum_meetings.jsonl.gz"))]
    num_specific = sum(len(m["specific_query_list"]) for m in meetings)
    num_general = sum(len(m["general_query_list"]) for m in meetings)
    spans = load_requests("qmsum", "llama2")
    full = load_requests("qmsum", "llama2", LoadOptions(qmsum_context="full"))
    assert len(spans) == num_specific == 1576
    assert len(full) == num_specific + num_general == 1810
    assert set(spans["split"]) == {"train", "val", "test"}
    assert full["prompt_tokens"].median() > 5 * spans["prompt_tokens"].median()
    assert full["prompt_tokens"].median() > spans["output_tokens"].median() * 50  # long prompt, short answer
    assert spans["prompt_text"].str.contains("\n\nQuery: ").all()


@pytest.mark.parametrize("dataset, file", [("azure-conv", "AzureLLMInferenceTrace_conv.csv"), ("azure-code", "AzureLLMInferenceTrace_code.csv")])
def test_azure_traces_keep_real_counts_and_timestamps(dataset, file):
    rows = list(csv.DictReader(open(mirror_file(file))))
    requests = load_requests(dataset)
    assert len(requests) == len(rows)
    assert requests["prompt_tokens"].tolist() == [int(r["ContextTokens"]) for r in rows]
    assert requests["output_tokens"].tolist() == [int(r["GeneratedTokens"]) for r in rows]
    stamps = pd.to_datetime([r["TIMESTAMP"] for r in rows])
    expected = (stamps - stamps.min()).total_seconds().to_numpy()
    assert np.allclose(requests["timestamp_s"], expected, atol=1e-5)
    assert "prompt_text" not in requests


def test_mooncake_trace():
    requests = load_requests("mooncake")
    assert len(requests) == 12_031
    assert requests["timestamp_s"].iloc[-1] == pytest.approx(3536.999)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_builder_gives_a_valid_deterministic_trace(dataset, tmp_path):
    spec = TraceSpec(dataset=dataset, tokenizer="gpt2", num_requests=300, arrival="poisson", rate_rps=3.0, seed=11)
    first = build_trace(spec).write(tmp_path / "a.parquet")
    second = build_trace(spec).write(tmp_path / "b.parquet")
    assert first.read_bytes() == second.read_bytes()
    trace = Trace.read(first)
    assert len(trace) == 300 and trace.requests["request_id"].is_unique
    assert (trace.requests[["prompt_tokens", "output_tokens"]] > 0).all().all()
    assert set(trace.requests["dataset"]) == {dataset}
    assert trace.metadata["spec"]["seed"] == 11
    other = build_trace(TraceSpec(**{**spec.__dict__, "seed": 12}))
    assert not other.requests["output_tokens"].equals(trace.requests["output_tokens"])


def test_replay_keeps_real_timestamps_and_borrows_them_for_text_datasets():
    azure = load_requests("azure-conv")
    replay = build_trace(TraceSpec(dataset="azure-conv", num_requests=200, arrival="replay", rate_rps=None))
    assert np.allclose(replay.requests["arrival_time_s"], azure["timestamp_s"].iloc[:200] - azure["timestamp_s"].iloc[0])
    assert replay.requests["prompt_tokens"].tolist() == azure["prompt_tokens"].iloc[:200].tolist()
    borrowed = build_trace(TraceSpec(dataset="alpaca", num_requests=200, arrival="replay", rate_rps=None, replay_source="azure-conv"))
    assert np.allclose(borrowed.requests["arrival_time_s"], replay.requests["arrival_time_s"])
    with pytest.raises(UserError, match="alpaca has no timestamps to replay; add --replay-source"):
        build_trace(TraceSpec(dataset="alpaca", arrival="replay", rate_rps=None))


@pytest.mark.slow
def test_cli_build_is_byte_identical_and_checks_arguments(tmp_path, capsys):
    args = ["trace", "build", "--dataset", "alpaca", "--tokenizer", "llama2", "--num-requests", "2000",
            "--arrival", "poisson", "--rate", "4", "--seed", "0"]
    assert main([*args, "-o", str(tmp_path / "a.parquet")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.parquet")]) == 0
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert main(["trace", "build", "--dataset", "sharegpt", "--arrival", "gamma", "--rate", "2", "--cv", "3",
                 "--num-requests", "500", "-o", str(tmp_path / "g.parquet")]) == 0
    assert main(["trace", "build", "--dataset", "azure-conv", "--arrival", "replay", "-o", str(tmp_path / "r.parquet")]) == 0
    capsys.readouterr()
    bad = {
        ("--dataset", "bookcorpus"): "unknown dataset 'bookcorpus'",
        ("--dataset", "alpaca", "--tokenizer", "bert"): "unknown tokenizer 'bert'",
        ("--dataset", "alpaca", "--arrival", "gamma", "--rate", "1"): "--arrival gamma needs --cv",
        ("--dataset", "alpaca", "--rate", "-2"): "argument --rate: expected a number > 0",
        ("--dataset", "qmsum", "--num-requests", "5000", "--rate", "1"): "qmsum has 1576 usable requests",
    }
    for extra, message in bad.items():
        assert main(["trace", "build", *extra, "-o", str(tmp_path / "x.parquet")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1

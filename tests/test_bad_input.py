"""Every class of bad input gets one line naming the option, file or record, exit status 2, no traceback.

One test per class (output paths, option values, policy configuration values, model directories
and saved metadata, text encodings, request lengths, engine options, vLLM's dependencies), each
run through the ``econoserve`` command as a user would meet it where the class has a command.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from econoserve.cli import main
from econoserve.errors import UserError
from econoserve.predictor.model import LengthPredictor
from econoserve.serving import engine as serving_engine
from econoserve.serving.engine import EngineConfig, ServingError, check_engine_options
from econoserve.workload.trace import MAX_REQUEST_TOKENS, Trace


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the command; assert exit status 2 and a one-line message without a traceback; return it."""
    status = main([str(a) for a in argv])
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert "Traceback" not in error and len(error.splitlines()) == 1, error
    return error


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    frame = pd.DataFrame({
        "request_id": np.arange(6), "arrival_time_s": np.arange(6) * 0.5, "prompt_tokens": [40, 80, 20, 60, 30, 50],
        "output_tokens": [30, 10, 50, 20, 40, 25], "dataset": "synthetic", "prompt_text": [f"prompt {i}" for i in range(6)],
    })  # fmt: skip
    return Trace.from_frame(frame).write(tmp_path / "trace.parquet")


# --------------------------------------------------------------------- output paths
@pytest.fixture
def blocked_paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "a_file").write_text("x")
    return {
        "directory where a file goes": tmp_path / "a_directory",
        "file where a directory goes": tmp_path / "a_file",
        "path under a file": tmp_path / "a_file" / "below",
        "read-only place": Path("/proc/econoserve-output"),
    }


@pytest.mark.parametrize("case", ["directory where a file goes", "file where a directory goes", "path under a file",
                                  "read-only place"])
def test_unwritable_outputs_are_refused_before_any_work(capsys, tmp_path, trace_path, blocked_paths, case):
    path = blocked_paths[case]
    commands = {
        "file": [["trace", "build", "--dataset", "alpaca", "--rate", "1", "-o", path],
                 ["predictor", "predict", "--model", tmp_path, "--trace", trace_path, "-o", path],
                 ["profile-engine", "-o", path]],
        "dir": [["simulate", "--trace", trace_path, "--scheduler", "vllm", "-o", path],
                ["serve", "--trace", trace_path, "-o", path],
                ["predictor", "train", "--dataset", "alpaca", "-o", path]],
    }  # fmt: skip
    kinds = {"directory where a file goes": ["file"], "file where a directory goes": ["dir"]}.get(case, ["file", "dir"])
    for kind in kinds:
        for argv in commands[kind]:
            message = run_cli(capsys, *argv)
            assert "--output" in message and str(path) in message, message


# --------------------------------------------------------------------- option values
@pytest.mark.parametrize(("argv", "option"), [
    (["simulate", "--scheduler", "vllm", "--seed", "-1"], "--seed"),
    (["simulate", "--scheduler", "vllm", "--num-requests", "1.5"], "--num-requests"),
    (["simulate", "--scheduler", "vllm", "--block-size", "sixteen"], "--block-size"),
    (["simulate", "--scheduler", "vllm", "--slo-scale", "nan"], "--slo-scale"),
    (["serve", "--time-scale", "-2"], "--time-scale"),
    (["serve", "--kv-cache-tokens", "1e4"], "--kv-cache-tokens"),
])  # fmt: skip
def test_option_values_of_the_wrong_type_or_range_name_the_option(capsys, tmp_path, trace_path, argv, option):
    message = run_cli(capsys, *argv, "--trace", trace_path, "-o", tmp_path / "out")
    assert f"argument {option}" in message


@pytest.mark.parametrize(("scheduler", "field", "value", "rule"), [
    ("sarathi", "token_budget", 1.5, "must be an integer"),
    ("sarathi", "token_budget", True, "must be an integer"),
    ("econoserve", "rl_bucket", "abc", "must be an integer"),
    ("econoserve", "no_kvcpipe", "yes", "must be true or false"),
    ("econoserve", "rl_padding", [1], "must be a finite number"),
    ("econoserve", "kvcpipe", 3, "must be text"),
])  # fmt: skip
def test_policy_configuration_values_of_the_wrong_type_name_the_field(capsys, tmp_path, trace_path, scheduler, field,
                                                                      value, rule):
    common = ["--trace", trace_path, "-o", tmp_path / "out"]
    message = run_cli(capsys, "simulate", *common, "--scheduler", scheduler, "--policy-option", f"{field}={json.dumps(value)}")
    assert f"{scheduler}: {field} {rule}" in message
    message = run_cli(capsys, "serve", *common, "--scheduler", f"policy:{scheduler}", "--policy-config",
                      json.dumps({field: value}))
    assert f"{scheduler}: {field} {rule}" in message


@pytest.mark.parametrize("command", ["profile-engine", "profile-gpu"])
@pytest.mark.parametrize(("value", "rule"), [("16,x", "expected comma-separated integers"),
                                             ("16,-1", "expected non-negative integers"),
                                             (",", "expected non-negative integers")])
def test_integer_lists_name_the_option_in_both_profilers(capsys, tmp_path, command, value, rule):
    message = run_cli(capsys, command, "--prefill-tokens", value, "-o", tmp_path / "steps.csv")
    assert message.endswith(f"--prefill-tokens {value!r}: {rule}"), message


def test_a_whole_float_is_an_integer_in_json_configuration():
    from econoserve.policy import make_config

    assert make_config("sarathi", {"token_budget": 256.0}).token_budget == 256


# --------------------------------------------------------------------- model directories
@pytest.mark.parametrize(("key", "value"), [
    ("config", []), ("config", {"features": "text"}), ("config", {"num_threads": "four"}),
    ("config", {"features": {"use_text": "no"}}), ("files", ["model.txt"]), ("num_features", "1"),
    ("feature_names", "prompt_tokens"), ("quantile_log_offset", None), ("num_classes", True), ("label", 3),
])  # fmt: skip
def test_saved_metadata_of_the_wrong_shape_is_a_clear_error(capsys, tmp_path, trace_path, length_model, key, value):
    model = tmp_path / "model"
    model.mkdir()
    for file in length_model.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    metadata = json.loads((model / "metadata.json").read_text())
    metadata[key] = value
    (model / "metadata.json").write_text(json.dumps(metadata))
    message = run_cli(capsys, "predictor", "predict", "--model", model, "--trace", trace_path, "-o", tmp_path / "p.parquet")
    assert str(model) in message


def test_an_intact_length_model_still_loads(length_model):
    assert LengthPredictor.load(length_model).predict(None, np.array([100])) >= 1


# --------------------------------------------------------------------- text and lengths in traces
def test_text_that_is_not_utf8_names_the_file_and_column(capsys, tmp_path, trace_path):
    table = pq.read_table(trace_path)
    broken = pa.array([b"\xff\xfe not utf-8"] * table.num_rows, type=pa.binary()).view(pa.string())
    index = table.schema.get_field_index("prompt_text")
    path = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(index, "prompt_text", broken), path)
    message = run_cli(capsys, "trace", "info", path)
    assert str(path) in message and "prompt_text" in message and "UTF-8" in message


@pytest.mark.parametrize("column", ["prompt_tokens", "output_tokens"])
def test_lengths_that_would_exhaust_memory_are_refused_up_front(capsys, tmp_path, trace_path, column):
    frame = Trace.read(trace_path).requests.copy()
    frame.loc[3, column] = 10**12
    path = tmp_path / "huge.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    message = run_cli(capsys, "simulate", "--trace", path, "--scheduler", "vllm", "-o", tmp_path / "out")
    assert f"{column} is 1000000000000; must be <= {MAX_REQUEST_TOKENS}" in message and "record 3" in message


# --------------------------------------------------------------------- engine options and dependencies
@pytest.fixture
def model_config_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "opt", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64,
        "max_position_embeddings": 1024,
    }))  # fmt: skip
    return tmp_path


@pytest.mark.parametrize(("options", "named"), [
    ({"block_size": 16}, "--block-size 16"),
    ({"max_model_len": 2048, "kv_cache_tokens": 4096}, "--max-model-len 2048"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 256, "max_model_len": 512}, "--max-num-batched-tokens 256"),
])  # fmt: skip
def test_engine_options_the_backend_cannot_honour_are_refused_before_start(model_config_dir, options, named):
    config = EngineConfig(model=str(model_config_dir), **{"max_model_len": 512, **options})
    with pytest.raises(ServingError, match=named):
        check_engine_options(config)
    check_engine_options(EngineConfig(model=str(model_config_dir), max_model_len=512))  # the defaults are fine


def test_vllm_dependencies_that_do_not_load_get_one_line_saying_what_to_run(monkeypatch):
    class BrokenTransformers(types.ModuleType):
        def __getattr__(self, name: str):
            raise RuntimeError("operator torchvision::nms does not exist\n(and a long traceback)")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.32.0"))
    monkeypatch.setitem(sys.modules, "econoserve_broken_transformers", BrokenTransformers("broken"))
    monkeypatch.setattr(serving_engine, "DEPENDENCY_PROBES", (("econoserve_broken_transformers", "OPTForCausalLM"),))
    with pytest.raises(ServingError) as error:
        serving_engine.require_vllm()
    message = str(error.value)
    assert "cannot import OPTForCausalLM" in message and "torchvision::nms" in message
    assert "install_serving.sh" in message and "pip uninstall -y torchvision" in message and "\n" not in message
    assert isinstance(error.value, UserError)


def test_a_scheduler_predictor_that_cannot_be_used_is_refused_before_vllm_starts(capsys, tmp_path, trace_path,
                                                                                 length_model):
    common = ["serve", "--trace", trace_path, "-o", tmp_path / "out"]
    assert "takes no predictor" in run_cli(capsys, *common, "--scheduler", "vllm", "--predictor", length_model)
    message = run_cli(capsys, *common, "--scheduler", "econoserve", "--predictor", tmp_path / "no-model")
    assert f"{tmp_path / 'no-model'}: no such model directory" in message


@pytest.mark.realdata
def test_a_refined_predictor_that_cannot_be_used_is_refused_before_vllm_starts(capsys, tmp_path, trace_path,
                                                                               length_model, refined_model):
    common = ["serve", "--trace", trace_path, "-o", tmp_path / "out"]
    assert "takes no refined_predictor" in run_cli(capsys, *common, "--scheduler", "vllm", "--refined-predictor", refined_model)
    econoserve = [*common, "--scheduler", "econoserve", "--refined-predictor"]
    assert f"{tmp_path / 'none'}: no such refined-model directory" in run_cli(capsys, *econoserve, tmp_path / "none")
    assert f"{length_model}: not a refined model" in run_cli(capsys, *econoserve, length_model)
    llama = tmp_path / "llama"  # an engine model of Llama-2's vocabulary: gpt2 ids would decode to other text
    llama.mkdir()
    (llama / "config.json").write_text('{"vocab_size": 32000}')
    message = run_cli(capsys, *econoserve, refined_model, "--model", llama)
    assert "'gpt2' tokens (50257 ids)" in message and "32000 token ids" in message


def test_a_distribution_predictor_that_is_no_classifier_is_refused_before_vllm_starts(capsys, tmp_path, trace_path,
                                                                                      length_model):
    message = run_cli(capsys, "serve", "--trace", trace_path, "-o", tmp_path / "out", "--scheduler", "econoserve",
                      "--distribution-predictor", length_model)
    assert f"{length_model}: a regression model; a predicted distribution comes from a classification model" in message

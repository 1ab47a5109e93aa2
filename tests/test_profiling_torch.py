"""The PyTorch-only step-time profiler on CPU with tiny configurations of real architectures,
and ``econoserve calibrate`` on its table.

PyTorch and ``transformers`` come with the serving environment (``.venv-serving``), so these
tests carry the ``serving`` mark and are skipped where PyTorch is absent."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from econoserve.cli import main  # noqa: E402
from econoserve.errors import UserError  # noqa: E402
from econoserve.profiling.torch_steps import (  # noqa: E402
    TORCH_STEP_COLUMNS,
    TorchProfileConfig,
    _Runner,
    hf_config_from_spec,
    profile_torch_steps,
)
from econoserve.serving.profiler import ProfileGrid  # noqa: E402
from econoserve.sim.catalog import ModelSpec  # noqa: E402
from econoserve.sim.latency import FittedLatencyModel  # noqa: E402

pytestmark = pytest.mark.serving

TINY_LLAMA = ModelSpec("tiny-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, vocab_size=256, max_context_tokens=512, gated_mlp=True)
TINY_OPT = ModelSpec("tiny-opt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                     intermediate_size=256, vocab_size=256, max_context_tokens=512, gated_mlp=False)
GRID = ProfileGrid(prefill_tokens=(0, 8, 64), decode_batch_sizes=(0, 1, 6), context_lengths=(16, 100),
                   repeats=2, warmup=1)
CPU = TorchProfileConfig(device="cpu")


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_OPT], ids=["llama", "opt"])
def test_every_cell_is_measured_with_its_exact_composition(spec):
    profile = profile_torch_steps(hf_config_from_spec(spec), CPU, GRID, progress=False)
    table = profile.table
    cells = list(GRID.cells())
    assert list(table.columns) == list(TORCH_STEP_COLUMNS)
    assert len(table) == len(cells) * GRID.repeats and profile.dropped_steps == 0
    assert set(map(tuple, table[["cell_prefill_tokens", "cell_decode_batch", "cell_context_length"]].to_numpy())) == set(cells)
    p, b, c = (table[k].to_numpy() for k in ("cell_prefill_tokens", "cell_decode_batch", "cell_context_length"))
    assert np.array_equal(table["prefill_tokens"], p) and np.array_equal(table["decode_tokens"], b)
    assert np.array_equal(table["context_tokens"], p + b * (c + 1))
    assert np.allclose(table["attention_pairs"], p * (p + 1) / 2 + b * (c + 1))
    assert (table["step_time_s"] > 0).all() and np.array_equal(table["step_time_s"], table["engine_step_time_s"])
    assert profile.engine["dtype"] == "float32" and profile.engine["attention"] == "sdpa"


def test_decode_cache_is_cut_back_so_repeats_are_alike():
    runner = _Runner(hf_config_from_spec(TINY_LLAMA), CPU)
    cache = runner.decode_cache(3, 40)
    for _ in range(3):
        runner.step(8, 3, 40, cache)
        assert cache.get_seq_length() == 40
    assert runner.model.config._attn_implementation == "sdpa"


def test_cells_over_the_kv_limit_are_skipped_and_counted():
    tight = TorchProfileConfig(device="cpu", max_kv_bytes=1)
    profile = profile_torch_steps(hf_config_from_spec(TINY_OPT), tight, GRID, progress=False)
    assert (profile.table["decode_tokens"] == 0).all()
    decode_cells = sum(1 for _, batch, _ in GRID.cells() if batch)
    assert profile.dropped_steps == decode_cells * GRID.repeats


def test_table_feeds_the_latency_fit_and_calibrate(tmp_path):
    profile = profile_torch_steps(hf_config_from_spec(TINY_LLAMA), CPU, GRID, progress=False)
    path = profile.write(tmp_path / "steps.csv")
    fitted = FittedLatencyModel.load(path)
    assert fitted.coefficients and fitted.fit_stats["num_steps"] == len(profile.table)
    out = tmp_path / "factors.json"
    assert main(["calibrate", "--steps", str(path), "--model", "llama-2-7b", "--gpu", "a100-80gb", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_steps"] == len(profile.table)
    assert set(result["factors"]) >= {"compute_efficiency", "memory_efficiency", "step_overhead_s", "overlap_exponent"}


def test_cli_profiles_a_config_json_on_cpu(tmp_path):
    config_dir = tmp_path / "model"
    hf_config_from_spec(TINY_OPT).save_pretrained(config_dir)
    out = tmp_path / "steps.parquet"
    code = main(["profile-gpu", "--hf-config", str(config_dir), "--device", "cpu", "--prefill-tokens", "0,16",
                 "--decode-batch-sizes", "0,2", "--context-lengths", "8", "--repeats", "1", "--warmup", "0",
                 "--no-progress", "-o", str(out)])
    assert code == 0
    table = pd.read_parquet(out)
    assert len(table) == 3 and set(table["cell_prefill_tokens"]) == {0, 16}
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["engine"]["hf_config"]["model_type"] == "opt" and meta["grid"]["repeats"] == 1


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["profile-gpu", "--hf-config", str(tmp_path / "missing"), "--device", "cpu", "-o", str(tmp_path / "x.csv")]) == 2
    assert main(["profile-gpu", "--model", "tiny", "--device", "cpu", "-o", str(tmp_path / "x.csv")]) == 2
    assert main(["calibrate", "--steps", str(tmp_path / "none.csv"), "--model", "opt-13b", "--gpu", "a100-80gb",
                 "-o", str(tmp_path / "f.json")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(UserError, match="--dtype"):
        TorchProfileConfig(dtype="int8")

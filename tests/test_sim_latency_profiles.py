"""Latency models read from real GPU measurements (DistServe's fits, Vidur's operator profiles),
the roofline's calibration to them, and the names the simulator accepts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from econoserve.cli import main
from econoserve.errors import UserError
from econoserve.sim.calibration import (
    CalibrationGrid,
    calibrate_per_tp,
    calibrated_params,
    error_stats,
    fit_roofline,
    nearest_tp,
    profile_points,
    roofline_predictions_s,
)
from econoserve.sim.catalog import ROOFLINE_CALIBRATIONS, Deployment, get_gpu, get_model
from econoserve.sim.latency import (FittedLatencyModel, RooflineLatencyModel, RooflineParams, context_time_per_token_s,
                                    make_latency_model)
from econoserve.sim.profiles import DistServeLatencyModel, VidurLatencyModel, split_batch
from econoserve.workload import registry

realdata = pytest.mark.realdata


def deployment(model: str = "opt-13b", tp: int = 1, gpu: str = "a100-80gb") -> Deployment:
    return Deployment(get_model(model), get_gpu(gpu), tp)


def batch_features(prompts: list[int], decode_contexts: list[int]) -> tuple[float, float, float, float]:
    """The simulator's four totals for fresh prompts and decoders holding ``k`` cached tokens
    (each reads its cache and its new token)."""
    prefill = sum(prompts)
    decode = len(decode_contexts)
    context = prefill + sum(k + 1 for k in decode_contexts)
    pairs = sum(p * (p + 1) / 2 for p in prompts) + sum(k + 1 for k in decode_contexts)
    return float(prefill), float(decode), float(context), float(pairs)


def test_split_batch_recovers_decode_cache_and_prompt_squares():
    prompts, contexts = [100, 7, 300], [5, 40, 2000]
    decode_kv, squares = split_batch(*batch_features(prompts, contexts))
    assert decode_kv == sum(contexts)
    assert squares == pytest.approx(sum(p * p for p in prompts))


# --------------------------------------------------------------------- DistServe
def distserve_json(engine: str) -> dict:
    name = {"distserve": "distserve-a100-fits", "distserve-vllm": "distserve-vllm-a100-fits"}[engine]
    return json.loads(registry.dataset_path(name).read_text())


@realdata
@pytest.mark.parametrize("engine", ["distserve", "distserve-vllm"])
@pytest.mark.parametrize("model,tp", [("opt-13b", 1), ("opt-13b", 4), ("opt-66b", 2), ("opt-66b", 8)])
def test_distserve_model_is_the_readme_formula(engine, model, tp):
    """The README's formulas, in ms, computed here from the raw JSON: prefill
    ``a + b sum(p) + c sum(p^2)``, decode ``a + b sum(k) + c batch`` with the small/large-batch
    coefficients split at the threshold."""
    fit = distserve_json(engine)[f"facebook/{model}"][str(tp)]
    latency = make_latency_model(engine, deployment(model, tp))
    a, b, c = fit["prefill"]
    for prompts in ([128], [2048], [100, 200, 37]):
        expected_ms = a + b * sum(prompts) + c * sum(p * p for p in prompts)
        assert latency.iteration_time_s(*batch_features(prompts, [])) * 1e3 == pytest.approx(expected_ms, rel=1e-9)
    threshold = fit["decoding_large_small_bs_threshold"]
    for batch, key in ((10, "decoding_smallbs"), (threshold - 1, "decoding_smallbs"), (threshold, "decoding_largebs"),
                       (256, "decoding_largebs")):
        contexts = [500 + i for i in range(batch)]
        a, b, c = fit[key]
        expected_ms = a + b * sum(contexts) + c * batch
        assert latency.iteration_time_s(*batch_features([], contexts)) * 1e3 == pytest.approx(expected_ms, rel=1e-9)


@realdata
def test_distserve_mixed_step_pays_one_fixed_cost_and_arrays_match_scalars():
    latency = make_latency_model("distserve", deployment())
    prefill_only, decode_only = batch_features([300], []), batch_features([], [700] * 20)
    mixed = batch_features([300], [700] * 20)
    fixed = min(latency.fit.prefill_ms[0], latency.fit.decode_small_batch_ms[0]) * 1e-3
    assert latency.iteration_time_s(*mixed) == pytest.approx(
        latency.iteration_time_s(*prefill_only) + latency.iteration_time_s(*decode_only) - fixed, rel=1e-12)
    columns = np.array([prefill_only, decode_only, mixed]).T
    assert np.allclose(latency.iteration_time_s(*columns),
                       [latency.iteration_time_s(*row) for row in (prefill_only, decode_only, mixed)], rtol=1e-12)


@realdata
def test_distserve_refuses_what_it_did_not_measure():
    with pytest.raises(UserError, match="no fit for llama-2-7b at TP 1"):
        make_latency_model("distserve", deployment("llama-2-7b"))
    with pytest.raises(UserError, match="measured on a100-80gb"):
        DistServeLatencyModel.for_deployment("distserve", deployment(gpu="h100-80gb"))
    with pytest.raises(UserError, match="roofline overrides"):
        make_latency_model("distserve", deployment(), {"step_overhead_s": 0.01})


# --------------------------------------------------------------------- Vidur
@realdata
def test_vidur_step_is_the_sum_of_its_profiled_operators_at_tp2():
    """A TP-2 decode step at a profiled (batch, mean KV) cell: 80 layers x (the linear operators
    at that token count + decode attention + 2 all-reduces of tokens x 8192 x 2 bytes, each
    plus Vidur's 0.02 ms launch cost), read here straight from the CSVs."""
    mlp = pd.read_csv(registry.dataset_path("vidur-llama2-70b-a100-mlp"))
    attention = pd.read_csv(registry.dataset_path("vidur-llama2-70b-a100-attention"))
    reduce = pd.read_csv(registry.dataset_path("vidur-a100-all-reduce"))
    batch, kv = 8, 512
    rows = mlp[(mlp.num_tensor_parallel_workers == 2) & (mlp.num_tokens == batch)]
    operators = ["attn_pre_proj", "attn_post_proj", "attn_rope", "mlp_up_proj", "mlp_down_proj", "mlp_act",
                 "input_layernorm", "post_attention_layernorm", "add"]
    linear_ms = sum(rows[f"time_stats.{op}.median"].mean() for op in operators)
    cell = attention[(~attention.is_prefill) & (attention.batch_size == batch) & (attention.kv_cache_size == kv)]
    decode_ms = cell["time_stats.attn_decode.median"].mean()
    sizes = reduce[reduce.num_workers == 2].groupby("size")["time_stats.all_reduce.median"].mean()
    reduce_ms = np.interp(batch * 8192 * 2, sizes.index.to_numpy(float), sizes.to_numpy())
    expected_s = 80 * (linear_ms + decode_ms + 2 * (reduce_ms + 0.02)) * 1e-3
    latency = make_latency_model("vidur", deployment("llama-2-70b", 2))
    # mean KV length = tokens already cached per decoding request
    assert latency.iteration_time_s(*batch_features([], [kv] * batch)) == pytest.approx(expected_s, rel=1e-9)


@realdata
def test_vidur_prefill_attention_grows_with_the_prompt_and_other_tp_is_an_estimate():
    tp2, tp4 = VidurLatencyModel(deployment("llama-2-70b", 2)), VidurLatencyModel(deployment("llama-2-70b", 4))
    short, long = tp2.component_times_s(*batch_features([512], [])), tp2.component_times_s(*batch_features([4096], []))
    assert long["prefill_attention"] > 8 * short["prefill_attention"] > 0
    assert tp4.component_times_s(*batch_features([512], []))["prefill_attention"] == pytest.approx(
        short["prefill_attention"] / 2)
    assert tp2.describe()["attention"] == "measured" and tp4.describe()["attention"].startswith("estimate")
    with pytest.raises(UserError, match="no all-reduce profile over 8 GPUs"):
        VidurLatencyModel(deployment("llama-2-70b", 8))
    with pytest.raises(UserError, match="Vidur's profiles are llama-2-70b"):
        VidurLatencyModel(deployment("opt-13b", 1))


# --------------------------------------------------------------------- the roofline and its calibration
def test_default_roofline_is_unchanged_by_the_overlap_knob():
    dep = deployment("opt-13b", 2)
    rows = np.array([batch_features([n], []) for n in (16, 512, 4096)] + [batch_features([], [300] * 64)]).T
    classic = RooflineLatencyModel(dep).iteration_time_s(*rows)
    assert np.array_equal(make_latency_model("roofline", dep).iteration_time_s(*rows), classic)
    summed = RooflineLatencyModel(dep, RooflineParams(overlap_exponent=1.0)).iteration_time_s(*rows)
    smooth = RooflineLatencyModel(dep, RooflineParams(overlap_exponent=2.0)).iteration_time_s(*rows)
    assert np.all(classic < smooth) and np.all(smooth < summed)
    with pytest.raises(UserError, match="overlap_exponent"):
        RooflineParams(overlap_exponent=0.5)


def test_fit_recovers_a_known_roofline():
    """Points generated by a roofline with known factors are fitted back to (near) zero error."""
    truth = RooflineParams(compute_efficiency=0.55, attention_compute_efficiency=0.4, memory_efficiency=0.7,
                           interconnect_efficiency=0.3, allreduce_latency_s=20e-6, step_overhead_s=6e-3,
                           overlap_exponent=1.6)
    grid = CalibrationGrid(prefill_lengths=(16, 128, 1024, 2048), decode_batch_sizes=(1, 16, 128),
                           context_lengths=(256, 1024))
    rows = [("prefill", *batch_features([n], [])) for n in grid.prefill_lengths]
    rows += [("decode", *batch_features([], [k] * b)) for b in grid.decode_batch_sizes for k in grid.context_lengths]
    frames = []
    for model, tp in (("opt-13b", 2), ("opt-66b", 2)):
        frame = pd.DataFrame(rows, columns=["phase", "prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs"])
        frame["model"], frame["gpu"], frame["tensor_parallel"] = model, "a100-80gb", tp
        frames.append(frame)
    points = pd.concat(frames, ignore_index=True)
    points["measured_s"] = roofline_predictions_s(points, truth)
    before = error_stats(roofline_predictions_s(points, RooflineParams()), points["measured_s"].to_numpy())
    fitted = fit_roofline(points)
    after = error_stats(roofline_predictions_s(points, fitted), points["measured_s"].to_numpy())
    assert before["median_abs_rel_error"] > 0.1
    assert after["p90_abs_rel_error"] < 0.005


@realdata
def test_catalog_factors_are_what_the_fit_gives_on_distserve():
    """The catalog's A100-80GB factors reproduce a fresh per-TP fit to DistServe's engine, and
    meet the median target on every TP."""
    points = profile_points("distserve")
    fresh = roofline_predictions_s(points, calibrate_per_tp(points))
    catalog = roofline_predictions_s(points, {tp: calibrated_params("a100-80gb", tp)[0]
                                              for tp in points["tensor_parallel"].unique()})
    for tp, group in points.groupby("tensor_parallel"):
        measured = group["measured_s"].to_numpy()
        i = points.index.get_indexer(group.index)
        ours, theirs = error_stats(catalog[i], measured), error_stats(fresh[i], measured)
        assert ours["median_abs_rel_error"] == pytest.approx(theirs["median_abs_rel_error"], abs=2e-3)
        assert ours["median_abs_rel_error"] <= 0.05


def test_calibrated_params_say_measured_or_estimate():
    measured_tps = sorted(tp for gpu, tp in ROOFLINE_CALIBRATIONS if gpu == "a100-80gb")
    assert measured_tps
    params, provenance = calibrated_params("a100-80gb", measured_tps[0])
    assert provenance.startswith("measured") and not math.isinf(params.overlap_exponent)
    assert calibrated_params("a100-80gb", 16)[1].startswith(f"estimate: a100-80gb TP {max(measured_tps)}")
    assert calibrated_params("h200-141gb", 1)[1].startswith("estimate") and "no measurement" in calibrated_params("h200-141gb", 1)[1]
    assert nearest_tp(4, [1, 2, 8]) == 2 and nearest_tp(4, [3, 8]) == 3 and nearest_tp(6, [4, 8]) == 8 and nearest_tp(4, [2, 8]) == 2
    latency = make_latency_model("calibrated", deployment("opt-13b", measured_tps[0]), {"step_overhead_s": 0.5})
    assert latency.params.step_overhead_s == 0.5 and latency.describe()["provenance"].endswith("+ overrides")


def test_h200_is_in_the_catalog_with_more_bandwidth_than_h100():
    h100, h200 = get_gpu("h100-80gb"), get_gpu("h200-141gb")
    assert h200.peak_bf16_flops == h100.peak_bf16_flops
    assert h200.hbm_bandwidth_bytes_per_s > h100.hbm_bandwidth_bytes_per_s
    assert h200.memory_bytes > 1.7 * h100.memory_bytes


def test_context_time_per_token_is_what_a_cached_token_adds_to_a_decode_step():
    # a decode token attends to its whole context: one more cached token is one more context
    # token and one more attention pair
    fitted = FittedLatencyModel(0.01, {"decode_tokens": 2e-4, "context_tokens": 3e-7, "attention_pairs": 1e-8})
    assert context_time_per_token_s(fitted) == pytest.approx(3.1e-7, rel=1e-9)
    assert context_time_per_token_s(FittedLatencyModel(0.01, {"decode_tokens": 2e-4})) == 0.0
    # on the roofline a memory-bound decode step reads each cached token's KV once, at the
    # bandwidth it achieves
    kv_bytes = get_model("opt-13b").kv_bytes_per_token
    for gpu in ("a100-80gb", "h200-141gb"):
        latency = make_latency_model("roofline", Deployment(get_model("opt-13b"), get_gpu(gpu)))
        bandwidth = get_gpu(gpu).hbm_bandwidth_bytes_per_s * RooflineParams().memory_efficiency
        assert context_time_per_token_s(latency) == pytest.approx(kv_bytes / bandwidth, rel=1e-9)


# --------------------------------------------------------------------- the simulator on measured step times
@realdata
def test_simulation_on_distserve_steps_charges_the_fitted_times(tmp_path):
    trace = tmp_path / "trace.parquet"
    assert main(["trace", "build", "--dataset", "alpaca", "--tokenizer", "gpt2", "--num-requests", "60",
                 "--arrival", "poisson", "--rate", "8", "--seed", "1", "-o", str(trace)]) == 0
    out = tmp_path / "run"
    assert main(["simulate", "--trace", str(trace), "--scheduler", "vllm", "--latency-model", "distserve",
                 "--no-progress", "-o", str(out)]) == 0
    iterations = pd.read_parquet(out / "iterations.parquet")
    fit = distserve_json("distserve")["facebook/opt-13b"]["1"]
    decode = iterations[iterations.num_prefill_tokens == 0]
    assert len(decode) > 10
    coefficients = np.where((decode.num_decode_tokens < fit["decoding_large_small_bs_threshold"]).to_numpy()[:, None],
                            fit["decoding_smallbs"], fit["decoding_largebs"])
    cached = decode.num_context_tokens - decode.num_decode_tokens
    expected_s = (coefficients[:, 0] + coefficients[:, 1] * cached + coefficients[:, 2] * decode.num_decode_tokens) * 1e-3
    assert np.allclose(decode.duration_s, expected_s, rtol=1e-9)
    assert json.loads((out / "config.json").read_text())["latency_model"]["kind"] == "distserve"


def test_unknown_latency_model_file_is_one_line_exit_2(tmp_path, capsys):
    code = main(["simulate", "--trace", str(tmp_path / "none.parquet"), "--scheduler", "vllm",
                 "--latency-model", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")])
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err

"""``econoserve profile-gpu`` (step times with PyTorch alone) and ``econoserve calibrate``
(the roofline fitted to a measured step-time table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from econoserve.errors import UserError
from econoserve.validation import int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_profile_gpu(subparsers)
    _register_calibrate(subparsers)


# --------------------------------------------------------------------- profile-gpu
def _register_profile_gpu(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile-gpu",
        help="measure step times of a real architecture with PyTorch + transformers (no vLLM)",
        description=(
            "Build a model of a real architecture (a catalog model or a Hugging Face config.json) with random "
            "weights and time one step per batch composition (prefill tokens x decode batch size x context "
            "length): bf16 on a GPU, fp32 on CPU, attention through PyTorch's SDPA. Writes the step-time "
            "table that 'econoserve calibrate' and '--latency-model PATH' read (see "
            "econoserve.profiling.torch_steps for what a step is, mixed steps included)."
        ),
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default="llama-2-7b", metavar="NAME",
                       help="catalog model whose shape is built (default: llama-2-7b)")
    model.add_argument("--hf-config", metavar="PATH", help="a transformers config.json (or its folder) instead")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--prefill-tokens", default=None, metavar="N,N,...",
                        help="prompt lengths [tokens], 0 = none (default: the GPU grid on CUDA, the CPU grid on CPU)")
    parser.add_argument("--decode-batch-sizes", default=None, metavar="N,N,...",
                        help="decoding requests per step, 0 = none")
    parser.add_argument("--context-lengths", default=None, metavar="N,N,...",
                        help="tokens already cached per decoding request")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=None, help="discarded steps per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and KV contents (default: 0)")
    parser.add_argument("--max-kv-gib", type=float, default=None, metavar="GIB",
                        help="skip cells whose decode KV cache exceeds this [GiB] (default: 60%% of free GPU memory)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="step table (.csv or .parquet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_profile_gpu)


def _grid(args: argparse.Namespace):
    from dataclasses import replace

    from econoserve.profiling.torch_steps import GPU_GRID
    from econoserve.serving.profiler import ProfileGrid

    base = ProfileGrid() if args.device == "cpu" else GPU_GRID
    changes = {name: getattr(args, name) for name in ("repeats", "warmup") if getattr(args, name) is not None}
    for field in ("prefill_tokens", "decode_batch_sizes", "context_lengths"):
        values = int_list(getattr(args, field), "--" + field.replace("_", "-"))
        if values is not None:
            changes[field] = values
    if changes.get("repeats", 1) < 1 or changes.get("warmup", 0) < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    if any(v == 0 for v in changes.get("context_lengths", (1,))):
        raise UserError("--context-lengths must be > 0")
    return replace(base, **changes, seed=args.seed)


def _profile_gpu(args: argparse.Namespace) -> int:
    from econoserve.profiling.torch_steps import TorchProfileConfig, hf_config_from_spec, load_hf_config, profile_torch_steps
    from econoserve.sim.catalog import GIB, get_model

    grid = _grid(args)  # bad grid options are refused before the model loads
    hf_config = load_hf_config(args.hf_config) if args.hf_config else hf_config_from_spec(get_model(args.model))
    max_kv = int(args.max_kv_gib * GIB) if args.max_kv_gib is not None else None
    config = TorchProfileConfig(device=args.device, dtype=args.dtype, seed=args.seed, max_kv_bytes=max_kv)
    output = Path(args.output)
    if output.suffix not in (".csv", ".parquet"):
        raise UserError(f"{output}: write the step table as .csv or .parquet")
    profile = profile_torch_steps(hf_config, config, grid, progress=not args.no_progress)
    profile.write(output)
    meta = {"engine": profile.engine, "grid": profile.grid, "dropped_steps": profile.dropped_steps,
            "wall_time_s": profile.wall_time_s}
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    print(f"{len(profile.table)} steps measured ({profile.dropped_steps} skipped) in {profile.wall_time_s:.1f} s "
          f"-> {output} (+ {output.with_suffix('.json').name})")
    return 0


# --------------------------------------------------------------------- calibrate
def _register_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit the roofline's factors to a measured step-time table; report its error before and after",
        description=(
            "Fit the roofline latency model's factors (compute, attention, memory and interconnect efficiency, "
            "fixed step and all-reduce costs, compute/memory overlap) to measured step times ('econoserve "
            "profile-gpu' or 'profile-engine' tables) of one model on one GPU at one TP, by least squares on "
            "relative error. Prints the median / p90 absolute relative error before and after and writes the "
            "factors as JSON (the format of the catalog's ROOFLINE_CALIBRATIONS)."
        ),
    )
    parser.add_argument("--steps", required=True, metavar="PATH", help="measured step table (.csv or .parquet)")
    parser.add_argument("--model", required=True, metavar="NAME", help="catalog model that was measured")
    parser.add_argument("--gpu", required=True, metavar="NAME", help="catalog GPU it ran on")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree (default: 1)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="fitted factors and errors (.json)")
    parser.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from econoserve.sim.calibration import (
        error_stats,
        fit_roofline,
        params_to_factors,
        roofline_predictions_s,
        step_table_points,
    )
    from econoserve.sim.latency import RooflineParams

    points = step_table_points(args.steps, args.model, args.gpu, args.tp)
    measured = points["measured_s"].to_numpy()
    fitted = fit_roofline(points)
    result = {
        "steps": str(args.steps), "model": args.model, "gpu": args.gpu, "tensor_parallel": args.tp,
        "num_steps": len(points),
        "before": error_stats(roofline_predictions_s(points, RooflineParams()), measured),
        "after": error_stats(roofline_predictions_s(points, fitted), measured),
        "factors": params_to_factors(fitted),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for variant in ("before", "after"):
        stats = result[variant]
        print(f"{variant:6}: median |error| {100 * stats['median_abs_rel_error']:.1f}%, "
              f"p90 {100 * stats['p90_abs_rel_error']:.1f}%, median predicted/measured {stats['median_ratio']:.3f}")
    print(f"factors -> {output}")
    return 0

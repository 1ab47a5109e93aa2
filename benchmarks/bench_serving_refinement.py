"""The cost of engine-side refinement inside vLLM's scheduler: seconds per refined request.

The policy scheduler (``econoserve.serving.scheduler.EconoServeScheduler``) with a refined
length model (``refined_predictor``, :mod:`econoserve.serving.prediction`) refines each request
once, at the model's ``k`` generated tokens: it decodes the prompt ids and the ``k`` output ids
with the model's tokenizer and runs the refined model, on the engine-core thread, inside
``update_from_output``. This script times that (:class:`~econoserve.serving.prediction.PredictionCost`)
beside the arrival-time prediction of the same model's prompt-only base (``predictor`` =
``DIR/base``), per prompt length, with requests arriving one per step (so each step refines at
most one: the cost of one refinement alone) or all at once (so one step refines them all, in one
call: the longest a step waits for refinement).

It steps the real scheduler class on a real vLLM configuration and KV cache manager without a
model (:mod:`econoserve.serving.stepping`): a stand-in model output samples seeded random token
ids, so the ``k`` decoded output tokens are random text of the model's vocabulary. The engine
model is a random-weight tiny OPT with the refined model's vocabulary size (so its tokenizer fits;
see :func:`econoserve.serving.prediction.check_tokenizer_fits`). What a refined prediction is
*worth* cannot be measured on such an engine (its generated text means nothing); the simulator
measures that (``benchmarks/results/policy_probe_refine_full.md``). The costs are the same code
path as in a real engine (tested in ``tests/test_serving_prediction.py``).

Writes ``benchmarks/results/serving_refinement.md`` and ``.json`` (``--quick``: ``..._quick``).
Needs vLLM (``.venv-serving``) and a saved refined model, e.g. ShareGPT's at ``k = 16`` as the
policy scoreboard caches it (``bench_policy_regimes.py`` with ``'econoserve[refine=16]'``)::

    PYTHONPATH=$PWD .venv-serving/bin/python benchmarks/bench_serving_refinement.py \\
        --refined-predictor results/policy_regimes/predictors/sharegpt-llama2-<digest>-refine16-<digest> [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048  # the tiny model's positions


def stand_in_random_output(scheduler, output, rng: np.random.Generator, vocab_size: int):
    """A model's answer to ``output``: one seeded random token id per request whose scheduled
    tokens reach its end (none for a prompt chunk short of it)."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests.get(req_id)
        sampled.append([] if request is None or request.is_prefill_chunk else [int(rng.integers(100, vocab_size))])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled)


def measure(model_dir: Path, refined: Path, prompt_tokens: int, num_requests: int, vocab_size: int, seed: int,
            burst: bool) -> dict:
    """Serve ``num_requests`` requests of ``prompt_tokens`` random prompt ids and ``2 k`` output
    tokens, one arriving per step or (``burst``) all at once; the arrival-prediction and
    refinement costs of the scheduler's models."""
    from econoserve.serving.stepping import stepped_scheduler
    from vllm import SamplingParams
    from vllm.v1.request import Request

    options = {"policy": "econoserve", "predictor": str(refined / "base"), "refined_predictor": str(refined)}
    rng = np.random.default_rng(seed)
    per_request_blocks = -(-(prompt_tokens + 4 * 64) // BLOCK_SIZE) * 2
    scheduler = stepped_scheduler(
        model_dir, "econoserve.serving.scheduler.EconoServeScheduler", num_blocks=num_requests * per_request_blocks + 64,
        block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=max(2048, prompt_tokens),
        max_num_seqs=num_requests, additional_config={"econoserve": options},
    )
    output_tokens = 2 * scheduler.refiner.prefix_tokens
    params = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True)
    prompts = [rng.integers(100, vocab_size, prompt_tokens).tolist() for _ in range(num_requests)]
    while prompts or scheduler.has_requests():
        for _ in range(len(prompts) if burst else min(1, len(prompts))):
            scheduler.add_request(Request(f"r{len(prompts)}", prompts.pop(), params, None))
        output = scheduler.schedule()
        scheduler.update_from_output(output, stand_in_random_output(scheduler, output, rng, vocab_size))
    arrival, refine = scheduler.length_predictor.cost, scheduler.refiner.cost
    if refine.num_requests != num_requests:
        raise RuntimeError(f"{refine.num_requests} of {num_requests} requests refined")
    return {"prompt_tokens": prompt_tokens, "arrivals": "all at once" if burst else "one per step",
            "requests": num_requests, "k": scheduler.refiner.prefix_tokens,
            "arrival_mean_ms": arrival.mean_s * 1e3, "arrival_max_ms": arrival.max_s * 1e3,
            "refining_steps": refine.num_calls, "refine_mean_ms": refine.mean_s * 1e3,
            "refine_longest_step_ms": refine.max_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refined-predictor", required=True, type=Path, metavar="DIR",
                        help="a saved refined model (econoserve.predictor.refine; its prompt-only model in DIR/base)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512, 1536],
                        help="prompt lengths [tokens], one table row each (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests per row (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="prompt and output token ids (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="50 requests per row; writes serving_refinement_quick.*")
    args = parser.parse_args()
    if args.quick:
        args.requests = 50

    from econoserve.serving.models import TinyModelSpec, build_tiny_model
    from econoserve.serving.prediction import EngineRefiner

    refiner = EngineRefiner.load(args.refined_predictor)
    vocab_size = refiner.tokenizer.vocab_size
    model_dir = build_tiny_model(TinyModelSpec(vocab_size=vocab_size), Path(tempfile.mkdtemp(prefix="bench-refine-")))
    load_before = os.getloadavg()[0]
    rows = []
    cells = [(prompt_tokens, burst) for prompt_tokens in args.prompt_tokens for burst in (False, True)]
    for prompt_tokens, burst in tqdm(cells, desc="cells", unit="cell"):
        rows.append(measure(model_dir, args.refined_predictor, prompt_tokens, args.requests, vocab_size, args.seed, burst))
        print(json.dumps(rows[-1]))
    write(rows, refiner, args, (load_before, os.getloadavg()[0]))


def write(rows: list[dict], refiner, args: argparse.Namespace, load: tuple[float, float]) -> None:
    import vllm

    name = "serving_refinement" + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "vllm": vllm.__version__, "model": args.refined_predictor.name, "tokenizer": refiner.tokenizer.name,
            "k": refiner.prefix_tokens, "training_data": refiner.model.training_data.get("dataset"),
            "cpus": os.cpu_count(), "load_average_1min": list(load)}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Engine-side refinement: cost per refined request inside vLLM's scheduler",
        "",
        f"vLLM {meta['vllm']} (CPU build), EconoServe's policy scheduler stepped on a real vLLM configuration and KV "
        f"cache manager with a stand-in model output (seeded random token ids); refined model `{meta['model']}` "
        f"({meta['training_data']}, {meta['tokenizer']} tokens, k = {meta['k']}), its prompt-only base as the arrival "
        f"predictor; {rows[0]['requests']} requests per row, each refined once at k tokens, arriving one per step or "
        "all at once (then the requests a step refines are predicted in one call). Times on the engine-core "
        "thread (`PredictionCost`): arrival in `add_request` (per request), refinement in `update_from_output` "
        "(mean per request; the longest a step waited for it). "
        f"Machine: {meta['cpus']} CPUs, 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after "
        "(shared: the times vary by about 2x between runs). "
        "`benchmarks/bench_serving_refinement.py`" + (" --quick" if args.quick else "") + ".",
        "",
        "The random-weight engine generates meaningless text, so what refinement is worth is not measured here "
        "(the simulator measures it: `policy_probe_refine_full.md`); only what it costs.",
        "",
        "| prompt [tokens] | arrivals | requests | arrival prediction mean [ms] | arrival max [ms] | refining steps | "
        "refinement mean per request [ms] | longest step's refinement [ms] |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['prompt_tokens']} | {row['arrivals']} | {row['requests']} | {row['arrival_mean_ms']:.2f} | "
                     f"{row['arrival_max_ms']:.2f} | {row['refining_steps']} | {row['refine_mean_ms']:.2f} | "
                     f"{row['refine_longest_step_ms']:.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

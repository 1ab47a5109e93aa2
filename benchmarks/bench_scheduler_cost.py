"""The scheduler's cost per step inside vLLM: ``schedule()`` wall time at 50, 200 and 500 running requests.

For vLLM's own v1 scheduler (``vllm.v1.core.sched.scheduler.Scheduler``, what ``vllm serve``
runs) and EconoServe's (``econoserve.serving.scheduler.EconoServeScheduler``, with its per-step
records), each built on the same real vLLM configuration and KV cache manager
(:mod:`econoserve.serving.stepping`): N requests (64-token prompts, 1024 output tokens, an exact
prediction for EconoServe) are admitted and their prompts computed, then ``schedule()`` is timed
step after step while all N decode (the model's forward pass is replaced by a stand-in output;
it is not part of ``schedule()``). The two schedulers alternate in rounds of
``--steps-per-round`` steps, so drift on a shared machine hits both alike; medians and p90 over
all measured steps.

With ``--predictor MODEL_DIR`` it also measures the in-engine length prediction
(:mod:`econoserve.serving.prediction`): N requests without a prediction added to an EconoServe
scheduler that predicts each from its prompt token ids; the mean and longest time per request
(on a tiny model of the predictor's tokenizer's vocabulary size, so that the tokenizer fits).
Refinement's cost: ``bench_serving_refinement.py``.

Writes ``benchmarks/results/scheduler_cost.md`` and ``scheduler_cost.json``. Needs vLLM
(``.venv-serving``)::

    PYTHONPATH=$PWD .venv-serving/bin/python benchmarks/bench_scheduler_cost.py [--quick] [--predictor DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULERS = {
    "vllm": "vllm.v1.core.sched.scheduler.Scheduler",
    "econoserve": "econoserve.serving.scheduler.EconoServeScheduler",
}
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 1024
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048


def build(model_dir: Path, name: str, num_running: int, predictor: str | None = None):
    """A stepped scheduler with room for ``num_running`` requests' whole allocations."""
    from econoserve.serving.stepping import stepped_scheduler

    blocks_per_request = -(-(PROMPT_TOKENS + 2 * OUTPUT_TOKENS) // BLOCK_SIZE)  # EconoServe pads its reservation
    options = {"econoserve": {"policy": "econoserve", **({"predictor": predictor} if predictor else {})}}
    return stepped_scheduler(
        model_dir, SCHEDULERS[name], num_blocks=num_running * blocks_per_request + 64, block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=max(2048, 2 * num_running), max_num_seqs=num_running,
        additional_config=options if name == "econoserve" else None,
    )


def admit(scheduler, num_running: int, predicted: bool = True) -> None:
    """Add ``num_running`` requests and step until every one is decoding."""
    from econoserve.serving.stepping import engine_request, stand_in_model_output

    for index in range(num_running):
        scheduler.add_request(engine_request(f"r{index}", PROMPT_TOKENS, OUTPUT_TOKENS,
                                             OUTPUT_TOKENS if predicted else None))
    for _ in range(10 * num_running):
        output = scheduler.schedule()
        scheduler.update_from_output(output, stand_in_model_output(scheduler, output))
        decoding = sum(1 for r in scheduler.running if r.num_output_tokens > 0)
        if decoding == num_running:
            return
    raise RuntimeError(f"{type(scheduler).__name__}: only {decoding}/{num_running} requests decoding")


def timed_steps(scheduler, num_steps: int, num_running: int) -> list[float]:
    """``schedule()`` wall times [s] of ``num_steps`` steps, checking all requests are scheduled."""
    from econoserve.serving.stepping import stand_in_model_output

    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        output = scheduler.schedule()
        times.append(time.perf_counter() - start)
        if len(output.num_scheduled_tokens) != num_running:
            raise RuntimeError(f"{type(scheduler).__name__} scheduled {len(output.num_scheduled_tokens)} of {num_running}")
        scheduler.update_from_output(output, stand_in_model_output(scheduler, output))
    return times


def predictor_cost(model_dir: Path, predictor: str, num_requests: int) -> dict:
    from econoserve.serving.models import TinyModelSpec, build_tiny_model
    from econoserve.serving.prediction import EnginePredictor

    tokenizer = EnginePredictor.load(predictor).tokenizer
    if tokenizer is not None:  # a text model's tokenizer must fit the engine's vocabulary
        model_dir = build_tiny_model(TinyModelSpec(vocab_size=tokenizer.vocab_size), model_dir.parent)
    scheduler = build(model_dir, "econoserve", num_requests, predictor)
    from econoserve.serving.stepping import engine_request

    for index in range(num_requests):
        scheduler.add_request(engine_request(f"p{index}", PROMPT_TOKENS, OUTPUT_TOKENS))
    cost = scheduler.length_predictor.cost
    return {"requests": cost.num_requests, "mean_ms": cost.mean_s * 1e3, "max_ms": cost.max_s * 1e3,
            "text_model": scheduler.length_predictor.model.needs_text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[50, 200, 500], help="running requests per cell")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per cell")
    parser.add_argument("--steps-per-round", type=int, default=10, help="timed steps per scheduler per round")
    parser.add_argument("--predictor", default=None, help="a saved length model: also time in-engine prediction")
    parser.add_argument("--quick", action="store_true", help="50 and 200 running requests, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.running, args.rounds = [50, 200], 3

    from econoserve.serving.models import TinyModelSpec, build_tiny_model

    model_dir = build_tiny_model(TinyModelSpec(), Path(tempfile.mkdtemp(prefix="bench-scheduler-cost-")))
    rows = []
    for num_running in args.running:
        schedulers = {name: build(model_dir, name, num_running) for name in SCHEDULERS}
        for scheduler in schedulers.values():
            admit(scheduler, num_running)
        times: dict[str, list[float]] = {name: [] for name in SCHEDULERS}
        for _ in range(args.rounds):
            for name, scheduler in schedulers.items():
                times[name] += timed_steps(scheduler, args.steps_per_round, num_running)
        row = {"running": num_running, "steps": len(times["vllm"])}
        for name, values in times.items():
            row[f"{name}_median_ms"] = statistics.median(values) * 1e3
            row[f"{name}_p90_ms"] = float(np.percentile(values, 90)) * 1e3
        row["ratio_median"] = row["econoserve_median_ms"] / row["vllm_median_ms"]
        rows.append(row)
        print(json.dumps(row))
    prediction = predictor_cost(model_dir, args.predictor, 200) if args.predictor else None
    write(rows, prediction, args)


def _model_label(path: str) -> str:
    """The saved model as its training describes it (dataset, objective, rounds, n-gram vocabulary),
    from its ``metadata.json``; the directory's name for a model without one."""
    metadata = Path(path) / "metadata.json"
    if not metadata.exists():
        return Path(path).name
    saved = json.loads(metadata.read_text())
    config, data = saved.get("config", {}), saved.get("training_data", {})
    return (f"{data.get('dataset', '?')} {config.get('objective', '?')} model, {config.get('num_boost_round', '?')} "
            f"rounds, n-gram vocabulary {config.get('features', {}).get('ngram_vocabulary_size', '?')}")


def write(rows: list[dict], prediction: dict | None, args: argparse.Namespace) -> None:
    import vllm

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "vllm": vllm.__version__, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "block_size": BLOCK_SIZE}
    (RESULTS / "scheduler_cost.json").write_text(json.dumps({"meta": meta, "rows": rows, "prediction": prediction},
                                                            indent=2) + "\n")
    lines = [
        "# schedule() wall time per step inside vLLM: EconoServe vs vLLM's default scheduler",
        "",
        f"vLLM {meta['vllm']} (CPU build), stepped scheduler (real vLLM config and KV cache manager, stand-in model "
        f"output), every request decoding; {args.rounds} alternating rounds x {args.steps_per_round} steps per "
        "scheduler and cell. `benchmarks/bench_scheduler_cost.py`.",
        "",
        "| running requests | vLLM median [ms] | EconoServe median [ms] | EconoServe / vLLM | vLLM p90 [ms] | EconoServe p90 [ms] |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['running']} | {row['vllm_median_ms']:.3f} | {row['econoserve_median_ms']:.3f} | "
                     f"{row['ratio_median']:.2f} | {row['vllm_p90_ms']:.3f} | {row['econoserve_p90_ms']:.3f} |")
    if prediction:
        lines += ["", f"In-engine length prediction ({'text' if prediction['text_model'] else 'length-only'} model, "
                      f"{_model_label(args.predictor)}): {prediction['requests']} requests, mean {prediction['mean_ms']:.3f} ms, "
                      f"longest {prediction['max_ms']:.3f} ms per request (paid once, in add_request)."]
    (RESULTS / "scheduler_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Measured step times of the real engine over a grid of batch compositions.

The simulator's latency model predicts one iteration's time from its batch: prompt tokens
computed (prefill), requests decoding (one token each) and the KV tokens their attention reads.
This module measures exactly that on the engine, by building each batch on purpose:

1. start ``decode_batch_size`` requests whose prompts have ``context_length`` tokens, and step
   until every one has finished its prompt and is decoding;
2. then, ``warmup + repeats`` times: add one request with a ``prefill_tokens`` prompt and
   ``max_tokens = 1`` (it finishes in that step) and run one step: a batch of ``prefill_tokens``
   prefill + ``decode_batch_size`` decode tokens over ``~decode_batch_size * context_length``
   tokens of context. Pure-decode cells (``prefill_tokens = 0``) just step.
3. abort the decoders, step until the engine is empty, go to the next cell.

Each measured step's composition is read back from the recording scheduler (not assumed), and
a step whose composition differs from the cell's (vLLM chose otherwise) is dropped and counted.

The table (one row per measured step) has the columns the simulator's latency fit reads:

=========================  ================================================================
``prefill_tokens``         prompt tokens computed in the step [tokens]
``decode_tokens``          decode tokens in the step (= decoding requests) [tokens]
``context_tokens``         KV tokens read by attention, summed over requests [tokens]
``step_time_s``            ``schedule()`` entry to ``update_from_output()`` exit [s]
``engine_step_time_s``     the whole ``LLMEngine.step()`` call [s]: the step plus the engine's
                           work around it (output processing), what a served step costs
``num_prefill_requests``   requests prefilling in the step
``num_decode_requests``    requests decoding in the step
``schedule_time_s``        time inside ``schedule()`` [s]
``cell_prefill_tokens``    the grid cell: prefill tokens asked for [tokens]
``cell_decode_batch``      the grid cell: decoding requests asked for
``cell_context_length``    the grid cell: prompt length of each decoding request [tokens]
``repeat``                 0-based repetition within the cell
=========================  ================================================================
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.serving.engine import EngineConfig, OfflineEngine
from econoserve.serving.replay import ReplayRequest
from econoserve.sim.latency import LatencyModel

STEP_TIME_COLUMNS: tuple[str, ...] = (
    "prefill_tokens",
    "decode_tokens",
    "context_tokens",
    "step_time_s",
    "engine_step_time_s",
    "num_prefill_requests",
    "num_decode_requests",
    "schedule_time_s",
    "cell_prefill_tokens",
    "cell_decode_batch",
    "cell_context_length",
    "repeat",
)


@dataclass(frozen=True)
class ProfileGrid:
    """Batch compositions to measure (tokens, requests) and how often."""

    prefill_tokens: tuple[int, ...] = (0, 16, 64, 256, 1024)
    decode_batch_sizes: tuple[int, ...] = (0, 1, 4, 16, 48)
    context_lengths: tuple[int, ...] = (32, 256, 1024)
    """Prompt length of each decoding request [tokens]."""
    repeats: int = 5
    warmup: int = 1
    """Steps run and discarded before the measured ones, per cell."""
    seed: int = 0

    def cells(self) -> Iterator[tuple[int, int, int]]:
        """(prefill tokens, decode batch, context length) for every non-empty cell."""
        for prefill, batch, context in itertools.product(
            self.prefill_tokens, self.decode_batch_sizes, self.context_lengths
        ):
            if prefill == 0 and batch == 0:
                continue
            if batch == 0 and context != self.context_lengths[0]:
                continue  # context length means nothing without decoders
            yield prefill, batch, context

    def engine_limits(self) -> dict[str, int]:
        """Budgets the engine needs so that every cell runs as one step without preemption."""
        max_batch = max(self.decode_batch_sizes)
        max_prefill = max(self.prefill_tokens)
        max_context = max(self.context_lengths)
        decode_steps = self.warmup + self.repeats + 2
        return {
            "max_num_seqs": max_batch + 1,
            "max_num_batched_tokens": max(max_prefill + max_batch, 2048),
            "max_model_len": max(max_context, max_prefill) + decode_steps + 64,
            "kv_cache_tokens": max_batch * (max_context + decode_steps + 64) + max_prefill + 4096,
        }


@dataclass
class StepTimeProfile:
    """The measured table plus what was skipped and how the engine was configured."""

    table: pd.DataFrame
    dropped_steps: int
    engine: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def write(self, path: str | Path) -> Path:
        """Write the table as ``.parquet`` or ``.csv`` (by the suffix)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".csv":
            self.table.to_csv(path, index=False)
        elif path.suffix == ".parquet":
            self.table.to_parquet(path, index=False)
        else:
            raise UserError(f"{path}: write the step-time table as .parquet or .csv")
        return path


def profile_step_times(config: EngineConfig, grid: ProfileGrid = ProfileGrid()) -> StepTimeProfile:
    """Measure every cell of ``grid`` on a fresh in-process engine built from ``config``.

    ``config``'s budgets are raised where the grid needs more (see
    :meth:`ProfileGrid.engine_limits`); its scheduler must record iterations.
    """
    limits = grid.engine_limits()
    config = replace(
        config,
        scheduler_cls=config.scheduler_cls or "econoserve.serving.recording.RecordingScheduler",
        **{name: max(getattr(config, name) or 0, value) for name, value in limits.items()},
    )
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    dropped = 0
    with OfflineEngine(config) as engine:
        vocab = _vocab_size(config)
        rng = np.random.default_rng(grid.seed)
        ids = itertools.count()
        for prefill, batch, context in grid.cells():
            cell_rows, cell_dropped = _measure_cell(engine, grid, prefill, batch, context, rng, vocab, ids)
            rows += cell_rows
            dropped += cell_dropped
    table = pd.DataFrame(rows, columns=list(STEP_TIME_COLUMNS))
    return StepTimeProfile(table, dropped, asdict(config), asdict(grid), time.monotonic() - started)


def _vocab_size(config: EngineConfig) -> int:
    from econoserve.serving.models import model_vocab_size

    return model_vocab_size(Path(config.model))


def _request(request_id: int, prompt_tokens: int, max_tokens: int, rng: np.random.Generator, vocab: int) -> ReplayRequest:
    prompt = rng.integers(4, vocab, size=prompt_tokens)
    return ReplayRequest(request_id, 0.0, tuple(int(t) for t in prompt), max_tokens)


def _measure_cell(
    engine: OfflineEngine,
    grid: ProfileGrid,
    prefill: int,
    batch: int,
    context: int,
    rng: np.random.Generator,
    vocab: int,
    ids: Iterator[int],
) -> tuple[list[dict[str, Any]], int]:
    records = engine.scheduler.iteration_log.iterations
    decode_steps = grid.warmup + grid.repeats + 2
    decoders = [_request(next(ids), context, decode_steps + 64, rng, vocab) for _ in range(batch)]
    for request in decoders:
        engine.add(request)
    _step_until_decoding(engine, len(decoders))

    rows, dropped = [], 0
    for repeat in range(-grid.warmup, grid.repeats):
        if prefill:
            engine.add(_request(next(ids), prefill, 1, rng, vocab))
        before = len(records)
        started = time.perf_counter()
        engine.engine.step()
        engine_step_time_s = time.perf_counter() - started
        step = records[-1] if len(records) > before else None
        if repeat < 0:
            continue
        if step is None or step.prefill_tokens != prefill or step.decode_tokens != batch:
            dropped += 1
            continue
        rows.append(
            {
                "prefill_tokens": step.prefill_tokens,
                "decode_tokens": step.decode_tokens,
                "context_tokens": step.context_tokens,
                "step_time_s": step.duration_s,
                "engine_step_time_s": engine_step_time_s,
                "num_prefill_requests": step.num_prefill_requests,
                "num_decode_requests": step.num_decode_requests,
                "schedule_time_s": step.schedule_time_s,
                "cell_prefill_tokens": prefill,
                "cell_decode_batch": batch,
                "cell_context_length": context,
                "repeat": repeat,
            }
        )
    if decoders:
        engine.engine.abort_request([r.engine_request_id for r in decoders])
    while engine.engine.has_unfinished_requests():
        engine.engine.step()
    return rows, dropped


def _step_until_decoding(engine: OfflineEngine, batch: int, max_steps: int = 10_000) -> None:
    """Step until the ``batch`` requests all finished their prompts (each produced a token)."""
    scheduler = engine.scheduler
    for _ in range(max_steps):
        running = scheduler.running
        if len(running) == batch and all(len(r.output_token_ids) > 0 for r in running) and not len(scheduler.waiting):
            return
        engine.engine.step()
    raise RuntimeError(f"profiler: {batch} requests did not reach decoding in {max_steps} steps")


# --------------------------------------------------------------------- a first fit
@dataclass(frozen=True)
class LinearStepModel:
    """``step_time_s = intercept_s + per_prefill_token_s * prefill + per_decode_token_s * decode
    + per_context_token_s * context`` (least squares), and its fit quality."""

    intercept_s: float
    per_prefill_token_s: float
    per_decode_token_s: float
    per_context_token_s: float
    r2: float
    median_relative_error: float

    def predict(self, prefill_tokens: Any, decode_tokens: Any, context_tokens: Any) -> Any:
        return (
            self.intercept_s
            + self.per_prefill_token_s * np.asarray(prefill_tokens)
            + self.per_decode_token_s * np.asarray(decode_tokens)
            + self.per_context_token_s * np.asarray(context_tokens)
        )

    def iteration_time_s(self, prefill_tokens: Any, decode_tokens: Any, context_tokens: Any,
                         attention_pairs: Any) -> Any:
        """:meth:`predict` as a :class:`~econoserve.sim.latency.LatencyModel` (no attention-pairs term)."""
        return self.predict(prefill_tokens, decode_tokens, context_tokens)


def fit_linear_step_model(table: pd.DataFrame) -> LinearStepModel:
    """Least-squares fit of a measured step-time table (a quick check of how linear steps are)."""
    if len(table) < 4:
        raise UserError("step-time table: need at least 4 measured steps to fit")
    features = table[["prefill_tokens", "decode_tokens", "context_tokens"]].to_numpy(dtype=float)
    design = np.column_stack([np.ones(len(table)), features])
    target = table["step_time_s"].to_numpy(dtype=float)
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    predicted = design @ coefficients
    residual = float(((target - predicted) ** 2).sum())
    total = float(((target - target.mean()) ** 2).sum())
    return LinearStepModel(
        *(float(c) for c in coefficients),
        r2=1.0 - residual / total if total > 0 else float("nan"),
        median_relative_error=float(np.median(np.abs(predicted - target) / target)),
    )


def step_model_error(iterations: pd.DataFrame, model: LatencyModel) -> dict[str, float]:
    """How well ``model`` predicts the steps of a real run (an ``iterations.parquet`` table,
    :mod:`econoserve.results`).

    Relative error ``|predicted - measured| / measured`` per step, summarised; and the ratio of
    predicted to measured busy time (the sum over steps), which is what a simulated makespan sees.
    A real step log records no attention pairs, so ``model`` is asked with none: a fit of real
    steps (:class:`LinearStepModel`, a profile's :class:`~econoserve.sim.latency.FittedLatencyModel`).
    """
    if iterations.empty:
        raise UserError("iterations table is empty: nothing to compare")
    measured = iterations["duration_s"].to_numpy(dtype=float)
    predicted = np.asarray(model.iteration_time_s(iterations["num_prefill_tokens"].to_numpy(float),
                                                  iterations["num_decode_tokens"].to_numpy(float),
                                                  iterations["num_context_tokens"].to_numpy(float), 0.0), dtype=float)
    relative = np.abs(predicted - measured) / measured
    return {
        "num_steps": int(len(measured)),
        "median_relative_error": float(np.median(relative)),
        "p90_relative_error": float(np.percentile(relative, 90)),
        "busy_time_ratio": float(predicted.sum() / measured.sum()),
    }

"""The discrete-event simulator: arrivals, steps and completions, driven by a policy.

:func:`simulate` replays a :class:`~econoserve.workload.trace.Trace` against one policy on one
deployment. Each loop turn: admit the requests that have arrived by now, ask the policy for a
step, charge the step's time from the latency model, give every request whose pending tokens
were computed one output token, and end a request at its *true* output length (the policy only
ever sees the predicted one). When nothing can run, the clock jumps to the next arrival.

**Skip-ahead** (``skip_ahead``, on by default): after a decode-only step in which nothing was
admitted, preempted or finished, the policy can promise that the next ``k`` steps decode exactly
the same requests (:meth:`~econoserve.policy.Policy.steady_decode_steps`). The simulator then
advances those ``k`` steps in bulk (their times still come one by one from the latency model) as
long as no request arrives and none finishes. Results match step-by-step simulation; only the
measured scheduler wall time differs (the bulk update's time is spread over the skipped steps).

**Rejections** are recorded, never silent: a prompt longer than the model's context, prompt +
output beyond the context (a real engine replaying the trace with ``max_tokens`` = the response
length refuses these too), a request whose KV at full length exceeds the whole cache, and
whatever the policy refuses (its reason).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.analysis.metrics import summarize
from econoserve.errors import UserError
from econoserve.policy import EngineLimits, Policy, Request, make_config, make_policy
from econoserve.sim.catalog import GIB, Deployment, get_gpu, get_model
from econoserve.sim.latency import (
    LatencyModel,
    isolated_execution_times_s,
    make_latency_model,
    saturating_token_budget,
    typical_step_times_s,
)
from econoserve.workload.trace import Trace

PREDICTION_SOURCES: tuple[str, ...] = ("trace", "oracle", "none")
#: Consecutive empty decisions (with preemptions or rejections) tolerated at one instant before
#: the simulator declares the policy stuck.
_MAX_EMPTY_DECISIONS = 10_000


class SimulationError(RuntimeError):
    """The simulation cannot proceed (a policy bug: no progress is possible)."""


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulation besides the trace. Units in brackets.

    scheduler:
        Policy name (``vllm``, ``vllm-chunked``, ``orca``, ``sarathi``, ``fastgen``).
    policy_config:
        Overrides of the policy's configuration fields (see each policy's config class).
    model, gpu, tensor_parallel:
        Catalog names and the tensor-parallel degree [GPUs].
    gpu_memory_utilization:
        Fraction of GPU memory the engine uses (vLLM's default 0.9).
    activation_reserve_gib_per_gpu:
        Memory held back for activations per GPU [GiB].
    block_size:
        Tokens per KV block [tokens].
    num_kv_blocks:
        Override of the KV capacity [blocks]; ``None`` = computed from the deployment.
    max_model_len:
        Override of the context length [tokens]; ``None`` = the model's.
    latency_model:
        A name (``roofline``, ``calibrated``, ``distserve``, ``distserve-vllm``, ``vidur``: see
        :func:`~econoserve.sim.latency.make_latency_model`) or a path to a fitted model (JSON) or
        a measured step table (CSV/parquet/JSON-lines) to fit.
    roofline:
        Overrides of :class:`~econoserve.sim.latency.RooflineParams` fields (``roofline`` and
        ``calibrated`` only).
    slo_scale:
        A request's SLO: JCT <= ``slo_scale`` x its isolated execution time.
    seed:
        Recorded for provenance; the simulator itself draws no random numbers.
    predictions:
        What policies see as predicted length: ``trace`` (the trace's
        ``predicted_output_tokens`` column if present, else none), ``oracle`` (the true
        length), ``none``.
    reference_token_budget:
        Tokens per step that count as a fully used GPU, for GPU token utilization [tokens];
        ``None`` = the latency model's saturating token budget.
    saturation_fraction:
        The saturating token budget is the smallest step size [tokens] whose prompt throughput
        reaches this fraction of the latency model's peak, i.e. past which throughput rises by
        less than ``1 - saturation_fraction`` (default 5 %). Policies with a derived token
        budget (EconoServe) use it; so does GPU token utilization.
    skip_ahead:
        Advance steady decode-only stretches in bulk (see the module docstring).
    max_skip_steps:
        Most steps advanced in one bulk move [steps].
    check_invariants:
        After every step, check the KV accounting and the clock (slow; for tests and debugging).
    """

    scheduler: str = "vllm"
    policy_config: Mapping[str, object] = field(default_factory=dict)
    model: str = "opt-13b"
    gpu: str = "a100-80gb"
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    activation_reserve_gib_per_gpu: float = 2.0
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    latency_model: str = "roofline"
    roofline: Mapping[str, float] = field(default_factory=dict)
    slo_scale: float = 5.0
    seed: int = 0
    predictions: str = "trace"
    reference_token_budget: int | None = None
    saturation_fraction: float = 0.95
    skip_ahead: bool = True
    max_skip_steps: int = 4096
    check_invariants: bool = False

    def __post_init__(self) -> None:
        if self.slo_scale <= 0:
            raise UserError(f"--slo-scale must be > 0, got {self.slo_scale}")
        if self.predictions not in PREDICTION_SOURCES:
            raise UserError(f"unknown predictions source {self.predictions!r}; choose one of {', '.join(PREDICTION_SOURCES)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise UserError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise UserError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.reference_token_budget is not None and self.reference_token_budget <= 0:
            raise UserError(f"reference_token_budget must be > 0, got {self.reference_token_budget}")
        if not 0 < self.saturation_fraction <= 1:
            raise UserError(f"saturation_fraction must be in (0, 1], got {self.saturation_fraction}")
        if self.max_skip_steps < 1:
            raise UserError(f"max_skip_steps must be >= 1, got {self.max_skip_steps}")
        if self.activation_reserve_gib_per_gpu < 0:
            raise UserError("activation reserve must be >= 0")

    def deployment(self) -> Deployment:
        return Deployment(
            get_model(self.model),
            get_gpu(self.gpu),
            tensor_parallel=self.tensor_parallel,
            gpu_memory_utilization=self.gpu_memory_utilization,
            activation_reserve_bytes_per_gpu=int(self.activation_reserve_gib_per_gpu * GIB),
            block_size=self.block_size,
        )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["policy_config"] = dict(self.policy_config)
        data["roofline"] = dict(self.roofline)
        return data


@dataclass
class SimulationResult:
    """A run's tables, summary and full configuration."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict[str, object]
    config: dict[str, object]

    def write(self, directory: str | Path) -> Path:
        """Write ``requests.parquet``, ``iterations.parquet``, ``summary.json``, ``config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.requests.to_parquet(directory / "requests.parquet", index=False)
        self.iterations.to_parquet(directory / "iterations.parquet", index=False)
        (directory / "summary.json").write_text(json.dumps(_jsonable(self.summary), indent=2, sort_keys=True) + "\n")
        (directory / "config.json").write_text(json.dumps(_jsonable(self.config), indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def read(cls, directory: str | Path) -> "SimulationResult":
        directory = Path(directory)
        return cls(
            pd.read_parquet(directory / "requests.parquet"),
            pd.read_parquet(directory / "iterations.parquet"),
            json.loads((directory / "summary.json").read_text()),
            json.loads((directory / "config.json").read_text()),
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None
    return value


# --------------------------------------------------------------------- set-up
def build_setup(config: SimulationConfig) -> tuple[Deployment, LatencyModel, EngineLimits]:
    """The deployment, latency model and engine limits a configuration describes."""
    deployment = config.deployment()
    latency: LatencyModel = make_latency_model(config.latency_model, deployment, config.roofline)
    num_blocks = config.num_kv_blocks if config.num_kv_blocks is not None else deployment.num_kv_blocks
    max_model_len = config.max_model_len or deployment.model.max_context_tokens
    budget = saturating_token_budget(latency, fraction=config.saturation_fraction)
    prefill_step_s, decode_step_s = typical_step_times_s(latency, budget)
    limits = EngineLimits(
        num_kv_blocks=num_blocks,
        block_size=config.block_size,
        max_model_len=max_model_len,
        saturating_token_budget=budget,
        prefill_time_per_token_s=prefill_step_s / budget,
        decode_time_per_step_s=decode_step_s,
    )
    return deployment, latency, limits


# --------------------------------------------------------------------- the loop
class _IterationLog:
    """Per-step columns as typed arrays (8 bytes a value; appended in the hot loop)."""

    COLUMNS = (
        "start_time_s",
        "duration_s",
        "num_prefill_tokens",
        "num_decode_tokens",
        "num_context_tokens",
        "num_prefill_requests",
        "num_preempted",
        "kv_blocks_used",
        "kv_blocks_reserved",
        "kv_tokens_stored",
        "num_running",
        "num_waiting",
        "skipped",
        "scheduler_wall_time_s",
    )

    FLOAT_COLUMNS = ("start_time_s", "duration_s", "scheduler_wall_time_s")

    def __init__(self) -> None:
        for name in self.COLUMNS:
            setattr(self, name, array("d" if name in self.FLOAT_COLUMNS else "q"))


def simulate(trace: Trace, config: SimulationConfig | None = None, progress: bool = False) -> SimulationResult:
    """Run ``trace`` through the policy and deployment of ``config``; return the run's tables."""
    config = config or SimulationConfig()
    deployment, latency, limits = build_setup(config)
    policy = make_policy(config.scheduler, limits, make_config(config.scheduler, _policy_overrides(config)))
    frame = trace.requests
    n = len(frame)
    arrivals = frame["arrival_time_s"].to_numpy(dtype=float)
    prompt = frame["prompt_tokens"].to_numpy(dtype=np.int64)
    output = frame["output_tokens"].to_numpy(dtype=np.int64)
    request_ids = frame["request_id"].to_numpy(dtype=np.int64)
    predicted = _predictions(trace, config, policy)
    if policy.uses_predictions and n and predicted[0] is None:
        warnings.warn(
            f"{policy.name}: the trace has no predicted_output_tokens, so every request gets the "
            "fallback allocation (the model's context); annotate it with `econoserve predictor predict` "
            "or use predictions='oracle'",
            stacklevel=2,
        )

    arrivals_list = arrivals.tolist()
    output_list = output.tolist()
    first_token = [float("nan")] * n
    finish = [float("nan")] * n
    reasons = [""] * n
    token_runs: list[list[int]] = [[] for _ in range(n)]
    request_objects: list[Request | None] = [None] * n
    log = _IterationLog()

    engine_reject = _engine_rejections(prompt, output, limits)
    bar = _progress_bar(n, progress, config)
    bar_step = max(1, n // 200)
    now = arrivals_list[0] if n else 0.0
    next_index = 0
    done = 0
    iteration = 0
    empty_decisions = 0
    skip_enabled = config.skip_ahead
    lat = latency.iteration_time_s
    kv = policy.kv_cache
    stats = policy.stats

    while done < n:
        # 1. arrivals up to now
        while next_index < n and arrivals_list[next_index] <= now:
            i = next_index
            next_index += 1
            reason = engine_reject.get(i)
            request = Request(int(request_ids[i]), arrivals_list[i], int(prompt[i]), predicted[i], index=i)
            request_objects[i] = request
            if reason is None:
                reason = policy.add_request(request)
            if reason is not None:
                reasons[i] = reason
                done += 1
        if done >= n:
            break
        if not policy.has_unfinished_requests():
            now = arrivals_list[next_index]
            continue

        # 2. one step
        wall_before = stats.wall_time_s
        decision = policy.schedule(now)
        for request, reason in decision.rejected:
            reasons[request.index] = reason or "rejected by the policy"
            done += 1
        if not decision.scheduled:
            empty_decisions += 1
            if (decision.preempted or decision.rejected) and empty_decisions < _MAX_EMPTY_DECISIONS:
                continue  # the policy changed its state; ask again at the same time
            if next_index < n:
                now = max(now, arrivals_list[next_index])
                continue
            raise SimulationError(
                f"{policy.name}: no step is possible at t={now:.3f}s with {policy.num_waiting} waiting and "
                f"{policy.num_running} running requests, no arrivals left; KV {kv.snapshot()}"
            )
        empty_decisions = 0
        duration = lat(decision.num_prefill_tokens, decision.num_decode_tokens,
                       decision.num_context_tokens, decision.num_attention_pairs)
        end = now + duration
        finished = []
        for request, num_new in zip(decision.scheduled, decision.num_scheduled_tokens):
            if request.num_computed_tokens + num_new == request.num_prompt_tokens + request.num_output_tokens:
                i = request.index
                runs = token_runs[i]
                if runs and runs[-1] == iteration:
                    runs[-1] = iteration + 1
                else:
                    runs.append(iteration)
                    runs.append(iteration + 1)
                produced = request.num_output_tokens + 1
                if produced == 1:
                    first_token[i] = end
                if produced == output_list[i]:
                    finish[i] = end
                    finished.append(request)
        policy.update_from_output(decision, finished)
        log.start_time_s.append(now)
        log.duration_s.append(duration)
        log.num_prefill_tokens.append(decision.num_prefill_tokens)
        log.num_decode_tokens.append(decision.num_decode_tokens)
        log.num_context_tokens.append(decision.num_context_tokens)
        log.num_prefill_requests.append(decision.num_prefill_requests)
        log.num_preempted.append(len(decision.preempted))
        log.kv_blocks_used.append(kv.num_allocated_blocks)
        log.kv_blocks_reserved.append(kv.num_reserved_blocks)
        log.kv_tokens_stored.append(kv.num_stored_tokens)
        log.num_running.append(len(policy.running))
        log.num_waiting.append(policy.num_waiting)
        log.skipped.append(0)
        log.scheduler_wall_time_s.append(stats.wall_time_s - wall_before)
        iteration += 1
        if config.check_invariants:
            _check_step(policy, now, end)
        now = end
        if finished:
            done += len(finished)
            if bar is not None and done - bar.n >= bar_step:
                bar.update(done - bar.n)
            continue

        # 3. skip ahead over steady decode-only steps
        if skip_enabled and decision.num_prefill_tokens == 0 and policy.running:
            next_arrival = arrivals_list[next_index] if next_index < n else float("inf")
            if now >= next_arrival:
                continue
            running = policy.running
            steps_to_finish = min(output_list[r.index] - r.num_output_tokens for r in running) - 1
            max_steps = min(steps_to_finish, config.max_skip_steps)
            if max_steps < 2:
                continue
            steps = policy.steady_decode_steps(decision, max_steps)
            if steps < 2:
                continue
            before = now
            now, iteration = _skip(policy, latency, log, token_runs, steps, now, next_arrival, iteration)
            if config.check_invariants:
                _check_step(policy, before, now)
    if bar is not None:
        bar.update(done - bar.n)
        bar.close()

    requests_table = _requests_table(
        frame, predicted, request_objects, first_token, finish, reasons, token_runs,
        np.asarray(log.start_time_s, dtype=float) + np.asarray(log.duration_s, dtype=float),
        latency, config.slo_scale,
    )
    iterations_table = _iterations_table(log, limits, policy)
    reference_budget = config.reference_token_budget or limits.saturating_token_budget
    summary = summarize(requests_table, iterations_table, reference_budget, stats.invocations, stats.wall_time_s)
    summary["scheduler"] = policy.name
    summary["skipped_iterations"] = stats.skipped_steps
    for key, value in stats.extra.items():
        summary[f"policy_{key}"] = value
    full_config = {
        "simulation": config.to_dict(),
        "policy": policy.describe(),
        "limits": asdict(limits),
        "deployment": deployment.describe(config.num_kv_blocks),
        "latency_model": latency.describe(),
        "reference_token_budget": reference_budget,
        "trace": {"num_requests": n, "metadata": trace.metadata},
        "econoserve_version": __version__,
    }
    return SimulationResult(requests_table, iterations_table, summary, full_config)


def _skip(policy: Policy, latency: LatencyModel, log: _IterationLog, token_runs, steps: int, now: float,
          next_arrival: float, iteration: int) -> tuple[float, int]:
    """Advance up to ``steps`` decode-only steps in bulk, stopping before a step that would start
    at or after ``next_arrival``; returns the new clock and iteration count."""
    running = policy.running
    kv = policy.kv_cache
    batch = len(running)
    computed = np.fromiter((r.num_computed_tokens for r in running), dtype=np.int64, count=batch)
    j = np.arange(1, steps + 1, dtype=np.int64)
    context = (int(computed.sum()) + batch * j).astype(float)
    durations = latency.iteration_time_s(np.zeros(steps), np.full(steps, float(batch)), context, context)
    durations = durations.tolist()
    starts = []
    for duration in durations:
        if now >= next_arrival:
            break
        starts.append(now)
        now = now + duration
    taken = len(starts)
    if taken == 0:
        return now, iteration
    # KV per step: on-demand growth drawn from each request's reservation first.
    block = kv.block_size
    allocated = np.fromiter((kv.allocated_blocks(r.request_id) for r in running), dtype=np.int64, count=batch)
    reserved = np.fromiter((kv.reserved_blocks(r.request_id) for r in running), dtype=np.int64, count=batch)
    needed = -(-(computed[None, :] + j[:taken, None]) // block)
    grown = np.maximum(needed, allocated[None, :])
    drawn = grown - allocated[None, :]
    used = kv.num_allocated_blocks + drawn.sum(axis=1)
    from_reservation = np.minimum(drawn, reserved[None, :]).sum(axis=1)
    reserved_total = kv.num_reserved_blocks - from_reservation
    stored = kv.num_stored_tokens + batch * j[:taken]

    wall_before = policy.stats.wall_time_s
    policy.advance_decode_steps(taken)
    wall_each = (policy.stats.wall_time_s - wall_before) / taken
    for request in running:
        runs = token_runs[request.index]
        runs[-1] += taken  # the last step emitted a token for every running request
    log.start_time_s.extend(starts)
    log.duration_s.extend(durations[:taken])
    log.num_prefill_tokens.extend([0] * taken)
    log.num_decode_tokens.extend([batch] * taken)
    log.num_context_tokens.extend(context[:taken].astype(np.int64).tolist())
    log.num_prefill_requests.extend([0] * taken)
    log.num_preempted.extend([0] * taken)
    log.kv_blocks_used.extend(used.tolist())
    log.kv_blocks_reserved.extend(reserved_total.tolist())
    log.kv_tokens_stored.extend(stored.tolist())
    log.num_running.extend([batch] * taken)
    log.num_waiting.extend([policy.num_waiting] * taken)
    log.skipped.extend([1] * taken)
    log.scheduler_wall_time_s.extend([wall_each] * taken)
    return now, iteration + taken


def _check_step(policy: Policy, start: float, end: float) -> None:
    policy.kv_cache.check_invariants()
    if not end > start:
        raise SimulationError(f"clock did not advance: {start} -> {end}")
    for request in policy.running:
        if not policy.kv_cache.holds(request.request_id) and request.num_computed_tokens:
            raise SimulationError(f"running request {request.request_id} holds no KV")
        if request.num_computed_tokens > policy.kv_cache.allocated_blocks(request.request_id) * policy.kv_cache.block_size:
            raise SimulationError(f"request {request.request_id} computed more tokens than its blocks hold")


def _policy_overrides(config: SimulationConfig) -> dict[str, object]:
    """The policy's configuration overrides; a policy that orders by SLO (it has a ``slo_scale``
    field) gets the simulation's ``slo_scale`` unless it is overridden explicitly."""
    overrides = dict(config.policy_config)
    defaults = make_config(config.scheduler)
    if dataclasses.is_dataclass(defaults) and any(f.name == "slo_scale" for f in dataclasses.fields(defaults)):
        overrides.setdefault("slo_scale", config.slo_scale)
    return overrides


def _predictions(trace: Trace, config: SimulationConfig, policy: Policy) -> list[int | None]:
    n = len(trace)
    if config.predictions == "oracle" or policy.wants_oracle_predictions:
        return trace.requests["output_tokens"].astype(int).tolist()
    if config.predictions == "trace" and trace.has_predictions:
        return trace.requests["predicted_output_tokens"].astype(int).tolist()
    return [None] * n


def _engine_rejections(prompt: np.ndarray, output: np.ndarray, limits: EngineLimits) -> dict[int, str]:
    """Requests no engine could serve, with the reason, by row."""
    reasons: dict[int, str] = {}
    context = limits.max_model_len
    peak_blocks = -(-(prompt + output - 1) // limits.block_size)
    for i in np.flatnonzero((prompt > context) | (prompt + output > context) | (peak_blocks > limits.num_kv_blocks)):
        p, o = int(prompt[i]), int(output[i])
        if p > context:
            reasons[int(i)] = f"prompt of {p} tokens exceeds the model's context of {context} tokens"
        elif p + o > context:
            reasons[int(i)] = f"prompt + output of {p + o} tokens exceeds the model's context of {context} tokens"
        else:
            reasons[int(i)] = (
                f"needs {int(peak_blocks[i])} KV blocks at full length; the cache has {limits.num_kv_blocks}"
            )
    return reasons


def _progress_bar(total: int, enabled: bool, config: SimulationConfig):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"simulate {config.scheduler}", unit="req", mininterval=0.5)


# --------------------------------------------------------------------- tables
def _requests_table(frame, predicted, request_objects, first_token, finish, reasons, token_runs, iteration_end,
                    latency, slo_scale) -> pd.DataFrame:
    n = len(frame)
    arrival = frame["arrival_time_s"].to_numpy(float)
    prompt = frame["prompt_tokens"].to_numpy(np.int64)
    output = frame["output_tokens"].to_numpy(np.int64)
    finish = np.asarray(finish, dtype=float)
    first = np.asarray(first_token, dtype=float)
    finished = ~np.isnan(finish)
    status = np.where(finished, "finished", "rejected")
    if not (finished | (np.asarray(reasons, dtype=object) != "")).all():
        raise SimulationError("a request neither finished nor was rejected (simulator bug)")
    preemptions = np.fromiter((r.num_preemptions if r is not None else 0 for r in request_objects), dtype=np.int64, count=n)
    generated = np.fromiter((r.num_output_tokens if r is not None else 0 for r in request_objects), dtype=np.int64, count=n)
    mean_tbt, p99_tbt = _tbt_stats(token_runs, iteration_end, n)
    isolated = isolated_execution_times_s(latency, prompt, output)
    jct = finish - arrival
    deadline = arrival + slo_scale * isolated
    table = pd.DataFrame(
        {
            "request_id": frame["request_id"].to_numpy(np.int64),
            "dataset": frame["dataset"].to_numpy(object),
            "status": status,
            "rejection_reason": np.asarray(reasons, dtype=object),
            "arrival_time_s": arrival,
            "first_token_time_s": first,
            "finish_time_s": finish,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "predicted_output_tokens": pd.array([p for p in predicted], dtype="Int64"),
            "generated_tokens": generated,
            "num_preemptions": preemptions,
            "ttft_s": first - arrival,
            "mean_tbt_s": mean_tbt,
            "p99_tbt_s": p99_tbt,
            "jct_s": jct,
            "normalized_latency_s": jct / output,
            "isolated_time_s": isolated,
            "slo_deadline_s": deadline,
            "slo_met": finished & (finish <= deadline),
        }
    )
    return table


def _tbt_stats(token_runs, iteration_end: np.ndarray, n: int, chunk_tokens: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Mean and p99 time between tokens per request [s] (NaN with fewer than two tokens).

    Requests are processed in chunks of about ``chunk_tokens`` tokens, so memory stays bounded."""
    mean = np.full(n, np.nan)
    p99 = np.full(n, np.nan)
    start = 0
    while start < n:
        stop, tokens = start, 0
        while stop < n and (tokens == 0 or tokens < chunk_tokens):
            runs = token_runs[stop]
            tokens += sum(runs[1::2]) - sum(runs[0::2])
            stop += 1
        _tbt_chunk(token_runs, iteration_end, start, stop, mean, p99)
        start = stop
    return mean, p99


def _tbt_chunk(token_runs, iteration_end, first, stop, mean, p99) -> None:
    run_starts, run_ends, owners = [], [], []
    for i in range(first, stop):
        runs = token_runs[i]
        if runs:
            run_starts.extend(runs[0::2])
            run_ends.extend(runs[1::2])
            owners.extend([i - first] * (len(runs) // 2))
    n = stop - first
    if not owners:
        return
    starts = np.asarray(run_starts, dtype=np.int64)
    lengths = np.asarray(run_ends, dtype=np.int64) - starts
    run_owner = np.asarray(owners, dtype=np.int64)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    token_iteration = np.arange(total) - np.repeat(offsets - starts, lengths)
    token_owner = np.repeat(run_owner, lengths)
    times = iteration_end[token_iteration]
    same = token_owner[1:] == token_owner[:-1]
    gaps = np.diff(times)[same]
    gap_owner = token_owner[1:][same]
    if gaps.size == 0:
        return
    counts = np.bincount(gap_owner, minlength=n)
    sums = np.bincount(gap_owner, weights=gaps, minlength=n)
    has = counts > 0
    where = np.flatnonzero(has) + first
    mean[where] = sums[has] / counts[has]
    order = np.lexsort((gaps, gap_owner))
    sorted_gaps = gaps[order]
    first_index = np.cumsum(counts) - counts
    position = 0.99 * (counts[has] - 1)
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, counts[has] - 1)
    base = first_index[has]
    low_value = sorted_gaps[base + lo]
    high_value = sorted_gaps[base + hi]
    p99[where] = low_value + (high_value - low_value) * (position - lo)


def _iterations_table(log: _IterationLog, limits: EngineLimits, policy: Policy) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "iteration": np.arange(len(log.duration_s), dtype=np.int64),
            "start_time_s": np.asarray(log.start_time_s, dtype=float),
            "duration_s": np.asarray(log.duration_s, dtype=float),
            "num_prefill_tokens": np.asarray(log.num_prefill_tokens, dtype=np.int64),
            "num_decode_tokens": np.asarray(log.num_decode_tokens, dtype=np.int64),
            "num_context_tokens": np.asarray(log.num_context_tokens, dtype=np.int64),
            "num_prefill_requests": np.asarray(log.num_prefill_requests, dtype=np.int64),
            "num_preempted": np.asarray(log.num_preempted, dtype=np.int64),
            "kv_blocks_used": np.asarray(log.kv_blocks_used, dtype=np.int64),
            "kv_blocks_reserved": np.asarray(log.kv_blocks_reserved, dtype=np.int64),
            "kv_blocks_capacity": np.full(len(log.duration_s), limits.num_kv_blocks, dtype=np.int64),
            "kv_tokens_stored": np.asarray(log.kv_tokens_stored, dtype=np.int64),
            "block_size": np.full(len(log.duration_s), limits.block_size, dtype=np.int64),
            "num_running": np.asarray(log.num_running, dtype=np.int64),
            "num_waiting": np.asarray(log.num_waiting, dtype=np.int64),
            "token_budget": np.full(len(log.duration_s), policy.token_budget or 0, dtype=np.int64),
            "skipped": np.asarray(log.skipped, dtype=bool),
            "scheduler_wall_time_s": np.asarray(log.scheduler_wall_time_s, dtype=float),
        }
    )
    table["kv_blocks_allocated"] = table["kv_blocks_used"] + table["kv_blocks_reserved"]
    return table


#: Columns that hold wall-clock measurements (excluded from determinism comparisons).
WALL_CLOCK_COLUMNS: tuple[str, ...] = ("scheduler_wall_time_s",)
WALL_CLOCK_SUMMARY_KEYS: tuple[str, ...] = (
    "scheduler_time_s",
    "scheduler_time_per_iteration_s",
    "scheduler_time_per_request_s",
    "scheduler_share_of_iteration_time",
)

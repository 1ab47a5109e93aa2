"""Notebook 04's study: one trace through real vLLM under several schedulers, and the simulator
checked against each run.

1. **profile** the engine's step time over batch compositions (``econoserve profile-engine``)
   and fit the simulator's latency model to it
   (:meth:`~econoserve.sim.latency.FittedLatencyModel.fit`, relative error, outliers dropped);
2. **serve** the trace under each scheduler (``econoserve serve``: ``vllm`` is vLLM's own
   scheduler, ``econoserve`` the EconoServe policy inside vLLM, ``policy:NAME`` any policy; either
   of the last two with configuration overrides, ``econoserve[knob=value,...]``; with
   ``profile_estimates`` a policy inside vLLM also gets the fitted model, from which it takes its
   time estimates as in the simulator), in ``repeats`` interleaved rounds (round 1 serves every
   scheduler once, then round 2, ...), so a change in the machine's load reaches every scheduler
   alike; the comparison is the median over rounds of each round's side-by-side ratio. At a
   ``load``, a run with every request at once first measures the engine's capacity
   (:func:`measured_capacity_rps`), and the rounds serve the trace at that share of it;
3. **simulate** the same trace on the same engine shape with the fitted latency model and
   compare per request (:mod:`econoserve.serving.fidelity`).

vLLM runs in its own environment (``.venv-serving``, see ``scripts/install_serving.sh``), so
steps 1 and 2 run ``python -m econoserve`` there as subprocesses; this module itself never imports
vLLM, and runs in the notebook's kernel. A step whose output already exists for the same inputs
is reused (``reuse=True``), so a notebook can be re-run to redraw figures; a served run's inputs
include the package's source (:func:`~econoserve.experiments.backends.code_digest`), so a run
served by other code (another policy default) is never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.experiments.backends import code_digest
from econoserve.policy import parse_policy_spec
from econoserve.results import read_iterations, read_requests
from econoserve.serving.fidelity import (EngineShape, error_summary, request_errors, served_limits, simulation_config,
                                         wall_step_table)
from econoserve.serving.profiler import ProfileGrid
from econoserve.sim import SimulationConfig, SimulationResult, simulate
from econoserve.sim.latency import FittedLatencyModel
from econoserve.workload.trace import Trace

#: Where ``scripts/install_serving.sh`` puts vLLM, relative to the repository root.
DEFAULT_SERVING_PYTHON = ".venv-serving/bin/python"
#: The latency model fitted to the engine's profile, under the study's output directory.
LATENCY_MODEL_FILE = "latency_model.json"
#: Where a study at a ``load`` measures the engine's capacity, under its output directory.
CAPACITY_DIR = "capacity"


@dataclass(frozen=True)
class StudyRegime:
    """A workload and an engine size for the study (notebook 04's ``regime`` parameter).

    The arrival rate is either fixed, ``rate_rps`` [req/s], or relative to the engine, ``load``
    [fraction]: the rate becomes ``load`` x the engine's capacity, measured on the real engine just
    before the runs (:func:`measured_capacity_rps`), so the regime means the same on a faster or
    slower machine. Exactly one of the two is set. ``length_scale`` multiplies every prompt, response and
    predicted length [tokens] (rounded up): a dataset's lengths brought to the tiny model's
    context; what still exceeds ``max_model_len`` is clipped (:func:`scale_lengths`).
    """

    dataset: str
    num_requests: int
    kv_cache_tokens: int
    max_model_len: int
    rate_rps: float | None = None
    load: float | None = None
    length_scale: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if (self.rate_rps is None) == (self.load is None):
            raise UserError(f"a study regime has either a rate or a load, got rate {self.rate_rps} and load {self.load}")
        _require_positive_or_none("rate_rps", self.rate_rps)
        _require_positive_or_none("load", self.load)

    def engine(self, **options) -> "EngineOptions":
        """The engine this regime is served on: its KV cache and context, ``options`` (other
        :class:`EngineOptions` fields) or their defaults for the rest."""
        return EngineOptions(kv_cache_tokens=self.kv_cache_tokens, max_model_len=self.max_model_len, **options)


def _require_positive_or_none(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive number, got {value}")


#: The regimes notebook 04 offers. ``kv-bound`` (the default): ShareGPT's conversational lengths
#: scaled to a 1024-token context, a KV cache of a few dozen such requests, and arrivals at 0.9x
#: the engine's capacity (what vLLM's scheduler serves with every request arriving at once,
#: measured on the engine), where vLLM's scheduler runs out of KV blocks and preempts (about a
#: quarter to a third of the requests). ``light-load``: Alpaca's short answers on
#: a large cache at a moderate rate (both schedulers serve alike, nothing is preempted).
REGIMES: dict[str, StudyRegime] = {
    "kv-bound": StudyRegime("sharegpt", num_requests=160, load=0.9, kv_cache_tokens=2048, max_model_len=1024,
                            length_scale=0.5, description="ShareGPT lengths x0.5, 2048-token KV cache"),
    "light-load": StudyRegime("alpaca", num_requests=160, rate_rps=20.0, kv_cache_tokens=8192, max_model_len=2048,
                              description="Alpaca lengths, 8192-token KV cache, at most ~14% KV use"),
}


def study_setting(regime: str, **overrides) -> StudyRegime:
    """``REGIMES[regime]`` with every override that is not ``None`` (a ``StudyRegime`` field); a
    ``rate_rps`` given replaces the regime's ``load`` and a ``load`` its ``rate_rps``."""
    if regime not in REGIMES:
        raise UserError(f"regime {regime!r}: choose one of {', '.join(REGIMES)}")
    given = {name: value for name, value in overrides.items() if value is not None}
    if "rate_rps" in given and "load" in given:
        raise UserError("give a rate or a load, not both")
    if "rate_rps" in given:
        given["load"] = None
    elif "load" in given:
        given["rate_rps"] = None
    return replace(REGIMES[regime], **given)


def scale_lengths(trace: Trace, factor: float, max_model_len: int) -> Trace:
    """``trace`` with prompt, response and predicted lengths (refined ones and their ``k``
    included) multiplied by ``factor`` (rounded up, >= 1) and clipped to fit ``max_model_len``
    [tokens]: prompts to half of it, responses (true and predicted) to what the prompt leaves.
    The scaling is recorded in the trace's metadata."""
    if factor <= 0:
        raise UserError(f"length scale must be > 0, got {factor}")
    if max_model_len < 2:
        raise UserError(f"max_model_len must be >= 2, got {max_model_len}")
    frame = trace.requests.copy()

    def scaled(column: str):
        return np.maximum(np.ceil(frame[column].to_numpy(float) * factor), 1).astype(np.int64)

    frame["prompt_tokens"] = np.minimum(scaled("prompt_tokens"), max_model_len // 2)
    room = max_model_len - frame["prompt_tokens"].to_numpy()
    frame["output_tokens"] = np.minimum(scaled("output_tokens"), room)
    if trace.has_predictions:
        frame["predicted_output_tokens"] = np.minimum(scaled("predicted_output_tokens"), room)
    if trace.has_refinements:
        frame["refine_after_tokens"] = scaled("refine_after_tokens")
        frame["refined_output_tokens"] = np.minimum(scaled("refined_output_tokens"), room)
    metadata = {**trace.metadata, "length_scale": {"factor": factor, "max_model_len": max_model_len}}
    return Trace.from_frame(frame, metadata, source="<scaled trace>")


def study_trace(setting: StudyRegime, predictor: str = "train", tokenizer: str = "llama2", seed: int = 0,
                cache_dir: str | Path = "results/04_vllm_serving", training=None) -> Trace:
    """The study's trace: ``setting.num_requests`` requests of ``setting.dataset`` with seeded
    Poisson arrivals at ``setting.rate_rps`` (with a ``load``: at 1 req/s, to be rescaled once
    the engine's capacity is known, see :func:`run_study`), predicted lengths, and lengths scaled
    to the engine (:func:`scale_lengths`).

    ``predictor``: ``train`` (default) = the dataset's own predictor, trained as notebook 03 trains
    it (quick profile: the dataset's training part, cached under ``cache_dir/predictors``), with
    the trace drawn from the held-out part (requests that fit notebook 03's OPT-13B context before
    scaling), so no request was seen in training; ``oracle`` = the
    true lengths; otherwise a saved model directory (notebook 02's), the trace drawn from the
    whole dataset. ``training``: the trained predictor's
    :class:`~econoserve.experiments.PredictorTraining` (``None`` = notebook 03's quick default).
    """
    rate_rps = 1.0 if setting.rate_rps is None else setting.rate_rps
    if predictor == "train":
        from econoserve.experiments.plan import make_plan
        from econoserve.experiments.predictors import predict_lengths
        from econoserve.experiments.workloads import at_rate, request_pool, unit_rate_trace

        extra = {} if training is None else {"predictor_training": training}
        plan = make_plan("quick", datasets=[setting.dataset], predictor="train", num_requests=setting.num_requests,
                         seed=seed, sensitivity=False, tokenizer=tokenizer, **extra)
        pool = request_pool(setting.dataset, plan, plan.deployments[0], with_text=True)
        trace = at_rate(unit_rate_trace(pool, setting.dataset, setting.num_requests, seed), rate_rps)
        trace = predict_lengths(plan, setting.dataset, trace, cache_dir)
    else:
        from econoserve.workload.datasets import TraceSpec, build_trace

        trace = build_trace(TraceSpec(dataset=setting.dataset, tokenizer=tokenizer, num_requests=setting.num_requests,
                                      rate_rps=rate_rps, seed=seed))
        if predictor == "oracle":
            trace = trace.with_predictions(trace.requests["output_tokens"])
        else:
            from econoserve.predictor import LengthPredictor

            trace = LengthPredictor.load(predictor).predict_trace(trace)
    return scale_lengths(trace, setting.length_scale, setting.max_model_len)


@dataclass(frozen=True)
class EngineOptions:
    """The engine every run of the study uses (``econoserve serve`` flags; tokens, requests)."""

    backend: str = "vllm-cpu"
    model: str = "tiny-opt"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    block_size: int = 32
    kv_cache_tokens: int = 8192
    cpu_threads: int | None = 1
    """vllm-cpu: OpenMP threads of the engine, unpinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``);
    ``None`` = vLLM's default (one thread pinned per core). On a shared machine, pinned threads
    that another process preempts make steps up to 100x slower at random; one unpinned thread
    keeps step times, and so the profile and the served runs, consistent."""

    def environment(self) -> dict[str, str]:
        """Environment variables for the engine process."""
        if self.backend != "vllm-cpu" or self.cpu_threads is None:
            return {}
        return {"OMP_NUM_THREADS": str(self.cpu_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

    def flags(self) -> list[str]:
        return [
            "--backend", self.backend, "--model", self.model,
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--max-model-len", str(self.max_model_len),
            "--block-size", str(self.block_size),
            "--kv-cache-tokens", str(self.kv_cache_tokens),
        ]

    def shape(self) -> EngineShape:
        return EngineShape(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
                           self.block_size, self.kv_cache_tokens)


def profile_flags(grid: ProfileGrid) -> list[str]:
    """``econoserve profile-engine`` flags for ``grid`` (its warm-up and seed are the CLI's
    defaults)."""
    return [
        "--prefill-tokens", ",".join(map(str, grid.prefill_tokens)),
        "--decode-batch-sizes", ",".join(map(str, grid.decode_batch_sizes)),
        "--context-lengths", ",".join(map(str, grid.context_lengths)),
        "--repeats", str(grid.repeats),
    ]


@dataclass(frozen=True)
class ServingStudy:
    """What notebook 04 runs: a trace file, the schedulers, the engine, where results go."""

    trace_path: Path
    output_dir: Path
    schedulers: tuple[str, ...] = ("vllm", "econoserve")
    engine: EngineOptions = field(default_factory=EngineOptions)
    profile: ProfileGrid = field(default_factory=ProfileGrid)
    mode: str = "offline"
    serving_python: str = DEFAULT_SERVING_PYTHON
    reuse: bool = True
    timeout_s: float = 900.0
    repeats: int = 1
    """Interleaved rounds of real runs (see the module docstring)."""
    load: float | None = None
    """Serve the trace's arrivals rescaled to this share of the engine's capacity
    (:func:`measured_capacity_rps`, measured on the engine before the runs); ``None`` = as they are."""
    profile_estimates: bool = False
    """Give the policy drop-in the engine's latency model fitted to the profile
    (``output_dir/latency_model.json``, ``econoserve serve --latency-model``): its time estimates
    then come from it as in the simulator, as a deployment should have them; ``False``:
    ``EngineLimits``' A100-like defaults."""

    def __post_init__(self) -> None:
        if not self.schedulers:
            raise UserError("a serving study needs at least one scheduler")
        if self.repeats < 1:
            raise UserError(f"repeats must be >= 1, got {self.repeats}")
        if self.mode not in ("offline", "server"):
            raise UserError(f"mode {self.mode!r}: choose offline or server")
        _require_positive_or_none("load", self.load)
        for scheduler in self.schedulers:
            name, overrides = parse_policy_spec(scheduler)
            if overrides and name == "vllm":
                raise UserError(f"scheduler {scheduler!r}: vLLM's own scheduler takes no policy configuration")


@dataclass
class StudyResult:
    """Real and simulated tables per scheduler, the per-request errors and a summary table.

    ``real_*`` hold each scheduler's *median round* (the round of the median mean JCT; the one
    the simulator is compared with); ``rounds`` has one row per scheduler and round with the real
    run's metrics and ``mean_jct_ratio`` / ``p99_jct_ratio`` / ``throughput_ratio``: the run's
    value over the first scheduler's in the same round. ``summary`` has the real metrics of the
    median round, the medians over rounds of the ratios (``median_mean_jct_ratio``, ...), and the
    simulator's errors."""

    real_requests: dict[str, pd.DataFrame]
    real_iterations: dict[str, pd.DataFrame]
    real_summaries: dict[str, dict]
    simulated: dict[str, SimulationResult]
    errors: pd.DataFrame
    summary: pd.DataFrame
    latency_model: FittedLatencyModel
    rounds: pd.DataFrame
    rate_rps: float
    """The served trace's arrival rate [req/s]: its spec's, or for a trace that records none, the
    mean over its arrivals."""
    capacity_rps: float | None = None
    """The engine's capacity the rate was set from (``ServingStudy.load``: measured, the first
    scheduler's throughput with every request at once), else ``None``."""
    served_capacity_rps: float | None = None
    """The engine's capacity recomputed on the first scheduler's own steps (its median round's
    wall time per step, the ``selffit`` model, every request at once): ``rate_rps`` over it is
    the load the runs saw."""
    profile_capacity_rps: float | None = None
    """The same capacity simulated on the profile (:func:`engine_capacity_rps`; the rate before
    it was measured, and what the benchmarks set their loads from), with ``ServingStudy.load``."""


def run_study(study: ServingStudy, log=print) -> StudyResult:
    """Profile, serve under every scheduler, simulate and compare (see the module docstring);
    with ``study.load``, the trace is first rescaled to that share of the engine's capacity
    (:func:`measured_capacity_rps`; written to ``output_dir/trace_at_load.parquet``, which the
    runs then serve)."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    latency = fit_profile(study, log)
    latency_path = latency.save(out / LATENCY_MODEL_FILE)
    capacity_rps = profile_capacity_rps = None
    if study.load is not None:
        profile_capacity_rps = engine_capacity_rps(Trace.read(study.trace_path), study, latency_path)
        capacity_rps = measured_capacity_rps(study, log)
        study = at_load(study, capacity_rps, log)
    trace = Trace.read(study.trace_path)
    run_dirs: dict[str, list[Path]] = {scheduler: [] for scheduler in study.schedulers}
    for round_index in range(study.repeats):
        for scheduler in study.schedulers:
            run_dirs[scheduler].append(serve(study, scheduler, round_index, log))
    rounds = rounds_table(run_dirs)
    real_requests, real_iterations, real_summaries, simulated, error_tables, rows = {}, {}, {}, {}, [], []
    limits = {}
    for scheduler in study.schedulers:
        run_dir = run_dirs[scheduler][median_round(rounds, scheduler)]
        real_requests[scheduler] = read_requests(run_dir)
        real_iterations[scheduler] = read_iterations(run_dir)
        real_summaries[scheduler] = json.loads((run_dir / "summary.json").read_text())
        limits[scheduler] = served_limits(json.loads((run_dir / "config.json").read_text()))
        simulated[scheduler] = simulate(trace, _simulation(study, scheduler, latency_path, limits[scheduler]))
        simulated[scheduler].write(out / "simulated" / _safe(scheduler))
        errors = request_errors(real_requests[scheduler], simulated[scheduler].requests)
        error_tables.append(errors.assign(scheduler=scheduler))
        rows.append({"scheduler": scheduler, **_real_metrics(real_summaries[scheduler]),
                     **_round_ratios(rounds, scheduler),
                     **_simulated_metrics(simulated[scheduler]), **error_summary(errors, len(trace))})
    summary = pd.DataFrame(rows).merge(_refitted_errors(study, trace, real_requests, real_iterations, limits),
                                       on="scheduler")
    own_steps = _refit_path(study, "selffit", study.schedulers[0])
    return StudyResult(real_requests, real_iterations, real_summaries, simulated,
                       pd.concat(error_tables, ignore_index=True), summary, latency, rounds,
                       rate_rps=_arrival_rate(trace), capacity_rps=capacity_rps,
                       served_capacity_rps=engine_capacity_rps(trace, study, own_steps),
                       profile_capacity_rps=profile_capacity_rps)


def all_at_once(trace: Trace) -> Trace:
    """``trace`` with every request arriving at time 0: the burst an engine's capacity is measured on."""
    frame = trace.requests.copy()
    frame["arrival_time_s"] = 0.0
    return Trace.from_frame(frame, trace.metadata, source="<all requests at once>")


def engine_capacity_rps(trace: Trace, study: ServingStudy, latency_model: str | Path) -> float:
    """The engine's capacity for ``trace``'s requests [req/s], simulated: the throughput of the
    study's first scheduler (vLLM's own, by default) on this engine shape with ``latency_model``
    and every request arriving at once (:func:`all_at_once`). Depends on the step times and the
    KV cache, not on the arrival rate. :func:`measured_capacity_rps` measures the same on the engine."""
    return float(simulate(all_at_once(trace), _simulation(study, study.schedulers[0], latency_model))
                 .summary["throughput_rps"])


def measured_capacity_rps(study: ServingStudy, log=print) -> float:
    """The engine's capacity for the study's trace [req/s], measured: the real throughput of the
    study's first scheduler serving every request of the trace at once (:func:`all_at_once`;
    the run is ``capacity/<scheduler>`` under the output directory, reused like a served run).

    The regime is then set by a measurement rather than a fit; :func:`engine_capacity_rps` on the
    profile is the check (``StudyResult.profile_capacity_rps``: within 2-4 % of the measurement in
    two runs, 23 % above it in a third). Neither removes the drift of a shared machine's speed
    between this run and the rounds (``figures/README.md``, *Figure 15*):
    ``StudyResult.served_capacity_rps`` reports the load the rounds saw."""
    out = Path(study.output_dir) / CAPACITY_DIR
    out.mkdir(parents=True, exist_ok=True)
    burst_path = all_at_once(Trace.read(study.trace_path)).write(out / "trace_all_at_once.parquet")
    scheduler = study.schedulers[0]
    run_dir = _served(replace(study, trace_path=burst_path), scheduler, out / _safe(scheduler), {},
                      "every request at once, to measure the engine's capacity", log)
    return float(json.loads((run_dir / "summary.json").read_text())["throughput_rps"])


def at_load(study: ServingStudy, capacity_rps: float, log=print) -> ServingStudy:
    """The study (which has a ``load``) with its trace's arrivals rescaled to ``load`` x
    ``capacity_rps`` [req/s] (written beside the runs, ``trace_at_load.parquet``; the arrivals'
    order and spacing kept), its ``load`` cleared."""
    if study.load is None:
        raise UserError("at_load: the study has no load to rescale to (it serves its trace as it is)")
    if not capacity_rps > 0:
        raise UserError(f"a study at load {study.load} needs the engine's capacity, got {capacity_rps} req/s")
    trace = Trace.read(study.trace_path)
    rate_rps = study.load * capacity_rps
    rescaled = rescaled_to_rate(trace, rate_rps, study.trace_path)
    rescaled.metadata["load"] = {"load": study.load, "capacity_rps": capacity_rps,
                                 "capacity_scheduler": study.schedulers[0]}
    path = rescaled.write(Path(study.output_dir) / "trace_at_load.parquet")
    log(f"engine capacity {capacity_rps:.2f} req/s ({study.schedulers[0]}, every request at once): "
        f"serving at {rate_rps:.2f} req/s (load {study.load})")
    return replace(study, trace_path=path, load=None)


def rescaled_to_rate(trace: Trace, rate_rps: float, source: str | Path) -> Trace:
    """``trace`` with its arrivals rescaled from the rate it was built at (its spec's ``rate_rps``)
    to ``rate_rps`` [req/s]: the same requests, order and relative spacing. ``source`` (its file,
    or a description) names it in errors and in the result's source."""
    built_rps = _spec_rate(trace)
    if built_rps is None:
        raise UserError(f"{source}: the trace records no arrival rate (metadata spec.rate_rps)")
    frame = trace.requests.copy()
    frame["arrival_time_s"] = frame["arrival_time_s"] * (built_rps / rate_rps)
    metadata = json.loads(json.dumps(trace.metadata))
    metadata.setdefault("spec", {})["rate_rps"] = rate_rps
    return Trace.from_frame(frame, metadata, source=f"<{source} at {rate_rps:.3g} req/s>")


def _arrival_rate(trace: Trace) -> float:
    """``trace``'s arrival rate [req/s]: its spec's ``rate_rps``, else the mean over its arrivals."""
    rate = _spec_rate(trace)
    if rate is not None:
        return rate
    arrivals = trace.requests["arrival_time_s"]
    span = float(arrivals.max() - arrivals.min())
    return (len(arrivals) - 1) / span if span > 0 else math.inf


def _spec_rate(trace: Trace) -> float | None:
    """The arrival rate [req/s] ``trace`` was built at (its metadata's ``spec.rate_rps``), if any."""
    rate = (trace.metadata.get("spec") or {}).get("rate_rps")
    return float(rate) if rate else None


#: Real-run metrics compared round by round against the first scheduler's (``rounds_table``).
RATIO_METRICS: tuple[str, ...] = ("mean_jct_s", "p99_jct_s", "throughput_rps")


def rounds_table(run_dirs: dict[str, list[Path]]) -> pd.DataFrame:
    """One row per scheduler and round: the run's summary metrics and, for :data:`RATIO_METRICS`,
    ``<metric without _s/_rps>_ratio`` = the run's value / the first scheduler's in the same round."""
    rows = []
    for scheduler, dirs in run_dirs.items():
        for round_index, run_dir in enumerate(dirs):
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"scheduler": scheduler, "round": round_index,
                         **{key.removeprefix("real_"): value for key, value in _real_metrics(summary).items()}})
    table = pd.DataFrame(rows)
    first = table[table["scheduler"] == next(iter(run_dirs))].set_index("round")
    for metric in RATIO_METRICS:
        table[_ratio_name(metric)] = table[metric].to_numpy(float) / first.loc[table["round"], metric].to_numpy(float)
    return table


def median_round(rounds: pd.DataFrame, scheduler: str) -> int:
    """The round of ``scheduler`` whose mean JCT is the median of its rounds (the lower middle
    one for an even count)."""
    mine = rounds[rounds["scheduler"] == scheduler].sort_values(["mean_jct_s", "round"])
    return int(mine["round"].iloc[(len(mine) - 1) // 2])


def _round_ratios(rounds: pd.DataFrame, scheduler: str) -> dict[str, float]:
    mine = rounds[rounds["scheduler"] == scheduler]
    values = {"rounds": len(mine)}
    for metric in RATIO_METRICS:
        ratios = mine[_ratio_name(metric)]
        values.update({f"median_{_ratio_name(metric)}": float(ratios.median()),
                       f"min_{_ratio_name(metric)}": float(ratios.min()),
                       f"max_{_ratio_name(metric)}": float(ratios.max())})
    return values


def _ratio_name(metric: str) -> str:
    return f"{metric.removesuffix('_s').removesuffix('_rps')}_ratio"


def _refitted_errors(study: ServingStudy, trace: Trace, real_requests: dict[str, pd.DataFrame],
                     real_iterations: dict[str, pd.DataFrame], limits: dict[str, dict]) -> pd.DataFrame:
    """Two checks that separate the simulated policy from drift between the profile and the runs
    (on a shared machine the profile's steps may be tens of percent slower or faster than the
    runs', and under KV pressure preemptions follow the step time): each scheduler simulated with
    a latency model fitted to the *other* schedulers' real step logs (``crossfit_``; taken
    minutes apart from the profile, seconds apart from each other) and to its *own* run's wall
    time per step (``selffit_``; :func:`~econoserve.serving.fidelity.wall_step_table`: what is
    left is the simulated policy and the latency model's form)."""
    rows = []
    for scheduler in study.schedulers:
        others = [s for s in study.schedulers if s != scheduler]
        fits = {"selffit": (wall_step_table(real_iterations[scheduler]), f"the real run of {scheduler}, wall time")}
        if others:
            fits["crossfit"] = (pd.concat([real_iterations[s] for s in others], ignore_index=True),
                                f"real runs other than {scheduler}")
        row = {"scheduler": scheduler}
        for prefix, (steps, source) in fits.items():
            path = FittedLatencyModel.fit(steps, source=source).save(_refit_path(study, prefix, scheduler))
            result = simulate(trace, _simulation(study, scheduler, path, limits[scheduler]))
            summary = error_summary(request_errors(real_requests[scheduler], result.requests))
            row.update({f"{prefix}_median_jct_error": summary["median_jct_error"],
                        f"{prefix}_p90_jct_error": summary["p90_jct_error"],
                        f"{prefix}_median_ttft_error": summary["median_ttft_error"],
                        f"{prefix}_num_preemptions": int(result.summary["num_preemptions"])})
        rows.append(row)
    return pd.DataFrame(rows)


def _refit_path(study: ServingStudy, prefix: str, scheduler: str) -> Path:
    """Where :func:`_refitted_errors` saves ``scheduler``'s ``selffit`` / ``crossfit`` model."""
    return Path(study.output_dir) / prefix.replace("fit", "_fit") / f"{_safe(scheduler)}.json"


def fit_profile(study: ServingStudy, log=print) -> FittedLatencyModel:
    """Profile the engine (or reuse the profile) and fit the latency model to it."""
    out = Path(study.output_dir)
    path = out / "step_times.parquet"
    inputs = {"engine": asdict(study.engine), "profile": asdict(study.profile)}
    if not _reusable(study, path, inputs):
        log(f"profiling the engine ({len(list(study.profile.cells()))} batch compositions) ...")
        run_econoserve(study, ["profile-engine", "-o", str(path), *profile_flags(study.profile), *study.engine.flags()])
        _stamp(path, inputs)
    steps = pd.read_parquet(path)
    if "engine_step_time_s" in steps:  # the whole engine step: what a served step costs
        steps = steps.drop(columns="step_time_s").rename(columns={"engine_step_time_s": "duration_s"})
    return FittedLatencyModel.fit(steps, source=str(path))


def serve(study: ServingStudy, scheduler: str, round_index: int = 0, log=print) -> Path:
    """Replay the trace under ``scheduler`` in round ``round_index`` (or reuse that run); returns
    the run directory, ``real/<scheduler>/round-<k>``."""
    run_dir = Path(study.output_dir) / "real" / _safe(scheduler) / f"round-{round_index}"
    return _served(study, scheduler, run_dir, {"round": round_index},
                   f"{study.mode}, round {round_index + 1} of {study.repeats}", log)


def _served(study: ServingStudy, scheduler: str, run_dir: Path, inputs: dict, what: str, log) -> Path:
    """``run_dir`` with the study's trace served under ``scheduler``: reused if it was served
    with the same inputs (the engine, scheduler, mode, trace, code, drop-in model and ``inputs``)."""
    inputs = {"engine": asdict(study.engine), "scheduler": scheduler, "mode": study.mode,
              "trace_sha256": _sha256(Path(study.trace_path)), "code": code_digest(), **inputs}
    latency_model = drop_in_latency_model(study, scheduler)
    if latency_model is not None:
        inputs["latency_model_sha256"] = _sha256(latency_model)
    if not _reusable(study, run_dir / "summary.json", inputs):
        log(f"serving the trace with scheduler {scheduler} ({what}) ...")
        run_econoserve(study, serve_arguments(study, scheduler, run_dir))
        _stamp(run_dir / "summary.json", inputs)
    return run_dir


def serve_arguments(study: ServingStudy, scheduler: str, run_dir: Path) -> list[str]:
    """``econoserve serve`` arguments for one run of ``scheduler``: a spec's name and its overrides
    (``econoserve[ordering_prompt_weight=0]``: ``--scheduler econoserve --policy-config '{...}'``)."""
    name, overrides = parse_policy_spec(scheduler)
    config = ["--policy-config", json.dumps(overrides, sort_keys=True)] if overrides else []
    latency_model = drop_in_latency_model(study, scheduler)
    if latency_model is not None:
        config += ["--latency-model", str(latency_model)]
    return ["serve", "--trace", str(study.trace_path), "-o", str(run_dir), "--scheduler", name, *config,
            "--mode", study.mode, *study.engine.flags()]


def drop_in_latency_model(study: ServingStudy, scheduler: str) -> Path | None:
    """The latency model a run of ``scheduler`` gives the policy drop-in: the study's fitted
    profile with ``profile_estimates`` (vLLM's own scheduler takes none), else ``None``."""
    if not study.profile_estimates or parse_policy_spec(scheduler)[0] == "vllm":
        return None
    path = Path(study.output_dir) / LATENCY_MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: no fitted profile for the drop-in (profile_estimates); run_study fits it first")
    return path


def _simulation(study: ServingStudy, scheduler: str, latency_model: str | Path,
                limits: dict | None = None) -> SimulationConfig:
    """The simulation of ``scheduler`` (a spec, see :func:`serve_arguments`) on the study's engine
    with ``latency_model``, its policy given the drop-in's estimates (``limits``: the served run's)."""
    name, overrides = parse_policy_spec(scheduler)
    return simulation_config(study.engine.shape(), name.removeprefix("policy:"), str(latency_model), limits,
                             policy_config=overrides)


def run_econoserve(study: ServingStudy, arguments: list[str]) -> None:
    """``python -m econoserve ARGUMENTS`` in the serving environment; a clear error on failure."""
    python = _serving_python(study.serving_python)
    started = time.monotonic()
    completed = subprocess.run([python, "-m", "econoserve", *arguments], capture_output=True, text=True,
                               timeout=study.timeout_s,
                               env={**os.environ, "TQDM_DISABLE": "1", **study.engine.environment()})
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        raise UserError(f"econoserve {arguments[0]} failed (exit {completed.returncode}) after "
                        f"{time.monotonic() - started:.0f} s:\n{tail}")


def serving_python_available(path: str = DEFAULT_SERVING_PYTHON) -> bool:
    """Whether an interpreter with vLLM is where the study would look for it."""
    try:
        _serving_python(path)
    except UserError:
        return False
    return True


def _serving_python(path: str) -> str:
    candidate = Path(path)
    if not candidate.is_absolute():
        root = Path(__file__).resolve().parents[2]
        candidate = candidate if candidate.exists() else root / candidate
    if not candidate.exists():
        raise UserError(f"no vLLM environment at {path}: run scripts/install_serving.sh (or set serving_python)")
    return str(candidate.absolute())  # not resolved: a venv's python is a symlink to the base one


def _real_metrics(summary: dict) -> dict[str, float]:
    keys = ("completed", "throughput_rps", "mean_jct_s", "p99_jct_s", "mean_ttft_s", "p99_ttft_s",
            "mean_tbt_s", "num_preemptions", "preempted_fraction", "mean_kv_block_usage", "num_iterations",
            "scheduler_time_per_iteration_s")
    return {f"real_{key}": summary.get(key) for key in keys}


def _simulated_metrics(result: SimulationResult) -> dict[str, float]:
    """The simulated run's mean JCT [s] and preemptions (counted from its requests table)."""
    preemptions = result.requests["num_preemptions"]
    return {"sim_mean_jct_s": result.summary.get("mean_jct_s"), "sim_num_preemptions": int(preemptions.sum()),
            "sim_preempted_fraction": float((preemptions > 0).mean())}


def _safe(name: str) -> str:
    """``name`` (a scheduler spec) as one directory name: ``[:/=,]`` become ``-``, ``]`` goes."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("]", "")).strip("-")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp(output: Path, inputs: dict) -> None:
    Path(f"{output}.inputs.json").write_text(json.dumps(inputs, sort_keys=True, default=str))


def _reusable(study: ServingStudy, output: Path, inputs: dict) -> bool:
    stamp = Path(f"{output}.inputs.json")
    return (study.reuse and output.exists() and stamp.exists()
            and stamp.read_text() == json.dumps(inputs, sort_keys=True, default=str))

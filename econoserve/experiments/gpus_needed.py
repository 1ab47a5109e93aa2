"""Figure 12: GPUs needed to reach a target rate, EconoServe and colocated baselines vs DistServe.

A :class:`GPUsNeededPlan` names the runs; :func:`run_gpus_needed` executes it and returns (and
writes) a :class:`GPUsNeededResults`:

``units``     per model, dataset, objective and system: every unit searched (a colocated replica
              at each TP; each DistServe placement) and its goodput [requests/s] and goodput per
              GPU (:mod:`econoserve.experiments.placement`);
``gpus``      per model, dataset, objective, system and target rate: the fewest GPUs meeting the
              objective at that rate (``num_gpus``; NaN with ``reachable`` False and a reason when
              no cluster within ``max_gpus`` does) and the unit that achieved it (Figure 12's CSV).

Documented choices:

* **Target rates** of a panel (model, dataset, objective) are ``target_multiples`` x the goodput
  of DistServe's best placement unit (two significant digits), so every panel spans the same
  range of cluster sizes relative to DistServe; the same rates for every system.
* **Objectives.** ``ttft-tpot``: DistServe's TTFT and TPOT targets per model
  (:data:`TTFT_TPOT_SLO_S`), joint per-request attainment (a request meets both);
  ``jct``: JCT <= ``slo_scale`` x isolated time. Both at 90%.
* **Workload.** Per model and dataset one trace of ``num_requests`` requests (the request pool
  of notebook 03's experiments, in OPT's tokenizer, fitted to the model's context), with the
  plan's predictor (EconoServe sees predicted lengths; the baselines ignore them), rescaled to
  every rate.
* **Quick profile**: OPT-13B and OPT-66B on A100-80GB nodes of 8 GPUs, TP up to 4, one seed,
  one instance per phase in a placement (as DistServe's simulator searches), the best unit per
  system scaled, target multiples 1, 2, 4, a coarse bisection (20%); at each rate at least 200
  requests and 20 s of arrivals (a 2000-request trace). ``full``: also Llama-2-70B, up to two
  instances per phase, the best two units per system, multiples 1-8, a 5% bisection, at least
  1000 requests and 60 s of arrivals (an 8000-request trace), TP up to 8. Where a rate x
  ``min_duration_s`` exceeds the trace, the run covers less time (``num_requests_simulated`` and
  ``arrival_span_s`` in the table say how much).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from econoserve import experiments as exp
from econoserve.errors import UserError
from econoserve.experiments.placement import (
    DISTSERVE,
    Hardware,
    SearchSettings,
    ServiceObjective,
    colocated_search,
    gpus_needed,
    placement_search,
)
from econoserve.policy import DEFAULT_SLO_SCALE
from econoserve.results import read_results, write_results

PROFILES: tuple[str, ...] = ("quick", "full")
#: Colocated systems of Figure 12 (DistServe is always searched too).
COLOCATED_SYSTEMS: tuple[str, ...] = ("econoserve", "vllm", "sarathi")
#: DistServe's TTFT / TPOT targets [s] per model: OPT-13B from its simulator's published case
#: (``simdistserve/README.md``), OPT-66B from its ablation script
#: (``simdistserve/benchmarks/figure11-ablation/01-run_ablation.sh``); Llama-2-70B: OPT-66B's
#: *[choice]*.
TTFT_TPOT_SLO_S: dict[str, tuple[float, float]] = {
    "opt-13b": (0.2, 0.1),
    "opt-66b": (0.4, 0.1),
    "llama-2-70b": (0.4, 0.1),
}


@dataclass(frozen=True)
class GPUsNeededPlan:
    """Everything :func:`run_gpus_needed` does (see the module docstring)."""

    profile: str = "quick"
    datasets: tuple[str, ...] = exp.REQUEST_FAMILIES
    models: tuple[str, ...] = ("opt-13b", "opt-66b")
    gpu: str = "a100-80gb"
    gpus_per_node: int = 8
    max_gpus: int = 64
    systems: tuple[str, ...] = COLOCATED_SYSTEMS
    slo_kinds: tuple[str, ...] = ("ttft-tpot", "jct")
    slo_scale: float = DEFAULT_SLO_SCALE
    target_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    num_requests: int = 2000
    seed: int = 0
    predictor: str = "train"
    latency_model: str = "roofline"
    search: SearchSettings = field(default_factory=lambda: SearchSettings(
        relative_tolerance=0.2, max_evaluations=7, max_instances=1, placements_to_scale=1, min_requests=200,
        min_duration_s=20.0, max_tp=4))

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UserError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if not self.datasets or not self.models or not self.slo_kinds or not self.target_multiples:
            raise UserError("a plan needs at least one dataset, model, SLO kind and target multiple")
        if any(not (m > 0 and math.isfinite(m)) for m in self.target_multiples):
            raise UserError(f"target multiples must be positive, got {self.target_multiples}")
        if self.num_requests < 2:
            raise UserError(f"num_requests must be >= 2, got {self.num_requests}")
        for model in self.models:
            if model not in TTFT_TPOT_SLO_S:
                raise UserError(f"no TTFT/TPOT targets for {model!r}; models: {', '.join(TTFT_TPOT_SLO_S)}")
        for kind in self.slo_kinds:
            self.objective(self.models[0], kind)

    def objective(self, model: str, kind: str) -> ServiceObjective:
        ttft, tpot = TTFT_TPOT_SLO_S[model]
        return ServiceObjective(kind, ttft_s=ttft, tpot_s=tpot, slo_scale=self.slo_scale)

    def hardware(self, model: str) -> Hardware:
        return Hardware(model, self.gpu, self.gpus_per_node, self.max_gpus, self.latency_model)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def make_gpus_needed_plan(profile: str = "quick", **overrides) -> GPUsNeededPlan:
    """The plan of ``profile`` with any :class:`GPUsNeededPlan` field overridden (``None`` = the
    profile's). A plain string for a tuple field is a one-element tuple (papermill passes those)."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    plan = GPUsNeededPlan(profile=profile)
    if profile == "full":
        plan = replace(plan, models=("opt-13b", "opt-66b", "llama-2-70b"), num_requests=8000,
                       target_multiples=(1.0, 2.0, 4.0, 8.0),
                       search=SearchSettings(relative_tolerance=0.05, max_evaluations=12, max_instances=2,
                                             placements_to_scale=2, min_requests=1000, min_duration_s=60.0, max_tp=8))
    fields = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(getattr(plan, key, None), tuple) and isinstance(value, (str, int, float)):
            value = (value,)
        elif isinstance(value, list):
            value = tuple(value)
        fields[key] = value
    try:
        return replace(plan, **fields)
    except TypeError as error:
        raise UserError(f"unknown plan field: {error}") from None


@dataclass
class GPUsNeededResults:
    """What :func:`run_gpus_needed` produced, plus the plan."""

    plan: dict[str, object]
    units: pd.DataFrame
    gpus: pd.DataFrame
    timings_s: dict[str, float] = field(default_factory=dict)

    def write(self, directory: str | Path) -> Path:
        tables = {"units.csv": self.units, "gpus_needed.csv": self.gpus}
        return write_results(directory, tables, "gpus_needed.json", {"plan": self.plan, "timings_s": self.timings_s})

    @classmethod
    def read(cls, directory: str | Path) -> GPUsNeededResults:
        meta, tables = read_results(directory, ["units.csv", "gpus_needed.csv"], "gpus_needed.json")
        return cls(meta["plan"], tables["units"], tables["gpus_needed"], meta.get("timings_s", {}))


def workload_trace(plan: GPUsNeededPlan, model: str, dataset: str, output_dir: str | Path):
    """The unit-rate trace of ``dataset`` for ``model`` with the plan's predictions (the request
    pool and predictor of notebook 03's experiments, in OPT's tokenizer for OPT models)."""
    tokenizer = "opt" if model.startswith("opt") else "llama2"
    experiment = exp.make_plan("quick", datasets=[dataset], model=model, predictor=plan.predictor,
                               num_requests=plan.num_requests, seed=plan.seed, sensitivity=False,
                               tokenizer=tokenizer, jobs=1)
    deployment = experiment.deployments[0]
    cross_fit = plan.predictor == "train" and exp.uses_cross_fit(experiment, dataset, deployment)
    needs_text = plan.predictor not in ("oracle", "none")
    pool = exp.request_pool(dataset, experiment, deployment, with_text=needs_text,
                            held_out=False if cross_fit else None)
    if cross_fit:
        pool["predicted_output_tokens"] = exp.cross_fit_predictions(experiment, dataset, pool, output_dir)
    trace = exp.unit_rate_trace(pool, dataset, plan.num_requests, plan.seed,
                                {"model": model, "predictor": plan.predictor, "cross_fit": cross_fit})
    if not cross_fit:
        trace = exp.predict_lengths(experiment, dataset, trace, output_dir)
    return exp.without_text(trace)


def target_rates(units: pd.DataFrame, multiples: Sequence[float]) -> tuple[float, ...]:
    """``multiples`` x DistServe's best unit goodput [requests/s], two significant digits."""
    distserve = units[units["system"] == DISTSERVE]
    base = float(distserve["goodput_rps"].max()) if len(distserve) else 0.0
    if not base > 0:
        base = float(units["goodput_rps"].max())
    if not base > 0:
        return ()
    return tuple(sorted({float(f"{m * base:.2g}") for m in multiples}))


def run_gpus_needed(plan: GPUsNeededPlan, output_dir: str | Path, progress: bool = True) -> GPUsNeededResults:
    """Run ``plan`` (see the module docstring) and write its tables under ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unit_tables, gpu_tables = [], []
    timings: dict[str, float] = {}
    for model in plan.models:
        hardware = plan.hardware(model)
        hardware.parallel_degrees()  # a model that fits nowhere: one clear error, before any run
        for dataset in plan.datasets:
            clock = time.perf_counter()
            trace = workload_trace(plan, model, dataset, output_dir)
            for kind in plan.slo_kinds:
                objective = plan.objective(model, kind)
                keys = {"model": model, "gpu": plan.gpu, "dataset": dataset, "slo": kind, "slo_label": objective.label}
                tables = [placement_search(trace, hardware, objective, plan.search, progress=progress)]
                tables += [colocated_search(trace, s, hardware, objective, plan.search, progress=progress)
                           for s in plan.systems]
                units = pd.concat(tables, ignore_index=True)
                rates = target_rates(units, plan.target_multiples)
                unit_tables.append(units.assign(**keys))
                if rates:
                    gpus = gpus_needed(units, rates, trace, hardware, objective, plan.search, progress=progress)
                    gpu_tables.append(gpus.assign(**keys))
            timings[f"{model}/{dataset}"] = time.perf_counter() - clock
    results = GPUsNeededResults(plan.to_dict(), pd.concat(unit_tables, ignore_index=True),
                                pd.concat(gpu_tables, ignore_index=True) if gpu_tables else pd.DataFrame(),
                                timings)
    results.write(output_dir)
    return results


def gpu_savings(gpus: pd.DataFrame, system: str = "econoserve", baseline: str = DISTSERVE) -> pd.DataFrame:
    """Per panel and target rate where both reach it: GPUs of ``system`` and ``baseline``, the
    saving ``1 - system / baseline`` [fraction], and ``steady`` (the rate's run covered the
    plan's minimum duration of arrivals)."""
    keys = ["model", "dataset", "slo", "target_rate_rps"]
    ours = gpus[gpus["system"] == system].set_index(keys)
    theirs = gpus[gpus["system"] == baseline].set_index(keys)["num_gpus"]
    both = pd.concat({"gpus": ours["num_gpus"], "baseline_gpus": theirs, "steady": ours["steady"].astype(float)},
                     axis=1).dropna().reset_index()
    both["steady"] = both["steady"].astype(bool)
    both["saving"] = 1 - both["gpus"] / both["baseline_gpus"]
    return both

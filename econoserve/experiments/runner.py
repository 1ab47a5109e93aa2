"""Running an experiment: simulation jobs in worker processes, the plan's saturation bursts, rate
sweep and sensitivity runs, and the tidy tables they produce. ``econoserve sweep`` and notebook
03 both run through :func:`run_jobs`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.policy import make_config
from econoserve.experiments.backends import Backend, PoolBackend, Task, TaskStore, content_key, make_backend
from econoserve.experiments.plan import (
    BURST_RATE_RPS,
    SENSITIVITY_KNOBS,
    DeploymentSpec,
    ExperimentPlan,
    _round_rate,
    check_schedulers,
    rate_grid,
    without_schedulers,
)
from econoserve.experiments.predictors import (
    cross_fit_predictions,
    predict_lengths,
    refine_after_tokens,
    uses_cross_fit,
    with_refinements,
)
from econoserve.experiments.workloads import at_rate, perturb_lengths, request_pool, unit_rate_trace, without_text
from econoserve.results import read_results, write_results
from econoserve.sim.cluster import simulate
from econoserve.sim.engine import SimulationConfig
from econoserve.workload.trace import Trace


def simulation_config(plan: ExperimentPlan, deployment: DeploymentSpec, scheduler: str, seed: int,
                      policy_config: Mapping[str, object] | None = None, skip_ahead: bool = True) -> SimulationConfig:
    """The simulator configuration of one run: the deployment, the plan's knobs for ``scheduler``
    (``policy_configs``) under ``policy_config``, the plan's SLO scale (also the policy's, where
    its configuration has ``slo_scale``), predictions from the trace."""
    options = {**plan.policy_configs.get(scheduler, {}), **(policy_config or {})}
    config_fields = {f.name for f in dataclasses.fields(type(make_config(scheduler)))}
    if "slo_scale" in config_fields:
        options.setdefault("slo_scale", plan.slo_scale)
    return SimulationConfig(
        scheduler=scheduler, policy_config=options, model=deployment.model, gpu=deployment.gpu,
        tensor_parallel=deployment.tp, latency_model=plan.latency_model, slo_scale=plan.slo_scale, seed=seed,
        predictions="trace", skip_ahead=skip_ahead,
    )


@dataclass
class Job:
    """One simulation: a trace at a rate through one configuration, with the row keys."""

    keys: dict[str, object]
    trace: Trace
    rate_rps: float
    config: SimulationConfig
    keep_tables: bool = False
    run_dir: str | None = None  # also write the run's directory here (on the worker's machine)


def _run_job(job: Job, trace: Trace) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    start = time.perf_counter()
    result = simulate(at_rate(trace, job.rate_rps), job.config)
    if job.run_dir is not None:
        result.write(job.run_dir)
    row = {**job.keys, "rate_rps": job.rate_rps, "skip_ahead": job.config.skip_ahead, **result.summary,
           "wall_time_s": time.perf_counter() - start}
    if not job.keep_tables:
        return row, None, None
    iterations = result.iterations.assign(**job.keys, rate_rps=job.rate_rps,
                                          reference_token_budget=result.summary["reference_token_budget"])
    requests = result.requests.drop(columns=["dataset"]).assign(**job.keys, rate_rps=job.rate_rps)
    return row, iterations, requests


def trace_digest(trace: Trace) -> str:
    """SHA-256 of a trace's content (columns, values, metadata): part of its runs' task keys."""
    digest = hashlib.sha256(json.dumps([list(trace.requests.columns), trace.metadata], sort_keys=True,
                                       default=str).encode())
    digest.update(pd.util.hash_pandas_object(trace.requests, index=True).to_numpy().tobytes())
    return digest.hexdigest()


def job_tasks(jobs: Sequence[Job], backend: Backend) -> list[Task]:
    """``jobs`` as backend tasks: each distinct trace shared once, the key naming the row keys,
    rate, configuration, tables kept, run directory and the trace's content."""
    tasks, shared_traces = [], {}
    for job in jobs:
        if id(job.trace) not in shared_traces:
            shared_traces[id(job.trace)] = backend.share(job.trace, trace_digest(job.trace))
        shared = shared_traces[id(job.trace)]
        key = content_key("simulate", job.keys, job.rate_rps, job.config.to_dict(), job.keep_tables, job.run_dir,
                          shared.digest)
        tasks.append(Task(key, dataclasses.replace(job, trace=None), (shared,)))
    return tasks


def run_jobs(jobs: Sequence[Job], backend: Backend | None = None, progress: bool = True, desc: str = "simulate",
             store: TaskStore | None = None):
    """Run ``jobs`` on ``backend`` (default: in this process); returns ``(rows, iterations,
    requests)`` in job order, with the tables of jobs that keep them concatenated (None if none
    do). With a ``store``, finished runs are kept there and only missing ones are computed."""
    backend = backend or PoolBackend(jobs=1)
    outputs = backend.map(_run_job, job_tasks(jobs, backend), store=store, desc=desc, progress=progress)
    rows = [o[0] for o in outputs]
    iterations = [o[1] for o in outputs if o[1] is not None]
    requests = [o[2] for o in outputs if o[2] is not None]
    return (rows, pd.concat(iterations, ignore_index=True) if iterations else None,
            pd.concat(requests, ignore_index=True) if requests else None)


@dataclass
class ExperimentResults:
    """What :func:`run_experiments` produced (see the module docstring), plus the plan."""

    plan: dict[str, object]
    saturation: pd.DataFrame
    sweep: pd.DataFrame
    iterations: pd.DataFrame
    requests: pd.DataFrame
    sensitivity: pd.DataFrame
    missing_schedulers: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)

    TABLES = ("saturation", "sweep", "iterations", "requests", "sensitivity")

    def write(self, directory: str | Path) -> Path:
        tables = {f"{name}.parquet": getattr(self, name) for name in self.TABLES} | {"sweep.csv": self.sweep}
        meta = {"plan": self.plan, "missing_schedulers": list(self.missing_schedulers), "timings_s": self.timings_s}
        return write_results(directory, tables, "experiments.json", meta)

    @classmethod
    def read(cls, directory: str | Path) -> ExperimentResults:
        meta, tables = read_results(directory, [f"{name}.parquet" for name in cls.TABLES], "experiments.json")
        return cls(plan=meta["plan"], missing_schedulers=tuple(meta.get("missing_schedulers", ())),
                   timings_s=meta.get("timings_s", {}), **tables)

    def goodput(self, schedulers: Sequence[str] | None = None) -> pd.DataFrame:
        """Goodput per deployment, dataset and scheduler (mean attainment over seeds)."""
        from econoserve.analysis.metrics import goodput_from_table

        table = self.sweep if schedulers is None else self.sweep[self.sweep["scheduler"].isin(schedulers)]
        mean = table.groupby(["deployment", "dataset", "scheduler", "rate_rps"], as_index=False)["slo_attainment"].mean()
        return goodput_from_table(mean, by=["deployment", "dataset", "scheduler"])


#: Subdirectory of an experiment's output directory holding each finished run (resumption).
TASKS_DIRECTORY = "tasks"


def predicted_pool(plan: ExperimentPlan, dataset: str, deployment: DeploymentSpec,
                   output_dir: str | Path) -> tuple[pd.DataFrame, bool]:
    """``dataset``'s request pool for ``deployment`` (:func:`request_pool`, with prompt text where
    the plan predicts from it) and whether its predictions are cross-fitted: then the pool holds
    them (``predicted_output_tokens``); else, with a trained predictor and response text, it holds
    the refinement columns of the plan's refined model (``refined_output_tokens``,
    ``refine_after_tokens``; see :class:`PredictorTraining`)."""
    cross_fit = uses_cross_fit(plan, dataset, deployment)
    refine = None if cross_fit else refine_after_tokens(plan)
    pool = request_pool(dataset, plan, deployment, with_text=plan.predictor not in ("oracle", "none"),
                        held_out=False if cross_fit else None, with_responses=refine is not None)
    if cross_fit:
        pool["predicted_output_tokens"] = cross_fit_predictions(plan, dataset, pool, output_dir)
    if refine is not None and "response_text" in pool.columns:
        pool = with_refinements(plan, dataset, pool, output_dir, refine).drop(columns=["response_text"])
    return pool, cross_fit


def run_experiments(plan: ExperimentPlan, output_dir: str | Path, progress: bool = True,
                    allow_missing: bool = False, backend: Backend | None = None) -> ExperimentResults:
    """Run ``plan``: saturation bursts, the rate sweep (main schedulers and ablations; iteration
    tables at the reference rate), the sensitivity runs; write everything under ``output_dir``.

    Runs go to ``backend`` (default: a process pool of ``plan.jobs`` workers, closed at the end;
    a backend passed in stays open). Each finished run is stored under
    ``output_dir/tasks/`` at once, so rerunning the same plan on the same directory (after an
    interruption, or to redraw) computes only the runs that are missing; a run's key covers its
    trace, configuration and the package's code, so results of other code are never reused.

    Schedulers the registry lacks raise :class:`UserError`, unless ``allow_missing`` (then they
    are dropped and listed in ``missing_schedulers``)."""
    if backend is None:
        with make_backend("pool", plan.jobs) as owned:
            return run_experiments(plan, output_dir, progress, allow_missing, owned)
    missing = check_schedulers(plan, allow_missing)
    run_plan = without_schedulers(plan, missing) if missing else plan
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    store = TaskStore(output_dir / TASKS_DIRECTORY)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    # traces: one unit-rate trace per deployment, dataset and seed, with predictions
    traces: dict[tuple[str, str, int], Trace] = {}
    for deployment in run_plan.deployments:
        for dataset in run_plan.datasets:
            pool, cross_fit = predicted_pool(run_plan, dataset, deployment, output_dir)
            for seed in run_plan.seeds:
                trace = unit_rate_trace(pool, dataset, run_plan.num_requests, seed,
                                        {"deployment": deployment.name, "predictor": run_plan.predictor,
                                         "cross_fit": cross_fit})
                if not cross_fit:
                    trace = predict_lengths(run_plan, dataset, trace, output_dir)
                traces[deployment.name, dataset, seed] = without_text(trace)
    timings["traces_and_predictors"] = time.perf_counter() - clock
    deployments = {d.name: d for d in run_plan.deployments}
    seed0 = run_plan.seeds[0]

    # saturation: a burst of every request at once, per main scheduler (first seed)
    clock = time.perf_counter()
    burst_jobs = []
    for name, deployment in deployments.items():
        for dataset in run_plan.datasets:
            trace = traces[name, dataset, seed0]
            if run_plan.rate_grid.burst_requests:
                trace = Trace(trace.requests.iloc[: run_plan.rate_grid.burst_requests].reset_index(drop=True), trace.metadata)
            for scheduler in run_plan.schedulers:
                keys = {"deployment": name, "dataset": dataset, "scheduler": scheduler, "seed": seed0}
                burst_jobs.append(Job(keys, trace, BURST_RATE_RPS, simulation_config(run_plan, deployment, scheduler, seed0)))
    rows, _, _ = run_jobs(burst_jobs, backend, progress, desc="saturation", store=store)
    saturation = pd.DataFrame(rows)[["deployment", "dataset", "scheduler", "throughput_rps", "output_tokens_per_s",
                                     "mean_kvc_utilization", "mean_gpu_token_utilization", "preempted_fraction"]]
    saturation = saturation.rename(columns={"throughput_rps": "burst_throughput_rps"})
    timings["saturation"] = time.perf_counter() - clock

    # rates per deployment and dataset
    grid: dict[tuple[str, str], tuple[tuple[float, ...], float]] = {}
    for (name, dataset), group in saturation.groupby(["deployment", "dataset"], sort=False):
        sat = dict(zip(group["scheduler"], group["burst_throughput_rps"]))
        auto_rates, ref = rate_grid(sat, run_plan.rate_grid)
        if run_plan.rates is not None:
            rates = tuple(sorted(set(run_plan.rates[dataset])))
            ref = min(rates, key=lambda r: abs(math.log(r / ref)))
        else:
            rates = auto_rates
        grid[name, dataset] = (rates, ref)
    saturation["reference_rate_rps"] = [grid[d, s][1] for d, s in zip(saturation["deployment"], saturation["dataset"])]

    # sweep: every scheduler x rate x seed; tables kept (step by step) at the reference rate
    clock = time.perf_counter()
    jobs = []
    for (name, dataset), (rates, ref) in grid.items():
        for seed in run_plan.seeds:
            trace = traces[name, dataset, seed]
            for scheduler in run_plan.all_schedulers():
                for rate in rates:
                    reference = rate == ref
                    config = simulation_config(run_plan, deployments[name], scheduler, seed, skip_ahead=not reference)
                    keys = {"deployment": name, "dataset": dataset, "scheduler": scheduler, "seed": seed,
                            "reference": reference}
                    jobs.append(Job(keys, trace, rate, config, keep_tables=reference))
    rows, iterations, requests = run_jobs(jobs, backend, progress, desc="sweep", store=store)
    iterations = None if iterations is None else _in_plan_order(iterations, run_plan, ["seed", "iteration"])
    requests = None if requests is None else _in_plan_order(requests, run_plan, ["seed", "request_id"])
    sweep = _in_plan_order(pd.DataFrame(rows), run_plan, ["seed", "rate_rps"])
    timings["sweep"] = time.perf_counter() - clock

    # sensitivity (Figure 14)
    clock = time.perf_counter()
    sensitivity = pd.DataFrame()
    if run_plan.sensitivity is not None:
        sensitivity = _run_sensitivity(run_plan, traces, deployments, grid, progress, backend, store)
    timings["sensitivity"] = time.perf_counter() - clock

    results = ExperimentResults(
        plan=plan.to_dict(), saturation=saturation, sweep=sweep,
        iterations=iterations if iterations is not None else pd.DataFrame(),
        requests=requests if requests is not None else pd.DataFrame(),
        sensitivity=sensitivity, missing_schedulers=missing, timings_s=timings,
    )
    results.write(output_dir)
    return results


def _in_plan_order(table: pd.DataFrame, plan: ExperimentPlan, then: Sequence[str]) -> pd.DataFrame:
    """``table`` sorted by deployment, dataset and scheduler in the plan's order, then ``then``."""
    orders = {
        "deployment": [d.name for d in plan.deployments],
        "dataset": list(plan.datasets),
        "scheduler": list(plan.all_schedulers()),
    }
    keys = {f"_{name}": table[name].map({v: i for i, v in enumerate(order)}) for name, order in orders.items()}
    table = table.assign(**keys).sort_values([*keys, *then], kind="stable")
    return table.drop(columns=list(keys)).reset_index(drop=True)


def sensitivity_jobs(plan: ExperimentPlan, traces: Mapping[tuple[str, str, int], Trace],
                     deployments: Mapping[str, DeploymentSpec], grid: Mapping[tuple[str, str], tuple]) -> list[Job]:
    """Figure 14's runs: for each sensitivity dataset, deployment and seed, the plan's
    sensitivity scheduler at the reference rate x ``load_fraction`` with one knob varied."""
    sens = plan.sensitivity
    jobs = []
    for name, deployment in deployments.items():
        for dataset in sens.datasets:
            if (name, dataset) not in grid:
                continue
            rate = _round_rate(grid[name, dataset][1] * sens.load_fraction)
            for seed in plan.seeds:
                trace = traces[name, dataset, seed]
                for knob in SENSITIVITY_KNOBS:
                    for value in sens.values(knob):
                        knob_trace, options = trace, {}
                        if knob == "rl_error":  # perturbed true lengths, which no refined model refines
                            truth = trace.requests["output_tokens"].to_numpy(np.int64)
                            knob_trace = trace.without_refinements().with_predictions(
                                perturb_lengths(truth, float(value), seed))
                        else:
                            options[knob] = value
                        keys = {"deployment": name, "dataset": dataset, "scheduler": sens.scheduler, "seed": seed,
                                "knob": knob, "value": float(value)}
                        config = simulation_config(plan, deployment, sens.scheduler, seed, options)
                        jobs.append(Job(keys, knob_trace, rate, config))
    return jobs


def _run_sensitivity(plan, traces, deployments, grid, progress, backend, store) -> pd.DataFrame:
    jobs = sensitivity_jobs(plan, traces, deployments, grid)
    rows, _, _ = run_jobs(jobs, backend, progress, desc="sensitivity", store=store)
    return pd.DataFrame(rows)



"""Simulated serving experiments (notebook 03): plans, traces, sweeps, tidy tables.

An :class:`ExperimentPlan` names everything a run of notebook 03 does. :func:`make_plan` builds
one for a ``profile``:

``quick``  OPT-13B on one A100-80GB; Alpaca, ShareGPT and QMSum (the three request families);
           2000 requests per trace, one seed, 12 Poisson rates per dataset spanning every scheduler's
           saturation; a cheap per-dataset predictor; Figure 14 on ShareGPT only. Minutes on 2 cores.
``full``   also Llama-2-70B on 4x A100-80GB (tensor parallel 4); 5000 requests, three seeds,
           16 rates per dataset; the default-size predictor; Figure 14 on every dataset. Paper
           scale: about an hour on 2 cores (estimated from the quick profile), not run in CI.

:func:`run_experiments` executes a plan and returns (and writes) an :class:`ExperimentResults`:

``saturation``   per deployment, dataset and scheduler: the throughput of a burst (every request
                 at once) [requests/s], the anchor of the rate grid;
``sweep``        one row per run (deployment x dataset x scheduler x rate x seed): the simulator's
                 summary plus those keys, ``reference`` (the rate at which iteration tables are
                 kept) and ``skip_ahead``. Holds the main schedulers *and* the ablation variants
                 (Figures 7-11 use the former, Figure 13 the latter);
``iterations``   the per-step tables of the reference runs (one per deployment, dataset,
                 scheduler and seed at the dataset's reference rate), simulated with
                 ``skip_ahead=False`` so the per-step scheduler times are real (Figures 2-5);
``requests``     the per-request tables of the same reference runs;
``sensitivity``  EconoServe at the reference rate with one knob varied at a time: ``rl_error``
                 (predictions = true length perturbed by a relative error level,
                 :func:`perturb_lengths`), ``rl_padding``, ``rl_bucket``, ``reserve_ratio``
                 (Figure 14).

Documented choices:

* **Request pools.** A trace samples requests of one dataset whose prompt + response fits the
  model's context (``fit_context``; otherwise every engine rejects them, which measures the
  dataset, not the scheduler). With ``predictor="train"`` the pool is the dataset's held-out part
  (:class:`~econoserve.predictor.SplitSpec`; whole source records, so no QMSum meeting is on both
  sides) and the predictor is trained on the rest; where that held-out part is smaller than a
  trace (QMSum), the predictions are cross-fitted instead (:class:`PredictorTraining`: one model
  per fold, each request predicted by the model that did not see its record) and the pool is the
  whole dataset. When a pool is still smaller than ``num_requests`` (QMSum: about 1200 queries
  fit OPT-13B's context), requests are drawn with replacement (recorded in the trace metadata).
* **Same requests at every rate.** For one dataset and seed the request sample and the Poisson
  gaps of a unit-rate process are drawn once; the trace at rate ``r`` divides those arrival times
  by ``r``. Rates differ only in time scale, so curves over rate are not noisy across rates.
* **Rate grid.** Unless rates are given, a dataset's rates are a geometric grid of
  ``RateGrid.num_rates`` points from ``low_fraction`` x the lowest to ``high_fraction`` x the
  highest burst throughput of the main schedulers, plus the *reference rate* =
  ``reference_fraction`` (1.25) x vLLM's burst throughput: a high load, past vLLM's saturation,
  at which the observation and per-scheduler figures are drawn. Two significant digits.
* **Predictions.** ``predictor``: a saved model directory, ``oracle`` (the true lengths), ``none``,
  or ``train`` (train a per-dataset LightGBM regression model on the training part, cached under
  ``output_dir/predictors/``). Baselines ignore predictions; ``econoserve-oracle`` always uses
  true lengths.
* **SLO.** ``slo_scale`` is the simulator's SLO (JCT <= scale x isolated time) and, for policies
  whose configuration has a ``slo_scale`` field (EconoServe's Ordering), theirs too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.errors import UserError
from econoserve.policy import make_config, policy_names
from econoserve.sim.cluster import simulate
from econoserve.sim.engine import SimulationConfig
from econoserve.workload.arrivals import poisson_arrivals
from econoserve.workload.trace import Trace

PROFILES: tuple[str, ...] = ("quick", "full")
#: The three request families of the paper's analysis.
REQUEST_FAMILIES: tuple[str, ...] = ("alpaca", "sharegpt", "qmsum")
BASELINES: tuple[str, ...] = ("vllm", "vllm-chunked", "orca", "sarathi", "fastgen")
ECONOSERVE = "econoserve"
#: Schedulers of Figures 7-11 (the baselines with their published defaults, and EconoServe).
MAIN_SCHEDULERS: tuple[str, ...] = (*BASELINES, ECONOSERVE)
#: EconoServe's ablation variants (Figure 13), EconoServe itself first.
ABLATIONS: tuple[str, ...] = (
    ECONOSERVE,
    "econoserve-no-kvcpipe",
    "econoserve-no-ordering",
    "econoserve-no-syncdecoupled",
    "econoserve-oracle",
)
#: The scheduler whose burst throughput sets the reference rate, and the baseline of the claims.
REFERENCE_SCHEDULER = "vllm"
PREDICTOR_SOURCES: tuple[str, ...] = ("train", "oracle", "none")
SENSITIVITY_KNOBS: tuple[str, ...] = ("rl_error", "rl_padding", "rl_bucket", "reserve_ratio")
#: Rate of the burst used to measure a scheduler's saturation throughput [requests/s].
BURST_RATE_RPS = 1e6


# --------------------------------------------------------------------- plan
@dataclass(frozen=True)
class DeploymentSpec:
    """A simulated deployment: catalog model and GPU, tensor-parallel degree [GPUs]."""

    model: str = "opt-13b"
    gpu: str = "a100-80gb"
    tp: int = 1

    @property
    def name(self) -> str:
        return f"{self.model}/{self.tp}x{self.gpu}"

    def max_model_len(self) -> int:
        return SimulationConfig(model=self.model, gpu=self.gpu, tensor_parallel=self.tp).deployment().model.max_context_tokens


@dataclass(frozen=True)
class RateGrid:
    """How rates are chosen when none are given (see the module docstring)."""

    num_rates: int = 12
    low_fraction: float = 0.4
    high_fraction: float = 2.5
    reference_fraction: float = 1.25
    burst_requests: int | None = None  # requests in the saturation burst; None = num_requests

    def __post_init__(self) -> None:
        if self.reference_fraction <= 0:
            raise UserError(f"rate grid: reference_fraction must be > 0, got {self.reference_fraction}")
        if self.num_rates < 2 or not 0 < self.low_fraction < self.high_fraction:
            raise UserError(f"rate grid: need num_rates >= 2 and 0 < low_fraction < high_fraction, got {self}")


@dataclass(frozen=True)
class PredictorTraining:
    """The per-dataset predictor of ``predictor="train"``: training-set cap, boosting rounds,
    held-out fraction, split seed, and LightGBM threads (1 by default: on a busy 2-core machine
    OpenMP threads that wait for each other slow training down by an order of magnitude).

    ``cross_fit``: instead of one model and a trace from the held-out part, split the dataset's
    source records into :attr:`folds` folds, train one model per fold on the other folds, and
    predict every request with the model that did not see its record (out-of-fold predictions),
    so traces can draw from the whole dataset. ``None`` = cross-fit exactly the datasets whose
    held-out pool is smaller than ``num_requests`` (QMSum)."""

    max_train: int | None = 4000
    num_boost_round: int | None = 100
    test_fraction: float = 0.2
    split_seed: int = 0
    num_threads: int = 1
    cross_fit: bool | None = None  # None: only where the held-out part is smaller than a trace

    @property
    def folds(self) -> int:
        """Folds of cross-fitting: ``round(1 / test_fraction)`` (5 for 0.2)."""
        return max(2, round(1 / self.test_fraction))


@dataclass(frozen=True)
class SensitivityPlan:
    """Figure 14: EconoServe at each dataset's reference rate x ``load_fraction``, one knob varied
    at a time from its default. ``error_levels`` are relative errors of the predicted length
    (0 = oracle)."""

    datasets: tuple[str, ...] = ("sharegpt",)
    load_fraction: float = 1.0
    error_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4, 0.6)
    rl_paddings: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)
    rl_buckets: tuple[int, ...] = (8, 32, 64, 128)
    reserve_ratios: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)
    scheduler: str = ECONOSERVE

    def values(self, knob: str) -> tuple:
        return {
            "rl_error": self.error_levels,
            "rl_padding": self.rl_paddings,
            "rl_bucket": self.rl_buckets,
            "reserve_ratio": self.reserve_ratios,
        }[knob]


@dataclass(frozen=True)
class ExperimentPlan:
    """Everything :func:`run_experiments` does (see the module docstring)."""

    profile: str = "quick"
    datasets: tuple[str, ...] = REQUEST_FAMILIES
    deployments: tuple[DeploymentSpec, ...] = (DeploymentSpec(),)
    schedulers: tuple[str, ...] = MAIN_SCHEDULERS
    ablations: tuple[str, ...] = ABLATIONS
    rates: Mapping[str, tuple[float, ...]] | None = None
    rate_grid: RateGrid = RateGrid()
    num_requests: int = 2000
    seeds: tuple[int, ...] = (0,)
    slo_scale: float = 5.0
    predictor: str = "train"
    predictor_training: PredictorTraining = PredictorTraining()
    tokenizer: str = "llama2"
    fit_context: bool = True
    sensitivity: SensitivityPlan | None = SensitivityPlan()
    jobs: int = 2

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UserError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if not self.datasets or not self.deployments or not self.seeds:
            raise UserError("a plan needs at least one dataset, deployment and seed")
        if self.num_requests < 2:
            raise UserError(f"num_requests must be >= 2, got {self.num_requests}")
        if self.slo_scale <= 0:
            raise UserError(f"slo_scale must be > 0, got {self.slo_scale}")
        if self.jobs < 1:
            raise UserError(f"jobs must be >= 1, got {self.jobs}")
        if self.rates is not None:
            for dataset in self.datasets:
                rates = self.rates.get(dataset)
                if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
                    raise UserError(f"rates for {dataset}: need a non-empty list of positive rates, got {rates}")

    # ----------------------------------------------------------------- derived
    def all_schedulers(self) -> tuple[str, ...]:
        """Main schedulers then ablation variants, without repeats."""
        return tuple(dict.fromkeys((*self.schedulers, *self.ablations)))

    def missing_schedulers(self) -> tuple[str, ...]:
        """Schedulers the plan names that the policy registry does not have (yet)."""
        known = set(policy_names())
        extra = (self.sensitivity.scheduler,) if self.sensitivity else ()
        return tuple(name for name in dict.fromkeys((*self.all_schedulers(), *extra)) if name not in known)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["rates"] = None if self.rates is None else {k: list(v) for k, v in self.rates.items()}
        return data


def make_plan(
    profile: str = "quick",
    *,
    datasets: Sequence[str] | None = None,
    model: str | Sequence[str] | None = None,
    gpu: str | None = None,
    tp: int | None = None,
    request_rates: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    schedulers: Sequence[str] | None = None,
    ablations: Sequence[str] | None = None,
    slo_scale: float = 5.0,
    predictor: str = "train",
    num_requests: int | None = None,
    seed: int | Sequence[int] | None = None,
    jobs: int = 2,
    sensitivity: bool | SensitivityPlan = True,
    **overrides,
) -> ExperimentPlan:
    """The plan of ``profile`` with the notebook's parameters applied (``None`` = the profile's).

    ``model`` / ``gpu`` / ``tp`` replace the profile's deployments by one (``gpu`` default
    a100-80gb, ``tp`` default 1). ``request_rates``: one list for every dataset, or a mapping
    dataset -> list; ``None`` = the automatic grid. ``seed``: one seed or a list.
    ``overrides``: any other :class:`ExperimentPlan` field.
    """
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    full = profile == "full"
    defaults = {
        "deployments": (DeploymentSpec(), DeploymentSpec("llama-2-70b", "a100-80gb", 4)) if full else (DeploymentSpec(),),
        "rate_grid": RateGrid(num_rates=16, low_fraction=0.2, high_fraction=3.0) if full else RateGrid(),
        "num_requests": 5000 if full else 2000,
        "seeds": (0, 1, 2) if full else (0,),
        "predictor_training": PredictorTraining(max_train=None, num_boost_round=None) if full else PredictorTraining(),
        "sensitivity": SensitivityPlan(datasets=REQUEST_FAMILIES, error_levels=(0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8))
        if full else SensitivityPlan(),
    }
    deployments = defaults["deployments"]
    if model is not None:
        models = [model] if isinstance(model, str) else list(model)
        deployments = tuple(DeploymentSpec(m, gpu or "a100-80gb", int(tp or 1)) for m in models)
    elif gpu is not None or tp is not None:
        deployments = tuple(replace(d, gpu=gpu or d.gpu, tp=int(tp or d.tp)) for d in deployments)
    datasets = _names(datasets) if datasets is not None else REQUEST_FAMILIES
    schedulers = _names(schedulers) if schedulers is not None else None
    ablations = _names(ablations) if ablations is not None else None
    rates = None
    if request_rates is not None:
        if isinstance(request_rates, Mapping):
            rates = {str(k): tuple(float(r) for r in v) for k, v in request_rates.items()}
        else:
            rates = {d: tuple(float(r) for r in request_rates) for d in datasets}
    if seed is None:
        seeds = defaults["seeds"]
    else:
        seeds = (int(seed),) if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed)
    if sensitivity is True:
        sens = defaults["sensitivity"]
        sens = replace(sens, datasets=tuple(d for d in sens.datasets if d in datasets) or datasets[:1])
    elif sensitivity is False or sensitivity is None:
        sens = None
    else:
        sens = sensitivity
    plan = ExperimentPlan(
        profile=profile,
        datasets=datasets,
        deployments=deployments,
        schedulers=tuple(schedulers) if schedulers is not None else MAIN_SCHEDULERS,
        ablations=tuple(ablations) if ablations is not None else ABLATIONS,
        rates=rates,
        rate_grid=defaults["rate_grid"],
        num_requests=int(num_requests) if num_requests is not None else defaults["num_requests"],
        seeds=seeds,
        slo_scale=float(slo_scale),
        predictor=str(predictor),
        predictor_training=defaults["predictor_training"],
        sensitivity=sens,
        jobs=int(jobs),
    )
    return replace(plan, **overrides) if overrides else plan


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    """A name or a list of names (``papermill -p datasets alpaca`` passes a plain string)."""
    return (value,) if isinstance(value, str) else tuple(value)


def check_schedulers(plan: ExperimentPlan, allow_missing: bool = False) -> tuple[str, ...]:
    """Schedulers of ``plan`` missing from the registry. Raises :class:`UserError` naming them
    unless ``allow_missing`` (then the caller runs without them and must say so)."""
    missing = plan.missing_schedulers()
    if missing and not allow_missing:
        raise UserError(
            f"scheduler(s) not registered: {', '.join(missing)}; registered: {', '.join(policy_names())} "
            "(drop them from the plan, or pass allow_missing=True to run without them)"
        )
    return missing


def without_schedulers(plan: ExperimentPlan, names: Iterable[str]) -> ExperimentPlan:
    """``plan`` without the schedulers ``names`` (and without Figure 14 if its scheduler is one)."""
    names = set(names)
    sensitivity = plan.sensitivity if plan.sensitivity is None or plan.sensitivity.scheduler not in names else None
    return replace(
        plan,
        schedulers=tuple(s for s in plan.schedulers if s not in names),
        ablations=tuple(s for s in plan.ablations if s not in names),
        sensitivity=sensitivity,
    )


# --------------------------------------------------------------------- requests and traces
def request_pool(dataset: str, plan: ExperimentPlan, deployment: DeploymentSpec, with_text: bool,
                 held_out: bool | None = None) -> pd.DataFrame:
    """The requests a trace of ``dataset`` samples from (see "Request pools" in the module
    docstring): columns ``source_index``, ``prompt_tokens``, ``output_tokens`` (+ ``prompt_text``).
    ``held_out``: only the held-out part (default: when the plan trains a predictor)."""
    from econoserve.workload.datasets import load_requests

    requests = load_requests(dataset, plan.tokenizer)
    if held_out if held_out is not None else plan.predictor == "train":
        from econoserve.predictor import SplitSpec
        from econoserve.predictor.data import _split_rows

        training = plan.predictor_training
        split = SplitSpec(test_fraction=training.test_fraction, seed=training.split_seed)
        requests = requests.iloc[_split_rows(requests["source_index"].to_numpy(), "test", split)]
    if plan.fit_context:
        limit = deployment.max_model_len()
        requests = requests[requests["prompt_tokens"] + requests["output_tokens"] <= limit]
    columns = ["source_index", "prompt_tokens", "output_tokens"]
    if with_text and "prompt_text" in requests.columns:
        columns.append("prompt_text")
    if requests.empty:
        raise UserError(f"{dataset}: no request fits {deployment.name}'s context of {deployment.max_model_len()} tokens")
    return requests[columns].reset_index(drop=True)


def unit_rate_trace(pool: pd.DataFrame, dataset: str, num_requests: int, seed: int,
                    metadata: Mapping[str, object] | None = None) -> Trace:
    """``num_requests`` requests sampled from ``pool`` (seeded; with replacement only if the pool
    is smaller) with Poisson arrivals of rate 1 [request/s]; :func:`at_rate` rescales it."""
    sample_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    replace_draw = len(pool) < num_requests
    rows = sample_rng.choice(len(pool), size=num_requests, replace=replace_draw) if replace_draw else \
        sample_rng.permutation(len(pool))[:num_requests]
    chosen = pool.iloc[rows]
    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests, dtype=np.int64),
            "arrival_time_s": poisson_arrivals(num_requests, 1.0, arrival_rng),
            "prompt_tokens": chosen["prompt_tokens"].to_numpy(np.int64),
            "output_tokens": chosen["output_tokens"].to_numpy(np.int64),
            "dataset": dataset,
        }
    )
    if "prompt_text" in chosen.columns:
        frame["prompt_text"] = chosen["prompt_text"].to_numpy()
    if "predicted_output_tokens" in chosen.columns:
        frame["predicted_output_tokens"] = chosen["predicted_output_tokens"].to_numpy(np.int64)
    meta = {
        "spec": {"dataset": dataset, "num_requests": num_requests, "arrival": "poisson", "rate_rps": 1.0,
                 "seed": seed, "pool_size": len(pool), "sampled_with_replacement": replace_draw},
        "econoserve_version": __version__,
        **dict(metadata or {}),
    }
    return Trace.from_frame(frame, meta, source=f"<{dataset} experiment trace>")


def at_rate(trace: Trace, rate_rps: float) -> Trace:
    """``trace`` (built at rate 1) with its arrival times divided by ``rate_rps``."""
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise UserError(f"rate must be a positive number, got {rate_rps}")
    frame = trace.requests.copy()
    frame["arrival_time_s"] = frame["arrival_time_s"] / rate_rps
    metadata = json.loads(json.dumps(trace.metadata))
    metadata.setdefault("spec", {})["rate_rps"] = rate_rps
    return Trace(frame, metadata)


def without_text(trace: Trace) -> Trace:
    """``trace`` without its ``prompt_text`` column (what workers need; much smaller to ship)."""
    if not trace.has_text:
        return trace
    return Trace(trace.requests.drop(columns=["prompt_text"]), dict(trace.metadata))


def perturb_lengths(lengths: Sequence[int] | np.ndarray, error_level: float, seed: int) -> np.ndarray:
    """``lengths`` [tokens] with a seeded relative error of level ``error_level``.

    Each length ``L`` becomes ``max(1, round(L * (1 + error_level * s)))`` with ``s`` = +1 or -1
    (fair coin, seeded), so every prediction is off by ``error_level`` of the true length (up to
    rounding and the floor of 1 token): the mean absolute relative error *is* the level, and
    under- and over-predictions are equally frequent. Level 0 returns the lengths unchanged.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if error_level < 0 or not math.isfinite(error_level):
        raise UserError(f"error level must be >= 0, got {error_level}")
    if np.any(lengths < 1):
        raise UserError("lengths must be >= 1 token")
    if error_level == 0:
        return lengths.copy()
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=lengths.size)
    perturbed = np.rint(lengths * (1.0 + error_level * signs))
    return np.maximum(perturbed, 1).astype(np.int64)


# --------------------------------------------------------------------- predictor
def predictor_directory(plan: ExperimentPlan, dataset: str, output_dir: str | Path) -> Path:
    """Where ``predictor="train"`` caches its model for ``dataset`` (keyed by what determines it)."""
    key = json.dumps([dataset, plan.tokenizer, asdict(plan.predictor_training)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(output_dir) / "predictors" / f"{dataset}-{plan.tokenizer}-{digest}"


def ensure_predictor(plan: ExperimentPlan, dataset: str, output_dir: str | Path):
    """The per-dataset predictor of ``predictor="train"``: loaded from the cache, else trained on
    the dataset's training part (capped at ``max_train`` prompts) and saved there."""
    from econoserve.errors import PredictorError
    from econoserve.predictor import (
        LengthPredictor,
        PredictorConfig,
        SplitSpec,
        load_labeled_prompts,
        train_predictor,
    )

    directory = predictor_directory(plan, dataset, output_dir)
    if (directory / "metadata.json").is_file():
        try:
            return LengthPredictor.load(directory)
        except PredictorError:
            pass  # stale or torn: train again
    training = plan.predictor_training
    split = SplitSpec(test_fraction=training.test_fraction, seed=training.split_seed)
    data = load_labeled_prompts(dataset, "train", tokenizer=plan.tokenizer, split=split)
    data = data.sample(training.max_train, seed=training.split_seed)
    config = PredictorConfig(num_boost_round=training.num_boost_round, seed=training.split_seed,
                             num_threads=training.num_threads)
    model = train_predictor(data, config, split=asdict(split))
    model.save(directory)
    return model


def predict_lengths(plan: ExperimentPlan, dataset: str, trace: Trace, output_dir: str | Path) -> Trace:
    """``trace`` with ``predicted_output_tokens`` from the plan's predictor (``none``: unchanged)."""
    source = plan.predictor
    if source == "none":
        return trace
    if source == "oracle":
        return trace.with_predictions(trace.requests["output_tokens"].to_numpy(np.int64))
    if source == "train":
        model = ensure_predictor(plan, dataset, output_dir)
    else:
        from econoserve.predictor import LengthPredictor

        model = LengthPredictor.load(source)
    return model.predict_trace(trace)


def cross_fit_folds(source_index: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. ``folds`` - 1) of each row: whole source records are assigned to folds by a
    seeded permutation, round robin, so every fold holds about the same number of records."""
    groups = np.unique(source_index)
    if len(groups) < folds:
        raise UserError(f"too few source records ({len(groups)}) for {folds} folds")
    permuted = np.random.default_rng(seed).permutation(groups)
    fold_of = dict(zip(permuted.tolist(), (np.arange(len(permuted)) % folds).tolist()))
    return np.fromiter((fold_of[g] for g in source_index.tolist()), dtype=np.int64, count=len(source_index))


def cross_fit_predictions(plan: ExperimentPlan, dataset: str, pool: pd.DataFrame, output_dir: str | Path) -> np.ndarray:
    """Out-of-fold predicted lengths [tokens] for every row of ``pool`` (which must hold
    ``source_index`` and ``prompt_text``): fold ``k``'s model is trained on every request of the
    dataset in the other folds (capped at ``max_train``) and cached under the predictor directory
    as ``fold-k``."""
    from econoserve.errors import PredictorError
    from econoserve.predictor import (
        LabeledPrompts,
        LengthPredictor,
        PredictorConfig,
        train_predictor,
    )
    from econoserve.workload.datasets import load_requests
    from econoserve.workload.registry import get_entry

    training = plan.predictor_training
    folds = training.folds
    everything = load_requests(dataset, plan.tokenizer)
    source = everything["source_index"].to_numpy()
    fold = cross_fit_folds(source, folds, training.split_seed)
    fold_of_record = dict(zip(source.tolist(), fold.tolist()))
    pool_fold = np.fromiter((fold_of_record[g] for g in pool["source_index"].tolist()), dtype=np.int64, count=len(pool))
    predictions = np.zeros(len(pool), dtype=np.int64)
    base = predictor_directory(plan, dataset, output_dir)
    for k in range(folds):
        rows = np.flatnonzero(pool_fold == k)
        if not rows.size:
            continue
        directory = base / f"fold-{k}"
        model = None
        if (directory / "metadata.json").is_file():
            try:
                model = LengthPredictor.load(directory)
            except PredictorError:
                model = None
        if model is None:
            train_rows = everything[fold != k]
            data = LabeledPrompts(
                dataset=dataset, part=f"cross-fit fold {k} of {folds} (train)", tokenizer=plan.tokenizer,
                prompts=train_rows["prompt_text"].tolist(),
                prompt_tokens=train_rows["prompt_tokens"].to_numpy(np.int64),
                source_index=train_rows["source_index"].to_numpy(np.int64),
                targets={"reference": train_rows["output_tokens"].to_numpy(np.int64)},
                source_sha256={dataset: get_entry(dataset).sha256},
            ).sample(training.max_train, seed=training.split_seed)
            config = PredictorConfig(num_boost_round=training.num_boost_round, seed=training.split_seed,
                                     num_threads=training.num_threads)
            model = train_predictor(data, config, split={"cross_fit_folds": folds, "fold": k,
                                                          "seed": training.split_seed})
            model.save(directory)
        predictions[rows] = model.predict(pool["prompt_text"].iloc[rows].tolist())
    return predictions


def uses_cross_fit(plan: ExperimentPlan, dataset: str, deployment: DeploymentSpec) -> bool:
    """Whether ``predictor="train"`` cross-fits ``dataset`` (see :class:`PredictorTraining`)."""
    if plan.predictor != "train":
        return False
    if plan.predictor_training.cross_fit is not None:
        return plan.predictor_training.cross_fit
    return len(request_pool(dataset, plan, deployment, with_text=False, held_out=True)) < plan.num_requests


# --------------------------------------------------------------------- runs
def simulation_config(plan: ExperimentPlan, deployment: DeploymentSpec, scheduler: str, seed: int,
                      policy_config: Mapping[str, object] | None = None, skip_ahead: bool = True) -> SimulationConfig:
    """The simulator configuration of one run: the deployment, the plan's SLO scale (also the
    policy's, where its configuration has ``slo_scale``), predictions from the trace."""
    options = dict(policy_config or {})
    config_fields = {f.name for f in dataclasses.fields(type(make_config(scheduler)))}
    if "slo_scale" in config_fields:
        options.setdefault("slo_scale", plan.slo_scale)
    return SimulationConfig(
        scheduler=scheduler, policy_config=options, model=deployment.model, gpu=deployment.gpu,
        tensor_parallel=deployment.tp, slo_scale=plan.slo_scale, seed=seed, predictions="trace",
        skip_ahead=skip_ahead,
    )


@dataclass
class Job:
    """One simulation: a trace at a rate through one configuration, with the row keys."""

    keys: dict[str, object]
    trace: Trace
    rate_rps: float
    config: SimulationConfig
    keep_tables: bool = False


def _run_job(job: Job) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    start = time.perf_counter()
    result = simulate(at_rate(job.trace, job.rate_rps), job.config)
    row = {**job.keys, "rate_rps": job.rate_rps, "skip_ahead": job.config.skip_ahead, **result.summary,
           "wall_time_s": time.perf_counter() - start}
    if not job.keep_tables:
        return row, None, None
    iterations = result.iterations.assign(**job.keys, rate_rps=job.rate_rps,
                                          reference_token_budget=result.summary["reference_token_budget"])
    requests = result.requests.drop(columns=["dataset"]).assign(**job.keys, rate_rps=job.rate_rps)
    return row, iterations, requests


def run_jobs(jobs: Sequence[Job], num_workers: int = 2, progress: bool = True, desc: str = "simulate"):
    """Run ``jobs`` in ``num_workers`` processes (in order); returns ``(rows, iterations,
    requests)`` with the tables of jobs that keep them concatenated (None if none do)."""
    from tqdm.auto import tqdm

    outputs = []
    workers = min(num_workers, len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        outputs = [_run_job(job) for job in tqdm(jobs, desc=desc, unit="run", disable=not progress)]
    elif jobs:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunks = max(1, len(jobs) // (8 * workers))
            outputs = list(tqdm(pool.map(_run_job, jobs, chunksize=chunks), total=len(jobs), desc=desc,
                                unit="run", disable=not progress))
    rows = [o[0] for o in outputs]
    iterations = [o[1] for o in outputs if o[1] is not None]
    requests = [o[2] for o in outputs if o[2] is not None]
    return (rows, pd.concat(iterations, ignore_index=True) if iterations else None,
            pd.concat(requests, ignore_index=True) if requests else None)


def _round_rate(rate: float) -> float:
    return float(f"{rate:.2g}")


def rate_grid(saturation_rps: Mapping[str, float], grid: RateGrid, reference: str = REFERENCE_SCHEDULER) -> tuple[tuple[float, ...], float]:
    """The rates of one dataset and its reference rate, from each scheduler's burst throughput
    [requests/s] (see "Rate grid" in the module docstring)."""
    values = [v for v in saturation_rps.values() if v > 0 and math.isfinite(v)]
    if not values:
        raise UserError("no scheduler finished any request in the saturation burst")
    low, high = grid.low_fraction * min(values), grid.high_fraction * max(values)
    ref = saturation_rps.get(reference)
    ref = _round_rate(grid.reference_fraction * (ref if ref and ref > 0 else float(np.median(values))))
    rates = {_round_rate(r) for r in np.geomspace(low, high, grid.num_rates)}
    rates.add(ref)
    return tuple(sorted(rates)), ref


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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.TABLES:
            getattr(self, name).to_parquet(directory / f"{name}.parquet", index=False)
        self.sweep.to_csv(directory / "sweep.csv", index=False)
        meta = {"plan": self.plan, "missing_schedulers": list(self.missing_schedulers),
                "timings_s": self.timings_s, "econoserve_version": __version__}
        (directory / "experiments.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        return directory

    @classmethod
    def read(cls, directory: str | Path) -> ExperimentResults:
        directory = Path(directory)
        meta = json.loads((directory / "experiments.json").read_text())
        tables = {name: pd.read_parquet(directory / f"{name}.parquet") for name in cls.TABLES}
        return cls(plan=meta["plan"], missing_schedulers=tuple(meta.get("missing_schedulers", ())),
                   timings_s=meta.get("timings_s", {}), **tables)

    def goodput(self, schedulers: Sequence[str] | None = None) -> pd.DataFrame:
        """Goodput per deployment, dataset and scheduler (mean attainment over seeds)."""
        from econoserve.analysis.metrics import goodput_from_table

        table = self.sweep if schedulers is None else self.sweep[self.sweep["scheduler"].isin(schedulers)]
        mean = table.groupby(["deployment", "dataset", "scheduler", "rate_rps"], as_index=False)["slo_attainment"].mean()
        return goodput_from_table(mean, by=["deployment", "dataset", "scheduler"])


def run_experiments(plan: ExperimentPlan, output_dir: str | Path, progress: bool = True,
                    allow_missing: bool = False) -> ExperimentResults:
    """Run ``plan``: saturation bursts, the rate sweep (main schedulers and ablations; iteration
    tables at the reference rate), the sensitivity runs; write everything under ``output_dir``.

    Schedulers the registry lacks raise :class:`UserError`, unless ``allow_missing`` (then they
    are dropped and listed in ``missing_schedulers``)."""
    missing = check_schedulers(plan, allow_missing)
    run_plan = without_schedulers(plan, missing) if missing else plan
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    # traces: one unit-rate trace per deployment, dataset and seed, with predictions
    needs_text = run_plan.predictor not in ("oracle", "none")
    traces: dict[tuple[str, str, int], Trace] = {}
    for deployment in run_plan.deployments:
        for dataset in run_plan.datasets:
            cross_fit = uses_cross_fit(run_plan, dataset, deployment)
            pool = request_pool(dataset, run_plan, deployment, with_text=needs_text, held_out=False if cross_fit else None)
            if cross_fit:
                pool["predicted_output_tokens"] = cross_fit_predictions(run_plan, dataset, pool, output_dir)
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
    rows, _, _ = run_jobs(burst_jobs, run_plan.jobs, progress, desc="saturation")
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
    rows, iterations, requests = run_jobs(jobs, run_plan.jobs, progress, desc="sweep")
    iterations = None if iterations is None else _in_plan_order(iterations, run_plan, ["seed", "iteration"])
    requests = None if requests is None else _in_plan_order(requests, run_plan, ["seed", "request_id"])
    sweep = _in_plan_order(pd.DataFrame(rows), run_plan, ["seed", "rate_rps"])
    timings["sweep"] = time.perf_counter() - clock

    # sensitivity (Figure 14)
    clock = time.perf_counter()
    sensitivity = pd.DataFrame()
    if run_plan.sensitivity is not None:
        sensitivity = _run_sensitivity(run_plan, traces, deployments, grid, progress)
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
                        if knob == "rl_error":
                            truth = trace.requests["output_tokens"].to_numpy(np.int64)
                            knob_trace = trace.with_predictions(perturb_lengths(truth, float(value), seed))
                        else:
                            options[knob] = value
                        keys = {"deployment": name, "dataset": dataset, "scheduler": sens.scheduler, "seed": seed,
                                "knob": knob, "value": float(value)}
                        config = simulation_config(plan, deployment, sens.scheduler, seed, options)
                        jobs.append(Job(keys, knob_trace, rate, config))
    return jobs


def _run_sensitivity(plan, traces, deployments, grid, progress) -> pd.DataFrame:
    jobs = sensitivity_jobs(plan, traces, deployments, grid)
    rows, _, _ = run_jobs(jobs, plan.jobs, progress, desc="sensitivity")
    return pd.DataFrame(rows)


__all__ = [
    "ABLATIONS",
    "BASELINES",
    "ECONOSERVE",
    "MAIN_SCHEDULERS",
    "PROFILES",
    "REQUEST_FAMILIES",
    "SENSITIVITY_KNOBS",
    "DeploymentSpec",
    "ExperimentPlan",
    "ExperimentResults",
    "Job",
    "PredictorTraining",
    "RateGrid",
    "SensitivityPlan",
    "at_rate",
    "check_schedulers",
    "cross_fit_folds",
    "cross_fit_predictions",
    "ensure_predictor",
    "make_plan",
    "perturb_lengths",
    "predict_lengths",
    "rate_grid",
    "request_pool",
    "run_experiments",
    "run_jobs",
    "sensitivity_jobs",
    "simulation_config",
    "unit_rate_trace",
    "uses_cross_fit",
    "without_schedulers",
    "without_text",
]

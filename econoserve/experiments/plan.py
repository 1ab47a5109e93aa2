"""The plan of a simulated-serving experiment (notebook 03, ``econoserve sweep``): what to run.

See :mod:`econoserve.experiments` for the profiles and the documented choices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from econoserve.errors import UserError
from econoserve.policy import DEFAULT_SLO_SCALE, EconoServeConfig, policy_names
from econoserve.sim.engine import SimulationConfig

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


#: Objectives of the point model a plan can train (:class:`PredictorTraining`).
POINT_OBJECTIVES: tuple[str, ...] = ("regression", "rank")


@dataclass(frozen=True)
class PredictorTraining:
    """The per-dataset predictor of ``predictor="train"``: training-set cap, boosting rounds,
    held-out fraction, split seed, and LightGBM threads (1 by default: on a busy 2-core machine
    OpenMP threads that wait for each other slow training down by an order of magnitude).

    ``cross_fit``: instead of one model and a trace from the held-out part, split the dataset's
    source records into :attr:`folds` folds, train one model per fold on the other folds, and
    predict every request with the model that did not see its record (out-of-fold predictions),
    so traces can draw from the whole dataset. ``None`` = cross-fit exactly the datasets whose
    held-out pool is smaller than ``num_requests`` (QMSum).

    ``objective``: the point model's objective, ``regression`` (L1 on the log length) or ``rank``
    (a ranker whose scores map to lengths through the training lengths' quantiles; see
    :mod:`econoserve.predictor.model`). At its default it is left out of the predictor cache key,
    so models cached before it existed stay valid.

    ``neighbour_count`` / ``neighbour_folds``: the point model's neighbour-length feature block
    (:class:`~econoserve.predictor.features.FeatureConfig`: the lengths of the ``neighbour_count``
    most similar training prompts, out-of-fold over ``neighbour_folds`` folds on the training
    rows; 0 = off, the default). Left out of the cache key while off.

    ``prompt_decoupling``: rescale the point model's log prediction by one prompt-length factor,
    fitted on out-of-fold predictions over :attr:`folds` folds of its training prompts, so that it
    leans on the prompt length no harder than the training truths do
    (:mod:`econoserve.predictor.decoupling`; ``regression`` only). Off by default, and left out of
    the cache key while off.

    ``refine_after_tokens`` (``k``): the deployment also has a *refined* model
    (:mod:`econoserve.predictor.refine`: the length from the prompt and the response's first ``k``
    tokens, trained on the same training part), so traces of a dataset with response text whose
    predictor is trained, not cross-fitted, carry ``refined_output_tokens`` /
    ``refine_after_tokens`` and the executor refines each request's prediction after ``k``
    tokens (EconoServe's probes need it). Default: EconoServe's probe length
    (``EconoServeConfig.probe_output_tokens``, 16); ``None`` = the prompt-only model alone. It
    does not change the prompt-only model (not in its cache key), and it cannot extend a model
    with the neighbour block or prompt decoupling."""

    max_train: int | None = 4000
    num_boost_round: int | None = 100
    test_fraction: float = 0.2
    split_seed: int = 0
    num_threads: int = 1
    cross_fit: bool | None = None  # None: only where the held-out part is smaller than a trace
    objective: str = "regression"
    neighbour_count: int = 0
    neighbour_folds: int = 5
    prompt_decoupling: bool = False
    refine_after_tokens: int | None = EconoServeConfig.probe_output_tokens  # so the default policy probes

    def __post_init__(self) -> None:
        if self.objective not in POINT_OBJECTIVES:
            raise UserError(f"predictor_training.objective must be one of {', '.join(POINT_OBJECTIVES)}, "
                            f"got {self.objective!r}")
        if self.neighbour_count < 0 or self.neighbour_folds < 0 or self.neighbour_folds == 1:
            raise UserError("predictor_training.neighbour_count must be >= 0 and neighbour_folds 0 "
                            f"(leave-one-out) or >= 2, got {self.neighbour_count} and {self.neighbour_folds}")
        if self.prompt_decoupling and self.objective != "regression":
            raise UserError(f"predictor_training.prompt_decoupling needs the regression objective, got {self.objective!r}")
        if self.refine_after_tokens is not None and self.refine_after_tokens < 1:
            raise UserError(f"predictor_training.refine_after_tokens must be >= 1 or None, got {self.refine_after_tokens}")
        if self.refine_after_tokens is not None and (self.neighbour_count or self.prompt_decoupling):
            raise UserError("predictor_training.refine_after_tokens: a refined model cannot extend a predictor with "
                            "the neighbour block or prompt decoupling; set refine_after_tokens=None")

    def cache_key(self) -> dict:
        """The fields that determine the prompt-only models (``objective``, the neighbour block and
        ``prompt_decoupling`` only when not the default; never ``refine_after_tokens``)."""
        key = asdict(self)
        del key["refine_after_tokens"]
        if self.objective == "regression":
            del key["objective"]
        if not self.neighbour_count:
            del key["neighbour_count"], key["neighbour_folds"]
        if not self.prompt_decoupling:
            del key["prompt_decoupling"]
        return key

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
    slo_scale: float = DEFAULT_SLO_SCALE
    predictor: str = "train"
    predictor_training: PredictorTraining = PredictorTraining()
    tokenizer: str = "llama2"
    fit_context: bool = True
    sensitivity: SensitivityPlan | None = SensitivityPlan()
    jobs: int = 2
    policy_configs: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    latency_model: str = "roofline"  # every run's latency model (SimulationConfig.latency_model)

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
        self._check_policy_configs()
        if self.rates is not None:
            for dataset in self.datasets:
                rates = self.rates.get(dataset)
                if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
                    raise UserError(f"rates for {dataset}: need a non-empty list of positive rates, got {rates}")

    def _check_policy_configs(self) -> None:
        """Knobs only for schedulers the plan runs, and only fields their configuration has."""
        from econoserve.policy import make_config

        if not isinstance(self.policy_configs, Mapping):
            raise UserError("policy_configs: expected a mapping scheduler -> {knob: value}")
        named = set(self.all_schedulers()) | ({self.sensitivity.scheduler} if self.sensitivity else set())
        for scheduler, knobs in self.policy_configs.items():
            if scheduler not in named:
                raise UserError(f"policy_configs: {scheduler!r} is not a scheduler of the plan "
                                f"({', '.join(self.all_schedulers())})")
            if scheduler in policy_names():
                make_config(scheduler, dict(knobs))  # PolicyConfigError names a bad knob

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
        data["policy_configs"] = {k: dict(v) for k, v in self.policy_configs.items()}
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
    slo_scale: float = DEFAULT_SLO_SCALE,
    predictor: str = "train",
    num_requests: int | None = None,
    seed: int | Sequence[int] | None = None,
    jobs: int = 2,
    sensitivity: bool | SensitivityPlan = True,
    policy_configs: Mapping[str, Mapping[str, object]] | None = None,
    refine_after_tokens: int | None = PredictorTraining.refine_after_tokens,
    **overrides,
) -> ExperimentPlan:
    """The plan of ``profile`` with the notebook's parameters applied (``None`` = the profile's).

    ``model`` / ``gpu`` / ``tp`` replace the profile's deployments by one (``gpu`` default
    a100-80gb, ``tp`` default 1). ``request_rates``: one list for every dataset, or a mapping
    dataset -> list; ``None`` = the automatic grid. ``seed``: one seed or a list.
    ``policy_configs``: per scheduler, overrides of its policy's knobs (e.g.
    ``{"sarathi": {"token_budget": 1024}}``), applied to every run of that scheduler.
    ``refine_after_tokens``: ``k`` of the trained predictor's refined partner
    (:class:`PredictorTraining`; ``None`` = prompt-only predictions).
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
        predictor_training=replace(defaults["predictor_training"],
                                   refine_after_tokens=None if refine_after_tokens is None else int(refine_after_tokens)),
        sensitivity=sens,
        jobs=int(jobs),
        policy_configs={str(k): dict(v) for k, v in (policy_configs or {}).items()},
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



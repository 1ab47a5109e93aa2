"""Simulated serving experiments (notebook 03, ``econoserve sweep``): plans, traces, predictors, runs.

Modules: :mod:`~econoserve.experiments.plan` (what to run), :mod:`~econoserve.experiments.workloads`
(request pools and traces), :mod:`~econoserve.experiments.predictors` (trained and cached or
cross-fitted length predictors), :mod:`~econoserve.experiments.backends` (where runs execute: a
local process pool or Ray; stored results for resumption), :mod:`~econoserve.experiments.runner`
(jobs on a backend, :func:`run_experiments`). Figures are drawn from the tables by :mod:`econoserve.analysis.figures`.

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
  ``output_dir/predictors/``). With ``train`` the deployment also has a refined model
  (``PredictorTraining.refine_after_tokens``, default 16 tokens): where the dataset has response
  text and is not cross-fitted (Alpaca, ShareGPT; not QMSum) the traces carry each request's
  prediction refined after its first 16 tokens, which the simulator hands the policy then (and
  which EconoServe's probes need). Baselines ignore predictions; ``econoserve-oracle`` always uses
  true lengths (and is never refined).
* **SLO.** ``slo_scale`` is the simulator's SLO (JCT <= scale x isolated time) and, for policies
  whose configuration has a ``slo_scale`` field (EconoServe's Ordering), theirs too.
"""

from econoserve.experiments.backends import (
    BACKENDS,
    Backend,
    PoolBackend,
    RayBackend,
    Shared,
    Task,
    TaskStore,
    content_key,
    make_backend,
)
from econoserve.experiments.plan import (
    ABLATIONS,
    BASELINES,
    ECONOSERVE,
    MAIN_SCHEDULERS,
    PROFILES,
    REQUEST_FAMILIES,
    SENSITIVITY_KNOBS,
    DeploymentSpec,
    ExperimentPlan,
    PredictorTraining,
    RateGrid,
    SensitivityPlan,
    check_schedulers,
    make_plan,
    rate_grid,
    without_schedulers,
)
from econoserve.experiments.predictors import (
    cross_fit_folds,
    cross_fit_predictions,
    ensure_predictor,
    ensure_refined_predictor,
    predict_lengths,
    predictor_directory,
    refine_after_tokens,
    refined_directory,
    refined_predictions,
    uses_cross_fit,
    with_refinements,
)
from econoserve.experiments.runner import (
    TASKS_DIRECTORY,
    ExperimentResults,
    Job,
    job_tasks,
    predicted_pool,
    run_experiments,
    run_jobs,
    sensitivity_jobs,
    simulation_config,
    trace_digest,
)
from econoserve.experiments.workloads import (at_rate, lognormal_noisy_lengths, perturb_lengths, request_pool,
                                              unit_rate_trace, without_text)

__all__ = [
    "ABLATIONS",
    "BACKENDS",
    "TASKS_DIRECTORY",
    "Backend",
    "PoolBackend",
    "RayBackend",
    "Shared",
    "Task",
    "TaskStore",
    "content_key",
    "job_tasks",
    "make_backend",
    "trace_digest",
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
    "ensure_refined_predictor",
    "lognormal_noisy_lengths",
    "make_plan",
    "perturb_lengths",
    "predict_lengths",
    "predicted_pool",
    "predictor_directory",
    "rate_grid",
    "refine_after_tokens",
    "refined_directory",
    "refined_predictions",
    "request_pool",
    "run_experiments",
    "run_jobs",
    "sensitivity_jobs",
    "simulation_config",
    "unit_rate_trace",
    "uses_cross_fit",
    "with_refinements",
    "without_schedulers",
    "without_text",
]

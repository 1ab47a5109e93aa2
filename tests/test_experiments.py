"""Experiment plans, traces, perturbations, rate grids and a small real sweep (notebook 03)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from econoserve.errors import UserError
from econoserve.experiments import (
    ABLATIONS,
    MAIN_SCHEDULERS,
    REQUEST_FAMILIES,
    SENSITIVITY_KNOBS,
    DeploymentSpec,
    ExperimentResults,
    RateGrid,
    SensitivityPlan,
    at_rate,
    check_schedulers,
    lognormal_noisy_lengths,
    make_plan,
    perturb_lengths,
    rate_grid,
    request_pool,
    run_experiments,
    simulation_config,
    unit_rate_trace,
    without_schedulers,
)
from econoserve.sim import WALL_CLOCK_SUMMARY_KEYS


# --------------------------------------------------------------------- plans
def test_quick_and_full_profiles():
    quick, full = make_plan("quick"), make_plan("full")
    assert quick.datasets == full.datasets == REQUEST_FAMILIES
    assert quick.deployments == (DeploymentSpec("opt-13b", "a100-80gb", 1),)
    assert full.deployments == (DeploymentSpec("opt-13b", "a100-80gb", 1), DeploymentSpec("llama-2-70b", "a100-80gb", 4))
    assert quick.num_requests < full.num_requests and len(quick.seeds) < len(full.seeds)
    assert quick.rate_grid.num_rates < full.rate_grid.num_rates
    assert quick.predictor_training.max_train is not None and full.predictor_training.max_train is None
    assert quick.schedulers == MAIN_SCHEDULERS and quick.ablations == ABLATIONS
    # the ablation list starts with EconoServe itself, so the union has no repeats
    assert quick.all_schedulers() == (*MAIN_SCHEDULERS, *ABLATIONS[1:])
    assert set(full.sensitivity.datasets) == set(REQUEST_FAMILIES)
    assert quick.sensitivity.datasets == ("sharegpt",)


def test_plan_parameters_override_the_profile():
    plan = make_plan("full", model="llama-2-7b", gpu="h100-80gb", tp=2, request_rates=[1, 2],
                     datasets=["alpaca", "qmsum"], num_requests=50, seed=[3, 4], schedulers=["vllm"],
                     ablations=[], sensitivity=False, slo_scale=3)
    assert plan.deployments == (DeploymentSpec("llama-2-7b", "h100-80gb", 2),)
    assert plan.rates == {"alpaca": (1.0, 2.0), "qmsum": (1.0, 2.0)}
    assert plan.num_requests == 50 and plan.seeds == (3, 4) and plan.slo_scale == 3
    assert plan.sensitivity is None and plan.all_schedulers() == ("vllm",)
    # sensitivity datasets follow the plan's datasets
    assert make_plan("quick", datasets=["qmsum"]).sensitivity.datasets == ("qmsum",)
    assert make_plan("quick", seed=7).seeds == (7,)
    single = make_plan("quick", datasets="qmsum", schedulers="vllm", ablations="econoserve")  # papermill -p strings
    assert (single.datasets, single.schedulers, single.ablations) == (("qmsum",), ("vllm",), ("econoserve",))
    assert make_plan("quick", tp=4).deployments == (DeploymentSpec("opt-13b", "a100-80gb", 4),)


@pytest.mark.parametrize("kwargs", [
    {"profile": "medium"},
    {"request_rates": {"alpaca": [1.0]}, "datasets": ["alpaca", "qmsum"]},  # qmsum has no rates
    {"request_rates": [0.0, 1.0]},
    {"num_requests": 1},
    {"slo_scale": 0},
    {"jobs": 0},
])
def test_bad_plans_raise(kwargs):
    with pytest.raises(UserError):
        make_plan(**kwargs)


def test_missing_schedulers_are_an_error_unless_allowed():
    plan = make_plan("quick", schedulers=["vllm", "no-such-scheduler"], ablations=[],
                     sensitivity=SensitivityPlan(scheduler="another-missing"))
    with pytest.raises(UserError, match="no-such-scheduler, another-missing"):
        check_schedulers(plan)
    assert check_schedulers(plan, allow_missing=True) == ("no-such-scheduler", "another-missing")
    reduced = without_schedulers(plan, ["no-such-scheduler", "another-missing"])
    assert reduced.schedulers == ("vllm",) and reduced.sensitivity is None
    assert check_schedulers(reduced) == ()


def test_simulation_config_passes_the_slo_scale_to_policies_that_have_one():
    plan = make_plan("quick", slo_scale=2.5)
    deployment = plan.deployments[0]
    econoserve = simulation_config(plan, deployment, "econoserve", seed=1, policy_config={"rl_bucket": 64})
    assert econoserve.policy_config == {"rl_bucket": 64, "slo_scale": 2.5}
    assert econoserve.slo_scale == 2.5 and econoserve.seed == 1 and econoserve.predictions == "trace"
    vllm = simulation_config(plan, deployment, "vllm", seed=1, skip_ahead=False)
    assert dict(vllm.policy_config) == {} and vllm.skip_ahead is False


# --------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("level", [0.1, 0.3, 0.6])
def test_perturbation_has_the_requested_error_level(level):
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 2000, size=20_000)
    perturbed = perturb_lengths(lengths, level, seed=11)
    relative = (perturbed - lengths) / lengths
    assert np.abs(np.abs(relative) - level).max() < 0.011  # every request is off by the level, up to rounding
    assert abs(np.abs(relative).mean() - level) < 0.002
    assert 0.48 < (relative > 0).mean() < 0.52  # as many over- as under-predictions
    assert (perturbed >= 1).all() and perturbed.dtype == np.int64


def test_perturbation_is_seeded_and_keeps_lengths_positive():
    lengths = np.array([1, 1, 2, 3, 5, 8, 13, 400] * 50)
    a, b = perturb_lengths(lengths, 0.9, seed=3), perturb_lengths(lengths, 0.9, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, perturb_lengths(lengths, 0.9, seed=4))
    assert a.min() >= 1
    assert np.array_equal(perturb_lengths(lengths, 0.0, seed=3), lengths)
    with pytest.raises(UserError):
        perturb_lengths(lengths, -0.1, seed=0)
    with pytest.raises(UserError):
        perturb_lengths([0, 5], 0.1, seed=0)


def test_lognormal_noise_is_seeded_and_degrades_the_ranking_with_sigma():
    from scipy.stats import spearmanr

    lengths = np.random.default_rng(1).integers(1, 2000, size=5000)
    a, b = lognormal_noisy_lengths(lengths, 0.5, seed=7), lognormal_noisy_lengths(lengths, 0.5, seed=7)
    assert np.array_equal(a, b) and a.dtype == np.int64 and a.min() >= 1
    assert not np.array_equal(a, lognormal_noisy_lengths(lengths, 0.5, seed=8))
    assert np.array_equal(lognormal_noisy_lengths(lengths, 0.0, seed=7), lengths)
    rhos = [spearmanr(lengths, lognormal_noisy_lengths(lengths, s, seed=7)).statistic for s in (0.25, 0.5, 1.0, 2.0)]
    assert all(x > y for x, y in zip(rhos, rhos[1:]))
    big = lengths >= 200  # away from the rounding and the 1-token floor: log ratio ~ N(0, sigma^2)
    log_ratio = np.log(lognormal_noisy_lengths(lengths, 0.5, seed=7)[big] / lengths[big])
    assert abs(log_ratio.std() - 0.5) < 0.03 and abs(np.median(log_ratio)) < 0.03
    with pytest.raises(UserError):
        lognormal_noisy_lengths(lengths, -0.1, seed=0)
    with pytest.raises(UserError):
        lognormal_noisy_lengths([0, 5], 0.1, seed=0)


# --------------------------------------------------------------------- traces and rates
def _pool(n: int) -> pd.DataFrame:
    return pd.DataFrame({"source_index": np.arange(n), "prompt_tokens": np.arange(1, n + 1),
                         "output_tokens": np.arange(n, 0, -1)})


def test_unit_rate_trace_rescales_to_any_rate_with_the_same_requests():
    trace = unit_rate_trace(_pool(500), "alpaca", 400, seed=2)
    assert trace.metadata["spec"]["sampled_with_replacement"] is False
    assert trace.requests["prompt_tokens"].is_unique  # without replacement
    slow, fast = at_rate(trace, 2.0), at_rate(trace, 8.0)
    for column in ("prompt_tokens", "output_tokens", "request_id"):
        assert slow.requests[column].tolist() == fast.requests[column].tolist() == trace.requests[column].tolist()
    np.testing.assert_allclose(slow.requests["arrival_time_s"], 4 * fast.requests["arrival_time_s"])
    gaps = np.diff(fast.requests["arrival_time_s"])
    assert abs(1 / gaps.mean() - 8.0) < 8.0 * 0.15  # Poisson at the asked mean rate
    assert fast.metadata["spec"]["rate_rps"] == 8.0 and trace.metadata["spec"]["rate_rps"] == 1.0
    with pytest.raises(UserError):
        at_rate(trace, 0)


def test_small_pool_is_sampled_with_replacement_and_recorded():
    trace = unit_rate_trace(_pool(30), "qmsum", 100, seed=0)
    assert len(trace) == 100 and trace.metadata["spec"]["sampled_with_replacement"] is True
    assert trace.requests["prompt_tokens"].nunique() <= 30


def test_rate_grid_spans_every_scheduler_and_holds_the_reference():
    grid = RateGrid(num_rates=6, low_fraction=0.5, high_fraction=2.0, reference_fraction=1.25)
    rates, reference = rate_grid({"vllm": 8.0, "orca": 4.0, "econoserve": 12.0}, grid)
    assert reference == 10.0 and reference in rates  # 1.25 x vLLM's 8 req/s
    assert rates == tuple(sorted(set(rates)))
    assert rates[0] == 2.0 and rates[-1] == 24.0  # 0.5 x the lowest, 2 x the highest
    assert all(float(f"{r:.2g}") == r for r in rates)
    assert len(rates) in (6, 7)
    _, fallback = rate_grid({"orca": 4.0, "sarathi": 8.0}, grid)  # no vLLM: the median
    assert fallback == 7.5
    with pytest.raises(UserError):
        rate_grid({"vllm": 0.0}, grid)


@pytest.mark.realdata
def test_request_pool_fits_the_context_and_holds_out_training_records():
    from econoserve.predictor import SplitSpec, load_labeled_prompts

    deployment = DeploymentSpec()
    plan = make_plan("quick", predictor="train")
    pool = request_pool("qmsum", plan, deployment, with_text=True)
    assert (pool["prompt_tokens"] + pool["output_tokens"] <= deployment.max_model_len()).all()
    assert "prompt_text" in pool.columns
    training = load_labeled_prompts("qmsum", "train", split=SplitSpec(plan.predictor_training.test_fraction,
                                                                       plan.predictor_training.split_seed))
    assert not set(pool["source_index"]) & set(training.source_index)  # no training meeting in the pool
    everything = request_pool("qmsum", make_plan("quick", predictor="oracle"), deployment, with_text=False)
    assert len(everything) > 3 * len(pool) and "prompt_text" not in everything.columns


# --------------------------------------------------------------------- a small real run
SMALL = {
    "datasets": ["alpaca", "qmsum"], "schedulers": ["vllm", "orca", "econoserve"],
    "ablations": ["econoserve", "econoserve-no-kvcpipe"], "predictor": "oracle", "num_requests": 120, "seed": [0, 1],
    "sensitivity": SensitivityPlan(datasets=("qmsum",), error_levels=(0.0, 0.5), rl_paddings=(0.0, 0.2),
                                   rl_buckets=(16,), reserve_ratios=(0.0, 0.1)),
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    plan = make_plan("quick", rate_grid=RateGrid(num_rates=3), **SMALL)
    return plan, run_experiments(plan, out, progress=False), out


@pytest.mark.realdata
def test_small_run_tables(small_run):
    _, results, _ = small_run
    sweep, saturation = results.sweep, results.saturation
    assert results.missing_schedulers == ()
    assert len(saturation) == 2 * 3  # datasets x main schedulers
    assert (saturation["burst_throughput_rps"] > 0).all()
    for (dataset,), group in sweep.groupby(["dataset"]):
        rates = sorted(group["rate_rps"].unique())
        assert len(rates) in (3, 4)
        assert len(group) == len(rates) * 4 * 2  # rates x (3 main + 1 ablation) x seeds
        reference = group.loc[group["reference"], "rate_rps"].unique()
        assert len(reference) == 1
        vllm_burst = saturation[(saturation["dataset"] == dataset) & (saturation["scheduler"] == "vllm")]
        assert reference[0] == float(f"{1.25 * vllm_burst['burst_throughput_rps'].iloc[0]:.2g}")
    assert list(dict.fromkeys(sweep["dataset"])) == ["alpaca", "qmsum"]  # the plan's order
    assert (sweep["completed"] + sweep["rejected"] == 120).all()
    assert (~sweep.loc[sweep["reference"], "skip_ahead"]).all() and sweep.loc[~sweep["reference"], "skip_ahead"].all()
    # iteration and request tables: exactly the reference runs
    runs = results.iterations.groupby(["dataset", "scheduler", "seed"]).size()
    assert len(runs) == 2 * 4 * 2
    merged = sweep[sweep["reference"]].set_index(["dataset", "scheduler", "seed"])["num_iterations"]
    assert (runs.sort_index() == merged.sort_index()).all()
    assert (results.iterations["skipped"] == 0).all() and "reference_token_budget" in results.iterations
    assert len(results.requests) == 2 * 4 * 2 * 120
    # sensitivity: one run per knob value and seed, on the reference rate x load fraction
    sens = results.sensitivity
    assert set(sens["knob"]) == set(SENSITIVITY_KNOBS)
    assert len(sens) == (2 + 2 + 1 + 2) * 2 and set(sens["dataset"]) == {"qmsum"}
    assert (sens["scheduler"] == "econoserve").all()


@pytest.mark.realdata
def test_small_run_round_trips_and_is_deterministic(small_run, tmp_path):
    plan, results, out = small_run
    again = ExperimentResults.read(out)
    pd.testing.assert_frame_equal(again.sweep, results.sweep)
    pd.testing.assert_frame_equal(again.iterations, results.iterations)
    assert again.plan["num_requests"] == 120
    rerun = run_experiments(plan, tmp_path, progress=False)
    wall = [*WALL_CLOCK_SUMMARY_KEYS, "wall_time_s"]
    pd.testing.assert_frame_equal(rerun.sweep.drop(columns=wall), results.sweep.drop(columns=wall))
    pd.testing.assert_frame_equal(rerun.sensitivity.drop(columns=wall), results.sensitivity.drop(columns=wall))


@pytest.mark.realdata
def test_prediction_error_changes_what_econoserve_does(small_run):
    _, results, _ = small_run
    sens = results.sensitivity
    errors = sens[sens["knob"] == "rl_error"].set_index(["seed", "value"])
    # the perturbed run is a different run: allocations follow the predictions
    for seed in (0, 1):
        exact, noisy = errors.loc[(seed, 0.0)], errors.loc[(seed, 0.5)]
        assert (exact["kvc_allocation_efficiency"], exact["num_iterations"]) != (
            noisy["kvc_allocation_efficiency"], noisy["num_iterations"])


@pytest.mark.realdata
@pytest.mark.slow
def test_trained_predictor_is_cached(tmp_path):
    from econoserve.experiments import (
        PredictorTraining,
        ensure_predictor,
        predictor_directory,
    )

    plan = make_plan("quick", datasets=["qmsum"], predictor="train",
                     predictor_training=PredictorTraining(max_train=200, num_boost_round=5))
    first = ensure_predictor(plan, "qmsum", tmp_path)
    directory = predictor_directory(plan, "qmsum", tmp_path)
    assert (directory / "metadata.json").is_file()
    assert first.training_data["num_prompts"] == 200
    stamp = (directory / "metadata.json").stat().st_mtime_ns
    second = ensure_predictor(plan, "qmsum", tmp_path)  # loaded, not retrained
    assert (directory / "metadata.json").stat().st_mtime_ns == stamp
    pool = request_pool("qmsum", plan, plan.deployments[0], with_text=True).head(40)
    prompts = pool["prompt_text"].tolist()
    assert np.array_equal(first.predict(prompts), second.predict(prompts))


# --------------------------------------------------------------------- cross-fitted predictions
def test_cross_fit_folds_keep_records_together_and_balance():
    from econoserve.experiments import cross_fit_folds

    source = np.repeat(np.arange(50), np.arange(50) % 4 + 1)  # records with 1-4 requests each
    folds = cross_fit_folds(source, 5, seed=3)
    assert np.array_equal(folds, cross_fit_folds(source, 5, seed=3))
    assert not np.array_equal(folds, cross_fit_folds(source, 5, seed=4))
    for record in np.unique(source):
        assert len(set(folds[source == record])) == 1
    records_per_fold = [len(np.unique(source[folds == k])) for k in range(5)]
    assert records_per_fold == [10] * 5
    with pytest.raises(UserError):
        cross_fit_folds(np.array([0, 0, 1]), 5, seed=0)


@pytest.mark.realdata
def test_cross_fit_is_chosen_where_the_held_out_part_is_too_small():
    from econoserve.experiments import PredictorTraining, uses_cross_fit

    deployment = DeploymentSpec()
    plan = make_plan("quick", predictor="train", num_requests=2000)
    assert uses_cross_fit(plan, "qmsum", deployment)  # ~250 held-out queries fit the context
    assert not uses_cross_fit(plan, "alpaca", deployment)
    assert not uses_cross_fit(make_plan("quick", predictor="oracle"), "qmsum", deployment)
    never = make_plan("quick", predictor="train", predictor_training=PredictorTraining(cross_fit=False))
    assert not uses_cross_fit(never, "qmsum", deployment)


@pytest.mark.realdata
@pytest.mark.slow
def test_cross_fit_predictions_are_out_of_fold(tmp_path):
    from econoserve.experiments import (
        PredictorTraining,
        cross_fit_folds,
        cross_fit_predictions,
        predictor_directory,
    )
    from econoserve.predictor import LengthPredictor
    from econoserve.workload.datasets import load_requests

    training = PredictorTraining(max_train=150, num_boost_round=5, cross_fit=True)
    plan = make_plan("quick", datasets=["qmsum"], predictor="train", predictor_training=training)
    pool = request_pool("qmsum", plan, plan.deployments[0], with_text=True, held_out=False).head(120)
    predictions = cross_fit_predictions(plan, "qmsum", pool, tmp_path)
    assert predictions.shape == (120,) and (predictions >= 1).all()
    everything = load_requests("qmsum")
    folds = cross_fit_folds(everything["source_index"].to_numpy(), training.folds, training.split_seed)
    fold_of = dict(zip(everything["source_index"], folds))
    for k in range(training.folds):
        model = LengthPredictor.load(predictor_directory(plan, "qmsum", tmp_path) / f"fold-{k}")
        assert model.training_data["split"]["fold"] == k
        assert model.training_data["num_prompts"] == min(150, int((folds != k).sum()))
        rows = [i for i, record in enumerate(pool["source_index"]) if fold_of[record] == k]
        if rows:
            expected = model.predict(pool["prompt_text"].iloc[rows].tolist())
            assert np.array_equal(predictions[rows], expected)
    # a second call reads the cached fold models
    assert np.array_equal(cross_fit_predictions(plan, "qmsum", pool, tmp_path), predictions)
    # the trace carries the pool's predictions through sampling
    trace = unit_rate_trace(pool.assign(predicted_output_tokens=predictions), "qmsum", 300, seed=0)
    assert trace.has_predictions and trace.metadata["spec"]["sampled_with_replacement"]
    assert set(trace.requests["predicted_output_tokens"]) <= set(predictions)


def test_policy_knobs_per_scheduler_reach_every_run_of_that_scheduler():
    plan = make_plan("quick", schedulers=["vllm", "sarathi"], ablations=[], sensitivity=False,
                     policy_configs={"sarathi": {"token_budget": 1024, "max_num_seqs": 32}})
    deployment = plan.deployments[0]
    sarathi = simulation_config(plan, deployment, "sarathi", 0)
    assert dict(sarathi.policy_config) == {"token_budget": 1024, "max_num_seqs": 32}
    assert dict(simulation_config(plan, deployment, "vllm", 0).policy_config) == {}
    # a run's own options (a sensitivity knob) go over the plan's
    assert simulation_config(plan, deployment, "sarathi", 0, {"token_budget": 64}).policy_config["token_budget"] == 64
    assert plan.to_dict()["policy_configs"] == {"sarathi": {"token_budget": 1024, "max_num_seqs": 32}}
    with pytest.raises(UserError, match="'orca' is not a scheduler of the plan"):
        make_plan("quick", schedulers=["vllm"], ablations=[], sensitivity=False, policy_configs={"orca": {}})
    with pytest.raises(UserError, match="sarathi: unknown option"):
        make_plan("quick", schedulers=["sarathi"], ablations=[], sensitivity=False,
                  policy_configs={"sarathi": {"chunk": 3}})


def test_predictor_training_objective_keys_its_own_cache():
    from econoserve.experiments import PredictorTraining, predictor_directory

    default = make_plan("quick", predictor="train")
    ranker = make_plan("quick", predictor="train", predictor_training=PredictorTraining(objective="rank"))
    assert "objective" not in PredictorTraining().cache_key()  # caches from before the field stay valid
    assert PredictorTraining(objective="rank").cache_key()["objective"] == "rank"
    assert predictor_directory(default, "sharegpt", "out") != predictor_directory(ranker, "sharegpt", "out")
    with pytest.raises(UserError, match="objective"):
        PredictorTraining(objective="classification")


def test_predictor_training_neighbour_block_keys_its_own_cache_only_when_on():
    from econoserve.experiments import PredictorTraining, predictor_directory
    from econoserve.experiments.predictors import predictor_config
    from econoserve.predictor.features import FeatureConfig

    assert PredictorTraining().cache_key() == PredictorTraining(neighbour_folds=0).cache_key()
    assert "neighbour_count" not in PredictorTraining().cache_key()  # caches from before the fields stay valid
    on = PredictorTraining(neighbour_count=16, refine_after_tokens=None)
    assert on.cache_key()["neighbour_count"] == 16 and on.cache_key()["neighbour_folds"] == 5
    plans = [make_plan("quick", predictor="train", predictor_training=t) for t in (PredictorTraining(), on)]
    assert predictor_directory(plans[0], "sharegpt", "out") != predictor_directory(plans[1], "sharegpt", "out")
    assert predictor_config(PredictorTraining()).features == FeatureConfig()  # the default
    assert predictor_config(on).features.neighbour_count == 16 and predictor_config(on).features.neighbour_folds == 5
    assert predictor_config(on, distribution=True).features == FeatureConfig()  # the distribution model: default features
    with pytest.raises(UserError, match="neighbour"):
        PredictorTraining(neighbour_folds=1)


def test_predictor_training_prompt_decoupling_keys_its_own_cache_only_when_on():
    from econoserve.experiments import PredictorTraining, predictor_directory
    from econoserve.experiments.predictors import predictor_config

    assert "prompt_decoupling" not in PredictorTraining().cache_key()  # caches from before the field stay valid
    on = PredictorTraining(prompt_decoupling=True, refine_after_tokens=None)
    assert on.cache_key()["prompt_decoupling"] is True
    plans = [make_plan("quick", predictor="train", predictor_training=t) for t in (PredictorTraining(), on)]
    assert predictor_directory(plans[0], "sharegpt", "out") != predictor_directory(plans[1], "sharegpt", "out")
    assert predictor_config(PredictorTraining()).prompt_decoupling_folds == 0
    assert predictor_config(on).prompt_decoupling_folds == on.folds == 5
    assert predictor_config(on, distribution=True).prompt_decoupling_folds == 0  # the distribution model: off
    with pytest.raises(UserError, match="prompt_decoupling"):
        PredictorTraining(prompt_decoupling=True, objective="rank", refine_after_tokens=None)


def test_predictor_training_refines_by_default_and_never_keys_the_prompt_only_cache_by_it():
    """The deployment's refined model (``refine_after_tokens``, default 16) is a partner of the
    prompt-only model, not part of it: the prompt-only cache key ignores it; only ``train``
    plans refine; it cannot extend a neighbour-block or prompt-decoupled model."""
    from econoserve.experiments import PredictorTraining, predictor_directory, refine_after_tokens

    from econoserve.policy import EconoServeConfig

    assert PredictorTraining().refine_after_tokens == EconoServeConfig().probe_output_tokens == 16  # the default probes
    assert PredictorTraining().cache_key() == PredictorTraining(refine_after_tokens=None).cache_key()
    plans = [make_plan("quick", predictor="train", predictor_training=PredictorTraining(refine_after_tokens=k))
             for k in (16, None)]
    assert predictor_directory(plans[0], "sharegpt", "out") == predictor_directory(plans[1], "sharegpt", "out")
    assert [refine_after_tokens(p) for p in plans] == [16, None]
    assert refine_after_tokens(make_plan("quick", predictor="oracle")) is None
    for bad in ({"refine_after_tokens": 0}, {"neighbour_count": 8}, {"prompt_decoupling": True}):
        with pytest.raises(UserError, match="refine_after_tokens"):
            PredictorTraining(**bad)


@pytest.mark.realdata
def test_trained_traces_carry_the_refined_model_where_the_dataset_has_responses(tmp_path, monkeypatch):
    """A ``train`` plan's pool carries the refinement columns (k = ``refine_after_tokens``) for a
    dataset with response text whose predictions are not cross-fitted (Alpaca); none for a
    cross-fitted one (QMSum), for ``refine_after_tokens=None`` or for true lengths; and the
    unit-rate trace keeps them row by row. (The models are stubbed: this checks the wiring.)"""
    import econoserve.experiments.runner as runner

    calls = []

    def fake_refined(plan, dataset, pool, output_dir, prefix_tokens):
        calls.append((dataset, prefix_tokens, "response_text" in pool.columns))
        return pool.assign(refined_output_tokens=pool["output_tokens"] + 1, refine_after_tokens=prefix_tokens)

    monkeypatch.setattr(runner, "with_refinements", fake_refined)
    monkeypatch.setattr(runner, "cross_fit_predictions", lambda plan, dataset, pool, out: pool["output_tokens"].to_numpy())
    deployment = DeploymentSpec()
    plan = make_plan("quick", predictor="train", num_requests=2000)
    pool, cross_fit = runner.predicted_pool(plan, "alpaca", deployment, tmp_path)
    assert not cross_fit and calls == [("alpaca", 16, True)]
    assert (pool["refine_after_tokens"] == 16).all() and "response_text" not in pool.columns
    trace = unit_rate_trace(pool, "alpaca", 50, seed=0)
    requests = trace.requests
    assert trace.has_refinements and (requests["refined_output_tokens"] == requests["output_tokens"] + 1).all()
    pool, cross_fit = runner.predicted_pool(plan, "qmsum", deployment, tmp_path)
    assert cross_fit and "refine_after_tokens" not in pool.columns and len(calls) == 1
    for other in (make_plan("quick", predictor="train", refine_after_tokens=None), make_plan("quick", predictor="oracle")):
        pool, _ = runner.predicted_pool(other, "alpaca", deployment, tmp_path)
        assert "refine_after_tokens" not in pool.columns and len(calls) == 1


def test_sensitivity_to_prediction_error_drops_the_refined_model():
    """Figure 14's ``rl_error`` runs predict perturbed true lengths, which no refined model
    refines: their traces lose the refinement columns; the other knobs keep the trace."""
    from econoserve.experiments import sensitivity_jobs

    trace = unit_rate_trace(_pool(60), "alpaca", 40, seed=0)
    trace = trace.with_predictions(trace.requests["output_tokens"]).with_refinements(
        trace.requests["output_tokens"] + 3, 16)
    plan = make_plan("quick", datasets=["alpaca"], predictor="train", num_requests=40)
    deployment = plan.deployments[0]
    jobs = sensitivity_jobs(plan, {(deployment.name, "alpaca", 0): trace}, {deployment.name: deployment},
                            {(deployment.name, "alpaca"): ((1.0,), 1.0)})
    assert {job.keys["knob"] for job in jobs} == set(SENSITIVITY_KNOBS)
    for job in jobs:
        assert job.trace.has_refinements == (job.keys["knob"] != "rl_error")

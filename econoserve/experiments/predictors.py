"""The response-length predictor of an experiment: trained once per dataset and cached under the
output directory, or cross-fitted where the held-out part is smaller than a trace."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from econoserve.errors import UserError
from econoserve.experiments.plan import DeploymentSpec, ExperimentPlan, PredictorTraining
from econoserve.experiments.workloads import request_pool
from econoserve.workload.trace import Trace


#: Objective of the per-dataset model that gives the predicted length distribution.
DISTRIBUTION_OBJECTIVE = "classification"


def predictor_directory(plan: ExperimentPlan, dataset: str, output_dir: str | Path, distribution: bool = False) -> Path:
    """Where ``predictor="train"`` caches its model for ``dataset`` (keyed by what determines it):
    the point model, or with ``distribution`` the classification model of the length distribution."""
    key = [dataset, plan.tokenizer, plan.predictor_training.cache_key()] + ([DISTRIBUTION_OBJECTIVE] if distribution else [])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(output_dir) / "predictors" / f"{dataset}-{plan.tokenizer}-{digest}"


def load_cached(directory: Path, load):
    """The model ``load`` reads from ``directory``, or ``None`` when there is none or it is stale
    or torn (:class:`~econoserve.errors.PredictorError`: train again)."""
    from econoserve.errors import PredictorError

    if not (directory / "metadata.json").is_file():
        return None
    try:
        return load(directory)
    except PredictorError:
        return None


def ensure_predictor(plan: ExperimentPlan, dataset: str, output_dir: str | Path, distribution: bool = False):
    """The per-dataset predictor of ``predictor="train"``: the point model (objective
    ``predictor_training.objective``) or, with ``distribution``, the classification model of the
    length distribution; loaded from the cache, else trained on the dataset's training part
    (capped at ``max_train`` prompts) and saved there."""
    from econoserve.predictor import (
        LengthPredictor,
        SplitSpec,
        load_labeled_prompts,
        train_predictor,
    )

    directory = predictor_directory(plan, dataset, output_dir, distribution)
    cached = load_cached(directory, LengthPredictor.load)
    if cached is not None:
        return cached
    training = plan.predictor_training
    split = SplitSpec(test_fraction=training.test_fraction, seed=training.split_seed)
    data = load_labeled_prompts(dataset, "train", tokenizer=plan.tokenizer, split=split)
    data = data.sample(training.max_train, seed=training.split_seed)
    model = train_predictor(data, predictor_config(training, distribution), split=asdict(split))
    model.save(directory)
    return model


def predictor_config(training: PredictorTraining, distribution: bool = False):
    """The :class:`~econoserve.predictor.PredictorConfig` ``training`` trains: its point model
    (``objective``, with the neighbour-length block when ``neighbour_count`` is on and prompt
    decoupling over :attr:`~PredictorTraining.folds` folds when ``prompt_decoupling`` is) or, with
    ``distribution``, the length-distribution model (default features)."""
    from econoserve.predictor import PredictorConfig
    from econoserve.predictor.features import FeatureConfig

    common = {"num_boost_round": training.num_boost_round, "seed": training.split_seed,
              "num_threads": training.num_threads}
    if distribution:
        return PredictorConfig(objective=DISTRIBUTION_OBJECTIVE, **common)
    features = (FeatureConfig(neighbour_count=training.neighbour_count, neighbour_folds=training.neighbour_folds)
                if training.neighbour_count else FeatureConfig())
    return PredictorConfig(objective=training.objective, features=features,
                           prompt_decoupling_folds=training.folds if training.prompt_decoupling else 0, **common)


def predict_lengths(plan: ExperimentPlan, dataset: str, trace: Trace, output_dir: str | Path,
                    distribution: bool = False) -> Trace:
    """``trace`` with ``predicted_output_tokens`` from the plan's predictor (``none``: unchanged);
    with ``distribution`` and ``predictor="train"`` also ``predicted_output_quantiles`` from the
    dataset's classification model (the point prediction stays the regression model's)."""
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
    annotated = model.predict_trace(trace)
    if not (distribution and source == "train"):
        return annotated
    classifier = ensure_predictor(plan, dataset, output_dir, distribution=True)
    prompts = trace.requests["prompt_text"].tolist() if classifier.needs_text else None
    quantiles = classifier.predict_quantiles(prompts, trace.requests["prompt_tokens"].to_numpy(np.int64))
    return annotated.with_predictions(annotated.requests["predicted_output_tokens"].to_numpy(np.int64), quantiles)


def refined_directory(plan: ExperimentPlan, dataset: str, output_dir: str | Path, config) -> Path:
    """Where the refined predictor of ``config`` (:class:`~econoserve.predictor.refine.RefinedConfig`)
    is cached: beside the prompt-only model it extends, keyed by ``config``."""
    base = predictor_directory(plan, dataset, output_dir)
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}-refine{config.prefix_tokens}-{digest}")


def ensure_refined_predictor(plan: ExperimentPlan, dataset: str, output_dir: str | Path, prefix_tokens: int):
    """The refined predictor (:mod:`econoserve.predictor.refine`) of ``dataset`` after
    ``prefix_tokens`` tokens: loaded from the cache, else trained on the same training
    part as the prompt-only model of :func:`ensure_predictor` (which it extends; all of it by
    default, :class:`~econoserve.predictor.refine.RefinedConfig`) and saved."""
    from econoserve.predictor import SplitSpec
    from econoserve.predictor.data import _split_rows, sample_rows
    from econoserve.predictor.refine import RefinedConfig, RefinedLengthPredictor, train_refined_predictor
    from econoserve.workload.datasets import load_requests

    config = RefinedConfig(prefix_tokens)
    directory = refined_directory(plan, dataset, output_dir, config)
    cached = load_cached(directory, RefinedLengthPredictor.load)
    if cached is not None:
        return cached
    base = ensure_predictor(plan, dataset, output_dir)
    training = plan.predictor_training
    split = SplitSpec(test_fraction=training.test_fraction, seed=training.split_seed)
    requests = load_requests(dataset, plan.tokenizer)
    if "response_text" not in requests.columns:
        raise UserError(f"{dataset} has no response text: the refined predictor needs it")
    requests = requests.iloc[_split_rows(requests["source_index"].to_numpy(), "train", split)]
    requests = requests.iloc[sample_rows(len(requests), config.max_train_requests, training.split_seed)]
    model = train_refined_predictor(base, requests["prompt_text"].tolist(), requests["response_text"].tolist(),
                                    requests["output_tokens"].to_numpy(np.int64), config,
                                    {"dataset": dataset, "part": "train", "split": asdict(split)})
    model.save(directory)
    return model


def refined_predictions(plan: ExperimentPlan, dataset: str, pool: pd.DataFrame, output_dir: str | Path,
                        prefix_tokens: int) -> np.ndarray:
    """The refined predicted length [tokens] of every row of ``pool`` (columns ``prompt_text``
    and ``response_text``) after ``prefix_tokens`` tokens (the trace column
    ``refined_output_tokens``; only used for requests longer than ``prefix_tokens``)."""
    model = ensure_refined_predictor(plan, dataset, output_dir, prefix_tokens)
    return model.predict(pool["prompt_text"].tolist(), pool["response_text"].tolist())


def refine_after_tokens(plan: ExperimentPlan) -> int | None:
    """``k`` of the plan's refined model [tokens] (``predictor_training.refine_after_tokens``), or
    ``None`` where traces carry no refinements: a predictor other than ``train`` (oracle lengths
    need none; a saved model has no refined partner)."""
    return plan.predictor_training.refine_after_tokens if plan.predictor == "train" else None


def with_refinements(plan: ExperimentPlan, dataset: str, pool: pd.DataFrame, output_dir: str | Path,
                     prefix_tokens: int) -> pd.DataFrame:
    """``pool`` (with ``prompt_text`` and ``response_text``) with the trace columns of a refinement
    after ``prefix_tokens`` tokens: ``refined_output_tokens`` (:func:`refined_predictions`) and
    ``refine_after_tokens``; the executor hands the refined value to the policy once a request has
    generated that many tokens unfinished."""
    pool = pool.copy()
    pool["refined_output_tokens"] = refined_predictions(plan, dataset, pool, output_dir, prefix_tokens)
    pool["refine_after_tokens"] = prefix_tokens
    return pool


def cross_fit_folds(source_index: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each row, whole source records per fold (:func:`econoserve.predictor.data.record_folds`)."""
    from econoserve.predictor.data import record_folds

    return record_folds(source_index, folds, seed)


def cross_fit_predictions(plan: ExperimentPlan, dataset: str, pool: pd.DataFrame, output_dir: str | Path) -> np.ndarray:
    """Out-of-fold predicted lengths [tokens] for every row of ``pool`` (which must hold
    ``source_index`` and ``prompt_text``): fold ``k``'s model is trained on every request of the
    dataset in the other folds (capped at ``max_train``) and cached under the predictor directory
    as ``fold-k``."""
    from econoserve.predictor import (
        LabeledPrompts,
        LengthPredictor,
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
        model = load_cached(directory, LengthPredictor.load)
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
            model = train_predictor(data, predictor_config(training), split={"cross_fit_folds": folds, "fold": k,
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



"""Requests and traces of an experiment: request pools, unit-rate traces rescaled to each rate,
perturbed predictions (see "Request pools" and "Same requests at every rate" in
:mod:`econoserve.experiments`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.errors import UserError
from econoserve.experiments.plan import DeploymentSpec, ExperimentPlan
from econoserve.workload.arrivals import poisson_arrivals
from econoserve.workload.trace import Trace


def request_pool(dataset: str, plan: ExperimentPlan, deployment: DeploymentSpec, with_text: bool,
                 held_out: bool | None = None, with_responses: bool = False) -> pd.DataFrame:
    """The requests a trace of ``dataset`` samples from (see "Request pools" in the module
    docstring): columns ``source_index``, ``prompt_tokens``, ``output_tokens`` (+ ``prompt_text``,
    and with ``with_responses`` ``response_text``, where the dataset has text).
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
    if with_responses and "response_text" in requests.columns:
        columns.append("response_text")
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
    for column in ("predicted_output_tokens", "refined_output_tokens", "refine_after_tokens"):
        if column in chosen.columns:
            frame[column] = chosen[column].to_numpy(np.int64)
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


def lognormal_noisy_lengths(lengths: Sequence[int] | np.ndarray, log_sigma: float, seed: int) -> np.ndarray:
    """``lengths`` [tokens] times a seeded lognormal factor: a prediction of ranking quality
    set by ``log_sigma`` (the standard deviation of ``log(prediction / length)``, in nats).

    Each length ``L`` becomes ``max(1, round(L * exp(log_sigma * z)))``, ``z ~ N(0, 1)`` drawn
    per request from ``seed`` (the same ``z`` for every ``log_sigma``, so a sweep over
    ``log_sigma`` degrades one set of predictions). The median relative error is about
    ``exp(0.674 * log_sigma) - 1`` for small ``log_sigma``; the rank correlation with the true
    lengths falls as ``log_sigma`` grows. ``log_sigma`` 0 returns the lengths unchanged.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if log_sigma < 0 or not math.isfinite(log_sigma):
        raise UserError(f"log_sigma must be >= 0, got {log_sigma}")
    if np.any(lengths < 1):
        raise UserError("lengths must be >= 1 token")
    z = np.random.default_rng(seed).standard_normal(lengths.size)
    return np.maximum(np.rint(lengths * np.exp(log_sigma * z)), 1).astype(np.int64)



"""Small synthetic traces for tests, examples and quick experiments (real ones come from
:mod:`econoserve.workload`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from econoserve.workload.trace import Trace


def trace_from_lists(
    arrival_time_s: Sequence[float],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    predicted_output_tokens: Sequence[int] | None = None,
    dataset: str = "synthetic",
) -> Trace:
    """A trace of the given requests (ids 0..n-1 in the given order)."""
    frame = pd.DataFrame(
        {
            "request_id": np.arange(len(prompt_tokens), dtype=np.int64),
            "arrival_time_s": np.asarray(arrival_time_s, dtype=float),
            "prompt_tokens": np.asarray(prompt_tokens, dtype=np.int64),
            "output_tokens": np.asarray(output_tokens, dtype=np.int64),
            "dataset": dataset,
        }
    )
    if predicted_output_tokens is not None:
        frame["predicted_output_tokens"] = np.asarray(predicted_output_tokens, dtype=np.int64)
    return Trace.from_frame(frame, {"source": "synthetic"}, source="<synthetic>")


def synthetic_trace(
    num_requests: int,
    rate_rps: float = 1.0,
    prompt_tokens: tuple[int, int] = (16, 1024),
    output_tokens: tuple[int, int] = (1, 512),
    seed: int = 0,
) -> Trace:
    """Poisson arrivals at ``rate_rps`` [requests/s]; prompt and output lengths [tokens] drawn
    log-uniformly from the inclusive ranges."""
    rng = np.random.default_rng(seed)

    def log_uniform(low: int, high: int) -> np.ndarray:
        values = np.exp(rng.uniform(np.log(low), np.log(high + 1), num_requests))
        return np.clip(values.astype(np.int64), low, high)

    arrivals = np.cumsum(rng.exponential(1.0 / rate_rps, num_requests))
    arrivals -= arrivals[0]
    return trace_from_lists(arrivals, log_uniform(*prompt_tokens), log_uniform(*output_tokens))

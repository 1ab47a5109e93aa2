"""Arrival processes: when each request of a trace arrives [s].

All generators take a ``numpy.random.Generator`` so a seed fixes the result, and return
non-decreasing arrival times [s] starting at 0 (the first request arrives at the trace start).

* Poisson(rate): exponential inter-arrival gaps with mean ``1 / rate``; coefficient of
  variation (CV) of the gaps = 1.
* Gamma(rate, cv): Gamma-distributed gaps with mean ``1 / rate`` and CV ``cv``
  (shape ``1 / cv**2``, scale ``cv**2 / rate``); cv > 1 is burstier than Poisson.
* Replay: real timestamps, shifted to start at 0, optionally scaled in time to a target mean rate.
"""

from __future__ import annotations

import numpy as np

from econoserve.errors import UserError

ARRIVAL_PROCESSES: tuple[str, ...] = ("poisson", "gamma", "replay")


def poisson_arrivals(num_requests: int, rate_rps: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times [s] of a Poisson process of ``rate_rps`` requests per second."""
    _check_positive("rate", rate_rps)
    gaps = rng.exponential(1.0 / rate_rps, size=num_requests)
    return _gaps_to_arrivals(gaps)


def gamma_arrivals(num_requests: int, rate_rps: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times [s] with Gamma gaps of mean ``1 / rate_rps`` [s] and coefficient of variation ``cv``."""
    _check_positive("rate", rate_rps)
    _check_positive("cv", cv)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, scale=1.0 / (rate_rps * shape), size=num_requests)
    return _gaps_to_arrivals(gaps)


def replay_arrivals(timestamps_s: np.ndarray, rate_rps: float | None = None) -> np.ndarray:
    """Real timestamps [s] shifted to start at 0; if ``rate_rps`` is given, time is scaled so the
    mean arrival rate over the window is ``rate_rps`` (the burst pattern is kept)."""
    times = np.asarray(timestamps_s, dtype=float)
    if times.size == 0:
        return times
    if np.any(np.diff(times) < 0):
        raise UserError("replay timestamps must be non-decreasing")
    arrivals = times - times[0]
    if rate_rps is not None:
        _check_positive("rate", rate_rps)
        span = arrivals[-1]
        if times.size < 2 or span <= 0:
            raise UserError("cannot rescale a replay window with fewer than two distinct timestamps")
        arrivals = arrivals * ((times.size - 1) / rate_rps) / span
    return arrivals


def interarrival_cv(arrival_times_s: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of the inter-arrival gaps; NaN for < 3 arrivals."""
    gaps = np.diff(np.asarray(arrival_times_s, dtype=float))
    if gaps.size < 2 or gaps.mean() <= 0:
        return float("nan")
    return float(gaps.std(ddof=1) / gaps.mean())


def _gaps_to_arrivals(gaps: np.ndarray) -> np.ndarray:
    arrivals = np.empty_like(gaps)
    if gaps.size:
        arrivals[0] = 0.0
        np.cumsum(gaps[:-1], out=arrivals[1:])
    return arrivals


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and np.isfinite(value)):
        raise UserError(f"--{name} must be a positive number, got {value}")

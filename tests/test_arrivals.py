"""Arrival processes: seeded, and with the right empirical rate and burstiness."""

from __future__ import annotations

import numpy as np
import pytest

from econoserve.errors import UserError
from econoserve.workload.arrivals import (
    gamma_arrivals,
    interarrival_cv,
    poisson_arrivals,
    replay_arrivals,
)

NUM_ARRIVALS = 50_000


def empirical_rate(arrivals: np.ndarray) -> float:
    return (arrivals.size - 1) / (arrivals[-1] - arrivals[0])


@pytest.mark.parametrize("rate", [0.5, 4.0, 40.0])
def test_poisson_rate_and_cv(rate):
    arrivals = poisson_arrivals(NUM_ARRIVALS, rate, np.random.default_rng(1))
    # Standard error of the rate estimate is rate / sqrt(n) ~ 0.45%: 3% is > 6 sigma.
    assert empirical_rate(arrivals) == pytest.approx(rate, rel=0.03)
    assert interarrival_cv(arrivals) == pytest.approx(1.0, abs=0.03)
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)


@pytest.mark.parametrize("cv", [0.5, 2.0, 3.0])
def test_gamma_rate_and_cv(cv):
    rates, cvs = [], []
    for seed in range(8):
        arrivals = gamma_arrivals(NUM_ARRIVALS, 2.0, cv, np.random.default_rng(seed))
        rates.append(empirical_rate(arrivals))
        cvs.append(interarrival_cv(arrivals))
    assert np.median(rates) == pytest.approx(2.0, rel=0.03)
    # The CV estimate of a heavy-tailed gamma converges slowly: median over 8 runs, 6%.
    assert np.median(cvs) == pytest.approx(cv, rel=0.06)


def test_gamma_with_cv_one_matches_poisson_statistics():
    arrivals = gamma_arrivals(NUM_ARRIVALS, 3.0, 1.0, np.random.default_rng(5))
    assert interarrival_cv(arrivals) == pytest.approx(1.0, abs=0.03)


def test_same_seed_same_arrivals_different_seed_different():
    first = poisson_arrivals(100, 2.0, np.random.default_rng(7))
    again = poisson_arrivals(100, 2.0, np.random.default_rng(7))
    other = poisson_arrivals(100, 2.0, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_replay_shifts_and_rescales_keeping_the_pattern():
    stamps = np.array([100.0, 100.5, 101.0, 110.0, 120.0])
    assert replay_arrivals(stamps).tolist() == [0.0, 0.5, 1.0, 10.0, 20.0]
    scaled = replay_arrivals(stamps, rate_rps=2.0)
    assert empirical_rate(scaled) == pytest.approx(2.0)
    assert np.allclose(scaled / scaled[-1], (stamps - 100.0) / 20.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rates_are_user_errors(bad):
    with pytest.raises(UserError, match="--rate must be a positive number"):
        poisson_arrivals(10, bad, np.random.default_rng(0))
    with pytest.raises(UserError, match="positive number"):
        gamma_arrivals(10, 1.0, bad, np.random.default_rng(0))


def test_replay_rejects_unsorted_timestamps():
    with pytest.raises(UserError, match="non-decreasing"):
        replay_arrivals(np.array([0.0, 2.0, 1.0]))

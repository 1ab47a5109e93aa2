"""Serving metrics on hand-made tables, and the goodput search."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from econoserve.analysis import metrics


def _requests():
    return pd.DataFrame({
        "status": ["finished", "finished", "rejected", "finished"],
        "arrival_time_s": [0.0, 1.0, 2.0, 3.0],
        "finish_time_s": [2.0, 5.0, np.nan, 13.0],
        "output_tokens": [10, 20, 5, 40],
        "jct_s": [2.0, 4.0, np.nan, 10.0],
        "ttft_s": [0.5, 1.0, np.nan, 1.5],
        "mean_tbt_s": [0.1, 0.2, np.nan, 0.3],
        "p99_tbt_s": [0.2, 0.3, np.nan, 0.4],
        "normalized_latency_s": [0.2, 0.2, np.nan, 0.25],
        "slo_met": [True, True, False, False],
        "num_preemptions": [0, 2, 0, 1],
    })


def _iterations():
    return pd.DataFrame({
        "duration_s": [1.0, 3.0],
        "num_prefill_tokens": [100, 0],
        "num_decode_tokens": [0, 50],
        "kv_tokens_stored": [160, 320],
        "kv_blocks_used": [10, 20],
        "kv_blocks_reserved": [10, 0],
        "kv_blocks_capacity": [40, 40],
        "block_size": [16, 16],
    })


def test_request_metrics():
    requests = _requests()
    assert metrics.makespan_s(requests) == 13.0
    assert metrics.throughput(requests) == {"throughput_rps": 3 / 13, "output_tokens_per_s": 70 / 13}
    stats = metrics.latency_stats(requests)
    assert stats["mean_jct_s"] == pytest.approx(16 / 3)
    assert stats["p50_jct_s"] == 4.0
    assert stats["mean_ttft_s"] == 1.0
    assert metrics.slo_attainment(requests) == 0.5  # the rejected request counts as a miss
    assert metrics.preempted_fraction(requests) == 0.5
    # DistServe-style: TTFT <= 1.0 and TPOT <= 0.25 -> requests 0 and 1 of 4
    assert metrics.ttft_tpot_slo_attainment(requests, 1.0, 0.25) == 0.5
    assert metrics.ttft_tpot_slo_attainment(requests, 0.6, 1.0) == 0.25


def test_iteration_metrics_are_time_weighted():
    iterations = _iterations()
    # stored / capacity tokens: 160/640 for 1 s, 320/640 for 3 s
    assert metrics.kvc_utilization(iterations) == pytest.approx((0.25 * 1 + 0.5 * 3) / 4)
    # stored / committed: 160/320 for 1 s, 320/320 for 3 s
    assert metrics.kvc_allocation_efficiency(iterations) == pytest.approx((0.5 + 3) / 4)
    # tokens / budget capped at 1: 100/64 -> 1 for 1 s, 50/64 for 3 s
    assert metrics.gpu_token_utilization(iterations, 64) == pytest.approx((1 + 3 * 50 / 64) / 4)


def test_summary_has_every_field():
    from econoserve.results import summarize

    summary = summarize(_requests(), _iterations(), 64, scheduler_invocations=7, scheduler_time_s=0.5)
    assert summary["completed"] == 3 and summary["rejected"] == 1 and summary["failed"] == 0
    assert summary["scheduler_invocations"] == 7
    assert summary["scheduler_time_per_iteration_s"] == 0.25
    # used blocks / capacity, time-weighted: 10/40 for 1 s, 20/40 for 3 s
    assert summary["mean_kv_block_usage"] == pytest.approx((0.25 * 1 + 0.5 * 3) / 4)
    assert summary["max_kv_block_usage"] == 0.5 and summary["mean_iteration_time_s"] == 2.0


def test_goodput_search_finds_the_threshold_rate():
    threshold = 3.7
    result = metrics.goodput_search(lambda rate: 1.0 if rate <= threshold else 0.5, 0.5, 1.0, relative_tolerance=0.001)
    assert threshold * 0.99 <= result["goodput_rps"] <= threshold
    assert metrics.goodput_search(lambda rate: 0.0, 0.5, 1.0)["goodput_rps"] == 0.0


@pytest.mark.parametrize("threshold", [0.004, 0.3, 1.0, 1.26, 7.7])
def test_goodput_search_brackets_from_a_guess_on_either_side(threshold):
    # from a guess of 1 in steps of x1.25 (down while the guess misses), geometric bisection
    tried = []

    def attainment(rate):
        tried.append(rate)
        return 1.0 if rate <= threshold else 0.5

    result = metrics.goodput_search(attainment, 1.0, 1.25, relative_tolerance=0.001, max_evaluations=None,
                                    growth=1.25, geometric=True, min_rps=1e-3)
    assert threshold / 1.001 <= result["goodput_rps"] <= threshold
    assert [rate for rate, _ in result["evaluations"]] == tried and "unbounded" not in result
    bracket = [r for r in tried if r == 1.0 or abs(math.log(r) / math.log(1.25) - round(math.log(r) / math.log(1.25))) < 1e-9]
    assert tried[: len(bracket)] == bracket  # powers of 1.25 first, then midpoints
    for (lo, hi, mid) in _bisection_steps(tried[len(bracket) - 2:], threshold):
        assert mid == pytest.approx(math.sqrt(lo * hi))


def _bisection_steps(rates, threshold):
    """(lower, upper, midpoint) of each bisection step, replayed from the rates tried."""
    lo, hi = sorted(rates[:2])
    for mid in rates[2:]:
        yield lo, hi, mid
        lo, hi = (mid, hi) if mid <= threshold else (lo, mid)


def test_goodput_search_below_its_floor_is_zero():
    result = metrics.goodput_search(lambda rate: 0.0, 1.0, 1.25, growth=1.25, min_rps=0.5, max_evaluations=None)
    assert result["goodput_rps"] == 0.0
    assert min(rate for rate, _ in result["evaluations"]) >= 0.5


def test_goodput_from_a_sweep_table():
    table = pd.DataFrame({
        "scheduler": ["a"] * 4 + ["b"] * 4,
        "rate_rps": [1, 2, 3, 4] * 2,
        "slo_attainment": [1.0, 0.95, 0.85, 0.92, 0.5, 0.4, 0.3, 0.2],
    })
    result = metrics.goodput_from_table(table, by=["scheduler"]).set_index("scheduler")
    assert result.loc["a", "goodput_rps"] == 2  # 4 rps meets it again, but 3 rps did not
    assert math.isnan(result.loc["b", "goodput_rps"])


def test_interpolated_goodput_is_where_attainment_crosses_the_target_after_the_sustained_rate():
    table = pd.DataFrame({
        "scheduler": ["a"] * 4 + ["b"] * 3 + ["c"] * 2,
        "rate_rps": [1, 2, 3, 4] + [1, 2, 3] + [1, 2],
        "slo_attainment": [1.0, 0.95, 0.85, 0.92] + [0.99, 0.95, 0.91] + [0.5, 0.4],
    })
    result = metrics.goodput_from_table(table, by=["scheduler"], interpolate=True).set_index("scheduler")
    assert result.loc["a", "goodput_rps"] == pytest.approx(2.5)  # 0.95 at 2, 0.85 at 3: halfway; not past 3
    assert result.loc["b", "goodput_rps"] == 3  # every swept rate meets it: the highest
    assert math.isnan(result.loc["c", "goodput_rps"])
    grid = metrics.goodput_from_table(table, by=["scheduler"]).set_index("scheduler")
    assert (result["goodput_rps"].dropna() >= grid["goodput_rps"].dropna()).all()

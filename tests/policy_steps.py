"""Executing a policy's decisions by hand in tests (the simulator's rule, without a clock)."""

from __future__ import annotations


def step(policy, true_output: dict[int, int], now: float = 0.0, check_invariants: bool = False):
    """One step: schedule, then end each request whose last token was just produced (at its true
    output length, which only the executor knows); returns the decision."""
    decision = policy.schedule(now)
    finished = [
        r
        for r, n in zip(decision.scheduled, decision.num_scheduled_tokens)
        if r.num_computed_tokens + n == r.num_tokens and r.num_output_tokens + 1 == true_output[r.request_id]
    ]
    policy.update_from_output(decision, finished)
    if check_invariants:
        policy.kv_cache.check_invariants()
    return decision

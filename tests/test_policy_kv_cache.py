"""KVCache: on-demand allocation, reservations, global reserve, loans; never over-committed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from econoserve.policy import KVCache, KVCacheError


def test_allocate_on_demand_counts_whole_blocks():
    kv = KVCache(num_blocks=10, block_size=4)
    assert kv.allocate_slots(1, 5) == 2
    assert kv.allocate_slots(1, 8) == 0  # still within two blocks
    assert kv.allocate_slots(1, 9) == 1
    assert kv.num_allocated_blocks == 3 and kv.num_free_blocks == 7
    assert kv.stored_tokens(1) == 9 and kv.num_stored_tokens == 9
    assert kv.free(1) == 3
    assert kv.num_free_blocks == 10 and kv.num_stored_tokens == 0
    kv.check_invariants()


def test_allocation_failure_changes_nothing():
    kv = KVCache(num_blocks=3, block_size=4)
    assert kv.allocate_slots(1, 8) == 2
    before = kv.snapshot()
    assert kv.allocate_slots(2, 8) is None
    assert kv.snapshot() == before
    assert not kv.holds(2)


def test_reservation_is_drawn_before_the_free_pool():
    kv = KVCache(num_blocks=10, block_size=4)
    assert kv.reserve(1, 16) == 4
    assert kv.num_reserved_blocks == 4 and kv.num_free_blocks == 6
    assert kv.allocate_slots(1, 6) == 2
    assert kv.allocated_blocks(1) == 2 and kv.reserved_blocks(1) == 2
    assert kv.num_free_blocks == 6  # drawn from the reservation
    assert kv.allocate_slots(1, 20) == 3  # 2 from the reservation, 1 from the pool
    assert kv.reserved_blocks(1) == 0 and kv.num_free_blocks == 5
    kv.check_invariants()


def test_reserve_fails_when_pool_too_small_and_release_returns_blocks():
    kv = KVCache(num_blocks=4, block_size=2)
    assert kv.reserve(1, 6) == 3
    assert kv.reserve(2, 4) is None
    assert kv.release_reservation(1) == 3
    assert kv.num_free_blocks == 4


def test_global_reserve_only_on_request():
    kv = KVCache(num_blocks=5, block_size=1, global_reserve_blocks=2)
    assert kv.num_free_blocks == 3
    assert kv.allocate_slots(1, 4) is None
    assert kv.allocate_slots(1, 4, use_global_reserve=True) == 4
    assert kv.num_global_reserve_used == 1 and kv.num_free_blocks == 0
    kv.free(1)
    assert kv.num_global_reserve_used == 0 and kv.num_free_blocks == 3
    kv.check_invariants()


def test_lend_moves_reserved_blocks_and_returns_them():
    kv = KVCache(num_blocks=10, block_size=1)
    kv.reserve(1, 8)
    kv.allocate_slots(1, 2)
    kv.lend(host_id=1, guest_id=2, num_blocks=4)
    assert kv.reserved_blocks(1) == 2 and kv.reserved_blocks(2) == 4
    assert kv.allocate_slots(2, 3) == 3
    assert kv.num_free_blocks == 2  # the guest used the host's idle tail, not the pool
    kv.free(2)
    assert kv.reserved_blocks(1) == 6
    kv.check_invariants()
    with pytest.raises(KVCacheError):
        kv.lend(1, 3, 7)


def test_loan_goes_to_pool_when_host_is_gone():
    kv = KVCache(num_blocks=6, block_size=1)
    kv.reserve(1, 6)
    kv.lend(1, 2, 3)
    kv.free(1)
    kv.free(2)
    assert kv.num_free_blocks == 6
    kv.check_invariants()


def test_resize_grows_always_and_shrinks_only_to_what_is_held():
    kv = KVCache(10, 4, global_reserve_blocks=1)
    assert kv.allocate_slots(1, 12) is not None  # 3 blocks
    assert kv.reserve(2, 8) == 2
    assert kv.resize(20) and kv.num_free_blocks == 20 - 3 - 2 - 1
    assert not kv.resize(5)  # 3 allocated + 2 reserved + 1 reserve do not fit in 5
    assert kv.num_blocks == 20
    assert kv.resize(6) and kv.num_free_blocks == 0
    with pytest.raises(KVCacheError, match="at least one"):
        kv.resize(0)
    with pytest.raises(KVCacheError, match="below the global reserve of 2"):
        KVCache(10, 4, global_reserve_blocks=2).resize(1)
    kv.check_invariants()


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 16]),
    global_reserve=st.integers(0, 5),
    operations=st.lists(
        st.tuples(st.sampled_from(["alloc", "alloc_global", "reserve", "free", "release", "lend", "resize"]),
                  st.integers(0, 5), st.integers(0, 5), st.integers(1, 200)),
        max_size=60,
    ),
)
def test_random_operations_never_over_commit(num_blocks, block_size, global_reserve, operations):
    kv = KVCache(num_blocks, block_size, min(global_reserve, num_blocks))
    tokens: dict[int, int] = {}
    size = num_blocks  # the cache resizes between the global reserve and 2x its first size
    for op, rid, other, amount in operations:
        if op in ("alloc", "alloc_global"):
            target = max(tokens.get(rid, 0), amount)
            result = kv.allocate_slots(rid, target, use_global_reserve=op == "alloc_global")
            if result is not None:
                tokens[rid] = target
        elif op == "reserve":
            kv.reserve(rid, amount)
        elif op == "free":
            kv.free(rid)
            tokens.pop(rid, None)
        elif op == "release":
            kv.release_reservation(rid)
        elif op == "lend" and rid != other and kv.reserved_blocks(rid) > 0:
            try:
                kv.lend(rid, other, 1 + amount % kv.reserved_blocks(rid))
            except KVCacheError:
                pass
        elif op == "resize":
            target = max(1, kv.global_reserve_blocks, amount % (2 * num_blocks + 1))
            committed = kv.num_committed_blocks + kv.num_global_reserve_free
            assert kv.resize(target) == (target >= committed)
            size = kv.num_blocks
        kv.check_invariants()
        assert kv.num_allocated_blocks + kv.num_reserved_blocks + kv.num_free_blocks + kv.num_global_reserve_free == size
        assert kv.num_free_blocks >= 0


def test_a_reservation_may_draw_on_the_global_reserve_and_gives_it_back():
    kv = KVCache(10, block_size=4, global_reserve_blocks=3)
    assert kv.reserve(1, 7 * 4) == 7  # the 7 ordinary blocks
    assert kv.reserve(2, 2 * 4) is None  # nothing ordinary left, and not allowed to use the reserve
    assert kv.reserve(2, 2 * 4, use_global_reserve=True) == 2
    assert kv.num_global_reserve_used == 2 and kv.num_free_blocks == 0
    kv.check_invariants()
    assert kv.release_reservation(2) == 2
    assert kv.num_global_reserve_used == 0 and kv.num_free_blocks == 0
    assert kv.reserve(3, 3 * 4, use_global_reserve=True) == 3
    kv.free(3)
    assert kv.num_global_reserve_used == 0
    kv.check_invariants()


# ---------------------------------------------------------------------- predicted occupancy
def _occupancy_by_brute_force(kv: KVCache, terms: list[tuple[int, int, int, int]], horizon: int | None) -> int:
    """The definition of ``occupancy_peak_blocks``, step by step: every step up to the last end
    (or the horizon), every term alive at it."""
    last_step = max((start + life for start, _, life, _ in terms), default=0)
    steps = range(max(1, last_step if horizon is None else min(last_step, max(1, horizon))))
    return max(
        (sum(max(held, kv.blocks_for(base + max(0, t - start)))
             for start, base, life, held in terms if t < start + life) for t in steps),
        default=0,
    )


_terms = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 200), st.integers(1, 60), st.integers(0, 14)),
                  max_size=12)


@settings(max_examples=300, deadline=None)
@given(terms=_terms, block_size=st.sampled_from([1, 4, 16]), horizon=st.none() | st.integers(0, 120),
       slack=st.integers(-3, 3))
def test_occupancy_peak_and_fit_agree_with_the_step_by_step_definition(terms, block_size, horizon, slack):
    kv = KVCache(num_blocks=1000, block_size=block_size)
    columns = [np.array(column, dtype=np.int64) for column in zip(*terms)] or [np.array([], dtype=np.int64)] * 4
    peak = kv.occupancy_peak_blocks(*columns, horizon_steps=horizon)
    if terms:
        assert peak == _occupancy_by_brute_force(kv, terms, horizon)
    capacity = peak + slack  # near the peak, where the fit test's bounds are tight
    assert kv.occupancy_fits(*columns, capacity, horizon_steps=horizon) == (slack >= 0)

"""KV cache accounting in blocks: what is allocated to tokens, what is reserved, what is free.

Modelled on vLLM v1's ``KVCacheManager.allocate_slots`` (``vllm/v1/core/kv_cache_manager.py``):
the cache is ``num_blocks`` blocks of ``block_size`` tokens; a request owns whole blocks.
On top of vLLM's on-demand allocation it supports the up-front reservations that Orca
(maximum length) and EconoServe (prompt + padded predicted length) need:

* **allocated** (``kvc_allocated_blocks``): blocks assigned to a request's tokens; they hold, or
  by the end of the current step will hold, its keys and values.
* **reserved** (``kvc_reserved_blocks``): blocks set aside for a request's future tokens, not yet
  holding anything. :meth:`allocate_slots` draws from the request's own reservation first.
* **global reserve**: blocks withheld from ordinary allocation, usable only when a caller asks
  (EconoServe's reserve for mispredicted lengths).
* **free**: the rest. ``allocated + reserved + global reserve (unused part) + free == num_blocks``
  always holds; nothing is ever over-committed (:meth:`check_invariants`).
* **loans** (KVCPipe): a host can lend blocks of its reservation to a guest; when the guest is
  freed, the lent blocks go back to the host's reservation (or to the free pool if the host is
  gone).

Every count is in blocks unless the name says tokens. Requests are keyed by ``request_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class KVCacheError(RuntimeError):
    """A caller broke the accounting rules (a bug in a policy, not a user error)."""


@dataclass(frozen=True)
class KVCacheSnapshot:
    """Totals at one moment [blocks, tokens]."""

    num_blocks: int
    block_size: int
    allocated_blocks: int
    reserved_blocks: int
    global_reserve_blocks: int
    global_reserve_used_blocks: int
    free_blocks: int
    stored_tokens: int


class KVCache:
    """Block accounting for one KV cache (one model replica)."""

    __slots__ = (
        "num_blocks",
        "block_size",
        "global_reserve_blocks",
        "_allocated",
        "_reserved",
        "_stored",
        "_from_global",
        "_loans",
        "num_allocated_blocks",
        "num_reserved_blocks",
        "num_stored_tokens",
        "num_global_reserve_used",
    )

    def __init__(self, num_blocks: int, block_size: int = 16, global_reserve_blocks: int = 0) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if not 0 <= global_reserve_blocks <= num_blocks:
            raise ValueError(f"global_reserve_blocks must be in [0, {num_blocks}], got {global_reserve_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.global_reserve_blocks = global_reserve_blocks
        self._allocated: dict[int, int] = {}
        self._reserved: dict[int, int] = {}
        self._stored: dict[int, int] = {}
        self._from_global: dict[int, int] = {}
        self._loans: dict[int, tuple[int, int]] = {}
        self.num_allocated_blocks = 0
        self.num_reserved_blocks = 0
        self.num_stored_tokens = 0
        self.num_global_reserve_used = 0

    # ------------------------------------------------------------------ sizes
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to ordinary allocation or reservation."""
        return (
            self.num_blocks
            - self.num_allocated_blocks
            - self.num_reserved_blocks
            - (self.global_reserve_blocks - self.num_global_reserve_used)
        )

    @property
    def num_global_reserve_free(self) -> int:
        return self.global_reserve_blocks - self.num_global_reserve_used

    @property
    def num_committed_blocks(self) -> int:
        """Blocks allocated or reserved to requests (what a request holds, used or not)."""
        return self.num_allocated_blocks + self.num_reserved_blocks

    def resize(self, num_blocks: int) -> bool:
        """Make the cache ``num_blocks`` blocks (the policy's share of a larger physical cache,
        e.g. EconoServe's slowdown cap and its release). Growing always succeeds. Shrinking
        succeeds only if every committed block and the global reserve's unused part still fit,
        so nothing is ever over-committed; returns whether the cache now has ``num_blocks``."""
        if num_blocks <= 0:
            raise KVCacheError(f"cannot resize to {num_blocks} blocks: a cache needs at least one")
        if num_blocks < self.global_reserve_blocks:
            raise KVCacheError(f"cannot resize to {num_blocks} blocks below the global reserve "
                               f"of {self.global_reserve_blocks}")
        if num_blocks < self.num_blocks - self.num_free_blocks:
            return False
        self.num_blocks = num_blocks
        return True

    def allocated_blocks(self, request_id: int) -> int:
        return self._allocated.get(request_id, 0)

    def reserved_blocks(self, request_id: int) -> int:
        return self._reserved.get(request_id, 0)

    def held_blocks(self, request_id: int) -> int:
        """Blocks the request holds, allocated + reserved."""
        return self._allocated.get(request_id, 0) + self._reserved.get(request_id, 0)

    def stored_tokens(self, request_id: int) -> int:
        return self._stored.get(request_id, 0)

    def holds(self, request_id: int) -> bool:
        return request_id in self._allocated or request_id in self._reserved

    def growth_blocks_needed(self, request_id: int, num_tokens: int) -> int:
        """Blocks beyond what the request holds (allocated + reserved) to hold ``num_tokens``."""
        held = self._allocated.get(request_id, 0) + self._reserved.get(request_id, 0)
        return max(0, -(-num_tokens // self.block_size) - held)

    # ------------------------------------------------------------------ allocation
    def allocate_slots(self, request_id: int, num_tokens: int, use_global_reserve: bool = False,
                       global_reserve_first: bool = False) -> int | None:
        """Make the request's allocated blocks cover ``num_tokens`` tokens in total.

        Blocks come from the request's own reservation first, then from the free pool, then (if
        ``use_global_reserve``) from the global reserve; with ``global_reserve_first`` the global
        reserve is drawn before the free pool (EconoServe's misprediction extension). The
        request's stored-token count becomes ``num_tokens`` (the step that computes them is about
        to run). Returns the number of blocks newly allocated (0 if it already held enough), or
        ``None`` if there is not enough space, in which case nothing changes.
        """
        need = -(-num_tokens // self.block_size)
        have = self._allocated.get(request_id, 0)
        if need > have:
            extra = need - have
            reserved = self._reserved.get(request_id, 0)
            from_reservation = extra if extra <= reserved else reserved
            from_pool = extra - from_reservation
            from_global = 0
            if from_pool:
                free = self.num_free_blocks
                global_free = self.num_global_reserve_free if use_global_reserve else 0
                if from_pool > free + global_free:
                    return None
                from_global = min(from_pool, global_free) if global_reserve_first else max(0, from_pool - free)
                if from_global:
                    self.num_global_reserve_used += from_global
                    self._from_global[request_id] = self._from_global.get(request_id, 0) + from_global
            if from_reservation:
                self._reserved[request_id] = reserved - from_reservation
                self.num_reserved_blocks -= from_reservation
            self._allocated[request_id] = need
            self.num_allocated_blocks += extra
        else:
            extra = 0
            if request_id not in self._allocated:
                self._allocated[request_id] = have
        self.num_stored_tokens += num_tokens - self._stored.get(request_id, 0)
        self._stored[request_id] = num_tokens
        return extra

    def store_tokens(self, request_id: int, num_tokens: int) -> bool:
        """The fast path of :meth:`allocate_slots`: if the request's allocated blocks already hold
        ``num_tokens`` tokens (``blocks_for(num_tokens) <= allocated``), record that it stores
        that many and return True; otherwise change nothing and return False (no block moves
        either way, so a decode step inside its last block costs two dict look-ups)."""
        if -(-num_tokens // self.block_size) > self._allocated.get(request_id, 0):
            return False
        self.num_stored_tokens += num_tokens - self._stored.get(request_id, 0)
        self._stored[request_id] = num_tokens
        return True

    def reserve(self, request_id: int, num_tokens: int, use_global_reserve: bool = False) -> int | None:
        """Set aside blocks so that the request's allocated + reserved blocks cover ``num_tokens``.

        Blocks come from the free pool, then (if ``use_global_reserve``) from the global reserve.
        Returns the number of blocks newly reserved (0 if it already held enough) or ``None`` if
        there is not enough space, in which case nothing changes.
        """
        extra = self.growth_blocks_needed(request_id, num_tokens)
        free = self.num_free_blocks
        from_global = max(0, extra - free)
        if from_global and (not use_global_reserve or from_global > self.num_global_reserve_free):
            return None
        if from_global:
            self.num_global_reserve_used += from_global
            self._from_global[request_id] = self._from_global.get(request_id, 0) + from_global
        self._reserved[request_id] = self._reserved.get(request_id, 0) + extra
        self.num_reserved_blocks += extra
        return extra

    def release_reservation(self, request_id: int) -> int:
        """Return the request's unused reserved blocks to the pool (an early finisher); returns them.
        Blocks it drew from the global reserve go back there first."""
        blocks = self._reserved.pop(request_id, 0)
        self.num_reserved_blocks -= blocks
        to_global = min(blocks, self._from_global.get(request_id, 0))
        if to_global:
            self.num_global_reserve_used -= to_global
            self._from_global[request_id] -= to_global
        return blocks

    def lend(self, host_id: int, guest_id: int, num_blocks: int) -> None:
        """Move ``num_blocks`` of the host's reservation to the guest's reservation (KVCPipe).

        The guest must not already hold a loan. When the guest is freed the blocks return to the
        host's reservation if the host still holds KV, else to the free pool.
        """
        if num_blocks <= 0:
            raise KVCacheError(f"lend: num_blocks must be > 0, got {num_blocks}")
        if guest_id in self._loans:
            raise KVCacheError(f"lend: request {guest_id} already has a loan")
        available = self._reserved.get(host_id, 0)
        if num_blocks > available:
            raise KVCacheError(f"lend: host {host_id} has {available} reserved blocks, {num_blocks} asked")
        self._reserved[host_id] = available - num_blocks
        self._reserved[guest_id] = self._reserved.get(guest_id, 0) + num_blocks
        self._loans[guest_id] = (host_id, num_blocks)

    def lender_of(self, guest_id: int) -> int | None:
        """The host whose reservation the guest borrowed from (KVCPipe), or ``None``."""
        loan = self._loans.get(guest_id)
        return loan[0] if loan is not None else None

    def is_lender(self, host_id: int) -> bool:
        """Whether some guest holds a loan from ``host_id`` (KVCPipe) [O(loans)]."""
        return any(host == host_id for host, _ in self._loans.values())

    def free(self, request_id: int) -> int:
        """Release everything the request holds; returns the number of blocks released."""
        allocated = self._allocated.pop(request_id, 0)
        reserved = self._reserved.pop(request_id, 0)
        stored = self._stored.pop(request_id, 0)
        from_global = self._from_global.pop(request_id, 0)
        self.num_allocated_blocks -= allocated
        self.num_reserved_blocks -= reserved
        self.num_stored_tokens -= stored
        self.num_global_reserve_used -= from_global
        loan = self._loans.pop(request_id, None)
        if loan is not None:
            host_id, lent = loan
            if host_id in self._allocated or host_id in self._reserved:
                returned = min(lent, allocated + reserved)
                self._reserved[host_id] = self._reserved.get(host_id, 0) + returned
                self.num_reserved_blocks += returned
        return allocated + reserved

    # ------------------------------------------------------------------ predicted occupancy
    def occupancy_peak_blocks(self, start_steps: np.ndarray, base_tokens: np.ndarray, lifetime_steps: np.ndarray,
                              held_blocks: np.ndarray, horizon_steps: int | None = None) -> int:
        """Peak over future steps ``0 <= t < horizon_steps`` of a predicted occupancy [blocks].

        Request ``i`` holds ``max(held_blocks[i], blocks_for(base_tokens[i] + max(0, t -
        start_steps[i])))`` for ``t < start_steps[i] + lifetime_steps[i]`` and nothing after: it
        keeps what it holds, grows one token a step from ``start_steps[i]`` on, and frees
        everything at its (predicted) end. Each term is nondecreasing until it ends, so the peak
        is one step before some end (``horizon_steps = None``: no horizon). Arrays are [steps],
        [tokens], [steps], [blocks]; 0 when empty.
        """
        start, base, ends, held = _occupancy_terms(start_steps, base_tokens, lifetime_steps, held_blocks)
        if ends.size == 0:
            return 0
        steps = _peak_candidate_steps(ends, horizon_steps)
        return int(self._occupancy_at(steps, start, base, ends, held).max())

    def occupancy_fits(self, start_steps: np.ndarray, base_tokens: np.ndarray, lifetime_steps: np.ndarray,
                       held_blocks: np.ndarray, capacity_blocks: int, horizon_steps: int | None = None) -> bool:
        """``occupancy_peak_blocks(...) <= capacity_blocks``, evaluated only where it can fail.

        The peak is the largest occupancy ``occ(t)`` over the candidate steps ``t`` (one step
        before an end, capped by the horizon). A term alive at ``t`` holds at most its value
        ``v_i`` at its last step within the horizon, ``min(end_i, horizon_steps) - 1`` (terms
        are nondecreasing while alive), so ``occ(t) <= sum(v_i for end_i > t)``; only the steps
        where that bound exceeds ``capacity_blocks`` are evaluated exactly (ShareGPT at the
        reference rate: 4-5 of some 45 candidates). Same answer as the peak, bit for bit.
        """
        start, base, ends, held = _occupancy_terms(start_steps, base_tokens, lifetime_steps, held_blocks)
        if ends.size == 0:
            return 0 <= capacity_blocks
        steps = _peak_candidate_steps(ends, horizon_steps)
        last = np.minimum(ends - 1, steps[-1])  # each term's last step within the horizon
        value = np.maximum(held, self.blocks_for(base + np.maximum(0, last - start)))
        order = np.argsort(ends, kind="stable")
        alive_after = np.concatenate((np.cumsum(value[order][::-1])[::-1], [0]))  # sum of v over ends[order][k:]
        bound = alive_after[np.searchsorted(ends[order], steps, side="right")]
        steps = steps[bound > capacity_blocks]
        return steps.size == 0 or int(self._occupancy_at(steps, start, base, ends, held).max()) <= capacity_blocks

    def _occupancy_at(self, steps: np.ndarray, start: np.ndarray, base: np.ndarray, ends: np.ndarray,
                      held: np.ndarray) -> np.ndarray:
        """``occ(t)`` of :meth:`occupancy_peak_blocks` at each of ``steps`` [blocks]."""
        steps = steps[:, None]
        grown = base[None, :] + np.maximum(0, steps - start[None, :])
        blocks = np.maximum(held[None, :], -(-grown // self.block_size))
        return np.where(steps < ends[None, :], blocks, 0).sum(axis=1)

    # ------------------------------------------------------------------ bulk decode (skip-ahead)
    def decode_growth(self, request_ids: Sequence[int], computed_tokens: np.ndarray,
                      num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Totals after each of the next ``num_steps`` decode steps of ``request_ids`` (one token
        each per step, the requests holding ``computed_tokens`` tokens now), without changing
        anything: allocated blocks, reserved blocks and stored tokens, each an array of
        ``num_steps`` values. Growth is drawn from each request's own reservation first, as
        :meth:`allocate_slots` draws it (the simulator's skip-ahead logs these instead of stepping).
        """
        steps = np.arange(1, num_steps + 1, dtype=np.int64)
        count = len(request_ids)
        allocated = np.fromiter((self._allocated.get(r, 0) for r in request_ids), dtype=np.int64, count=count)
        reserved = np.fromiter((self._reserved.get(r, 0) for r in request_ids), dtype=np.int64, count=count)
        needed = -(-(np.asarray(computed_tokens, dtype=np.int64)[None, :] + steps[:, None]) // self.block_size)
        drawn = np.maximum(needed, allocated[None, :]) - allocated[None, :]
        used = self.num_allocated_blocks + drawn.sum(axis=1)
        reserved_total = self.num_reserved_blocks - np.minimum(drawn, reserved[None, :]).sum(axis=1)
        stored = self.num_stored_tokens + count * steps
        return used, reserved_total, stored

    # ------------------------------------------------------------------ checks
    def snapshot(self) -> KVCacheSnapshot:
        return KVCacheSnapshot(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            allocated_blocks=self.num_allocated_blocks,
            reserved_blocks=self.num_reserved_blocks,
            global_reserve_blocks=self.global_reserve_blocks,
            global_reserve_used_blocks=self.num_global_reserve_used,
            free_blocks=self.num_free_blocks,
            stored_tokens=self.num_stored_tokens,
        )

    def check_invariants(self) -> None:
        """Raise :class:`KVCacheError` if the totals are inconsistent or over-committed."""
        if self.num_allocated_blocks != sum(self._allocated.values()):
            raise KVCacheError("allocated total disagrees with per-request blocks")
        if self.num_reserved_blocks != sum(self._reserved.values()):
            raise KVCacheError("reserved total disagrees with per-request blocks")
        if self.num_stored_tokens != sum(self._stored.values()):
            raise KVCacheError("stored-token total disagrees with per-request tokens")
        if self.num_free_blocks < 0 or self.num_global_reserve_used > self.global_reserve_blocks:
            raise KVCacheError(f"over-committed: {self.snapshot()}")
        for request_id, stored in self._stored.items():
            if stored > self._allocated.get(request_id, 0) * self.block_size:
                raise KVCacheError(f"request {request_id} stores {stored} tokens in too few blocks")
        if min(self._reserved.values(), default=0) < 0:
            raise KVCacheError("negative reservation")


def _occupancy_terms(start_steps, base_tokens, lifetime_steps, held_blocks) -> tuple[np.ndarray, ...]:
    """The occupancy terms as int64 arrays: start [steps], base [tokens], end = start + lifetime
    [steps], held [blocks]."""
    start = np.asarray(start_steps, dtype=np.int64)
    ends = start + np.asarray(lifetime_steps, dtype=np.int64)
    return start, np.asarray(base_tokens, dtype=np.int64), ends, np.asarray(held_blocks, dtype=np.int64)


def _peak_candidate_steps(ends: np.ndarray, horizon_steps: int | None) -> np.ndarray:
    """The steps where an occupancy can peak, ascending (repeats kept: sorting is cheaper than
    removing them): one before each end (at least 0), capped at ``horizon_steps - 1`` (at least
    0) [steps]."""
    steps = np.maximum(ends - 1, 0)
    if horizon_steps is not None:
        steps = np.minimum(steps, max(0, horizon_steps - 1))
    steps.sort()
    return steps

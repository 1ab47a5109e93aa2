"""The policy interface: a scheduler that owns its queues and KV accounting, and decides each step.

The shape follows vLLM v1's ``Scheduler`` (``vllm/v1/core/sched/scheduler.py``):

* the executor hands over new requests with :meth:`Policy.add_request`;
* before each step it calls :meth:`Policy.schedule`, which returns a
  :class:`~econoserve.policy.decision.SchedulerDecision` (prefill chunks, decodes, preemptions,
  rejections, KV allocations and reservations) and has already done the KV accounting for it;
* after the step it calls :meth:`Policy.update_from_output` with the requests that produced their
  last token; only the executor knows the true response length.

A policy never imports vLLM or the simulator: the simulator executes decisions with a latency
model, and the vLLM adapter executes them on a real engine.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass, is_dataclass
from typing import ClassVar, Iterable

from econoserve.policy.decision import SchedulerDecision, SchedulerStats
from econoserve.policy.kv_cache import KVCache
from econoserve.policy.request import Request, RequestStatus


DEFAULT_SLO_SCALE: float = 5.0
"""The SLO every configuration defaults to [x isolated time]: a request meets it when its JCT is at
most this many times its isolated execution time (``PAPER.md``, "SLO per request")."""


def require_positive(config: object, *names: str) -> None:
    """Raise ``ValueError`` naming the first field of ``config`` that is not > 0 (``None`` means
    "unset" and passes): the shared check of every policy configuration's ``__post_init__``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class EngineLimits:
    """What the executor's hardware and model impose on any policy.

    num_kv_blocks:
        KV cache capacity [blocks].
    block_size:
        Tokens per KV block [tokens]; vLLM's default is 16.
    max_model_len:
        The model's context length: prompt + output may not exceed it [tokens].
    saturating_token_budget:
        The smallest step size [tokens] at which the GPU's compute is saturated (throughput
        within a few percent of its peak). The simulator derives it from its latency model
        (:func:`econoserve.sim.latency.saturating_token_budget`); the vLLM adapter uses the
        engine's ``max_num_batched_tokens``. Policies with a derived token budget use it.
    prefill_time_per_token_s:
        Estimated time of one prompt token in a saturated step [s/token], for policies that
        estimate remaining time (SLO slack); from the executor's latency model.
    decode_time_per_step_s:
        Estimated time of one decode step [s], likewise.
    decode_time_per_context_token_s:
        Estimated time one more cached token of context adds to a decode step [s/token] (reading
        its KV); 0 = unknown or free (the simulator derives it from its latency model, and so does
        the vLLM adapter from the engine's ``econoserve.latency_model``, or takes it from
        ``econoserve.limits``). EconoServe's ``decode_slowdown_cap`` reads it.
    max_tokens_per_step:
        The executor's hard cap on the tokens computed in one step [tokens] (vLLM's
        ``max_num_batched_tokens``); ``None`` = no cap (the simulator). Every policy's
        :attr:`Policy.token_budget` is the smaller of its own budget and this.
    max_seqs_per_step:
        The executor's hard cap on the sequences in one step [sequences] (vLLM's
        ``max_num_seqs``); ``None`` = no cap. Every policy's :attr:`Policy.max_num_seqs` is the
        smaller of its own cap and this.
    """

    num_kv_blocks: int
    block_size: int = 16
    max_model_len: int = 2048
    saturating_token_budget: int = 512
    prefill_time_per_token_s: float = 1e-4
    decode_time_per_step_s: float = 0.02
    decode_time_per_context_token_s: float = 0.0
    max_tokens_per_step: int | None = None
    max_seqs_per_step: int | None = None

    def __post_init__(self) -> None:
        if self.num_kv_blocks <= 0 or self.block_size <= 0 or self.max_model_len <= 0:
            raise ValueError(f"engine limits must be positive: {self}")
        if self.saturating_token_budget <= 0:
            raise ValueError(f"saturating_token_budget must be > 0, got {self.saturating_token_budget}")
        if self.prefill_time_per_token_s <= 0 or self.decode_time_per_step_s <= 0:
            raise ValueError(f"time estimates must be > 0: {self}")
        if self.decode_time_per_context_token_s < 0:
            raise ValueError(f"decode_time_per_context_token_s must be >= 0, got {self.decode_time_per_context_token_s}")
        require_positive(self, "max_tokens_per_step", "max_seqs_per_step")


def smaller_cap(own: int | None, cap: int | None) -> int | None:
    """The smaller of a policy's own limit and the executor's cap (``None`` = no limit)."""
    if own is None:
        return cap
    return own if cap is None else min(own, cap)


class Policy(ABC):
    """Base class of every scheduling policy.

    Subclasses implement :meth:`_schedule` (one pass that fills a decision) and set ``name`` and
    ``config_class``; a policy with a per-step token budget or a batch cap returns its own value
    from :meth:`_own_token_budget` / :meth:`_own_max_num_seqs` and reads the effective one
    (capped by the executor's :class:`EngineLimits`) from :attr:`token_budget` /
    :attr:`max_num_seqs`. ``waiting`` is a deque in the policy's queue order; ``running`` lists
    the admitted requests in admission order (the last one is the most recently admitted).
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type] = object
    #: Whether the policy's decision logic runs every step (True) or only on events (False).
    decides_every_step: ClassVar[bool] = True
    #: Whether the policy uses predicted response lengths (without them it falls back to a rule).
    uses_predictions: ClassVar[bool] = False

    def __init__(self, limits: EngineLimits, config: object | None = None) -> None:
        self.limits = limits
        self.config = config if config is not None else self.config_class()
        self._token_budget = smaller_cap(self._own_token_budget(), limits.max_tokens_per_step)
        self._max_num_seqs = smaller_cap(self._own_max_num_seqs(), limits.max_seqs_per_step)
        self.kv_cache = self._make_kv_cache()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._admissions = 0

    def _make_kv_cache(self) -> KVCache:
        return KVCache(self.limits.num_kv_blocks, self.limits.block_size)

    # ------------------------------------------------------------------ executor API
    def add_request(self, request: Request) -> str | None:
        """Queue a new request. Returns a rejection reason (and does not queue it) if the policy
        can never serve it; ``None`` otherwise."""
        reason = self.admission_check(request)
        if reason is not None:
            request.status = RequestStatus.REJECTED
            self.stats.rejections += 1
            return reason
        request.status = RequestStatus.WAITING
        self._enqueue(request)
        return None

    def _enqueue(self, request: Request) -> None:
        """Put an accepted new request in the queue (the policy's own order may differ)."""
        self.waiting.append(request)

    def admission_check(self, request: Request) -> str | None:
        """Why the policy could never serve ``request`` (``None`` if it can). Default: a prompt
        whose KV cannot fit in the whole cache."""
        if self.kv_cache.blocks_for(request.num_prompt_tokens) > self.kv_cache.num_blocks:
            return (
                f"prompt of {request.num_prompt_tokens} tokens needs more than the "
                f"{self.kv_cache.num_blocks} KV blocks of the cache"
            )
        return None

    def schedule(self, now_s: float) -> SchedulerDecision:
        """Decide the next step at time ``now_s`` [s]; KV accounting is done for the decision."""
        start = time.perf_counter()
        decision = self._schedule(now_s)
        self.stats.wall_time_s += time.perf_counter() - start
        if decision.invoked:
            self.stats.invocations += 1
        self.stats.preemptions += len(decision.preempted)
        self.stats.rejections += len(decision.rejected)
        return decision

    def update_from_output(self, decision: SchedulerDecision, finished: Iterable[Request] = ()) -> None:
        """Advance the token counters of the step just executed and retire ``finished`` requests.

        A scheduled request whose pending tokens were all computed gains one output token.
        ``finished`` are the requests that produced their last token this step (the executor
        decides); their KV is freed.
        """
        for request, num_tokens in zip(decision.scheduled, decision.num_scheduled_tokens):
            computed = request.num_computed_tokens + num_tokens
            request.num_computed_tokens = computed
            if computed == request.num_prompt_tokens + request.num_output_tokens:
                request.num_output_tokens += 1
        done = False
        for request in finished:
            request.status = RequestStatus.FINISHED
            self.kv_cache.free(request.request_id)
            self._on_finished(request)
            done = True
        if done:
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]

    def refine_prediction(self, request: Request, predicted_output_tokens: int) -> None:
        """The executor's refined prediction [tokens] for an unfinished ``request`` (from its
        prompt and the tokens generated so far; see :mod:`econoserve.predictor.refine`): it
        replaces ``predicted_output_tokens`` (and drops ``predicted_output_quantiles``, which
        belonged to the prompt-only prediction), and the policy re-sizes what it derived from
        the old one (:meth:`_on_prediction_refined`). The one way a prediction changes."""
        request.predicted_output_tokens = predicted_output_tokens
        request.predicted_output_quantiles = None
        request.refined_after_tokens = request.num_output_tokens
        self._on_prediction_refined(request)

    def _on_prediction_refined(self, request: Request) -> None:
        """Re-derive what the policy computed from ``request``'s old prediction (nothing here)."""

    def abort_request(self, request: Request) -> None:
        """Drop ``request`` for good (a client abort): out of every queue, its KV and reservations
        released. A policy with queues beyond ``waiting`` and ``running`` overrides this."""
        try:
            self.waiting.remove(request)
        except ValueError:
            pass
        self.update_from_output(SchedulerDecision(), [request])

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def wants_oracle_predictions(self) -> bool:
        """True when the policy asks the executor for the true response length as prediction."""
        return False

    @property
    def token_budget(self) -> int | None:
        """Most tokens one step may compute [tokens]: the smaller of the policy's own budget and the
        executor's ``max_tokens_per_step``; ``None`` if neither caps it."""
        return self._token_budget

    @property
    def max_num_seqs(self) -> int | None:
        """Most sequences in a step (or running) [sequences]: the smaller of the policy's own cap and
        the executor's ``max_seqs_per_step``; ``None`` if neither caps it."""
        return self._max_num_seqs

    def _own_token_budget(self) -> int | None:
        """The policy's own per-step token budget [tokens] from its configuration (``None``: none)."""
        return None

    def _own_max_num_seqs(self) -> int | None:
        """The policy's own cap on sequences per step [sequences] (``None``: none)."""
        return None

    # ------------------------------------------------------------------ skip-ahead support
    def steady_decode_steps(self, decision: SchedulerDecision, max_steps: int) -> int:
        """How many further steps are guaranteed to decode exactly the running set, unchanged.

        Called right after ``update_from_output`` for ``decision``. Valid only if no request
        arrives or finishes meanwhile (the executor bounds ``max_steps`` by that). The default is
        correct for policies whose admission of waiting requests depends only on free blocks
        (which decoding never increases), the running count and a constant token budget: if the
        step was decode-only with every running request scheduled and nothing preempted or
        admitted, the same holds as long as the running requests' KV growth fits in free blocks.
        Returns 0 when unsure.
        """
        if (
            max_steps <= 0
            or decision.num_prefill_tokens
            or decision.preempted
            or decision.rejected
            or len(decision.scheduled) != len(self.running)
            or not self._steady_state_allowed()
        ):
            return 0
        kv = self.kv_cache
        free = kv.num_free_blocks - self._steady_free_margin()
        if free < 0:
            return 0
        block = kv.block_size
        # Free token slots each request already holds (allocated + reserved) beyond its cache.
        slack = [
            (kv.allocated_blocks(r.request_id) + kv.reserved_blocks(r.request_id)) * block - r.num_computed_tokens
            for r in self.running
        ]

        def blocks_needed(steps: int) -> int:
            total = 0
            for s in slack:
                if steps > s:
                    total += -(-(steps - s) // block)
            return total

        if blocks_needed(max_steps) <= free:
            return max_steps
        lo, hi = 0, max_steps  # blocks_needed(lo) <= free < blocks_needed(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if blocks_needed(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def advance_decode_steps(self, num_steps: int) -> None:
        """Apply ``num_steps`` decode-only steps of the whole running set at once (see
        :meth:`steady_decode_steps`): KV slots and token counters, as the steps would have."""
        start = time.perf_counter()
        kv = self.kv_cache
        for request in self.running:
            computed = request.num_computed_tokens + num_steps
            if kv.allocate_slots(request.request_id, computed) is None:
                raise RuntimeError(f"{self.name}: bulk decode of {num_steps} steps over-ran the KV cache")
            request.num_computed_tokens = computed
            request.num_output_tokens += num_steps
        self.stats.wall_time_s += time.perf_counter() - start
        self.stats.skipped_steps += num_steps
        if self.decides_every_step:
            self.stats.invocations += num_steps

    def _steady_state_allowed(self) -> bool:
        return True

    def _steady_free_margin(self) -> int:
        """Blocks that decode growth may not take (e.g. a watermark)."""
        return 0

    # ------------------------------------------------------------------ helpers for subclasses
    @abstractmethod
    def _schedule(self, now_s: float) -> SchedulerDecision:
        """Fill and return one step's decision."""

    def _admit(self, request: Request) -> None:
        """Move a request to the running set (it must already be out of ``waiting``)."""
        request.status = RequestStatus.RUNNING
        request.admission_order = self._admissions
        self._admissions += 1
        self.running.append(request)

    def _preempt(self, request: Request, decision: SchedulerDecision) -> None:
        """Preempt by recompute: free the KV, reset the cache counter, requeue at the front."""
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        decision.preempted.append(request)

    def _reject(self, request: Request, reason: str, decision: SchedulerDecision) -> None:
        """Refuse a queued request for good (it must already be out of ``waiting``)."""
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.REJECTED
        decision.rejected.append((request, reason))

    def _allocate(self, request: Request, num_tokens: int, decision: SchedulerDecision) -> bool:
        """Allocate slots so the request's cache covers its computed + ``num_tokens`` tokens."""
        new = self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens + num_tokens)
        if new is None:
            return False
        if new:
            decision.kv_allocations[request.request_id] = new
        return True

    def _schedule_decodes_first(self, budget: int, decision: SchedulerDecision) -> tuple[int, list[Request]]:
        """One decode token for each running decoding request, in running order, within ``budget``
        [tokens]; when blocks run out, preempt the most recently admitted running request.

        Returns the remaining budget [tokens] and the running requests still in prefill (their
        chunks are the caller's to schedule). Shared by the stall-free policies (Sarathi-Serve,
        FastGen), which put decodes before prompt chunks.
        """
        running = self.running
        prefilling: list[Request] = []
        i = 0
        while i < len(running):
            request = running[i]
            if not request.is_decoding:
                prefilling.append(request)
                i += 1
                continue
            if budget <= 0:
                break
            if not self._allocate_or_preempt(request, 1, decision):
                break
            decision.add(request, 1)
            budget -= 1
            i += 1
        return budget, prefilling

    def _allocate_or_preempt(self, request: Request, num_tokens: int, decision: SchedulerDecision) -> bool:
        """Allocate slots for ``num_tokens`` more tokens of a running request, preempting the most
        recently admitted running request (vLLM's recompute rule) until they fit. False when the
        request itself had to be preempted."""
        while not self._allocate(request, num_tokens, decision):
            victim = self.running.pop()
            self._preempt(victim, decision)
            if victim is request:
                return False
        return True

    def _on_finished(self, request: Request) -> None:
        """Hook for subclasses (e.g. to release reservations of a group)."""

    def describe(self) -> dict[str, object]:
        """The policy's name and resolved configuration, for the run's configuration file."""
        config = asdict(self.config) if is_dataclass(self.config) else {}
        return {"name": self.name, "config": config, "token_budget": self.token_budget}

"""vLLM's schedulers: prefill-first (vLLM 0.x) and chunked prefill (vLLM v1).

Rules, from vLLM's source:

* **prefill-first** (``vllm/core/scheduler.py``, ``Scheduler._schedule_default``, v0.6): FCFS.
  Waiting prompts are admitted whole, in order, while the step's prompt tokens stay within
  ``token_budget`` (vLLM's ``max_num_batched_tokens``), the running count within ``max_num_seqs``, and the block manager
  ``can_allocate`` the prompt's blocks keeping a watermark of ``watermark_ratio`` of the cache
  free (``BlockSpaceManager.can_allocate``). If any prompt was admitted the step is prefill-only;
  otherwise every running request decodes one token, in FCFS order, each appending a slot
  (a new 16-token block when its last block is full). When no block is free, the most recently
  admitted running request (the tail of the running queue) is preempted by recompute; if that
  is the request itself, it is preempted and the pass stops. Preempted requests go to the front
  of the waiting queue. A prompt that can never be allocated (more blocks than the cache less
  the watermark) is ignored with a warning (``AllocStatus.NEVER``); here it is rejected.
  Defaults: ``token_budget = max(max_model_len, 2048)`` and ``max_num_seqs = 256``
  (``SchedulerConfig``), ``watermark = 0.01`` (``CacheConfig``), 16-token blocks.
* **chunked prefill** (``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``, v0.8-0.11):
  one pass under a token budget ``token_budget`` (vLLM's ``max_num_batched_tokens``). First the running requests, in
  order: each gets ``min(pending tokens, budget left)`` tokens (a decode, or the next chunk of a
  prompt); ``KVCacheManager.allocate_slots`` allocates blocks on demand, and on failure the
  scheduler preempts ``self.running.pop()`` (the most recently admitted) until it fits or it
  preempted the request itself. Then, only if nothing was preempted this step, waiting requests
  in FCFS order are admitted with a chunk of ``min(pending, budget left)`` tokens while the
  budget, ``max_num_seqs`` and the KV cache allow. No watermark. Defaults:
  ``token_budget = 8192`` (v1's default for online serving on GPU, ``vllm serve``)
  and ``max_num_seqs = 256``.
"""

from __future__ import annotations

from dataclasses import dataclass

from econoserve.policy.base import Policy, require_positive
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.request import Request


@dataclass(frozen=True)
class VLLMConfig:
    """Knobs of vLLM's prefill-first (v0) scheduler.

    token_budget:
        Most prompt tokens in one step [tokens] (vLLM's ``max_num_batched_tokens``); ``None`` =
        ``max(max_model_len, 2048)``.
    max_num_seqs:
        Most running requests [sequences].
    watermark_ratio:
        Fraction of the KV cache a prompt admission must leave free [fraction of blocks].
    """

    token_budget: int | None = None
    max_num_seqs: int = 256
    watermark_ratio: float = 0.01

    def __post_init__(self) -> None:
        require_positive(self, "token_budget", "max_num_seqs")
        if not 0 <= self.watermark_ratio < 1:
            raise ValueError(f"watermark_ratio must be in [0, 1), got {self.watermark_ratio}")


@dataclass(frozen=True)
class VLLMChunkedConfig:
    """Knobs of vLLM v1's chunked-prefill scheduler.

    token_budget:
        Tokens of one step [tokens], decodes + prefill chunks (vLLM's ``max_num_batched_tokens``).
    max_num_seqs:
        Most running requests [sequences].
    """

    token_budget: int = 8192
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        require_positive(self, "token_budget", "max_num_seqs")


class VLLMPolicy(Policy):
    """vLLM 0.x: FCFS, whole prompts first (prefill-only steps), on-demand blocks, recompute."""

    name = "vllm"
    config_class = VLLMConfig

    def __init__(self, limits, config: VLLMConfig | None = None) -> None:
        super().__init__(limits, config)
        self.watermark_blocks = int(self.config.watermark_ratio * limits.num_kv_blocks)

    def _own_token_budget(self) -> int:
        return self.config.token_budget or max(self.limits.max_model_len, 2048)

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def admission_check(self, request: Request) -> str | None:
        if request.num_prompt_tokens > self.token_budget:
            return (
                f"prompt of {request.num_prompt_tokens} tokens exceeds the token budget "
                f"{self.token_budget} (vLLM ignores such prompts)"
            )
        return self._never_fits(request.num_prompt_tokens)

    def _never_fits(self, num_tokens: int) -> str | None:
        kv = self.kv_cache
        if kv.blocks_for(num_tokens) > kv.num_blocks - self.watermark_blocks:
            return (
                f"{num_tokens} tokens need {kv.blocks_for(num_tokens)} KV blocks; the cache has "
                f"{kv.num_blocks} less a watermark of {self.watermark_blocks}"
            )
        return None

    def _steady_free_margin(self) -> int:
        return 0  # the watermark applies to prompt admission only, not to decode slots

    def _schedule(self, now_s: float) -> SchedulerDecision:
        decision = SchedulerDecision()
        kv = self.kv_cache
        waiting = self.waiting
        budget = self.token_budget
        max_seqs = self.max_num_seqs
        while waiting and len(self.running) < max_seqs:
            request = waiting[0]
            num_new = request.num_pending_tokens
            if num_new > budget:
                if num_new > self.token_budget:  # a long recompute: never schedulable
                    waiting.popleft()
                    self._reject(request, f"recompute of {num_new} tokens exceeds the token budget", decision)
                    continue
                break
            need = kv.blocks_for(request.num_computed_tokens + num_new)
            if need > kv.num_blocks - self.watermark_blocks:
                waiting.popleft()
                self._reject(request, self._never_fits(request.num_computed_tokens + num_new) or "", decision)
                continue
            if kv.num_free_blocks - need < self.watermark_blocks:
                break
            waiting.popleft()
            self._allocate(request, num_new, decision)
            self._admit(request)
            decision.add(request, num_new)
            budget -= num_new
        if decision.scheduled:
            return decision

        running = self.running
        i = 0
        while i < len(running):
            request = running[i]
            while not self._allocate(request, 1, decision):
                victim = running.pop()
                self._preempt(victim, decision)
                if victim is request:
                    break
            else:
                decision.add(request, 1)
                i += 1
                continue
            break
        return decision


class VLLMChunkedPolicy(Policy):
    """vLLM v1: one token budget per step, running requests first, chunked prefill, recompute."""

    name = "vllm-chunked"
    config_class = VLLMChunkedConfig

    def _own_token_budget(self) -> int:
        return self.config.token_budget

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def _schedule(self, now_s: float) -> SchedulerDecision:
        decision = SchedulerDecision()
        budget = self.token_budget
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_new = request.num_pending_tokens
            if num_new > budget:
                num_new = budget
            if not self._allocate_or_preempt(request, num_new, decision):
                break
            decision.add(request, num_new)
            budget -= num_new
            i += 1
        if decision.preempted:
            return decision
        waiting = self.waiting
        max_seqs = self.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            request = waiting[0]
            num_new = request.num_pending_tokens
            if num_new > budget:
                num_new = budget
            if not self._allocate(request, num_new, decision):
                break
            waiting.popleft()
            self._admit(request)
            decision.add(request, num_new)
            budget -= num_new
        return decision

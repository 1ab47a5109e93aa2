"""Sarathi-Serve: chunked prefill under a token budget, decodes first, stall-free batching.

Rules from Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with
Sarathi-Serve", OSDI 2024, Algorithm 1, and its scheduler
(``sarathi/core/scheduler/sarathi_scheduler.py`` in microsoft/sarathi-serve):

1. every running request whose prompt is done decodes one token (decodes first, so ongoing
   decodes never stall behind a prompt); a decode that cannot get a KV slot preempts the most
   recently admitted running request by recompute (front of the waiting queue), or itself;
2. running requests with a partly processed prompt get their next chunk, ``min(pending,
   budget left)`` tokens;
3. waiting requests are admitted FCFS while budget remains, ``max_num_seqs`` allows, and the block
   manager can allocate blocks for the *whole* prompt (vLLM 0.x's ``can_allocate`` with its
   watermark); the first chunk runs in the same step.

The token budget (``chunk_size`` in the paper) caps every step: decodes + chunks <= budget.
Defaults: ``token_budget = 512`` (the paper's setting for strict latency SLOs), ``max_num_seqs
= 256``, ``watermark_ratio = 0.01``. Blocks for the whole prompt are held as a reservation that
each chunk turns into allocated blocks, so allocated-but-unfilled prompt space shows as reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

from econoserve.policy.base import Policy, require_positive
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.request import Request


@dataclass(frozen=True)
class SarathiConfig:
    """Knobs of the Sarathi-Serve policy.

    token_budget:
        Most tokens in a step, decodes + prefill chunks [tokens] (the paper's chunk size).
    max_num_seqs:
        Most running requests [sequences].
    watermark_ratio:
        Fraction of the KV cache a prompt admission must leave free [fraction of blocks].
    """

    token_budget: int = 512
    max_num_seqs: int = 256
    watermark_ratio: float = 0.01

    def __post_init__(self) -> None:
        require_positive(self, "token_budget", "max_num_seqs")
        if not 0 <= self.watermark_ratio < 1:
            raise ValueError(f"watermark_ratio must be in [0, 1), got {self.watermark_ratio}")


class SarathiPolicy(Policy):
    """Sarathi-Serve: decodes, then ongoing prompt chunks, then new prompts, under one budget."""

    name = "sarathi"
    config_class = SarathiConfig

    def __init__(self, limits, config: SarathiConfig | None = None) -> None:
        super().__init__(limits, config)
        self.watermark_blocks = int(self.config.watermark_ratio * limits.num_kv_blocks)

    def _own_token_budget(self) -> int:
        return self.config.token_budget

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def admission_check(self, request: Request) -> str | None:
        kv = self.kv_cache
        if kv.blocks_for(request.num_prompt_tokens) > kv.num_blocks - self.watermark_blocks:
            return (
                f"prompt of {request.num_prompt_tokens} tokens needs {kv.blocks_for(request.num_prompt_tokens)} "
                f"KV blocks; the cache has {kv.num_blocks} less a watermark of {self.watermark_blocks}"
            )
        return None

    def _schedule(self, now_s: float) -> SchedulerDecision:
        decision = SchedulerDecision()
        budget = self.token_budget
        # 1. decodes first
        budget, prefilling = self._schedule_decodes_first(budget, decision)
        # 2. ongoing prompt chunks (their blocks are reserved; a preempted one is gone)
        for request in prefilling:
            if budget <= 0:
                break
            if request.status != request.status.RUNNING:
                continue
            num_new = min(request.num_pending_tokens, budget)
            if not self._allocate(request, num_new, decision):  # cannot happen: reserved at admission
                raise RuntimeError(f"sarathi: request {request.request_id} lost its prompt reservation")
            decision.add(request, num_new)
            budget -= num_new
        # 3. new prompts, whole-prompt KV reserved
        waiting = self.waiting
        kv = self.kv_cache
        max_seqs = self.max_num_seqs
        while waiting and budget > 0 and len(self.running) < max_seqs:
            request = waiting[0]
            prompt = request.num_pending_tokens  # prompt, plus generated tokens after a preemption
            need = kv.blocks_for(prompt)
            if need > kv.num_blocks - self.watermark_blocks:
                waiting.popleft()
                self._reject(request, f"recompute of {prompt} tokens needs more KV than the cache less its watermark", decision)
                continue
            if kv.num_free_blocks - need < self.watermark_blocks:
                break
            waiting.popleft()
            reserved = kv.reserve(request.request_id, prompt)
            if reserved:
                decision.kv_reservations[request.request_id] = reserved
            num_new = min(prompt, budget)
            self._allocate(request, num_new, decision)
            self._admit(request)
            decision.add(request, num_new)
            budget -= num_new
        return decision

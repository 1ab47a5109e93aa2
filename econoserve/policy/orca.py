"""Orca: iteration-level batching with a maximum-length KV reservation per request.

Rules from Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative
Models", OSDI 2022, Section 4.2 and Algorithm 1 (``Select``): requests are taken in arrival order
(FCFS) up to ``max_num_seqs`` (the paper's maximum batch size); a request entering the batch for the first time reserves KV slots
for its maximum length (``max_tokens``) and is admitted only if the reserved total stays within
the cache; running requests are always in the batch. With the whole maximum length reserved up
front a request never runs out of KV, so Orca never preempts. Selective batching lets one
iteration mix whole prompts (not chunked) with decodes.

Reconstruction choices (named knobs): the reserved maximum length is the model's context
(``max_model_len``) unless ``max_tokens_per_request`` is set, as the paper's clients ask for the
maximum; ``max_num_seqs`` defaults to 256 (as vLLM's) so batch sizes compare; ``token_budget``
(``None`` = no cap, as in Orca) can bound a step's tokens, and an executor's caps always do. With the
default reservation nothing can outgrow it; with a smaller ``max_tokens_per_request`` a request
that outgrows its reservation takes blocks from the free pool and, if none is free, the most
recently admitted request is preempted by recompute (Orca itself would cap the output).
"""

from __future__ import annotations

from dataclasses import dataclass

from econoserve.policy.base import Policy, require_positive
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.request import Request


@dataclass(frozen=True)
class OrcaConfig:
    """Knobs of the Orca policy.

    max_num_seqs:
        Most requests in a step, the paper's maximum batch size [sequences].
    max_tokens_per_request:
        KV reserved per request at admission [tokens]; ``None`` = the model's ``max_model_len``.
    token_budget:
        Optional cap on a step's tokens [tokens]; ``None`` = no cap (Orca has none).
    """

    max_num_seqs: int = 256
    max_tokens_per_request: int | None = None
    token_budget: int | None = None

    def __post_init__(self) -> None:
        require_positive(self, "max_num_seqs", "max_tokens_per_request", "token_budget")


class OrcaPolicy(Policy):
    """Orca: FCFS admission with maximum-length reservation; never preempts."""

    name = "orca"
    config_class = OrcaConfig

    def __init__(self, limits, config: OrcaConfig | None = None) -> None:
        super().__init__(limits, config)
        self.reserve_tokens = self.config.max_tokens_per_request or limits.max_model_len

    def _own_token_budget(self) -> int | None:
        return self.config.token_budget

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def admission_check(self, request: Request) -> str | None:
        kv = self.kv_cache
        if kv.blocks_for(self.reserve_tokens) > kv.num_blocks:
            return (
                f"Orca reserves {self.reserve_tokens} tokens ({kv.blocks_for(self.reserve_tokens)} blocks) "
                f"per request; the cache has {kv.num_blocks} blocks"
            )
        if request.num_prompt_tokens >= self.reserve_tokens:
            return f"prompt of {request.num_prompt_tokens} tokens leaves no room in Orca's {self.reserve_tokens}-token reservation"
        cap = self.token_budget
        if cap is not None and request.num_prompt_tokens > cap:
            return f"prompt of {request.num_prompt_tokens} tokens exceeds the token budget {cap}"
        return None

    def _schedule(self, now_s: float) -> SchedulerDecision:
        decision = SchedulerDecision()
        cap = self.token_budget
        budget = cap if cap is not None else 1 << 62
        running = self.running
        i = 0
        while i < len(running):
            request = running[i]
            num_new = request.num_pending_tokens
            if num_new > budget:
                break
            # Within the reservation this always succeeds; only a request that outgrows a
            # reservation smaller than the context can fail, and then it preempts (see docstring).
            if not self._allocate_or_preempt(request, num_new, decision):
                break
            decision.add(request, num_new)
            budget -= num_new
            i += 1
        if decision.preempted:
            return decision
        waiting = self.waiting
        kv = self.kv_cache
        max_seqs = self.max_num_seqs
        while waiting and len(self.running) < max_seqs:
            request = waiting[0]
            num_new = request.num_pending_tokens
            if num_new > budget:
                break
            reserved = kv.reserve(request.request_id, self.reserve_tokens)
            if reserved is None:
                break
            waiting.popleft()
            if reserved:
                decision.kv_reservations[request.request_id] = reserved
            self._allocate(request, num_new, decision)
            self._admit(request)
            decision.add(request, num_new)
            budget -= num_new
        return decision

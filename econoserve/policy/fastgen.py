"""DeepSpeed-FastGen: Dynamic SplitFuse, a fixed forward size filled by decodes and prompt pieces.

Rules from Holmes et al., "DeepSpeed-FastGen: High-throughput Text Generation for LLMs via MII
and DeepSpeed-Inference", arXiv 2401.08671, Section 3 (Dynamic SplitFuse), and DeepSpeed-MII's
ragged batching scheduler (``mii/batching/ragged_batching.py``): every forward pass aims at the
same token count; running generations contribute one token each, then prompts fill the rest:
long prompts are split into pieces over several passes, short prompts are composed (fused) so
the pass reaches the target exactly. KV blocks are allocated per piece, on demand
(DeepSpeed-Inference's ragged KV cache), FCFS.

Reconstruction choices (named knobs): ``token_budget = 768`` (MII's ``max_ragged_batch_size``
default), ``max_num_seqs = 512`` (MII's ``max_ragged_sequence_count``). When a running
generation cannot get a KV block, the most recently admitted running request is preempted by
recompute (MII would stall or fail; recompute keeps the comparison with vLLM like for like).
Ongoing prompt pieces come before new prompts, in admission order.
"""

from __future__ import annotations

from dataclasses import dataclass

from econoserve.policy.base import Policy, require_positive
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.request import Request


@dataclass(frozen=True)
class FastGenConfig:
    """Knobs of the DeepSpeed-FastGen policy.

    token_budget:
        The fixed forward size: tokens per step, decodes + prompt pieces [tokens].
    max_num_seqs:
        Most requests in a step [sequences].
    """

    token_budget: int = 768
    max_num_seqs: int = 512

    def __post_init__(self) -> None:
        require_positive(self, "token_budget", "max_num_seqs")


class FastGenPolicy(Policy):
    """DeepSpeed-FastGen: decodes, then prompt pieces (ongoing, then new) up to the forward size."""

    name = "fastgen"
    config_class = FastGenConfig

    def _own_token_budget(self) -> int:
        return self.config.token_budget

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def _schedule(self, now_s: float) -> SchedulerDecision:
        decision = SchedulerDecision()
        budget = self.token_budget
        budget, prefilling = self._schedule_decodes_first(budget, decision)
        for request in prefilling:
            if budget <= 0:
                break
            if request.status != request.status.RUNNING:
                continue
            num_new = min(request.num_pending_tokens, budget)
            if not self._allocate_piece(request, num_new, decision):
                continue
            decision.add(request, num_new)
            budget -= num_new
        if decision.preempted:
            return decision
        waiting = self.waiting
        max_seqs = self.max_num_seqs
        while waiting and budget > 0 and len(self.running) < max_seqs:
            request = waiting[0]
            num_new = min(request.num_pending_tokens, budget)
            if not self._allocate(request, num_new, decision):
                break
            waiting.popleft()
            self._admit(request)
            decision.add(request, num_new)
            budget -= num_new
        return decision

    def _allocate_piece(self, request: Request, num_new: int, decision: SchedulerDecision) -> bool:
        """Blocks for a prompt piece; if none are free, preempt the most recently admitted
        request that is not already in this step's batch (possibly this one). False if the piece
        cannot run this step."""
        running = self.running
        scheduled: set[int] | None = None
        while not self._allocate(request, num_new, decision):
            victim = running[-1]
            if victim is not request:
                if scheduled is None:
                    scheduled = {r.request_id for r in decision.scheduled}
                if victim.request_id in scheduled:
                    return False
            running.pop()
            self._preempt(victim, decision)
            if victim is request:
                return False
        return True

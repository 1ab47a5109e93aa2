"""What a policy decides for one engine step, and the counters it keeps about itself."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from econoserve.policy.request import Request


class SchedulerDecision:
    """The batch of one step (tokens, blocks), as vLLM's ``SchedulerOutput`` describes it.

    ``scheduled`` and ``num_scheduled_tokens`` are parallel lists: each scheduled request and the
    tokens it computes this step (a prefill chunk, a whole prompt, or 1 for a decode). Preempted
    requests lost their KV this step and went back to the waiting queue; rejected requests were
    refused for good, with a reason. ``kv_allocations`` / ``kv_reservations`` map request ids to
    the blocks newly allocated / reserved for them this step.

    ``invoked`` says whether the policy's decision logic ran (an event-driven policy may repeat a
    standing decision without being invoked).
    """

    __slots__ = (
        "scheduled",
        "num_scheduled_tokens",
        "num_prefill_tokens",
        "num_decode_tokens",
        "num_prefill_requests",
        "num_context_tokens",
        "num_attention_pairs",
        "preempted",
        "rejected",
        "kv_allocations",
        "kv_reservations",
        "invoked",
    )

    def __init__(self) -> None:
        self.scheduled: list[Request] = []
        self.num_scheduled_tokens: list[int] = []
        self.num_prefill_tokens = 0
        """Prompt or recomputed tokens in the batch [tokens]."""
        self.num_decode_tokens = 0
        """Decode tokens in the batch, one per decoding request [tokens]."""
        self.num_prefill_requests = 0
        self.num_context_tokens = 0
        """KV tokens the batch's attention reads: per request, cached + new [tokens]."""
        self.num_attention_pairs = 0.0
        """Query-key pairs of the batch's (causal) attention, summed over requests."""
        self.preempted: list[Request] = []
        self.rejected: list[tuple[Request, str]] = []
        self.kv_allocations: dict[int, int] = {}
        self.kv_reservations: dict[int, int] = {}
        self.invoked = True

    def add(self, request: Request, num_tokens: int) -> None:
        """Schedule ``num_tokens`` tokens of ``request`` (call before its counters advance)."""
        computed = request.num_computed_tokens
        self.scheduled.append(request)
        self.num_scheduled_tokens.append(num_tokens)
        if request.num_output_tokens > 0 and computed == request.num_prompt_tokens + request.num_output_tokens - 1:
            self.num_decode_tokens += 1
        else:
            self.num_prefill_tokens += num_tokens
            self.num_prefill_requests += 1
        self.num_context_tokens += computed + num_tokens
        self.num_attention_pairs += num_tokens * (computed + (num_tokens + 1) * 0.5)

    def add_decodes(self, requests: Iterable[Request]) -> None:
        """:meth:`add` of one token for each of ``requests`` in turn, in one call (the decode pass
        of an engine step): the same lists and totals, the float sum in the same order."""
        scheduled, tokens = self.scheduled, self.num_scheduled_tokens
        decode, context, pairs = self.num_decode_tokens, self.num_context_tokens, self.num_attention_pairs
        for request in requests:
            computed = request.num_computed_tokens
            output = request.num_output_tokens
            if not (output > 0 and computed == request.num_prompt_tokens + output - 1):  # a one-token chunk
                self.num_decode_tokens, self.num_context_tokens, self.num_attention_pairs = decode, context, pairs
                self.add(request, 1)
                decode, context, pairs = self.num_decode_tokens, self.num_context_tokens, self.num_attention_pairs
                continue
            scheduled.append(request)
            tokens.append(1)
            decode += 1
            context += computed + 1
            pairs += computed + 1.0  # num_tokens * (computed + (num_tokens + 1) * 0.5) with one token
        self.num_decode_tokens, self.num_context_tokens, self.num_attention_pairs = decode, context, pairs

    # ------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> int:
        """All tokens computed in the step [tokens]."""
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def num_decode_requests(self) -> int:
        return self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def prefill_chunks(self) -> dict[int, int]:
        """request_id -> prefill tokens this step, for requests that are prefilling.

        Valid until the step's counters are applied (see :meth:`Policy.update_from_output`).
        """
        return {
            r.request_id: n
            for r, n in zip(self.scheduled, self.num_scheduled_tokens)
            if not r.is_decoding
        }

    def decodes(self) -> list[int]:
        """Request ids that decode one token this step (valid until counters are applied)."""
        return [r.request_id for r in self.scheduled if r.is_decoding]

    def __repr__(self) -> str:
        return (
            f"SchedulerDecision(requests={len(self.scheduled)}, prefill={self.num_prefill_tokens}, "
            f"decode={self.num_decode_tokens}, preempted={len(self.preempted)}, rejected={len(self.rejected)})"
        )


@dataclass
class SchedulerStats:
    """How often the policy's decision logic ran and how long it took [s of wall time]."""

    invocations: int = 0
    wall_time_s: float = 0.0
    preemptions: int = 0
    rejections: int = 0
    skipped_steps: int = 0
    """Steps advanced in bulk (see :meth:`Policy.steady_decode_steps`); they count as invocations
    for a policy that decides every step, and their wall time is the bulk update's."""
    extra: dict[str, float] = field(default_factory=dict)

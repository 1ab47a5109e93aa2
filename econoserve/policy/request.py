"""The request object a scheduling policy works with: a few token counters, no simulator state.

Token accounting follows vLLM v1 (``vllm/v1/request.py``): a request holds ``num_tokens`` =
prompt + generated tokens; ``num_computed_tokens`` of them have their keys/values in the KV cache.
A step computes ``num_tokens - num_computed_tokens`` pending tokens (a whole prompt, a chunk of
it, or one decode token); when a step brings ``num_computed_tokens`` up to ``num_tokens`` the model
samples one new token, so ``num_output_tokens`` grows by one. The last sampled token is never
written to the KV cache, so a request that ends with ``n`` output tokens peaks at
``prompt + n - 1`` cached tokens.

Preemption by recompute (vLLM's default) frees the request's KV and resets
``num_computed_tokens`` to 0; its next prefill recomputes the prompt *and* the tokens already
generated (``num_tokens`` of them), then sampling continues where it stopped.

A policy sees ``predicted_output_tokens`` (a predictor's guess, or ``None``; the executor may
refine it once from the tokens generated so far, at ``refine_after_tokens`` known at arrival),
optionally its
``predicted_output_quantiles`` (the predicted distribution), and never the true
response length: only the executor (simulator or real engine) knows when a request stops.
"""

from __future__ import annotations

import enum


class RequestStatus(enum.IntEnum):
    """Where a request is in its life."""

    WAITING = 0
    """Queued: never started, or preempted and waiting to be recomputed."""
    RUNNING = 1
    """Admitted: holds KV and is scheduled in steps (prefill chunks or decodes)."""
    FINISHED = 2
    """Produced its last token; its KV was freed."""
    REJECTED = 3
    """Refused for good (can never fit); carries a reason."""


class Request:
    """One request as a scheduler sees it (tokens, seconds).

    Attributes
    ----------
    request_id:
        The trace's id (unique).
    arrival_time_s:
        When the request arrived [s].
    num_prompt_tokens:
        Prompt length [tokens].
    predicted_output_tokens:
        Predicted response length [tokens], or ``None`` where no prediction is available.
    predicted_output_quantiles:
        The predicted distribution of the response length as ``K`` equally likely lengths
        [tokens] (the ``(i + 0.5) / K`` quantiles, sorted), or ``None`` (a point prediction only).
    refine_after_tokens:
        Tokens generated at which the executor will refine ``predicted_output_tokens`` [tokens]
        (it has a refined model; :meth:`~econoserve.policy.Policy.refine_prediction`), known at
        arrival, or ``None`` (it never will).
    refined_after_tokens:
        Tokens generated when the executor refined ``predicted_output_tokens`` from the tokens
        so far (:meth:`~econoserve.policy.Policy.refine_prediction`), or ``None`` (the
        prompt-only prediction).
    num_output_tokens:
        Tokens generated so far [tokens].
    num_computed_tokens:
        Tokens whose KV is in the cache [tokens].
    num_preemptions:
        How many times the request was preempted (KV freed, to be recomputed).
    status:
        A :class:`RequestStatus`.
    admission_order:
        Sequence number given when the request last entered the running set (a larger number
        means admitted more recently); policies use it to pick preemption victims.
    index:
        The executor's dense index for the request (row in its tables); opaque to policies.
    """

    __slots__ = (
        "request_id",
        "arrival_time_s",
        "num_prompt_tokens",
        "predicted_output_tokens",
        "predicted_output_quantiles",
        "refine_after_tokens",
        "refined_after_tokens",
        "num_output_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "status",
        "admission_order",
        "index",
    )

    def __init__(
        self,
        request_id: int,
        arrival_time_s: float,
        num_prompt_tokens: int,
        predicted_output_tokens: int | None = None,
        index: int = -1,
        predicted_output_quantiles: tuple[int, ...] | None = None,
        refine_after_tokens: int | None = None,
    ) -> None:
        if num_prompt_tokens <= 0:
            raise ValueError(f"request {request_id}: num_prompt_tokens must be > 0, got {num_prompt_tokens}")
        self.request_id = request_id
        self.arrival_time_s = arrival_time_s
        self.num_prompt_tokens = num_prompt_tokens
        self.predicted_output_tokens = predicted_output_tokens
        self.predicted_output_quantiles = predicted_output_quantiles
        self.refine_after_tokens = refine_after_tokens
        self.refined_after_tokens: int | None = None
        self.num_output_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.admission_order = -1
        self.index = index

    # ------------------------------------------------------------------ token views
    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens [tokens]."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute before the next token can be sampled [tokens]."""
        return self.num_prompt_tokens + self.num_output_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True when the next step is a decode (one pending token after a finished prefill)."""
        return self.num_output_tokens > 0 and self.num_computed_tokens == self.num_tokens - 1

    @property
    def is_prefilling(self) -> bool:
        """True when the next step computes prompt (or recomputed) tokens."""
        return not self.is_decoding

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"predicted={self.predicted_output_tokens}, status={self.status.name})"
        )

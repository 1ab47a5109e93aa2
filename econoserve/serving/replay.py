"""What the replay sends and what it measures, independent of how requests reach vLLM.

A :class:`~econoserve.workload.trace.Trace` becomes :class:`ReplayRequest` objects: the trace's
arrival time [s], a prompt of ``prompt_tokens`` random token ids (seeded per request, so the same
trace and seed send the same prompts), and ``max_tokens = output_tokens`` with ``ignore_eos``, so
every request generates exactly its trace length whatever the model says.

While a request runs, a :class:`RequestTimer` notes when its tokens arrive (on the replay clock:
seconds since the replay started). Both executors (in-process engine and HTTP client) fill the
same timers, so their results have the same shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from econoserve.errors import UserError
from econoserve.workload.trace import Trace

#: Prefix of the request ids sent to vLLM; the trace's request id follows it.
REQUEST_ID_PREFIX = "trace-req-"
_REQUEST_ID_PATTERN = re.compile(rf"{REQUEST_ID_PREFIX}(\d+)(?=-|$)")

#: Token ids below this are reserved by most vocabularies (pad, bos, eos, unk).
_FIRST_PROMPT_TOKEN_ID = 4


@dataclass(frozen=True)
class ReplayRequest:
    """One trace request as sent to the engine."""

    request_id: int
    arrival_time_s: float
    """Arrival time [s] relative to the replay start (the trace's, times the time scale)."""
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    """Tokens to generate [tokens]: the trace's ``output_tokens`` (``ignore_eos``)."""
    predicted_output_tokens: int | None = None
    """The trace's predicted response length [tokens], where it has one."""

    @property
    def engine_request_id(self) -> str:
        """The id vLLM sees (it appends its own suffix internally)."""
        return f"{REQUEST_ID_PREFIX}{self.request_id}"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def trace_request_id(engine_request_id: str) -> int | None:
    """The trace request id inside an id vLLM reports (offline or server form), or ``None``."""
    match = _REQUEST_ID_PATTERN.search(engine_request_id)
    return int(match.group(1)) if match else None


def make_replay_requests(
    trace: Trace,
    vocab_size: int,
    seed: int = 0,
    max_model_len: int | None = None,
    time_scale: float = 1.0,
) -> list[ReplayRequest]:
    """The trace as replay requests with seeded random prompts of the trace's lengths.

    ``time_scale`` multiplies the arrival times (0.5 = twice the rate, 0 = all at once); the
    scaled times are the requests' arrivals everywhere after this (JCT, TTFT).

    Raises :class:`UserError` naming the first request whose prompt + output exceeds
    ``max_model_len`` [tokens] (vLLM would reject it at submission).
    """
    if time_scale < 0:
        raise UserError(f"time scale {time_scale} must be >= 0")
    if vocab_size <= _FIRST_PROMPT_TOKEN_ID:
        raise UserError(f"vocab_size {vocab_size} is too small for random prompts")
    frame = trace.requests
    if max_model_len is not None:
        too_long = frame["prompt_tokens"] + frame["output_tokens"] > max_model_len
        if too_long.any():
            row = frame[too_long].iloc[0]
            raise UserError(
                f"trace request {int(row.request_id)}: prompt {int(row.prompt_tokens)} + output "
                f"{int(row.output_tokens)} tokens exceed max_model_len {max_model_len} "
                f"({int(too_long.sum())} such request(s)); raise --max-model-len or filter the trace"
            )
    predicted = frame["predicted_output_tokens"] if trace.has_predictions else None
    requests = []
    for index, row in enumerate(frame.itertuples(index=False)):
        rng = np.random.default_rng([seed, int(row.request_id)])
        prompt = rng.integers(_FIRST_PROMPT_TOKEN_ID, vocab_size, size=int(row.prompt_tokens))
        requests.append(
            ReplayRequest(
                request_id=int(row.request_id),
                arrival_time_s=float(row.arrival_time_s) * time_scale,
                prompt_token_ids=tuple(int(t) for t in prompt),
                max_tokens=int(row.output_tokens),
                predicted_output_tokens=None if predicted is None else int(predicted.iloc[index]),
            )
        )
    return requests


@dataclass
class RequestTimer:
    """Token arrival times of one request on the replay clock [s]."""

    request: ReplayRequest
    submit_time_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_time_s: float | None = None
    error: str | None = None

    def submitted(self, now_s: float) -> None:
        self.submit_time_s = now_s

    def tokens(self, count: int, now_s: float) -> None:
        """``count`` new output tokens arrived at ``now_s`` (one chunk/step may carry several)."""
        self.token_times_s.extend([now_s] * count)

    def finished(self, now_s: float) -> None:
        self.finish_time_s = now_s

    def failed(self, message: str, now_s: float) -> None:
        self.error = message
        self.finish_time_s = now_s

    @property
    def generated_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_time_s is not None

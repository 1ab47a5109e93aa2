"""Per-iteration records from inside vLLM's engine: what each step scheduled, how long it took.

:class:`RecordingScheduler` is vLLM's own v1 ``Scheduler`` with no change of policy; it times
``schedule()`` and the whole step (``schedule()`` to the end of ``update_from_output()``, which
spans the model's forward pass) and notes the batch's composition and the KV cache's occupancy.
The recording itself is :class:`IterationRecordingMixin`, which wraps any scheduler class; the
EconoServe scheduler class puts it first in its bases to get the same records.

The records go to a JSON-lines file named in vLLM's ``additional_config``::

    LLM(..., scheduler_cls=RecordingScheduler,
        additional_config={"econoserve": {"iteration_log": "/run/iterations.jsonl"}})
    vllm serve MODEL --scheduler-cls econoserve.serving.recording.RecordingScheduler \\
        --additional-config '{"econoserve": {"iteration_log": "/run/iterations.jsonl"}}'

That works the same whether the engine core runs in this process or in vLLM's engine-core
process. Each line is one :class:`IterationRecord` (``"kind": "iteration"``) or one
:class:`PreemptionRecord` (``"kind": "preemption"``). Times are ``time.monotonic()`` [s], one
clock for every process on the machine, so the harness can put them on its replay clock.

This module imports vLLM; import it only where vLLM is installed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

#: Key of this package's section in vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "econoserve"
#: Dotted path of :class:`RecordingScheduler`, for ``--scheduler-cls``.
RECORDING_SCHEDULER = "econoserve.serving.recording.RecordingScheduler"


@dataclass(frozen=True)
class IterationRecord:
    """One engine step: the batch it ran and the state it left (tokens, blocks, seconds)."""

    iteration: int
    start_monotonic_s: float
    """When ``schedule()`` was entered [s, ``time.monotonic()``]."""
    duration_s: float
    """``schedule()`` entry to ``update_from_output()`` exit [s]: scheduling + forward + update."""
    schedule_time_s: float
    """Wall time inside ``schedule()`` [s]."""
    update_time_s: float
    """Wall time inside ``update_from_output()`` [s]."""
    prefill_tokens: int
    """Prompt (or recomputed) tokens computed this step [tokens]."""
    decode_tokens: int
    """Generation tokens computed this step, one per decoding request [tokens]."""
    context_tokens: int
    """Tokens already in KV cache that the step's attention reads, summed over requests [tokens]."""
    num_prefill_requests: int
    num_decode_requests: int
    num_running: int
    """Requests in the running queue after scheduling."""
    num_waiting: int
    """Requests in the waiting queue after scheduling (new and preempted)."""
    num_preempted: int
    """Requests preempted (blocks freed, to be recomputed) while scheduling this step."""
    kv_blocks_used: int
    """KV blocks held by requests after scheduling [blocks]."""
    kv_blocks_total: int
    """Usable KV blocks (the pool less vLLM's null block) [blocks]."""
    block_size: int
    """Tokens per KV block [tokens]."""
    kv_blocks_reserved: int = 0
    """KV blocks the scheduler has set aside for requests' future tokens, not yet holding any
    [blocks]: a policy scheduler's ``policy_kv_blocks_reserved()`` (EconoServe's up-front
    reservations); 0 under vLLM's on-demand allocation."""
    kv_tokens_stored: int = 0
    """Tokens whose KV the running requests hold once the step ran (their computed tokens) [tokens]."""
    token_budget: int = 0
    """The engine's per-step token cap, ``max_num_batched_tokens`` [tokens]."""


@dataclass(frozen=True)
class PreemptionRecord:
    """A request preempted by the scheduler (its KV blocks freed for recomputation)."""

    request_id: str
    """vLLM's internal request id (the client's id plus a random suffix)."""
    iteration: int
    monotonic_s: float


class IterationLog:
    """Where records go: an in-memory list, and a JSON-lines file if a path is configured."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.iterations: list[IterationRecord] = []
        self.preemptions: list[PreemptionRecord] = []
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def add(self, record: IterationRecord | PreemptionRecord) -> None:
        if isinstance(record, IterationRecord):
            self.iterations.append(record)
            kind = "iteration"
        else:
            self.preemptions.append(record)
            kind = "preemption"
        if self._file is not None:
            self._file.write(json.dumps({"kind": kind, **asdict(record)}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_iteration_log(path: str | Path) -> tuple[list[IterationRecord], list[PreemptionRecord]]:
    """Read a JSON-lines log back; a torn last line (engine killed mid-write) is ignored."""
    iterations: list[IterationRecord] = []
    preemptions: list[PreemptionRecord] = []
    path = Path(path)
    if not path.is_file():
        return iterations, preemptions
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = row.pop("kind", None)
        if kind == "iteration":
            iterations.append(IterationRecord(**row))
        elif kind == "preemption":
            preemptions.append(PreemptionRecord(**row))
    return iterations, preemptions


def econoserve_options(vllm_config: Any) -> dict[str, Any]:
    """This package's section of ``vllm_config.additional_config`` (empty if none)."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    section = additional.get(ADDITIONAL_CONFIG_KEY, {}) if isinstance(additional, dict) else {}
    return dict(section) if isinstance(section, dict) else {}


class _PendingStep:
    """What ``schedule()`` saw, kept until ``update_from_output()`` closes the step."""

    __slots__ = ("output", "start", "schedule_time", "fields")

    def __init__(self, output: SchedulerOutput, start: float, schedule_time: float, fields: dict[str, int]):
        self.output = output
        self.start = start
        self.schedule_time = schedule_time
        self.fields = fields


class IterationRecordingMixin:
    """Records one :class:`IterationRecord` per step around any vLLM v1 ``Scheduler`` subclass.

    Put it first in the bases so that it wraps the policy's own ``schedule()``::

        class EconoServeScheduler(IterationRecordingMixin, EconoServeCoreScheduler): ...

    Works with synchronous scheduling only (``schedule()`` and ``update_from_output()``
    alternate), which is vLLM's default on CPU; the harness turns async scheduling off on GPU.
    """

    # Provided by the vLLM Scheduler this is mixed into.
    vllm_config: Any
    requests: dict[str, Request]
    running: list[Request]
    waiting: Any
    kv_cache_manager: Any
    block_size: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iteration_log = IterationLog(econoserve_options(self.vllm_config).get("iteration_log"))
        self._iteration = 0
        self._pending: _PendingStep | None = None

    # ------------------------------------------------------------------ vLLM hooks
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        start = time.monotonic()
        output = super().schedule(*args, **kwargs)
        schedule_time = time.monotonic() - start
        for request_id in output.preempted_req_ids or ():
            self.iteration_log.add(PreemptionRecord(request_id, self._iteration, start))
        if output.total_num_scheduled_tokens > 0:  # vLLM runs no model step for an empty batch
            self._pending = _PendingStep(output, start, schedule_time, self._batch_composition(output))
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any):
        update_start = time.monotonic()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        end = time.monotonic()
        pending, self._pending = self._pending, None
        if pending is not None and pending.output is scheduler_output:
            self.iteration_log.add(
                IterationRecord(
                    iteration=self._iteration,
                    start_monotonic_s=pending.start,
                    duration_s=end - pending.start,
                    schedule_time_s=pending.schedule_time,
                    update_time_s=end - update_start,
                    **pending.fields,
                )
            )
            self._iteration += 1
        return outputs

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.iteration_log.close()

    # ------------------------------------------------------------------ measurements
    def _batch_composition(self, output: SchedulerOutput) -> dict[str, int]:
        """Token and request counts of a scheduled batch, and KV occupancy after scheduling."""
        prefill_tokens = decode_tokens = context_tokens = 0
        num_prefill = num_decode = 0
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            computed_before = request.num_computed_tokens - num_tokens
            context_tokens += computed_before
            if _is_decode_step(request, computed_before):
                decode_tokens += num_tokens
                num_decode += 1
            else:
                prefill_tokens += num_tokens
                num_prefill += 1
        block_pool = self.kv_cache_manager.block_pool
        usable_blocks = block_pool.num_gpu_blocks - 1  # vLLM keeps one null block
        return {
            "prefill_tokens": prefill_tokens,
            "decode_tokens": decode_tokens,
            "context_tokens": context_tokens,
            "num_prefill_requests": num_prefill,
            "num_decode_requests": num_decode,
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preempted": len(output.preempted_req_ids or ()),
            "kv_blocks_used": usable_blocks - block_pool.get_num_free_blocks(),
            "kv_blocks_total": usable_blocks,
            "block_size": int(self.block_size),
            "kv_blocks_reserved": int(getattr(self, "policy_kv_blocks_reserved", lambda: 0)()),
            "kv_tokens_stored": sum(r.num_computed_tokens for r in self.running),
            "token_budget": int(self.max_num_scheduled_tokens),
        }


def _is_decode_step(request: Request, computed_before: int) -> bool:
    """A step is a decode step when the request has output and only its last token is new."""
    return len(request.output_token_ids) > 0 and computed_before >= request.num_tokens - 1


class RecordingScheduler(IterationRecordingMixin, Scheduler):
    """vLLM's default scheduler, unchanged in policy, recording one :class:`IterationRecord` per step."""

"""What a policy decided on a real engine, as a replayable event log, and its pure-Python replay.

The vLLM adapter (:mod:`econoserve.serving.scheduler`) can record every interaction it has with
its policy as a flat stream of events, in the order they happened:

* :class:`LogHeader` - the policy's name, its resolved configuration and the engine limits;
* :class:`ArrivalRecord` - a request handed to ``policy.add_request`` (and the policy's answer);
* :class:`StepRecord` - one ``policy.schedule(now_s)``: the time it was given, and what the engine
  **executed**: the (request, tokens) pairs read back from the ``SchedulerOutput`` that went to
  the model runner, in batch order, plus the requests preempted and rejected;
* :class:`UpdateRecord` - the end of that step: the requests the engine finished (vLLM's own stop
  check: ``max_tokens``, EOS, ``max_model_len``);
* :class:`RefineRecord` - a refined prediction handed to ``policy.refine_prediction`` after that
  update (a request that reached ``k`` generated tokens unfinished; :mod:`econoserve.serving.prediction`);
* :class:`AbortRecord` - a request removed from outside (client abort, engine error).

:func:`replay_decision_log` re-runs a fresh policy of the same name, configuration and limits
over the same arrivals, times, refined predictions and aborts, with a pure-Python executor in
place of vLLM: a request finishes when it has produced ``max_tokens`` tokens, as in the simulator. At every step it checks
that the policy, deciding on its own, asks for exactly what the engine executed, and that the
executor's finishes are the engine's. A disagreement means the adapter executed something other
than the policy's decision, or vLLM's token counters drifted from the policy's, or the policy is
not deterministic. The module imports no vLLM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Union

from econoserve.policy import EngineLimits, Policy, Request, SchedulerDecision, make_policy


@dataclass(frozen=True)
class LogHeader:
    """The policy and engine a log was recorded with."""

    policy: str
    policy_config: dict
    """The policy's resolved configuration (every field), as :meth:`Policy.describe` gives it."""
    limits: dict
    """:class:`~econoserve.policy.EngineLimits` fields."""
    predictions: str
    """Where predicted lengths came from: ``request``, ``oracle`` or ``none``."""
    refine_after_tokens: int | None = None
    """``k`` of the engine's refined model [tokens], or ``None`` without refinement."""


@dataclass(frozen=True)
class ArrivalRecord:
    """A request handed to the policy."""

    policy_request_id: int
    engine_request_id: str
    arrival_time_s: float
    """On the adapter's ``time.monotonic()`` clock [s]."""
    num_prompt_tokens: int
    predicted_output_tokens: int | None
    max_tokens: int
    """The request's ``max_tokens`` [tokens]: its true length when it runs with ``ignore_eos``."""
    rejection: str | None
    """The policy's rejection reason, or ``None`` if it queued the request."""
    predicted_output_quantiles: tuple[int, ...] | None = None
    """The predicted length distribution [tokens], or ``None``."""


@dataclass(frozen=True)
class StepRecord:
    """One scheduling pass and the batch the engine executed for it."""

    step: int
    now_s: float
    """The time given to ``policy.schedule`` [s, ``time.monotonic()``]."""
    scheduled: tuple[tuple[int, int], ...]
    """(policy request id, tokens) in the order of the executed batch."""
    preempted: tuple[int, ...]
    rejected: tuple[int, ...]


@dataclass(frozen=True)
class UpdateRecord:
    """The end of a step: the requests whose last token it produced."""

    step: int
    finished: tuple[int, ...]


@dataclass(frozen=True)
class RefineRecord:
    """A refined prediction handed to the policy at the end of a step (after its update)."""

    step: int
    policy_request_id: int
    num_output_tokens: int
    """Tokens the request had generated when refined [tokens] (the model's ``k``)."""
    predicted_output_tokens: int
    """The refined predicted length [tokens]."""


@dataclass(frozen=True)
class AbortRecord:
    """A request removed from outside the policy (client abort, engine error)."""

    policy_request_id: int


DecisionRecord = Union[LogHeader, ArrivalRecord, StepRecord, UpdateRecord, RefineRecord, AbortRecord]

_KINDS: dict[str, type] = {
    "header": LogHeader,
    "arrival": ArrivalRecord,
    "step": StepRecord,
    "update": UpdateRecord,
    "refine": RefineRecord,
    "abort": AbortRecord,
}
_KIND_OF: dict[type, str] = {cls: kind for kind, cls in _KINDS.items()}


class DecisionLog:
    """Records in a JSON-lines file if a path is given (one record per line), and in memory
    (:attr:`records`) if ``keep_in_memory``. With neither it is disabled (:attr:`enabled`)."""

    def __init__(self, path: str | Path | None = None, keep_in_memory: bool = False) -> None:
        self.path = Path(path) if path else None
        self.keep_in_memory = keep_in_memory
        self.records: list[DecisionRecord] = []
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)

    @property
    def enabled(self) -> bool:
        return self.keep_in_memory or self.path is not None

    def add(self, record: DecisionRecord) -> None:
        if self.keep_in_memory:
            self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps({"kind": _KIND_OF[type(record)], **asdict(record)}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_decision_log(path: str | Path) -> list[DecisionRecord]:
    """Read a JSON-lines decision log back; a torn last line (engine killed mid-write) is ignored."""
    records: list[DecisionRecord] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        cls = _KINDS[row.pop("kind")]
        if cls is StepRecord:
            row["scheduled"] = tuple(tuple(pair) for pair in row["scheduled"])
        for name in ("preempted", "rejected", "finished", "predicted_output_quantiles"):
            if row.get(name) is not None:
                row[name] = tuple(row[name])
        records.append(cls(**row))
    return records


# --------------------------------------------------------------------- replay
@dataclass
class ReplayReport:
    """What :func:`replay_decision_log` compared and the first disagreement, if any."""

    num_steps: int = 0
    num_arrivals: int = 0
    num_finished: int = 0
    num_refined: int = 0
    mismatch: str | None = None
    policy: Policy | None = field(default=None, repr=False)

    @property
    def equivalent(self) -> bool:
        return self.mismatch is None


def replay_decision_log(records: Iterable[DecisionRecord]) -> ReplayReport:
    """Re-run the logged policy over the logged arrivals, times and aborts; compare every step.

    The replay's executor finishes a request when it has produced ``max_tokens`` tokens. It stops
    at the first disagreement and describes it in :attr:`ReplayReport.mismatch`.
    """
    records = list(records)
    if not records or not isinstance(records[0], LogHeader):
        raise ValueError("a decision log starts with its header record")
    header = records[0]
    policy = make_policy(header.policy, EngineLimits(**header.limits), dict(header.policy_config))
    report = ReplayReport(policy=policy)
    requests: dict[int, Request] = {}
    max_tokens: dict[int, int] = {}
    aborted: set[int] = set()
    decision: SchedulerDecision | None = None
    for record in records[1:]:
        if isinstance(record, ArrivalRecord):
            request = Request(record.policy_request_id, record.arrival_time_s, record.num_prompt_tokens,
                              record.predicted_output_tokens, index=record.policy_request_id,
                              predicted_output_quantiles=record.predicted_output_quantiles,
                              refine_after_tokens=header.refine_after_tokens)
            requests[record.policy_request_id] = request
            max_tokens[record.policy_request_id] = record.max_tokens
            rejection = policy.add_request(request)
            report.num_arrivals += 1
            if rejection != record.rejection:
                report.mismatch = (
                    f"arrival of request {record.policy_request_id}: the replayed policy answered "
                    f"{rejection!r}, the engine's answered {record.rejection!r}"
                )
                return report
        elif isinstance(record, StepRecord):
            decision = policy.schedule(record.now_s)
            report.num_steps += 1
            mismatch = _compare_step(record, decision)
            if mismatch is not None:
                report.mismatch = mismatch
                return report
        elif isinstance(record, UpdateRecord):
            if decision is None:
                report.mismatch = f"step {record.step}: an update without a step"
                return report
            finished = [r for r in _finished_by_length(decision, max_tokens) if r.request_id not in aborted]
            replayed = tuple(sorted(r.request_id for r in finished))
            if replayed != tuple(sorted(record.finished)):
                report.mismatch = (
                    f"step {record.step}: the replay finished requests {list(replayed)}, the engine "
                    f"finished {sorted(record.finished)}"
                )
                return report
            if decision.scheduled:
                policy.update_from_output(decision, finished)
            report.num_finished += len(finished)
            decision = None
        elif isinstance(record, RefineRecord):
            request = requests[record.policy_request_id]
            if request.num_output_tokens != record.num_output_tokens or request.refined_after_tokens is not None:
                report.mismatch = (
                    f"step {record.step}: the engine refined request {record.policy_request_id} at "
                    f"{record.num_output_tokens} generated tokens; in the replay it has {request.num_output_tokens}"
                    + (" and was refined already" if request.refined_after_tokens is not None else "")
                )
                return report
            policy.refine_prediction(request, record.predicted_output_tokens)
            report.num_refined += 1
        elif isinstance(record, AbortRecord):
            aborted.add(record.policy_request_id)
            policy.abort_request(requests[record.policy_request_id])
        else:
            raise ValueError(f"unexpected record in a decision log: {record!r}")
    return report


def _compare_step(record: StepRecord, decision: SchedulerDecision) -> str | None:
    replayed = tuple(zip((r.request_id for r in decision.scheduled), decision.num_scheduled_tokens))
    if replayed != tuple(record.scheduled):
        return (
            f"step {record.step}: the replayed policy scheduled (request, tokens) {list(replayed)}, "
            f"the engine executed {list(record.scheduled)}"
        )
    preempted = tuple(r.request_id for r in decision.preempted)
    if preempted != tuple(record.preempted):
        return f"step {record.step}: the replay preempted {list(preempted)}, the engine {list(record.preempted)}"
    rejected = tuple(r.request_id for r, _ in decision.rejected)
    if rejected != tuple(record.rejected):
        return f"step {record.step}: the replay rejected {list(rejected)}, the engine {list(record.rejected)}"
    return None


def _finished_by_length(decision: SchedulerDecision, max_tokens: dict[int, int]) -> list[Request]:
    """Requests whose token this step is their ``max_tokens``-th (before counters advance)."""
    finished = []
    for request, num_tokens in zip(decision.scheduled, decision.num_scheduled_tokens):
        if request.num_computed_tokens + num_tokens == request.num_tokens:
            if request.num_output_tokens + 1 == max_tokens[request.request_id]:
                finished.append(request)
    return finished

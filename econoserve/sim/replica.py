"""One simulated engine instance: a policy, a latency model and a step recorder.

A :class:`Replica` owns one policy (its queues and KV cache) on one deployment. The cluster
driver (:mod:`econoserve.sim.cluster`) hands it the requests a router sends it
(:meth:`Replica.add_request`) and calls :meth:`Replica.step` at the time of its next event. One
step asks the policy for a decision, charges the step's time from the latency model, gives every
request whose pending tokens were computed one output token, and ends a request at its *true*
output length (the policy only ever sees the predicted one).

**Skip-ahead** (``skip_ahead``, on by default): after a decode-only step in which nothing was
admitted, preempted or finished, the policy can promise that the next ``k`` steps decode exactly
the same requests (:meth:`~econoserve.policy.Policy.steady_decode_steps`). The replica then
advances those ``k`` steps in bulk (their times still come one by one from the latency model) as
long as no request arrives anywhere in the cluster and none finishes. Results match step-by-step
simulation; only the measured scheduler wall time differs (the bulk update's time is spread over
the skipped steps).

**Rejections** are recorded, never silent: a prompt longer than the model's context, prompt +
output beyond the context (a real engine replaying the trace with ``max_tokens`` = the response
length refuses these too), a request whose KV at full length exceeds the whole cache, and
whatever the policy refuses (its reason).

Per-request outcomes go to a :class:`RequestLedger` shared by every replica of a run (a request
runs on exactly one replica, so its token runs index that replica's steps).
"""

from __future__ import annotations

import warnings
from array import array

import numpy as np

from econoserve.policy import Policy, Request, make_config, make_policy
from econoserve.sim.engine import SimulationConfig, SimulationError, build_setup, policy_overrides
from econoserve.workload.trace import Trace

#: Consecutive empty decisions (with preemptions or rejections) tolerated at one instant before
#: the simulator declares the policy stuck.
MAX_EMPTY_DECISIONS = 10_000


class RequestLedger:
    """The trace's columns and every request's outcome, by trace row, shared by the replicas.

    ``first_token_time_s`` / ``finish_time_s`` [s] are NaN until set; ``reasons`` holds a
    rejection reason or ``""``; ``token_runs`` lists, per request, ``[start, stop)`` pairs of the
    serving replica's step indices in which it produced a token; ``replica`` is the serving
    replica (-1 until routed); ``num_done`` counts finished plus rejected requests.
    """

    def __init__(self, trace: Trace) -> None:
        frame = trace.requests
        n = len(frame)
        self.trace = trace
        self.num_requests = n
        self.arrival_time_s: list[float] = frame["arrival_time_s"].to_numpy(dtype=float).tolist()
        self.prompt_tokens: list[int] = frame["prompt_tokens"].to_numpy(dtype=np.int64).tolist()
        self.output_tokens: list[int] = frame["output_tokens"].to_numpy(dtype=np.int64).tolist()
        self.request_ids: list[int] = frame["request_id"].to_numpy(dtype=np.int64).tolist()
        self.first_token_time_s = [float("nan")] * n
        self.finish_time_s = [float("nan")] * n
        self.reasons = [""] * n
        self.token_runs: list[list[int]] = [[] for _ in range(n)]
        self.requests: list[Request | None] = [None] * n
        self.replica = array("q", [-1]) * n
        self.num_done = 0
        self._predictions: dict[str, list[int | None]] = {}

    def predictions(self, source: str) -> list[int | None]:
        """Predicted output lengths [tokens] by row from ``source`` (``oracle``: the true lengths;
        ``trace``: the trace's column; ``none``); built once per source."""
        if source not in self._predictions:
            frame = self.trace.requests
            if source == "oracle":
                values = frame["output_tokens"].astype(int).tolist()
            elif source == "trace" and self.trace.has_predictions:
                values = frame["predicted_output_tokens"].astype(int).tolist()
            else:
                values = [None] * self.num_requests
            self._predictions[source] = values
        return self._predictions[source]

    def reject(self, row: int, reason: str) -> None:
        self.reasons[row] = reason
        self.num_done += 1


class IterationLog:
    """Per-step columns as typed arrays (8 bytes a value; appended in the hot loop)."""

    COLUMNS = (
        "start_time_s",
        "duration_s",
        "num_prefill_tokens",
        "num_decode_tokens",
        "num_context_tokens",
        "num_prefill_requests",
        "num_preempted",
        "kv_blocks_used",
        "kv_blocks_reserved",
        "kv_tokens_stored",
        "num_running",
        "num_waiting",
        "skipped",
        "scheduler_wall_time_s",
    )

    FLOAT_COLUMNS = ("start_time_s", "duration_s", "scheduler_wall_time_s")

    def __init__(self) -> None:
        for name in self.COLUMNS:
            setattr(self, name, array("d" if name in self.FLOAT_COLUMNS else "q"))

    def __len__(self) -> int:
        return len(self.duration_s)


class Replica:
    """One engine instance of a (possibly heterogeneous) cluster; see the module docstring."""

    def __init__(self, replica_id: int, config: SimulationConfig, ledger: RequestLedger) -> None:
        self.replica_id = replica_id
        self.config = config
        self.ledger = ledger
        self.deployment, self.latency, self.limits = build_setup(config)
        self.policy: Policy = make_policy(config.scheduler, self.limits,
                                          make_config(config.scheduler, policy_overrides(config)))
        source = "oracle" if self.policy.wants_oracle_predictions else config.predictions
        self.predicted = ledger.predictions(source)
        self.log = IterationLog()
        self.expected_tokens = 0  # sum of prompt + expected output of the unfinished requests
        self._empty_decisions = 0
        self._warned_no_predictions = False

    # ------------------------------------------------------------------ what routers see
    # (econoserve.sim.routers.RoutingView; predicted lengths only)
    def expected_request_tokens(self, row: int) -> int:
        """Prompt + expected output of the request in ``row`` [tokens]: its predicted length, or
        (without one) the rest of the model's context, as the policies fall back to."""
        predicted = self.predicted[row]
        prompt = self.ledger.prompt_tokens[row]
        return prompt + (predicted if predicted is not None else max(0, self.limits.max_model_len - prompt))

    @property
    def outstanding_tokens(self) -> int:
        """Estimated tokens still to compute for the unfinished requests: their prompt +
        expected output tokens minus what they hold in the KV cache [tokens]."""
        return self.expected_tokens - self.policy.kv_cache.num_stored_tokens

    @property
    def predicted_kv_tokens(self) -> int:
        """KV the unfinished requests would hold at their expected lengths [tokens]."""
        return self.expected_tokens

    @property
    def kv_capacity_tokens(self) -> int:
        return self.policy.kv_cache.capacity_tokens

    @property
    def has_work(self) -> bool:
        return self.policy.has_unfinished_requests()

    # ------------------------------------------------------------------ arrivals
    def add_request(self, row: int) -> None:
        """Hand the request in trace row ``row`` to this replica (the engine or the policy may
        reject it; the ledger records either outcome)."""
        ledger = self.ledger
        ledger.replica[row] = self.replica_id
        predicted = self.predicted[row]
        if predicted is None and self.policy.uses_predictions and not self._warned_no_predictions:
            self._warned_no_predictions = True
            warnings.warn(
                f"{self.policy.name}: the trace has no predicted_output_tokens, so every request gets the "
                "fallback allocation (the model's context); annotate it with `econoserve predictor predict` "
                "or use predictions='oracle'",
                stacklevel=4,
            )
        request = Request(ledger.request_ids[row], ledger.arrival_time_s[row], ledger.prompt_tokens[row],
                          predicted, index=row)
        ledger.requests[row] = request
        reason = engine_rejection(ledger.prompt_tokens[row], ledger.output_tokens[row], self.limits)
        if reason is None:
            reason = self.policy.add_request(request)
        if reason is not None:
            ledger.reject(row, reason)
        else:
            self.expected_tokens += self.expected_request_tokens(row)

    # ------------------------------------------------------------------ one step
    def step(self, now: float, next_arrival_s: float) -> float | None:
        """Run the replica's next step at ``now`` [s]; ``next_arrival_s`` is the time of the next
        request to arrive anywhere in the cluster (``inf`` if none). Returns the time of the
        replica's next event, or ``None`` when it waits for a new request (idle, or nothing can
        run until one comes)."""
        policy = self.policy
        if not policy.has_unfinished_requests():
            return None
        ledger = self.ledger
        stats = policy.stats
        wall_before = stats.wall_time_s
        decision = policy.schedule(now)
        for request, reason in decision.rejected:
            ledger.reject(request.index, reason or "rejected by the policy")
            self.expected_tokens -= self.expected_request_tokens(request.index)
        if not decision.scheduled:
            self._empty_decisions += 1
            if (decision.preempted or decision.rejected) and self._empty_decisions < MAX_EMPTY_DECISIONS:
                return now  # the policy changed its state; ask again at the same time
            if next_arrival_s != float("inf"):
                return None
            raise SimulationError(
                f"{policy.name}: no step is possible at t={now:.3f}s with {policy.num_waiting} waiting and "
                f"{policy.num_running} running requests, no arrivals left; KV {policy.kv_cache.snapshot()}"
            )
        self._empty_decisions = 0
        duration = self.latency.iteration_time_s(decision.num_prefill_tokens, decision.num_decode_tokens,
                                                 decision.num_context_tokens, decision.num_attention_pairs)
        end = now + duration
        iteration = len(self.log)
        output_tokens = ledger.output_tokens
        finished = []
        for request, num_new in zip(decision.scheduled, decision.num_scheduled_tokens):
            if request.num_computed_tokens + num_new == request.num_prompt_tokens + request.num_output_tokens:
                i = request.index
                runs = ledger.token_runs[i]
                if runs and runs[-1] == iteration:
                    runs[-1] = iteration + 1
                else:
                    runs.append(iteration)
                    runs.append(iteration + 1)
                produced = request.num_output_tokens + 1
                if produced == 1:
                    ledger.first_token_time_s[i] = end
                if produced == output_tokens[i]:
                    ledger.finish_time_s[i] = end
                    finished.append(request)
        policy.update_from_output(decision, finished)
        self._record(now, duration, decision, stats.wall_time_s - wall_before)
        if self.config.check_invariants:
            check_step(policy, now, end)
        if finished:
            ledger.num_done += len(finished)
            for request in finished:
                self.expected_tokens -= self.expected_request_tokens(request.index)
            return end
        if self.config.skip_ahead and decision.num_prefill_tokens == 0 and policy.running and end < next_arrival_s:
            return self._skip_ahead(decision, end, next_arrival_s)
        return end

    def _record(self, now: float, duration: float, decision, wall_s: float) -> None:
        log = self.log
        kv = self.policy.kv_cache
        log.start_time_s.append(now)
        log.duration_s.append(duration)
        log.num_prefill_tokens.append(decision.num_prefill_tokens)
        log.num_decode_tokens.append(decision.num_decode_tokens)
        log.num_context_tokens.append(decision.num_context_tokens)
        log.num_prefill_requests.append(decision.num_prefill_requests)
        log.num_preempted.append(len(decision.preempted))
        log.kv_blocks_used.append(kv.num_allocated_blocks)
        log.kv_blocks_reserved.append(kv.num_reserved_blocks)
        log.kv_tokens_stored.append(kv.num_stored_tokens)
        log.num_running.append(len(self.policy.running))
        log.num_waiting.append(self.policy.num_waiting)
        log.skipped.append(0)
        log.scheduler_wall_time_s.append(wall_s)

    # ------------------------------------------------------------------ skip-ahead
    def _skip_ahead(self, decision, now: float, next_arrival_s: float) -> float:
        """Advance steady decode-only steps in bulk from ``now`` (see the module docstring);
        returns the replica's clock after them."""
        policy = self.policy
        output_tokens = self.ledger.output_tokens
        steps_to_finish = min(output_tokens[r.index] - r.num_output_tokens for r in policy.running) - 1
        max_steps = min(steps_to_finish, self.config.max_skip_steps)
        if max_steps < 2:
            return now
        steps = policy.steady_decode_steps(decision, max_steps)
        if steps < 2:
            return now
        before = now
        now = self._skip(steps, now, next_arrival_s)
        if self.config.check_invariants:
            check_step(policy, before, now)
        return now

    def _skip(self, steps: int, now: float, next_arrival_s: float) -> float:
        """Advance up to ``steps`` decode-only steps in bulk, stopping before a step that would
        start at or after ``next_arrival_s``; returns the new clock."""
        policy = self.policy
        running = policy.running
        kv = policy.kv_cache
        log = self.log
        batch = len(running)
        request_ids = [r.request_id for r in running]
        computed = np.fromiter((r.num_computed_tokens for r in running), dtype=np.int64, count=batch)
        j = np.arange(1, steps + 1, dtype=np.int64)
        context = (int(computed.sum()) + batch * j).astype(float)
        durations = self.latency.iteration_time_s(np.zeros(steps), np.full(steps, float(batch)), context, context)
        durations = durations.tolist()
        starts = []
        for duration in durations:
            if now >= next_arrival_s:
                break
            starts.append(now)
            now = now + duration
        taken = len(starts)
        if taken == 0:
            return now
        used, reserved, stored = kv.decode_growth(request_ids, computed, taken)

        wall_before = policy.stats.wall_time_s
        policy.advance_decode_steps(taken)
        wall_each = (policy.stats.wall_time_s - wall_before) / taken
        token_runs = self.ledger.token_runs
        for request in running:
            token_runs[request.index][-1] += taken  # the last step emitted a token for every running request
        log.start_time_s.extend(starts)
        log.duration_s.extend(durations[:taken])
        log.num_prefill_tokens.extend([0] * taken)
        log.num_decode_tokens.extend([batch] * taken)
        log.num_context_tokens.extend(context[:taken].astype(np.int64).tolist())
        log.num_prefill_requests.extend([0] * taken)
        log.num_preempted.extend([0] * taken)
        log.kv_blocks_used.extend(used.tolist())
        log.kv_blocks_reserved.extend(reserved.tolist())
        log.kv_tokens_stored.extend(stored.tolist())
        log.num_running.extend([batch] * taken)
        log.num_waiting.extend([policy.num_waiting] * taken)
        log.skipped.extend([1] * taken)
        log.scheduler_wall_time_s.extend([wall_each] * taken)
        return now


def check_step(policy: Policy, start: float, end: float) -> None:
    """The KV accounting and the clock after a step (``check_invariants``)."""
    policy.kv_cache.check_invariants()
    if not end > start:
        raise SimulationError(f"clock did not advance: {start} -> {end}")
    for request in policy.running:
        if not policy.kv_cache.holds(request.request_id) and request.num_computed_tokens:
            raise SimulationError(f"running request {request.request_id} holds no KV")
        if request.num_computed_tokens > policy.kv_cache.allocated_blocks(request.request_id) * policy.kv_cache.block_size:
            raise SimulationError(f"request {request.request_id} computed more tokens than its blocks hold")


def engine_rejection(prompt: int, output: int, limits) -> str | None:
    """Why no engine with ``limits`` could serve a request of ``prompt`` + ``output`` tokens
    (``None`` if one could)."""
    context = limits.max_model_len
    if prompt > context:
        return f"prompt of {prompt} tokens exceeds the model's context of {context} tokens"
    if prompt + output > context:
        return f"prompt + output of {prompt + output} tokens exceeds the model's context of {context} tokens"
    peak_blocks = -(-(prompt + output - 1) // limits.block_size)
    if peak_blocks > limits.num_kv_blocks:
        return f"needs {peak_blocks} KV blocks at full length; the cache has {limits.num_kv_blocks}"
    return None

"""One simulated engine instance: a policy, a latency model and a step recorder.

A :class:`Replica` owns one policy (its queues and KV cache) on one deployment. The cluster
driver (:mod:`econoserve.sim.cluster`) hands it the requests a router sends it
(:meth:`Replica.add_request`) and calls :meth:`Replica.step` at the time of its next event. One
step asks the policy for a decision, charges the step's time from the latency model, gives every
request whose pending tokens were computed one output token, and ends a request at its *true*
output length (the policy only ever sees the predicted one).

**Refined predictions** (a trace with ``refined_output_tokens`` and ``refine_after_tokens``,
predictions from the trace, colocated replicas): in the step in which a request generates its
``k``-th token (``k = refine_after_tokens``) and does not finish, the replica hands the policy the
refined prediction (:meth:`~econoserve.policy.Policy.refine_prediction`), as a real engine would
after re-running the predictor on the output so far; once per request (the output count only
grows, preemption included), never for a request of at most ``k`` tokens. Skip-ahead stops short
of every such step.

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

**Roles** (``SimulationConfig.role``; prefill/decode disaggregation as DistServe, OSDI'24, runs
it). A ``prefill`` replica ends a request at its first token (its TTFT), frees it in the policy
and at once holds the same KV again under the request's id (:meth:`Replica.hold_handoff`) until
the transfer to a decode replica completes (:meth:`Replica.release_handoff`); its finished
prompts wait in :attr:`Replica.handoffs` for the cluster driver. A ``decode`` replica reserves
the prompt's KV under the request's id when a transfer starts (:meth:`Replica.reserve_transfer`;
KV is then held on both sides while in flight) and receives the request when it completes
(:meth:`Replica.receive`): its policy finds the KV already allocated, and the step that "admits
the prompt" costs one decode token with the prompt as context (the KV arrived; nothing is
recomputed). A request preempted on a decode replica recomputes there at prefill cost; waiting
requests that hold their transferred KV are admitted before it (they always fit). The
decode replica produces tokens 2..n (its requests' target length is the true length - 1), so the
request's TTFT comes from the prefill replica and its finish from the decode replica; the
``replica`` column names the decode replica.
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
        self.received: set[int] = set()  # rows a decode replica received (one token made before)
        self._predictions: dict[str, list[int | None]] = {}
        self._quantiles: list[tuple[int, ...] | None] | None = None

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

    def quantiles(self, source: str) -> list[tuple[int, ...] | None]:
        """Predicted length distributions by row (the trace's ``predicted_output_quantiles``
        with source ``trace``; else none)."""
        if source != "trace" or not self.trace.has_prediction_quantiles:
            return [None] * self.num_requests
        if self._quantiles is None:
            self._quantiles = self.trace.requests["predicted_output_quantiles"].tolist()
        return self._quantiles

    def refinements(self, source: str) -> tuple[list[int], list[int]] | None:
        """``(refine_after_tokens, refined_output_tokens)`` by row [tokens] (the trace's columns,
        with source ``trace``), or ``None`` when there are none."""
        if source != "trace" or not self.trace.has_refinements:
            return None
        frame = self.trace.requests
        return (frame["refine_after_tokens"].to_numpy(np.int64).tolist(),
                frame["refined_output_tokens"].to_numpy(np.int64).tolist())

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
        self.role = config.role
        # a disaggregated replica sees shifted point predictions only
        self.predicted_quantiles = ledger.quantiles(source) if self.role == "colocated" else [None] * ledger.num_requests
        # refined predictions (colocated only): (generated tokens at which, refined length) by row
        self.refinements = ledger.refinements(source) if self.role == "colocated" else None
        if self.role == "colocated":
            self.targets = ledger.output_tokens  # tokens each request produces here [tokens]
        elif self.role == "prefill":
            self.targets = [1] * ledger.num_requests
        else:
            self.targets = [o - 1 for o in ledger.output_tokens]
        self.handoffs: list[tuple[float, int]] = []  # (time [s], row) of prompts done, KV held
        self.held_tokens = 0  # prefill side: KV held for hand-overs [tokens] (no work left here)
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
        if self.role == "prefill":
            return prompt + 1
        offset = 1 if self.role == "decode" else 0
        return prompt + (predicted - offset if predicted is not None else max(0, self.limits.max_model_len - prompt))

    @property
    def outstanding_tokens(self) -> int:
        """Estimated tokens still to compute for the unfinished requests: their prompt +
        expected output tokens minus what they hold in the KV cache [tokens] (KV held for a
        hand-over is no request's work here)."""
        return self.expected_tokens - (self.policy.kv_cache.num_stored_tokens - self.held_tokens)

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
        if predicted is not None and self.role != "colocated":
            predicted = 1 if self.role == "prefill" else max(1, predicted - 1)
        request = Request(ledger.request_ids[row], ledger.arrival_time_s[row], ledger.prompt_tokens[row],
                          predicted, index=row, predicted_output_quantiles=self.predicted_quantiles[row],
                          refine_after_tokens=self.refinements[0][row] if self.refinements is not None else None)
        ledger.requests[row] = request
        reason = self.rejection(row)
        if reason is None:
            reason = self.policy.add_request(request)
        if reason is not None:
            self.policy.kv_cache.free(request.request_id)  # a decode replica's transferred KV
            ledger.reject(row, reason)
        else:
            self.expected_tokens += self.expected_request_tokens(row)

    def rejection(self, row: int) -> str | None:
        """Why this replica's engine can never serve the request in ``row`` (``None`` if it can):
        the model's context holds the whole request, and the KV this replica keeps of it (the
        prompt on a prefill replica) fits the cache."""
        ledger = self.ledger
        prompt, output = ledger.prompt_tokens[row], ledger.output_tokens[row]
        kv_output = {"colocated": output, "prefill": 1, "decode": output - 1}[self.role]
        return engine_rejection(prompt, output, self.limits, kv_tokens=prompt + kv_output)

    # ------------------------------------------------------------------ KV hand-over (disaggregation)
    def hold_handoff(self, row: int) -> None:
        """Prefill side: hold the prompt's KV of the request in ``row`` (just freed by the
        policy, so it fits) until :meth:`release_handoff`."""
        kv = self.policy.kv_cache
        if kv.allocate_slots(self.ledger.request_ids[row], self.ledger.prompt_tokens[row]) is None:
            raise SimulationError(f"replica {self.replica_id}: cannot hold the KV it just freed (simulator bug)")
        self.held_tokens += self.ledger.prompt_tokens[row]

    def release_handoff(self, row: int) -> None:
        """Prefill side: the transfer of ``row``'s KV completed; free it."""
        self.policy.kv_cache.free(self.ledger.request_ids[row])
        self.held_tokens -= self.ledger.prompt_tokens[row]

    def reserve_transfer(self, row: int) -> bool:
        """Decode side: allocate the prompt's KV of ``row`` for an incoming transfer; False (and
        nothing changes) when it does not fit now."""
        kv = self.policy.kv_cache
        return kv.allocate_slots(self.ledger.request_ids[row], self.ledger.prompt_tokens[row]) is not None

    def expect_transfer(self, row: int) -> None:
        """Decode side: ``row`` was routed here (its KV is still to come); routers count it."""
        self.expected_tokens += self.expected_request_tokens(row)

    def receive(self, row: int) -> None:
        """Decode side: the KV of ``row`` arrived; queue the request (it holds its KV)."""
        self.expected_tokens -= self.expected_request_tokens(row)
        self.ledger.received.add(row)
        self.add_request(row)

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
        if self.role == "decode":
            self._received_first()
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
        shape = self._step_shape(decision)
        duration = self.latency.iteration_time_s(*shape[:4])
        end = now + duration
        iteration = len(self.log)
        targets = self.targets
        records_tokens = self.role != "prefill"
        sets_first_token = self.role != "decode"
        finished = []
        refined = []
        refine_at = self.refinements[0] if self.refinements is not None else None
        for request, num_new in zip(decision.scheduled, decision.num_scheduled_tokens):
            if request.num_computed_tokens + num_new == request.num_prompt_tokens + request.num_output_tokens:
                i = request.index
                if records_tokens:
                    runs = ledger.token_runs[i]
                    if runs and runs[-1] == iteration:
                        runs[-1] = iteration + 1
                    else:
                        runs.append(iteration)
                        runs.append(iteration + 1)
                produced = request.num_output_tokens + 1
                if produced == 1 and sets_first_token:
                    ledger.first_token_time_s[i] = end
                if produced == targets[i]:
                    finished.append(request)
                elif refine_at is not None and produced == refine_at[i]:
                    refined.append(request)
        policy.update_from_output(decision, finished)
        for request in refined:  # what the real engine does by re-running the predictor on the output so far
            policy.refine_prediction(request, self.refinements[1][request.index])
        self._record(now, duration, decision, shape, stats.wall_time_s - wall_before)
        if finished:
            self._finish(finished, end)
        if self.config.check_invariants:
            check_step(policy, now, end)
        if finished or refined:  # an event: the policy decides again before any bulk stretch
            return end
        if self.config.skip_ahead and decision.num_prefill_tokens == 0 and policy.running and end < next_arrival_s:
            return self._skip_ahead(decision, end, next_arrival_s)
        return end

    def _received_first(self) -> None:
        """Decode side: waiting requests that hold their transferred KV go before those that must
        recompute (preempted here), in their order, so KV held for a waiting request never blocks
        the queue's head (it can always be admitted)."""
        waiting = self.policy.waiting
        kv = self.policy.kv_cache
        if not waiting or kv.holds(waiting[0].request_id):
            return
        held = [r for r in waiting if kv.holds(r.request_id)]
        if held:
            rest = [r for r in waiting if not kv.holds(r.request_id)]
            waiting.clear()
            waiting.extend(held + rest)

    def _finish(self, finished: list[Request], end: float) -> None:
        """Retire the requests that produced their last token here at ``end`` [s]: finished for
        good, or (prefill replica, more tokens to come) handed off with their KV held."""
        ledger = self.ledger
        for request in finished:
            i = request.index
            self.expected_tokens -= self.expected_request_tokens(i)
            if self.role == "prefill" and ledger.output_tokens[i] > 1:
                self.hold_handoff(i)
                self.handoffs.append((end, i))
            else:
                ledger.finish_time_s[i] = end
                ledger.num_done += 1

    def _step_shape(self, decision) -> tuple[float, float, float, float, int]:
        """The step's prefill, decode, context tokens, attention pairs and prefill requests, as
        the latency model and the log see them. On a decode replica a transferred prompt (never
        computed here, not preempted) costs one decode token reading the prompt's KV."""
        shape = (decision.num_prefill_tokens, decision.num_decode_tokens, decision.num_context_tokens,
                 decision.num_attention_pairs, decision.num_prefill_requests)
        if self.role != "decode" or not decision.num_prefill_tokens:
            return shape
        prefill, decode, context, pairs, requests = shape
        for request, num_new in zip(decision.scheduled, decision.num_scheduled_tokens):
            if request.num_computed_tokens or request.num_preemptions or request.num_output_tokens:
                continue
            prompt = request.num_prompt_tokens
            if num_new != prompt:
                raise SimulationError(
                    f"decode replica {self.replica_id} split a transferred prompt ({num_new} of {prompt} tokens); "
                    "give its policy a token budget above any prompt"
                )
            prefill, decode, requests = prefill - prompt, decode + 1, requests - 1
            context += 1
            pairs += (prompt + 1) - prompt * (prompt + 1) * 0.5
        return prefill, decode, context, pairs, requests

    def _record(self, now: float, duration: float, decision, shape, wall_s: float) -> None:
        log = self.log
        kv = self.policy.kv_cache
        log.start_time_s.append(now)
        log.duration_s.append(duration)
        log.num_prefill_tokens.append(shape[0])
        log.num_decode_tokens.append(shape[1])
        log.num_context_tokens.append(shape[2])
        log.num_prefill_requests.append(shape[4])
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
        targets = self.targets
        steps_to_finish = min(targets[r.index] - r.num_output_tokens for r in policy.running) - 1
        if self.refinements is not None:  # the k-th token comes in a step of its own (refined then)
            refine_at = self.refinements[0]
            steps_to_finish = min([steps_to_finish] + [refine_at[r.index] - r.num_output_tokens - 1
                                                       for r in policy.running if r.num_output_tokens < refine_at[r.index]])
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


def engine_rejection(prompt: int, output: int, limits, kv_tokens: int | None = None) -> str | None:
    """Why no engine with ``limits`` could serve a request of ``prompt`` + ``output`` tokens
    (``None`` if one could); ``kv_tokens``: the tokens whose KV the engine keeps of it (default
    ``prompt + output``; a prefill instance keeps only the prompt's)."""
    context = limits.max_model_len
    if prompt > context:
        return f"prompt of {prompt} tokens exceeds the model's context of {context} tokens"
    if prompt + output > context:
        return f"prompt + output of {prompt + output} tokens exceeds the model's context of {context} tokens"
    peak_blocks = -(-((prompt + output if kv_tokens is None else kv_tokens) - 1) // limits.block_size)
    if peak_blocks > limits.num_kv_blocks:
        return f"needs {peak_blocks} KV blocks at full length; the cache has {limits.num_kv_blocks}"
    return None

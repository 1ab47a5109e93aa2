"""Prefill/decode disaggregation: the KV hand-over between replicas of two kinds.

Rules, each from DistServe (Zhong et al., OSDI 2024, arXiv 2401.09670, section 4 and its
``distserve`` engine) unless marked *[choice]*:

* **Prefill instances** (``SimulationConfig.role = "prefill"``) batch whole prompts up to a
  token limit (their policy: vLLM's prefill-first FCFS with ``max_num_batched_tokens``) and
  produce each request's first token. The finished prompt's KV stays on the prefill instance
  until a decode instance has pulled it ("the decoding instance fetches the KV cache from the
  prefill instance when it has memory for it", section 4.3: *pull, not push*).
* **Choice of decode instance** by a router (:mod:`econoserve.sim.routers`, the cluster's
  ``decode_router``) at the moment the prompt finishes.
* **Pull when it fits.** Each decode instance keeps a FIFO of requests to pull. The head starts
  its transfer as soon as the decode instance can allocate the prompt's KV (checked when the
  request is routed there and after each of the decode instance's steps); from then the KV is
  held on both sides. A request whose KV can never fit the decode instance is rejected (recorded).
* **Transfer time** = link latency + prompt tokens x KV bytes per token / bandwidth, over
  ``min(TP prefill, TP decode)`` GPU-to-GPU links in parallel *[choice: each GPU sends its
  shard]*: NVLink within a node (:func:`~econoserve.sim.catalog.nvlink`), the cluster's
  ``network`` between nodes (:data:`~econoserve.sim.catalog.NETWORK_LINKS`).
* **Decode instances** (``role = "decode"``) run continuous batching (vLLM v1's policy with a
  token budget above any prompt, so a received request joins the next step whole); a received
  request's first step there costs one decode token (see :mod:`econoserve.sim.replica`).
* When the transfer completes the prefill side frees the KV and the decode side queues the
  request; either replica, if idle, wakes at that moment.

DistServe's own simulator (``simdistserve``) omits the transfer and caps decode batches at a
fixed 50,000 context tokens; here the transfer is timed and decode memory is the decode
instance's real KV capacity (so it may preempt, by recompute, as vLLM would).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Sequence

from econoserve.errors import UserError
from econoserve.sim.catalog import LinkSpec, get_network, nvlink
from econoserve.sim.engine import SimulationError
from econoserve.sim.replica import Replica
from econoserve.sim.routers import Router

_READY, _DONE = 0, 1


def check_roles(roles: Sequence[str]) -> None:
    """A cluster with prefill replicas needs decode replicas and the reverse."""
    has_prefill, has_decode = "prefill" in roles, "decode" in roles
    if has_prefill != has_decode:
        missing = "decode" if has_prefill else "prefill"
        raise UserError(f"a disaggregated cluster needs both prefill and decode replicas; it has no {missing} replica")


class KVTransfers:
    """The hand-over state of one disaggregated run: requests whose prompt finished (waiting to
    be routed), each decode replica's pull queue, and transfers in flight (an event heap).

    Events are ``(time [s], order, kind, row, prefill index, decode index)``; ``order`` keeps
    equal times in creation order, so runs are deterministic.
    """

    def __init__(self, replicas: Sequence[Replica], decode_router: Router, network: str) -> None:
        self.replicas = replicas
        self.decoders = [i for i, r in enumerate(replicas) if r.role == "decode"]
        self.router = decode_router
        self.network: LinkSpec = get_network(network)
        self.pulls: dict[int, deque[tuple[int, int]]] = {i: deque() for i in self.decoders}  # (row, prefill)
        self.events: list[tuple[float, int, int, int, int, int]] = []
        self._order = 0
        self.in_flight: dict[int, tuple[int, int]] = {}  # row -> (prefill, decode) of each transfer

    # ------------------------------------------------------------------ queries
    def next_time(self) -> float:
        return self.events[0][0] if self.events else float("inf")

    def link(self, prefill: Replica, decode: Replica) -> LinkSpec:
        if prefill.config.node == decode.config.node:
            return nvlink(prefill.deployment.gpu)
        return self.network

    def transfer_time_s(self, row: int, prefill: Replica, decode: Replica) -> float:
        num_bytes = prefill.ledger.prompt_tokens[row] * prefill.deployment.model.kv_bytes_per_token
        links = min(prefill.config.tensor_parallel, decode.config.tensor_parallel)
        return self.link(prefill, decode).transfer_time_s(num_bytes, links)

    # ------------------------------------------------------------------ events
    def _push(self, time: float, kind: int, row: int, prefill: int, decode: int) -> None:
        heapq.heappush(self.events, (time, self._order, kind, row, prefill, decode))
        self._order += 1

    def collect(self, index: int) -> None:
        """Take the prompts replica ``index`` (a prefill replica) finished in its last step."""
        replica = self.replicas[index]
        for time, row in replica.handoffs:
            self._push(time, _READY, row, index, -1)
        replica.handoffs.clear()

    def pop(self) -> tuple[float, list[int]]:
        """Process the next event; returns its time and the replicas to wake at that time."""
        time, _, kind, row, p, d = heapq.heappop(self.events)
        if kind == _READY:
            return time, self._route(time, row, p)
        del self.in_flight[row]
        self.replicas[p].release_handoff(row)
        self.replicas[d].receive(row)
        return time, [p, d]

    def _route(self, time: float, row: int, p: int) -> list[int]:
        prefill = self.replicas[p]
        choice = self.decoders[self.router.route(row, [self.replicas[i] for i in self.decoders])]
        reason = self.replicas[choice].rejection(row)
        if reason is not None:
            prefill.release_handoff(row)
            prefill.ledger.replica[row] = choice
            prefill.ledger.reject(row, f"decode replica {choice}: {reason}")
            return [p]
        self.replicas[choice].expect_transfer(row)
        self.pulls[choice].append((row, p))
        self.start_pulls(choice, time)
        return [p]

    def start_pulls(self, index: int, time: float) -> None:
        """Start the transfers at the head of decode replica ``index``'s queue that fit now."""
        queue = self.pulls.get(index)
        decode = self.replicas[index]
        while queue:
            row, p = queue[0]
            if not decode.reserve_transfer(row):
                break
            queue.popleft()
            self.in_flight[row] = (p, index)
            self._push(time + self.transfer_time_s(row, self.replicas[p], decode), _DONE, row, p, index)

    @property
    def pending(self) -> int:
        """Requests routed or in flight but not yet received by a decode replica."""
        return sum(len(q) for q in self.pulls.values()) + len(self.events)

    def check_invariants(self) -> None:
        """Every prompt waiting to be pulled holds its KV on its prefill replica, and every
        transfer in flight on both sides; raises :class:`SimulationError` otherwise."""
        held = [(row, p, None) for queue in self.pulls.values() for row, p in queue]
        held += [(row, p, None) for _, _, kind, row, p, _ in self.events if kind == _READY]
        held += [(row, p, d) for row, (p, d) in self.in_flight.items()]
        for row, p, d in held:
            request_id = self.replicas[p].ledger.request_ids[row]
            for side in (p, d):
                if side is not None and not self.replicas[side].policy.kv_cache.holds(request_id):
                    raise SimulationError(f"request {request_id} in hand-over holds no KV on replica {side}")

"""The cluster driver: an event heap over N replicas behind a router; one replica is the trivial
cluster (:func:`simulate`).

Events are arrivals (in trace order) and replica steps (each replica's next event time, from
:meth:`~econoserve.sim.replica.Replica.step`). At equal times arrivals come first, then replicas
by index, so runs are deterministic. An arriving request is routed at its arrival time
(:mod:`econoserve.sim.routers`) and joins that replica's policy; a replica sees it at its next
step, exactly as a single engine sees a request that arrives during a step. A replica that is
idle (or can run nothing until a new request comes) has no event until the router sends it one.

Replicas may differ (policy, deployment, latency model): a :class:`ClusterConfig` lists one
:class:`~econoserve.sim.engine.SimulationConfig` per replica. Prefill/decode disaggregation is
replicas of two kinds (``role`` ``prefill`` / ``decode``) with a KV hand-over between them
(:mod:`econoserve.sim.disaggregation`): arrivals are routed to the prefill (and colocated)
replicas, finished prompts to a decode replica by ``decode_router``, and hand-over events
(prompt finished, transfer done) join the event heap (at equal times: arrivals, then hand-overs,
then replica steps). In such a cluster a replica's skip-ahead stops before the next event of any
other replica or hand-over (a prompt finishing elsewhere may send it a request), and a
request's ``mean_tbt_s`` is (finish - first token) / (output tokens - 1), its tokens having come
from two replicas (equal to the mean gap); ``p99_tbt_s`` covers the decode replica's tokens.

Tables: ``requests`` gains a ``replica`` column (the replica that served the request), and
``iterations`` holds every replica's steps (``replica``, and ``iteration`` counted per replica),
replica by replica.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from econoserve import __version__
from econoserve.errors import UserError
from econoserve.results import ITERATION_SCHEMA, REQUEST_SCHEMA, conform, slo_columns, summarize
from econoserve.sim.catalog import DEFAULT_NETWORK, get_network
from econoserve.sim.disaggregation import KVTransfers, check_roles
from econoserve.sim.engine import SimulationConfig, SimulationError, SimulationResult, reference_token_budget
from econoserve.sim.latency import isolated_execution_times_s
from econoserve.sim.replica import Replica, RequestLedger
from econoserve.sim.routers import ROUTERS, make_router
from econoserve.workload.trace import Trace

#: The router a one-replica cluster and ``--replicas`` without ``--router`` use.
DEFAULT_ROUTER = "round-robin"


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster: one simulation configuration per replica, and the router's name.

    replicas:
        The replicas' configurations (policy, deployment, latency model, knobs, role, node), at
        least one.
    router:
        A registered router (:data:`econoserve.sim.routers.ROUTERS`) for arriving requests.
    decode_router:
        The router that picks a decode replica for a finished prompt (``None`` = ``router``).
    network:
        The link between nodes (:data:`econoserve.sim.catalog.NETWORK_LINKS`) for KV transfers.
    """

    replicas: tuple[SimulationConfig, ...]
    router: str = DEFAULT_ROUTER
    decode_router: str | None = None
    network: str = DEFAULT_NETWORK

    def __post_init__(self) -> None:
        if len(self.replicas) == 0:
            raise UserError("a cluster needs at least one replica, got 0")
        for name in (self.router, self.decode_router or self.router):
            if name not in ROUTERS:
                raise UserError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
        check_roles([c.role for c in self.replicas])
        get_network(self.network)

    @property
    def disaggregated(self) -> bool:
        return any(c.role == "decode" for c in self.replicas)

    @classmethod
    def uniform(cls, config: SimulationConfig, num_replicas: int, router: str = DEFAULT_ROUTER) -> "ClusterConfig":
        """``num_replicas`` copies of ``config``."""
        if num_replicas < 1:
            raise UserError(f"--replicas must be >= 1, got {num_replicas}")
        return cls((config,) * num_replicas, router)

    @classmethod
    def from_file(cls, path: str | Path, base: SimulationConfig | None = None) -> "ClusterConfig":
        """A cluster description (JSON)::

            {"router": "kv-aware",
             "defaults": {"model": "llama-2-13b", "gpu": "a100-80gb"},
             "replicas": [{"count": 2, "scheduler": "econoserve"},
                          {"count": 1, "scheduler": "vllm", "gpu": "h100-80gb"}]}

        Every replica entry takes the fields of :class:`SimulationConfig` (over ``defaults``,
        over ``base``) plus ``count`` (default 1). Without ``base`` every replica must name its
        ``scheduler`` (in its entry or in ``defaults``).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise UserError(f"{path}: cannot read the cluster description ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        return cls.from_mapping(data, base, source=str(path))

    @classmethod
    def from_mapping(cls, data: object, base: SimulationConfig | None = None,
                     source: str = "cluster") -> "ClusterConfig":
        """The cluster a parsed description gives (see :meth:`from_file`)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("replicas"), list):
            raise UserError(f"{source}: expected an object with a 'replicas' list")
        unknown = sorted(set(data) - {"router", "decode_router", "network", "defaults", "replicas"})
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                            "expected router, decode_router, network, defaults, replicas")
        defaults = _config_fields(data.get("defaults", {}), f"{source}: defaults")
        replicas: list[SimulationConfig] = []
        for number, entry in enumerate(data["replicas"]):
            where = f"{source}: replicas[{number}]"
            fields = _config_fields(entry, where)
            count = fields.pop("count", 1)
            if not isinstance(count, int) or count < 0:
                raise UserError(f"{where}: count must be an integer >= 0, got {count!r}")
            if base is None and "scheduler" not in {**defaults, **fields}:
                raise UserError(f"{where}: no scheduler (name one in the entry, in 'defaults' or with --scheduler)")
            try:
                config = SimulationConfig(**{**(base or SimulationConfig()).to_dict(), **defaults, **fields})
            except TypeError as error:
                raise UserError(f"{where}: {error}") from None
            except UserError as error:
                raise UserError(f"{where}: {error}") from None
            replicas.extend([config] * count)
        return cls(tuple(replicas), data.get("router", DEFAULT_ROUTER), data.get("decode_router"),
                   data.get("network", DEFAULT_NETWORK))

    def to_dict(self) -> dict[str, object]:
        return {"router": self.router, "decode_router": self.decode_router, "network": self.network,
                "replicas": [config.to_dict() for config in self.replicas]}


def _config_fields(entry: object, where: str) -> dict[str, object]:
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected an object of SimulationConfig fields")
    known = set(SimulationConfig.__dataclass_fields__) | {"count"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return dict(entry)


# --------------------------------------------------------------------- driving
def simulate(trace: Trace, config: SimulationConfig | None = None, progress: bool = False) -> SimulationResult:
    """Run ``trace`` through the policy and deployment of ``config`` (one replica)."""
    return simulate_cluster(trace, ClusterConfig((config or SimulationConfig(),)), progress)


def simulate_cluster(trace: Trace, cluster: ClusterConfig, progress: bool = False) -> SimulationResult:
    """Run ``trace`` through ``cluster``: every request routed to one replica at its arrival."""
    ledger = RequestLedger(trace)
    replicas = _build_replicas(cluster, ledger)
    router = make_router(cluster.router)
    entry = [i for i, r in enumerate(replicas) if r.role != "decode"]  # where arrivals go
    entry_replicas = [replicas[i] for i in entry]
    transfers = (KVTransfers(replicas, make_router(cluster.decode_router or cluster.router), cluster.network)
                 if cluster.disaggregated else None)
    check_transfers = transfers is not None and any(c.check_invariants for c in cluster.replicas)
    n = ledger.num_requests
    arrivals = ledger.arrival_time_s
    events: list[tuple[float, int]] = []  # (time [s], replica index) of each replica's next step
    scheduled = [False] * len(replicas)
    bar = _progress_bar(n, progress, cluster)
    bar_step = max(1, n // 200)
    next_row = 0

    def wake(index: int, time: float) -> None:
        if not scheduled[index] and replicas[index].has_work:
            scheduled[index] = True
            heapq.heappush(events, (time, index))

    while True:
        next_arrival = arrivals[next_row] if next_row < n else float("inf")
        next_handover = transfers.next_time() if transfers is not None else float("inf")
        if events and events[0][0] < min(next_arrival, next_handover):
            now, index = heapq.heappop(events)
            replica = replicas[index]
            horizon = next_arrival
            if transfers is not None:  # another replica's step may send this one a request
                horizon = min(next_arrival, next_handover, events[0][0] if events else float("inf"))
                if horizon == float("inf") and transfers.pending:
                    horizon = now  # pulls wait for memory only this replica can free
            when = replica.step(now, horizon)
            scheduled[index] = when is not None
            if when is not None:
                heapq.heappush(events, (when, index))
            if transfers is not None:
                if replica.role == "prefill":
                    transfers.collect(index)
                elif replica.role == "decode":
                    transfers.start_pulls(index, when if when is not None else now)
        elif next_row < n and next_arrival <= next_handover:
            row = next_row
            next_row += 1
            index = entry[router.route(row, entry_replicas)]
            replicas[index].add_request(row)
            wake(index, arrivals[row])
        elif next_handover != float("inf"):
            now, woken = transfers.pop()
            for index in woken:
                wake(index, now)
        else:
            break
        if check_transfers:
            transfers.check_invariants()
        if bar is not None and ledger.num_done - bar.n >= bar_step:
            bar.update(ledger.num_done - bar.n)
    if bar is not None:
        bar.update(ledger.num_done - bar.n)
        bar.close()
    if ledger.num_done < n:
        stuck = [r.replica_id for r in replicas if r.has_work]
        raise SimulationError(
            f"no step is possible on replica(s) {stuck} and no arrivals are left: "
            f"{n - ledger.num_done} requests unfinished"
        )
    return _result(trace, cluster, ledger, replicas)


def _build_replicas(cluster: ClusterConfig, ledger: RequestLedger) -> list[Replica]:
    replicas = []
    for index, config in enumerate(cluster.replicas):
        try:
            replicas.append(Replica(index, config, ledger))
        except UserError as error:
            if len(cluster.replicas) == 1:
                raise
            raise UserError(f"replica {index}: {error}") from None
    return replicas


def _progress_bar(total: int, enabled: bool, cluster: ClusterConfig):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    schedulers = sorted({c.scheduler for c in cluster.replicas})
    where = f" on {len(cluster.replicas)} replicas" if len(cluster.replicas) > 1 else ""
    return tqdm(total=total, desc=f"simulate {'+'.join(schedulers)}{where}", unit="req", mininterval=0.5)


# --------------------------------------------------------------------- result
def _result(trace: Trace, cluster: ClusterConfig, ledger: RequestLedger, replicas: list[Replica]) -> SimulationResult:
    iteration_ends = [np.asarray(r.log.start_time_s, dtype=float) + np.asarray(r.log.duration_s, dtype=float)
                      for r in replicas]
    requests_table = _requests_table(ledger, replicas, iteration_ends)
    iterations_table = _iterations_table(replicas)
    budgets = [reference_token_budget(r.config, r.latency, r.limits) for r in replicas]
    stats = [r.policy.stats for r in replicas]
    # each step measured against its own replica's budget where they differ
    budget = budgets[0] if len(set(budgets)) == 1 else np.repeat(budgets, [len(r.log) for r in replicas])
    summary = summarize(requests_table, iterations_table, budget,
                        sum(s.invocations for s in stats), sum(s.wall_time_s for s in stats))
    summary["scheduler"] = "+".join(dict.fromkeys(r.policy.name for r in replicas))
    summary["skipped_iterations"] = sum(s.skipped_steps for s in stats)
    for s in stats:
        for key, value in s.extra.items():
            summary[f"policy_{key}"] = summary.get(f"policy_{key}", 0) + value
    summary["num_replicas"] = len(replicas)
    summary["router"] = cluster.router
    if cluster.disaggregated:
        summary["num_prefill_replicas"] = sum(r.role == "prefill" for r in replicas)
        summary["num_decode_replicas"] = sum(r.role == "decode" for r in replicas)
    first = replicas[0]
    full_config = {
        "simulation": first.config.to_dict(),
        "policy": first.policy.describe(),
        "limits": asdict(first.limits),
        "deployment": first.deployment.describe(first.config.num_kv_blocks),
        "latency_model": first.latency.describe(),
        "reference_token_budget": budgets[0],
        "trace": {"num_requests": ledger.num_requests, "metadata": trace.metadata},
        "econoserve_version": __version__,
    }
    if len(replicas) > 1:
        full_config["cluster"] = {
            "router": cluster.router,
            "decode_router": cluster.decode_router,
            "network": cluster.network,
            "replicas": [{"simulation": r.config.to_dict(), "policy": r.policy.describe(), "limits": asdict(r.limits),
                          "reference_token_budget": b} for r, b in zip(replicas, budgets)],
        }
    return SimulationResult(requests_table, iterations_table, summary, full_config)


def _requests_table(ledger: RequestLedger, replicas: Sequence[Replica], iteration_ends: list[np.ndarray]) -> pd.DataFrame:
    frame = ledger.trace.requests
    n = ledger.num_requests
    arrival = frame["arrival_time_s"].to_numpy(float)
    prompt = frame["prompt_tokens"].to_numpy(np.int64)
    output = frame["output_tokens"].to_numpy(np.int64)
    finish = np.asarray(ledger.finish_time_s, dtype=float)
    first = np.asarray(ledger.first_token_time_s, dtype=float)
    finished = ~np.isnan(finish)
    status = np.where(finished, "finished", "rejected")
    if not (finished | (np.asarray(ledger.reasons, dtype=object) != "")).all():
        raise SimulationError("a request neither finished nor was rejected (simulator bug)")
    replica_of = np.frombuffer(ledger.replica, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
    objects = ledger.requests
    preemptions = np.fromiter((r.num_preemptions if r is not None else 0 for r in objects), dtype=np.int64, count=n)
    generated = np.fromiter((r.num_output_tokens if r is not None else 0 for r in objects), dtype=np.int64, count=n)
    if ledger.received:  # the first token came from a prefill replica
        generated[list(ledger.received)] += 1
    offsets = np.cumsum([0] + [len(end) for end in iteration_ends])[:-1]
    mean_tbt, p99_tbt = _tbt_stats(ledger.token_runs, np.concatenate(iteration_ends), offsets[replica_of], n)
    if any(r.role == "decode" for r in replicas):  # tokens from two replicas: the mean gap
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_tbt = np.where(output > 1, (finish - first) / (output - 1), np.nan)
    predicted, isolated, slo_scale = _per_replica_columns(ledger, replicas, replica_of, prompt, output)
    jct = finish - arrival
    table = pd.DataFrame(
        {
            "request_id": frame["request_id"].to_numpy(np.int64),
            "dataset": frame["dataset"].to_numpy(object),
            "status": status,
            "rejection_reason": np.asarray(ledger.reasons, dtype=object),
            "arrival_time_s": arrival,
            "submit_time_s": arrival,
            "first_token_time_s": first,
            "finish_time_s": finish,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "predicted_output_tokens": predicted,
            "generated_tokens": generated,
            "num_preemptions": preemptions,
            "ttft_s": first - arrival,
            "mean_tbt_s": mean_tbt,
            "p99_tbt_s": p99_tbt,
            "jct_s": jct,
            "normalized_latency_s": jct / output,
            **slo_columns(arrival, finish, finished, isolated, slo_scale),
            "replica": replica_of.copy(),
        }
    )
    return conform(table, REQUEST_SCHEMA, "simulated requests")


def _per_replica_columns(ledger, replicas, replica_of, prompt, output):
    """Predicted length [tokens] as the serving replica's policy saw it, isolated execution time
    [s] on the serving replica's hardware, and its SLO scale; one latency evaluation per group of
    replicas with the same latency model."""
    if len(replicas) == 1:
        replica = replicas[0]
        return (pd.array(replica.predicted, dtype="Int64"),
                isolated_execution_times_s(replica.latency, prompt, output), replica.config.slo_scale)
    predicted = pd.array([replicas[k].predicted[i] for i, k in enumerate(replica_of.tolist())], dtype="Int64")
    isolated = np.zeros(len(prompt))
    slo_scale = np.zeros(len(prompt))
    groups: dict[str, list[int]] = {}
    for replica in replicas:
        groups.setdefault(json.dumps(replica.latency.describe(), sort_keys=True, default=str), []).append(replica.replica_id)
    for members in groups.values():
        rows = np.flatnonzero(np.isin(replica_of, members))
        isolated[rows] = isolated_execution_times_s(replicas[members[0]].latency, prompt[rows], output[rows])
    for replica in replicas:
        slo_scale[replica_of == replica.replica_id] = replica.config.slo_scale
    return predicted, isolated, slo_scale


def _tbt_stats(token_runs, iteration_end: np.ndarray, run_offset: np.ndarray, n: int,
               chunk_tokens: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Mean and p99 time between tokens per request [s] (NaN with fewer than two tokens).

    ``token_runs`` index the serving replica's steps; ``run_offset`` (per request) is where that
    replica's steps start in ``iteration_end``. Requests are processed in chunks of about
    ``chunk_tokens`` tokens, so memory stays bounded."""
    mean = np.full(n, np.nan)
    p99 = np.full(n, np.nan)
    start = 0
    while start < n:
        stop, tokens = start, 0
        while stop < n and (tokens == 0 or tokens < chunk_tokens):
            runs = token_runs[stop]
            tokens += sum(runs[1::2]) - sum(runs[0::2])
            stop += 1
        _tbt_chunk(token_runs, iteration_end, run_offset, start, stop, mean, p99)
        start = stop
    return mean, p99


def _tbt_chunk(token_runs, iteration_end, run_offset, first, stop, mean, p99) -> None:
    run_starts, run_ends, owners = [], [], []
    for i in range(first, stop):
        runs = token_runs[i]
        if runs:
            run_starts.extend(runs[0::2])
            run_ends.extend(runs[1::2])
            owners.extend([i - first] * (len(runs) // 2))
    n = stop - first
    if not owners:
        return
    starts = np.asarray(run_starts, dtype=np.int64)
    lengths = np.asarray(run_ends, dtype=np.int64) - starts
    run_owner = np.asarray(owners, dtype=np.int64)
    starts = starts + run_offset[first + run_owner]
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    token_iteration = np.arange(total) - np.repeat(offsets - starts, lengths)
    token_owner = np.repeat(run_owner, lengths)
    times = iteration_end[token_iteration]
    same = token_owner[1:] == token_owner[:-1]
    gaps = np.diff(times)[same]
    gap_owner = token_owner[1:][same]
    if gaps.size == 0:
        return
    counts = np.bincount(gap_owner, minlength=n)
    sums = np.bincount(gap_owner, weights=gaps, minlength=n)
    has = counts > 0
    where = np.flatnonzero(has) + first
    mean[where] = sums[has] / counts[has]
    order = np.lexsort((gaps, gap_owner))
    sorted_gaps = gaps[order]
    first_index = np.cumsum(counts) - counts
    position = 0.99 * (counts[has] - 1)
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, counts[has] - 1)
    base = first_index[has]
    low_value = sorted_gaps[base + lo]
    high_value = sorted_gaps[base + hi]
    p99[where] = low_value + (high_value - low_value) * (position - lo)


def _iterations_table(replicas: Sequence[Replica]) -> pd.DataFrame:
    """Every replica's steps, replica by replica (``iteration`` counts each replica's steps)."""
    lengths = [len(r.log) for r in replicas]

    def column(name: str, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(r.log, name), dtype=dtype) for r in replicas])

    def per_replica(values: list[int]) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=np.int64), lengths)

    table = pd.DataFrame(
        {
            "iteration": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
            "start_time_s": column("start_time_s", float),
            "duration_s": column("duration_s", float),
            "num_prefill_tokens": column("num_prefill_tokens", np.int64),
            "num_decode_tokens": column("num_decode_tokens", np.int64),
            "num_context_tokens": column("num_context_tokens", np.int64),
            "num_prefill_requests": column("num_prefill_requests", np.int64),
            "num_preempted": column("num_preempted", np.int64),
            "kv_blocks_used": column("kv_blocks_used", np.int64),
            "kv_blocks_reserved": column("kv_blocks_reserved", np.int64),
            "kv_blocks_capacity": per_replica([r.limits.num_kv_blocks for r in replicas]),
            "kv_tokens_stored": column("kv_tokens_stored", np.int64),
            "block_size": per_replica([r.limits.block_size for r in replicas]),
            "num_running": column("num_running", np.int64),
            "num_waiting": column("num_waiting", np.int64),
            "token_budget": per_replica([r.policy.token_budget or 0 for r in replicas]),
            "skipped": column("skipped", bool),
            "scheduler_wall_time_s": column("scheduler_wall_time_s", float),
        }
    )
    table["num_decode_requests"] = table["num_decode_tokens"]  # one token per decoding request and step
    table["kv_blocks_allocated"] = table["kv_blocks_used"] + table["kv_blocks_reserved"]
    table["replica"] = per_replica([r.replica_id for r in replicas])
    return conform(table, ITERATION_SCHEMA, "simulated iterations")

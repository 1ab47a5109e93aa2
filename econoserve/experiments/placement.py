"""DistServe's placement search and the GPU-count search, by simulation.

**Service objective** (:class:`ServiceObjective`): ``ttft-tpot`` (DistServe's: TTFT <=
``ttft_s`` and TPOT <= ``tpot_s``) or ``jct`` (this package's: JCT <= ``slo_scale`` x the
request's isolated time), met by at least ``target`` (0.9) of the requests. ``rule="joint"``
counts requests that meet both TTFT and TPOT (a rejected request meets nothing);
``rule="per-metric"`` is DistServe's acceptance test (``simdistserve``): the share meeting TTFT
and the share meeting TPOT must *each* reach the target, i.e. attainment = the smaller share.

**Units.** A search scales a *unit* of GPUs: one colocated replica (:class:`ColocatedUnit`: a
scheduler at a tensor-parallel degree) or one DistServe placement (:class:`DisaggregatedUnit`:
``n_prefill`` prefill instances of TP ``tp_prefill`` and ``n_decode`` decode instances of TP
``tp_decode``). ``copies`` of a unit form a cluster behind the unit's router.

**Placement search** (:func:`placement_search`), DistServe's algorithms (OSDI'24, section 4.1)
by simulation instead of its analytical queueing model: every unit whose instances fit the
node-size rules is simulated, and its goodput (highest Poisson rate meeting the objective) found
by bisection over rates (:func:`econoserve.analysis.metrics.goodput_search`); the best goodput
per GPU wins. ``affinity="low"`` is DistServe's low node-affinity algorithm: a unit fits one node
(``gpus_per_node``), so every KV transfer is over NVLink. ``affinity="high"`` is its high
node-affinity algorithm: prefill and decode instances on separate nodes (each phase's instances
fill whole nodes), transfers over the cluster network. Pipeline parallelism is not modelled
(PP = 1 everywhere; DistServe's own search also varies PP).

**GPU-count search** (:func:`gpus_needed`): for a target rate, the fewest GPUs whose cluster
meets the objective at that rate, per system: each colocated scheduler at each TP, DistServe at
its best few placements. Per unit, the first guess is ``ceil(target / unit goodput)`` copies,
then copies are added until the cluster meets the objective at the target rate and removed
while it still does (each step a simulation at the target rate). No cluster within
``max_gpus`` -> a row with ``reachable = False`` and the reason, never an error or a hang.

**Trace length.** A search is given one unit-rate trace and rescales it to every rate (see
:func:`econoserve.experiments.workloads.at_rate`). A fixed number of requests at a high rate
is a short burst that a large cluster drains before any queue builds, so a rate ``r`` uses the
first ``max(min_requests, ceil(r x min_duration_s))`` requests of the trace (all of them when the
trace is shorter): at least ``min_duration_s`` of arrivals where the trace allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd

from econoserve.experiments.plan import BURST_RATE_RPS
from econoserve.experiments.workloads import at_rate
from econoserve.analysis.metrics import GOODPUT_TARGET, goodput_search, ttft_tpot_slo_attainment
from econoserve.errors import UserError
from econoserve.policy import DEFAULT_SLO_SCALE
from econoserve.sim.catalog import DEFAULT_NETWORK, get_gpu, get_model, get_network
from econoserve.sim.cluster import ClusterConfig, simulate_cluster
from econoserve.sim.engine import SimulationConfig, build_setup
from econoserve.sim.routers import ROUTERS
from econoserve.workload.trace import Trace

SLO_KINDS: tuple[str, ...] = ("ttft-tpot", "jct")
ATTAINMENT_RULES: tuple[str, ...] = ("joint", "per-metric")
AFFINITIES: tuple[str, ...] = ("low", "high")
DISTSERVE = "distserve"
#: DistServe's prefill instances: FCFS whole prompts up to a token limit (vLLM's prefill-first).
PREFILL_SCHEDULER = "vllm"
#: DistServe's decode instances: continuous batching, a received request joins the next step.
DECODE_SCHEDULER = "vllm-chunked"
#: Decode instances' token budget: above any prompt, so a received prompt's KV joins whole.
DECODE_TOKEN_BUDGET = 1 << 30


# --------------------------------------------------------------------- objective
@dataclass(frozen=True)
class ServiceObjective:
    """What a cluster must meet (see the module docstring). Times [s]."""

    kind: str = "ttft-tpot"
    ttft_s: float = 0.2
    tpot_s: float = 0.1
    slo_scale: float = DEFAULT_SLO_SCALE
    target: float = GOODPUT_TARGET
    rule: str = "joint"

    def __post_init__(self) -> None:
        if self.kind not in SLO_KINDS:
            raise UserError(f"unknown SLO kind {self.kind!r}; choose one of {', '.join(SLO_KINDS)}")
        if self.rule not in ATTAINMENT_RULES:
            raise UserError(f"unknown attainment rule {self.rule!r}; choose one of {', '.join(ATTAINMENT_RULES)}")
        for name in ("ttft_s", "tpot_s", "slo_scale"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"SLO {name} must be a positive number, got {value}")
        if not 0 < self.target <= 1:
            raise UserError(f"SLO attainment target must be in (0, 1], got {self.target}")

    @property
    def label(self) -> str:
        if self.kind == "jct":
            return f"JCT <= {self.slo_scale:g}x isolated"
        return f"TTFT {self.ttft_s * 1e3:g} ms + TPOT {self.tpot_s * 1e3:g} ms"

    def attainment(self, requests: pd.DataFrame) -> float:
        """The share of ``requests`` (a run's requests table) meeting the objective."""
        if self.kind == "jct":
            return float(requests["slo_met"].mean()) if len(requests) else 0.0
        if self.rule == "joint":
            return ttft_tpot_slo_attainment(requests, self.ttft_s, self.tpot_s)
        finished = requests["status"] == "finished"
        ttft = (finished & (requests["ttft_s"] <= self.ttft_s)).mean()
        tpot = (finished & (requests["mean_tbt_s"].isna() | (requests["mean_tbt_s"] <= self.tpot_s))).mean()
        return float(min(ttft, tpot))


# --------------------------------------------------------------------- hardware and settings
@dataclass(frozen=True)
class Hardware:
    """The model and the GPUs a search may use.

    gpus_per_node:
        GPUs of one node [GPUs] (NVLink within it).
    max_gpus:
        The most GPUs a cluster may have [GPUs] (the GPU-count search's cap).
    latency_model:
        The simulator's latency model (``roofline``, ``calibrated``, ``distserve``, ...).
    network:
        The link between nodes (:data:`econoserve.sim.catalog.NETWORK_LINKS`).
    """

    model: str = "opt-13b"
    gpu: str = "a100-80gb"
    gpus_per_node: int = 4
    max_gpus: int = 64
    latency_model: str = "roofline"
    network: str = DEFAULT_NETWORK

    def __post_init__(self) -> None:
        get_model(self.model), get_gpu(self.gpu), get_network(self.network)
        if self.gpus_per_node < 1 or self.max_gpus < 1:
            raise UserError(f"gpus per node and the GPU cap must be >= 1, got {self.gpus_per_node}, {self.max_gpus}")

    def engine(self, tp: int, **fields) -> SimulationConfig:
        return SimulationConfig(model=self.model, gpu=self.gpu, tensor_parallel=tp, latency_model=self.latency_model,
                                **fields)

    def parallel_degrees(self, limit: int | None = None) -> tuple[int, ...]:
        """Tensor-parallel degrees [GPUs] (powers of two, up to a node or ``limit``) at which the
        model fits and the latency model has data; none is a :class:`UserError`."""
        degrees, reasons = [], []
        tp = 1
        while tp <= min(self.gpus_per_node, limit or self.gpus_per_node):
            try:
                build_setup(self.engine(tp))
                degrees.append(tp)
            except UserError as error:
                reasons.append(f"TP {tp}: {error}")
            tp *= 2
        if not degrees:
            raise UserError(f"{self.model} cannot be served on {self.gpu} at any TP up to {self.gpus_per_node}: "
                            + "; ".join(reasons))
        return tuple(degrees)


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the searches.

    relative_tolerance, max_evaluations:
        The goodput bisection's stopping rule [fraction of the rate] and budget [simulations].
    bracket_fractions:
        The bisection's first bracket as fractions of the unit's burst throughput (the first
        ``min_requests``, or every request, of the trace at once; a small burst's makespan is set
        by its longest request, so this underestimates capacity) [fraction]: ``(low, high)``;
        ``high`` doubles while it still meets the objective; if ``low`` misses, ``low / 16`` to
        ``low`` is searched.
    max_instances:
        The most instances of one phase in a DistServe placement.
    placements_to_scale:
        How many of the best units per system (by goodput per GPU) the GPU-count search scales.
    router:
        The router in front of every cluster (arrivals; also the choice of decode instance).
    min_requests, min_duration_s:
        Requests simulated at a rate: at least ``min_requests`` [requests] and ``min_duration_s``
        [s] of arrivals, within the trace given (see the module docstring); ``min_requests`` 0 =
        the whole trace at every rate.
    max_tp:
        The largest tensor-parallel degree searched [GPUs] (``None``: up to a node).
    """

    relative_tolerance: float = 0.05
    max_evaluations: int = 12
    bracket_fractions: tuple[float, float] = (0.5, 2.0)
    max_instances: int = 2
    placements_to_scale: int = 2
    router: str = "least-outstanding-tokens"
    min_requests: int = 0
    min_duration_s: float = 0.0
    max_tp: int | None = None

    def __post_init__(self) -> None:
        if self.min_requests < 0 or self.min_duration_s < 0:
            raise UserError("min_requests and min_duration_s must be >= 0")
        low, high = self.bracket_fractions
        if not 0 < low < high:
            raise UserError(f"bracket fractions must satisfy 0 < low < high, got {self.bracket_fractions}")
        if self.max_instances < 1 or self.placements_to_scale < 1 or self.max_evaluations < 2:
            raise UserError("max_instances and placements_to_scale must be >= 1, max_evaluations >= 2")
        if self.router not in ROUTERS:
            raise UserError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")


# --------------------------------------------------------------------- units
@dataclass(frozen=True)
class ColocatedUnit:
    """One replica of ``scheduler`` on ``tp`` GPUs."""

    scheduler: str
    tp: int

    @property
    def system(self) -> str:
        return self.scheduler

    @property
    def num_gpus(self) -> int:
        return self.tp

    def describe(self) -> str:
        return f"TP {self.tp}"

    def cluster(self, hardware: Hardware, objective: ServiceObjective, settings: SearchSettings,
                copies: int = 1) -> ClusterConfig:
        config = hardware.engine(self.tp, scheduler=self.scheduler, slo_scale=objective.slo_scale)
        return ClusterConfig((config,) * copies, settings.router)


@dataclass(frozen=True)
class DisaggregatedUnit:
    """A DistServe placement: prefill and decode instances, their TPs, and where they sit."""

    tp_prefill: int
    n_prefill: int
    tp_decode: int
    n_decode: int
    affinity: str = "low"

    system = DISTSERVE

    @property
    def num_gpus(self) -> int:
        return self.tp_prefill * self.n_prefill + self.tp_decode * self.n_decode

    def describe(self) -> str:
        return (f"{self.n_prefill}x prefill TP {self.tp_prefill} + {self.n_decode}x decode TP {self.tp_decode} "
                f"({self.affinity} affinity)")

    def nodes_needed(self, gpus_per_node: int) -> int:
        if self.affinity == "low":
            return 1
        per_node = lambda tp, n: math.ceil(tp * n / gpus_per_node)  # noqa: E731
        return per_node(self.tp_prefill, self.n_prefill) + per_node(self.tp_decode, self.n_decode)

    def cluster(self, hardware: Hardware, objective: ServiceObjective, settings: SearchSettings,
                copies: int = 1) -> ClusterConfig:
        replicas: list[SimulationConfig] = []
        nodes = self.nodes_needed(hardware.gpus_per_node)
        for copy in range(copies):
            first_node = copy * nodes
            replicas += self._instances(hardware, objective, "prefill", self.tp_prefill, self.n_prefill, first_node)
            decode_node = first_node if self.affinity == "low" else first_node + math.ceil(
                self.tp_prefill * self.n_prefill / hardware.gpus_per_node)
            replicas += self._instances(hardware, objective, "decode", self.tp_decode, self.n_decode, decode_node)
        return ClusterConfig(tuple(replicas), settings.router, settings.router, hardware.network)

    def _instances(self, hardware, objective, role, tp, count, first_node) -> list[SimulationConfig]:
        scheduler = PREFILL_SCHEDULER if role == "prefill" else DECODE_SCHEDULER
        policy = {} if role == "prefill" else {"token_budget": DECODE_TOKEN_BUDGET}
        per_node = max(1, hardware.gpus_per_node // tp)
        return [hardware.engine(tp, scheduler=scheduler, policy_config=policy, role=role,
                                slo_scale=objective.slo_scale,
                                node=first_node + (i // per_node if self.affinity == "high" else 0))
                for i in range(count)]


def placements(hardware: Hardware, settings: SearchSettings, affinities: Sequence[str] = ("low",)) -> list[DisaggregatedUnit]:
    """Every placement the search considers (see the module docstring)."""
    for affinity in affinities:
        if affinity not in AFFINITIES:
            raise UserError(f"unknown affinity {affinity!r}; choose one of {', '.join(AFFINITIES)}")
    degrees = hardware.parallel_degrees(settings.max_tp)
    units = []
    for affinity in affinities:
        for tp_p in degrees:
            for n_p in range(1, settings.max_instances + 1):
                for tp_d in degrees:
                    for n_d in range(1, settings.max_instances + 1):
                        unit = DisaggregatedUnit(tp_p, n_p, tp_d, n_d, affinity)
                        if affinity == "low" and unit.num_gpus > hardware.gpus_per_node:
                            continue
                        if unit.num_gpus > hardware.max_gpus:
                            continue
                        units.append(unit)
    return units


# --------------------------------------------------------------------- evaluation
def trace_at(trace: Trace, rate_rps: float, settings: SearchSettings) -> Trace:
    """The requests simulated at ``rate_rps`` (see "Trace length"), arriving at that rate."""
    if settings.min_requests:
        count = max(settings.min_requests, math.ceil(rate_rps * settings.min_duration_s))
        if count < len(trace.requests):
            trace = Trace(trace.requests.iloc[:count].reset_index(drop=True), trace.metadata)
    return at_rate(trace, rate_rps)


def attainment_at(trace: Trace, rate_rps: float, cluster: ClusterConfig, objective: ServiceObjective,
                  settings: SearchSettings) -> float:
    """The objective's attainment when ``trace`` (built at rate 1) arrives at ``rate_rps``."""
    return objective.attainment(simulate_cluster(trace_at(trace, rate_rps, settings), cluster).requests)


def unit_goodput(unit, trace: Trace, hardware: Hardware, objective: ServiceObjective,
                 settings: SearchSettings) -> dict[str, object]:
    """Goodput [requests/s] of one copy of ``unit``, by bisection over rates (bracketed by its
    burst throughput, see :class:`SearchSettings`)."""
    cluster = unit.cluster(hardware, objective, settings)
    burst_trace = Trace(trace.requests.iloc[: settings.min_requests or None].reset_index(drop=True), trace.metadata)
    burst = simulate_cluster(at_rate(burst_trace, BURST_RATE_RPS), cluster).summary["throughput_rps"]
    if not burst > 0:
        return {**unit_columns(unit), "goodput_rps": 0.0, "goodput_per_gpu_rps": 0.0, "evaluations": 1,
                "burst_throughput_rps": burst}
    low, high = (f * burst for f in settings.bracket_fractions)
    found = goodput_search(lambda rate: attainment_at(trace, rate, cluster, objective, settings), low, high,
                           target=objective.target, relative_tolerance=settings.relative_tolerance,
                           max_evaluations=settings.max_evaluations)
    if found["goodput_rps"] == 0.0:  # even the low start missed: look lower once
        found = goodput_search(lambda rate: attainment_at(trace, rate, cluster, objective, settings), low / 16, low,
                               target=objective.target, relative_tolerance=settings.relative_tolerance,
                               max_evaluations=settings.max_evaluations)
    return {**unit_columns(unit), "goodput_rps": found["goodput_rps"],
            "goodput_per_gpu_rps": found["goodput_rps"] / unit.num_gpus, "evaluations": 1 + len(found["evaluations"]),
            "burst_throughput_rps": burst}


def unit_columns(unit) -> dict[str, object]:
    columns = {"system": unit.system, "num_gpus_per_unit": unit.num_gpus, "unit": unit.describe()}
    if isinstance(unit, DisaggregatedUnit):
        columns.update(asdict(unit))
    else:
        columns.update({"tp": unit.tp})
    return columns


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="unit", total=total, disable=not enabled)


def placement_search(trace: Trace, hardware: Hardware, objective: ServiceObjective,
                     settings: SearchSettings = SearchSettings(), affinities: Sequence[str] = ("low",),
                     progress: bool = False) -> pd.DataFrame:
    """Every placement's goodput and goodput per GPU, best per GPU first (ties: fewer GPUs)."""
    units = placements(hardware, settings, affinities)
    rows = [unit_goodput(u, trace, hardware, objective, settings)
            for u in _progress(units, progress, f"placement {hardware.model}", len(units))]
    table = pd.DataFrame(rows)
    return table.sort_values(["goodput_per_gpu_rps", "num_gpus_per_unit"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


def colocated_search(trace: Trace, scheduler: str, hardware: Hardware, objective: ServiceObjective,
                     settings: SearchSettings = SearchSettings(), progress: bool = False) -> pd.DataFrame:
    """One replica of ``scheduler`` at each TP: its goodput and goodput per GPU, best first."""
    units = [ColocatedUnit(scheduler, tp) for tp in hardware.parallel_degrees(settings.max_tp)]
    rows = [unit_goodput(u, trace, hardware, objective, settings)
            for u in _progress(units, progress, f"{scheduler} {hardware.model}", len(units))]
    return pd.DataFrame(rows).sort_values(["goodput_per_gpu_rps", "num_gpus_per_unit"], ascending=[False, True],
                                          kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------- GPU count
def copies_needed(unit, goodput_rps: float, target_rps: float, trace: Trace, hardware: Hardware,
                  objective: ServiceObjective, settings: SearchSettings) -> tuple[int | None, str]:
    """Fewest copies of ``unit`` meeting the objective at ``target_rps`` (``None`` and why, if no
    cluster within ``hardware.max_gpus`` does)."""
    max_copies = hardware.max_gpus // unit.num_gpus
    if max_copies < 1:
        return None, f"one unit ({unit.num_gpus} GPUs) exceeds the cap of {hardware.max_gpus} GPUs"
    cache: dict[int, bool] = {}

    def meets(copies: int) -> bool:
        if copies not in cache:
            cluster = unit.cluster(hardware, objective, settings, copies)
            cache[copies] = attainment_at(trace, target_rps, cluster, objective, settings) >= objective.target
        return cache[copies]

    guess = max(1, math.ceil(target_rps / goodput_rps)) if goodput_rps > 0 else max_copies
    copies = min(guess, max_copies)
    while not meets(copies):
        if copies == max_copies:
            return None, f"not reachable within {hardware.max_gpus} GPUs ({max_copies} x {unit.num_gpus})"
        copies = min(max_copies, max(copies + 1, math.ceil(copies * 1.25)))
    while copies > 1 and meets(copies - 1):
        copies -= 1
    return copies, ""


def gpus_needed(units: pd.DataFrame, target_rates_rps: Sequence[float], trace: Trace, hardware: Hardware,
                objective: ServiceObjective, settings: SearchSettings = SearchSettings(),
                progress: bool = False) -> pd.DataFrame:
    """Per system and target rate: the fewest GPUs meeting the objective, over the units in
    ``units`` (rows of :func:`placement_search` / :func:`colocated_search`; the
    ``placements_to_scale`` best per system are scaled). A target no cluster within the cap
    reaches gets ``num_gpus`` NaN, ``reachable`` False and the reason. ``steady`` says whether the
    requests simulated at the rate span at least ``min_duration_s`` of arrivals (else the trace
    ran out: a short burst, which a cluster drains more easily than a steady load)."""
    for rate in target_rates_rps:
        if not (rate > 0 and math.isfinite(rate)):
            raise UserError(f"target rates must be positive numbers, got {rate}")
    rows = []
    best = units.groupby("system", sort=False).head(settings.placements_to_scale)
    work = [(row, rate) for _, row in best.iterrows() for rate in target_rates_rps]
    for row, rate in _progress(work, progress, f"gpus-needed {hardware.model}", len(work)):
        unit = unit_from_row(row)
        copies, reason = copies_needed(unit, row["goodput_rps"], rate, trace, hardware, objective, settings)
        simulated = len(trace_at(trace, rate, settings).requests)
        rows.append({"system": unit.system, "target_rate_rps": rate, "unit": unit.describe(),
                     "num_requests_simulated": simulated, "arrival_span_s": simulated / rate,
                     "steady": simulated / rate >= settings.min_duration_s,
                     "num_gpus_per_unit": unit.num_gpus, "copies": copies,
                     "num_gpus": copies * unit.num_gpus if copies else math.nan,
                     "reachable": copies is not None, "reason": reason})
    table = pd.DataFrame(rows)
    return _fewest(table)


def _fewest(table: pd.DataFrame) -> pd.DataFrame:
    """The unit with the fewest GPUs per system and rate (unreachable rows only if none reaches)."""
    ranked = table.assign(_order=table["num_gpus"].fillna(math.inf))
    ranked = ranked.sort_values(["system", "target_rate_rps", "_order"], kind="stable")
    return ranked.groupby(["system", "target_rate_rps"], sort=False).head(1).drop(columns="_order").reset_index(drop=True)


def unit_from_row(row: Mapping[str, object]):
    if row["system"] == DISTSERVE:
        return DisaggregatedUnit(int(row["tp_prefill"]), int(row["n_prefill"]), int(row["tp_decode"]),
                                 int(row["n_decode"]), str(row["affinity"]))
    return ColocatedUnit(str(row["system"]), int(row["tp"]))

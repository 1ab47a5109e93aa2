"""Scheduling policies, written once against a small state/decision interface (no vLLM import).

* :class:`Request` - a request's token counters (predicted length only, never the true one);
* :class:`KVCache` - block accounting: allocated, reserved, global reserve, loans, free;
* :class:`SchedulerDecision` - one step: prefill chunks, decodes, preemptions, rejections, KV
  allocations and reservations;
* :class:`Policy` - owns the queues and the KV cache; ``add_request``, ``schedule``,
  ``update_from_output``; counts its own invocations and wall time;
* :func:`parse_policy_spec` - ``name[knob=value,...]`` specs (benchmarks, notebook 04);
* :func:`make_policy` - ``vllm``, ``vllm-chunked``, ``orca``, ``sarathi``, ``fastgen``, and
  ``econoserve`` with its ablations ``econoserve-no-kvcpipe``, ``econoserve-no-ordering``,
  ``econoserve-no-syncdecoupled``, ``econoserve-oracle``.
"""

from econoserve.policy.base import DEFAULT_SLO_SCALE, EngineLimits, Policy
from econoserve.policy.decision import SchedulerDecision, SchedulerStats
from econoserve.policy.econoserve import EconoServeConfig, EconoServePolicy
from econoserve.policy.kv_cache import KVCache, KVCacheError
from econoserve.policy.registry import (
    POLICIES,
    PolicyConfigError,
    make_config,
    make_policy,
    parse_policy_spec,
    policy_names,
    register_policy,
    with_engine_max_num_seqs,
)
from econoserve.policy.request import Request, RequestStatus

__all__ = [
    "DEFAULT_SLO_SCALE",
    "EconoServeConfig",
    "EconoServePolicy",
    "EngineLimits",
    "KVCache",
    "KVCacheError",
    "POLICIES",
    "Policy",
    "PolicyConfigError",
    "Request",
    "RequestStatus",
    "SchedulerDecision",
    "SchedulerStats",
    "make_config",
    "make_policy",
    "parse_policy_spec",
    "policy_names",
    "register_policy",
    "with_engine_max_num_seqs",
]

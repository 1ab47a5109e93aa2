"""A vLLM scheduler stepped without a model: the real scheduler class on a real vLLM
configuration and KV cache manager, answered by a stand-in model output.

For tests (refusals, rejections, aborts in any state) and for measuring ``schedule()`` itself
(``benchmarks/bench_scheduler_cost.py``): the model's forward pass is the one part left out, so
what is timed is the scheduler's own work at any number of running requests, without a model
step that would dwarf it. KV blocks are counted by vLLM's own ``KVCacheManager``; no KV tensors
are allocated (``kv_cache_tensors=[]``).

::

    scheduler = stepped_scheduler(model_dir, "econoserve.serving.scheduler.EconoServeScheduler", num_blocks=65)
    scheduler.add_request(engine_request("a", prompt_tokens=40, max_tokens=8))
    while scheduler.has_requests():
        output = scheduler.schedule()
        scheduler.update_from_output(output, stand_in_model_output(scheduler, output))

This module imports vLLM; import it only where vLLM is installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: vLLM's own v1 scheduler (what ``vllm serve`` runs without ``--scheduler-cls``).
VLLM_DEFAULT_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"


def stepped_scheduler(
    model_dir: str | Path,
    scheduler_cls: str,
    num_blocks: int,
    block_size: int = 32,
    max_model_len: int = 1024,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 8,
    additional_config: dict[str, Any] | None = None,
    mutate: Callable[[Any], None] | None = None,
) -> Any:
    """Scheduler ``scheduler_cls`` (a dotted class path) on a KV cache of ``num_blocks`` blocks of
    ``block_size`` tokens (one of them vLLM's null block), built from ``model_dir``'s config;
    ``mutate(vllm_config)`` may change the configuration before the scheduler is built."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    args = EngineArgs(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len,
        block_size=block_size, enable_prefix_caching=False, async_scheduling=False, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=True, scheduler_cls=scheduler_cls,
        additional_config=additional_config or {},
    )  # fmt: skip
    vllm_config = args.create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=4, head_size=64, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.decoder.layers.0.self_attn.attn"], spec)],
    )  # fmt: skip
    if mutate is not None:
        mutate(vllm_config)
    module_name, _, class_name = scheduler_cls.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config), block_size=block_size,
    )  # fmt: skip


def engine_request(request_id: str, prompt_tokens: int, max_tokens: int, predicted: int | None = None,
                   **sampling: Any) -> Any:
    """A vLLM ``Request`` of ``prompt_tokens`` token ids that generates exactly ``max_tokens``
    (``ignore_eos``), carrying ``predicted`` as its ``predicted_output_tokens`` if given."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    extra = {"predicted_output_tokens": predicted} if predicted is not None else None
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, extra_args=extra, **sampling)
    return Request(request_id, list(range(4, 4 + prompt_tokens)), params, None)


def stand_in_model_output(scheduler: Any, output: Any) -> Any:
    """What a model would return for ``output``: one sampled token per request whose scheduled
    tokens reach its end (none for a prompt chunk short of it)."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests.get(req_id)
        sampled.append([] if request is None or request.is_prefill_chunk else [11])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled)

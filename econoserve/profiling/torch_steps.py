"""Measured step times of a real architecture with PyTorch and ``transformers`` alone (no vLLM).

For GPUs where vLLM cannot be installed: the model is built from its real configuration (a
catalog entry, e.g. Llama-2-7B or OPT-13B, or any Hugging Face ``config.json``) with random
weights (step time does not depend on them), in bf16 on a GPU (fp32 on CPU), attention through
PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``). Every cell of a
:class:`~econoserve.serving.profiler.ProfileGrid` (prefill tokens, decode batch size, context
length) is one *step*, timed ``warmup + repeats`` times:

* the decode batch: ``decode_batch`` requests, each with ``context_length`` tokens already in a
  KV cache (a ``DynamicCache`` filled with random keys and values), run one token forward;
  the cache is cut back to ``context_length`` after each step, so every repeat is alike;
* the prefill: one request of ``prefill_tokens`` tokens from an empty cache;
* a mixed cell runs both, **as two forward passes** inside the one timed step (the model is
  not a fused, paged engine): it reads the weights twice where vLLM reads them once, so mixed
  steps here cost about one weight read more than in a fused engine. Pure cells are exact.

Only the last position's logits are computed (``logits_to_keep=1``), as a serving engine does.
On CUDA the clock is read after ``torch.cuda.synchronize()``. Cells whose KV cache would exceed
``max_kv_bytes`` are skipped and counted.

The table has the columns of :data:`econoserve.serving.profiler.STEP_TIME_COLUMNS` (what the
latency fit and ``econoserve calibrate`` read), plus ``attention_pairs`` (causal query-key
pairs); ``engine_step_time_s`` equals ``step_time_s`` (no engine around the forward) and
``schedule_time_s`` is 0.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from econoserve.errors import UserError
from econoserve.serving.profiler import STEP_TIME_COLUMNS, ProfileGrid, StepTimeProfile
from econoserve.sim.catalog import ModelSpec

TORCH_STEP_COLUMNS: tuple[str, ...] = (*STEP_TIME_COLUMNS, "attention_pairs")
DTYPES = ("bfloat16", "float16", "float32")
GPU_GRID = ProfileGrid(
    prefill_tokens=(0, 16, 64, 256, 1024, 2048),
    decode_batch_sizes=(0, 1, 8, 32, 64, 128),
    context_lengths=(128, 512, 1024, 1920),
    repeats=5,
    warmup=2,
)
"""A grid for a data-centre GPU (``econoserve profile-gpu``'s default on CUDA)."""


@dataclass(frozen=True)
class TorchProfileConfig:
    """How the model is built and run.

    device:
        ``cuda``, ``cuda:N`` or ``cpu``.
    dtype:
        Parameter and activation type; ``None`` = ``bfloat16`` on CUDA, ``float32`` on CPU.
    attention:
        ``transformers``' ``attn_implementation`` (``sdpa``: PyTorch's fused attention).
    seed:
        Seeds the random weights, token ids and KV contents.
    max_kv_bytes:
        Largest decode KV cache a cell may allocate [bytes]; ``None`` = 60% of the device's
        free memory after the model is built (on CPU: no limit).
    """

    device: str = "cuda"
    dtype: str | None = None
    attention: str = "sdpa"
    seed: int = 0
    max_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_kv_bytes is not None and self.max_kv_bytes <= 0:
            raise UserError(f"max_kv_bytes must be > 0, got {self.max_kv_bytes}")

    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")


def hf_config_from_spec(spec: ModelSpec):
    """A ``transformers`` configuration with the catalog model's shape: Llama for gated MLPs,
    OPT otherwise (the two architectures the catalog holds)."""
    from transformers import LlamaConfig, OPTConfig

    if spec.gated_mlp:
        return LlamaConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                           num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                           num_key_value_heads=spec.num_kv_heads, vocab_size=spec.vocab_size,
                           max_position_embeddings=spec.max_context_tokens, rms_norm_eps=1e-5)
    return OPTConfig(hidden_size=spec.hidden_size, ffn_dim=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                     num_attention_heads=spec.num_heads, vocab_size=spec.vocab_size,
                     max_position_embeddings=spec.max_context_tokens, word_embed_proj_dim=spec.hidden_size,
                     do_layer_norm_before=True)


def load_hf_config(path: str | Path):
    """A ``transformers`` configuration from a local ``config.json`` (or its folder)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model configuration")
    try:
        return AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: not a transformers model configuration ({error})") from None


class _Runner:
    """A random-weight model on a device, and the two kinds of forward a step is made of."""

    def __init__(self, hf_config, config: TorchProfileConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA device here (use --device cpu)")
        self.torch = torch
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.resolved_dtype())
        torch.manual_seed(config.seed)
        with self.device:
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype,
                                                          attn_implementation=config.attention)
        self.model.eval()
        self.config = hf_config
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.vocab_size = text.vocab_size
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.max_kv_bytes = config.max_kv_bytes
        if self.max_kv_bytes is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.max_kv_bytes = int(0.6 * free)

    def kv_bytes(self, batch: int, context: int) -> int:
        element = self.torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * batch * self.num_kv_heads * (context + 1) * self.head_dim * element

    def _ids(self, rows: int, columns: int):
        return self.torch.randint(0, self.vocab_size, (rows, columns), generator=self.generator, device=self.device)

    def decode_cache(self, batch: int, context: int):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        shape = (batch, self.num_kv_heads, context, self.head_dim)
        for layer in range(self.num_layers):
            keys = self.torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
            values = self.torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
            cache.update(keys, values, layer)
        return cache

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def step(self, prefill: int, batch: int, context: int, cache) -> float:
        """One timed step [s]; the decode cache is cut back to ``context`` afterwards."""
        torch = self.torch
        prompt = self._ids(1, prefill) if prefill else None
        tokens = self._ids(batch, 1) if batch else None
        positions = torch.full((batch, 1), context, device=self.device) if batch else None
        with torch.inference_mode():
            self.synchronize()
            started = time.perf_counter()
            if prefill:
                self.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            if batch:
                self.model(input_ids=tokens, past_key_values=cache, position_ids=positions, use_cache=True,
                           logits_to_keep=1)
            self.synchronize()
            elapsed = time.perf_counter() - started
        if batch:
            cache.crop(-(cache.get_seq_length() - context))
        return elapsed


def profile_torch_steps(hf_config, config: TorchProfileConfig = TorchProfileConfig(),
                        grid: ProfileGrid = ProfileGrid(), progress: bool = True) -> StepTimeProfile:
    """Measure every cell of ``grid`` on a random-weight model of ``hf_config`` (see the module
    docstring); ``dropped_steps`` counts the steps of cells skipped for memory or context."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    runner = _Runner(hf_config, config)
    max_positions = getattr(runner.config, "max_position_embeddings", None)
    rows: list[dict[str, Any]] = []
    dropped = 0
    cells = list(grid.cells())
    for prefill, batch, context in tqdm(cells, desc="profile", unit="cell", disable=not progress):
        too_long = max_positions is not None and max(prefill, context + 1) > max_positions
        too_big = batch and runner.max_kv_bytes is not None and runner.kv_bytes(batch, context) > runner.max_kv_bytes
        if too_long or too_big:
            dropped += grid.repeats
            continue
        cache = runner.decode_cache(batch, context) if batch else None
        for repeat in range(-grid.warmup, grid.repeats):
            elapsed = runner.step(prefill, batch, context, cache)
            if repeat >= 0:
                rows.append(_row(prefill, batch, context, repeat, elapsed))
        del cache
    table = pd.DataFrame(rows, columns=list(TORCH_STEP_COLUMNS))
    engine = {"kind": "torch", "model": type(runner.model).__name__, **asdict(config),
              "dtype": config.resolved_dtype(), "hf_config": runner.config.to_dict()}
    return StepTimeProfile(table, dropped, engine, asdict(grid), time.monotonic() - started)


def _row(prefill: int, batch: int, context: int, repeat: int, elapsed: float) -> dict[str, Any]:
    decode_context = batch * (context + 1)  # each decoder reads its cache and its new token
    return {
        "prefill_tokens": prefill,
        "decode_tokens": batch,
        "context_tokens": prefill + decode_context,
        "step_time_s": elapsed,
        "engine_step_time_s": elapsed,
        "num_prefill_requests": int(prefill > 0),
        "num_decode_requests": batch,
        "schedule_time_s": 0.0,
        "cell_prefill_tokens": prefill,
        "cell_decode_batch": batch,
        "cell_context_length": context,
        "repeat": repeat,
        "attention_pairs": prefill * (prefill + 1) / 2 + decode_context,
    }


__all__ = [
    "GPU_GRID",
    "TORCH_STEP_COLUMNS",
    "TorchProfileConfig",
    "hf_config_from_spec",
    "load_hf_config",
    "profile_torch_steps",
]

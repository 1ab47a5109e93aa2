"""Hardware and model catalogs, and the KV capacity of a deployment.

GPU figures are the vendor's datasheet numbers (dense bf16 tensor-core peak, HBM bandwidth,
memory as reported by the driver). Model shapes are from each model's Hugging Face
``config.json``. KV bytes per token = 2 (K and V) x layers x KV heads x head size x bytes per
element (2 for fp16/bf16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

from econoserve.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """One GPU [FLOP/s, bytes/s, bytes]."""

    name: str
    peak_bf16_flops: float
    """Dense bf16/fp16 tensor-core peak [FLOP/s]."""
    hbm_bandwidth_bytes_per_s: float
    """HBM bandwidth [bytes/s]."""
    memory_bytes: int
    """Device memory [bytes]."""
    interconnect_bandwidth_bytes_per_s: float
    """Per-GPU NVLink bandwidth, one direction [bytes/s] (tensor-parallel all-reduce)."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape (Hugging Face ``config.json``)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_context_tokens: int
    gated_mlp: bool
    """True for Llama's SwiGLU MLP (three matrices), False for OPT's two-matrix MLP."""
    bytes_per_element: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token over all layers and heads (whole model, before TP split)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_element

    @property
    def num_layer_parameters(self) -> int:
        """Parameters in the transformer layers (attention + MLP matrices), no embeddings."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2  # q, o; k, v
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def num_parameters(self) -> int:
        """All parameters, with the embedding and (untied) LM head."""
        embeddings = self.vocab_size * self.hidden_size * (1 if not self.gated_mlp else 2)
        return self.num_layer_parameters + embeddings

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.bytes_per_element


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        # NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; 40GB: 1,555 GB/s; 80GB SXM: 2,039 GB/s;
        # NVLink 3: 600 GB/s bidirectional per GPU.
        GPUSpec("a100-40gb", 312e12, 1555e9, 40 * GIB, 300e9),
        GPUSpec("a100-80gb", 312e12, 2039e9, 80 * GIB, 300e9),
        # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s; NVLink 4: 900 GB/s bidir.
        GPUSpec("h100-80gb", 989e12, 3350e9, 80 * GIB, 450e9),
        # NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense (the H100's compute), 4.8 TB/s HBM3e,
        # 141 GB (143,771 MiB as the driver reports it); NVLink 4: 900 GB/s bidirectional.
        GPUSpec("h200-141gb", 989e12, 4800e9, 143_771 * 1024**2, 450e9),
    )
}


@dataclass(frozen=True)
class LinkSpec:
    """A link a KV cache crosses between a prefill and a decode instance (disaggregation).

    bandwidth_bytes_per_s:
        One direction, per GPU pair [bytes/s]; a transfer between instances of tensor-parallel
        degrees ``a`` and ``b`` moves its shards over ``min(a, b)`` such links at once.
    latency_s:
        Fixed cost of one transfer [s] (connection set-up, the first byte).
    """

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def transfer_time_s(self, num_bytes: float, num_parallel_links: int = 1) -> float:
        """Time to move ``num_bytes`` [bytes] over ``num_parallel_links`` links at once [s]."""
        return self.latency_s + num_bytes / (self.bandwidth_bytes_per_s * max(1, num_parallel_links))


#: Links between nodes (a prefill and a decode instance on different nodes). DistServe's
#: testbed (OSDI'24, section 6.1): 25 Gbps between nodes; InfiniBand HDR (200 Gbps) and NDR (400
#: Gbps) per GPU are the usual A100 / H100 cluster fabrics.
NETWORK_LINKS: dict[str, LinkSpec] = {
    link.name: link
    for link in (
        LinkSpec("ethernet-25g", 25e9 / 8, 50e-6),
        LinkSpec("infiniband-200g", 200e9 / 8, 10e-6),
        LinkSpec("infiniband-400g", 400e9 / 8, 10e-6),
    )
}
DEFAULT_NETWORK = "ethernet-25g"
#: Fixed cost of a transfer over NVLink within a node [s].
NVLINK_LATENCY_S = 5e-6


def nvlink(gpu: GPUSpec) -> LinkSpec:
    """The NVLink between two GPUs of one node (the GPU's per-GPU interconnect bandwidth)."""
    return LinkSpec(f"nvlink-{gpu.name}", gpu.interconnect_bandwidth_bytes_per_s, NVLINK_LATENCY_S)


def get_network(name: str) -> LinkSpec:
    try:
        return NETWORK_LINKS[name.lower()]
    except KeyError:
        raise UserError(f"unknown network link {name!r}; choose one of {', '.join(NETWORK_LINKS)}") from None


@dataclass(frozen=True)
class RooflineCalibration:
    """Roofline factors (:class:`~econoserve.sim.latency.RooflineParams` fields) fitted to
    real measurements of one GPU at one tensor-parallel degree.

    factors:
        The fitted fields and values (efficiencies [fraction], fixed costs [s], overlap exponent).
    source:
        The registered profile they were fitted to (``data/registry.toml``).
    """

    gpu: str
    tensor_parallel: int
    factors: Mapping[str, float] = field(default_factory=dict)
    source: str = ""


# Measured: fitted by benchmarks/bench_latency_calibration.py to DistServe's A100-80GB SXM step
# times of its own engine (OPT-13B and OPT-66B pooled per TP; the error of each fit is in
# benchmarks/results/latency_calibration.md). GPUs and TPs absent here get an estimate from the
# nearest measured entry (econoserve.sim.calibration.calibrated_params), marked as such.
ROOFLINE_CALIBRATIONS: dict[tuple[str, int], RooflineCalibration] = {
    (c.gpu, c.tensor_parallel): c
    for c in (
        RooflineCalibration("a100-80gb", 1, {"compute_efficiency": 0.6567, "attention_compute_efficiency": 1.0, "memory_efficiency": 0.7022, "interconnect_efficiency": 0.7, "allreduce_latency_s": 1e-05, "step_overhead_s": 0.002147, "overlap_exponent": 1.478}, "distserve-a100-fits"),
        RooflineCalibration("a100-80gb", 2, {"compute_efficiency": 1.0, "attention_compute_efficiency": 1.0, "memory_efficiency": 0.7463, "interconnect_efficiency": 0.06966, "allreduce_latency_s": 0.0, "step_overhead_s": 0.005346, "overlap_exponent": 1.246}, "distserve-a100-fits"),
        RooflineCalibration("a100-80gb", 3, {"compute_efficiency": 0.9894, "attention_compute_efficiency": 1.0, "memory_efficiency": 0.8359, "interconnect_efficiency": 0.1153, "allreduce_latency_s": 3.676e-05, "step_overhead_s": 0.005708, "overlap_exponent": 2.004}, "distserve-a100-fits"),
        RooflineCalibration("a100-80gb", 4, {"compute_efficiency": 1.0, "attention_compute_efficiency": 1.0, "memory_efficiency": 0.6541, "interconnect_efficiency": 0.1553, "allreduce_latency_s": 0.0, "step_overhead_s": 0.005962, "overlap_exponent": 1.605}, "distserve-a100-fits"),
        RooflineCalibration("a100-80gb", 8, {"compute_efficiency": 0.4776, "attention_compute_efficiency": 1.0, "memory_efficiency": 0.4826, "interconnect_efficiency": 1.0, "allreduce_latency_s": 2.13e-05, "step_overhead_s": 0.003377, "overlap_exponent": 1.209}, "distserve-a100-fits"),
    )
}

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("opt-13b", 40, 5120, 40, 40, 20480, 50272, 2048, gated_mlp=False),
        ModelSpec("opt-66b", 64, 9216, 72, 72, 36864, 50272, 2048, gated_mlp=False),
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, gated_mlp=True),
        ModelSpec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, gated_mlp=True),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, gated_mlp=True),
    )
}


def get_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise UserError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}") from None


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class Deployment:
    """A model on ``tensor_parallel`` GPUs of one kind, and how its memory is split.

    gpu_memory_utilization:
        Fraction of each GPU's memory the engine may use (vLLM's default 0.9).
    activation_reserve_bytes_per_gpu:
        Memory kept for activations and the CUDA graph pool per GPU [bytes] (vLLM measures it by
        a profiling run; 2 GiB is a typical figure for 13B-70B models at 8k batched tokens).
    block_size:
        Tokens per KV block [tokens].
    """

    model: ModelSpec
    gpu: GPUSpec
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes_per_gpu: int = 2 * GIB
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise UserError(f"--tp must be >= 1, got {self.tensor_parallel}")
        if self.model.num_kv_heads % self.tensor_parallel and self.tensor_parallel % self.model.num_kv_heads:
            raise UserError(
                f"--tp {self.tensor_parallel} does not divide {self.model.name}'s {self.model.num_kv_heads} KV heads"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UserError(f"gpu memory utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size <= 0:
            raise UserError(f"block size must be > 0, got {self.block_size}")

    @property
    def kv_capacity_bytes(self) -> int:
        """Memory x utilization - weights - activation reserve, over all GPUs [bytes]."""
        tp = self.tensor_parallel
        usable = int(self.gpu.memory_bytes * self.gpu_memory_utilization) * tp
        return usable - self.model.weight_bytes - self.activation_reserve_bytes_per_gpu * tp

    @property
    def num_kv_blocks(self) -> int:
        """KV capacity in blocks; raises UserError when the weights do not fit."""
        capacity = self.kv_capacity_bytes
        blocks = capacity // (self.model.kv_bytes_per_token * self.block_size)
        if blocks <= 0:
            raise UserError(
                f"{self.model.name} ({self.model.weight_bytes / GIB:.1f} GiB of weights) leaves no KV cache "
                f"on {self.tensor_parallel} x {self.gpu.name}; raise --tp"
            )
        return int(blocks)

    def describe(self, num_kv_blocks: int | None = None) -> dict[str, object]:
        """Everything about the deployment, for a run's configuration; ``num_kv_blocks`` records
        an overridden capacity instead of the computed one."""
        return {
            "model": asdict(self.model),
            "gpu": asdict(self.gpu),
            "tensor_parallel": self.tensor_parallel,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "activation_reserve_bytes_per_gpu": self.activation_reserve_bytes_per_gpu,
            "block_size": self.block_size,
            "weight_bytes": self.model.weight_bytes,
            "kv_bytes_per_token": self.model.kv_bytes_per_token,
            "kv_capacity_bytes": self.kv_capacity_bytes,
            "num_kv_blocks": self.num_kv_blocks if num_kv_blocks is None else num_kv_blocks,
            "num_kv_blocks_overridden": num_kv_blocks is not None,
        }

"""Small random-weight models of real architectures, built locally for the serving harness.

Scheduling does not depend on what a model says, only on its shape (layers, hidden size, heads:
they set the KV cache's bytes per token and the step time) and on the token counts, which the
harness fixes with ``ignore_eos=True`` and ``max_tokens``. So the CPU engine runs a small OPT
model with random weights, built from a config here: no download, no tokenizer (vLLM runs with
``skip_tokenizer_init=True`` and token-id prompts).

A model is a Hugging Face directory (``config.json`` + ``model.safetensors``) in the model
cache, named by a hash of its :class:`TinyModelSpec`; the same spec gives the same weights
(seeded) and is built once. :func:`resolve_model` turns a model name from the command line
(``tiny-opt`` or a local path) into such a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from econoserve.errors import UserError

#: The name that selects the built-in tiny model on the command line.
TINY_OPT = "tiny-opt"

#: Environment variable naming the model cache (default: ``models/`` under the data cache).
MODEL_CACHE_ENV = "ECONOSERVE_MODEL_CACHE"

_WEIGHTS_FILE = "model.safetensors"
_SPEC_FILE = "econoserve_model_spec.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a random-weight OPT decoder (``transformers.OPTConfig`` fields).

    The defaults make a ~20M-parameter model whose step time on 2 CPU cores is a few to a few
    tens of milliseconds. ``vocab_size`` is OPT's real vocabulary, so token ids of any OPT/GPT-2
    tokenized prompt are valid inputs; ``max_position_embeddings`` bounds prompt + output
    [tokens].
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_dim", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UserError(f"tiny model: {name} is {getattr(self, name)}; must be > 0")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"tiny model: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"tiny model: dtype {self.dtype!r}; use float32, bfloat16 or float16")

    @property
    def digest(self) -> str:
        """A short hash naming this spec's directory in the model cache."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies (keys and values, all layers)."""
        element_bytes = 4 if self.dtype == "float32" else 2
        return 2 * self.num_layers * self.hidden_size * element_bytes

    def hf_config(self):
        """The ``transformers.OPTConfig`` for this spec."""
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            ffn_dim=self.ffn_dim,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            word_embed_proj_dim=self.hidden_size,
            do_layer_norm_before=True,
            torch_dtype=self.dtype,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )


def model_cache_dir() -> Path:
    """Where built models live: ``$ECONOSERVE_MODEL_CACHE``, else ``models/`` in the data cache."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    if configured:
        return Path(configured)
    from econoserve.workload.registry import cache_dir

    return cache_dir() / "models"


def build_tiny_model(spec: TinyModelSpec = TinyModelSpec(), cache: Path | None = None) -> Path:
    """Build (once) the random-weight OPT model of ``spec`` and return its directory.

    The weights are drawn by ``transformers``' own initialisation under ``torch.manual_seed``
    (``spec.seed``), so a spec always yields the same tensors. The directory is written under a
    temporary name and renamed into place, so a half-built model is never picked up.
    """
    target = (cache or model_cache_dir()) / f"tiny-opt-{spec.digest}"
    if (target / _WEIGHTS_FILE).is_file() and (target / "config.json").is_file():
        return target

    import torch
    from transformers import OPTForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = OPTForCausalLM(spec.hf_config())
        model = model.to(getattr(torch, spec.dtype))
        model.save_pretrained(staging, safe_serialization=True)
        (staging / _SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process built it first
            if not (target / _WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str, spec: TinyModelSpec | None = None) -> Path:
    """The model directory for a command-line model name.

    ``tiny-opt`` builds (or reuses) the tiny model of ``spec`` (default :class:`TinyModelSpec`);
    anything else must be a local directory holding a Hugging Face ``config.json``.
    """
    if name == TINY_OPT:
        return build_tiny_model(spec or TinyModelSpec())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(
            f"model {name!r}: not {TINY_OPT!r} and no such local directory "
            "(models are never downloaded; pass a directory with config.json and weights)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"model {name!r}: {path / 'config.json'} is missing; not a Hugging Face model directory")
    return path.resolve()


#: The chat template of :func:`with_gpt2_tokenizer` models: each turn as ``role: content``, then
#: ``assistant:`` (content does not matter to scheduling; the template only has to exist).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def with_gpt2_tokenizer(model_dir: Path) -> Path:
    """A copy of ``model_dir`` (weights linked, not copied) with the GPT-2 byte-level BPE tokenizer
    (OPT's own vocabulary) and :data:`CHAT_TEMPLATE`, for clients that send text: ``vllm bench
    serve``, the ``openai`` client's completions and chat. Built once, beside ``model_dir``.

    The tokenizer comes from the registered ``gpt2-vocab`` / ``gpt2-merges`` files (data mirror or
    cache); its ids are below OPT's ``vocab_size``, so any text maps to valid token ids.
    """
    model_dir = Path(model_dir)
    target = model_dir.with_name(model_dir.name + "-gpt2-tokenizer")
    if (target / "tokenizer_config.json").is_file():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from econoserve.workload.registry import dataset_path

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for item in model_dir.iterdir():
            (staging / item.name).symlink_to(item.resolve())
        bpe = Tokenizer(models.BPE.from_file(str(dataset_path("gpt2-vocab")), str(dataset_path("gpt2-merges"))))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        end = "<|endoftext|>"
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process built it first
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_vocab_size(model_dir: Path) -> int:
    """``vocab_size`` from a model directory's ``config.json`` (bounds random prompt token ids)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise UserError(f"model {model_dir}: config.json has no positive vocab_size")
    return vocab


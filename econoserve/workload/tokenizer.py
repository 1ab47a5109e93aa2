"""Offline tokenizers built from the registry's files.

``gpt2`` and ``opt`` are the same byte-level BPE (OpenAI's GPT-2 vocabulary and merges, which
Meta's OPT reuses), run with the ``tokenizers`` library. ``llama2`` is the Llama-2 SentencePiece
model, run with ``sentencepiece``. Counts never include special tokens (no BOS/EOS), so a
prompt's count is what the model attends to before its first generated token, less the BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from econoserve.errors import DataError
from econoserve.workload.registry import dataset_path

TOKENIZER_NAMES: tuple[str, ...] = ("gpt2", "opt", "llama2")
_ENCODE_BATCH = 2048
#: Texts above which encoding shows a progress bar (tokenizing ShareGPT takes seconds).
_PROGRESS_MIN_TEXTS = 20_000


class _Backend(Protocol):
    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def vocab_size(self) -> int: ...


@dataclass
class Tokenizer:
    """A named offline tokenizer: ``encode`` gives token ids, ``count`` tokens per text."""

    name: str
    backend: _Backend = field(repr=False)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        starts = range(0, len(texts), _ENCODE_BATCH)
        show = len(texts) >= _PROGRESS_MIN_TEXTS
        for start in tqdm(starts, desc=f"tokenize ({self.name})", unit="batch", disable=not show, leave=False):
            ids.extend(self.backend.encode(list(texts[start : start + _ENCODE_BATCH])))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ``ids`` (e.g. a prompt an engine received as ids)."""
        return self.backend.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Token ids this tokenizer can produce (its ids are ``0 .. vocab_size - 1``)."""
        return self.backend.vocab_size()

    def count(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per text (int64), no special tokens."""
        return np.fromiter((len(ids) for ids in self.encode(texts)), dtype=np.int64, count=len(texts))


class _ByteLevelBPE:
    def __init__(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        bpe = models.BPE.from_file(str(dataset_path("gpt2-vocab")), str(dataset_path("gpt2-merges")))
        self._tokenizer = HFTokenizer(bpe)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()


class _SentencePiece:
    def __init__(self) -> None:
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(dataset_path("llama2-tokenizer")))

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._processor.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._processor.decode(ids)

    def vocab_size(self) -> int:
        return self._processor.get_piece_size()


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer ``gpt2``, ``opt`` (same BPE as gpt2) or ``llama2``."""
    if name in ("gpt2", "opt"):
        return Tokenizer(name, _ByteLevelBPE())
    if name == "llama2":
        return Tokenizer(name, _SentencePiece())
    raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")

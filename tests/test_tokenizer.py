"""Offline tokenizers reproduce the reference token ids of the data README."""

from __future__ import annotations

import pytest

from econoserve.errors import DataError
from econoserve.workload.tokenizer import load_tokenizer

pytestmark = pytest.mark.realdata

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy.",
]


@pytest.mark.parametrize(
    "name, hello_ids, counts",
    [("gpt2", [15496, 995], [2, 10, 7]), ("opt", [15496, 995], [2, 10, 7]), ("llama2", [15043, 3186], [2, 12, 9])],
)
def test_reference_ids_and_counts(name, hello_ids, counts):
    tokenizer = load_tokenizer(name)
    assert tokenizer.encode(["Hello world"]) == [hello_ids]
    assert tokenizer.count(SENTENCES).tolist() == counts


def test_batches_larger_than_one_chunk_count_like_single_calls():
    tokenizer = load_tokenizer("gpt2")
    texts = [f"request number {i} " * (i % 7 + 1) for i in range(5000)]
    batched = tokenizer.count(texts)
    assert batched.tolist() == [len(tokenizer.encode([t])[0]) for t in texts[:50]] + batched[50:].tolist()
    assert batched[4999] == len(tokenizer.encode([texts[4999]])[0])


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="unknown tokenizer 'bert'; choose one of gpt2, opt, llama2"):
        load_tokenizer("bert")

"""Labelled prompts for training and evaluating the response-length predictor.

Datasets (all read from the registry / local mirror through :mod:`econoserve.workload`):

``alpaca-vicuna``  Alpaca prompts with the lengths Vicuna-7B actually generated for them
                   (Zheng et al., NeurIPS 2023): ``train`` = their 10k train file, ``test`` = their
                   10k val file (disjoint ids). Labels [Llama-2 tokens]: ``max`` (max over the four
                   temperatures, the target of their Acc-50/Acc-100 protocol and the default),
                   ``t0.0`` ``t0.3`` ``t0.5`` ``t0.7`` (one temperature each), ``gt`` (Alpaca's
                   reference answer), and for training ``temperatures``: the four single-temperature
                   samples stacked (four rows per prompt), which learns the distribution of one
                   generation's length rather than its maximum. The 19 ids whose Alpaca reference output is empty (8 train,
                   11 val) are dropped, because the Alpaca loader drops them.
``alpaca``         Alpaca prompts with reference-answer lengths (label ``reference``).
``sharegpt``       ShareGPT first-turn prompts with the first reply's length (vLLM's filter).
``qmsum``          QMSum query + relevant transcript spans with the reference answer's length.
``azure-conv``, ``azure-code``, ``mooncake``
                   token counts only (no text): for length-only models.

Every dataset but ``alpaca-vicuna`` is split into ``train`` and ``test`` by a seeded random split of
source records (:class:`SplitSpec`): all requests of one source record (a QMSum meeting) land on
the same side, so no meeting is in both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from econoserve.errors import PredictorError
from econoserve.workload.datasets import TIMESTAMPED_DATASETS, load_requests, load_vicuna_lengths
from econoserve.workload.registry import get_entry

VICUNA_DATASET = "alpaca-vicuna"
VICUNA_LABELS: dict[str, str] = {
    "max": "L_max",
    "t0.0": "L_t0.0",
    "t0.3": "L_t0.3",
    "t0.5": "L_t0.5",
    "t0.7": "L_t0.7",
    "gt": "L_gt",
}
#: The single-temperature labels of the Vicuna data.
VICUNA_SINGLE_TEMPERATURE: tuple[str, ...] = ("t0.0", "t0.3", "t0.5", "t0.7")
#: Labels made by stacking several samples per prompt: name -> the labels stacked (one row each).
STACKED_LABELS: dict[str, tuple[str, ...]] = {"temperatures": VICUNA_SINGLE_TEMPERATURE}
REFERENCE_LABEL = "reference"
PREDICTOR_DATASETS: tuple[str, ...] = (VICUNA_DATASET, "alpaca", "sharegpt", "qmsum") + TIMESTAMPED_DATASETS
PARTS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Seeded held-out split of source records (not used by ``alpaca-vicuna``)."""

    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise PredictorError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class LabeledPrompts:
    """Prompts with their true response lengths.

    ``prompts`` is ``None`` for text-less datasets. ``targets`` maps a label name to the response
    lengths [tokens] (one per prompt); ``source_sha256`` maps each registry file read to its sha256.
    """

    dataset: str
    part: str
    tokenizer: str
    prompts: list[str] | None
    prompt_tokens: np.ndarray
    source_index: np.ndarray
    targets: dict[str, np.ndarray]
    source_sha256: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def has_text(self) -> bool:
        return self.prompts is not None

    def labels(self, name: str) -> np.ndarray:
        """Response lengths [tokens] under label ``name``."""
        if name not in self.targets:
            raise PredictorError(
                f"{self.dataset} has no label {name!r}; choose one of {', '.join(self.targets)}"
            )
        return self.targets[name]

    def subset(self, indices: np.ndarray) -> "LabeledPrompts":
        """The rows at ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            prompts=None if self.prompts is None else [self.prompts[i] for i in indices],
            prompt_tokens=self.prompt_tokens[indices],
            source_index=self.source_index[indices],
            targets={name: values[indices] for name, values in self.targets.items()},
        )

    def stacked(self, name: str) -> "LabeledPrompts":
        """One row per prompt and stacked label (see :data:`STACKED_LABELS`), label ``name``."""
        parts = STACKED_LABELS.get(name)
        if parts is None or any(part not in self.targets for part in parts):
            raise PredictorError(f"{self.dataset} has no stacked label {name!r}")
        rows = np.tile(np.arange(len(self)), len(parts))
        expanded = self.subset(rows)
        values = np.concatenate([self.targets[part] for part in parts])
        return replace(expanded, targets={name: values})

    def sample(self, size: int | None, seed: int = 0) -> "LabeledPrompts":
        """A seeded random sample of ``size`` rows (all rows, in order, when ``size`` is None)."""
        if size is None or size >= len(self):
            return self
        return self.subset(sample_rows(len(self), size, seed))

    def table_sha256(self, label: str) -> str:
        """sha256 of exactly what a model is trained on: prompts (or token counts) and labels."""
        digest = hashlib.sha256()
        digest.update(f"{self.dataset}|{self.part}|{self.tokenizer}|{label}\n".encode())
        digest.update(np.ascontiguousarray(self.source_index, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.prompt_tokens, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.labels(label), dtype="<f8").tobytes())
        for text in self.prompts or ():
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
        return digest.hexdigest()


def sample_rows(num_rows: int, size: int | None, seed: int = 0) -> np.ndarray:
    """Row positions of a seeded random sample of ``size`` of ``num_rows`` rows, in order (all
    rows when ``size`` is None or not smaller): the rule of :meth:`LabeledPrompts.sample`."""
    if size is None or size >= num_rows:
        return np.arange(num_rows)
    if size < 1:
        raise PredictorError(f"sample size must be >= 1, got {size}")
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))


def record_folds(source_index: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. ``folds`` - 1) of each row: whole source records are assigned to folds by a
    seeded permutation, round robin, so every fold holds about the same number of records."""
    groups = np.unique(source_index)
    if len(groups) < folds:
        raise PredictorError(f"too few source records ({len(groups)}) for {folds} folds")
    permuted = np.random.default_rng(seed).permutation(groups)
    fold_of = dict(zip(permuted.tolist(), (np.arange(len(permuted)) % folds).tolist()))
    return np.fromiter((fold_of[g] for g in source_index.tolist()), dtype=np.int64, count=len(source_index))


def default_label(dataset: str) -> str:
    """``max`` for ``alpaca-vicuna`` (Zheng et al.'s protocol), else ``reference``."""
    return "max" if dataset == VICUNA_DATASET else REFERENCE_LABEL


def load_labeled_prompts(
    dataset: str, part: str, tokenizer: str = "llama2", split: SplitSpec = SplitSpec()
) -> LabeledPrompts:
    """The ``train`` or ``test`` part of ``dataset`` (see the module docstring)."""
    if dataset not in PREDICTOR_DATASETS:
        raise PredictorError(f"unknown predictor dataset {dataset!r}; choose one of {', '.join(PREDICTOR_DATASETS)}")
    if part not in PARTS:
        raise PredictorError(f"unknown part {part!r}; choose train or test")
    if dataset == VICUNA_DATASET:
        return _load_vicuna(part, tokenizer)
    requests = load_requests(dataset, tokenizer=tokenizer)
    chosen = _split_rows(requests["source_index"].to_numpy(), part, split)
    requests = requests.iloc[chosen].reset_index(drop=True)
    has_text = "prompt_text" in requests.columns
    return LabeledPrompts(
        dataset=dataset,
        part=part,
        tokenizer=tokenizer if has_text else "none (source token counts)",
        prompts=requests["prompt_text"].tolist() if has_text else None,
        prompt_tokens=requests["prompt_tokens"].to_numpy(dtype=np.int64),
        source_index=requests["source_index"].to_numpy(dtype=np.int64),
        targets={REFERENCE_LABEL: requests["output_tokens"].to_numpy(dtype=np.int64)},
        source_sha256={dataset: get_entry(dataset).sha256},
    )


def _split_rows(source_index: np.ndarray, part: str, split: SplitSpec) -> np.ndarray:
    """Row positions of ``part``: whole source records go to test with probability test_fraction."""
    groups = np.unique(source_index)
    permuted = np.random.default_rng(split.seed).permutation(groups)
    num_test = max(1, int(round(split.test_fraction * len(groups))))
    if num_test >= len(groups):
        raise PredictorError(f"too few records ({len(groups)}) for a train/test split")
    in_test = np.isin(source_index, permuted[:num_test])
    return np.flatnonzero(in_test if part == "test" else ~in_test)


def _load_vicuna(part: str, tokenizer: str) -> LabeledPrompts:
    if tokenizer != "llama2":
        raise PredictorError(
            f"{VICUNA_DATASET} labels are Vicuna-7B (Llama-2) token counts; use tokenizer llama2, not {tokenizer!r}"
        )
    split_name = "train" if part == "train" else "val"
    lengths = load_vicuna_lengths(split_name)
    alpaca = load_requests("alpaca", tokenizer=tokenizer).set_index("source_index")
    lengths = lengths[lengths["source_index"].isin(alpaca.index)].reset_index(drop=True)
    prompts = alpaca.loc[lengths["source_index"]]
    return LabeledPrompts(
        dataset=VICUNA_DATASET,
        part=part,
        tokenizer=tokenizer,
        prompts=prompts["prompt_text"].tolist(),
        prompt_tokens=prompts["prompt_tokens"].to_numpy(dtype=np.int64),
        source_index=lengths["source_index"].to_numpy(dtype=np.int64),
        targets={name: lengths[column].to_numpy(dtype=np.int64) for name, column in VICUNA_LABELS.items()},
        source_sha256={
            "alpaca": get_entry("alpaca").sha256,
            f"vicuna7b-alpaca-{split_name}": get_entry(f"vicuna7b-alpaca-{split_name}").sha256,
        },
    )


def frame_of(data: LabeledPrompts) -> pd.DataFrame:
    """The labelled prompts as a table (one column per label), for inspection."""
    frame = pd.DataFrame({"source_index": data.source_index, "prompt_tokens": data.prompt_tokens})
    if data.prompts is not None:
        frame["prompt_text"] = data.prompts
    for name, values in data.targets.items():
        frame[f"output_tokens_{name}"] = values
    return frame

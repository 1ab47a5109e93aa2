"""Neighbour lengths: what the most similar *training* prompts' answers measured.

ShareGPT and Alpaca hold many near-duplicate and templated prompts (9 % of ShareGPT's training
prompts have an exact duplicate among them, 11 % of its held-out prompts one in training). A tree
model over sparse n-grams does not see "this prompt is almost that one"; a nearest-neighbour
lookup does. :class:`NeighbourIndex` keeps the training prompts' L2-normalised TF-IDF rows and
their log lengths ``log1p(length [tokens])``; for a prompt it finds the ``count`` training prompts
of highest cosine similarity (the dot product of the rows; ties broken by the lower training row)
and returns :data:`NEIGHBOUR_FEATURES`:

``top_similarity`` / ``top_log_length``   the nearest neighbour's similarity and log length
``mean_similarity``                       mean similarity of the ``count`` neighbours
``weighted_log_length``                   similarity-weighted mean log length
``median_log_length``, ``min_log_length``, ``max_log_length``, ``std_log_length``
``near_count`` / ``near_log_length``      how many neighbours have similarity >= ``NEAR_SIMILARITY``
                                          and their mean log length (NaN when none)

A prompt with no known n-gram (an all-zero row) gets ``near_count`` 0, ``top_similarity`` 0 and
NaN elsewhere (LightGBM's missing value).

**Training rows.** A training prompt's own row would be its nearest neighbour (similarity 1, its
own length), so the model would learn to trust a statistic that is exact in training and never
at prediction time. :meth:`NeighbourIndex.training_statistics` therefore computes the training
rows' statistics *leave-one-out* (``folds = 0``: every other training prompt is a candidate; an
exact duplicate with another row stays one, as it would for a served prompt that repeats a
training prompt) or *out-of-fold* (``folds = K >= 2``: seeded folds; a row sees only the rows of
the other folds).

Similarities are computed ``CHUNK_ROWS`` query rows at a time (a dense ``CHUNK_ROWS x n`` block).
The index is saved as ``neighbours.npz`` (CSR arrays and log lengths, no pickle); the same rows
give the same statistics, bit for bit, before and after saving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from econoserve.errors import PredictorError

NEIGHBOUR_FEATURES: tuple[str, ...] = (
    "top_similarity",
    "top_log_length",
    "mean_similarity",
    "weighted_log_length",
    "median_log_length",
    "min_log_length",
    "max_log_length",
    "std_log_length",
    "near_count",
    "near_log_length",
)
#: Cosine similarity from which a neighbour counts as a near-duplicate (``near_*`` features).
NEAR_SIMILARITY = 0.8
#: Query rows per dense similarity block (memory: ``CHUNK_ROWS x training rows`` float64).
CHUNK_ROWS = 256
NEIGHBOURS_FILE = "neighbours.npz"


class NeighbourIndex:
    """The training prompts' TF-IDF rows (CSR, L2-normalised) and log lengths ``log1p(tokens)``."""

    def __init__(self, rows: sp.csr_matrix, log_lengths: np.ndarray, count: int) -> None:
        if rows.shape[0] != len(log_lengths):
            raise PredictorError("neighbour index: one log length per training row is needed")
        if not 1 <= count < rows.shape[0]:
            raise PredictorError(f"neighbour_count must be in 1 .. {rows.shape[0] - 1} "
                                 f"(fewer than the {rows.shape[0]} training prompts), got {count}")
        self.rows = sp.csr_matrix(rows, dtype=np.float64)
        self.log_lengths = np.asarray(log_lengths, dtype=np.float64)
        self.count = count
        self._transposed = self.rows.T.tocsc()

    @classmethod
    def fit(cls, rows: sp.csr_matrix, lengths: np.ndarray, count: int) -> "NeighbourIndex":
        """The index of training ``rows`` with response ``lengths`` [tokens, >= 1]."""
        lengths = np.asarray(lengths, dtype=np.float64)
        if np.any(lengths < 1):
            raise PredictorError("neighbour index: training lengths must be >= 1 token")
        return cls(rows, np.log1p(lengths), count)

    def __len__(self) -> int:
        return self.rows.shape[0]

    # ----------------------------------------------------------------- statistics
    def statistics(self, queries: sp.csr_matrix) -> np.ndarray:
        """:data:`NEIGHBOUR_FEATURES` (columns) of each query row among all training rows."""
        return self._statistics(queries, excluded=None)

    def training_statistics(self, folds: int, seed: int) -> np.ndarray:
        """:data:`NEIGHBOUR_FEATURES` of the training rows themselves, leave-one-out (``folds`` 0)
        or out-of-fold over ``folds`` seeded folds (see the module docstring)."""
        size = len(self)
        if folds == 0:
            fold = np.arange(size)  # every row its own fold: leave-one-out
        else:
            fold = training_folds(size, folds, seed)
            smallest_rest = size - np.bincount(fold, minlength=folds).max()
            if smallest_rest < self.count:
                raise PredictorError(f"neighbour_folds={folds}: a fold leaves {smallest_rest} training prompts, "
                                     f"fewer than neighbour_count={self.count}")
        return self._statistics(self.rows, excluded=fold)

    def _statistics(self, queries: sp.csr_matrix, excluded: np.ndarray | None) -> np.ndarray:
        """``excluded`` (training queries only): the fold of each row; a query row never sees a
        training row of its own fold."""
        queries = sp.csr_matrix(queries, dtype=np.float64)
        if queries.shape[1] != self.rows.shape[1]:
            raise PredictorError(f"neighbour index: query rows have {queries.shape[1]} columns, "
                                 f"the index {self.rows.shape[1]}")
        out = np.empty((queries.shape[0], len(NEIGHBOUR_FEATURES)), dtype=np.float64)
        for start in range(0, queries.shape[0], CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, queries.shape[0])
            similarity = (queries[start:stop] @ self._transposed).toarray()
            if excluded is not None:
                similarity[excluded[start:stop, None] == excluded[None, :]] = -np.inf
            out[start:stop] = self._chunk_statistics(similarity)
        return out

    def _chunk_statistics(self, similarity: np.ndarray) -> np.ndarray:
        count = self.count
        # the count most similar rows; of rows tied at the cut, the lowest-numbered ones
        cut = -np.partition(-similarity, count - 1, axis=1)[:, count - 1:count]
        above = similarity > cut
        at_cut = similarity == cut
        chosen = above | (at_cut & (np.cumsum(at_cut, axis=1) <= count - above.sum(axis=1, keepdims=True)))
        candidates = np.nonzero(chosen)[1].reshape(len(similarity), count)
        sims = np.take_along_axis(similarity, candidates, axis=1)
        order = np.lexsort((candidates, -sims))  # per row: similarity descending, then training row
        candidates = np.take_along_axis(candidates, order, axis=1)
        sims = np.maximum(np.take_along_axis(sims, order, axis=1), 0.0)
        logs = self.log_lengths[candidates]
        near = sims >= NEAR_SIMILARITY
        near_count = near.sum(axis=1)
        weight = sims.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            columns = (
                sims[:, 0], logs[:, 0], sims.mean(axis=1), (sims * logs).sum(axis=1) / weight,
                np.median(logs, axis=1), logs.min(axis=1), logs.max(axis=1), logs.std(axis=1),
                near_count.astype(np.float64), np.where(near, logs, 0.0).sum(axis=1) / near_count,
            )
        stats = np.column_stack(columns)
        unseen = sims[:, 0] <= 0.0  # no shared n-gram with any training prompt
        stats[unseen] = np.nan
        stats[unseen, NEIGHBOUR_FEATURES.index("top_similarity")] = 0.0
        stats[unseen, NEIGHBOUR_FEATURES.index("near_count")] = 0.0
        return stats

    # ----------------------------------------------------------------- persistence
    def save(self, directory: Path) -> str:
        """Write ``neighbours.npz`` into ``directory``; returns the file name."""
        np.savez_compressed(directory / NEIGHBOURS_FILE, data=self.rows.data, indices=self.rows.indices,
                            indptr=self.rows.indptr, shape=np.asarray(self.rows.shape, dtype=np.int64),
                            log_lengths=self.log_lengths)
        return NEIGHBOURS_FILE

    @classmethod
    def load(cls, directory: Path, count: int, columns: int) -> "NeighbourIndex":
        """The index saved by :meth:`save` (``columns``: the featurizer's n-gram vocabulary size)."""
        path = directory / NEIGHBOURS_FILE
        try:
            with np.load(path, allow_pickle=False) as arrays:
                shape = tuple(int(v) for v in arrays["shape"])
                rows = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
                log_lengths = arrays["log_lengths"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PredictorError(f"{path}: cannot read the neighbour index ({type(exc).__name__}: {exc})") from None
        if len(shape) != 2 or shape[1] != columns or len(log_lengths) != shape[0]:
            raise PredictorError(f"{path}: neighbour index of shape {shape} does not fit the vocabulary "
                                 f"({columns} n-grams) or its {len(log_lengths)} lengths (corrupt model?)")
        return cls(rows, log_lengths, count)


def training_folds(size: int, folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. ``folds`` - 1) of each of ``size`` training rows: a seeded permutation cut into
    ``folds`` near-equal parts."""
    fold = np.empty(size, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(size)] = np.arange(size) % folds
    return fold

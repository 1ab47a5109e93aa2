"""The trace: one table of requests, the input of every executor.

A trace is a parquet file with exactly these columns (units in brackets):

==========================  ========  =========================================================
column                      type      meaning
==========================  ========  =========================================================
``request_id``              int64     unique, >= 0
``arrival_time_s``          float64   arrival time [s] relative to the trace start, >= 0,
                                      non-decreasing
``prompt_tokens``           int64     prompt length [tokens], > 0, <= MAX_REQUEST_TOKENS
``output_tokens``           int64     true response length [tokens], > 0, <= MAX_REQUEST_TOKENS
``dataset``                 string    the dataset the request was drawn from
``prompt_text``             string    optional: the prompt, where the dataset has text
``predicted_output_tokens`` int64     optional: a predictor's response length [tokens], > 0,
                                      <= MAX_REQUEST_TOKENS
``predicted_output_         list      optional, with ``predicted_output_tokens``: the predicted
quantiles``                 <int64>   distribution of the response length as ``K`` equally
                                      likely lengths [tokens] (the ``(i + 0.5) / K`` quantiles,
                                      sorted, each > 0 and <= MAX_REQUEST_TOKENS; ``K`` the same
                                      in every record)
``refine_after_tokens``     int64     optional, with ``refined_output_tokens``: ``k``
                                      [tokens], > 0
``refined_output_tokens``   int64     optional: the refined predicted response length [tokens],
                                      > 0, from the prompt and the response's first ``k`` tokens
                                      (:mod:`econoserve.predictor.refine`); once the request has
                                      generated ``k`` tokens and is not finished, the executor
                                      makes it the policy's prediction (never used for a
                                      response of at most ``k`` tokens)
==========================  ========  =========================================================

Every trace is validated when it is built and when it is read. A violation raises
:class:`~econoserve.errors.TraceError` with one line naming the file and the first offending
record, e.g. ``trace.parquet: record 17 (request_id=42): output_tokens is 0; must be > 0``.
Text that is not valid UTF-8 and lengths above :data:`MAX_REQUEST_TOKENS` are refused the same way
(per-token computations over such a request would exhaust memory before any model could refuse it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from econoserve.errors import TraceError

REQUIRED_COLUMNS: tuple[str, ...] = (
    "request_id",
    "arrival_time_s",
    "prompt_tokens",
    "output_tokens",
    "dataset",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("prompt_text", "predicted_output_tokens", "predicted_output_quantiles",
                                     "refine_after_tokens", "refined_output_tokens")
#: The refinement columns: both or neither.
REFINEMENT_COLUMNS: tuple[str, ...] = ("refine_after_tokens", "refined_output_tokens")
ALL_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

#: Longest prompt or response a trace may hold [tokens]: 4 Mi tokens, above the context of every
#: model in the catalog; per-token work on a longer request (isolated execution time, prompt ids)
#: would exhaust memory, so it is refused when the trace is read.
MAX_REQUEST_TOKENS = 2**22
_POSITIVE_INT_COLUMNS = ("prompt_tokens", "output_tokens", "predicted_output_tokens") + REFINEMENT_COLUMNS
_STRING_COLUMNS = ("dataset", "prompt_text")
_METADATA_KEY = b"econoserve.trace"

_ARROW_TYPES: Mapping[str, pa.DataType] = {
    "request_id": pa.int64(),
    "arrival_time_s": pa.float64(),
    "prompt_tokens": pa.int64(),
    "output_tokens": pa.int64(),
    "dataset": pa.string(),
    "prompt_text": pa.string(),
    "predicted_output_tokens": pa.int64(),
    "predicted_output_quantiles": pa.list_(pa.int64()),
    "refine_after_tokens": pa.int64(),
    "refined_output_tokens": pa.int64(),
}


@dataclass(frozen=True)
class Trace:
    """A validated table of requests plus the provenance it was built with.

    Construct with :meth:`from_frame` or :meth:`read`, which validate; the ``requests`` frame
    then has the canonical column order and dtypes, sorted by ``arrival_time_s``.
    """

    requests: pd.DataFrame
    metadata: dict[str, object] = field(default_factory=dict)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        metadata: Mapping[str, object] | None = None,
        source: str = "<trace>",
    ) -> "Trace":
        """Validate ``frame`` against the schema and return a trace; ``source`` names it in errors."""
        return cls(validate_requests(frame, source), dict(metadata or {}))

    @classmethod
    def read(cls, path: str | Path) -> "Trace":
        """Read and validate a trace parquet file."""
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file")
        try:
            table = pq.read_table(path)
            _check_utf8(table, path)
            frame = table.to_pandas()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TraceError(
                f"{path}: not a readable parquet trace (truncated or corrupt?): {first_line}"
            ) from None
        raw_metadata = (table.schema.metadata or {}).get(_METADATA_KEY)
        return cls.from_frame(frame, _read_metadata(raw_metadata, path), source=str(path))

    # ----------------------------------------------------------------- output
    def to_arrow(self) -> pa.Table:
        """The trace as an Arrow table with the canonical schema and provenance metadata."""
        columns = [c for c in ALL_COLUMNS if c in self.requests.columns]
        schema = pa.schema(
            [pa.field(c, _ARROW_TYPES[c], nullable=False) for c in columns],
            metadata={_METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()},
        )
        return pa.Table.from_pandas(self.requests[columns], schema=schema, preserve_index=False)

    def write(self, path: str | Path) -> Path:
        """Write the trace as parquet. Same trace, same bytes (for a given pyarrow version)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_arrow(), path, compression="zstd", write_statistics=False)
        return path

    # ----------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.requests)

    @property
    def has_text(self) -> bool:
        return "prompt_text" in self.requests.columns

    @property
    def has_predictions(self) -> bool:
        return "predicted_output_tokens" in self.requests.columns

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival [s]."""
        arrivals = self.requests["arrival_time_s"]
        return float(arrivals.iloc[-1] - arrivals.iloc[0]) if len(arrivals) else 0.0

    @property
    def has_prediction_quantiles(self) -> bool:
        return "predicted_output_quantiles" in self.requests.columns

    @property
    def has_refinements(self) -> bool:
        """Whether the trace has ``refined_output_tokens`` (and ``refine_after_tokens``)."""
        return "refined_output_tokens" in self.requests.columns

    def with_predictions(self, predicted_output_tokens: np.ndarray | pd.Series,
                         quantiles: np.ndarray | Sequence[Sequence[int]] | None = None) -> "Trace":
        """A copy with ``predicted_output_tokens`` set (one value per request, in row order) and,
        given ``quantiles`` (requests x ``K`` [tokens]), ``predicted_output_quantiles``; without
        it any previous quantiles are dropped (they belonged to another prediction)."""
        frame = self.requests.drop(columns="predicted_output_quantiles", errors="ignore")
        frame["predicted_output_tokens"] = np.asarray(predicted_output_tokens)
        if quantiles is not None:
            frame["predicted_output_quantiles"] = [tuple(row) for row in quantiles]
        return Trace.from_frame(frame, self.metadata, source="<predictions>")

    def with_refinements(self, refined_output_tokens: np.ndarray | pd.Series, refine_after_tokens: int) -> "Trace":
        """A copy with ``refined_output_tokens`` [tokens] (one value per request, in row order)
        taking over as the prediction after ``refine_after_tokens`` generated tokens."""
        frame = self.requests.copy()
        frame["refine_after_tokens"] = np.int64(refine_after_tokens)
        frame["refined_output_tokens"] = np.asarray(refined_output_tokens)
        return Trace.from_frame(frame, self.metadata, source="<refined predictions>")

    def without_refinements(self) -> "Trace":
        """A copy without ``refined_output_tokens`` / ``refine_after_tokens`` (the refined model's
        values belong with the predictor it extends: drop them before predicting otherwise)."""
        if not self.has_refinements:
            return self
        frame = self.requests.drop(columns=["refined_output_tokens", "refine_after_tokens"])
        return Trace(frame, dict(self.metadata))

    def head(self, num_requests: int) -> "Trace":
        """The first ``num_requests`` requests in arrival order."""
        return Trace(self.requests.iloc[:num_requests].reset_index(drop=True), dict(self.metadata))


def _check_utf8(table: pa.Table, path: Path) -> None:
    """Refuse string columns holding bytes that are not UTF-8 (pyarrow reads them unchecked)."""
    for column in _STRING_COLUMNS:
        if column in table.column_names:
            try:
                table.column(column).validate(full=True)
            except pa.ArrowInvalid as error:
                raise TraceError(f"{path}: {column} holds text that is not valid UTF-8 ({error})") from None


def _read_metadata(raw: bytes | None, path: Path) -> dict:
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"{path}: its econoserve.trace metadata is not JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise TraceError(f"{path}: its econoserve.trace metadata is not a JSON object")
    return metadata


# --------------------------------------------------------------------- validation
def validate_requests(frame: pd.DataFrame, source: str = "<trace>") -> pd.DataFrame:
    """Check ``frame`` against the trace schema; return a normalised copy.

    Normalised means: canonical column order and dtypes, rows sorted by arrival time (stable),
    a fresh RangeIndex. Raises :class:`TraceError` naming ``source`` and the offending record.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TraceError(f"{source}: a trace must be a table, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise TraceError(
            f"{source}: missing required column(s) {', '.join(missing)}; "
            f"a trace has columns {', '.join(REQUIRED_COLUMNS)} [+ {', '.join(OPTIONAL_COLUMNS)}]"
        )
    unknown = [str(c) for c in frame.columns if c not in ALL_COLUMNS]
    if unknown:
        raise TraceError(
            f"{source}: unknown column(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(ALL_COLUMNS)}"
        )
    if len(frame) == 0:
        raise TraceError(f"{source}: the trace has no requests")

    frame = frame.reset_index(drop=True)
    ids = _integer_column(frame, "request_id", source, frame["request_id"])
    out = pd.DataFrame({"request_id": ids})
    _check(ids >= 0, frame, ids, source, "request_id", "must be >= 0")
    duplicated = pd.Series(ids).duplicated(keep="first").to_numpy()
    _check(~duplicated, frame, ids, source, "request_id", "appears in an earlier record (duplicate request id)")

    arrivals = _float_column(frame, "arrival_time_s", source, ids)
    _check(np.isfinite(arrivals), frame, ids, source, "arrival_time_s", "must be a finite number")
    _check(arrivals >= 0, frame, ids, source, "arrival_time_s", "must be >= 0")
    out["arrival_time_s"] = arrivals

    for column in _POSITIVE_INT_COLUMNS:
        if column in frame.columns:
            values = _integer_column(frame, column, source, ids)
            _check(values > 0, frame, ids, source, column, "must be > 0")
            _check(values <= MAX_REQUEST_TOKENS, frame, ids, source, column,
                   f"must be <= {MAX_REQUEST_TOKENS} (MAX_REQUEST_TOKENS): longer than any model's context")
            out[column] = values
    if "predicted_output_quantiles" in frame.columns:
        if "predicted_output_tokens" not in frame.columns:
            raise TraceError(f"{source}: predicted_output_quantiles needs a predicted_output_tokens column")
        out["predicted_output_quantiles"] = _quantile_column(frame, source, ids)
    present = [c for c in REFINEMENT_COLUMNS if c in frame.columns]
    if 0 < len(present) < len(REFINEMENT_COLUMNS):
        raise TraceError(f"{source}: {' and '.join(REFINEMENT_COLUMNS)} go together (one is missing)")
    for column in _STRING_COLUMNS:
        if column in frame.columns:
            out[column] = _string_column(frame, column, source, ids)
    _check(out["dataset"].str.len().to_numpy() > 0, frame, ids, source, "dataset", "must be non-empty")

    order = np.argsort(out["arrival_time_s"].to_numpy(), kind="stable")
    out = out.iloc[order].reset_index(drop=True)
    return out[[c for c in ALL_COLUMNS if c in out.columns]]


def _record(index: int, ids: np.ndarray | pd.Series | None) -> str:
    if ids is None:
        return f"record {index}"
    try:
        return f"record {index} (request_id={int(np.asarray(ids)[index])})"
    except (TypeError, ValueError, OverflowError):
        return f"record {index}"


def _check(ok: np.ndarray, frame: pd.DataFrame, ids, source: str, column: str, rule: str) -> None:
    bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
    if bad.size:
        index = int(bad[0])
        value = frame[column].iloc[index]
        value = value.item() if isinstance(value, np.generic) else value
        more = f" ({bad.size - 1} more such record(s))" if bad.size > 1 else ""
        raise TraceError(f"{source}: {_record(index, ids)}: {column} is {value!r}; {rule}{more}")


def _integer_column(frame: pd.DataFrame, column: str, source: str, ids) -> np.ndarray:
    series = frame[column]
    if pd.api.types.is_bool_dtype(series):
        raise TraceError(f"{source}: {column} must hold integers, found booleans")
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.to_numpy(dtype=np.int64)
    numeric = pd.to_numeric(series, errors="coerce")
    values = numeric.to_numpy(dtype=float, na_value=np.nan)
    whole = np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) < 2**53)
    _check(whole, frame, ids if column != "request_id" else None, source, column, "must be an integer")
    return values.astype(np.int64)


def _quantile_column(frame: pd.DataFrame, source: str, ids) -> list[tuple[int, ...]]:
    """``predicted_output_quantiles`` as tuples: sorted, positive, bounded, one length ``K``."""
    column = "predicted_output_quantiles"
    rows = []
    for value in frame[column]:
        try:
            row = np.asarray(value, dtype=np.float64).ravel() if not isinstance(value, (str, bytes)) else np.array([np.nan])
        except (TypeError, ValueError):
            row = np.array([np.nan])
        rows.append(row)
    size = rows[0].size if rows else 0
    ok = np.array([row.size == size and size > 0 and bool(np.all(np.isfinite(row))) and bool(np.all(np.floor(row) == row))
                   and bool(np.all(row > 0)) and bool(np.all(row <= MAX_REQUEST_TOKENS)) and bool(np.all(np.diff(row) >= 0))
                   for row in rows], dtype=bool)
    _check(ok, frame, ids, source, column,
           f"must be {size or 'K'} sorted integer lengths, each > 0 and <= {MAX_REQUEST_TOKENS}")
    return [tuple(int(v) for v in row) for row in rows]


def _float_column(frame: pd.DataFrame, column: str, source: str, ids) -> np.ndarray:
    numeric = pd.to_numeric(frame[column], errors="coerce")
    values = numeric.to_numpy(dtype=float, na_value=np.nan)
    _check(~np.isnan(values), frame, ids, source, column, "must be a number")
    return values


def _string_column(frame: pd.DataFrame, column: str, source: str, ids) -> pd.Series:
    series = frame[column]
    is_text = series.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    _check(is_text, frame, ids, source, column, "must be a string")
    return series.astype(object).reset_index(drop=True)

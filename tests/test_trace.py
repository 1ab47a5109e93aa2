"""The trace schema: validation on build and load, parquet round trip, and one-line CLI errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from econoserve.cli import main
from econoserve.errors import TraceError
from econoserve.workload.trace import ALL_COLUMNS, Trace


def good_frame(num_requests: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": np.arange(num_requests),
            "arrival_time_s": np.linspace(0.0, 2.0, num_requests),
            "prompt_tokens": np.arange(1, num_requests + 1) * 10,
            "output_tokens": np.arange(1, num_requests + 1) * 3,
            "dataset": "unit",
        }
    )


def test_round_trip_keeps_rows_dtypes_and_metadata(tmp_path):
    frame = good_frame()
    frame["prompt_text"] = [f"prompt {i}" for i in range(len(frame))]
    frame["predicted_output_tokens"] = [7, 8, 9, 10, 11]
    frame["predicted_output_quantiles"] = [(1, 7, 20)] * 5
    frame["refine_after_tokens"] = 2
    frame["refined_output_tokens"] = [3, 9, 9, 14, 12]
    trace = Trace.from_frame(frame, {"seed": 3, "note": "unit"})
    loaded = Trace.read(trace.write(tmp_path / "t.parquet"))
    pd.testing.assert_frame_equal(loaded.requests, trace.requests)
    assert loaded.metadata == {"seed": 3, "note": "unit"}
    assert list(loaded.requests.columns) == list(ALL_COLUMNS)
    assert loaded.requests["prompt_tokens"].dtype == np.int64


def test_rows_are_sorted_by_arrival_and_ids_kept():
    frame = good_frame().iloc[::-1]
    trace = Trace.from_frame(frame)
    assert trace.requests["arrival_time_s"].is_monotonic_increasing
    assert trace.requests["request_id"].tolist() == [0, 1, 2, 3, 4]


def test_same_trace_same_bytes(tmp_path):
    trace = Trace.from_frame(good_frame(), {"seed": 0})
    first = trace.write(tmp_path / "a.parquet").read_bytes()
    second = Trace.read(tmp_path / "a.parquet").write(tmp_path / "b.parquet").read_bytes()
    assert first == second


def test_whole_floats_are_accepted_as_integers():
    frame = good_frame()
    frame["prompt_tokens"] = frame["prompt_tokens"].astype(float)
    assert Trace.from_frame(frame).requests["prompt_tokens"].dtype == np.int64


def test_with_predictions_validates():
    trace = Trace.from_frame(good_frame())
    assert trace.with_predictions(np.full(5, 4)).has_predictions
    with pytest.raises(TraceError, match="predicted_output_tokens is 0"):
        trace.with_predictions(np.array([4, 4, 0, 4, 4]))
    with_quantiles = trace.with_predictions(np.full(5, 4), np.tile([2, 4, 9], (5, 1)))
    assert with_quantiles.requests["predicted_output_quantiles"].tolist() == [(2, 4, 9)] * 5
    assert not with_quantiles.with_predictions(np.full(5, 5)).has_prediction_quantiles  # they belonged to the old one
    bad = {"unsorted": [[2, 9, 4]] * 5, "zero": [[0, 4, 9]] * 5, "ragged": [[2, 4, 9]] * 4 + [[2, 4]]}
    for rows in bad.values():
        with pytest.raises(TraceError, match="record .*: predicted_output_quantiles is .*; must be 3 sorted integer lengths"):
            trace.with_predictions(np.full(5, 4), rows)


BAD_CASES = {
    "negative length": (lambda f: f.assign(prompt_tokens=[10, -3, 30, 40, 50]), "record 1 (request_id=1): prompt_tokens is -3; must be > 0"),
    "zero length": (lambda f: f.assign(output_tokens=[3, 6, 0, 12, 15]), "record 2 (request_id=2): output_tokens is 0; must be > 0"),
    "non-integer length": (lambda f: f.assign(output_tokens=[3, 6.5, 9, 12, 15]), "record 1 (request_id=1): output_tokens is 6.5; must be an integer"),
    "text length": (lambda f: f.assign(prompt_tokens=["10", "x", "30", "40", "50"]), "record 1 (request_id=1): prompt_tokens is 'x'; must be an integer"),
    "missing length": (lambda f: f.assign(output_tokens=[3, None, 9, 12, 15]), "record 1 (request_id=1): output_tokens is nan; must be an integer"),
    "duplicate id": (lambda f: f.assign(request_id=[0, 1, 2, 1, 4]), "record 3 (request_id=1): request_id is 1; appears in an earlier record"),
    "negative arrival": (lambda f: f.assign(arrival_time_s=[0.0, -1.0, 1, 2, 3]), "record 1 (request_id=1): arrival_time_s is -1.0; must be >= 0"),
    "infinite arrival": (lambda f: f.assign(arrival_time_s=[0.0, np.inf, 1, 2, 3]), "arrival_time_s is inf; must be a finite number"),
    "missing column": (lambda f: f.drop(columns=["output_tokens"]), "missing required column(s) output_tokens"),
    "unknown column": (lambda f: f.assign(temperature=0.7), "unknown column(s) temperature"),
    "empty dataset name": (lambda f: f.assign(dataset=["a", "", "a", "a", "a"]), "record 1 (request_id=1): dataset is ''; must be non-empty"),
    "no requests": (lambda f: f.iloc[:0], "the trace has no requests"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_tables_get_one_line_errors_naming_the_record(case):
    mutate, message = BAD_CASES[case]
    with pytest.raises(TraceError) as error:
        Trace.from_frame(mutate(good_frame()), source="bad.parquet")
    text = str(error.value)
    assert text.startswith("bad.parquet: ")
    assert message in text
    assert "\n" not in text


def _write_unvalidated(frame: pd.DataFrame, path) -> None:
    frame.to_parquet(path, index=False)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cli_validate_exits_2_with_file_and_record(case, tmp_path, capsys):
    mutate, message = BAD_CASES[case]
    path = tmp_path / "bad.parquet"
    _write_unvalidated(mutate(good_frame()), path)
    assert main(["trace", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"econoserve: error: {path}: ")
    assert message in err
    assert len(err.splitlines()) == 1


def test_truncated_file(tmp_path, capsys):
    path = Trace.from_frame(good_frame()).write(tmp_path / "t.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert main(["trace", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a readable parquet trace (truncated or corrupt?)" in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_file_and_missing_file(tmp_path, capsys):
    path = tmp_path / "trace.parquet"
    path.write_text("request_id,arrival_time_s\n0,0.0\n")
    assert main(["trace", "validate", str(path)]) == 2
    assert "not a readable parquet trace" in capsys.readouterr().err
    assert main(["trace", "validate", str(tmp_path / "nope.parquet")]) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.parquet"
    _write_unvalidated(good_frame().assign(output_tokens=0), path)
    run = subprocess.run(
        [sys.executable, "-m", "econoserve", "trace", "validate", str(path)],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"econoserve: error: {path}: record 0 (request_id=0): output_tokens is 0; must be > 0 (4 more such record(s))"
    ]


def test_refinement_columns_go_together():
    frame = good_frame()
    frame["refined_output_tokens"] = 4
    with pytest.raises(TraceError, match="go together"):
        Trace.from_frame(frame)
    frame["refine_after_tokens"] = 2
    assert Trace.from_frame(frame).has_refinements
    assert not Trace.from_frame(good_frame()).has_refinements
    frame["refine_after_tokens"] = 0
    with pytest.raises(TraceError, match="refine_after_tokens is 0"):
        Trace.from_frame(frame)

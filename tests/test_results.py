"""The one results format: both executors' tables validate against it, the README documents it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from econoserve.errors import UserError
from econoserve.results import ITERATION_SCHEMA, REQUEST_SCHEMA, read_iterations, read_requests, validate
from econoserve.serving.replay import ReplayRequest, RequestTimer
from econoserve.serving.results import requests_table
from econoserve.sim import SimulationConfig, simulate
from econoserve.workload.trace import Trace

README = Path(__file__).resolve().parents[1] / "README.md"


def _trace(n: int = 12) -> Trace:
    rng = np.random.default_rng(0)
    return Trace.from_frame(pd.DataFrame({
        "request_id": np.arange(n), "arrival_time_s": np.cumsum(rng.exponential(0.1, n)),
        "prompt_tokens": rng.integers(4, 200, n), "output_tokens": rng.integers(1, 60, n), "dataset": "synthetic"}))


def _served_requests() -> pd.DataFrame:
    done = RequestTimer(ReplayRequest(0, 0.0, (5, 6), 2, predicted_output_tokens=3))
    done.submitted(0.0)
    done.tokens(1, 0.2)
    done.tokens(1, 0.3)
    done.finished(0.3)
    failed = RequestTimer(ReplayRequest(1, 0.1, (5,), 4))
    failed.failed("HTTP 500: boom", 0.5)
    return requests_table([done, failed], {}, {0: "alpaca"})


def test_simulated_and_served_requests_have_one_set_of_columns_and_dtypes(tmp_path):
    simulated = simulate(_trace(), SimulationConfig(scheduler="vllm")).write(tmp_path / "sim")
    served = _served_requests()
    validate(served, REQUEST_SCHEMA)
    sim_requests, sim_steps = read_requests(simulated), read_iterations(simulated)  # validated on reading
    assert served.dtypes.equals(sim_requests.dtypes)
    assert list(sim_steps.columns) == list(ITERATION_SCHEMA) and (sim_steps["replica"] == 0).all()
    assert served["status"].tolist() == ["finished", "failed"] and served["dataset"].tolist() == ["alpaca", ""]
    assert (sim_requests["submit_time_s"] == sim_requests["arrival_time_s"]).all()
    decoding = sim_steps[~sim_steps["skipped"]]
    assert (decoding["num_decode_requests"] == decoding["num_decode_tokens"]).all()


def test_a_table_of_another_shape_is_refused_in_one_line(tmp_path):
    served = _served_requests()
    with pytest.raises(UserError, match="x.parquet: not a results table \\(missing \\['slo_met'\\]"):
        validate(served.drop(columns="slo_met"), REQUEST_SCHEMA, "x.parquet")
    with pytest.raises(UserError, match="column num_preemptions is float64"):
        validate(served.astype({"num_preemptions": float}), REQUEST_SCHEMA)
    with pytest.raises(UserError, match="no such results table"):
        read_requests(tmp_path)


def test_readme_documents_every_column_with_its_dtype():
    rows = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", README.read_text(), flags=re.MULTILINE))
    documented = {**{name: column.dtype for name, column in REQUEST_SCHEMA.items()},
                  **{name: column.dtype for name, column in ITERATION_SCHEMA.items()}}
    assert {name: rows.get(name) for name in documented} == documented

"""Notebooks run end to end under papermill with small parameters, and keep git-friendly form."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_thin_and_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' for papermill"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_papermill_reads_every_parameter_with_its_help(path, caplog):
    # papermill's own parser (what `papermill --help-notebook` lists) against what Python assigns.
    # It drops, with a warning, any line holding a second "=" (one in the comment counts: write
    # "None: default", not "None = default"), and reads help only from a definition's last line.
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    with caplog.at_level(logging.WARNING, logger="papermill"):
        inferred = papermill.inspect_notebook(str(path))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert list(inferred) == list(assigned)
    for name, parameter in inferred.items():
        assert ast.literal_eval(parameter["default"]) == assigned[name], name
        assert parameter["help"], f"{name}: no help comment on its (last) line"


@pytest.mark.realdata
@pytest.mark.slow
def test_trace_analysis_notebook(tmp_path):
    out = tmp_path / "figures"
    papermill.execute_notebook(
        str(NOTEBOOKS / "01_trace_analysis.ipynb"),
        str(tmp_path / "01.ipynb"),
        parameters={"datasets": ["alpaca", "qmsum", "azure-conv"], "tokenizer": "gpt2",
                    "sample_size": 300, "seed": 1, "output_dir": str(out)},
        kernel_name="python3",
        progress_bar=False,
    )
    summary = pd.read_csv(out / "fig01_length_summary.csv")
    assert summary["dataset"].tolist() == ["alpaca", "qmsum", "azure-conv"]
    assert summary["num_requests"].tolist() == [300, 300, 300]
    for column in ("prompt_tokens", "output_tokens"):
        assert (summary[f"{column}_p50"] <= summary[f"{column}_p90"]).all()
        assert (summary[f"{column}_p90"] <= summary[f"{column}_p99"]).all()
    burstiness = pd.read_csv(out / "fig01_arrival_burstiness.csv")
    assert burstiness["dataset"].tolist() == ["azure-conv"]
    assert burstiness["num_requests"].iloc[0] == 19_366
    assert (out / "fig01_trace_characteristics.png").stat().st_size > 10_000


@pytest.mark.realdata
@pytest.mark.slow
def test_rl_predictor_notebook(tmp_path):
    out, models = tmp_path / "figures", tmp_path / "models"
    papermill.execute_notebook(
        str(NOTEBOOKS / "02_rl_predictor.ipynb"),
        str(tmp_path / "02.ipynb"),
        parameters={"dataset": "alpaca-vicuna", "max_train": 1500, "seed": 2,
                    "output_dir": str(out), "model_dir": str(models)},
        kernel_name="python3",
        progress_bar=False,
    )
    table = pd.read_csv(out / "fig06_rl_predictor_metrics.csv")
    mae = table[(table["label"] == "max") & (table["metric"] == "mae_tokens")].iloc[0]
    assert mae["model"] < mae["baseline"]  # beats the constant median even on 1,500 prompts
    assert (models / "alpaca-vicuna-regression" / "metadata.json").is_file()
    assert (out / "fig06_rl_predictor.png").stat().st_size > 10_000


@pytest.mark.realdata
@pytest.mark.slow
def test_simulated_serving_notebook(tmp_path):
    figures, results = tmp_path / "figures", tmp_path / "results"
    papermill.execute_notebook(
        str(NOTEBOOKS / "03_simulated_serving.ipynb"),
        str(tmp_path / "03.ipynb"),
        parameters={"datasets": ["alpaca", "qmsum"], "schedulers": ["vllm", "orca", "econoserve"],
                    "ablations": ["econoserve", "econoserve-no-kvcpipe"], "predictor": "oracle",
                    "num_requests": 120, "seed": 1, "output_dir": str(results), "figures_dir": str(figures),
                    "policy_configs": {"orca": {"max_num_seqs": 32}}},
        kernel_name="python3",
        progress_bar=False,
    )
    for number in (2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14):
        pngs = list(figures.glob(f"fig{number:02d}_*.png"))
        assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000, number
        assert pngs[0].with_suffix(".csv").is_file()
    sweep = pd.read_parquet(results / "sweep.parquet")
    assert set(sweep["scheduler"]) == {"vllm", "orca", "econoserve", "econoserve-no-kvcpipe"}
    assert (sweep["num_requests"] == 120).all() and (sweep["seed"] == 1).all()
    plan = json.loads((results / "experiments.json").read_text())["plan"]
    assert plan["policy_configs"] == {"orca": {"max_num_seqs": 32}}
    claims = pd.read_csv(figures / "headline_claims.csv")
    assert {"jct_reduction", "sustained_rate"} <= set(claims["claim"])
    assert set(claims["dataset"]) == {"alpaca", "qmsum", "all"}


def test_simulated_serving_notebook_refuses_unregistered_schedulers(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="not registered: no-such-scheduler"):
        papermill.execute_notebook(
            str(NOTEBOOKS / "03_simulated_serving.ipynb"),
            str(tmp_path / "03.ipynb"),
            parameters={"schedulers": ["vllm", "no-such-scheduler"], "output_dir": str(tmp_path / "results"),
                        "figures_dir": str(tmp_path / "figures")},
            kernel_name="python3",
            progress_bar=False,
        )


@pytest.mark.realdata
@pytest.mark.slow
def test_vllm_serving_notebook(tmp_path):
    """Notebook 04 drives real vLLM through the serving environment (.venv-serving), at a load
    set from the engine's capacity measured on it (the default regime's way)."""
    import os

    from econoserve.serving.study import serving_python_available
    from econoserve.workload.trace import Trace

    if not serving_python_available():
        if os.environ.get("CI") or os.environ.get("ECONOSERVE_REQUIRE_VLLM") == "1":
            pytest.fail("notebook 04 needs .venv-serving (scripts/install_serving.sh)")
        pytest.skip("no .venv-serving with vLLM (scripts/install_serving.sh)")
    figures, results = tmp_path / "figures", tmp_path / "results"
    papermill.execute_notebook(
        str(NOTEBOOKS / "04_vllm_serving.ipynb"),
        str(tmp_path / "04.ipynb"),
        parameters={"num_requests": 24, "load": 0.9, "predictor": "oracle", "profile": "quick", "repeats": 2,
                    "output_dir": str(results), "figures_dir": str(figures)},
        kernel_name="python3",
        progress_bar=False,
    )
    burst = json.loads((results / "capacity" / "vllm" / "summary.json").read_text())
    assert burst["completed"] == 24 and burst["throughput_rps"] > 0
    served = Trace.read(results / "trace_at_load.parquet")
    assert served.metadata["spec"]["rate_rps"] == pytest.approx(0.9 * burst["throughput_rps"])
    table = pd.read_csv(figures / "fig15_vllm_serving.csv")
    assert table["scheduler"].tolist() == ["vllm", "econoserve"]
    assert (table["real_completed"] == 24).all() and (table["compared"] == 24).all()
    for column in ("median_jct_error", "crossfit_median_jct_error", "selffit_median_jct_error"):
        assert table[column].notna().all(), column
    assert (table["selffit_num_preemptions"] >= 0).all()
    assert (table["rounds"] == 2).all() and (table.loc[0, ["median_mean_jct_ratio", "min_mean_jct_ratio"]] == 1.0).all()
    rounds = pd.read_csv(figures / "fig15_vllm_serving_rounds.csv")
    assert sorted(zip(rounds["scheduler"], rounds["round"])) == sorted(
        (s, r) for s in ("vllm", "econoserve") for r in (0, 1))  # interleaved rounds, each run once
    assert (figures / "fig15_vllm_serving.png").stat().st_size > 10_000


@pytest.mark.realdata
@pytest.mark.slow
def test_gpus_needed_notebook(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    pd.DataFrame([{"claim": "jct_reduction", "dataset": "all", "measured": 1.0}]).to_csv(
        figures / "headline_claims.csv", index=False)  # notebook 03's rows stay
    papermill.execute_notebook(
        str(NOTEBOOKS / "05_gpus_needed.ipynb"),
        str(tmp_path / "05.ipynb"),
        parameters={"datasets": ["sharegpt"], "models": ["opt-13b"], "slo_kinds": ["jct"], "predictor": "oracle",
                    "target_multiples": [1.0, 2.0], "distserve_check": False,
                    "output_dir": str(tmp_path / "out"), "figures_dir": str(figures)},
        kernel_name="python3",
        progress_bar=False,
    )
    table = pd.read_csv(figures / "fig12_gpus_needed.csv")
    assert set(table["system"]) == {"econoserve", "vllm", "sarathi", "distserve"}
    assert (table.loc[table["reachable"], "num_gpus"] >= 1).all()
    claims = pd.read_csv(figures / "headline_claims.csv")
    assert "jct_reduction" in set(claims["claim"])
    assert (figures / "fig12_gpus_needed.png").stat().st_size > 10_000

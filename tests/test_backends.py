"""Experiment backends: the process pool and Ray give the same results in task order; finished
tasks are stored atomically and a rerun computes only the missing ones; a task whose worker is
killed is retried and recorded once; the default path never imports Ray.

The Ray tests start a local Ray head (2 CPUs, no dashboard) once for the module and shut it down
afterwards; every test here is bounded by a hard deadline. (Ray cannot be held to loopback: it
maps 127.0.0.1 to the machine's address; its token authentication keeps other hosts out.)"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from econoserve.errors import UserError
from econoserve.experiments import (
    PoolBackend,
    RateGrid,
    SensitivityPlan,
    Task,
    TaskStore,
    content_key,
    make_backend,
    make_plan,
    run_experiments,
)
from econoserve.sim import WALL_CLOCK_COLUMNS, WALL_CLOCK_SUMMARY_KEYS

REPOSITORY = Path(__file__).resolve().parents[1]
#: Hard bound on any test of this module [s]: a hang dumps the stacks and ends the run.
DEADLINE_S = 600


@pytest.fixture(autouse=True)
def deadline():
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ray_backend():
    """A Ray instance started on this machine by the backend (2 CPUs), stopped afterwards."""
    pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this module's task functions
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    backend = make_backend("ray", jobs=2)
    try:
        yield backend
    finally:
        backend.close()
        faulthandler.cancel_dump_traceback_later()
        assert not ray.is_initialized()


@pytest.fixture(params=["pool", "ray"])
def backend(request):
    if request.param == "pool":
        with PoolBackend(jobs=2) as pool:
            yield pool
    else:
        yield request.getfixturevalue("ray_backend")


def _ray_param(name):
    return pytest.param(name, marks=pytest.mark.ray) if name == "ray" else name


# --------------------------------------------------------------------- task functions (top level: picklable)
def _scaled(item, table):
    """``table[item] * 10``, logging the call in the table's log file (one line per execution)."""
    index, log = item
    with open(log, "a") as out:
        out.write(f"{index}\n")
    return table[index] * 10


def _die_once(item):
    """``index ** 2``; the ``victim`` task kills its own worker process the first time it runs."""
    index, victim, directory = item
    directory = Path(directory)
    with open(directory / "executions.log", "a") as out:
        out.write(f"{index} {os.getpid()}\n")
    marker = directory / "killed"
    if index == victim and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return index * index


def _fails(item):
    if item == 2:
        raise UserError("task 2: bad input")
    return item


def _executions(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------- store
def test_store_writes_whole_files_and_keys_name_their_parts(tmp_path):
    store = TaskStore(tmp_path / "tasks")
    assert store.keys() == set()
    store.put("abc", {"x": [1, 2]})
    store.put("abc", {"x": [3]})  # replaced, never appended
    assert store.keys() == {"abc"} and store.get("abc") == {"x": [3]}
    assert [p.name for p in (tmp_path / "tasks").iterdir()] == ["abc.pkl"]  # no temporary left behind
    assert content_key("simulate", {"rate": 1.0}) == content_key("simulate", {"rate": 1.0})
    assert content_key("simulate", {"rate": 1.0}) != content_key("simulate", {"rate": 2.0})


# --------------------------------------------------------------------- both backends
@pytest.mark.parametrize("backend", [_ray_param("pool"), _ray_param("ray")], indirect=True)
def test_map_returns_results_in_task_order_and_resumes(backend, tmp_path):
    table = list(range(100, 112))
    shared = backend.share(table)
    assert backend.share(table) is shared  # shipped once
    log = tmp_path / "calls.log"
    tasks = [Task(f"t{i:02d}", (i, str(log)), (shared,)) for i in range(12)]
    store = TaskStore(tmp_path / "tasks")
    expected = [v * 10 for v in table]
    assert backend.map(_scaled, tasks, store=store, progress=False) == expected
    assert sorted(_executions(log)) == list(range(12)) and store.keys() == {t.key for t in tasks}
    # an interrupted run: two results lost; the rerun computes exactly those two
    store.path("t03").unlink()
    store.path("t10").unlink()
    log.unlink()
    assert backend.map(_scaled, tasks, store=store, progress=False) == expected
    assert sorted(_executions(log)) == [3, 10]
    # nothing missing: nothing computed
    log.unlink()
    assert backend.map(_scaled, tasks, store=store, progress=False) == expected
    assert not log.exists()


@pytest.mark.parametrize("backend", [_ray_param("pool"), _ray_param("ray")], indirect=True)
def test_a_killed_worker_is_retried_and_its_task_recorded_once(backend, tmp_path):
    tasks = [Task(f"k{i}", (i, 3, str(tmp_path))) for i in range(8)]
    store = TaskStore(tmp_path / "tasks")
    assert backend.map(_die_once, tasks, store=store, progress=False) == [i * i for i in range(8)]
    assert (tmp_path / "killed").exists()
    runs = _executions(tmp_path / "executions.log")
    assert runs.count(3) >= 2  # killed, then run again
    assert set(runs) == set(range(8))
    assert store.keys() == {t.key for t in tasks} and all(store.get(f"k{i}") == i * i for i in range(8))


@pytest.mark.parametrize("backend", [_ray_param("pool"), _ray_param("ray")], indirect=True)
def test_a_task_error_reaches_the_caller_and_keeps_finished_results(backend, tmp_path):
    store = TaskStore(tmp_path / "tasks")
    with pytest.raises(UserError, match="task 2: bad input"):
        backend.map(_fails, [Task(f"f{i}", i) for i in range(4)], store=store, progress=False)
    assert "f2" not in store.keys()


def test_bad_backend_choices_are_user_errors():
    with pytest.raises(UserError, match="unknown backend 'spark'"):
        make_backend("spark")
    with pytest.raises(UserError, match="for the ray backend"):
        make_backend("pool", address="auto")
    with pytest.raises(UserError, match="jobs must be >= 1"):
        make_backend("pool", jobs=0)


def test_the_default_path_runs_and_never_imports_ray():
    """With ``import ray`` made impossible, a sweep runs on the default backend and the ray
    backend is refused with an install hint."""
    script = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed: import ray raises ImportError
        from econoserve.errors import UserError
        from econoserve.experiments import Job, make_backend, run_jobs
        from econoserve.sim import SimulationConfig
        from econoserve.sim.synthetic import synthetic_trace

        trace = synthetic_trace(40, rate_rps=1.0, seed=3)
        jobs = [Job({"scheduler": s}, trace, r, SimulationConfig(scheduler=s, model="llama-2-7b"))
                for s in ("vllm", "econoserve") for r in (2.0, 8.0)]
        with make_backend("pool", jobs=2) as backend:
            rows, _, _ = run_jobs(jobs, backend, progress=False)
        assert [r["completed"] + r["rejected"] for r in rows] == [40] * 4
        try:
            make_backend("ray")
        except UserError as exc:
            assert "pip install 'econoserve[ray]'" in str(exc)
        else:
            raise AssertionError("ray backend made without Ray")
        assert sys.modules["ray"] is None
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --------------------------------------------------------------------- a real plan on both backends
TINY = {
    "datasets": ["alpaca"], "schedulers": ["vllm", "econoserve"], "ablations": ["econoserve"],
    "predictor": "oracle", "num_requests": 60, "seed": 1,
    "sensitivity": SensitivityPlan(datasets=("alpaca",), error_levels=(0.0, 0.4), rl_paddings=(0.1,),
                                   rl_buckets=(32,), reserve_ratios=(0.05,)),
}
WALL = [*WALL_CLOCK_SUMMARY_KEYS, *WALL_CLOCK_COLUMNS, "wall_time_s"]


def _without_wall(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` without its wall-clock columns (the only ones that differ between runs)."""
    return table.drop(columns=[c for c in WALL if c in table.columns])


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.ray
def test_a_plan_gives_the_same_tables_on_either_backend_and_resumes(ray_backend, tmp_path):
    plan = make_plan("quick", rate_grid=RateGrid(num_rates=2), jobs=2, **TINY)
    pooled = run_experiments(plan, tmp_path / "pool", progress=False)
    on_ray = run_experiments(plan, tmp_path / "ray", progress=False, backend=ray_backend)
    for name in ("saturation", "sweep", "sensitivity", "iterations", "requests"):
        pd.testing.assert_frame_equal(_without_wall(getattr(pooled, name)), _without_wall(getattr(on_ray, name)), obj=name)
    # rerun on the Ray results directory with the pool: every run is loaded, none recomputed
    store = TaskStore(tmp_path / "ray" / "tasks")
    total = len(store.keys())
    assert total == len(on_ray.saturation) + len(on_ray.sweep) + len(on_ray.sensitivity)
    sweep_keys = sorted(k for k in store.keys() if "reference" in store.get(k)[0])
    lost = {k: store.get(k)[0] for k in sweep_keys[:3]}  # three sweep runs lost
    for key in lost:
        store.path(key).unlink()
    again = run_experiments(plan, tmp_path / "ray", progress=False)
    assert len(store.keys()) == total
    # the three lost runs were computed again (new wall times); every other run came from the store
    changed = again.sweep[again.sweep["wall_time_s"] != on_ray.sweep["wall_time_s"]]
    assert sorted(changed["rate_rps"].tolist()) == sorted(row["rate_rps"] for row in lost.values())
    pd.testing.assert_frame_equal(again.sensitivity, on_ray.sensitivity)
    pd.testing.assert_frame_equal(_without_wall(again.sweep), _without_wall(on_ray.sweep))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.ray
def test_notebook_03_runs_on_a_ray_cluster_given_its_address(ray_backend, tmp_path):
    """``papermill ... -p backend ray -p address HOST:PORT``: the notebook's kernel joins the
    running Ray head as a driver, runs the plan there, and leaves the cluster running."""
    import papermill
    import ray

    address = ray.get_runtime_context().gcs_address
    results, figures = tmp_path / "results", tmp_path / "figures"
    papermill.execute_notebook(
        str(REPOSITORY / "notebooks" / "03_simulated_serving.ipynb"), str(tmp_path / "03.ipynb"),
        parameters={"backend": "ray", "address": address, "datasets": ["qmsum"], "schedulers": ["vllm", "econoserve"],
                    "ablations": ["econoserve", "econoserve-no-kvcpipe"], "predictor": "oracle",
                    "num_requests": 60, "sensitivity": False, "output_dir": str(results),
                    "figures_dir": str(figures)},
        kernel_name="python3", progress_bar=False, cwd=str(REPOSITORY),
    )
    sweep = pd.read_parquet(results / "sweep.parquet")
    assert set(sweep["scheduler"]) == {"vllm", "econoserve", "econoserve-no-kvcpipe"}
    saturation = pd.read_parquet(results / "saturation.parquet")
    assert len(TaskStore(results / "tasks").keys()) == len(sweep) + len(saturation)
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == address  # still up
    assert (figures / "headline_claims.csv").is_file()

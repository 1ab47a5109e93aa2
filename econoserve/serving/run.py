"""One serving run: a trace through a vLLM engine (in-process or HTTP server) into a run directory.

::

    spec = ServeSpec(engine=EngineConfig(model=str(resolve_model("tiny-opt"))), mode="offline")
    result = serve_trace(Trace.read("trace.parquet"), spec, "results/serve/run1")

writes ``requests.parquet``, ``iterations.parquet``, ``summary.json`` and ``config.json`` (the
format of :mod:`econoserve.results`) and, in server mode, ``server.log``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from econoserve.errors import UserError
from econoserve.serving.engine import EngineConfig, OfflineEngine
from econoserve.serving.models import model_vocab_size
from econoserve.serving.replay import make_replay_requests
from econoserve.serving.results import (
    ReplayResult,
    iterations_table,
    preemption_counts,
    requests_table,
    run_config,
)
from econoserve.results import summarize
from econoserve.workload.trace import Trace

MODES: tuple[str, ...] = ("offline", "server")

#: Scheduler names accepted by ``econoserve serve --scheduler``, and their vLLM class paths.
SCHEDULERS: dict[str, str] = {
    "vllm": "econoserve.serving.recording.RecordingScheduler",
    "econoserve": "econoserve.serving.scheduler.EconoServeScheduler",
}
#: ``--scheduler policy:NAME`` runs the registered policy NAME (``sarathi``,
#: ``econoserve-no-kvcpipe``, ...) inside vLLM through this class.
POLICY_SCHEDULER_PREFIX = "policy:"
POLICY_SCHEDULER = "econoserve.serving.scheduler.PolicyScheduler"
#: Schedulers that are planned but not implemented yet, with the reason shown to the user.
UNAVAILABLE_SCHEDULERS: dict[str, str] = {}

_ITERATION_LOG = "engine_steps.jsonl"


def scheduler_class(name: str) -> str:
    """The vLLM ``scheduler_cls`` path for a scheduler name; a clear error for unknown ones."""
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name in UNAVAILABLE_SCHEDULERS:
        raise UserError(UNAVAILABLE_SCHEDULERS[name])
    if name.startswith(POLICY_SCHEDULER_PREFIX):
        _policy_name(name)
        return POLICY_SCHEDULER
    known = ", ".join([*SCHEDULERS, *UNAVAILABLE_SCHEDULERS, f"{POLICY_SCHEDULER_PREFIX}NAME"])
    raise UserError(f"unknown scheduler {name!r}; choose one of {known}")


def scheduler_options(name: str, policy_config: dict | None = None, predictor: str | Path | None = None,
                      refined_predictor: str | Path | None = None, engine_vocab_size: int | None = None,
                      distribution_predictor: str | Path | None = None,
                      latency_model: str | Path | None = None) -> dict:
    """The ``additional_config["econoserve"]`` options a scheduler name implies (the policy, its
    configuration overrides, the length model for requests without a prediction, the
    distribution model and the refined model, :mod:`econoserve.serving.prediction`; the engine's
    latency model, from which the policy gets its time estimates); empty for vLLM's own scheduler.
    Each is checked here, before vLLM starts: the models load, and, given the engine model's
    ``engine_vocab_size`` [token ids], their tokenizers fit it."""
    options: dict = {}
    if name.startswith(POLICY_SCHEDULER_PREFIX):
        options["policy"] = _policy_name(name)
    elif name == "econoserve":
        options["policy"] = "econoserve"
    if policy_config:
        if not options:
            raise UserError(f"scheduler {name!r} takes no policy configuration (vLLM's own policy)")
        from econoserve.policy import make_config

        make_config(options["policy"], policy_config)  # wrong fields, types or ranges: one line, before vLLM starts
        options["policy_config"] = dict(policy_config)
    models = {"predictor": predictor, "distribution_predictor": distribution_predictor,
              "refined_predictor": refined_predictor}
    for key, directory in models.items():
        if directory is not None and not options:
            raise UserError(f"scheduler {name!r} takes no {key} (vLLM's own policy uses no predictions)")
    if any(directory is not None for directory in models.values()):
        from econoserve.serving.prediction import load_engine_models

        load_engine_models(**models, engine_vocab_size=engine_vocab_size)  # one line now, not a traceback from vLLM
        options.update({key: str(Path(directory).resolve()) for key, directory in models.items() if directory is not None})
    if latency_model is not None:
        if not options:
            raise UserError(f"scheduler {name!r} takes no latency_model (vLLM's own policy uses no time estimates)")
        from econoserve.sim.latency import FittedLatencyModel

        FittedLatencyModel.load(latency_model)  # one line now, not a traceback from vLLM
        options["latency_model"] = str(Path(latency_model).resolve())
    return options


def _policy_name(name: str) -> str:
    from econoserve.policy import policy_names

    policy = name[len(POLICY_SCHEDULER_PREFIX):]
    if policy not in policy_names():
        raise UserError(f"unknown policy {policy!r} in {name!r}; registered: {', '.join(policy_names())}")
    return policy


@dataclass(frozen=True)
class ServeSpec:
    """How to replay: the engine, the transport, and the replay clock."""

    engine: EngineConfig
    mode: str = "offline"
    """``offline``: vLLM in this process, stepped by the replay; ``server``: HTTP on loopback."""
    scheduler: str = "vllm"
    time_scale: float = 1.0
    """Multiplies arrival times (0.5 = twice the rate; 0 = all at once)."""
    prompt_seed: int = 0
    """Seed of the random prompt token ids."""
    timeout_s: float | None = 600.0
    """Offline mode: abort and fail the run after this long [s]."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.time_scale < 0:
            raise UserError(f"time scale {self.time_scale} must be >= 0")


def serve_trace(trace: Trace, spec: ServeSpec, run_dir: str | Path) -> ReplayResult:
    """Replay ``trace`` through vLLM as ``spec`` says and write the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / _ITERATION_LOG
    log_path.unlink(missing_ok=True)
    engine_config = replace(spec.engine, iteration_log=str(log_path) if spec.engine.scheduler_cls else None)
    requests = make_replay_requests(
        trace,
        model_vocab_size(Path(engine_config.model)),
        seed=spec.prompt_seed,
        max_model_len=engine_config.max_model_len,
        time_scale=spec.time_scale,
    )

    if spec.mode == "offline":
        with OfflineEngine(engine_config) as engine:
            timers, start = engine.replay(requests, spec.timeout_s)
    else:
        from econoserve.serving.client import replay_over_http
        from econoserve.serving.server import VllmServer

        with VllmServer(engine_config, run_dir / "server.log") as server:
            timers, start = asyncio.run(replay_over_http(server.base_url, requests))

    from econoserve.serving.recording import read_iteration_log

    iteration_records, preemption_records = read_iteration_log(log_path)
    datasets = dict(zip(trace.requests["request_id"].tolist(), trace.requests["dataset"].tolist()))
    requests_frame = requests_table(timers, preemption_counts(preemption_records), datasets)
    iterations_frame = iterations_table(iteration_records, start)
    config = run_config(
        engine_config,
        trace.metadata,
        mode=spec.mode,
        scheduler=spec.scheduler,
        time_scale=spec.time_scale,
        prompt_seed=spec.prompt_seed,
    )
    result = ReplayResult(requests_frame, iterations_frame,
                          summarize(requests_frame, iterations_frame, engine_config.max_num_batched_tokens), config)
    result.write(run_dir)
    log_path.unlink(missing_ok=True)
    return result


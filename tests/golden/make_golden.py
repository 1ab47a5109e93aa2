"""Freeze the simulator's tables on fixed workloads, for the one-replica identity test.

Run from the repository root (``PYTHONPATH=. python tests/golden/make_golden.py [--defaults]``)
only when a change is *meant* to alter simulation results; the frozen files were written by the
single-replica simulator before the cluster refactor (issue 11), and
``tests/test_sim_golden.py`` checks that every column they hold is reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from econoserve.policy import policy_names  # noqa: E402
from econoserve.sim import SimulationConfig, simulate  # noqa: E402
from econoserve.sim.engine import WALL_CLOCK_COLUMNS, WALL_CLOCK_SUMMARY_KEYS  # noqa: E402
from econoserve.sim.synthetic import synthetic_trace  # noqa: E402
from econoserve.workload.trace import Trace  # noqa: E402


def _with_noisy_predictions(trace: Trace, seed: int) -> Trace:
    """The trace with predicted lengths = true lengths x a log-normal error (so mispredictions,
    reserve extensions and preemptions all happen)."""
    frame = trace.requests.copy()
    rng = np.random.default_rng(seed)
    noisy = frame["output_tokens"].to_numpy() * np.exp(rng.normal(0.0, 0.4, len(frame)))
    frame["predicted_output_tokens"] = np.maximum(1, noisy.round()).astype(np.int64)
    return Trace.from_frame(frame, trace.metadata, source="<golden>")


def workloads() -> dict[str, tuple[Trace, dict[str, object]]]:
    """Fixed workloads by name: (trace, SimulationConfig overrides besides the scheduler)."""
    return {
        # a tight cache under load: preemptions, reserve extensions, rejections
        "tight": (_with_noisy_predictions(synthetic_trace(240, rate_rps=40.0, seed=11), seed=12),
                  {"num_kv_blocks": 420}),
        # a roomy cache at a modest rate: long steady decode stretches (skip-ahead)
        "roomy": (_with_noisy_predictions(synthetic_trace(120, rate_rps=4.0, output_tokens=(1, 900), seed=21), seed=22),
                  {"model": "llama-2-13b"}),
        # prompts past the context and a small cache: rejections of every kind
        "edge": (_with_noisy_predictions(synthetic_trace(150, rate_rps=20.0, prompt_tokens=(16, 2100),
                                                         output_tokens=(1, 700), seed=31), seed=32),
                 {"num_kv_blocks": 160}),
    }


#: Policy configuration the tables were frozen with, where a policy's defaults changed since on
#: purpose (issue 10: EconoServe's admission, Ordering's KV cost ``ordering_prompt_weight`` and
#: the cap on a step's prompt tokens ``prefill_decode_steps``; the frozen tables are the earlier
#: defaults, exact allocation, slack-only keys and no prefill cap, so they still pin the
#: simulator's mechanics rather than the policy's tuning).
FROZEN_POLICY_CONFIG: dict[str, dict[str, object]] = {
    **{name: {"kvcpipe": "curve", "reserve_ratio": 0.05, "ordering_prompt_weight": 0.0, "prefill_decode_steps": None}
       for name in ("econoserve", "econoserve-no-ordering", "econoserve-no-syncdecoupled", "econoserve-oracle")},
    "econoserve-no-kvcpipe": {"reserve_ratio": 0.05, "ordering_prompt_weight": 0.0, "prefill_decode_steps": None},
}


#: EconoServe and its ablations at their *current* default configuration (KVCPipe for every
#: request, ``kvcpipe="all"``; Ordering's KV cost, ``ordering_prompt_weight=64``), which the
#: frozen tables above do not run: pinned by the sha256 of their tables only
#: (``sha256_defaults.json``), so that work on the simulator's speed (issue 15) is checked to
#: leave every result bit for bit unchanged. Refreeze (``--defaults``) only when a
#: change is meant to alter EconoServe's default behaviour.
DEFAULT_CONFIG_SCHEDULERS: tuple[str, ...] = (
    "econoserve", "econoserve-no-kvcpipe", "econoserve-no-ordering", "econoserve-no-syncdecoupled", "econoserve-oracle",
)
DEFAULTS_HASHES = HERE / "sha256_defaults.json"


def golden_path(workload: str, scheduler: str, table: str) -> Path:
    return HERE / f"{workload}--{scheduler}--{table}.parquet"


def frozen_tables(workload: str, scheduler: str, defaults: bool = False) -> dict[str, pd.DataFrame]:
    """The requests, iterations and summary (one row) tables of one run, wall-clock columns
    dropped; the policy configured as frozen (``FROZEN_POLICY_CONFIG``) or, with ``defaults``, at
    its default configuration."""
    trace, overrides = workloads()[workload]
    policy_config = {} if defaults else FROZEN_POLICY_CONFIG.get(scheduler, {})
    result = simulate(trace, SimulationConfig(scheduler=scheduler, policy_config=policy_config, **overrides))
    summary = {k: v for k, v in result.summary.items() if k not in WALL_CLOCK_SUMMARY_KEYS}
    return {
        "requests": result.requests,
        "iterations": result.iterations.drop(columns=list(WALL_CLOCK_COLUMNS)),
        "summary": pd.DataFrame([summary]),
    }


def table_sha256(table: pd.DataFrame) -> str:
    """sha256 of a table's values (pandas' row hashes, in order, with the column names)."""
    digest = hashlib.sha256(json.dumps(list(table.columns)).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def freeze_defaults() -> None:
    """Write ``sha256_defaults.json``: the table hashes of ``DEFAULT_CONFIG_SCHEDULERS``."""
    hashes = {
        f"{workload}/{scheduler}/{name}": table_sha256(table)
        for workload in workloads()
        for scheduler in DEFAULT_CONFIG_SCHEDULERS
        for name, table in frozen_tables(workload, scheduler, defaults=True).items()
    }
    DEFAULTS_HASHES.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


def main() -> None:
    if "--defaults" in sys.argv[1:]:
        freeze_defaults()
        return
    hashes: dict[str, str] = {}
    for workload in workloads():
        for scheduler in policy_names():
            for name, table in frozen_tables(workload, scheduler).items():
                if name == "summary":
                    continue  # frozen before summaries were pinned
                table.to_parquet(golden_path(workload, scheduler, name), index=False, compression="zstd")
                hashes[f"{workload}/{scheduler}/{name}"] = table_sha256(table)
                print(workload, scheduler, name, len(table), hashes[f"{workload}/{scheduler}/{name}"][:12])
    (HERE / "sha256.json").write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

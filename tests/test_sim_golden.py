"""A one-replica run reproduces, column for column, the tables the simulator wrote before the
cluster refactor (issue 11): frozen in ``tests/golden/`` by ``tests/golden/make_golden.py``; and
EconoServe at its default configuration reproduces the hashes of its tables pinned before the
speed work of issue 15."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from econoserve.policy import policy_names
from golden.make_golden import (
    DEFAULT_CONFIG_SCHEDULERS,
    DEFAULTS_HASHES,
    HERE,
    frozen_tables,
    golden_path,
    table_sha256,
    workloads,
)

FROZEN_HASHES = json.loads((HERE / "sha256.json").read_text())
PINNED_DEFAULT_HASHES = json.loads(DEFAULTS_HASHES.read_text())


@pytest.mark.parametrize("workload", sorted(workloads()))
@pytest.mark.parametrize("scheduler", policy_names())
def test_one_replica_reproduces_every_frozen_column(workload, scheduler):
    key = f"{workload}/{scheduler}"
    if f"{key}/requests" not in FROZEN_HASHES:
        pytest.skip(f"{scheduler} was registered after the tables were frozen")
    for name, table in frozen_tables(workload, scheduler).items():
        if name == "summary":
            continue  # not frozen in files (see the pinned defaults below)
        frozen = pd.read_parquet(golden_path(workload, scheduler, name))
        assert table_sha256(frozen) == FROZEN_HASHES[f"{key}/{name}"], "the frozen file itself changed"
        missing = sorted(set(frozen.columns) - set(table.columns))
        assert not missing, f"{name}: columns gone: {missing}"
        pd.testing.assert_frame_equal(table[list(frozen.columns)], frozen, check_exact=True, check_dtype=False)


@pytest.mark.parametrize("workload", sorted(workloads()))
@pytest.mark.parametrize("scheduler", DEFAULT_CONFIG_SCHEDULERS)
def test_econoserve_at_its_defaults_reproduces_its_pinned_tables(workload, scheduler):
    for name, table in frozen_tables(workload, scheduler, defaults=True).items():
        assert table_sha256(table) == PINNED_DEFAULT_HASHES[f"{workload}/{scheduler}/{name}"], (
            f"{workload}/{scheduler}: the {name} table changed")

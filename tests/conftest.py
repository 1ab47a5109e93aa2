"""Shared test set-up.

* Real data comes from the local mirror ``ECONOSERVE_DATA_MIRROR`` (``.ci/run`` and the Makefile
  set it to ``../shared/data``; here it defaults to that too). Tests marked ``realdata`` are
  skipped when no mirror is present, except under CI (``CI`` set), where a missing mirror fails.
* Every test session gets its own empty data cache (``ECONOSERVE_DATA_CACHE``), so loaders are
  exercised for real rather than read from an earlier run's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_MIRROR = REPOSITORY_ROOT.parent / "shared" / "data"

if "ECONOSERVE_DATA_MIRROR" not in os.environ and _DEFAULT_MIRROR.is_dir():
    os.environ["ECONOSERVE_DATA_MIRROR"] = str(_DEFAULT_MIRROR)


def mirror_available() -> bool:
    mirror = os.environ.get("ECONOSERVE_DATA_MIRROR")
    return bool(mirror) and (Path(mirror) / "alpaca_data_52k.json.gz").is_file()


@pytest.fixture(scope="session", autouse=True)
def _session_data_cache(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("econoserve-cache")
    previous = os.environ.get("ECONOSERVE_DATA_CACHE")
    os.environ["ECONOSERVE_DATA_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("ECONOSERVE_DATA_CACHE", None)
    else:
        os.environ["ECONOSERVE_DATA_CACHE"] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if mirror_available():
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            "CI run without the dataset mirror: set ECONOSERVE_DATA_MIRROR to ../shared/data"
        )
    skip = pytest.mark.skip(reason="no dataset mirror (set ECONOSERVE_DATA_MIRROR)")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)

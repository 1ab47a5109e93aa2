"""Shared test set-up.

* Real data comes from the local mirror ``ECONOSERVE_DATA_MIRROR`` (``.ci/run`` and the Makefile
  set it to ``../shared/data``; here it defaults to that too). Tests marked ``realdata`` are
  skipped when no mirror is present, except under CI (``CI`` set), where a missing mirror fails.
* Tests marked ``serving`` run a real vLLM engine: skipped when vLLM is not importable, except
  with ``ECONOSERVE_REQUIRE_VLLM=1`` (``make test-serving``), where a missing vLLM fails the run.
* Tests marked ``ray`` start a local Ray head (the ``ray`` extra, which ``make test`` installs):
  skipped when Ray is not importable, except under CI, where a missing Ray fails the run.
* Every test session gets its own empty data cache (``ECONOSERVE_DATA_CACHE``), so loaders are
  exercised for real rather than read from an earlier run's cache.
* ``make test`` runs both suites in parallel (pytest-xdist, one worker per core, one test at a
  time to whichever worker is free). Tests marked ``slow`` are collected first, so the longest start
  early and the short ones fill in at the end. In a worker, OpenMP threads (LightGBM trains on two)
  sleep rather than spin while they wait: with two workers' threads spinning on a two-core machine
  the core suite had not passed half its tests after 17 minutes, against 14 minutes for all of them
  with sleeping threads. A worker's vLLM CPU engine runs on one unpinned thread (``OMP_NUM_THREADS``,
  ``VLLM_CPU_OMP_THREADS_BIND``), as notebook 04's engines do, so two engines share the cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_MIRROR = REPOSITORY_ROOT.parent / "shared" / "data"

if "ECONOSERVE_DATA_MIRROR" not in os.environ and _DEFAULT_MIRROR.is_dir():
    os.environ["ECONOSERVE_DATA_MIRROR"] = str(_DEFAULT_MIRROR)

if "PYTEST_XDIST_WORKER" in os.environ:  # before any test module loads LightGBM's OpenMP, BLAS or vLLM
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from econoserve.serving.study import EngineOptions  # numpy loads here, after the BLAS setting

    for _name, _value in EngineOptions().environment().items():  # notebook 04's engine: one unpinned thread
        os.environ.setdefault(_name, _value)


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


VLLM_AVAILABLE = importlib.util.find_spec("vllm") is not None
RAY_AVAILABLE = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight OPT model, built once per session (serving tests)."""
    from econoserve.serving.models import TinyModelSpec, build_tiny_model

    return build_tiny_model(TinyModelSpec(), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def length_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved length-only response-length model (OPT tokens) whose prediction grows with the
    prompt: trained on label = prompt tokens / 2 + 1, 400 synthetic prompts, in about a second."""
    import numpy as np

    from econoserve.predictor.data import LabeledPrompts
    from econoserve.predictor.features import FeatureConfig
    from econoserve.predictor.model import PredictorConfig, train_predictor

    tokens = np.random.default_rng(0).integers(4, 400, size=400)
    data = LabeledPrompts(dataset="synthetic", part="train", tokenizer="opt", prompts=None, prompt_tokens=tokens,
                          source_index=np.arange(400), targets={"reference": tokens // 2 + 1})
    config = PredictorConfig(num_boost_round=40, num_threads=1, features=FeatureConfig(tokenizer="opt", use_text=False))
    return train_predictor(data, config).save(tmp_path_factory.mktemp("length-model") / "model")


@pytest.fixture(scope="session")
def refined_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved refined response-length model (:mod:`econoserve.predictor.refine`, gpt2 tokens,
    ``k = 8``) on 300 synthetic requests whose first words tell their length ("Sure! Here is a
    detailed plan:" ~160 tokens, "Yes." ~30); trains in about a second. Needs the tokenizer files
    of the data mirror (``realdata`` tests)."""
    import numpy as np

    from econoserve.predictor.data import LabeledPrompts
    from econoserve.predictor.features import FeatureConfig
    from econoserve.predictor.model import PredictorConfig, train_predictor
    from econoserve.predictor.refine import RefinedConfig, train_refined_predictor
    from econoserve.workload.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    tokenizer = load_tokenizer("gpt2")
    prompts = [f"Tell me about {topic}" for topic in rng.choice(["the sea", "a cat", "the moon", "coffee"], size=300)]
    long = rng.random(300) < 0.5
    responses = [("Sure! Here is a detailed plan:\n\n1. " if is_long else "Yes. ") + " ".join(["word"] * (150 if is_long else 30))
                 for is_long in long]
    lengths = tokenizer.count(responses)
    data = LabeledPrompts(dataset="synthetic", part="train", tokenizer="gpt2", prompts=prompts,
                          prompt_tokens=tokenizer.count(prompts), source_index=np.arange(300), targets={"reference": lengths})
    config = PredictorConfig(num_boost_round=30, learning_rate=0.3, num_threads=1,
                             features=FeatureConfig(tokenizer="gpt2", ngram_vocabulary_size=20, ngram_min_df=2))
    model = train_refined_predictor(train_predictor(data, config), prompts, responses, lengths,
                                    RefinedConfig(prefix_tokens=8, prefix_vocabulary_size=50))
    return model.save(tmp_path_factory.mktemp("refined-model") / "model")


@pytest.hookimpl(trylast=True)  # after `-m` deselection: gate only the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the slow first, else as collected
    _gate(items, "realdata", mirror_available(), bool(os.environ.get("CI")),
          "no dataset mirror (set ECONOSERVE_DATA_MIRROR to ../shared/data)")
    _gate(items, "serving", VLLM_AVAILABLE, os.environ.get("ECONOSERVE_REQUIRE_VLLM") == "1",
          "vLLM is not installed (scripts/install_serving.sh)")
    _gate(items, "ray", RAY_AVAILABLE, bool(os.environ.get("CI")),
          "Ray is not installed (pip install 'econoserve[ray]')")


def _gate(items: list[pytest.Item], marker: str, available: bool, required: bool, reason: str) -> None:
    """Skip the tests marked ``marker`` when their resource is missing; fail the run if required."""
    if available or not any(marker in item.keywords for item in items):
        return
    if required:
        raise pytest.UsageError(f"{marker} tests required but {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)

"""Prompt decoupling (:mod:`econoserve.predictor.decoupling`): the factor is fitted on the
training prompts only, moves the predictions' coupling with the prompt length toward the truth's,
is saved with the model and applied by it, and changes nothing while off.

Synthetic prompts where the prompt length tells the kind of answer (long prompts ask for a short
summary, short prompts for a story) but each answer's length is noisy: a model that learns the
kind couples its predictions to the prompt length harder than the noisy truths are coupled."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import spearmanr

from econoserve.errors import PredictorError
from econoserve.predictor.data import LabeledPrompts
from econoserve.predictor.decoupling import SLOPE_GRID, fit_prompt_decoupling
from econoserve.predictor.model import LengthPredictor, PredictorConfig, train_predictor
from econoserve.workload.tokenizer import Tokenizer

CONFIG = PredictorConfig(num_boost_round=40, prompt_decoupling_folds=3)


class _WordBackend:
    """One token per whitespace-separated word; ids decode back to the words."""

    def __init__(self) -> None:
        self.words: dict[str, int] = {}

    def encode(self, texts):
        return [[self.words.setdefault(word, len(self.words)) for word in text.split()] for text in texts]

    def decode(self, ids):
        names = {i: word for word, i in self.words.items()}
        return " ".join(names[i] for i in ids)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("llama2", _WordBackend())


def coupled_prompts(size: int, seed: int) -> LabeledPrompts:
    """Half the prompts long (a text to summarise, median answer 20 tokens), half short (a story,
    median 200 tokens); lognormal answer noise (sigma 1.2) independent of everything else."""
    rng = np.random.default_rng(seed)
    prompts, lengths = [], []
    for _ in range(size):
        filler = " ".join(["word"] * int(rng.integers(0, 40)))
        if rng.random() < 0.5:
            prompts.append(f"Summarise this text: {filler} " + " ".join(["text"] * int(rng.integers(40, 120))))
            median = 20
        else:
            prompts.append(f"Write a story about the sea. {filler}")
            median = 200
        lengths.append(max(1, int(median * np.exp(1.2 * rng.standard_normal()))))
    return LabeledPrompts(
        dataset="synthetic", part="train", tokenizer="llama2", prompts=prompts,
        prompt_tokens=np.array([len(p.split()) for p in prompts], dtype=np.int64),
        source_index=np.arange(size, dtype=np.int64), targets={"reference": np.array(lengths, dtype=np.int64)},
        source_sha256={"synthetic": "0" * 64})


@pytest.fixture(scope="module")
def data() -> LabeledPrompts:
    return coupled_prompts(1200, seed=3)


@pytest.fixture(scope="module")
def decoupled(data, tokenizer) -> LengthPredictor:
    return train_predictor(data, CONFIG, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def plain(data, tokenizer) -> LengthPredictor:
    return train_predictor(data, replace(CONFIG, prompt_decoupling_folds=0), tokenizer=tokenizer)


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def test_fit_matches_the_truths_coupling_on_the_grid():
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 2000, size=3000)
    centred = np.log(prompt) - np.log(prompt).mean()
    truth = np.exp(4 - 0.3 * centred + rng.standard_normal(3000))
    scores = 4 - 0.6 * centred + 0.2 * rng.standard_normal(3000)  # leans on the prompt twice as hard
    fit = fit_prompt_decoupling(scores, prompt, truth, folds=5)
    assert fit.slope > 0 and fit.slope in SLOPE_GRID
    assert fit.centre_log_prompt == pytest.approx(np.log(prompt).mean())
    assert fit.target_spearman == pytest.approx(rho(prompt, truth))
    assert abs(fit.oof_spearman_after - fit.target_spearman) < 0.01 < abs(fit.oof_spearman_before - fit.target_spearman)
    # the adjustment is exactly slope * centred log prompt: zero at the centre, monotone in the prompt
    assert np.allclose(fit.adjust(scores, prompt) - scores, fit.slope * centred)
    # already matched: no adjustment
    assert fit_prompt_decoupling(np.log(truth), prompt, truth, folds=5).slope == 0.0


def test_decoupling_moves_the_coupling_toward_the_truth(decoupled, plain, data, tokenizer):
    fit = decoupled.prompt_decoupling
    assert fit.folds == 3 and fit.slope > 0  # the model leans on "long prompt -> short answer" too hard
    assert fit.oof_spearman_before < fit.target_spearman
    assert abs(fit.oof_spearman_after - fit.target_spearman) < abs(fit.oof_spearman_before - fit.target_spearman)
    held_out = coupled_prompts(800, seed=4)
    truth = rho(held_out.prompt_tokens, held_out.labels("reference"))
    before = rho(held_out.prompt_tokens, plain.predict(held_out.prompts))
    after = rho(held_out.prompt_tokens, decoupled.predict(held_out.prompts))
    assert abs(after - truth) < abs(before - truth)  # also on prompts neither model saw


@pytest.mark.slow
def test_the_factor_uses_only_the_training_prompts(data, decoupled, tokenizer):
    """Split a dataset into training and held-out rows: whatever the held-out truths, the fit is the
    same (training never sees them); a change in the training truths changes it."""
    everything = coupled_prompts(1500, seed=3)  # its first 1200 rows are ``data``
    train_rows = np.arange(len(data))
    assert np.array_equal(everything.subset(train_rows).labels("reference"), data.labels("reference"))
    for seed in (1, 2):
        truths = everything.labels("reference").copy()
        truths[len(data):] = np.random.default_rng(seed).integers(1, 2000, size=len(everything) - len(data))
        again = train_predictor(replace(everything, targets={"reference": truths}).subset(train_rows), CONFIG,
                                tokenizer=tokenizer)
        assert again.prompt_decoupling == decoupled.prompt_decoupling
    changed = data.labels("reference").copy()
    changed[data.prompt_tokens > 60] *= 3  # the training truths lean less on the prompt length
    moved = train_predictor(replace(data, targets={"reference": changed}), CONFIG, tokenizer=tokenizer)
    assert moved.prompt_decoupling.target_spearman > decoupled.prompt_decoupling.target_spearman
    assert moved.prompt_decoupling.slope != decoupled.prompt_decoupling.slope


def test_off_is_the_plain_model_and_on_is_one_factor_on_it(decoupled, plain, data):
    prompts = coupled_prompts(300, seed=5).prompts
    assert plain.prompt_decoupling is None and "prompt_decoupling" not in plain.metadata()
    unadjusted = replace(decoupled, prompt_decoupling=None)
    assert np.array_equal(unadjusted.predict(prompts), plain.predict(prompts))  # same booster: decoupling is post hoc
    fit = decoupled.prompt_decoupling
    tokens = np.array([len(p.split()) for p in prompts])
    expected = np.expm1(plain.booster.predict(plain.featurizer.transform(prompts))
                        + fit.slope * (np.log(tokens) - fit.centre_log_prompt))
    assert np.array_equal(decoupled.predict(prompts), np.maximum(np.rint(expected), 1).astype(np.int64))


def test_save_load_round_trip_and_corrupt_metadata(decoupled, tmp_path, tokenizer):
    prompts = coupled_prompts(200, seed=6).prompts
    loaded = LengthPredictor.load(decoupled.save(tmp_path / "model"), tokenizer=tokenizer)
    assert loaded.prompt_decoupling == decoupled.prompt_decoupling
    assert np.array_equal(loaded.predict(prompts), decoupled.predict(prompts))
    path = tmp_path / "model" / "metadata.json"
    metadata = json.loads(path.read_text())
    del metadata["prompt_decoupling"]["slope"]
    path.write_text(json.dumps(metadata))
    with pytest.raises(PredictorError, match="prompt_decoupling must hold"):
        LengthPredictor.load(tmp_path / "model", tokenizer=tokenizer)


def test_the_engine_path_applies_it(decoupled, plain, tokenizer):
    """The vLLM drop-in (:class:`~econoserve.serving.prediction.EnginePredictor`) predicts from
    prompt token ids through :meth:`LengthPredictor.predict`, so it gets the decoupled lengths."""
    from econoserve.serving.prediction import EnginePredictor

    prompts = coupled_prompts(40, seed=7).prompts
    engine = EnginePredictor(decoupled, tokenizer)
    from_ids = [engine.predict(tokenizer.encode([p])[0]) for p in prompts]
    assert from_ids == decoupled.predict(prompts).tolist() != plain.predict(prompts).tolist()


def test_configuration_is_checked(data, tokenizer):
    with pytest.raises(PredictorError, match="prompt_decoupling_folds"):
        PredictorConfig(prompt_decoupling_folds=1)
    with pytest.raises(PredictorError, match="only a regression"):
        PredictorConfig(objective="rank", prompt_decoupling_folds=5)
    assert PredictorConfig.from_dict({"objective": "regression"}).prompt_decoupling_folds == 0  # older models: off


def test_a_refined_predictor_cannot_extend_a_decoupled_base(decoupled):
    from econoserve.predictor.refine import train_refined_predictor

    with pytest.raises(PredictorError, match="prompt-decoupled"):
        train_refined_predictor(decoupled, ["a"] * 20, ["b c"] * 20, np.full(20, 50))


@pytest.mark.parametrize(("extra", "message"), [
    (["--objective", "rank", "--prompt-decoupling-folds", "5"], "only a regression"),
    (["--prompt-decoupling-folds", "1"], "prompt_decoupling_folds"),
])
def test_the_cli_refuses_a_bad_decoupling_in_one_line(capsys, tmp_path, extra, message):
    from econoserve.cli import main

    status = main(["predictor", "train", "--dataset", "alpaca", *extra, "-o", str(tmp_path / "model")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and message in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "model").exists()

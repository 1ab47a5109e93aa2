"""The neighbour-length feature block (econoserve/predictor/neighbours.py): off by default,
leave-one-out / out-of-fold on the training prompts, deterministic, saved without pickle."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from econoserve.errors import PredictorError
from econoserve.predictor.data import LabeledPrompts
from econoserve.predictor.features import FeatureConfig, PromptFeaturizer
from econoserve.predictor.model import LengthPredictor, PredictorConfig, train_predictor
from econoserve.predictor.neighbours import NEIGHBOUR_FEATURES, NeighbourIndex, training_folds
from econoserve.predictor.refine import train_refined_predictor
from test_predictor import FAST, synthetic_prompts, whitespace_tokenizer

NEIGHBOURS = replace(FAST, features=replace(FAST.features, neighbour_count=8))
COLUMN = {name: i for i, name in enumerate(NEIGHBOUR_FEATURES)}


@pytest.fixture(scope="module")
def train_data() -> LabeledPrompts:
    return synthetic_prompts(600, seed=1)


@pytest.fixture(scope="module")
def test_data() -> LabeledPrompts:
    return synthetic_prompts(200, seed=2)


@pytest.fixture(scope="module")
def neighbour_model(train_data) -> LengthPredictor:
    return train_predictor(train_data, NEIGHBOURS, tokenizer=whitespace_tokenizer())


def _block(featurizer: PromptFeaturizer, matrix) -> np.ndarray:
    """The neighbour columns of a feature matrix."""
    names = featurizer.feature_names()
    columns = [names.index(f"neighbour_{name}") for name in NEIGHBOUR_FEATURES]
    return np.asarray(sp.csr_matrix(matrix)[:, columns].todense())


def test_block_is_off_by_default_and_leaves_the_matrix_unchanged(train_data):
    assert FeatureConfig().neighbour_count == 0
    default = PromptFeaturizer(FAST.features, whitespace_tokenizer()).fit(train_data.prompts)
    with_lengths = PromptFeaturizer(FAST.features, whitespace_tokenizer()).fit(
        train_data.prompts, lengths=train_data.labels("reference"))
    assert not any(name.startswith("neighbour_") for name in default.feature_names())
    a = default.transform(train_data.prompts)
    assert (a != with_lengths.transform(train_data.prompts)).nnz == 0
    assert (a != default.training_matrix(train_data.prompts)).nnz == 0


def _duplicates() -> tuple[list[str], np.ndarray]:
    """Distinct prompts, each twice (rows 2i and 2i+1) with its own length."""
    prompts, lengths = [], []
    for i in range(40):
        text = f"tell me about item{i} with detail{i} and colour{i}"
        prompts += [text, text]
        lengths += [10 + 7 * i, 500 + 3 * i]
    return prompts, np.asarray(lengths, dtype=np.int64)


def test_leave_one_out_gives_the_duplicates_length_and_never_the_rows_own():
    prompts, lengths = _duplicates()
    config = FeatureConfig(ngram_min_df=1, neighbour_count=1, lexical_cues=False)
    featurizer = PromptFeaturizer(config, whitespace_tokenizer()).fit(prompts, lengths=lengths)
    block = _block(featurizer, featurizer.training_matrix(prompts))
    partner = np.arange(len(prompts)) ^ 1  # row 2i's exact duplicate is 2i+1 and back
    np.testing.assert_allclose(block[:, COLUMN["top_log_length"]], np.log1p(lengths[partner]))
    np.testing.assert_allclose(block[:, COLUMN["top_similarity"]], 1.0)
    # the same prompts served (transform) see themselves first: the tie goes to the lower row
    served = _block(featurizer, featurizer.transform(prompts))
    np.testing.assert_allclose(served[:, COLUMN["top_log_length"]], np.log1p(lengths[np.arange(len(prompts)) & ~1]))


def test_out_of_fold_statistics_use_only_other_folds():
    prompts, lengths = _duplicates()
    config = FeatureConfig(ngram_min_df=1, neighbour_count=3, neighbour_folds=4, lexical_cues=False)
    featurizer = PromptFeaturizer(config, whitespace_tokenizer()).fit(prompts, seed=5, lengths=lengths)
    block = _block(featurizer, featurizer.training_matrix(prompts))
    fold = training_folds(len(prompts), 4, seed=5)
    partner = np.arange(len(prompts)) ^ 1
    own_log = np.log1p(lengths)
    for row in range(len(prompts)):
        # the row's own length (distinct from every other length) is never among its neighbours
        stats = block[row]
        assert stats[COLUMN["max_log_length"]] != own_log[row] and stats[COLUMN["min_log_length"]] != own_log[row]
        # its duplicate is the top neighbour exactly when it lies in another fold
        if fold[partner[row]] != fold[row]:
            assert stats[COLUMN["top_similarity"]] == pytest.approx(1.0)
            assert stats[COLUMN["top_log_length"]] == pytest.approx(own_log[partner[row]])
        else:
            assert stats[COLUMN["top_similarity"]] < 1.0


def test_statistics_agree_with_a_brute_force_search(train_data):
    rng = np.random.default_rng(3)
    rows = sp.random(120, 30, density=0.2, random_state=4, format="csr")
    rows = sp.csr_matrix(sp.diags(1 / np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel() + 1e-12)) @ rows)
    lengths = rng.integers(1, 900, size=120)
    index = NeighbourIndex.fit(rows, lengths, count=5)
    queries = sp.random(7, 30, density=0.3, random_state=5, format="csr")
    stats = index.statistics(queries)
    similarity = (queries @ rows.T).toarray()
    for q in range(7):
        order = np.lexsort((np.arange(120), -similarity[q]))[:5]
        logs, sims = np.log1p(lengths[order]), similarity[q, order]
        if sims[0] <= 0:
            assert stats[q, COLUMN["near_count"]] == 0 and np.isnan(stats[q, COLUMN["top_log_length"]])
            continue
        assert stats[q, COLUMN["top_similarity"]] == pytest.approx(sims[0])
        assert stats[q, COLUMN["weighted_log_length"]] == pytest.approx(np.sum(sims * logs) / np.sum(sims))
        assert stats[q, COLUMN["median_log_length"]] == pytest.approx(np.median(logs))


def test_model_is_deterministic_and_save_load_gives_identical_predictions(
        tmp_path, train_data, test_data, neighbour_model):
    again = train_predictor(train_data, NEIGHBOURS, tokenizer=whitespace_tokenizer())
    assert again.booster.model_to_string() == neighbour_model.booster.model_to_string()
    expected = neighbour_model.predict(test_data.prompts)
    assert np.array_equal(again.predict(test_data.prompts), expected)
    directory = neighbour_model.save(tmp_path / "model")
    assert "neighbours.npz" in json.loads((directory / "metadata.json").read_text())["files"]
    with np.load(directory / "neighbours.npz", allow_pickle=False) as arrays:
        assert arrays["log_lengths"].shape == (len(train_data),)
    loaded = LengthPredictor.load(directory, tokenizer=whitespace_tokenizer())
    assert np.array_equal(loaded.predict(test_data.prompts), expected)
    assert loaded.featurizer.feature_names()[-len(NEIGHBOUR_FEATURES):] == [f"neighbour_{n}" for n in NEIGHBOUR_FEATURES]


def test_missing_neighbour_index_is_a_clear_error(tmp_path, neighbour_model):
    directory = neighbour_model.save(tmp_path / "model")
    (directory / "neighbours.npz").unlink()
    with pytest.raises(PredictorError, match="neighbours.npz is missing"):
        LengthPredictor.load(directory, tokenizer=whitespace_tokenizer())


def test_bad_settings_are_refused(train_data, neighbour_model):
    with pytest.raises(PredictorError, match="neighbour_count"):
        FeatureConfig(neighbour_count=4, ngram_vocabulary_size=0)
    with pytest.raises(PredictorError, match="neighbour_folds"):
        FeatureConfig(neighbour_count=4, neighbour_folds=1)
    with pytest.raises(PredictorError, match="neighbour_count must be in"):
        train_predictor(train_data.subset(np.arange(12)), replace(NEIGHBOURS, features=replace(
            NEIGHBOURS.features, neighbour_count=12, ngram_min_df=1)), tokenizer=whitespace_tokenizer())
    with pytest.raises(PredictorError, match="neighbour-length block"):
        train_refined_predictor(neighbour_model, train_data.prompts, train_data.prompts,
                                train_data.labels("reference"))


def test_old_configs_without_the_knobs_still_load():
    values = json.loads(json.dumps(__import__("dataclasses").asdict(PredictorConfig())))
    for key in ("neighbour_count", "neighbour_folds"):
        del values["features"][key]
    assert PredictorConfig.from_dict(values) == PredictorConfig()

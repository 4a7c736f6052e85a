"""FastPredictor: the request path's one-call LightGBM predictions are Booster.predict's numbers."""

from __future__ import annotations

import gc
import weakref

import lightgbm as lgb
import numpy as np
import pytest

from model.fastpredict import SINGLE_ROW_LIMIT, FastPredictor, fast_predictor


def _booster(*, categorical: bool = True, rounds: int = 30, objective: str = "binary") -> lgb.Booster:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 6))
    x[:, 5] = rng.integers(0, 8, size=600)  # a categorical column
    x[rng.random(size=x.shape) < 0.05] = np.nan  # missing values take LightGBM's default branch
    y = ((np.nan_to_num(x[:, 0]) + (x[:, 5] == 3) + rng.normal(scale=0.5, size=600)) > 0.5).astype(int)
    params = {"objective": objective, "num_leaves": 15, "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    if objective == "multiclass":
        params["num_class"] = 3
        y = rng.integers(0, 3, size=600)
    dataset = lgb.Dataset(x, y, categorical_feature=[5] if categorical else "auto")
    return lgb.train(params, dataset, num_boost_round=rounds)


def _rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[:, 5] = rng.integers(-1, 10, size=n)  # includes categories never seen in training
    x[rng.random(size=x.shape) < 0.1] = np.nan
    return x


@pytest.mark.parametrize("rows", [1, 2, SINGLE_ROW_LIMIT, SINGLE_ROW_LIMIT + 1, 44, 500])
def test_predictions_and_leaves_equal_booster_predict(rows: int) -> None:
    booster = _booster()
    x = _rows(rows)
    predictor = FastPredictor(booster)
    np.testing.assert_array_equal(predictor.predict(x), booster.predict(x, num_threads=1))
    leaves = booster.predict(x, pred_leaf=True, num_threads=1).reshape(rows, -1)
    np.testing.assert_array_equal(predictor.leaves(x), leaves)


def test_an_early_stopped_booster_predicts_with_its_best_iteration_as_booster_predict_does() -> None:
    booster = _booster(rounds=40)
    booster.best_iteration = 12
    x = _rows(20)
    predictor = FastPredictor(booster)
    for rows in (x, x[:SINGLE_ROW_LIMIT]):  # a batch call, and one call per row
        np.testing.assert_array_equal(predictor.predict(rows), booster.predict(rows, num_threads=1))
        assert predictor.leaves(rows).shape == (len(rows), 12)


def test_a_float64_or_strided_matrix_is_accepted_and_an_empty_one_gives_nothing() -> None:
    booster = _booster()
    x = _rows(30)
    predictor = FastPredictor(booster)
    np.testing.assert_array_equal(predictor.predict(x[::2].astype(np.float64)), booster.predict(x[::2], num_threads=1))
    assert predictor.predict(x[:0]).shape == (0,)


def test_a_matrix_of_the_wrong_width_is_refused_naming_both_widths() -> None:
    predictor = FastPredictor(_booster())
    with pytest.raises(ValueError, match=r"expected a matrix with 6 columns, got shape \(3, 5\)"):
        predictor.predict(np.zeros((3, 5), dtype=np.float32))


def test_multiclass_boosters_are_refused() -> None:
    with pytest.raises(ValueError, match="single-output boosters, this one has 3 outputs"):
        FastPredictor(_booster(objective="multiclass", rounds=3))


def test_one_predictor_per_booster() -> None:
    booster = _booster(rounds=3)
    assert fast_predictor(booster) is fast_predictor(booster)
    assert fast_predictor(booster) is not fast_predictor(_booster(rounds=3))


def test_a_booster_whose_predictor_is_kept_on_it_is_freed_without_the_cyclic_collector() -> None:
    # The scorer freezes what it holds after start-up (gc.freeze): a model swapped out later is freed only if
    # nothing of it sits in a reference cycle, which the kept predictor pointing back at its booster would make.
    booster = _booster(rounds=5)
    fast_predictor(booster).predict(_rows(SINGLE_ROW_LIMIT))  # a fast config too
    fast_predictor(booster).predict(_rows(20))
    gone = weakref.ref(booster)
    gc.collect()
    gc.freeze()
    try:
        del booster
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_predictor_of_its_own_keeps_its_booster_alive() -> None:
    predictor = FastPredictor(_booster(rounds=5))  # nothing else holds the booster
    gc.collect()
    assert predictor.predict(_rows(3)).shape == (3,)

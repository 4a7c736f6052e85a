"""The estimator variants `python -m pipelines.ope_bias` measures against the simulator's truth."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from pipelines.ope_bias import estimator_terms
from pipelines.ope_check import VersionPairCheck, add_simulated_history_arguments, add_version_pair_arguments


def test_the_clipped_and_self_normalised_variants_are_plain_dr_when_every_weight_is_one() -> None:
    rng = np.random.default_rng(0)
    r, q, v = rng.uniform(0, 10, 500), rng.uniform(0, 10, 500), rng.uniform(0, 10, 500)
    on_policy = estimator_terms({"r": r, "w": np.ones(500), "q": q, "v": v})
    assert on_policy["direct method"].mean() == pytest.approx(v.mean())
    # (Switch-DR and DRos choose their shrinkage by estimated bias and variance, so they may shrink even these.)
    for name in ("DR clip 5", "DR clip 10", "DR clip 20", "DR clip 50", "DR unclipped", "self-normalised DR"):
        assert on_policy[name].mean() == pytest.approx((v + r - q).mean()), name
    # Weights of 40: clipped at 10 a quarter of the correction is left, at 50 all of it; self-normalised, the weight
    # scale cancels out.
    w = np.where(np.arange(500) % 2 == 0, 40.0, 0.0)
    rare = estimator_terms({"r": r, "w": w, "q": q, "v": v})
    correction = (w * (r - q)).mean()
    assert rare["DR clip 10"].mean() == pytest.approx(v.mean() + correction / 4)
    assert rare["DR clip 50"].mean() == pytest.approx(v.mean() + correction)
    assert rare["self-normalised DR"].mean() == pytest.approx(v.mean() + correction / w.mean())


def test_the_version_pair_options_name_one_check_with_the_check_s_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_simulated_history_arguments(parser)
    add_version_pair_arguments(parser)
    words = ["--history", "h", "--orders", "500", "--seed", "3", "--tracking-uri", "sqlite:///m.db", "--versions", "1"]
    args = parser.parse_args([*words, "2"])
    assert VersionPairCheck.from_arguments(args) == VersionPairCheck(Path("h"), 500, 3, "sqlite:///m.db", ("1", "2"))
    args = parser.parse_args([*words, "2", "--max-points", "150", "--draws", "2"])
    assert VersionPairCheck.from_arguments(args) == VersionPairCheck(
        Path("h"), 500, 3, "sqlite:///m.db", ("1", "2"), max_points=150, draws=2
    )

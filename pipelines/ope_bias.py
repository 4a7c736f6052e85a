"""How far DR and its variants are from the simulator's truth, under each model's own reward model and the other's.

    python -m pipelines.ope_bias --history H --orders N --seed S --tracking-uri URI --versions A B

On the holdout ``winback evaluate`` replays (the latest 20% of the decision points by time; ``--max-points`` above
its size takes all of it), both versions are replayed with both reward models, and each one's true one-step value
of the very actions replayed is computed (``model.simulation.truth``). Prints, in USD a decision:

- per version and reward model (``own`` / ``other``): error = estimate - truth and standard error of the direct
  method, DR at several weight clips, self-normalised DR, switch-DR and DR with optimised shrinkage (Su et al. 2020),
  the last two tuned on the holdout by their estimated bias squared plus variance;
- per (challenger, champion) order and weight clip: the error of the challenger-minus-champion difference under
  the challenger's reward model, the champion's, and each model under the other's (the gate's, ``pipelines.gate``),
  over the whole holdout and over ``--subsamples`` random holdouts of ``--subsample-points`` points, with how often
  the gate's policy-value check would promote: the two own views both to hold (the rule before), or the other's.

The history must come from ``winback simulate --orders N --seed S`` (the world is rebuilt from those).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model import evaluation as ev
from pipelines.ope_check import (
    VersionPairCheck,
    add_simulated_history_arguments,
    add_version_pair_arguments,
    judged_holdout,
    policy_value_promotes,
)

CLIPS: tuple[float | None, ...] = (5.0, 10.0, 20.0, 50.0, None)


class _Recorded:
    """A policy that records its decisions in order (``replay`` calls it once per point)."""

    def __init__(self, policy: Callable[[Any], Any]) -> None:
        self.policy = policy
        self.decisions: list[Any] = []

    def __call__(self, request: Any) -> Any:
        decision = self.policy(request)
        self.decisions.append(decision)
        return decision


class _Replaying:
    """The recorded decisions again, in order: the truth of the very actions the OPE replayed."""

    def __init__(self, decisions: list[Any]) -> None:
        self.decisions = iter(decisions)

    def __call__(self, request: Any) -> Any:
        return next(self.decisions)


def _parts(logged: pd.DataFrame, replayed: pd.DataFrame, name: str, estimator: str) -> dict[str, np.ndarray]:
    q_column, v_column = ev.reward_model_columns(replayed)[estimator]
    part = replayed[replayed["policy"] == name].sort_values("point")
    return {
        "r": logged["reward"].to_numpy(dtype=np.float64),
        "w": ev.importance_weights(logged["propensity"], part["target_prob"], None),
        "q": part[q_column].to_numpy(dtype=np.float64),
        "v": part[v_column].to_numpy(dtype=np.float64),
    }


def _tuned(v: np.ndarray, residual_weights: Callable[[float], np.ndarray], w: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """DR's terms with the shrunk weights ``residual_weights(k)`` whose k minimises estimated bias^2 + variance."""
    best: tuple[float, np.ndarray] | None = None
    for k in [10.0**e for e in np.arange(-1.0, 6.01, 0.25)] + [np.inf]:
        shrunk = residual_weights(k)
        terms = v + shrunk * rr
        mse = float(np.mean((w - shrunk) * rr) ** 2 + terms.var(ddof=1) / terms.size)
        if best is None or mse < best[0]:
            best = (mse, terms)
    assert best is not None
    return best[1]


def estimator_terms(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-point terms of each estimator (its value is their mean; self-normalised DR: its influence terms)."""
    r, w, q, v = parts["r"], parts["w"], parts["q"], parts["v"]
    rr = r - q
    out = {"direct method": v}
    for clip in CLIPS:
        out[f"DR clip {clip:g}" if clip else "DR unclipped"] = v + (w if clip is None else np.minimum(w, clip)) * rr
    scale = w.mean()
    correction = float((w * rr).mean() / scale) if scale > 0 else 0.0
    out["self-normalised DR"] = v + correction + (w * rr - correction * w) / (scale if scale > 0 else 1.0)
    out["switch-DR"] = _tuned(v, lambda tau: np.where(w <= tau, w, 0.0), w, rr)
    out["DRos"] = _tuned(v, lambda lam: w if np.isinf(lam) else lam * w / (w**2 + lam), w, rr)
    return out


def ope_bias(
    check: VersionPairCheck, *, subsamples: int = 300, subsample_points: int = 2_300
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables of the module docstring: per (version, view, estimator), and per (pairing, clip, view)."""
    from model.simulation.truth import true_point_values
    from pipelines.evaluate import served_reward_model
    from pipelines.train import comparison_policies, merchants_for

    history, logged, economics, models, catalog = judged_holdout(check)
    versions, eval_seed = check.versions, check.eval_seed
    first, second = versions
    policies, _ = comparison_policies(merchants_for(history.attempts), models, seed=eval_seed, catalog=catalog)
    recorded = {version: _Recorded(policies[version]) for version in versions}
    replayed = ev.replay(
        logged,
        dict(recorded),
        served_reward_model(models[first], economics, catalog),
        other_reward_models={second: served_reward_model(models[second], economics, catalog)},
    )
    world = check.world()
    truth = {
        version: true_point_values(
            world,
            logged,
            {version: _Replaying(recorded[version].decisions)},
            economics,
            history_seed=check.seed,
            draws=check.draws,
        )
        .sort_values("point")["true_value"]
        .to_numpy()
        for version in versions
    }
    estimator_of = {first: "dr", second: f"dr@{second}"}
    terms = {
        (version, rm): estimator_terms(_parts(logged, replayed, version, estimator_of[rm]))
        for version in versions
        for rm in versions
    }
    rows = []
    for (version, rm), by_estimator in terms.items():
        for estimator, values in by_estimator.items():
            rows.append(
                {
                    "version": version,
                    "view": "own" if rm == version else "other",
                    "estimator": estimator,
                    "truth": float(truth[version].mean()),
                    "error": float(values.mean() - truth[version].mean()),
                    "se": float(values.std(ddof=1) / np.sqrt(values.size)),
                    "points": int(values.size),
                }
            )
    rng = np.random.default_rng(eval_seed)
    samples = [rng.choice(len(logged), min(subsample_points, len(logged)), replace=False) for _ in range(subsamples)]
    pairs = []
    for challenger, champion in (versions, versions[::-1]):
        true_difference = truth[challenger] - truth[champion]
        for clip in CLIPS[:-1]:
            name = f"DR clip {clip:g}"
            views = {
                "challenger's reward model": (terms[challenger, challenger][name], terms[champion, challenger][name]),
                "champion's reward model": (terms[challenger, champion][name], terms[champion, champion][name]),
                "each under the other's": (terms[challenger, champion][name], terms[champion, challenger][name]),
            }
            promoted = {
                "both own views": [
                    policy_value_promotes(*(t[i] for t in views["challenger's reward model"]))
                    and policy_value_promotes(*(t[i] for t in views["champion's reward model"]))
                    for i in samples
                ],
                "each under the other's": [
                    policy_value_promotes(*(t[i] for t in views["each under the other's"])) for i in samples
                ],
            }
            for view, (a, b) in views.items():
                errors = np.array([(a[i] - b[i]).mean() - true_difference[i].mean() for i in samples])
                pairs.append(
                    {
                        "challenger": challenger,
                        "champion": champion,
                        "clip": clip,
                        "view": view,
                        "true_difference": float(true_difference.mean()),
                        "error": float((a - b).mean() - true_difference.mean()),
                        "paired_se": ev.paired_standard_error(a, b),
                        "subsample_mean_error": float(errors.mean()) if errors.size else float("nan"),
                        "subsample_rmse": float(np.sqrt(np.mean(errors**2))) if errors.size else float("nan"),
                        "promoted_share": float(np.mean(promoted[view])) if view in promoted else float("nan"),
                    }
                )
            pairs.append(
                {
                    "challenger": challenger,
                    "champion": champion,
                    "clip": clip,
                    "view": "both own views",
                    "true_difference": float(true_difference.mean()),
                    "promoted_share": float(np.mean(promoted["both own views"])),
                }
            )
    return pd.DataFrame(rows), pd.DataFrame(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_simulated_history_arguments(parser)
    add_version_pair_arguments(parser)
    parser.add_argument("--subsamples", type=int, default=300)
    parser.add_argument("--subsample-points", type=int, default=2_300)
    parser.add_argument("--out", type=Path, default=Path("ope_bias"))
    args = parser.parse_args()
    estimates, pairs = ope_bias(
        VersionPairCheck.from_arguments(args), subsamples=args.subsamples, subsample_points=args.subsample_points
    )
    args.out.mkdir(parents=True, exist_ok=True)
    estimates.to_csv(args.out / "estimators.csv", index=False)
    pairs.to_csv(args.out / "gate.csv", index=False)
    cells = estimates.assign(cell=estimates["error"].map("{:+.2f}".format) + estimates["se"].map(" ({:.2f})".format))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 200):
        print(cells.pivot_table(index="estimator", columns=["version", "view"], values="cell", aggfunc="first"))
        print(pairs.round(3).to_string(index=False))


if __name__ == "__main__":
    main()

"""How the promotion gate's policy-value check judges two registered models, against the simulator's truth.

    python -m pipelines.gate_check --history H --orders N --seed S --tracking-uri URI --versions A B

On the holdout ``winback evaluate`` replays (the latest 20% of the decision points by time, a seeded sample of at
most ``--max-points``), each version is the challenger once and the champion once. For each pairing it prints the
two policies' DR values under each one's reward model, the paired standard errors, the true one-step values
(``model.simulation.truth``) and the verdict of the gate's policy-value checks (``pipelines.gate``), beside the
verdict the same check under the challenger's reward model alone would give (same noise allowance). The history
must come from ``winback simulate --orders N --seed S`` (the world is rebuilt from those).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from model import evaluation as ev


def gate_check(
    history_dir: Path,
    orders: int,
    seed: int,
    tracking_uri: str,
    versions: tuple[str, str],
    *,
    max_points: int = 2_500,
    draws: int = 16,
    eval_seed: int = 0,
) -> pd.DataFrame:
    """One row per (challenger, champion) pairing of ``versions``, as the module docstring says."""
    from model.money import load_economics
    from model.registry import load_version
    from model.simulation.truth import true_point_values
    from model.simulation.world import World
    from pipelines.gate import GATE_METRICS, compare
    from pipelines.ope_check import simulated_holdout
    from pipelines.train import CHALLENGER_NAME, CHAMPION_NAME, DR_GATE_ESTIMATORS, comparison_policies, merchants_for

    history, holdout = simulated_holdout(history_dir, max_points, eval_seed)
    economics = load_economics()
    logged = holdout[holdout["propensity"].notna()].reset_index(drop=True)
    models = {version: load_version(version, tracking_uri=tracking_uri) for version in versions}
    merchants = merchants_for(history.attempts)
    policy_value_checks = tuple(metric for metric in GATE_METRICS if metric.name.startswith("policy_value"))
    world = World(seed, expected_orders=orders)
    truth: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for challenger, champion in (versions, versions[::-1]):
        bundles = {CHALLENGER_NAME: models[challenger], CHAMPION_NAME: models[champion]}
        policies, _ = comparison_policies(merchants, bundles, seed=eval_seed)
        chosen = {name: policies[name] for name in bundles}
        replayed = ev.replay(
            logged,
            chosen,
            ev.value_reward_model(bundles[CHALLENGER_NAME], economics),
            other_reward_models={CHAMPION_NAME: ev.value_reward_model(bundles[CHAMPION_NAME], economics)},
        )
        ope = ev.ope_from_replay(logged, replayed, seed=eval_seed).set_index(["policy", "estimator"])["value"]
        noise = ev.paired_dr_noise(logged, replayed, CHALLENGER_NAME, CHAMPION_NAME)
        values = {
            name: {metric: float(ope[(name, estimator)]) for metric, estimator in DR_GATE_ESTIMATORS}
            for name in bundles
        }
        gate_noise = {metric: noise[estimator] for metric, estimator in DR_GATE_ESTIMATORS}
        verdict = compare(
            values[CHALLENGER_NAME],
            values[CHAMPION_NAME],
            challenger_version=challenger,
            champion_version=champion,
            metrics=policy_value_checks,
            noise=gate_noise,
        )
        challenger_view_only = compare(
            values[CHALLENGER_NAME],
            values[CHAMPION_NAME],
            challenger_version=challenger,
            champion_version=champion,
            metrics=policy_value_checks[:1],
            noise=gate_noise,
        )
        if not truth:
            true_values = true_point_values(world, logged, chosen, economics, history_seed=seed, draws=draws)
            by_policy = true_values.groupby("policy")["true_value"].mean()
            truth = {challenger: float(by_policy[CHALLENGER_NAME]), champion: float(by_policy[CHAMPION_NAME])}
        row: dict[str, Any] = {"challenger": challenger, "champion": champion, "points": len(logged)}
        for name, version in ((CHALLENGER_NAME, challenger), (CHAMPION_NAME, champion)):
            row[f"{name}_truth"] = truth[version]
            for metric, estimator in DR_GATE_ESTIMATORS:
                row[f"{name}_{estimator}"] = values[name][metric]
        for metric, estimator in DR_GATE_ESTIMATORS:
            row[f"noise_{estimator}"] = gate_noise[metric]
        row["promoted"] = verdict.promote
        row["promoted_by_challenger_view_only"] = challenger_view_only.promote
        row["verdict"] = verdict.verdict
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    from pipelines.ope_check import add_simulated_history_arguments

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_simulated_history_arguments(parser)
    parser.add_argument("--versions", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--max-points", type=int, default=2_500)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("gate_check.csv"))
    args = parser.parse_args()
    table = gate_check(
        args.history,
        args.orders,
        args.seed,
        args.tracking_uri,
        (args.versions[0], args.versions[1]),
        max_points=args.max_points,
        draws=args.draws,
    )
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 400):
        print(table.drop(columns="verdict").round(3).to_string(index=False))
        for verdict in table["verdict"]:
            print(verdict)


if __name__ == "__main__":
    main()

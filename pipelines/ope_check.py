"""How far the off-policy estimates are from the truth on a simulated history, with and without its logged stops.

    python -m pipelines.ope_check --history H --orders N --seed S --tracking-uri URI [--alias challenger]

On the holdout ``winback evaluate`` replays (the latest 20% of the decision points by time, a seeded sample of at
most ``--max-points``), for the rules-only policy, the registered model and the simulator's logging policy:

- ``without_stops``: IPS/SNIPS/DR as computed without the stops file (the points where the logging policy stopped
  have no propensity and are left out);
- ``with_stops``: the same estimators with the stops file (those points are in, with their propensity and reward 0);
- ``truth``: the mean true one-step value over the holdout's logged decisions (``model.simulation.truth``), and
  over the subset the ``without_stops`` estimates were computed on.

Prints one table and writes it to ``--out`` as CSV. The history must come from ``winback simulate --orders N
--seed S`` (the world is rebuilt from those).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from model import evaluation as ev

if TYPE_CHECKING:
    from model.catalog import ErrorCatalog
    from model.simulation.world import World


def simulated_holdout(
    history_dir: Path, max_points: int, eval_seed: int, catalog: ErrorCatalog | None = None
) -> tuple[Any, pd.DataFrame]:
    """The history in ``history_dir`` (with its stops file) and the holdout ``winback evaluate`` replays: the latest
    20% of its decision points by time, a sample of at most ``max_points`` drawn with ``eval_seed``, read with
    ``catalog`` (default: the shipped one; a registered version's is the one it was trained with)."""
    from model.catalog import load_catalog
    from model.history import read_history
    from model.money import load_economics

    history = read_history(
        history_dir / "attempts.parquet", history_dir / "nudges.parquet", stops_path=history_dir / "stops.parquet"
    )
    points = ev.logged_decisions(
        history.attempts,
        history.nudges,
        load_economics(),
        catalog=load_catalog() if catalog is None else catalog,
        stops=history.stops,
    )
    _, holdout = ev.time_holdout(points, "event_time", 0.2)
    if len(holdout) > max_points:
        holdout = holdout.sample(n=max_points, random_state=eval_seed).sort_values("event_time", kind="stable")
    return history, holdout.reset_index(drop=True)


@dataclass(frozen=True)
class VersionPairCheck:
    """What a tool comparing two registered versions on a simulated history's holdout is run on: the history
    ``winback simulate --orders N --seed S`` wrote (the world is rebuilt from those), the tracking store holding the
    versions, the holdout's size (``max_points``), the truth's draws per point and the evaluation's seed."""

    history_dir: Path
    orders: int
    seed: int
    tracking_uri: str
    versions: tuple[str, str]
    max_points: int = 2_500
    draws: int = 16
    eval_seed: int = 0

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> VersionPairCheck:
        """The check the options of `add_simulated_history_arguments` and `add_version_pair_arguments` name."""
        return cls(
            args.history,
            args.orders,
            args.seed,
            args.tracking_uri,
            (args.versions[0], args.versions[1]),
            max_points=args.max_points,
            draws=args.draws,
        )

    def world(self) -> World:
        """The simulated world the history came from."""
        from model.simulation.world import World

        return World(self.seed, expected_orders=self.orders)


def judged_holdout(check: VersionPairCheck) -> tuple[Any, pd.DataFrame, Any, dict[str, Any], ErrorCatalog]:
    """For comparing the registered versions of ``check``: the history, the holdout points with a logged propensity
    (`simulated_holdout`: the points the OPE uses), the economics, each version's model and the error catalog both
    were trained with (the holdout is read with it, and the rules must read it too)."""
    from model.money import load_economics
    from model.registry import load_trained_version, offline_catalog

    loaded = [load_trained_version(version, tracking_uri=check.tracking_uri) for version in check.versions]
    catalogs = {one.catalog.version for one in loaded}
    if len(catalogs) > 1:
        raise SystemExit(
            f"versions {' and '.join(check.versions)} were trained with different error catalogs "
            f"({', '.join(sorted(catalogs))}): their holdout cannot be read with the catalog of both"
        )
    catalog, lines = offline_catalog(loaded[0])
    for line in [*lines, *(offline_catalog(one)[1][0] for one in loaded[1:])]:
        print(line)
    history, holdout = simulated_holdout(check.history_dir, check.max_points, check.eval_seed, catalog)
    logged = holdout[holdout["propensity"].notna()].reset_index(drop=True)
    return history, logged, load_economics(), {one.version: one.bundle for one in loaded}, catalog


def ope_check(
    history_dir: Path,
    orders: int,
    seed: int,
    tracking_uri: str,
    *,
    alias: str = "challenger",
    max_points: int = 5_000,
    draws: int = 32,
    eval_seed: int = 0,
) -> pd.DataFrame:
    """The table described in the module docstring (one row per policy and estimator)."""
    from model.money import load_economics
    from model.registry import load_trained_alias, offline_catalog
    from model.simulation.truth import true_point_values
    from model.simulation.world import World
    from pipelines.evaluate import served_reward_model
    from pipelines.train import comparison_policies, merchants_for

    loaded = load_trained_alias(alias, tracking_uri=tracking_uri)
    if loaded is None:
        raise SystemExit(f"no winback@{alias} in {tracking_uri}")
    catalog, lines = offline_catalog(loaded)
    for line in lines:
        print(line)
    history, holdout = simulated_holdout(history_dir, max_points, eval_seed, catalog)
    economics = load_economics()
    model_name = f"winback@{alias}"
    policies, _ = comparison_policies(
        merchants_for(history.attempts), {model_name: loaded.bundle}, seed=eval_seed, catalog=catalog
    )
    chosen = {name: policies[name] for name in (model_name, "rules-only", "logging")}
    reward_model = served_reward_model(loaded.bundle, economics, catalog)

    after = holdout[holdout["propensity"].notna()].reset_index(drop=True)
    before = after[~after["logged_stop"]].reset_index(drop=True)
    replayed = ev.replay(after, chosen, reward_model)
    keep = np.flatnonzero(~after["logged_stop"].to_numpy())
    renumber = {int(old): new for new, old in enumerate(keep)}
    replayed_before = replayed[replayed["point"].isin(renumber)].assign(point=lambda f: f["point"].map(renumber))
    estimates = {
        "without_stops": ev.ope_from_replay(before, replayed_before, seed=eval_seed),
        "with_stops": ev.ope_from_replay(after, replayed, seed=eval_seed),
    }
    # The same without clipping the weights (evaluate clips at 50): unbiased with every logged action in, so what
    # leaving the stops out does shows apart from what clipping does.
    for when, logged, replay_rows in (("without_stops", before, replayed_before), ("with_stops", after, replayed)):
        unclipped = ev.ope_from_replay(logged, replay_rows, seed=eval_seed, max_weight=None)
        unclipped = unclipped[unclipped["estimator"] != "on_policy"]
        unclipped = unclipped.assign(estimator=unclipped["estimator"] + "_unclipped")
        estimates[when] = pd.concat([estimates[when], unclipped], ignore_index=True)

    world = World(seed, expected_orders=orders)
    truth = true_point_values(world, after, chosen, economics, history_seed=seed, draws=draws)
    truth["logged_stop"] = after["logged_stop"].to_numpy()[truth["point"].to_numpy()]
    rows: list[dict[str, object]] = []
    for name in chosen:
        mine = truth[truth["policy"] == name]
        true_all = float(mine["true_value"].mean())
        true_subset = float(mine.loc[~mine["logged_stop"], "true_value"].mean())
        kinds = ("ips", "snips", "dr", "ips_unclipped", "snips_unclipped", "dr_unclipped")
        for estimator in ("on_policy", *kinds) if name == "logging" else kinds:
            row: dict[str, object] = {"policy": name, "estimator": estimator, "truth": true_all}
            for when, table in estimates.items():
                who = "logged" if estimator == "on_policy" else name
                found = table[(table["policy"] == who) & (table["estimator"] == estimator)]
                value = float(found["value"].iloc[0])
                row[f"{when}_value"] = value
                row[f"{when}_ci_low"] = float(found["ci_low"].iloc[0])
                row[f"{when}_ci_high"] = float(found["ci_high"].iloc[0])
                row[f"{when}_error"] = value - true_all
                row[f"{when}_points"] = int(found["n"].iloc[0])
            row["truth_without_stop_points"] = true_subset
            row["holdout_points"] = len(holdout)
            row["logged_stops"] = int(after["logged_stop"].sum())
            row["left_out_after"] = len(holdout) - len(after)
            rows.append(row)
    return pd.DataFrame(rows)


def policy_value_promotes(challenger: np.ndarray, champion: np.ndarray) -> bool:
    """The gate's policy-value check (`pipelines.gate`) on two policies' per-point DR terms over the same points:
    whether the challenger's mean holds against the champion's, the paired standard error as its noise."""
    from pipelines.gate import GATE_METRICS, compare

    (metric,) = (m for m in GATE_METRICS if m.name == "policy_value_dr")
    result = compare(
        {metric.name: float(challenger.mean())},
        {metric.name: float(champion.mean())},
        challenger_version="challenger",
        champion_version="champion",
        metrics=(metric,),
        noise={metric.name: ev.paired_standard_error(challenger, champion)},
    )
    return result.promote


def add_simulated_history_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming a simulated history (and the world it came from) and the tracking store."""
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tracking-uri", required=True)


def add_version_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a tool comparing two registered versions on a simulated history's holdout."""
    parser.add_argument("--versions", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--max-points", type=int, default=VersionPairCheck.max_points)
    parser.add_argument("--draws", type=int, default=VersionPairCheck.draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_simulated_history_arguments(parser)
    parser.add_argument("--alias", default="challenger")
    parser.add_argument("--max-points", type=int, default=5_000)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("ope_check.csv"))
    args = parser.parse_args()
    table = ope_check(
        args.history,
        args.orders,
        args.seed,
        args.tracking_uri,
        alias=args.alias,
        max_points=args.max_points,
        draws=args.draws,
    )
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()

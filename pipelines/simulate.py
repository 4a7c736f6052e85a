"""`winback simulate`: write a synthetic history (attempts.parquet, nudges.parquet) from the simulated world.

``orders`` counts failed orders: every simulated order starts with a failed initial attempt (winback only sees
failures); the logging policy (the static retry-then-retarget rule with epsilon exploration) then plays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.history import write_attempts, write_nudges
from model.simulation import DEFAULT_EPSILON, generate_history

#: Below this many orders a second process costs more than it saves.
_PARALLEL_FROM = 20_000


@dataclass(frozen=True)
class SimulationSummary:
    """What a simulation run wrote, and how the logging policy did."""

    orders: int
    attempts: int
    nudges: int
    recovered_orders: int
    recovery_rate: float
    recovered_gmv_usd: float
    seed: int
    epsilon: float
    seconds: float
    orders_per_second: float
    attempts_path: Path
    nudges_path: Path


def simulate(
    out_dir: Path,
    orders: int,
    seed: int,
    progress: bool = True,
    *,
    epsilon: float = DEFAULT_EPSILON,
    workers: int | None = None,
) -> SimulationSummary:
    """Simulate ``orders`` failed orders with ``seed`` and write DIR/attempts.parquet and DIR/nudges.parquet.

    The files pass ``model.history.read_history``; the same (orders, seed, epsilon) always writes the same
    files. ``workers`` defaults to 2 processes from 20,000 orders on (the output does not depend on it).
    """
    if orders < 1:
        raise ValueError(f"--orders must be at least 1, got {orders}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if orders >= _PARALLEL_FROM else 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("simulating orders"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("simulate", total=orders)
            history = generate_history(
                orders,
                seed,
                epsilon=epsilon,
                workers=workers,
                on_progress=lambda done: bar.update(task, completed=done),
            )
    else:
        history = generate_history(orders, seed, epsilon=epsilon, workers=workers)
    attempts_path = out_dir / "attempts.parquet"
    nudges_path = out_dir / "nudges.parquet"
    write_attempts(history.attempts, attempts_path)
    write_nudges(history.nudges, nudges_path)
    totals = history.totals
    return SimulationSummary(
        orders=totals.orders,
        attempts=len(history.attempts),
        nudges=len(history.nudges),
        recovered_orders=totals.recovered_orders,
        recovery_rate=totals.recovery_rate,
        recovered_gmv_usd=totals.recovered_gmv_usd,
        seed=seed,
        epsilon=epsilon,
        seconds=history.seconds,
        orders_per_second=history.orders_per_second,
        attempts_path=attempts_path,
        nudges_path=nudges_path,
    )


def recovery_by_error_class(attempts: pd.DataFrame, nudges: pd.DataFrame | None = None) -> pd.DataFrame:
    """Failure mix and the logging policy's recovery by the normalised class of each order's first failure.

    Works on any contract history: one row per class with orders, share of first failures, recovered orders,
    recovery rate and mean time to recovery (hours).
    """
    from model.catalog import normalise_frame
    from model.history import reconstruct_orders

    orders = reconstruct_orders(attempts, nudges)
    orders = orders[~orders["initially_succeeded"]]
    firsts = attempts[attempts["attempt_number"] == 1].set_index("order_id")
    classes = normalise_frame(firsts.reset_index())["error_class"]
    classes.index = firsts.index
    frame = orders.assign(error_class=orders["order_id"].map(classes).fillna("unknown"))
    hours = frame["time_to_recovery"].dt.total_seconds() / 3600.0
    table = (
        frame.assign(hours=hours)
        .groupby("error_class")
        .agg(orders=("order_id", "size"), recovered=("recovered", "sum"), hours_to_recovery=("hours", "mean"))
        .sort_values("orders", ascending=False)
    )
    table.insert(1, "share", table["orders"] / table["orders"].sum())
    table["recovery_rate"] = table["recovered"] / table["orders"]
    total = pd.DataFrame(
        {
            "orders": [int(table["orders"].sum())],
            "share": [1.0],
            "recovered": [int(table["recovered"].sum())],
            "hours_to_recovery": [float(hours.mean())],
            "recovery_rate": [float(table["recovered"].sum() / max(table["orders"].sum(), 1))],
        },
        index=pd.Index(["all"], name="error_class"),
    )
    return pd.concat([table, total])

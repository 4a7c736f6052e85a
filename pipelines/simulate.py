"""`winback simulate`: write a synthetic history (attempts.parquet, nudges.parquet, stops.parquet) from the
simulated world.

``orders`` counts failed orders: every simulated order starts with a failed initial attempt (winback only sees
failures); the logging policy (the static retry-then-retarget rule with epsilon exploration) then plays it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from model.history import HistoryWriter, attempts_writer, move_into_place_together, nudges_writer, stops_writer
from model.simulation import DEFAULT_EPSILON, HistoryPart, iter_history_parts
from model.simulation.episodes import totals_of
from model.wording import count_noun

if TYPE_CHECKING:
    from rich.console import Console

#: Below this many orders a second process costs more than it saves.
_PARALLEL_FROM = 20_000
#: Simulated parts (5,000 orders each) per written row group.
_PARTS_PER_ROW_GROUP = 20
#: The files a simulation writes in its folder; stops are the logging policy's stop decisions.
FILE_NAMES = ("attempts.parquet", "nudges.parquet", "stops.parquet")


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
    failure_mix: pd.DataFrame  # recovery_by_error_class of what was written
    stops: int = 0
    stops_path: Path | None = None  # the logging policy's stop decisions (model.history.STOP_COLUMNS)


def _flush(
    parts: list[HistoryPart],
    attempts_out: HistoryWriter,
    nudges_out: HistoryWriter,
    mix: list[pd.DataFrame],
    stops_out: HistoryWriter,
) -> None:
    """Write buffered parts as one row group per file (row groups of ~100k orders read back fast)."""
    if parts:
        attempts = pd.concat([p.attempts for p in parts], ignore_index=True)
        nudges = pd.concat([p.nudges for p in parts], ignore_index=True)
        attempts_out.write(attempts)
        nudges_out.write(nudges)
        stops_out.write(pd.concat([p.stops for p in parts], ignore_index=True))
        mix.append(class_counts(attempts, nudges))
        parts.clear()


@contextmanager
def _bar(show: bool, total: int, seed: int, console: Console | None) -> Iterator[Callable[[int], None]]:
    """The simulation's progress: a bar over orders in a terminal, one plain line as it starts elsewhere (a log, a
    pipe), nothing when ``show`` is false; yields ``advance(orders_done_in_this_step)``."""
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from pipelines.progress import shown_steps

    columns = (TextColumn("simulating orders"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    shown = shown_steps(console or get_console(), show, "simulation", 1, columns, total=total, transient=False)
    with shown as steps:
        steps.start(f"{count_noun(total, 'failed order')}, seed {seed}")
        yield steps.done


def simulate(
    out_dir: Path,
    orders: int,
    seed: int,
    progress: bool = True,
    *,
    epsilon: float = DEFAULT_EPSILON,
    workers: int | None = None,
    console: Console | None = None,
) -> SimulationSummary:
    """Simulate ``orders`` failed orders with ``seed`` and write DIR/attempts.parquet, DIR/nudges.parquet and
    DIR/stops.parquet (the logging policy's stop decisions, which leave no attempt or nudge).

    The files pass ``model.history.read_history``; the same (orders, seed, epsilon) always writes the same
    files. They are moved into ``out_dir`` together once all are written: a run that fails leaves the files of an
    earlier run there as they were. ``workers`` defaults to 2 processes from 20,000 orders on (the output does not
    depend on it). ``progress`` is shown on ``console`` (default: a console on standard output).
    """
    if orders < 1:
        raise ValueError(f"--orders must be at least 1, got {orders}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if orders >= _PARALLEL_FROM else 1
    out_dir = Path(out_dir)
    made = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Written in a folder of their own inside --out, then moved in together: a failed run leaves the files of
        # an earlier one as they were (see move_into_place_together for what is still not atomic).
        with tempfile.TemporaryDirectory(prefix=".winback-simulate-", dir=out_dir) as staging:
            summary = _simulate_into(
                Path(staging), orders, seed, progress, epsilon=epsilon, workers=workers, console=console
            )
            move_into_place_together([(Path(staging) / name, out_dir / name) for name in FILE_NAMES])
    except BaseException:
        for folder in made:  # the folders this run made, when nothing else is in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    attempts_path, nudges_path, stops_path = (out_dir / name for name in FILE_NAMES)
    return replace(summary, attempts_path=attempts_path, nudges_path=nudges_path, stops_path=stops_path)


def _simulate_into(
    out_dir: Path, orders: int, seed: int, progress: bool, *, epsilon: float, workers: int, console: Console | None
) -> SimulationSummary:
    """``simulate``'s run, its three files written in ``out_dir``."""
    attempts_path, nudges_path, stops_path = (out_dir / name for name in FILE_NAMES)
    started = time.perf_counter()
    parts = iter_history_parts(orders, seed, epsilon=epsilon, workers=workers)
    per_order: list[pd.DataFrame] = []
    violations: Counter[str] = Counter()
    mix: list[pd.DataFrame] = []
    # Parts go to disk as they are played: memory holds a few parts, not the history (10M attempts and more).
    with (
        attempts_writer(attempts_path) as attempts_out,
        nudges_writer(nudges_path) as nudges_out,
        stops_writer(stops_path) as stops_out,
        _bar(progress, orders, seed, console) as advance,
    ):
        buffered: list[HistoryPart] = []
        for part in parts:
            buffered.append(part)
            per_order.append(part.per_order)
            violations.update(part.violations)
            advance(len(part.per_order))
            if len(buffered) == _PARTS_PER_ROW_GROUP:
                _flush(buffered, attempts_out, nudges_out, mix, stops_out)
        _flush(buffered, attempts_out, nudges_out, mix, stops_out)
    seconds = time.perf_counter() - started
    totals = totals_of(pd.concat(per_order, ignore_index=True), violations)
    return SimulationSummary(
        orders=totals.orders,
        attempts=attempts_out.rows,
        nudges=nudges_out.rows,
        recovered_orders=totals.recovered_orders,
        recovery_rate=totals.recovery_rate,
        recovered_gmv_usd=totals.recovered_gmv_usd,
        seed=seed,
        epsilon=epsilon,
        seconds=seconds,
        orders_per_second=orders / seconds if seconds > 0 else float("inf"),
        attempts_path=attempts_path,
        nudges_path=nudges_path,
        failure_mix=combine_class_counts(mix),
        stops=stops_out.rows,
        stops_path=stops_path,
    )


def class_counts(attempts: pd.DataFrame, nudges: pd.DataFrame | None) -> pd.DataFrame:
    """Per class of each order's first failure: orders, recovered orders, and the sum and count of recovery hours."""
    from model.catalog import normalise_frame
    from model.history import reconstruct_orders

    orders = reconstruct_orders(attempts, nudges)
    orders = orders[~orders["initially_succeeded"]]
    firsts = attempts[attempts["attempt_number"] == 1].set_index("order_id")
    classes = normalise_frame(firsts.reset_index())["error_class"]
    classes.index = firsts.index
    hours = orders["time_to_recovery"].dt.total_seconds() / 3600.0
    frame = pd.DataFrame(
        {
            "error_class": orders["order_id"].map(classes).fillna("unknown").to_numpy(),
            "recovered": orders["recovered"].to_numpy(dtype=np.int64),
            "hours_sum": hours.fillna(0.0).to_numpy(),
            "hours_n": hours.notna().to_numpy(dtype=np.int64),
        }
    )
    return frame.groupby("error_class").agg(
        orders=("recovered", "size"), recovered=("recovered", "sum"), hours_sum=("hours_sum", "sum"),
        hours_n=("hours_n", "sum"),
    )  # fmt: skip


def _class_table(counts: pd.DataFrame) -> pd.DataFrame:
    table = counts.sort_values("orders", ascending=False)
    total = table.sum()
    table.loc["all"] = total
    table.index.name = "error_class"
    out = pd.DataFrame(
        {
            "orders": table["orders"].astype(np.int64),
            "share": table["orders"] / max(int(total["orders"]), 1),
            "recovered": table["recovered"].astype(np.int64),
            "hours_to_recovery": table["hours_sum"] / table["hours_n"].where(table["hours_n"] > 0),
            "recovery_rate": table["recovered"] / table["orders"].clip(lower=1),
        }
    )
    return out


def recovery_by_error_class(attempts: pd.DataFrame, nudges: pd.DataFrame | None = None) -> pd.DataFrame:
    """Failure mix and the logging policy's recovery by the normalised class of each order's first failure.

    Works on any contract history: one row per class with orders, share of first failures, recovered orders,
    mean time to recovery (hours) and recovery rate, and a last row ``all``.
    """
    return _class_table(class_counts(attempts, nudges))


def combine_class_counts(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The failure-mix table of histories of disjoint orders, from the :func:`class_counts` of each."""
    return _class_table(pd.concat(parts).groupby(level=0).sum())

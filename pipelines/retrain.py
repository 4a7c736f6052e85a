"""`winback retrain`: the feedback loop's last step, with no human in it beyond reading the verdict.

Train a challenger on the updated history (all of it, or the orders of the last ``window_days``), evaluate it and
the champion on the challenger's recent time holdout (holdout metrics and off-policy estimates), and let the
promotion gate (``pipelines.gate``) move ``champion`` or keep it, saying why. Running scorers poll the alias and
hot-swap by themselves, so nothing else has to happen. ``--every`` repeats the job on a fixed period (a cron line
does the same; see the README).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from model.history import (
    HistoryError,
    read_history,
    refuse_a_history_without_attempts,
    write_attempts,
    write_nudges,
    write_stops,
)
from model.registry_client import get_alias_version, run_params
from pipelines.gate import DEFAULT_POLICY_VALUE_MARGIN, GATE_METRICS, GateMetric, with_policy_value_margin
from pipelines.train import (
    TrainInputError,
    TrainSummary,
    format_history_error,
    history_params,
    print_history_warnings,
    run_training,
    training_catalog,
    usable_tracking_store,
)

__all__ = ["RetrainResult", "gate_checks", "parse_every", "retrain", "retrain_loop", "window"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_every(text: str) -> float:
    """``"24h"``, ``"30m"``, ``"1d"``, ``"90s"`` as seconds; ValueError naming the accepted forms otherwise."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--every must be a positive duration like 24h, 30m, 1d or 90s, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def gate_checks(names: Sequence[str] | None) -> tuple[GateMetric, ...]:
    """The gate metrics called ``names`` (all of them for None); ValueError naming the known ones otherwise."""
    if names is None:
        return GATE_METRICS
    known = {metric.name: metric for metric in GATE_METRICS}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown gate metric(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return tuple(known[name] for name in names)


def window(attempts: pd.DataFrame, nudges: pd.DataFrame, days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The orders whose first attempt falls in the last ``days`` days of the history (whole orders only)."""
    if days <= 0:
        raise ValueError(f"--window-days must be positive, got {days}")
    stamps = pd.to_datetime(attempts["created_at"], utc=True)
    first = stamps.groupby(attempts["order_id"]).min()
    start = stamps.max() - pd.Timedelta(days=days)
    keep = set(first.index[first >= start])
    return (
        attempts.loc[attempts["order_id"].isin(keep)].reset_index(drop=True),
        nudges.loc[nudges["order_id"].isin(keep)].reset_index(drop=True),
    )


@dataclass(frozen=True)
class RetrainResult:
    """What one retraining did: the training summary and the verdict in one line."""

    summary: TrainSummary
    window_days: float | None
    orders: int

    @property
    def promoted(self) -> bool:
        """True when the challenger became champion."""
        return self.summary.promoted

    @property
    def verdict(self) -> str:
        """Which way the gate went and why, in one line."""
        gate = self.summary.gate
        return gate.verdict if gate is not None else "no gate ran"


def retrain(
    attempts: str | Path,
    nudges: str | Path,
    *,
    tracking_uri: str | None = None,
    window_days: float | None = None,
    seed: int = 0,
    config: str | Path | None = None,
    train_options: Mapping[str, Any] | None = None,
    evaluation_options: Mapping[str, Any] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    gate: Sequence[str] | None = None,
    refit: bool = True,
    stops: str | Path | None = None,
    policy_value_margin: float = DEFAULT_POLICY_VALUE_MARGIN,
) -> RetrainResult:
    """Train a challenger on the history (or its last ``window_days``), gate it against the champion, promote
    or keep. Raises TrainInputError (nothing registered) when the history is unusable.

    ``gate`` names the gate metrics to check (default: all of ``GATE_METRICS``), e.g. only the retry model's when
    the retarget data is too thin to compare on. ``stops``: the history's stops file (see ``run_training``).
    ``policy_value_margin``: the gate's non-inferiority margin of the policy value, a share of the champion's.
    """
    checks = with_policy_value_margin(gate_checks(gate), policy_value_margin)
    try:
        refuse_a_history_without_attempts(attempts, nudges, stops)  # before the store is made or read
        history = read_history(attempts, nudges, stops_path=stops)
    except HistoryError as exc:
        raise TrainInputError(format_history_error(exc)) from exc
    # Said of the files given: with --window-days the training reads a window written from the history as read.
    print_history_warnings(console or Console(), history.warnings)
    with tempfile.TemporaryDirectory(prefix="winback-retrain-") as tmp:
        # Before the store is touched, as `train` does: an overlay that cannot be read stops the job (the catalog
        # itself is read again by run_training), then a store that cannot be used is a one-line TrainInputError.
        training_catalog(Path(tmp))
        shrunk = _smaller_than_the_champion_s(len(history.attempts), usable_tracking_store(tracking_uri))
        if shrunk:
            (console or Console()).print(shrunk, highlight=False)
        attempts_path, nudges_path = Path(attempts), Path(nudges)
        stops_path = None if stops is None else Path(stops)
        frame = history.attempts
        if window_days is not None:
            frame, kept_nudges = window(history.attempts, history.nudges, window_days)
            if frame.empty:
                raise TrainInputError(f"no order starts in the last {window_days:g} days of the history")
            attempts_path, nudges_path = Path(tmp) / "attempts.parquet", Path(tmp) / "nudges.parquet"
            write_attempts(frame, attempts_path)
            write_nudges(kept_nudges, nudges_path)
            if history.stops is not None:
                stops_path = Path(tmp) / "stops.parquet"
                kept = history.stops["order_id"].isin(set(frame["order_id"]))
                write_stops(history.stops.loc[kept].reset_index(drop=True), stops_path)
        summary = run_training(
            attempts_path,
            nudges_path,
            stops=stops_path,
            tracking_uri=tracking_uri,
            promote=True,
            seed=seed,
            config=config,
            train_options=train_options,
            evaluation_options=evaluation_options,
            console=console,
            show_progress=show_progress,
            gate_metrics=checks,
            refit=refit,
            history_warnings=False,
            # The run names the history it learned from, not the temporary window cut from it (deleted by now).
            run_params={
                **history_params(attempts, nudges, stops),
                "window_days": "all" if window_days is None else window_days,
                "retrain": True,
            },
        )
    return RetrainResult(summary=summary, window_days=window_days, orders=int(frame["order_id"].nunique()))


def _smaller_than_the_champion_s(attempts: int, tracking_uri: str) -> str | None:
    """A note when the history holds fewer than half the attempts the champion's run read: most likely a store's
    export alone (the store holds only what was served since it started), not the history the champion learned
    from plus what came since."""
    version = get_alias_version("champion", tracking_uri=tracking_uri)
    if version is None:
        return None
    learned = run_params(version, tracking_uri=tracking_uri).get("attempts_rows", "")
    if not learned.isdigit() or attempts * 2 >= int(learned):
        return None
    return (
        f"note: this history holds {attempts:,} attempts, the champion (version {version}) learned from "
        f"{int(learned):,}: a store's export holds only what was served since it started; `winback history export "
        "--with-history DIR` adds the history the champion learned from"
    )


def retrain_loop(
    run_once: Callable[[], RetrainResult],
    every_seconds: float,
    *,
    runs: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_error: Callable[[Exception], None] | None = None,
) -> int:
    """Call ``run_once`` every ``every_seconds`` (``runs`` times, or forever); returns how many runs succeeded.

    A run that fails (bad input such as a history export with a bad row, the registry down, ...) is reported
    through ``on_error`` and the loop goes on: the next run may be fine, and the champion keeps serving.
    """
    done = 0
    count = 0
    while runs is None or count < runs:
        started = time.monotonic()
        try:
            run_once()
            done += 1
        except Exception as exc:  # a scheduled job outlives one failed run; the champion keeps serving
            if on_error is not None:
                on_error(exc)
        count += 1
        if runs is not None and count >= runs:
            break
        sleep(max(every_seconds - (time.monotonic() - started), 0.0))
    return done

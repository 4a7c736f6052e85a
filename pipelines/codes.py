"""`winback codes ...`: watch new error codes, and import a gateway status map as a cold-start overlay."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from model.codewatch import DEFAULT_MIN_SUPPORT, code_key, new_codes_report
from model.gsm import DEFAULT_OVERLAY, OverlayEntry, load_overlay, overlay_prior, read_gsm, to_overlay, write_overlay
from model.history import HistoryError, read_history
from pipelines.train import TrainInputError, format_history_error, merchants_for

__all__ = ["codes_report", "import_gsm", "report_table"]


def codes_report(
    attempts: str | Path,
    nudges: str | Path,
    *,
    tracking_uri: str | None = None,
    alias: str = "champion",
    min_support: int = DEFAULT_MIN_SUPPORT,
    config: str | Path | None = None,
    overlay: str | Path | None = None,
) -> tuple[pd.DataFrame, str]:
    """The new-codes report of a history against the model behind ``alias`` (and the model's version).

    With no model registered under the alias, every code counts as new and the rules-only priors estimate. With
    ``overlay`` (a file of `winback codes import-gsm`), the gateway status map's verdict is added per code.
    """
    from model import registry

    try:
        history = read_history(attempts, nudges)
    except HistoryError as exc:
        raise TrainInputError(format_history_error(exc)) from exc
    loaded = registry.load_alias(alias, tracking_uri=registry.resolve_tracking_uri(tracking_uri))
    bundle, version = loaded if loaded is not None else (None, "rules-only")
    report = new_codes_report(
        bundle, history.attempts, min_support=min_support, merchants=merchants_for(history.attempts, config)
    )
    if overlay is not None:
        entries = overlay_prior(load_overlay(overlay))
        report["gsm"] = [
            _describe_gsm(entries.get(code_key(c, k)))
            for c, k in zip(report["connector"], report["error_code"], strict=True)
        ]
    return report, version


def _describe_gsm(entry: OverlayEntry | None) -> str:
    if entry is None:
        return ""
    flags = [name for name, on in (("step-up", entry.step_up_possible), ("clear-pan", entry.clear_pan_possible)) if on]
    return f"{entry.decision} ({entry.error_class.value}{', ' + ', '.join(flags) if flags else ''})"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def report_table(report: pd.DataFrame, version: str, min_support: int) -> Table:
    """The report as a rich table."""
    table = Table(title=f"Error codes model {version} saw fewer than {min_support} times")
    columns = [
        ("connector", "connector"), ("error_code", "code"), ("training_support", "trained on"),
        ("failures", "failures"), ("retries", "retries"), ("retry_successes", "retry ok"),
        ("recovered_orders", "recovered"), ("retry_probability", "P(retry ok)"), ("retryable", "retryable"),
        ("nearest", "nearest known codes (cosine, retry rate of n)"),
    ]  # fmt: skip
    if "gsm" in report.columns:
        columns.append(("gsm", "gateway status map"))
    for _, title in columns:
        table.add_column(title, overflow="fold")
    for _, row in report.iterrows():
        table.add_row(*(_fmt(row[name]) for name, _ in columns))
    return table


def import_gsm(path: str | Path, out: str | Path = DEFAULT_OVERLAY, console: Console | None = None) -> Path:
    """Read a gateway status map CSV and write the overlay; prints how many codes each class got."""
    entries = to_overlay(read_gsm(path))
    target = write_overlay(entries, out)
    if console is not None:
        counts = pd.Series([e.error_class.value for e in entries], dtype=object).value_counts()
        table = Table(title=f"{len(entries)} codes from {path}")
        table.add_column("error class")
        table.add_column("codes", justify="right")
        for name, count in counts.items():
            table.add_row(str(name), str(count))
        console.print(table)
    return target

"""`winback codes ...`: watch new error codes, and import a gateway status map as a cold-start overlay."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from model.codewatch import DEFAULT_MIN_SUPPORT, code_key, new_codes_report
from model.gsm import DEFAULT_OVERLAY, OverlayEntry, load_overlay, overlay_prior, read_gsm, to_overlay, write_overlay
from model.history import HistoryError, ValidationReport, read_history
from model.wording import count_noun
from pipelines.tables import FoldedCode, compact_table, figure, print_titled
from pipelines.train import TrainInputError, format_history_error, merchants_for

__all__ = ["CodesReport", "codes_report", "import_gsm", "report_view"]


class CodesReport(NamedTuple):
    """What `winback codes report` shows: one row per code the model saw too seldom (``REPORT_COLUMNS``)."""

    report: pd.DataFrame
    version: str  # the model's, or "rules-only"
    failed_attempts: int  # in the whole history: none means no code to report at all
    #: Which error catalog the model's estimates read (`model.registry.offline_catalog`), to print.
    catalog_lines: list[str]
    #: The history's warnings (`History.warnings`), to print as train and evaluate do (`print_history_warnings`).
    warnings: ValidationReport


def codes_report(
    attempts: str | Path,
    nudges: str | Path,
    *,
    tracking_uri: str | None = None,
    alias: str = "champion",
    min_support: int = DEFAULT_MIN_SUPPORT,
    config: str | Path | None = None,
    overlay: str | Path | None = None,
) -> CodesReport:
    """The new-codes report of a history against the model behind ``alias``, with the model's version and how
    many failed attempts the history holds.

    With no model registered under the alias, every code counts as new and the rules-only priors estimate. With
    ``overlay`` (a file of `winback codes import-gsm`), the gateway status map's verdict is added per code.
    """
    from model import registry

    try:
        history = read_history(attempts, nudges)
    except HistoryError as exc:
        raise TrainInputError(format_history_error(exc)) from exc
    loaded = registry.load_trained_alias(alias, tracking_uri=registry.resolve_tracking_uri(tracking_uri))
    bundle, version = (loaded.bundle, loaded.version) if loaded is not None else (None, "rules-only")
    catalog, catalog_lines = registry.offline_catalog(loaded)
    report = new_codes_report(
        bundle,
        history.attempts,
        min_support=min_support,
        merchants=merchants_for(history.attempts, config),
        catalog=catalog,
    )
    if overlay is not None:
        entries = overlay_prior(load_overlay(overlay))
        report["gsm"] = [
            _describe_gsm(entries.get(code_key(c, k)))
            for c, k in zip(report["connector"], report["error_code"], strict=True)
        ]
    failed_attempts = int((history.attempts["status"].astype(str) == "failure").sum())
    return CodesReport(report, version, failed_attempts, catalog_lines, history.warnings)


def _describe_gsm(entry: OverlayEntry | None) -> str:
    if entry is None:
        return ""
    flags = [name for name, on in (("step-up", entry.step_up_possible), ("clear-pan", entry.clear_pan_possible)) if on]
    return f"{entry.decision} ({entry.error_class.value}{', ' + ', '.join(flags) if flags else ''})"


#: Longest example message the report shows; a longer one ends in "…" (the CSV keeps it whole).
MESSAGE_SHOWN_CHARS = 100

#: The counts table's numeric columns: report column, header (two short lines, so the table fits 80 columns).
_COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("training_support", "trained\non"),
    ("failures", "failed"),
    ("retries", "retried"),
    ("retry_successes", "retry\nok"),
    ("recovered_orders", "recov-\nered"),
    ("retry_probability", "P(retry\nok)"),
    ("retryable", "retry-\nable"),
)

_COUNTS_LEGEND = (
    "trained on: retries after the code in the model's training data; failed: failed attempts with it in this "
    "history; retried: silent retries after them; retry ok: those that succeeded; recovered: orders recovered in "
    "the end; P(retry ok): the model's estimate for a typical failure with it; retryable: its verdict"
)


def _cell(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    return figure(value, ".2f" if isinstance(value, float) else "")


def _shown_message(message: object) -> str:
    if not isinstance(message, str) or not message:
        return ""
    return message if len(message) <= MESSAGE_SHOWN_CHARS else message[: MESSAGE_SHOWN_CHARS - 1] + "…"


def report_view(
    report: pd.DataFrame, version: str, min_support: int, *, limit: int | None = None, csv_out: Path | None = None
) -> Group:
    """The report as two rich tables that read at 80 columns and wider: one line of counts per code (codes and
    numbers are never cut: a long code folds), then per code its example message, gateway status map verdict
    and nearest known codes, one per line. Every cell is plain text: a ``[`` in a message is not rich markup.

    With ``limit``, only the first ``limit`` codes (the report's order: most failures first) and a line saying how
    many more there are and where to see them all (``csv_out``, the CSV that holds every code, when written)."""
    total = len(report)
    if limit is not None and total > limit:
        report = report.head(limit)
    counts = compact_table(
        f"Error codes model {version} saw fewer than {count_noun(min_support, 'time')}",
        caption=_COUNTS_LEGEND,
        caption_justify="left",
    )
    counts.add_column("connector/code", overflow="fold")
    for _, header in _COUNT_COLUMNS:
        counts.add_column(header, justify="right", no_wrap=True)
    described = compact_table("What each code says, and the known codes nearest to it by message")
    described.add_column("connector/code: example message", overflow="fold", ratio=2)
    described.add_column("nearest known codes: similarity (retry success of n)", overflow="fold", ratio=3)
    for _, row in report.iterrows():
        code = f"{row['connector']}/{row['error_code']}"
        counts.add_row(FoldedCode(code), *(Text(_cell(row[name])) for name, _ in _COUNT_COLUMNS))
        about = Text()
        message = _shown_message(row["example_message"])
        if message:
            about.append(message)
        gsm = row["gsm"] if "gsm" in report.columns else ""
        if gsm:
            about.append(("\n" if about else "") + f"gateway status map: {gsm}", style="dim")
        nearest = "\n".join(str(row["nearest"]).split("; ")) if row["nearest"] else "none known"
        shown_code = FoldedCode(code, "bold")
        described.add_row(Group(shown_code, about) if about else shown_code, Text(nearest))
    parts: list[Table | Text] = [counts, Text(), described]
    if len(report) < total:
        every = f"{csv_out} has every one" if csv_out is not None else "--csv FILE writes every one"
        parts += [
            Text(),
            Text(
                f"showing {len(report)} of {count_noun(total, 'code')}, those with the most failures: --all shows "
                f"the other {total - len(report):,}; {every}"
            ),
        ]
    return Group(*parts)


def import_gsm(path: str | Path, out: str | Path = DEFAULT_OVERLAY, console: Console | None = None) -> Path:
    """Read a gateway status map CSV and write the overlay; prints how many codes each class got."""
    entries = to_overlay(read_gsm(path))
    target = write_overlay(entries, out)
    if console is not None:
        counts = pd.Series([e.error_class.value for e in entries], dtype=object).value_counts()
        table = Table()
        table.add_column("error class")
        table.add_column("codes", justify="right")
        for name, count in counts.items():
            table.add_row(str(name), str(count))
        print_titled(console, f"{count_noun(len(entries), 'code')} from {path}", table)
    return target

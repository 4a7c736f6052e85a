"""`winback bench`'s summary table."""

from __future__ import annotations

import io
import math

from rich.console import Console

from pipelines.bench import BenchRow, bench_table


def _row(benchmark: str, peak_rss_mb: float, why: str = "") -> BenchRow:
    return BenchRow(
        benchmark=benchmark, inputs="i", figure="f", seconds=1.0, peak_rss_mb=peak_rss_mb, reference="r", ratio="1x",
        peak_rss_unmeasured=why,
    )  # fmt: skip


def test_a_peak_rss_not_measured_is_a_dash_and_the_table_says_why() -> None:
    # The table printed "nan" under "peak RSS MB" for the mlflow serve, model swap, probe and executor rows.
    rows = [
        _row("simulate", 812.0),
        _row("executor (sqlite, 1 worker)", math.nan, "the executor bench measures due actions per second"),
        _row("executor (postgresql, 2 workers)", math.nan, "the executor bench measures due actions per second"),
        _row("probe", math.nan),
    ]
    printed = io.StringIO()
    Console(file=printed, width=200).print(bench_table(rows, "winback bench"))
    text = printed.getvalue()
    assert "nan" not in text.lower().split(), text
    cells = {line.split("│")[1].strip(): line.split("│")[4].strip() for line in text.splitlines() if "│" in line}
    assert cells["simulate"] == "812"
    assert cells["executor (sqlite, 1 worker)"] == cells["probe"] == "-"
    said = " ".join(text.split())
    assert (
        "peak RSS - for executor (sqlite, 1 worker), executor (postgresql, 2 workers): the executor bench measures "
        "due actions per second; peak RSS - for probe: not measured" in said
    ), said

"""`winback bench`'s summary table."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
from rich.console import Console

from pipelines.bench import BenchRow, bench_table, write_bench_report


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


def test_bench_json_is_strict_json_with_null_where_a_figure_is_not_measured(tmp_path: Path) -> None:
    # bench.json held bare NaN (the executor rows' seconds and peak RSS, unmeasured figures of the API benches):
    # not JSON, so `jq` and JSON.parse refused the whole file.
    row = BenchRow(
        benchmark="executor (sqlite)", inputs="2,000 due retries", figure="900 due actions/s", seconds=math.nan,
        peak_rss_mb=math.nan, reference="SQLite, 1 worker, same run: 900/s", ratio="1.00x",
        peak_rss_unmeasured="the executor bench measures due actions per second, not memory",
    )  # fmt: skip
    extra: dict[str, object] = {
        "api_mixed": {"p99_ms": float("inf"), "rate": 812.5, "per_worker": [np.float32("nan"), 3.0]},
        "executor": {"sqlite": 900.0},
    }
    report = tmp_path / "bench.json"

    write_bench_report(report, "2 cores", [row], extra)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    document = json.loads(report.read_text(encoding="utf-8"), parse_constant=refuse)
    assert document["rows"][0]["seconds"] is None
    assert document["rows"][0]["peak_rss_mb"] is None
    assert document["rows"][0]["figure"] == "900 due actions/s"
    assert document["api_mixed"] == {"p99_ms": None, "rate": 812.5, "per_worker": [None, 3.0]}
    jq = subprocess.run(["jq", "-e", ".rows[0].seconds == null", str(report)], capture_output=True, text=True)
    assert jq.returncode == 0, jq.stderr

"""The API benchmark's own arithmetic: CPU per request of a server's process tree."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from service.api.bench import BenchResult, LoadFigures, tree_cpu_seconds


def _figures(requests: int, cpu_ms: float = math.nan) -> LoadFigures:
    return LoadFigures(requests=requests, errors=0, seconds=1.0, rps=float(requests), p50_ms=1.0, p99_ms=2.0,
                       cpu_ms_per_request=cpu_ms)  # fmt: skip


def test_tree_cpu_counts_the_cpu_of_child_processes() -> None:
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        own_before = tree_cpu_seconds(child.pid)
        deadline = time.monotonic() + 20
        while tree_cpu_seconds(child.pid) < own_before + 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds(child.pid) >= own_before + 0.3
        # The parent's tree holds the child: its figure is at least the child's.
        assert tree_cpu_seconds(os.getpid()) >= tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()


def test_cpu_ratio_compares_cpu_per_request_and_is_nan_when_unknown() -> None:
    result = BenchResult(
        api=_figures(1000, cpu_ms=0.5),
        mlflow=_figures(200, cpu_ms=2.0),
        api_fixed_rate=_figures(300),
        mlflow_fixed_rate=None,
        ratio=5.0,
        fixed_rate=300.0,
        model_version="1",
        candidates_per_request=44,
        reference_model={"features": 69, "trees": 82, "leaves": 31},
    )
    assert result.cpu_ratio() == 4.0
    assert result.as_dict()["cpu_ratio"] == 4.0
    result.mlflow = _figures(200)
    assert math.isnan(result.cpu_ratio())

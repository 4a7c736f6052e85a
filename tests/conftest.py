"""Test hygiene shared by every test: no WINBACK_* or MLflow variables leak in from the caller's shell, and no test
kills the test process's own helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import resource_tracker

import psutil
import pytest

# Tests never call home: MLflow's usage telemetry is off for every process the suite starts.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

# rich fixes a console's width at its creation when COLUMNS is set, and the CLI's consoles are made when
# pipelines.cli is imported: a caller's COLUMNS=80 (CI's shell) then wrapped every in-process command's output at 80
# columns whatever width a test asked its CliRunner for. Tests set the width they need, per invocation.
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)


@pytest.fixture(autouse=True)
def _clean_winback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WINBACK_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _resource_tracker_survives() -> Iterator[None]:
    """The test process's multiprocessing resource tracker (a child process, started by the first test to spawn a
    process) must outlive every test. A test that killed it (all its children, say) went unnoticed; the next test
    to start a process then failed on "resource_tracker: process died unexpectedly", far from the cause. The test
    that kills it fails here instead."""
    yield
    pid = resource_tracker._resource_tracker._pid
    if pid is None:
        return
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        status = "gone"
    assert status not in (psutil.STATUS_ZOMBIE, "gone"), f"this test killed the resource tracker (pid {pid})"

"""Test hygiene shared by every test: no WINBACK_* or MLflow variables leak in from the caller's shell, and no test
kills the test process's own helpers."""

from __future__ import annotations

import os
import sys
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


#: The environment variables MLflow's URI setters export for subprocesses.
_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uris_put_back() -> Iterator[None]:
    """A test that points MLflow's fluent API at its store (``mlflow.set_tracking_uri``) left it, and the variable
    MLflow exports with it, set for every later test of its xdist worker: a module's fixture running `winback retrain`
    without --tracking-uri then registered version 2 into that test's store. MLflow's process-wide URIs and their
    variables are put back as they were before each test."""
    before = {name: os.environ.get(name) for name in _MLFLOW_URI_VARIABLES}
    set_before = _mlflow_uris_set()
    yield
    if "mlflow" in sys.modules and _mlflow_uris_set() != set_before:
        import mlflow

        mlflow.set_tracking_uri(set_before[0])  # type: ignore[arg-type]
        mlflow.set_registry_uri(set_before[1])  # type: ignore[arg-type]
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _mlflow_uris_set() -> tuple[str | None, str | None]:
    """The tracking and registry URIs set in this process through MLflow's setters (None: not set), without importing
    MLflow where no test has."""
    if "mlflow" not in sys.modules:
        return None, None
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri, registry_utils._registry_uri

"""Test hygiene shared by every test: no WINBACK_* or MLflow variables leak in from the caller's shell."""

from __future__ import annotations

import os

import pytest

# Tests never call home: MLflow's usage telemetry is off for every process the suite starts.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(autouse=True)
def _clean_winback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WINBACK_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name, raising=False)

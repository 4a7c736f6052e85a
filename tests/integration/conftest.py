"""Fixtures of the integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating an MLflow SQLite store runs its schema migrations (seconds); do it once and copy the file.
    from model import registry

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    registry.get_alias_version(registry.CHAMPION, tracking_uri=f"sqlite:///{path}")
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, _mlflow_template_db: Path) -> str:
    """The tracking URI of an empty MLflow SQLite store in this test's tmp_path (artifacts go next to it)."""
    target = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, target)
    return f"sqlite:///{target}"

"""Fixtures of the integration tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.executor.bench import DEFAULT_POSTGRES_URL, drop_postgres, fresh_postgres


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


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The admin URL of the local PostgreSQL; skips (fails in CI) when it is unreachable."""
    url = os.environ.get("WINBACK_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        engine = sa.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {url} is unreachable in CI: {exc.orig}")
        pytest.skip(f"PostgreSQL at {url} is unreachable: {exc.orig}")
    return url


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it."""
    url, admin = fresh_postgres(postgres_admin_url)
    try:
        yield url
    finally:
        drop_postgres(admin, url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file, then a fresh PostgreSQL database: a test taking it runs on both stores."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'winback.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url

"""A rules-only `winback evaluate` (no model registered) reads the error catalog the rules are served with: the shipped
one with the operator's WINBACK_GSM_OVERLAY, as the decision API and the executor build it. It read the shipped
catalog alone, so a code only the overlay defines was evaluated as unknown while the API served it as the overlay
says (a processor-technical decline)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model.catalog import ErrorCatalog
from model.gsm import serving_catalog, write_overlay
from model.vocab import ErrorClass
from tests.factories import GSM_ONLY_CODE, write_history_frames

#: A log record of MLflow (``2026/12/07 10:33:15 INFO mlflow.store.db.utils: ...``) or of its database migrations
#: (``INFO  [alembic.runtime.migration] ...``): MLflow's handler writes to whatever ``sys.stderr`` is when it logs,
#: the CLI runner's own while it runs, and whether it logs a new store's creation depends on what earlier tests of the
#: same process did to logging (it did after tests/unit/test_demo.py, not alone). Not the CLI's own output.
_LOG_RECORD = re.compile(r"^(\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} [A-Z]+ [\w.]+: |[A-Z]+ +\[[\w.]+\] )")


def _own_lines(text: str) -> list[str]:
    """The lines of ``text`` the CLI wrote itself, log records left out (`_LOG_RECORD`)."""
    return [line for line in text.strip().splitlines() if not _LOG_RECORD.match(line)]


class _EvaluatedError(Exception):
    """Raised by the stand-in evaluation: the CLI has handed it its catalog, nothing more is needed."""


def _evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ErrorCatalog | None]:
    from pipelines import evaluate as evaluate_module
    from pipelines.cli import app

    seen: dict[str, ErrorCatalog] = {}

    def evaluation(*args: Any, catalog: ErrorCatalog, **kwargs: Any) -> Any:
        seen["catalog"] = catalog
        raise _EvaluatedError

    monkeypatch.setattr(evaluate_module, "evaluate", evaluation)
    history = write_history_frames(tmp_path, 40, seed=1)
    files = ["--attempts", str(history / "attempts.parquet"), "--nudges", str(history / "nudges.parquet")]
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]
    result = CliRunner().invoke(
        app, ["evaluate", *files, "--out", str(tmp_path / "out"), "--episodes", "0", *store], env={"COLUMNS": "1000"}
    )
    return result, seen.get("catalog")


def test_a_rules_only_evaluation_reads_the_overlay_the_rules_are_served_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
    served = serving_catalog(overlay)  # as the decision API and the executor build theirs

    result, catalog = _evaluate(tmp_path, monkeypatch)

    assert isinstance(result.exception, _EvaluatedError), result.output
    assert catalog is not None
    assert catalog.version == served.version != serving_catalog(None).version
    assert catalog.normalise("stripe", "gsm_only_code").error_class == ErrorClass.PROCESSOR_TECHNICAL
    assert catalog.normalise("stripe", "gsm_only_code") == served.normalise("stripe", "gsm_only_code")
    assert (
        f"evaluated with the shipped error catalog and the gateway status map overlay {overlay} (WINBACK_GSM_OVERLAY), "
        f"as the rules are served: {served.version} (no model registered)"
    ) in result.stdout.splitlines()


def test_a_rules_only_evaluation_without_an_overlay_reads_the_shipped_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result, catalog = _evaluate(tmp_path, monkeypatch)

    assert isinstance(result.exception, _EvaluatedError), result.output
    assert catalog is not None
    assert catalog.version == serving_catalog(None).version
    assert f"evaluated with the shipped error catalog {catalog.version} (no model registered)" in result.stdout


def test_a_rules_only_evaluation_refuses_an_overlay_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.csv"
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(missing))

    result, catalog = _evaluate(tmp_path, monkeypatch)

    assert result.exit_code == 2, result.output
    assert catalog is None
    assert _own_lines(result.stderr) == [
        f"error: {missing}: no such overlay file (create it with `winback codes import-gsm FILE.csv`)"
    ]

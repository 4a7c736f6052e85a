"""What `winback train` and `winback retrain` print, read as a newcomer reads it in a terminal: each command run as
its own process (MLflow imported fresh, as the console script imports it), on a small simulated history."""

from __future__ import annotations

import re

import pytest

from tests.factories import Printed, run_winback


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Printed:
    """`winback retrain` on a fresh store: there is no champion yet, so the gate promotes the challenger."""
    folder = tmp_path_factory.mktemp("retrain")
    simulated = run_winback("simulate", "--out", "history", "--orders", "400", "--seed", "3", cwd=folder)
    assert simulated.exit_code == 0, simulated.stderr
    history = ["--attempts", "history/attempts.parquet", "--nudges", "history/nudges.parquet"]
    return run_winback("retrain", *history, "--episodes", "30", cwd=folder)


def test_retrain_says_its_verdict_once(retrained: Printed) -> None:
    # It said it twice: once under the training's tables, then again prefixed "promoted: " by the command.
    assert retrained.exit_code == 0, retrained.stderr
    assert retrained.stdout.count("there was no champion yet") == 1, retrained.stdout


def test_retrain_shows_no_mlflow_log_line_a_newcomer_takes_for_an_error(retrained: Printed) -> None:
    # Registering a version logged MLflow's warning about pickling the pyfunc with CloudPickle (now logged as a
    # models-from-code file) and its INFO line about validating the input example (MLflow's INFO level is off).
    assert retrained.exit_code == 0, retrained.stderr
    assert "CloudPickle" not in retrained.stderr
    assert "Validating input example" not in retrained.stderr
    assert re.search(r"^\S+ \S+ (INFO|WARNING) mlflow", retrained.stderr, re.MULTILINE) is None, retrained.stderr


def test_retrain_leaves_saying_which_version_it_registered_to_winback(retrained: Printed) -> None:
    # MLflow's registration printed "Successfully registered model 'winback'." and "Created version '1' of model
    # 'winback'." on stderr, while winback's tables and verdict name the version.
    assert retrained.exit_code == 0, retrained.stderr
    assert "registered model" not in retrained.stderr.lower()
    assert "Created version" not in retrained.stderr
    assert "promoted version 1" in retrained.stdout


def test_retrain_into_a_log_prints_a_line_per_training_step(retrained: Printed) -> None:
    # Into a pipe or a file (CI, `make demo > log`) rich draws nothing of its transient bar: minutes of training
    # printed nothing. There each step is now a plain line as it starts, in order, the refit included.
    assert retrained.exit_code == 0, retrained.stderr
    steps = re.findall(r"^training step (\d)/(\d): (.+)$", retrained.stdout, re.MULTILINE)
    assert steps == [
        ("1", "6", "validate history"),
        ("2", "6", "train"),
        ("3", "6", "evaluate"),
        ("4", "6", "refit on the whole history"),
        ("5", "6", "log to MLflow"),
        ("6", "6", "register"),
    ], retrained.stdout

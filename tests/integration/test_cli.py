"""The `winback` commands as a newcomer runs them (CONTRACT.md section 1), through Typer's CliRunner."""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from model.history import read_history, write_attempts, write_nudges
from model.registry import get_alias_version
from pipelines.cli import app
from service.api.server import server_env
from tests.factories import run_winback

runner = CliRunner()


@pytest.fixture(scope="module")
def small_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("history")
    result = runner.invoke(app, ["simulate", "--out", str(out), "--orders", "400", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_simulate_writes_valid_files_and_prints_the_failure_mix(small_history: Path, tmp_path: Path) -> None:
    history = read_history(small_history / "attempts.parquet", small_history / "nudges.parquet")
    assert history.attempts["order_id"].nunique() == 400
    # The CSV variant round-trips to the same frames.
    write_attempts(history.attempts, tmp_path / "attempts.csv")
    write_nudges(history.nudges, tmp_path / "nudges.csv")
    again = read_history(tmp_path / "attempts.csv", tmp_path / "nudges.csv")
    pd.testing.assert_frame_equal(again.attempts, history.attempts)
    pd.testing.assert_frame_equal(again.nudges, history.nudges)
    rerun = runner.invoke(app, ["simulate", "--out", str(tmp_path / "again"), "--orders", "400", "--seed", "3"])
    assert "failure mix and logging-policy recovery" in rerun.output
    assert "insufficient_funds" in rerun.output


def test_simulate_refuses_a_zero_order_count(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path), "--orders", "0"])
    assert result.exit_code != 0
    assert "--orders" in result.output


def test_evaluate_refuses_an_alias_no_version_has_before_any_work(
    small_history: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """`--alias challanger` (a typo) evaluated rules-only, exit 0, and said "no model registered" of a store where
    winback is registered (`codes report` counted every code as new). Now one line naming the alias and the ones
    there are; no report is written."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store).create_registered_model("winback")
    out = tmp_path / "evaluation"
    history = ["--attempts", str(small_history / "attempts.parquet"), "--nudges", str(small_history / "nudges.parquet")]
    for command in (["evaluate", *history, "--out", str(out)], ["codes", "report", *history]):
        result = runner.invoke(app, [*command, "--tracking-uri", mlflow_store, "--alias", "challanger"])
        assert result.exit_code == 2, (command, result.output)
        assert "error: --alias challanger: no version of winback has this alias (its aliases: none)" in " ".join(
            result.output.split()
        )
    assert not out.exists()
    # A tracking URI MLflow has no store for: a traceback (exit 1) after reading the history, before.
    for command in (["evaluate", *history, "--out", str(out)], ["codes", "report", *history]):
        result = runner.invoke(app, [*command, "--tracking-uri", "bogus://x"])
        assert result.exit_code == 2, (command, result.output)
        assert "error: cannot use the MLflow tracking store bogus://x: " in result.output, result.output
        assert "Traceback" not in result.output


def test_evaluate_without_a_registered_model_compares_rules_only_with_the_baselines(
    small_history: Path, tmp_path: Path, mlflow_store: str
) -> None:
    out = tmp_path / "evaluation"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--attempts",
            str(small_history / "attempts.parquet"),
            "--nudges",
            str(small_history / "nudges.parquet"),
            "--out",
            str(out),
            "--tracking-uri",
            mlflow_store,
            "--episodes",
            "60",
            "--max-points",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    report = (out / "evaluation.md").read_text()
    for policy in ("rules-only", "static_retry", "static_retry_then_retarget", "logging"):
        assert f"| {policy} |" in report
    assert (out / "policy_value.png").stat().st_size > 0
    # The episodes print as a table, a column per policy: printed a row per policy by pandas, each row wrapped
    # over three lines between its headers at 80 columns. Counts print as counts, money in cents.
    assert re.search(r"^orders( +60){4}$", result.output, re.MULTILINE), result.output
    assert re.search(r"^net_value_usd( +[\d,]+\.\d{2}){4}$", result.output, re.MULTILINE), result.output


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--episodes", "0", "--max-points", "100"],
        ["codes", "report"],
        # The window is written from the history as read (the delivery set): only the files given say it.
        ["retrain", "--window-days", "100000", "--episodes", "0"],
    ],
    ids=["evaluate", "codes-report", "retrain-window"],
)
def test_a_command_reading_the_history_says_how_it_read_a_clicked_nudge_marked_undelivered(
    command: list[str], small_history: Path, tmp_path: Path, mlflow_store: str
) -> None:
    nudges = pd.read_parquet(small_history / "nudges.parquet")
    clicked = int(nudges.index[nudges["clicked_at"].notna()][0])
    nudges.loc[clicked, "delivered"] = False  # a lost delivery receipt; the customer clicked all the same
    edited = tmp_path / "nudges.parquet"
    nudges.to_parquet(edited, index=False)
    out = ["--out", str(tmp_path / "evaluation")] if command[0] == "evaluate" else []
    result = runner.invoke(
        app,
        [*command, "--attempts", str(small_history / "attempts.parquet"), "--nudges", str(edited), *out,
         "--tracking-uri", mlflow_store],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warning = f"warning: {edited}:row {clicked + 1}: column delivered: delivered is false but"
    # Compared without spaces: the console wraps a long path anywhere, mid-word too.
    assert "".join(warning.split()) in "".join(result.output.split()), result.output


@pytest.mark.parametrize("command", [["train"], ["evaluate"], ["codes", "report"], ["retrain"]], ids=lambda c: c[0])
def test_a_command_names_every_missing_input_in_one_error(command: list[str], tmp_path: Path) -> None:
    missing = {option: tmp_path / name for option, name in (("--attempts", "nope.csv"), ("--nudges", "x.csv"))}
    config = tmp_path / "merchants.yaml"  # a folder where the config file should be
    config.mkdir()
    named = [part for option, path in missing.items() for part in (option, str(path))]
    if command == ["evaluate"]:
        named += ["--out", str(tmp_path / "evaluation")]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, [*command, *named, "--config", str(config), "--tracking-uri", store])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()) == (
        f"error: --attempts {missing['--attempts']}: no such file; --nudges {missing['--nudges']}: no such file; "
        f"--config {config}: a folder, not a file"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merchants.yaml"]  # no store, no output folder


def test_evaluate_bad_history_exits_with_one_line(tmp_path: Path, small_history: Path) -> None:
    attempts = pd.read_parquet(small_history / "attempts.parquet")
    attempts.loc[2, "amount"] = -5.0
    bad = tmp_path / "attempts.parquet"
    attempts.to_parquet(bad)
    result = runner.invoke(
        app,
        ["evaluate", "--attempts", str(bad), "--nudges", str(small_history / "nudges.parquet"), "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "invalid history" in result.output
    assert "row 3: column amount" in result.output  # which row and column, not only how many problems


def test_train_on_input_it_cannot_use_exits_with_one_line(tmp_path: Path, small_history: Path) -> None:
    # Both used to end in a traceback of 60-70 lines with exit code 1.
    attempts = pd.read_parquet(small_history / "attempts.parquet")
    orders = attempts["order_id"].drop_duplicates().head(5)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    attempts[attempts["order_id"].isin(orders)].to_parquet(tiny / "attempts.parquet")
    nudges = pd.read_parquet(small_history / "nudges.parquet")
    nudges[nudges["order_id"].isin(orders)].to_parquet(tiny / "nudges.parquet")
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    small = runner.invoke(app, ["train", "--attempts", str(tiny / "attempts.parquet"),
                                "--nudges", str(tiny / "nudges.parquet"), "--tracking-uri", store])  # fmt: skip
    assert small.exit_code == 2, small.output
    assert "need at least 30" in small.output
    assert "Traceback" not in small.output
    config = tmp_path / "merchants.yaml"
    config.write_text(
        (Path(__file__).resolve().parents[2] / "data" / "demo" / "merchants.yaml")
        .read_text()
        .replace('timezone: "Asia/Kolkata"', 'timezone: "Mars/Olympus"', 1)
    )
    bad_config = runner.invoke(app, ["train", "--attempts", str(small_history / "attempts.parquet"),
                                     "--nudges", str(small_history / "nudges.parquet"), "--tracking-uri", store,
                                     "--config", str(config)])  # fmt: skip
    assert bad_config.exit_code == 2, bad_config.output
    assert "Mars/Olympus" in bad_config.output
    assert "Traceback" not in bad_config.output


def test_a_history_of_headers_only_is_refused_before_any_store_or_folder_is_made(
    tmp_path: Path, small_history: Path
) -> None:
    """train, retrain and evaluate on header-only files: train and retrain made an empty MLflow store and failed for
    want of retries; evaluate made the store and its --out folder first. (`codes report` says there is no code to
    report, exit 0: tests/integration/test_cli_newcomer_output.py.)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("attempts", "nudges"):
        pd.read_parquet(small_history / f"{name}.parquet").iloc[:0].to_csv(empty / f"{name}.csv", index=False)
    history = ["--attempts", str(empty / "attempts.csv"), "--nudges", str(empty / "nudges.csv")]
    store = tmp_path / "mlruns"
    out = tmp_path / "evaluation"
    for command in (["train"], ["retrain"], ["evaluate", "--out", str(out)]):
        result = runner.invoke(app, [*command, *history, "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"])
        assert result.exit_code == 2, (command, result.output)
        assert (
            f"error: invalid history: 2 problems: {empty / 'attempts.csv'}: no rows, only a header: a history needs "
            f"at least one attempt; {empty / 'nudges.csv'}: no rows either, only a header"
        ) in " ".join(result.output.split()), (command, result.output)
        assert not store.exists(), command
        assert not out.exists(), command


def test_train_with_a_tracking_store_it_cannot_reach_says_so_in_one_line_before_training(
    tmp_path: Path, small_history: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to train first, then spend MLflow's retries (4.5 minutes) and end in a 470-line traceback, exit 1.
    import socket

    import model.training

    def no_training(*_: object, **__: object) -> None:
        raise AssertionError("trained although the tracking store cannot be reached")

    monkeypatch.setattr(model.training, "train_partitions", no_training)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    history = ["--attempts", str(small_history / "attempts.parquet"), "--nudges", str(small_history / "nudges.parquet")]
    # (Security review.) A store's credentials were printed with it, into the terminal and the retrain's cron log.
    with_password = f"http://winback:s3cret-pw@127.0.0.1:{port}/?password=s3cret-pw&x=1"
    shown = f"http://winback:***@127.0.0.1:{port}/?password=***&x=1"
    # A database driver that is not installed ended train in a ModuleNotFoundError traceback, exit 1.
    without_driver = ("mysql://winback:s3cret-pw@127.0.0.1:1/mlflow", "mysql://winback:***@127.0.0.1:1/mlflow")
    for (uri, named), command in itertools.product(
        [(f"http://127.0.0.1:{port}",) * 2, ("bogus://nowhere",) * 2, (with_password, shown), without_driver],
        ["train", "retrain"],
    ):
        # retrain asks the store for its champion before training: that too must end in this one line.
        result = runner.invoke(app, [command, *history, "--tracking-uri", uri])
        assert result.exit_code == 2, result.output
        assert f"error: cannot use the MLflow tracking store {named}: " in result.output
        assert "Traceback" not in result.output
        assert "s3cret-pw" not in result.output


def test_history_export_from_a_database_it_cannot_read_exits_with_one_line(tmp_path: Path) -> None:
    absent = tmp_path / "absent.db"
    for url, reason in [
        (f"sqlite:///{absent}", f"no winback database at {absent}"),
        ("foo://bar", "cannot use the database foo://bar (Can't load plugin: sqlalchemy.dialects:foo)"),
        ("postgresql://127.0.0.1:1/none", "cannot read the database at --database-url"),
        # (Security review.) The password was printed with the URL.
        ("postgresql://wb:s3cret-pw@127.0.0.1:1/none", "--database-url 'postgresql://wb:***@127.0.0.1:1/none'"),
        (f"sqlite:///{absent}?password=s3cret-pw", f"(from sqlite:///{absent}?password=***)"),
    ]:
        result = runner.invoke(app, ["history", "export", "--out", str(tmp_path / "out"), "--database-url", url])
        assert result.exit_code == 2, result.output
        assert reason in result.output
        assert "s3cret-pw" not in result.output
    assert not absent.exists()  # an empty database file used to be left behind
    assert not (tmp_path / "out").exists()


def test_every_command_taking_a_database_url_refuses_one_no_engine_takes_in_one_line(tmp_path: Path) -> None:
    """(Newcomer walk.) resolve-charge, charge-disputes and history export ended `--database-url bogus://x` or a
    URL whose driver is not installed in SQLAlchemy's traceback (exit 1); console add-agent asked for the password
    twice first. Now each says it in one line, the password hidden, before doing anything."""
    commands = [
        ["executor", "resolve-charge", "1", "--charged"],
        ["executor", "charge-disputes"],
        ["history", "export", "--out", str(tmp_path / "out")],
        ["console", "add-agent", "--merchant", "m_in_stream", "--name", "asha"],
    ]
    for command, (url, said) in itertools.product(
        commands,
        [
            ("bogus://x", "cannot use the database bogus://x (Can't load plugin: sqlalchemy.dialects:bogus)"),
            ("mysql://wb:s3cret@db/winback", "cannot use the database mysql://wb:***@db/winback (No module named"),
        ],
    ):
        result = runner.invoke(app, [*command, "--database-url", url], input="")
        assert result.exit_code == 2, (command, result.output)
        assert f"error: {said}" in " ".join(result.output.split()), (command, result.output)
        assert "Password" not in result.output
        assert "s3cret" not in result.output
    assert not (tmp_path / "out").exists()


def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "merchants.yaml"
    shutil.copyfile(Path(__file__).resolve().parents[2] / "data" / "demo" / "merchants.yaml", config)
    config.write_text(config.read_text().replace("max_retries: 3", "max_retries: 3\n      retry_budget: 9", 1))
    result = runner.invoke(app, ["serve", "--config", str(config), "--port", "8799"])
    assert result.exit_code == 2
    assert "retry.retry_budget: unknown key" in result.output


def test_serve_and_executor_run_refuse_a_config_that_writes_a_block_twice(tmp_path: Path) -> None:
    """A second `retarget:` block replaced the first without a word (YAML keeps the last): the merchant's quiet
    hours and channels were gone. Both commands name the file, the key's path and both lines, and start nothing."""
    config = tmp_path / "merchants.yaml"
    shipped = (Path(__file__).resolve().parents[2] / "data" / "demo" / "merchants.yaml").read_text()
    config.write_text(shipped.replace("    retry:\n", "    retarget: {enabled: false}\n    retry:\n", 1))
    lines = config.read_text().splitlines()
    first = lines.index("    retarget: {enabled: false}") + 1
    second = next(number for number, line in enumerate(lines, 1) if number > first and line == "    retarget:")
    database = tmp_path / "winback.db"
    for command in (
        ["serve", "--port", "8799"],
        ["executor", "run", "--database-url", f"sqlite:///{database}", "--stop-after", "0"],
    ):
        result = runner.invoke(app, [*command, "--config", str(config)])
        assert result.exit_code == 2, result.output
        assert (
            f"error: {config}: duplicate key merchants.m_in_stream.retarget on lines {first} and {second}: "
            in " ".join(result.output.split())
        ), result.output
    assert not database.exists()


@pytest.fixture
def serve_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment as before any serve: serve sets these for its workers (restored after the test)."""
    for name in (*server_env(tmp_path, "sqlite://"), "WINBACK_RUN_MIGRATIONS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _serve_refused() -> str:
    """``winback serve``'s output, once it has refused to start: exit 2 and one line, no traceback."""
    result = runner.invoke(app, ["serve", "--port", "8799"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_serve_without_its_database_says_so_in_one_line(serve_env: pytest.MonkeyPatch) -> None:
    serve_env.setenv("WINBACK_DATABASE_URL", "postgresql+psycopg://winback:secret@127.0.0.1:1/winback")
    output = _serve_refused()
    assert "the database postgresql+psycopg://winback:***@127.0.0.1:1/winback is unavailable (" in output
    assert "start it again when the database answers" in output
    assert "secret" not in output
    # A password given in the query string is hidden too.
    serve_env.setenv("WINBACK_DATABASE_URL", "postgresql+psycopg://winback@127.0.0.1:1/winback?password=qsecret")
    output = _serve_refused()
    assert "password=***" in output
    assert "qsecret" not in output


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("bogus://x", "cannot use the database bogus://x (Can't load plugin: sqlalchemy.dialects:bogus): winback "
         "keeps its state in SQLite or PostgreSQL, e.g. sqlite:///winback.db or postgresql+psycopg://"),
        ("mysql://wb:s3cret@127.0.0.1/winback", "cannot use the database mysql://wb:***@127.0.0.1/winback (No module "
         "named 'MySQLdb')"),
        ("postgresql+psycopg://wb:s3cret@db:fivefour/winback", "cannot use the database URL given (invalid literal "
         "for int() with base 10: 'fivefour')"),
        ("postgresql+psycopg://wb:s3cret@127.0.0.1:1/winback", "the database postgresql+psycopg://wb:***@127.0.0.1:1/"
         "winback is unavailable ("),
        ("sqlite:///{tmp}/a-file/new/winback.db", "the SQLite database sqlite:///{tmp}/a-file/new/winback.db cannot "
         "be created: its folder {tmp}/a-file/new cannot be created (Not a directory); create the folder or name "
         "another path"),
    ],
)  # fmt: skip
def test_serve_and_executor_run_refuse_a_database_they_cannot_use_in_one_line(
    url: str, said: str, tmp_path: Path, serve_env: pytest.MonkeyPatch
) -> None:
    """(Newcomer walk.) `executor run --database-url bogus://x` (or a URL without its driver, or a PostgreSQL that
    does not answer) ended in SQLAlchemy's traceback, exit 1; so did `serve` with such a WINBACK_DATABASE_URL. A
    SQLite file in a folder that does not exist was "unavailable": start it again when the database answers (that
    folder is now made, test below; one that cannot be made is named)."""
    url, said = url.format(tmp=tmp_path), said.format(tmp=tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    serve_env.setenv("WINBACK_SPOOL_DIR", str(tmp_path / "spool"))
    serve_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    commands = {
        "serve": (["serve", "--port", "8799"], {"WINBACK_DATABASE_URL": url}),
        "executor run": (["executor", "run", "--database-url", url, "--stop-after", "0"], {}),
    }
    for name, (command, env) in commands.items():
        result = runner.invoke(app, command, env=env)
        assert result.exit_code == 2, (name, result.output)
        assert f"error: {said}" in " ".join(result.output.split()), (name, result.output)
        assert "Traceback" not in result.output
        assert "s3cret" not in result.output
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_executor_run_and_add_agent_make_the_folder_of_a_new_sqlite_database_and_say_so(
    tmp_path: Path, serve_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """(Newcomer walk.) `--database-url sqlite:///./state/new/winback.db` in a fresh checkout was refused: "its
    folder .../state/new does not exist; create the folder or name another path". The folder is made (one log line
    names it), the database in it is created, private, as in an existing folder."""
    serve_env.chdir(tmp_path)
    serve_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    url = "sqlite:///./state/new/winback.db"
    ran = runner.invoke(app, ["executor", "run", "--database-url", url, "--stop-after", "0"])
    assert ran.exit_code == 0, ran.output
    database = tmp_path / "state" / "new" / "winback.db"
    assert database.is_file()
    assert database.stat().st_mode & 0o777 == 0o600
    assert [record.getMessage() for record in caplog.records if "created the folder" in record.getMessage()] == [
        f"created the folder {tmp_path / 'state' / 'new'} for the SQLite database {url}, which starts empty"
    ]
    # As a terminal shows it (a process of its own, where the line is no JSON log's yet).
    agent = run_winback(
        "console", "add-agent", "--merchant", "m_in_stream", "--name", "asha", "--database-url",
        "sqlite:///agents/winback.db", cwd=tmp_path, env={"WINBACK_AGENT_PASSWORD": "a long enough password 1"},
    )  # fmt: skip
    assert agent.exit_code == 0, agent.stderr
    assert (tmp_path / "agents" / "winback.db").is_file()
    assert (
        f"created the folder {tmp_path / 'agents'} for the SQLite database sqlite:///agents/winback.db, which starts "
        "empty"
    ) in agent.stderr


def test_serve_on_a_port_in_use_says_so_in_one_line_before_touching_anything(
    tmp_path: Path, serve_env: pytest.MonkeyPatch
) -> None:
    """A taken port was found by uvicorn only after the database was migrated and the model loaded: a JSON log
    line "[Errno 98] ... address already in use" and exit 3. Now exit 2, one line, and nothing written."""
    database = tmp_path / "winback.db"
    serve_env.setenv("WINBACK_DATABASE_URL", f"sqlite:///{database}")
    serve_env.setenv("WINBACK_SPOOL_DIR", str(tmp_path / "spool"))
    serve_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"error: port {port} on 127.0.0.1 is in use: stop what runs there or pass another --port" in " ".join(
        result.output.split()
    )
    assert not database.exists()
    assert not (tmp_path / "spool").exists()


def test_serve_refuses_a_tracking_uri_no_mlflow_store_takes_before_touching_anything(
    tmp_path: Path, serve_env: pytest.MonkeyPatch
) -> None:
    """`--tracking-uri bogus://x` started, served rules-only for ever and said why only in /readyz. Now exit 2 and
    the line evaluate prints for it, before the port, the database or the spool is looked at. A store that is down
    (an unreachable server, an unreachable database) is not refused: the port in use is what ends those runs."""
    database = tmp_path / "winback.db"
    serve_env.setenv("WINBACK_DATABASE_URL", f"sqlite:///{database}")
    serve_env.setenv("WINBACK_SPOOL_DIR", str(tmp_path / "spool"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]  # a run the check lets through ends here, at once, rather than serve
        result = runner.invoke(app, ["serve", "--port", str(port), "--tracking-uri", "bogus://x"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "error: cannot use the MLflow tracking store bogus://x: Model registry functionality is unavailable; " \
            "got unsupported URI 'bogus://x'" in " ".join(result.output.split()), result.output  # fmt: skip
        for down in ("http://127.0.0.1:1", "postgresql://winback@127.0.0.1:1/mlflow"):
            result = runner.invoke(app, ["serve", "--port", str(port), "--tracking-uri", down])
            assert result.exit_code == 2, result.output
            assert f"error: port {port} on 127.0.0.1 is in use" in result.output, result.output
        # A store this install can never open started too, rules-only for ever: no driver, a file store MLflow will
        # not open, a Unity Catalog URI. A file store MLflow is allowed to open is taken.
        serve_env.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        for never, why in NEVER_OPENED:
            result = runner.invoke(app, ["serve", "--port", str(port), "--tracking-uri", never])
            assert result.exit_code == 2, result.output
            assert why in " ".join(result.output.split()), result.output
            assert "s3cret" not in result.output
        serve_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        result = runner.invoke(app, ["serve", "--port", str(port), "--tracking-uri", str(tmp_path / "mlruns")])
        assert f"error: port {port} on 127.0.0.1 is in use" in result.output, result.output
    assert not database.exists()
    assert not (tmp_path / "spool").exists()
    assert not (tmp_path / "mlruns").exists()


#: Tracking URIs no MLflow store of this install can open, and the line saying so (what and how to fix it).
NEVER_OPENED = [
    (
        "mysql://winback:s3cret@127.0.0.1:1/mlflow",
        "error: cannot use the MLflow tracking store mysql://winback:***@127.0.0.1:1/mlflow: its database driver "
        "MySQLdb is not installed: install mysqlclient into winback's environment",
    ),
    (
        "mlruns",
        f"error: cannot use the MLflow tracking store mlruns: MLflow {version('mlflow')} opens a file store only when "
        "MLFLOW_ALLOW_FILE_STORE=true: set it, or use sqlite:///mlruns/mlflow.db",
    ),
    (
        "databricks-uc",
        f"error: cannot use the MLflow tracking store databricks-uc: MLflow {version('mlflow')} takes a Unity "
        "Catalog URI as a model registry only",
    ),
]


def test_executor_run_refuses_a_tracking_uri_no_mlflow_store_takes_before_touching_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It ran, deciding rules-only for ever, and said why only in a log line per poll."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    database = tmp_path / "winback.db"
    command = ["executor", "run", "--database-url", f"sqlite:///{database}", "--stop-after", "0"]
    result = runner.invoke(app, [*command, "--tracking-uri", "bogus://x"])
    assert result.exit_code == 2, result.output
    assert "error: cannot use the MLflow tracking store bogus://x: " in result.output, result.output
    for never, why in NEVER_OPENED:
        result = runner.invoke(app, [*command, "--tracking-uri", never])
        assert result.exit_code == 2, result.output
        assert why in " ".join(result.output.split()), result.output
    assert not database.exists()


def test_serve_with_a_spool_folder_it_cannot_write_says_so_in_one_line(
    tmp_path: Path, serve_env: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    serve_env.setenv("WINBACK_SPOOL_DIR", str(tmp_path / "a-file" / "spool"))
    output = _serve_refused()
    assert "(WINBACK_SPOOL_DIR) cannot be written" in output


def test_serve_with_a_setting_it_cannot_take_names_each_variable_in_one_line(serve_env: pytest.MonkeyPatch) -> None:
    serve_env.setenv("WINBACK_GC_FREEZE", "maybe")
    serve_env.setenv("WINBACK_MAX_BATCH", "0")
    # A poll so slow that a promoted version could not serve within CONTRACT.md's 30 s.
    serve_env.setenv("WINBACK_MODEL_POLL_SECONDS", "30")
    output = _serve_refused()
    assert "WINBACK_GC_FREEZE='maybe': Input should be a valid boolean" in output
    assert "WINBACK_MAX_BATCH='0': Input should be greater than or equal to 1" in output
    assert "WINBACK_MODEL_POLL_SECONDS='30': Input should be less than or equal to 20" in output


def test_serve_refuses_placeholder_secrets_outside_dev_before_any_worker(serve_env: pytest.MonkeyPatch) -> None:
    # The executor's routes and the console live in the scorer and read their settings on first use: checked at
    # start, a placeholder secret is one line naming the variable, not a 500 on every pay link or sign-in.
    serve_env.setenv("WINBACK_ENV", "prod")
    serve_env.delenv("WINBACK_LINK_SECRET", raising=False)
    serve_env.setenv("WINBACK_CONSOLE_SECRET", "short-secret-value")
    output = _serve_refused()
    assert "WINBACK_LINK_SECRET must be set to a random string of at least 32 characters" in output
    assert "WINBACK_CONSOLE_SECRET must be set" in output
    assert "short-secret-value" not in output
    assert "validation error" not in output  # pydantic's own multi-line message
    # An executor setting out of range is named too (a rule over several variables waits for valid values), beside
    # one of the API's own.
    serve_env.setenv("WINBACK_BATCH_SIZE", "0")
    serve_env.setenv("WINBACK_MAX_BATCH", "0")
    output = _serve_refused()
    assert "WINBACK_BATCH_SIZE='0': Input should be greater than or equal to 1" in output
    assert "WINBACK_MAX_BATCH='0': Input should be greater than or equal to 1" in output


def test_serve_in_prod_refuses_to_start_without_a_callback_secret_of_its_own(serve_env: pytest.MonkeyPatch) -> None:
    # Before: prod started with the providers' callback key derived from WINBACK_LINK_SECRET, so a leaked link
    # secret also forged STOP replies and receipts. Now it is one line naming the variable, and exit 2.
    serve_env.setenv("WINBACK_ENV", "prod")
    serve_env.setenv("WINBACK_LINK_SECRET", "l" * 40)
    serve_env.setenv("WINBACK_CONSOLE_SECRET", "c" * 40)
    serve_env.delenv("WINBACK_PROVIDER_CALLBACK_SECRET", raising=False)
    output = _serve_refused()
    assert "WINBACK_PROVIDER_CALLBACK_SECRET must be set, apart from WINBACK_LINK_SECRET" in output
    assert "l" * 40 not in output


def test_serve_beyond_loopback_refuses_the_placeholder_secrets_even_in_dev(serve_env: pytest.MonkeyPatch) -> None:
    # WINBACK_ENV defaults to dev, which takes the public placeholders: on 0.0.0.0 anyone could forge pay links,
    # STOP callbacks and console sessions.
    serve_env.delenv("WINBACK_ENV", raising=False)
    serve_env.delenv("WINBACK_LINK_SECRET", raising=False)
    serve_env.delenv("WINBACK_CONSOLE_SECRET", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "winback.internal"):
        result = runner.invoke(app, ["serve", "--host", host, "--port", "8799"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "WINBACK_LINK_SECRET is the public placeholder" in result.output
        assert "WINBACK_CONSOLE_SECRET is the public placeholder" in result.output
    serve_env.setenv("WINBACK_LINK_SECRET", "l" * 40)
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "8799"])
    assert "WINBACK_LINK_SECRET" not in result.output
    assert "WINBACK_CONSOLE_SECRET is the public placeholder" in result.output


def test_placeholder_secrets_stay_allowed_on_loopback() -> None:
    from service.api.server import refuse_placeholder_secrets_beyond_loopback

    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        refuse_placeholder_secrets_beyond_loopback(host)


def test_demo_without_serving_trains_and_promotes_a_champion(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        # --live-orders 0: prepare only; the live loop has its own test (test_demo_loop.py)
        [
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--orders",
            "300",
            "--episodes",
            "30",
            "--no-serve",
            "--live-orders",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    uri = f"sqlite:///{tmp_path / 'demo' / 'mlruns' / 'mlflow.db'}"
    assert get_alias_version("champion", tracking_uri=uri) == "1"
    assert "try a decision" in result.output


def test_executor_refuses_to_start_with_a_broken_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parents[2] / "data" / "templates", templates)
    (templates / "_default" / "sms.en.j2").write_text("Pay {{ amount }} {{ currency }} now: {{ no_such_variable }}")
    monkeypatch.setenv("WINBACK_TEMPLATES_DIR", str(templates))
    result = runner.invoke(
        app, ["executor", "run", "--database-url", f"sqlite:///{tmp_path / 'w.db'}", "--stop-after", "0"]
    )
    assert result.exit_code == 2
    assert "sms.en.j2" in result.output


def _config_with_unset_provider_secrets(tmp_path: Path) -> Path:
    """The shipped demo config with m_in_stream's WhatsApp and SMS at Gupshup, neither key variable set."""
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "data" / "demo" / "merchants.yaml").read_text())
    config["merchants"]["m_in_stream"]["providers"] = {
        "whatsapp": {"kind": "gupshup", "api_key_env": "WB_TEST_UNSET_GUPSHUP_KEY", "source": "919000000000"},
        "sms": {"kind": "gupshup", "api_key_env": "WB_TEST_UNSET_GUPSHUP_SMS"},
    }
    path = tmp_path / "merchants.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


UNSET_PROVIDER_SECRETS = (
    "secrets are not set: merchants.m_in_stream.providers.whatsapp.api_key_env: WB_TEST_UNSET_GUPSHUP_KEY; "
    "merchants.m_in_stream.providers.sms.api_key_env: WB_TEST_UNSET_GUPSHUP_SMS"
)


def test_executor_refuses_to_start_without_a_channel_providers_secret(tmp_path: Path) -> None:
    """A provider's key variable that is not set used to pass start-up: every message to that channel was then
    refused ("... is not set") on every send, each counted against the customer's messages, and the order FAILED.
    Now the command refuses to start, naming every such variable by its key's path in one line."""
    config = _config_with_unset_provider_secrets(tmp_path)
    database = tmp_path / "w.db"
    result = runner.invoke(
        app,
        ["executor", "run", "--config", str(config), "--database-url", f"sqlite:///{database}", "--stop-after", "0"],
    )
    assert result.exit_code == 2, result.output
    assert UNSET_PROVIDER_SECRETS in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not database.exists()  # refused before any worker or migration


def test_serve_does_not_need_the_channel_providers_secrets(tmp_path: Path, serve_env: pytest.MonkeyPatch) -> None:
    """``winback serve`` sends no message (the executor's workers do; its link payments charge, and the webhook
    they lead to is sent by a worker): a provider key kept on the executors' machines alone does not stop it. Here
    it gets past the secrets to the database, which is not there."""
    config = _config_with_unset_provider_secrets(tmp_path)
    serve_env.setenv("WINBACK_DATABASE_URL", "postgresql+psycopg://winback@127.0.0.1:1/winback")
    result = runner.invoke(app, ["serve", "--config", str(config), "--port", "8799"])
    assert result.exit_code == 2, result.output
    assert "is unavailable" in result.output
    assert "secrets are not set" not in result.output


def test_executor_with_a_setting_it_cannot_take_names_the_variable_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_BATCH_SIZE", "0")
    monkeypatch.setenv("WINBACK_LEASE_SECONDS", "soon")
    result = runner.invoke(
        app, ["executor", "run", "--database-url", f"sqlite:///{tmp_path / 'w.db'}", "--stop-after", "0"]
    )
    assert result.exit_code == 2, result.output
    assert "WINBACK_BATCH_SIZE='0': Input should be greater than or equal to 1" in result.output
    assert "WINBACK_LEASE_SECONDS='soon': Input should be a valid number" in result.output
    assert "validation error" not in result.output
    assert not (tmp_path / "w.db").exists()  # refused before the database is touched


def test_every_command_starts_with_sigchld_at_its_default(tmp_path: Path) -> None:
    """An ignored SIGCHLD inherited from whatever started the command makes every child's exit unreadable (a failed
    bench job read as 0, say): the command line puts it back before any command runs, even one that starts no
    worker of its own (this one stops at once, on a database that is not there)."""
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        result = runner.invoke(
            app, ["executor", "resolve-charge", "1", "--charged", "--database-url", f"sqlite:///{tmp_path / 'no.db'}"]
        )
        restored = signal.getsignal(signal.SIGCHLD)
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert result.exit_code == 2, result.output
    assert restored == signal.SIG_DFL


def test_an_output_path_that_is_a_file_or_a_folder_is_one_line_not_a_traceback(
    small_history: Path, tmp_path: Path
) -> None:
    """`--out README.md` (a file where a folder is written) ended simulate, evaluate and history export in a
    FileExistsError traceback, evaluate's after its scoring; `codes import-gsm --out /tmp` (a folder where a file
    is written) in an IsADirectoryError one. Each is refused before any work, naming the option and the path."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    history = ["--attempts", str(small_history / "attempts.parquet"), "--nudges", str(small_history / "nudges.parquet")]
    gsm = tmp_path / "gsm.csv"
    gsm.write_text(
        "connector,flow,sub_flow,code,message,status,router_error,decision,step_up_possible,unified_code,"
        "unified_message,error_category,clear_pan_possible\n"
        "stripe,authorize,authorize,xx1,Boom,failure,,retry,false,,,,false\n"
    )
    for args, reason in [
        (["simulate", "--out", str(a_file), "--orders", "10"], f"--out {a_file} is a file: name a folder"),
        (
            ["simulate", "--out", str(a_file / "sub"), "--orders", "10"],
            f"--out {a_file / 'sub'} is under {a_file}, a file: name a folder",
        ),
        (["evaluate", *history, "--out", str(a_file), "--episodes", "0"], f"--out {a_file} is a file"),
        (
            ["history", "export", "--out", str(a_file), "--database-url", f"sqlite:///{tmp_path / 'absent.db'}"],
            f"--out {a_file} is a file",
        ),
        (["codes", "import-gsm", str(gsm), "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        (["codes", "report", *history, "--csv", str(tmp_path)], f"--csv {tmp_path} is a folder"),
        # A folder no one may write in (/proc refuses even root): simulate ended in a FileNotFoundError traceback,
        # evaluate in "[Errno 2] No such file or directory" after its scoring.
        (
            ["simulate", "--out", "/proc/winback-out/h", "--orders", "10"],
            "--out /proc/winback-out/h: cannot write in /proc",
        ),
        (
            ["evaluate", *history, "--out", "/proc/winback-out", "--episodes", "0"],
            "--out /proc/winback-out: cannot write in /proc",
        ),
        (["codes", "report", *history, "--csv", "/proc/codes.csv"], "--csv /proc/codes.csv: cannot write in /proc"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"error: {reason}" in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert a_file.read_text() == "not a folder"


def test_resolve_charge_refuses_an_action_id_no_database_holds_in_one_line(tmp_path: Path) -> None:
    """An action id beyond 64 bits (a typo, a pasted payment id) ended in SQLite's OverflowError traceback, exit 1;
    the console refuses the same id as no action. Ids run from 1 to 2**63 - 1 (PostgreSQL's bigint)."""
    from service.executor.store import make_executor_engine
    from service.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = make_executor_engine(url)
    upgrade(engine)
    engine.dispose()
    for action_id in (str(2**63), "99999999999999999999999", "0"):
        result = runner.invoke(app, ["executor", "resolve-charge", action_id, "--charged", "--database-url", url])
        assert result.exit_code == 2, (action_id, result.output)
        assert "'action_id'" in result.output, result.output
        assert not isinstance(result.exception, OverflowError)
